"""The dt_bias initialisation study: the dt strategies (models/dt_init.py) and their hook in the
Mamba-2 mixer, the from-scratch pretraining job, the table and figures, and the study in the
pipeline (the paper grid's dry run; the study at test size end to end, tests/config/dt_init.yaml)."""
import json
import math
import shlex

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mambapeft import runspec
from mambapeft.models import build_model
from mambapeft.models.dt_init import DT_INITS, initial_dt, inverse_softplus, register_dt_init
from mambapeft.models.mamba2 import Mamba2
from mambapeft.report.dt_init import markdown_table, summary_frame
from mambapeft.train.from_scratch import build_scratch_lm, loss_curve, window_batch
from workflow_helpers import REPO, job_counts, snakemake

DT_MIN, DT_MAX, FLOOR = 1e-3, 1e-1, 1e-4
MIXER = dict(d_model=32, d_state=8, headdim=8, chunk_size=16)  # 64 channels: 8 heads
STUDY_CONFIG = (REPO / "tests" / "config" / "tiny.yaml", REPO / "tests" / "config" / "dt_init.yaml")
STUDY_TARGETS = ("results/tables/dt_init.csv", "results/tables/dt_init.md", "results/figures/dt_init_loss.png",
                 "results/figures/dt_init_dt.png")


# -- strategies --------------------------------------------------------------------------------
def test_linear_decay_is_log_spaced_from_dt_max_to_dt_min():
    expected = torch.tensor([1e-1, 10 ** -1.5, 1e-2, 10 ** -2.5, 1e-3])
    assert torch.allclose(initial_dt("linear_decay", 5, DT_MIN, DT_MAX, FLOOR), expected, rtol=1e-6)
    assert torch.allclose(initial_dt("linear_decay_reverse", 5, DT_MIN, DT_MAX, FLOOR), expected.flip(0), rtol=1e-6)
    assert initial_dt("linear_decay", 1, DT_MIN, DT_MAX, FLOOR).tolist() == pytest.approx([DT_MAX])  # one head: dt_max


def test_uniform_is_mamba2s_seeded_log_uniform_draw_floored():
    torch.manual_seed(3)
    dt = initial_dt("uniform", 1000, DT_MIN, DT_MAX, FLOOR)
    torch.manual_seed(3)
    upstream = torch.exp(torch.rand(1000) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=FLOOR)
    assert torch.equal(dt, upstream)
    assert DT_MIN <= float(dt.min()) and float(dt.max()) <= DT_MAX
    assert abs(float(torch.log10(dt).mean()) + 2.0) < 0.05  # log-uniform: mean log10 midway between -3 and -1
    assert torch.all(initial_dt("uniform", 10, 1e-6, 1e-5, FLOOR) == torch.tensor(FLOOR))  # below the floor: floored


@pytest.mark.parametrize("name", ["linear_decay", "linear_decay_reverse"])
def test_mixer_dt_bias_is_inverse_softplus_of_the_strategys_dt(name):
    expected = initial_dt(name, 8, DT_MIN, DT_MAX, FLOOR)
    dt_bias = Mamba2(**MIXER, dt_init=name).dt_bias.detach()
    assert torch.allclose(dt_bias, inverse_softplus(expected))
    assert torch.allclose(F.softplus(dt_bias), expected, rtol=1e-5)


def test_inverse_softplus_inverts_softplus():
    dt = torch.logspace(-4, 0, 50, dtype=torch.float64)
    assert torch.allclose(F.softplus(inverse_softplus(dt)), dt, rtol=1e-12)


def test_default_init_is_unchanged_and_every_layer_gets_the_strategy():
    torch.manual_seed(5)
    default = Mamba2(**MIXER).state_dict()
    torch.manual_seed(5)
    explicit = Mamba2(**MIXER, dt_init="uniform").state_dict()
    assert all(torch.equal(default[k], explicit[k]) for k in default)
    dt = F.softplus(default["dt_bias"])
    assert DT_MIN <= float(dt.min()) and float(dt.max()) <= DT_MAX and len(set(dt.tolist())) == 8  # drawn per head
    model = build_model("mamba2-mini", ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16,
                                                "dt_init": "linear_decay_reverse"})
    expected = initial_dt("linear_decay_reverse", 6, DT_MIN, DT_MAX, FLOOR)
    for layer in model.backbone.layers:
        assert torch.allclose(F.softplus(layer.mixer.dt_bias.detach()), expected, rtol=1e-5)


def test_a_new_strategy_is_one_registered_function():
    @register_dt_init("constant_test")
    def constant(nheads, dt_min, dt_max, device=None, dtype=None):
        return torch.full((nheads,), 0.05, device=device, dtype=dtype)

    try:
        dt_bias = Mamba2(**MIXER, dt_init="constant_test").dt_bias.detach()
        assert torch.allclose(F.softplus(dt_bias), torch.full((8,), 0.05))
        with pytest.raises(ValueError, match="registered twice"):
            register_dt_init("constant_test")(constant)
    finally:
        DT_INITS.pop("constant_test")


def test_unknown_strategy_names_the_valid_ones():
    with pytest.raises(ValueError, match="'linear'.*valid: uniform, linear_decay, linear_decay_reverse"):
        Mamba2(**MIXER, dt_init="linear")
    with pytest.raises(runspec.ConfigError, match="dt_init/inits: dt_init 'linear' is not a known"):
        build_scratch_lm({"variant": "mamba2-mini"}, 64, "linear", seed=0)
    with pytest.raises(runspec.ConfigError, match="ssm_cfg keys \\['dt_init'\\] are not Mamba1"):
        build_scratch_lm({"variant": "mamba-mini"}, 64, "uniform", seed=0)  # a Mamba-1 variant has no dt_init


# -- pretraining pieces ------------------------------------------------------------------------
def test_scratch_model_is_the_variant_with_overrides_and_the_seed_decides_the_weights():
    cfg = {"variant": "mamba2-mini", "d_model": 32, "n_layer": 2, "ssm_cfg": {"headdim": 8}}
    model = build_scratch_lm(cfg, 100, "linear_decay", seed=42)
    assert model.config.d_model == 32 and model.config.n_layer == 2 and model.config.vocab_size == 100
    assert model.config.ssm_cfg == {"layer": "Mamba2", "d_state": 16, "headdim": 8, "chunk_size": 16,
                                    "dt_init": "linear_decay"}
    again = build_scratch_lm(cfg, 100, "linear_decay", seed=42).state_dict()
    other = build_scratch_lm(cfg, 100, "linear_decay", seed=168).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    assert not torch.equal(model.state_dict()["backbone.embedding.weight"], other["backbone.embedding.weight"])


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    first = window_batch(tokens, 16, 4, seed=42, step=3)
    assert first.shape == (4, 17) and torch.equal(first, window_batch(tokens, 16, 4, seed=42, step=3))
    assert torch.equal(first[:, 1:] - first[:, :-1], torch.ones(4, 16, dtype=torch.long))  # contiguous windows
    assert not torch.equal(first, window_batch(tokens, 16, 4, seed=42, step=4))


def test_loss_curve_averages_equal_spans_at_the_same_steps():
    curve = loss_curve([float(i) for i in range(10)], points=5)
    assert curve == [{"step": 2, "loss": 0.5}, {"step": 4, "loss": 2.5}, {"step": 6, "loss": 4.5},
                     {"step": 8, "loss": 6.5}, {"step": 10, "loss": 8.5}]


@pytest.fixture
def run_spec(tmp_path):
    """The spec of one tiny run on a random token array (the cache's format, written directly)."""
    tokens = np.random.default_rng(0).integers(0, 64, size=2000).astype("<u2")
    tokens.tofile(tmp_path / "train.bin")
    meta = {"tokens": "train.bin", "dtype": "<u2", "n_tokens": len(tokens), "vocab_size": 64, "sha256": "-",
            "tokenizer_sha256": "-"}
    (tmp_path / "train.json").write_text(json.dumps(meta))
    return {"run": {"experiment": "dt_init", "backbone": "mamba2-mini", "task": "pretrain", "method": "linear_decay",
                    "seed": 42},
            "model": {"variant": "mamba2-mini", "d_model": 16, "n_layer": 1, "ssm_cfg": {"d_state": 8, "headdim": 8}},
            "dt_init": "linear_decay", "tokens": {"train": str(tmp_path / "train.json")},
            "train": {"steps": 6, "seq_len": 16, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 0.0,
                      "warmup_steps": 2, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip_norm": 1.0,
                      "checkpoint_every": 3},
            "runtime": {"device": "cpu", "scan_backend": "torch", "allow_torch_fallback": False, "threads": 1,
                        "wandb": {"mode": "disabled"}},
            "output_dir": str(tmp_path / "run")}


def test_a_killed_run_resumes_to_the_uninterrupted_result(run_spec, tmp_path, monkeypatch):
    from mambapeft.train.from_scratch import Pretrainer

    whole = Pretrainer(run_spec).run()
    weights = (tmp_path / "run" / "model" / "pytorch_model.bin").read_bytes()
    (tmp_path / "run" / "pretrain.json").unlink()
    original = Pretrainer._step

    def killed_after_the_checkpoint(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Pretrainer, "_step", killed_after_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        Pretrainer(run_spec).run()
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not (tmp_path / "run" / "pretrain.json").exists()
    monkeypatch.setattr(Pretrainer, "_step", original)
    resumed = Pretrainer(run_spec).run()
    assert resumed["history"] == whole["history"] and resumed["model_sha256"] == whole["model_sha256"]
    assert (tmp_path / "run" / "model" / "pytorch_model.bin").read_bytes() == weights
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    no_decay = [g for g in resumed["param_groups"] if g["weight_decay"] == 0]
    assert no_decay and sum(g["elements"] for g in resumed["param_groups"]) == resumed["total_params"]


def test_a_steps_loss_is_its_micro_batches_losses_summed_in_float64(run_spec, monkeypatch):
    """The step's loss (history, divergence check) sums its micro-batches' losses on the device in
    float64, as Python's floats summed them when each was read apart: the records are unchanged."""
    from mambapeft.train import from_scratch

    sums, token_loss_sum = [], from_scratch.token_loss_sum
    monkeypatch.setattr(from_scratch, "token_loss_sum", lambda *args: sums.append(token_loss_sum(*args)) or sums[-1])
    trainer = from_scratch.Pretrainer({**run_spec, "train": {**run_spec["train"], "micro_batch_size": 1}})
    trainer.model.train()
    step_loss = trainer._step(0)
    n_targets = run_spec["train"]["batch_size"] * run_spec["train"]["seq_len"]
    expected = 0.0
    for loss_sum in sums:  # each micro-batch's loss as the step computes it (float32), read apart
        expected += float(loss_sum.detach() / n_targets)
    assert len(sums) == run_spec["train"]["batch_size"] and step_loss == expected


def test_the_perplexity_job_refuses_a_model_of_another_configuration(run_spec, tmp_path):
    from mambapeft.eval.perplexity import PretrainRecordError, evaluate_perplexity
    from mambapeft.train.from_scratch import run_pretraining

    run_pretraining(run_spec)
    other = {**run_spec, "train": {**run_spec["train"], "lr": 1e-3}, "tokens": {**run_spec["tokens"], "test": "-"},
             "perplexity": {"window": 16, "stride": 8, "batch_size": 4}}
    with pytest.raises(PretrainRecordError, match="another configuration"):
        evaluate_perplexity(other)


# -- table -------------------------------------------------------------------------------------
def _record(init, seed, ppl):
    if ppl is None:
        return {"status": "diverged", "init": init, "seed": seed, "reason": "loss is nan at step 3"}
    return {"status": "ok", "init": init, "seed": seed, "perplexity": ppl, "word_perplexity": ppl * 2}


def test_table_has_one_row_per_init_with_mean_std_and_each_seed():
    records = [_record("uniform", 42, 10.0), _record("uniform", 168, 12.0), _record("linear_decay", 42, 9.0),
               _record("linear_decay", 168, None)]
    table = summary_frame(records)
    assert list(table["init"]) == ["uniform", "linear_decay"]
    uniform = table.iloc[0]
    assert (uniform["perplexity"], uniform["perplexity_std"], uniform["seeds"]) == (11.0, pytest.approx(math.sqrt(2)), 2)
    assert (uniform["seed42"], uniform["seed168"], uniform["word_perplexity"]) == (10.0, 12.0, 22.0)
    assert table.iloc[1]["seeds"] == 1 and math.isnan(table.iloc[1]["perplexity_std"])
    markdown = markdown_table(table)
    assert "| uniform | 2 | 11.00 ± 1.41 | 10.00 | 12.00 | 22.00 ± 2.83 |" in markdown
    assert "| linear_decay | 1 | 9.00 | 9.00 | diverged |" in markdown


# -- pipeline ----------------------------------------------------------------------------------
def test_paper_dry_run_has_the_3x3_grid_and_tokenizes_once(tmp_path):
    paper = REPO / "config" / "paper.yaml"
    done = snakemake(*STUDY_TARGETS, "-n", "-p", "--configfile", str(paper), cwd=tmp_path, timeout=300)
    counts = job_counts(done.stdout)
    assert counts["pretrain_dt_init"] == 9 and counts["perplexity_dt_init"] == 9
    assert counts["tokenize_dt_init"] == 2 and "dt_init_standin" not in counts  # real copies: no stand-in
    command = next(line for line in done.stdout.splitlines() if "dt-init pretrain" in line and "seed2122" in line
                   and "linear_decay_reverse" in line)
    spec = json.loads(shlex.split(command)[shlex.split(command).index("--spec") + 1])
    config = runspec.load_config(paper)
    expected = runspec.dt_init_training_spec(runspec.dt_init_spec(config, runspec.InitRun("linear_decay_reverse", 2122)))
    # the perplexity settings never re-train; the thread count and wandb come on the command line, out of the params
    assert spec == runspec.without_execution(expected) and "perplexity" not in spec
    assert (spec["model"]["d_model"], spec["model"]["n_layer"]) == (256, 12)
    assert (spec["train"]["seq_len"], spec["train"]["batch_size"], spec["train"]["lr"]) == (1024, 58, 5e-4)


def test_the_study_is_its_own_target_unless_the_config_puts_it_in_the_default(tmp_path):
    study_jobs = {"dt_init_standin": 1, "tokenize_dt_init": 2, "pretrain_dt_init": 4, "perplexity_dt_init": 4,
                  "dt_init_table": 1, "dt_init_figures": 1, "dt_init": 1}
    own = job_counts(snakemake("-n", "dt_init", "--configfile", *STUDY_CONFIG, cwd=tmp_path).stdout)
    assert own == {**study_jobs, "total": sum(study_jobs.values())}
    default = job_counts(snakemake("-n", "--configfile", *STUDY_CONFIG, cwd=tmp_path).stdout)
    assert "finetune" in default and not set(study_jobs) & set(default)  # the mini default leaves it out
    in_default = tmp_path / "in_default.yaml"
    in_default.write_text(STUDY_CONFIG[1].read_text() + "  default_target: true\n")
    counts = job_counts(snakemake("-n", "--configfile", STUDY_CONFIG[0], in_default, cwd=tmp_path).stdout)
    assert all(counts[rule] == n for rule, n in study_jobs.items() if rule != "dt_init")


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """The study's targets at test size (the tiny config with tests/config/dt_init.yaml merged in)."""
    workdir = tmp_path_factory.mktemp("dt-init")
    snakemake(*STUDY_TARGETS, "-c", "2", "--configfile", *STUDY_CONFIG, cwd=workdir)
    return workdir


def test_tiny_study_end_to_end(study_run):
    workdir = study_run
    config = runspec.load_config(*STUDY_CONFIG)
    study = config["dt_init"]
    table = pd.read_csv(workdir / "results" / "tables" / "dt_init.csv")
    assert list(table["init"]) == study["inits"]
    assert (table["seeds"] == len(study["seeds"])).all()
    for seed in study["seeds"]:
        assert table[f"seed{seed}"].between(1, study["standin"]["vocab_size"] * 2).all()
    assert (table["word_perplexity"] > table["perplexity"]).all()  # fewer words than tokens
    markdown = (workdir / "results" / "tables" / "dt_init.md").read_text()
    assert "perplexity (mean ± std)" in markdown and " ± " in markdown.split("| uniform |")[1].split("\n")[0]
    for name in ("dt_init_loss", "dt_init_dt"):
        png = workdir / "results" / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for run in runspec.dt_init_grid(config):
        directory = workdir / run.directory("results")
        pretrain = json.loads((directory / "pretrain.json").read_text())
        perplexity = json.loads((directory / "perplexity.json").read_text())
        assert pretrain["status"] == perplexity["status"] == "ok" and pretrain["backend"] == "torch"
        assert len(pretrain["history"]) == study["train"]["steps"]
        assert np.isfinite([p["loss"] for p in pretrain["history"]]).all()
        if run.init != "uniform":
            heads = len(pretrain["initial_dt"][0])
            expected = initial_dt(run.init, heads, DT_MIN, DT_MAX, FLOOR).tolist()
            assert all(layer == pytest.approx(expected, rel=1e-5) for layer in pretrain["initial_dt"])
        assert perplexity["value"] == pytest.approx(math.exp(perplexity["nll_sum"] / perplexity["n_scored_tokens"]))
        assert not (directory / "checkpoint.pt").exists()
    meta = json.loads((workdir / "resources" / "tokens" / "dt_init" / "train.json").read_text())
    assert meta["layout"] == "documents" and meta["n_documents"] == study["standin"]["n_train_docs"]


def test_study_reruns_only_what_a_change_touches(study_run, tmp_path):
    assert "Nothing to be done" in snakemake(*STUDY_TARGETS, "-n", "--configfile", *STUDY_CONFIG, cwd=study_run).stdout
    changed = tmp_path / "stride.yaml"
    changed.write_text(STUDY_CONFIG[1].read_text().replace("stride: 16", "stride: 8"))
    counts = job_counts(snakemake(*STUDY_TARGETS, "-n", "--configfile", STUDY_CONFIG[0], changed, cwd=study_run).stdout)
    assert counts == {"perplexity_dt_init": 4, "dt_init_table": 1, "total": 5}  # no re-training, no re-tokenizing
