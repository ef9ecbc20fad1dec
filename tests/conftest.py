"""Shared fixtures. Tests never touch the network; every file they read they write themselves."""
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)  # CI machines have 2 cores; Snakemake jobs in the pipeline test use the other
if not torch.cuda.is_available():  # our Triton kernels run in Triton's interpreter (numpy) on the CPU; the
    os.environ.setdefault("TRITON_INTERPRET", "1")  # variable is read when triton is first imported


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def isolated_datasets_cache(tmp_path, monkeypatch):
    """For tests that run lm-eval: its datasets cache goes under the test's tmp_path."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))  # never the user's home


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny config run locally once per session: every rule of the DAG (reused by the SLURM test)."""
    from workflow_helpers import TINY, snakemake

    workdir = tmp_path_factory.mktemp("tiny-local")
    done = snakemake("-c", "2", "--configfile", TINY, cwd=workdir)
    return workdir, done


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory):
    from run_helpers import tiny_vision_run

    return tiny_vision_run(tmp_path_factory.mktemp("train"))
