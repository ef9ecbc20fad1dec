"""The tiny config through a real one-node SLURM cluster (tests/slurm/start_cluster.sh).

Skipped, with the reason, where the cluster cannot be started (not root, no apt). The cluster has
no accounting, so status queries go through squeue, and one fake GPU, so the GPU request of
training jobs is real but the code runs on the CPU.
"""
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from workflow_helpers import REPO, TINY, job_counts, snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
CLUSTER_OPTIONS = ["--workflow-profile", REPO / "profiles" / "slurm", "--slurm-status-command", "squeue",
                   "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs",
                   "--default-resources", "slurm_partition=debug", "runtime=10", "mem_mb=2000",
                   "--set-resources", "prepare_backbone:mem_mb=2000", "prepare_backbone:runtime=10", "--verbose"]


@pytest.fixture(scope="module")
def cluster():
    script = REPO / "tests" / "slurm" / "start_cluster.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["start_cluster.sh failed"])[-1]
        print(f"SLURM test cluster unavailable: {reason}")
        pytest.skip(f"SLURM test cluster unavailable: {reason}")
    return True


def slurm_config(tmp_path: Path, **changes) -> Path:
    """The tiny config with GPU requests on the vision training jobs (the node has one fake GPU)."""
    config = yaml.safe_load(TINY.read_text())
    config["experiments"]["vtab"]["resources"] = {"gpus": 1, "runtime": 10, "mem_mb": 2000}
    for experiment, overrides in changes.items():
        config["experiments"][experiment].update(overrides)
    path = tmp_path / f"slurm-{len(changes)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sbatch_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "sbatch call:" in line]


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny-slurm")
    done = snakemake(*CLUSTER_OPTIONS, "--configfile", slurm_config(workdir), cwd=workdir, timeout=1500)
    return workdir, done.stdout + done.stderr


def test_jobs_went_through_slurm_with_gpu_requests(slurm_run):
    workdir, output = slurm_run
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", output)
    assert len(submitted) >= 10 + 3 + 2 + 4  # training, data, backbones, caches (tables stay local)
    train_lines = [line for line in sbatch_lines(output) if "rule_finetune" in line]
    gpu_lines = [line for line in train_lines if "--gpus=1" in line or "--gres=gpu:1" in line]
    assert len(gpu_lines) == 6  # the vtab training jobs asked for a GPU, the language ones did not
    assert all("--gpus" not in line for line in sbatch_lines(output) if "rule_table" in line)
    logs = list((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert any("rule_finetune" in str(p) for p in logs)


def test_cluster_results_equal_local_results(slurm_run, tiny_run):
    workdir, _ = slurm_run
    local = tiny_run
    local_runs = sorted(p.relative_to(local) for p in (local / "results" / "runs").rglob("metrics.json"))
    assert local_runs == sorted(p.relative_to(workdir) for p in (workdir / "results" / "runs").rglob("metrics.json"))
    for relative in local_runs:
        ours, theirs = (json.loads((root / relative).read_text()) for root in (workdir, local))
        assert (ours["value"], ours["results"], ours["trainable_params"]) == (theirs["value"], theirs["results"],
                                                                             theirs["trainable_params"]), relative
    for table in ("vtab", "commonsense", "math"):
        assert (workdir / "results" / "tables" / f"{table}.md").read_text() == (local / "results" / "tables" / f"{table}.md").read_text()


def test_failed_job_is_retried_reported_and_resumed(cluster, slurm_run, tmp_path):
    workdir, _ = slurm_run
    broken = slurm_config(tmp_path, math={"method_overrides": {"affix_noproj": {"affix": {"n_tokens": 0}}}})
    done = snakemake(*CLUSTER_OPTIONS, "--configfile", broken, cwd=workdir, timeout=900, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Trying to restart job" in output  # retries: 1 in profiles/slurm
    assert len(re.findall(r"failed, SLURM status is: 'FAILED'", output)) == 2
    assert "n_tokens" in output or "affix" in output  # the failed job's log names the bad key
    fixed = slurm_config(tmp_path, math={"method_overrides": {"affix_noproj": {"affix": {"n_tokens": 2}}}})
    done = snakemake(*CLUSTER_OPTIONS, "--configfile", fixed, cwd=workdir, timeout=900)
    counts = job_counts(done.stdout + done.stderr)
    assert counts["finetune"] == 1  # only the fixed run; every finished run is kept
