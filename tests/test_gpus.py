"""The GPU allocator, on a CPU: GPU counts come from MAMBAPEFT_GPU_COUNT or CUDA_VISIBLE_DEVICES,
locks live in tmp dirs. flock semantics are per process, so competing claimers are subprocesses."""
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from mambapeft.gpus import GpuAllocationError, GpuBusyError, claim_gpus, describe_gpu, visible_gpus

# A claimer: claims, prints its CUDA_VISIBLE_DEVICES, holds the claim until stdin closes.
HOLDER = """
import os, sys
from mambapeft.gpus import claim_gpus
claim = claim_gpus(int(sys.argv[1]), sys.argv[2], slots_per_gpu=int(sys.argv[3]), poll_seconds=0.05)
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
sys.stdin.read()
"""


class Holder:
    def __init__(self, lock_dir, count=1, slots=1, **env):
        environment = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "MAMBAPEFT_GPU_COUNT")}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(count), str(lock_dir), str(slots)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment | env)

    def ids(self, timeout=10.0):
        """The GPU ids it claimed, or None if it has not claimed within ``timeout`` seconds."""
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        return tuple(self.proc.stdout.readline().strip().split(","))

    def release(self):
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0


@pytest.fixture
def holders(tmp_path, monkeypatch):
    """Start claimers with ``start(count, slots, **env)``; all are killed at the end."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    started = []

    def start(count=1, slots=1, **env):
        started.append(Holder(tmp_path / "locks", count, slots, **env))
        return started[-1]

    yield start
    for holder in started:
        holder.proc.kill()
        holder.proc.wait()


@pytest.fixture
def gpus(monkeypatch):
    """This process sees ``n`` GPUs through MAMBAPEFT_GPU_COUNT."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return lambda n: monkeypatch.setenv("MAMBAPEFT_GPU_COUNT", str(n))


def test_concurrent_claims_get_distinct_gpus(holders):
    claimers = [holders(MAMBAPEFT_GPU_COUNT="4") for _ in range(4)]
    assert sorted(c.ids()[0] for c in claimers) == ["0", "1", "2", "3"]


def test_sigkilled_holder_frees_its_gpu(holders, gpus, tmp_path):
    gpus(1)
    holder = holders(MAMBAPEFT_GPU_COUNT="1")
    assert holder.ids() == ("0",)
    with pytest.raises(GpuBusyError, match=f"pid {holder.proc.pid}"):
        claim_gpus(1, tmp_path / "locks", wait=False)
    os.kill(holder.proc.pid, signal.SIGKILL)
    holder.proc.wait()
    with claim_gpus(1, tmp_path / "locks", wait=False) as claim:
        assert claim.ids == ("0",) and os.environ["CUDA_VISIBLE_DEVICES"] == "0"


@pytest.mark.parametrize("inherited", ["3,5", "GPU-1b2c-aa,MIG-9f-01"])
def test_inherited_visible_devices_are_the_pool(holders, monkeypatch, tmp_path, inherited):
    first, second = holders(CUDA_VISIBLE_DEVICES=inherited), holders(CUDA_VISIBLE_DEVICES=inherited)
    assert sorted(first.ids() + second.ids()) == sorted(inherited.split(","))
    assert holders(CUDA_VISIBLE_DEVICES=inherited).ids(timeout=0.5) is None  # waits: all are taken
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("MAMBAPEFT_GPU_COUNT", "8")  # an inherited CUDA_VISIBLE_DEVICES wins over the count
    with claim_gpus(2, tmp_path / "other-locks") as claim:
        assert claim.ids == ("3", "5")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"  # released: the parent set is back


def test_waiter_gets_the_gpu_once_the_holder_exits(holders, gpus, tmp_path):
    gpus(1)
    holder = holders(MAMBAPEFT_GPU_COUNT="1")
    assert holder.ids() == ("0",)
    messages = []
    threading.Timer(0.5, holder.release).start()
    start = time.monotonic()
    with claim_gpus(1, tmp_path / "locks", poll_seconds=0.05, on_wait=messages.append) as claim:
        assert claim.ids == ("0",)
    assert time.monotonic() - start >= 0.4
    assert len(messages) == 1 and f"GPU 0: pid {holder.proc.pid} since" in messages[0]


def test_multi_gpu_claims_are_all_or_nothing(holders, gpus, tmp_path):
    gpus(2)
    one = holders(MAMBAPEFT_GPU_COUNT="2")
    assert one.ids() is not None
    with pytest.raises(GpuBusyError):
        claim_gpus(2, tmp_path / "locks", wait=False)
    with claim_gpus(1, tmp_path / "locks", wait=False) as claim:  # the failed claim let go of its partial grab
        assert len(claim.ids) == 1
    # Two 2-GPU claimers queued behind a 1-GPU holder: both finish, one after the other.
    pairs = [holders(count=2, MAMBAPEFT_GPU_COUNT="2") for _ in range(2)]
    assert all(p.ids(timeout=0.3) is None for p in pairs)
    one.release()
    ready = select.select([p.proc.stdout for p in pairs], [], [], 10)[0]
    assert len(ready) == 1
    winner, loser = pairs if pairs[0].proc.stdout in ready else pairs[::-1]
    assert winner.ids() == ("0", "1") and loser.ids(timeout=0.3) is None
    winner.release()
    assert loser.ids() == ("0", "1")


def test_slots_let_packed_claims_share_a_gpu(holders, gpus, tmp_path):
    gpus(2)
    spread = [holders(slots=2, MAMBAPEFT_GPU_COUNT="2") for _ in range(2)]
    assert sorted(s.ids()[0] for s in spread) == ["0", "1"]  # idle GPUs first
    packed = [holders(slots=2, MAMBAPEFT_GPU_COUNT="2") for _ in range(2)]
    assert sorted(p.ids()[0] for p in packed) == ["0", "1"]  # then a second job on each
    with pytest.raises(GpuBusyError):
        claim_gpus(1, tmp_path / "locks", slots_per_gpu=2, wait=False)  # two slots each, all taken
    for holder in spread + packed:
        holder.release()
    exclusive = holders(MAMBAPEFT_GPU_COUNT="2").ids()
    assert exclusive is not None
    with claim_gpus(1, tmp_path / "locks", slots_per_gpu=2, wait=False) as claim:
        assert claim.ids != exclusive  # packed claims never join an exclusive one
    with pytest.raises(GpuBusyError):
        claim_gpus(2, tmp_path / "locks", slots_per_gpu=2, wait=False)


def test_slots_pack_onto_one_gpu(holders, gpus, tmp_path):
    gpus(1)
    assert [holders(slots=2, MAMBAPEFT_GPU_COUNT="1").ids() for _ in range(2)] == [("0",), ("0",)]
    with pytest.raises(GpuBusyError):
        claim_gpus(1, tmp_path / "locks", slots_per_gpu=2, wait=False)
    with pytest.raises(GpuBusyError):
        claim_gpus(1, tmp_path / "locks", wait=False)  # an exclusive claim does not join packed ones


@pytest.mark.parametrize("env,exist", [({"MAMBAPEFT_GPU_COUNT": "2"}, 2), ({"CUDA_VISIBLE_DEVICES": "4"}, 1),
                                       ({"CUDA_VISIBLE_DEVICES": ""}, 0), ({"CUDA_VISIBLE_DEVICES": "-1"}, 0),
                                       ({"MAMBAPEFT_GPU_COUNT": "0"}, 0)])
def test_asking_for_more_gpus_than_exist_fails_at_once(monkeypatch, tmp_path, env, exist):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    with pytest.raises(GpuAllocationError, match=rf"asks for 3 GPUs but this host has {exist} .*resources: gpus"):
        claim_gpus(3, tmp_path / "locks")
    assert time.monotonic() - start < 1


def test_count_zero_changes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("MAMBAPEFT_GPU_COUNT", "0")
    for inherited in (None, "7"):
        if inherited is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", inherited)
        with claim_gpus(0, tmp_path / "locks") as claim:
            assert claim.ids == () and os.environ.get("CUDA_VISIBLE_DEVICES") == inherited
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == inherited
    assert not (tmp_path / "locks").exists()


def test_nvidia_smi_listing_counts_gpus_and_mig_instances(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("MAMBAPEFT_GPU_COUNT", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpus() == ([], "nvidia-smi is not on PATH")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '%s\\n' "  # a shell builtin: PATH holds nothing else
                    "'GPU 0: NVIDIA H200 (UUID: GPU-aaaa)' "
                    "'GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-bbbb)' "
                    "'  MIG 3g.20gb     Device  0: (UUID: MIG-cccc)' "
                    "'  MIG 3g.20gb     Device  1: (UUID: MIG-dddd)' "
                    "'GPU 2: NVIDIA H200 (UUID: GPU-eeee)'\n")
    fake.chmod(0o755)
    assert visible_gpus()[0] == ["0", "MIG-cccc", "MIG-dddd", "2"]


def test_import_does_not_load_torch():
    code = "import sys, mambapeft.gpus; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
def test_describe_gpu_without_cuda_is_none():
    assert describe_gpu() is None


@pytest.mark.gpu
def test_describe_gpu_names_the_claimed_device(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    described = describe_gpu()
    assert described["index"] == 0 and described["uuid"].startswith("GPU-") and described["name"]


@pytest.mark.parametrize("device,pool,claimed", [("cpu", "2", None), ("auto", "0", None), ("auto", "2", "0"),
                                                 ("cuda", "2", "0")])
def test_jobs_claim_only_when_they_will_run_on_cuda(monkeypatch, tmp_path, device, pool, claimed):
    """`mambapeft train/evaluate --gpus 1`: a CPU run (device cpu, or auto with no GPU) claims nothing,
    so a grid that asks for GPUs still runs on a CPU-only box or a SLURM node without CUDA."""
    from argparse import Namespace

    from mambapeft.cli.common import claim_gpus_for

    monkeypatch.setenv("MAMBAPEFT_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("MAMBAPEFT_GPU_COUNT", pool)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    claim = claim_gpus_for(Namespace(gpus=1, gpu_slots=1), device)
    try:
        assert (claim.ids[0] if claim else None) == claimed
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == claimed
    finally:
        if claim:
            claim.release()


@pytest.mark.parametrize("user", [None, ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False"),
                                  ("PYTORCH_ALLOC_CONF", ""), ("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")])
def test_the_allocator_gets_expandable_segments_unless_the_user_configured_it(user):
    from mambapeft.gpus import allocator_settings, default_allocator_settings

    environ = dict([user]) if user else {}
    before = dict(environ)
    settings = default_allocator_settings(environ)
    if user is None:
        assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        assert settings == "expandable_segments:True"
    else:
        assert environ == before and settings == user[1]
    assert allocator_settings(environ) == settings


def test_the_command_line_sets_the_allocator(monkeypatch, tmp_path):
    from mambapeft.cli import main

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # recorded, so that the test's end restores the caller's
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert main(["peft-schema", "--out", str(tmp_path / "schema.json")]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
