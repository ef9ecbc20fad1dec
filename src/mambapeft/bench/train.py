"""Training-step benchmarks on a GPU: every method on Vim-S and Mamba LMs (Mamba-1 and Mamba-2), and
the baselines a user would otherwise pick (transformers' MambaForCausalLM / Mamba2ForCausalLM + peft
LoRA; timm ViT-S/16 + LoRA).

Random data of the right shapes, bf16 autocast, the optimizer step included; the median of timed
steps after warm-up, with CUDA synchronisation around each step. Writes
``results/benchmarks/<device>.json`` and a Markdown table beside it. The language rows also run on
CPU (fp32, no memory figures), which the tests use with tiny sizes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..build import build_trainable, method_spec
from ..eval.classification import classifier_forward
from ..gpus import allocator_settings
from ..io import write_json_atomic, write_text_atomic
from ..models.cuda_graphs import captured_replay
from ..models.lm import LM_VARIANTS, MambaLMConfig
from ..runspec import domain_file, methods_for
from ..runtime import autocast_for, device_name
from ..train.language import GraphedLoss, next_token_targets, token_loss_sum
from ..train.optim import build_optimizer
from .common import error_row, provenance, provenance_line, release_memory, timed_calls, timed_queued_calls
from .figure import draw_throughput, vision_rows

log = logging.getLogger("mambapeft.bench")

VTAB_TRAIN_STEPS = 19 * 100 * 32  # 19 tasks x 100 epochs x 32 iterations (1,000 images, batch 32)
HF_WEIGHTS = {"": torch.float32, "-bf16-weights": torch.bfloat16}  # baseline name suffix -> weights dtype
# affix's projection would add billions of parameters to these (the paper ran it at mamba-130m)
AFFIX_TOO_LARGE = ("mamba-370m", "mamba-790m", "mamba-1.4b", "mamba-2.8b")
CUDA = torch.device("cuda")  # where the benchmarks run unless told otherwise (tests: CPU)
# dense (no 2:4 sparsity) bf16 tensor-core peak by GPU model, for model FLOP utilisation; NVIDIA's H200
# datasheet gives 1,979 TFLOPS "with sparsity" for the SXM part, half of it dense
PEAK_BF16_FLOPS = {"H200": 989e12}
TIMM_BASELINE = "timm-vit-s16+peft-lora"  # + GRAPHED: its whole training step replayed as one CUDA graph
GRAPHED = "-graphed"
# how the rows' steps are timed (the trainers': train/runner.py, train/language.py), written into the record
STEP_TIMING = ("training steps queued back to back (four runs, the device waited for around each run; the image rows' "
               "of 25 steps after 10 untimed), ours and the baselines': our trainers wait for no step (a step's loss "
               "is read once the next is queued)")
# the image rows' steps, ours and timm's: untimed, then timed in four runs. Each run starts on an idle device
# (its first step queued while the device waits), a start the trainer pays once: runs of 5 steps (20 in
# all, before 2026-12-04) read ~1% slower than runs of 20 on the same tree (results/benchmarks/profile/step_ab.py)
VISION_WARMUP, VISION_STEPS = 10, 100
LANGUAGE_SHAPE = (4, 256)  # (micro-batch, tokens) of the language rows: the paper recipe's micro-batch


def _timed(step: Callable[[], None], warmup: int, steps: int, device: torch.device = CUDA, queued=False) -> dict:
    """Step time (median, min, max) over ``steps`` steps after ``warmup``: each waited for, or with
    ``queued`` in runs queued back to back (:func:`timed_queued_calls`), as the trainers run them."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = (timed_queued_calls if queued else timed_calls)(step, steps, device)
    row = {"step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times)}
    if cuda:  # reserved, not only allocated: a CUDA graph's private pool is reserved before the timed steps
        row.update(peak_mem_bytes=torch.cuda.max_memory_allocated(), reserved_bytes=torch.cuda.max_memory_reserved())
    return row


def _random_images(batch: int, size: int, classes: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the right shapes for a vision step: images (B, 3, size, size), labels (B,)."""
    return torch.randn(batch, 3, size, size, device="cuda"), torch.randint(0, classes, (batch,), device="cuda")


def _train_step(model, optimizer, loss_fn, device: torch.device = CUDA) -> Callable[[], None]:
    autocast = autocast_for(device)  # bf16 on CUDA

    def step():
        with autocast():
            loss = loss_fn(model)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def _our_model(backbone: str, method: str, num_classes: int | None = None, device: torch.device = CUDA):
    """Random weights, built and placed as the trainer does; a missing mamba-ssm shows as backend
    "torch" in the row."""
    spec = method_spec(backbone, method, num_classes=num_classes)
    built = build_trainable(spec, device, weights=False)
    optimizer = build_optimizer(built.groups, spec["train"]["optimizer"]) if built.groups else None
    return built.model, built.peft, optimizer, built.backend


def _vision_step(method: str, backbone: str, batch: int, size: int, cuda_graphs=False):
    """(model, PEFT result, backend name, one training step on random images) as the trainer runs it."""
    from ..train.vision import GraphedForward

    model, result, optimizer, backend = _our_model(backbone, method, num_classes=100)
    images, labels = _random_images(batch, size)
    model.train()
    forward = GraphedForward(model, [images.shape], images.device) if cuda_graphs else model
    return model, result, backend, _train_step(forward, optimizer, lambda m: F.cross_entropy(m(images).float(), labels))


def _language_step(method: str, backbone: str, micro_batch: int, length: int, cuda_graphs=False,
                   device: torch.device = CUDA):
    """(model, PEFT result, backend name, one training step on random ids of ``length`` + 1 tokens)."""
    model, result, optimizer, backend = _our_model(backbone, method, device=device)
    ids = torch.randint(0, model.config.vocab_size, (micro_batch, length + 1), device=device)
    targets = next_token_targets(ids, torch.full((micro_batch,), length + 1))
    model.train()
    if cuda_graphs and result.trainable:
        graphed = GraphedLoss(model, micro_batch, [length + 1], ids.device)
        return model, result, backend, _train_step(model, optimizer, lambda m: graphed(ids, targets) / (micro_batch * length))

    def loss_fn(m):
        return token_loss_sum(m, ids, targets, contextlib.nullcontext) / (micro_batch * length)  # autocast is on

    return model, result, backend, _train_step(model, optimizer, loss_fn, device)


def bench_vision_method(method: str, backbone="vim-s", batch=32, size=224, warmup=VISION_WARMUP,
                        steps=VISION_STEPS, cuda_graphs=False) -> dict:
    """A training step at ``batch`` and an evaluation forward at the recipe's ``eval_batch_size``,
    each as the trainer and the evaluation run them (replayed as CUDA graphs with ``cuda_graphs``)."""
    model, result, backend, step = _vision_step(method, backbone, batch, size, cuda_graphs)
    row = _timed(step, warmup, steps, queued=True)
    model.eval()
    eval_batch = int(domain_file("vision", "recipe")["eval_batch_size"])
    images, _ = _random_images(eval_batch, size)
    forward = classifier_forward(model, images.shape, images.device, cuda_graphs, autocast_for(images.device))
    evaluation = _timed(lambda: forward(images), 3, 10)
    row.update(images_per_s=batch / row["step_s"], eval_images_per_s=eval_batch / evaluation["step_s"],
               eval_batch=eval_batch, trainable_params=result.count(), backend=backend, cuda_graphs=cuda_graphs)
    return row


def bench_language_method(method: str, backbone: str, micro_batch=4, length=256, warmup=3, steps=10,
                          cuda_graphs=False, device: torch.device = CUDA) -> dict:
    model, result, backend, step = _language_step(method, backbone, micro_batch, length, cuda_graphs, device)
    if not result.trainable:
        return {"skipped": "no trainable parameters (evaluation only)"}
    row = _timed(step, warmup, steps, device, queued=True)
    row.update(tokens_per_s=micro_batch * length / row["step_s"], trainable_params=result.count(), backend=backend,
               cuda_graphs=cuda_graphs)
    return add_flop_utilisation(row, model, device_name(device))


def bench_hf_mamba_lora(backbone: str, micro_batch=4, length=256, rank=32, warmup=3, steps=10,
                        weights_dtype=torch.float32, device: torch.device = CUDA) -> dict:
    """transformers' MambaForCausalLM or Mamba2ForCausalLM (its CUDA-kernel path) of ``backbone``'s
    sizes + peft LoRA on in_proj: our lora_in_proj at the same shapes. ``weights_dtype``: fp32 is
    what transformers' Trainer with ``bf16=True`` trains; bf16 is a model loaded with
    ``torch_dtype=torch.bfloat16`` (peft keeps the LoRA weights in fp32)."""
    from peft import LoraConfig, get_peft_model

    from .hf import hf_causal_lm

    config = MambaLMConfig(**LM_VARIANTS[backbone].config)
    base = hf_causal_lm(config, device, weights_dtype)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=["in_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (micro_batch, length), device=device)
    model.train()
    row = _timed(_train_step(model, optimizer, lambda m: m(input_ids=ids, labels=ids).loss, device), warmup, steps,
                 device, queued=True)  # as our rows
    row.update(tokens_per_s=micro_batch * (length - 1) / row["step_s"],
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
               weights_dtype=str(weights_dtype).removeprefix("torch."))
    return add_flop_utilisation(row, model, device_name(device))


def add_flop_utilisation(row: dict, model: torch.nn.Module, device_label: str) -> dict:
    """``row`` with the model's parameter count and, on a GPU of :data:`PEAK_BF16_FLOPS`, its model
    FLOP utilisation: tokens/s x 6 N / peak, N the parameters the step's matmuls read (all of
    them, a tied embedding once: it is the LM head's matmul). 6 N is PaLM's MFU convention
    (Chowdhery et al. 2022, appendix B): forward 2 N, backward 4 N per token. It counts a full
    training step's FLOPs, so a PEFT step, which skips the frozen weights' gradients (~4 N + 2 N
    trainable), scores up to 1.5x lower than its hardware utilisation; the selective scan's own
    FLOPs (O(d_inner x d_state) per token and layer against O(d_model x d_inner)) are left out."""
    row["model_params"] = sum(p.numel() for p in model.parameters())  # shared tensors once
    peak = peak_bf16_flops(device_label)
    if peak and "tokens_per_s" in row:
        row["mfu"] = row["tokens_per_s"] * 6 * row["model_params"] / peak
    return row


def peak_bf16_flops(device_label: str) -> float | None:
    """The dense bf16 peak of the GPU named ``device_label`` (:data:`PEAK_BF16_FLOPS`); None if not listed."""
    return next((flops for model, flops in PEAK_BF16_FLOPS.items() if model in device_label), None)


def bench_timm_vit_lora(batch=32, rank=8, warmup=VISION_WARMUP, steps=VISION_STEPS, cuda_graphs=False) -> dict:
    """timm ViT-S/16 (the paper's comparison backbone) + peft LoRA on qkv, batch 32, 224x224, bf16
    autocast; ``cuda_graphs``: forward, backward and AdamW step replayed as one CUDA graph (static
    inputs), what a timm user gets from graph capture alone."""
    if importlib.util.find_spec("timm") is None or not torch.cuda.is_available():
        return {"skipped": "needs timm and a CUDA device (pip install timm; the GPU environment has it)"}
    _, step = timm_lora_step(batch, rank, cuda_graphs)
    row = _timed(step, warmup, steps, queued=True)  # as our vision rows
    row.update(images_per_s=batch / row["step_s"], cuda_graphs=cuda_graphs)
    return row


def timm_lora_step(batch: int, rank: int, cuda_graphs: bool) -> tuple[torch.nn.Module, Callable[[], None]]:
    """(the peft model, one training step on static random images) of :func:`bench_timm_vit_lora`."""
    import timm
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=100).cuda(),
                           LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv"], modules_to_save=["head"]))
    # capturable: the step counters live on the GPU, so the graph's replays advance them
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, capturable=cuda_graphs)
    images, labels = _random_images(batch, 224)
    model.train()
    step = _train_step(model, optimizer, lambda m: F.cross_entropy(m(images).float(), labels))
    return model, _captured_whole(step) if cuda_graphs else step


def _captured_whole(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` (on static tensors: forward, backward, optimizer step) as one CUDA graph's replay;
    its warm-up also creates the optimizer's state before capture."""
    # autocast's weight cache must be off while capturing; the step's own autocast inherits the setting
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        return captured_replay(step, warmup=3)


def _guarded(fn, *args, **kwargs) -> dict:
    """One benchmark row: a row that fails is reported and the others still run. Its memory is
    counted from what earlier rows left behind (captured CUDA graphs keep their pools)."""
    release_memory()
    held = {}
    if torch.cuda.is_available():
        held = {"peak_mem_bytes": torch.cuda.memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved()}
    try:
        row = fn(*args, **kwargs)
    except Exception as err:
        log.exception("benchmark %s%s failed", fn.__name__, args)
        return error_row(err)
    return {key: value - held[key] if key in held else value for key, value in row.items()}


def run_benchmarks(out_dir: Path, vision_backbone="vim-s", language_backbones=("mamba-130m", "mamba-1.4b"),
                   vision_methods=None, language_methods=None, baselines=True, cuda_graphs=False,
                   language_shape=LANGUAGE_SHAPE, warmup_steps=(3, 10), device: str = "cuda") -> dict:
    """Every row, written out after each one (<device>.json, .md, and .png: the image rows as bars,
    bench/figure.py): an interrupted run keeps what it measured.
    ``cuda_graphs``: training steps as the trainer runs them with the runtime key ``cuda_graphs``.
    Methods None: every method of the domain's methods.yaml (an empty list: none, and for vision
    no timm baseline). ``language_shape``: (micro-batch, sequence length); ``warmup_steps``: the
    untimed and timed steps of a language row. On ``device`` "cpu" only language rows run."""
    device = torch.device(device)
    device_label = device_name(device)
    vision_methods = list(methods_for("vision", vision_backbone)) if vision_methods is None else vision_methods
    language_methods = list(domain_file("language", "methods")) if language_methods is None else language_methods
    report = {"device": device_label, "torch": torch.__version__, "cuda_graphs": cuda_graphs,
              "allocator": allocator_settings(), "provenance": provenance(),
              "language_shape": list(language_shape), "vision": {}, "language": {}, "baselines": {},
              "step_timing": STEP_TIMING}
    slug = device_label.replace(" ", "_") + ("-cuda_graphs" if cuda_graphs else "")
    language = {"micro_batch": language_shape[0], "length": language_shape[1], "warmup": warmup_steps[0],
                "steps": warmup_steps[1], "device": device}
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["projection"] = project_vtab_hours(report["vision"])
        write_json_atomic(out_dir / f"{slug}.json", report)
        write_text_atomic(out_dir / f"{slug}.md", markdown(report))
        if vision_rows(report):
            draw_throughput(report, out_dir / f"{slug}.png", vision_backbone)

    for method in vision_methods:
        log.info("vision %s %s", vision_backbone, method)
        report["vision"][method] = _guarded(bench_vision_method, method, vision_backbone, cuda_graphs=cuda_graphs)
        save()
    for backbone in language_backbones:
        for method in language_methods:
            if backbone in AFFIX_TOO_LARGE and method == "affix":
                continue
            log.info("language %s %s", backbone, method)
            report["language"].setdefault(backbone, {})[method] = _guarded(bench_language_method, method, backbone,
                                                                           cuda_graphs=cuda_graphs, **language)
            save()
    if baselines:
        for backbone in language_backbones:
            for suffix, dtype in HF_WEIGHTS.items():
                if device.type == "cuda" or dtype == torch.float32:  # bf16 weights need bf16 autocast
                    report["baselines"][hf_baseline_name(backbone, suffix)] = _guarded(
                        bench_hf_mamba_lora, backbone, weights_dtype=dtype, **language)
                    save()
        for suffix, graphs in (("", False), (GRAPHED, True)) if vision_methods else ():
            report["baselines"][TIMM_BASELINE + suffix] = _guarded(bench_timm_vit_lora, cuda_graphs=graphs)
            save()
    return report


def hf_baseline_name(backbone: str, suffix: str = "") -> str:
    """transformers+peft's row for ``backbone``: hf-mamba+... (Mamba-1) or hf-mamba2+... (Mamba-2)."""
    family = "mamba2" if MambaLMConfig(**LM_VARIANTS[backbone].config).mixer_layer == "Mamba2" else "mamba"
    return f"hf-{family}+peft-lora{suffix}:{backbone}"


def project_vtab_hours(vision: dict, test_images: int = 387_904) -> dict:
    """GPU-hours of the whole Vim-S VTAB-1k table from measured throughputs: every row x 19 tasks
    x 100 epochs of training plus one pass over the 19 test splits (387,904 images, VTAB test sizes);
    and of the paper's own rows among them (those vision/paper.yaml publishes for Vim-S), the table the
    paper reports, where the rest are the newer methods this tool puts beside them."""
    hours = {}
    for method, row in vision.items():
        if "step_s" in row:
            hours[method] = (VTAB_TRAIN_STEPS * row["step_s"] + test_images / row["eval_images_per_s"]) / 3600
    published = domain_file("vision", "paper").get("vim-s", {})
    paper = [method for method in hours if method in published]
    return {"per_method_hours": hours, "table_hours": sum(hours.values()),
            "paper_rows": paper, "paper_rows_hours": sum(hours[m] for m in paper)}


def markdown(report: dict) -> str:
    graphs = ", training steps as CUDA graphs" if report.get("cuda_graphs") else ""
    precision = "fp32" if report["device"] == "cpu" else "bf16 autocast"
    lines = [f"# Training-step benchmark on {report['device']} (torch {report['torch']}, {precision}{graphs})", ""]
    lines += provenance_line(report.get("provenance"))
    if report["device"] != "cpu":
        allocator = f"`{report['allocator']}`" if report.get("allocator") else "PyTorch's defaults"
        lines += [f"Peak memory: allocated; a graphed row's reserved (its graph's pool is reserved, fragmentation "
                  f"included). CUDA allocator settings: {allocator}.", ""]
    if "language_shape" in report:
        lines += ["Language rows: micro-batch {} x {} tokens; MFU = tokens/s x 6 x parameters / dense bf16 "
                  "peak.".format(*report["language_shape"]), ""]
    if "step_timing" in report:
        lines += [f"Step times: {report['step_timing']}.", ""]
    eval_batches = {row["eval_batch"] for row in report["vision"].values() if "eval_batch" in row}
    if eval_batches:
        lines += [f"Evaluation: forwards of {', '.join(map(str, sorted(eval_batches)))} images (the recipe's eval "
                  f"batch), as the evaluation runs them{' (CUDA graphs)' if report.get('cuda_graphs') else ''}.", ""]
    lines += ["| backbone | method | trainable | step (ms) | throughput | peak memory (GiB) | vs linear_probe "
              "| evaluation |", "|---|---|---|---|---|---|---|---|"]
    base = report["vision"].get("linear_probe", {}).get("step_s")
    for method, row in report["vision"].items():
        lines.append(_row("vim-s", method, row, "images_per_s", "img/s", base))
    for backbone, rows in report["language"].items():
        for method, row in rows.items():
            lines.append(_row(backbone, method, row, "tokens_per_s", "tok/s", None))
    lines += ["", "| baseline | step (ms) | throughput | peak memory (GiB) |", "|---|---|---|---|"]
    for name, row in report["baselines"].items():
        key, unit = ("tokens_per_s", "tok/s") if "mamba" in name else ("images_per_s", "img/s")
        lines.append(f"| {name} | {_ms(row)} | {_rate(row, key, unit)} | {_gib(row)} |")
    lines += _ratio_lines(report)
    projection = report.get("projection", {})
    if projection.get("per_method_hours"):  # no vision rows measured: nothing to project from
        lines += ["", f"Projected GPU-hours for the whole Vim-S VTAB-1k table: **{projection['table_hours']:.1f} h** "
                      f"(from the {len(projection['per_method_hours'])} rows measured)"]
        if projection.get("paper_rows"):  # older reports have no split
            others = len(projection["per_method_hours"]) - len(projection["paper_rows"])
            lines[-1] += (f"; the paper's {len(projection['paper_rows'])} rows among them (those `vision/paper.yaml` "
                          f"publishes): **{projection['paper_rows_hours']:.1f} h**, the {others} newer rows "
                          f"{projection['table_hours'] - projection['paper_rows_hours']:.1f} h")
    return "\n".join(lines) + "\n"


def _ratio_lines(report: dict) -> list[str]:
    """Ours / baseline at the same shapes: LoRA(in_proj) vs transformers+peft LoRA, LoRA rows vs timm ViT-S LoRA."""
    pairs = [(f"{backbone} lora_in_proj", report["language"].get(backbone, {}).get("lora_in_proj", {}),
              hf_baseline_name(backbone, suffix), "tokens_per_s")
             for backbone in report["language"] for suffix in HF_WEIGHTS]
    pairs += [(f"vim-s {method}", report["vision"].get(method, {}), TIMM_BASELINE + suffix, "images_per_s")
              for method in ("lora_in_proj", "lorap_x") for suffix in ("", GRAPHED)]
    lines = []
    for ours_name, ours, baseline_name, key in pairs:
        baseline = report["baselines"].get(baseline_name, {})
        if key in ours and key in baseline:
            memory = f"{_memory(ours) / _memory(baseline):.3f}x" if _memory(baseline) else ""
            lines.append(f"| {ours_name} / {baseline_name} | {ours[key] / baseline[key]:.3f}x | {memory} |")
    return ["", "| ours / baseline | throughput | peak memory |", "|---|---|---|", *lines] if lines else []


def _ms(row):
    return f"{row['step_s'] * 1e3:.1f}" if "step_s" in row else row.get("error", row.get("skipped", ""))[:60]


def _rate(row, key, unit):
    utilisation = f" ({row['mfu']:.1%} MFU)" if "mfu" in row else ""
    return f"{row[key]:,.0f} {unit}{utilisation}" if key in row else ""


def _memory(row) -> int | None:
    """Peak allocated memory; with a CUDA graph, the larger reserved figure (its pool is reserved)."""
    return row.get("reserved_bytes" if row.get("cuda_graphs") else "peak_mem_bytes")


def _gib(row):
    return f"{_memory(row) / 2**30:.2f}" if _memory(row) is not None else ""


def _row(backbone, method, row, key, unit, base):
    ratio = f"{row['step_s'] / base:.2f}x" if base and "step_s" in row else ""
    trainable = f"{row['trainable_params']:,}" if "trainable_params" in row else ""
    evaluation = f"{row['eval_images_per_s']:,.0f} img/s" if "eval_images_per_s" in row else ""
    return (f"| {backbone} | {method} | {trainable} | {_ms(row)} | {_rate(row, key, unit)} | {_gib(row)} | {ratio} "
            f"| {evaluation} |")
