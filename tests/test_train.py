"""Training engine: the recipes' schedules and parameter groups, resumption, divergence, seeds."""
import math
import signal
import time

import pytest
import torch
from triton_helpers import skip_unless_interpreted

from mambapeft.data.prepare import prepare_dataset
from mambapeft.models import build_model
from mambapeft.peft import apply_peft
from mambapeft.peft.groups import param_groups
from mambapeft.report.tables import summary_frame
from mambapeft.runspec import Run, domain_file, method_definition, resolve_run, validate_config
from mambapeft.train.optim import build_optimizer
from mambapeft.train.schedules import WarmupCosine, WarmupLinear, build_schedule
from run_helpers import metrics, run, train_process

# ------------------------------------------------------------------------------------------------
# schedules and parameter groups
# ------------------------------------------------------------------------------------------------


def test_vision_schedule_matches_the_recipe():
    recipe = domain_file("vision", "recipe")
    schedule = build_schedule(recipe, iters_per_epoch=32, total_steps=3200)
    assert isinstance(schedule, WarmupCosine)
    assert schedule(0) == pytest.approx(1e-6)  # 1e-3 x start factor 1e-3
    assert schedule(160) == pytest.approx(1e-3 * (1e-3 + (1 - 1e-3) * 160 / 320))  # linear, per iteration
    assert schedule(320) == pytest.approx(1e-3)  # epoch 10: cosine starts at the base lr
    assert schedule(320 + 31) == schedule(320)  # cosine is stepped once per epoch
    assert schedule(32 * 55) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 45 / 90)) / 2)
    assert schedule(3199) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 89 / 90)) / 2)


def test_language_schedule_matches_transformers_linear_warmup():
    schedule = WarmupLinear(base_lr=1e-3, total_steps=1000, warmup_steps=100)
    assert schedule(0) == 0.0 and schedule(50) == pytest.approx(5e-4) and schedule(100) == pytest.approx(1e-3)
    assert schedule(550) == pytest.approx(5e-4) and schedule(1000) == 0.0


def groups_by_name(method, backbone="vim-mini"):
    domain = "vision" if backbone.startswith("vim") else "language"
    recipe = domain_file(domain, "recipe")
    model = build_model(backbone, num_classes=3) if domain == "vision" else build_model(backbone)
    result = apply_peft(model, method_definition(domain, method, backbone, None)["peft"], method)
    groups = param_groups(model, result, recipe["optimizer"])
    return {name: (g["lr_mult"], g["wd_mult"]) for g in groups for name in g["names"]}


def test_parameter_groups_follow_the_decay_rules():
    full = groups_by_name("full")
    assert full["layers.0.mixer.in_proj.weight"] == (1.0, 1.0)
    for no_decay in ("layers.0.mixer.A_log", "layers.0.mixer.D", "cls_token", "pos_embed", "layers.0.norm.weight",
                     "layers.0.mixer.dt_proj.bias", "head.bias"):
        assert full[no_decay] == (1.0, 0.0), no_decay
    a = groups_by_name("a")  # v2 deltas: decay x10 pulls A_log toward its pretrained value
    assert a["layers.0.mixer.parametrizations.A_log.0.delta"] == (1.0, 10.0)
    assert groups_by_name("bias")["layers.0.mixer.dt_proj.parametrizations.bias.0.delta"] == (1.0, 100.0)
    scan = groups_by_name("additional_scan")
    assert scan["layers.0.mixer.state_extensions.fwd.A_log"] == (1.0, 0.0)
    assert scan["layers.0.mixer.state_extensions.bwd.x_proj.weight"] == (1.0, 1.0)
    allm = groups_by_name("all")
    assert allm["layers.0.mixer.x_proj.updates.full.lora_down.weight"] == (0.1, 1.0)  # lora_x_proj lr x0.1


# ------------------------------------------------------------------------------------------------
# whole runs on tiny data (subprocesses, as Snakemake runs them)
# ------------------------------------------------------------------------------------------------
def test_same_seed_same_result(tiny_vision, tmp_path):
    for name in ("a", "b"):
        run(tiny_vision, tmp_path / name)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert a["value"] == b["value"] and a["history"] == b["history"]
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == (tmp_path / "b" / "adapter.safetensors").read_bytes()


def test_killed_run_resumes_to_the_same_result(tiny_vision, tmp_path):
    run(tiny_vision, tmp_path / "whole")
    interrupted = tmp_path / "interrupted"
    process = train_process(tiny_vision, interrupted)
    deadline = time.time() + 300
    while not (interrupted / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    # killed at once: the whole run on two idle cores can end within a few tenths of a second of its
    # first checkpoint (a fixed wait here let one CI run finish before the kill)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "train.json").exists()  # no result from an incomplete run
    run(tiny_vision, interrupted)
    assert metrics(interrupted)["history"] == metrics(tmp_path / "whole")["history"]
    assert metrics(interrupted)["value"] == metrics(tmp_path / "whole")["value"]
    assert (interrupted / "adapter.safetensors").read_bytes() == (tmp_path / "whole" / "adapter.safetensors").read_bytes()


def test_divergence_is_recorded_and_shown(tiny_vision, tmp_path):
    err = run(tiny_vision, tmp_path / "nan", optimizer={**tiny_vision["train"]["optimizer"], "lr": 1e12})
    record = metrics(tmp_path / "nan")
    assert record["status"] == "diverged" and "loss is" in record["reason"]
    assert "diverged" in err
    ok = tmp_path / "ok"
    run(tiny_vision, ok)
    diverged = {**record, "config": {**record["config"], "run": {**record["config"]["run"], "method": "lorap_z"}}}
    diverged["config"]["method"] = {**diverged["config"]["method"], "id": "lorap_z", "label": "LoRAp(Z)"}
    table, _ = summary_frame([metrics(ok), diverged])
    assert table.set_index("method").loc["lorap_z", "diverged"]
    assert math.isnan(table.set_index("method").loc["lorap_z", "mean"])


def test_a_steps_loss_is_read_once_the_next_step_is_queued(tiny_vision, tmp_path, monkeypatch):
    """The trainer reads a step's loss (a wait for the device) after queueing the next step, and the last
    step's before a checkpoint is written and at the end: every step's loss read once, in order, into
    the history."""
    from mambapeft.runspec import training_spec
    from mambapeft.train import runner

    events = []
    read = runner._loss_value
    monkeypatch.setattr(runner, "_loss_value", lambda loss, step, lr: events.append(("read", step)) or read(loss, step, lr))
    trainer = runner.Trainer(training_spec({**tiny_vision, "output_dir": str(tmp_path)}))
    train_loss, save = trainer.task.train_loss, trainer._save_checkpoint
    monkeypatch.setattr(trainer.task, "train_loss", lambda model, step, autocast: events.append(("step", step))
                        or train_loss(model, step, autocast))
    monkeypatch.setattr(trainer, "_save_checkpoint", lambda state: events.append(("checkpoint", state.step)) or save(state))
    state = trainer.train()
    total, every = trainer.total_steps, trainer.task.checkpoint_every
    assert [step for kind, step in events if kind == "read"] == list(range(total))
    assert [h["step"] for h in state.history if "loss" in h] == list(range(1, total + 1))
    checkpoints = [i for i, (kind, _) in enumerate(events) if kind == "checkpoint"]
    assert checkpoints and all(events[i - 1] == ("read", events[i][1] - 1) for i in checkpoints)
    for step in range(total - 1):  # step's loss read after step + 1 was queued, but before a checkpoint
        queued_next = events.index(("step", step + 1)) < events.index(("read", step))
        assert queued_next != ((step + 1) % every == 0), step


def test_a_checkpoint_due_while_the_last_is_written_is_skipped_not_waited_for(tiny_vision, tmp_path, monkeypatch,
                                                                            caplog):
    """Where a checkpoint's write outlasts the steps to the next (full fine-tuning on a GPU), the loop
    takes the next one due instead of waiting for the disk; the run ends as usual."""
    import threading

    from mambapeft.runspec import training_spec
    from mambapeft.train import checkpoint_writer, runner

    release, written = threading.Event(), []
    real_save = checkpoint_writer.torch_save_verifiable

    def slow_first_save(state, path):
        if not written:
            release.wait(30)
        real_save(state, path)
        written.append(state["state"]["step"])

    monkeypatch.setattr(checkpoint_writer, "torch_save_verifiable", slow_first_save)
    trainer = runner.Trainer(training_spec({**tiny_vision, "output_dir": str(tmp_path)}))
    every, train_loss = trainer.task.checkpoint_every, trainer.task.train_loss

    def train_loss_then(model, step, autocast):
        if step == 3 * every:  # two checkpoints have fallen due since the first began: let it finish
            release.set()
        if step > 3 * every:  # each write done before the next falls due
            trainer.checkpoints.wait()
        return train_loss(model, step, autocast)

    monkeypatch.setattr(trainer.task, "train_loss", train_loss_then)
    with caplog.at_level("DEBUG", logger="mambapeft.train"):
        state = trainer.train()
    due = list(range(every, trainer.total_steps, every))
    assert written == [due[0], *due[3:]] and len(due) > 3
    assert [f"step {step}: checkpoint skipped" in caplog.text for step in due[1:3]] == [True, True]
    assert state.step == trainer.total_steps


@pytest.mark.parametrize("batch_size,graphed_sizes", [(32, [32, 16]), (16, [16])])
def test_cuda_graphs_cover_full_batches_and_an_epochs_shorter_last(tiny_vision, monkeypatch, batch_size, graphed_sizes):
    """With `cuda_graphs` every vision training step replays a graph: one for full batches, and one for an
    epoch's last where the training set (48 images here) is not a multiple of the batch (run eagerly, that
    step was host-bound)."""
    from mambapeft.train import vision

    captured = []
    monkeypatch.setattr(vision, "GraphedForward", lambda model, shapes, device: captured.extend(shapes))
    task = vision.VisionTask({**tiny_vision, "train": {**tiny_vision["train"], "batch_size": batch_size}},
                             torch.device("cpu"))
    task.use_cuda_graph(None)
    assert task.n_train == 48
    assert captured == [(size, 3, 32, 32) for size in graphed_sizes]


@pytest.fixture(scope="module")
def tiny_language(tmp_path_factory):
    """Mini math data, a tokenizer and a random-weight Mamba LM in the state-spaces layout."""
    from mambapeft.data.mini_text import pretrain_corpus
    from mambapeft.data.tokenizer import build_tokenizer, load_tokenizer
    from mambapeft.models.checkpoints import save_lm

    root = tmp_path_factory.mktemp("language")
    weights = root / "lm"
    build_tokenizer(pretrain_corpus(seed=0, n_docs=300), vocab_size=320, path=weights / "tokenizer.json")
    save_lm(build_model("mamba-mini", vocab_size=load_tokenizer(weights).vocab_size), weights)
    config = {
        "results_dir": str(root / "results"), "resources_dir": str(root / "resources"), "device": "cpu",
        "scan_backend": "torch", "threads": 1,
        "data": {"math": {"kind": "math", "source": "mini", "seed": 0, "n_train": 72, "n_test": 8}},
        "backbones": {"mamba-mini": {"source": "pretrain", "path": str(weights)}},
        "experiments": {"math": {"domain": "language", "data": "math", "backbones": ["mamba-mini"], "tasks": ["math_10k"],
                                 "eval_tasks": ["mini_addsub"], "methods": ["lorap_x"], "seeds": [0],
                                 "train": {"epochs": 2, "batch_size": 16, "micro_batch_size": 16, "val_size": 8,
                                           "eval_every": 2, "checkpoint_every": 2, "schedule": {"warmup_steps": 2},
                                           "eval": {"batch_size": 8, "max_new_tokens": 4}}}},
    }
    validate_config(config)
    prepare_dataset({**config["data"]["math"], "root": str(root / "resources/data/math")}, root / "resources/data/math/manifest.json")
    return resolve_run(config, Run("math", "mamba-mini", "math_10k", "lorap_x", 0))


def test_language_run_resumes_to_the_same_result(tiny_language, tmp_path):
    run(tiny_language, tmp_path / "whole")
    interrupted = tmp_path / "interrupted"
    process = train_process(tiny_language, interrupted)
    deadline = time.time() + 300
    while not (interrupted / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run(tiny_language, interrupted)
    whole, resumed = metrics(tmp_path / "whole"), metrics(interrupted)
    assert resumed["history"] == whole["history"] and resumed["best_step"] == whole["best_step"]
    assert resumed["results"] == whole["results"]
    assert (interrupted / "generations.jsonl").read_text() == (tmp_path / "whole" / "generations.jsonl").read_text()


def test_micro_batch_size_does_not_change_the_update(tiny_language, tmp_path):
    """The loss is normalised over the whole batch's tokens, so accumulation over any micro-batch
    size gives the same gradients (up to float summation order)."""
    run(tiny_language, tmp_path / "one", micro_batch_size=16)
    run(tiny_language, tmp_path / "four", micro_batch_size=4)
    one, four = metrics(tmp_path / "one")["history"], metrics(tmp_path / "four")["history"]
    assert [h["step"] for h in one] == [h["step"] for h in four]
    for a, b in zip(one, four):
        assert a.get("loss", a.get("val_loss")) == pytest.approx(b.get("loss", b.get("val_loss")), rel=1e-4)


# ------------------------------------------------------------------------------------------------
# the language loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_trains", [False, True])
def test_loss_casts_the_lm_head_once_and_computes_what_calling_it_per_chunk_does(head_trains):
    """Under autocast, a frozen plain LM head's weight is cast once per loss, not in each chunk's
    forward and recompute, and loss and gradients equal those of the head module called per chunk
    (a hook forces that path); a head that trains is still called per chunk (its gradient summed
    in fp32)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from mambapeft.train.language import LOSS_CHUNK, next_token_targets, token_loss_sum

    torch.manual_seed(0)
    model = build_model("mamba-mini", vocab_size=64)
    for p in model.parameters():
        p.requires_grad_(head_trains)
    model.backbone.layers[0].mixer.out_proj.weight.requires_grad_(True)  # something below the head trains
    ids = torch.randint(1, 64, (2, LOSS_CHUNK + 45))  # three chunks of positions
    targets = next_token_targets(ids, torch.tensor([ids.shape[1], 200]))
    weight = model.lm_head.weight

    class HeadCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == weight.shape:
                HeadCasts.count += 1
            return func(*args, **(kwargs or {}))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        HeadCasts.count = 0
        with HeadCasts():
            loss = token_loss_sum(model, ids, targets, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, HeadCasts.count

    loss, grads, casts = loss_and_grads()
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out)  # the module is called per chunk
    called_loss, called_grads, called_casts = loss_and_grads()
    hook.remove()
    # per chunk: cast in the forward and again in the recompute (and the gradient cast back, when it trains)
    assert (casts, called_casts) == ((9, 9) if head_trains else (1, 6))
    assert torch.equal(loss, called_loss)
    assert grads.keys() == called_grads.keys() and len(grads) == (len(list(model.parameters())) if head_trains else 1)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, called_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_triton_cross_entropy_computes_what_torch_does(monkeypatch, dtype):
    """train/cross_entropy_triton.py (in Triton's interpreter here: conftest.py) against
    F.cross_entropy on fp32 logits, what the loss computes without it: the summed loss, and the
    gradient in the logits' dtype (to a bf16 rounding step), ignored targets included; a vocabulary
    over several blocks, the last partial, and logits with a row stride of their own."""
    skip_unless_interpreted()
    import torch
    import torch.nn.functional as F

    from mambapeft.train import cross_entropy_triton
    from mambapeft.train.language import IGNORE

    monkeypatch.setattr(cross_entropy_triton, "BLOCK_V", 64)  # 150 entries: three blocks
    torch.manual_seed(0)
    logits = (torch.randn(7, 160) * 4).to(getattr(torch, dtype))[:, :150]
    targets = torch.randint(0, 150, (7,))
    targets[[2, 5]] = IGNORE
    runs = []
    for loss_fn in (lambda x: F.cross_entropy(x.float(), targets, reduction="sum", ignore_index=IGNORE),
                    lambda x: cross_entropy_triton.token_cross_entropy_sum(x, targets, IGNORE)):
        leaf = logits.detach().requires_grad_()
        loss = loss_fn(leaf)
        (loss * 1.7).backward()
        runs.append((loss.detach(), leaf.grad))
    (expected, expected_grad), (loss, grad) = runs
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert not grad[[2, 5]].any()
    step = 2 ** -7 if dtype == "bfloat16" else 1e-6  # one bf16 rounding step at |grad| <= 1.7
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=0, atol=step * 2)


def test_the_optimizer_on_the_cpu_is_torchs_default_adamw():
    """The CPU results were made with torch's default AdamW implementation: the fused kernel is for GPUs."""
    import torch
    weight = torch.nn.Parameter(torch.ones(3))
    config = {"name": "adamw", "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.05}
    optimizer = build_optimizer([{"params": [weight], "names": ["weight"]}], config)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is None
