"""Shared fixtures. Tests never touch the network; every file they read they write themselves."""
import fcntl
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


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def kernel_device(request, monkeypatch) -> torch.device:
    """Where a test of our CUDA kernels (scan_short.cu, conv_bwd.cu) runs them: on the GPU, compiled by
    NVRTC; and on the CPU, compiled as C++ against tests/cuda_emulation.h, so that their logic is
    tested where there is no GPU (CI)."""
    # imported here: the package imports triton, which must see TRITON_INTERPRET (set above) first
    import cuda_emulation
    from nvrtc_helpers import skip_without_a_gpu_and_nvrtc

    if request.param == "cuda":
        skip_without_a_gpu_and_nvrtc()
        return torch.device("cuda")
    cuda_emulation.skip_without_a_compiler()
    cuda_emulation.emulated(monkeypatch)
    return torch.device("cpu")


@pytest.fixture
def isolated_datasets_cache(tmp_path, monkeypatch):
    """For tests that run lm-eval: its datasets cache goes under the test's tmp_path."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))  # never the user's home


def pytest_collection_modifyitems(config, items):
    # The SLURM tests first: they take longest, mostly waiting on the cluster's jobs. With pytest-xdist
    # (--dist loadfile --no-loadscope-reorder hands out files in this order) their file then starts at
    # once on one worker while the others work through the rest, instead of running alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny config run locally once per session: every rule of the DAG (reused by the SLURM test).
    pytest-xdist's workers share it: the first that needs it runs it, another waits on the lock."""
    from workflow_helpers import TINY, snakemake

    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # this session's folder, above each worker's own
    workdir, done = shared / "tiny-local", shared / "tiny-local.done"
    with open(shared / "tiny-local.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not done.exists():
            workdir.mkdir(exist_ok=True)
            snakemake("-c", "2", "--configfile", TINY, cwd=workdir)
            done.touch()
    return workdir


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory):
    from run_helpers import tiny_vision_run

    return tiny_vision_run(tmp_path_factory.mktemp("train"))
