"""SIGKILL of a job at any point (the OOM killer, a preempted node): running it again ends exactly as
if nothing had happened, and until then no result exists under a final name.

The tiny run trains 3 epochs of 2 steps and checkpoints after epochs 1 and 2 (steps 2 and 4)."""
import pytest

from fault_helpers import assert_same_result, evaluate, faults, killed, train
from mambapeft.io import torch_load_verified
from mambapeft.runspec import ADAPTER, METRICS, TRAIN_RECORD
from run_helpers import run

CHECKPOINT = "checkpoint.pt"


def checkpoint_step(out) -> int:
    """The step of the run's checkpoint (which must be intact)."""
    return torch_load_verified(out / CHECKPOINT, map_location="cpu")["state"]["step"]


def test_killed_mid_epoch(tiny, whole, tmp_path):
    with faults(kill_step=3):  # the first step of epoch 2, one past epoch 1's checkpoint
        killed(train(tiny, tmp_path))
    assert checkpoint_step(tmp_path) == 2 and not (tmp_path / TRAIN_RECORD).exists()
    run(tiny, tmp_path)
    assert_same_result(tmp_path, whole)


@pytest.mark.parametrize("name, nth, resumes_at", [
    (CHECKPOINT, 2, 2),  # epoch 2's checkpoint dies half-written: epoch 1's is still there, whole
    (ADAPTER, 1, 4),  # training is over; epoch 2's checkpoint is the last one
    (TRAIN_RECORD, 1, 4),
])
def test_killed_while_writing(tiny, whole, tmp_path, name, nth, resumes_at):
    with faults(kill_write=f"{name}:{nth}"):
        killed(train(tiny, tmp_path))
    assert checkpoint_step(tmp_path) == resumes_at
    assert not (tmp_path / TRAIN_RECORD).exists()  # the training job left no result
    run(tiny, tmp_path)
    assert_same_result(tmp_path, whole)


def test_killed_while_writing_metrics(tiny, whole, tmp_path):
    assert train(tiny, tmp_path).returncode == 0
    with faults(kill_write=f"{METRICS}:1"):
        killed(evaluate(tiny, tmp_path))
    assert not (tmp_path / METRICS).exists()  # nothing for a table to read
    assert evaluate(tiny, tmp_path).returncode == 0
    assert_same_result(tmp_path, whole)
