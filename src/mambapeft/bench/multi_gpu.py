"""The pipeline on a box with several GPUs: the same grid run with ``--resources gpu=1`` and with
``gpu=k``, every job claiming its own GPU (``gpus.py``), timed end to end.

The shared preparation (data, image caches, backbones) runs once first and is timed apart, so the
two timed runs differ only in how many GPUs their training and evaluate jobs spread over. Each
timed run writes its results to its own folder; the report lists every run's GPU (index and UUID,
from its train.json and metrics.json) beside the wall times.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..io import write_json_atomic
from ..runspec import repo_root

FIRST_GPU_RULE = "finetune"  # everything before it (data, caches, backbones) is the shared preparation


def _snakemake(config: Path, cores: int, gpus: int, results: Path, *extra: str) -> float:
    """Seconds one snakemake invocation takes; its output goes to ``results``/snakemake.log."""
    results.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(repo_root() / "Snakefile"), "-c", str(cores),
               "--resources", f"gpu={gpus}", "--configfile", str(config), "--config", f"results_dir={results}", *extra]
    started = time.perf_counter()
    with open(results / "snakemake.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    if done.returncode:
        raise RuntimeError(f"snakemake failed ({' '.join(command)}); see {results / 'snakemake.log'}")
    return time.perf_counter() - started


def _run_gpus(results: Path) -> list[dict]:
    """Which GPU each run's training and evaluation job held (from the run records)."""
    rows = []
    for metrics in sorted((results / "runs").rglob("metrics.json")):
        record = json.loads(metrics.read_text())
        rows.append({"run": str(metrics.parent.relative_to(results / "runs")), "train_gpu": record.get("gpu"),
                     "eval_gpu": record.get("evaluation", {}).get("gpu"), "train_seconds": record.get("train_seconds")})
    return rows


def bench_multi_gpu(config: Path, gpus: int, cores: int, out_dir: Path, work_dir: Path) -> dict:
    """Preparation once, then the whole grid on 1 GPU and on ``gpus`` GPUs; writes
    ``multi_gpu_<device>.json`` to ``out_dir`` and returns it."""
    from ..gpus import GpuAllocationError, describe_gpu, visible_gpus

    pool, source = visible_gpus()
    if len(pool) < gpus:
        raise GpuAllocationError(f"bench multi-gpu --gpus {gpus}: only {len(pool)} GPU(s) visible ({source})")
    device = (describe_gpu() or {}).get("name", "unknown").replace(" ", "_")
    report = {"config": str(config), "gpus_visible": pool, "cores": cores}
    path = out_dir / f"multi_gpu_{device}.json"
    report["preparation_s"] = _snakemake(config, cores, 1, work_dir / "prepare", "--omit-from", FIRST_GPU_RULE)
    write_json_atomic(path, report)  # after every stage: an interrupted benchmark keeps what it measured
    for count in sorted({1, gpus}):
        results = work_dir / f"gpus{count}"
        report[f"gpus{count}"] = {"wall_s": _snakemake(config, cores, count, results), "runs": _run_gpus(results)}
        write_json_atomic(path, report)
    report["speedup"] = report["gpus1"]["wall_s"] / report[f"gpus{gpus}"]["wall_s"]
    write_json_atomic(path, report)
    return report
