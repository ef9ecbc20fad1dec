"""Running one run's jobs from tests as the pipeline does: `mambapeft train`, then `mambapeft evaluate`,
in subprocesses (a SIGKILL hits a real process)."""
import json
import subprocess
import sys
from pathlib import Path

from mambapeft.runspec import training_spec


def _run_spec(spec: dict, out: Path, **train) -> dict:
    return {**spec, "output_dir": str(out), "train": {**spec["train"], **train}}


def _process(command: str, spec: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mambapeft.cli", "-q", command, "--spec", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_process(spec: dict, out: Path, **train) -> subprocess.Popen:
    """The training job as the finetune rule runs it (the spec less the evaluation-only keys)."""
    return _process("train", training_spec(_run_spec(spec, out, **train)))


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return err


def run(spec: dict, out: Path, **train) -> str:
    """Training, then evaluation (the finetune and evaluate rules); returns their stderr."""
    return finish(train_process(spec, out, **train)) + finish(_process("evaluate", _run_spec(spec, out, **train)))


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def tiny_vision_run(root: Path, method: str = "lorap_x", backbone: str = "vim-mini") -> dict:
    """Mini VTAB data, its image cache and a random-weight ``backbone`` (vim-mini, or vit-mini) in its
    official layout under ``root``; returns the resolved spec of one run of ``method`` (CPU, torch scan)."""
    from mambapeft.data.prepare import prepare_dataset
    from mambapeft.data.vtab import build_image_cache
    from mambapeft.models import build_model, family_of
    from mambapeft.models.checkpoints import save_vim, save_vit
    from mambapeft.runspec import Run, resolve_run, validate_config

    writer, file_name = {"vim": (save_vim, "vim.pth"), "vit": (save_vit, "vit.safetensors")}[family_of(backbone)]
    weights = root / file_name
    config = {
        "results_dir": str(root / "results"), "resources_dir": str(root / "resources"), "device": "cpu",
        "scan_backend": "torch", "threads": 1,
        "data": {"vtab": {"kind": "vtab", "source": "mini", "seed": 0, "image_size": 32, "n_train": 40, "n_val": 8, "n_test": 24}},
        "backbones": {backbone: {"source": "pretrain", "path": str(weights), "image_size": 32}},
        "experiments": {"vtab": {"domain": "vision", "data": "vtab", "backbones": [backbone], "tasks": ["digits"],
                                 "methods": [method], "seeds": [0],
                                 "train": {"epochs": 6, "schedule": {"warmup_epochs": 1}, "checkpoint_every": 1}}},
    }
    validate_config(config)
    entry = {**config["data"]["vtab"], "root": str(root / "resources/data/vtab"), "tasks": ["digits"]}
    prepare_dataset(entry, root / "resources/data/vtab/manifest.json")
    writer(build_model(backbone, num_classes=1000), weights)
    spec = resolve_run(config, Run("vtab", backbone, "digits", method, 0))
    for split, path in spec["data"]["cache"].items():
        build_image_cache(entry["root"], "digits", split, 32, path)
    return spec
