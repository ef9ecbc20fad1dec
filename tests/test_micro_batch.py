"""The automatic micro-batch (train/micro_batch.py): the search, its record, and the update it keeps."""
import json

import pytest
import torch
from test_train import tiny_language  # noqa: F401 (the fixture)

from mambapeft.runspec import ConfigError
from mambapeft.train import micro_batch
from mambapeft.train.micro_batch import (
    MicroBatchError,
    candidates,
    choose_micro_batch,
    micro_batch_setting,
)
from mambapeft.train.runner import LoopState, Trainer, run_training

CUDA = torch.device("cuda")


class FakeGpu:
    """CUDA memory as the probe sees it, on a CPU: a trial of ``size`` sequences allocates
    ``size * per_sequence`` bytes and raises OutOfMemoryError past ``capacity`` (with what is held)."""

    def __init__(self, monkeypatch, capacity: int, per_sequence: int = 1000):
        self.capacity, self.per_sequence, self.held, self.peak, self.trials = capacity, per_sequence, 0, 0, []
        monkeypatch.setattr(micro_batch, "_hold", self.hold)
        for name, fn in {"reset_peak_memory_stats": lambda: None, "empty_cache": lambda: None,
                         "memory_allocated": lambda: 0, "max_memory_allocated": lambda: self.peak}.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def hold(self, n_bytes: int) -> int:
        self.held = n_bytes
        return n_bytes

    def trial(self, size: int) -> None:
        self.trials.append((size, self.held))
        if self.held + size * self.per_sequence > self.capacity:
            raise torch.cuda.OutOfMemoryError("fake: out of memory")
        self.peak = size * self.per_sequence


def test_candidates_are_the_powers_of_two_dividing_the_batch():
    assert candidates(128) == [128, 64, 32, 16, 8, 4, 2, 1]
    assert candidates(48) == [16, 8, 4, 2, 1] and candidates(58) == [2, 1] and candidates(1) == [1]
    assert candidates(128, cap=4) == [4, 2, 1] and candidates(6, cap=4) == [2, 1]


def test_auto_keeps_the_largest_power_of_two_that_fits(monkeypatch):
    gpu = FakeGpu(monkeypatch, capacity=40_000)
    choice = choose_micro_batch("auto", 96, CUDA, gpu.trial, held_bytes=5_000)
    assert choice["micro_batch"] == 32 and choice["batch_size"] == 96 and choice["how"].startswith("auto on cuda")
    assert choice["tried"] == [{"micro_batch": 32, "fits": True}]  # 96 is 3 x 32: no larger power of two divides it
    choice = choose_micro_batch("auto", 128, CUDA, gpu.trial, held_bytes=5_000)
    assert choice["micro_batch"] == 32  # 35,000 bytes fit beside 5,000 held; 64 sequences' 64,000 do not
    assert [t["micro_batch"] for t in choice["tried"]] == [128, 64, 32]
    assert [t["fits"] for t in choice["tried"]] == [False, False, True]
    assert all(held == 5_000 for _, held in gpu.trials)  # the optimizer state's bytes stay held during each trial


def test_with_cuda_graphs_a_step_must_fit_beside_a_retained_one(monkeypatch):
    gpu = FakeGpu(monkeypatch, capacity=40_000)
    choice = choose_micro_batch("auto", 128, CUDA, gpu.trial, held_bytes=0, graph_bytes=1_000)
    assert choice["micro_batch"] == 16  # 32 runs alone (32,000) but not beside its own 32,000 + 1,000
    assert (32, 33_000) in gpu.trials and (16, 17_000) in gpu.trials


def test_a_configured_micro_batch_is_used_as_is(monkeypatch):
    gpu = FakeGpu(monkeypatch, capacity=0)
    assert choose_micro_batch(8, 128, CUDA, gpu.trial) == {"micro_batch": 8, "batch_size": 128,
                                                            "accumulation_steps": 16, "how": "configured"}
    assert gpu.trials == []


def test_auto_off_cuda_keeps_the_recipe_micro_batch_and_probes_nothing():
    def trial(size):
        raise AssertionError("no trial off CUDA")
    assert choose_micro_batch("auto", 128, torch.device("cpu"), trial)["micro_batch"] == 4
    assert choose_micro_batch("auto", 6, torch.device("cpu"), trial)["micro_batch"] == 2


def test_nothing_fitting_is_an_error_naming_the_fix(monkeypatch):
    gpu = FakeGpu(monkeypatch, capacity=500)
    with pytest.raises(MicroBatchError, match="cutoff_len"):
        choose_micro_batch("auto", 8, CUDA, gpu.trial)


def test_the_setting_is_a_positive_integer_or_auto():
    assert micro_batch_setting({}) == "auto" and micro_batch_setting({"micro_batch_size": 8}) == 8
    for wrong in (0, "4", True, 2.0):
        with pytest.raises(ConfigError, match="train/micro_batch_size"):
            micro_batch_setting({"micro_batch_size": wrong})


def test_the_run_record_says_how_the_micro_batch_was_chosen(tiny_language, tmp_path):  # noqa: F811
    spec = {**tiny_language, "output_dir": str(tmp_path), "train": {**tiny_language["train"], "epochs": 1,
                                                                     "micro_batch_size": "auto"}}
    run_training(spec)
    record = json.loads((tmp_path / "train.json").read_text())["micro_batch"]
    assert record["micro_batch"] == 4 and record["accumulation_steps"] == 4 and record["how"].startswith("auto on cpu")


def test_accumulating_micro_batches_gives_the_same_update(tiny_language, tmp_path):  # noqa: F811
    """One step at micro-batch 16 (the whole batch) and at 4 (four accumulated): the same gradients
    and parameters, in fp64 (the loss is reduced in fp32: tolerances of fp32 rounding). Without
    dropout: its masks are drawn per micro-batch, so with it the update is the same in distribution."""
    method = {**tiny_language["method"], "peft": [{**m, "dropout": 0.0} for m in tiny_language["method"]["peft"]]}
    stepped = []
    for size in (16, 4):
        trainer = Trainer({**tiny_language, "method": method, "output_dir": str(tmp_path / str(size)),
                           "train": {**tiny_language["train"], "micro_batch_size": size}})
        trainer.model.double()
        trainer._use_micro_batch(LoopState(), graphs=False)
        trainer.task.train_loss(trainer.model, 0, trainer.autocast)
        grads = {name: p.grad.clone() for name, p in trainer.peft.trainable.items()}
        trainer.optimizer.step()
        stepped.append((grads, {name: p.detach().clone() for name, p in trainer.peft.trainable.items()}))
    (whole_grads, whole), (accumulated_grads, accumulated) = stepped
    assert trainer.task.micro_batch == 4 and whole.keys() == accumulated.keys()
    for name in whole:
        torch.testing.assert_close(accumulated_grads[name], whole_grads[name], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-6, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_auto_on_cuda_measures_a_micro_batch_and_trains(tiny_language, tmp_path, cuda_graphs):  # noqa: F811
    runtime = {**tiny_language["runtime"], "device": "cuda", "scan_backend": "auto", "allow_torch_fallback": True,
               "cuda_graphs": cuda_graphs}
    spec = {**tiny_language, "runtime": runtime, "output_dir": str(tmp_path),
            "train": {**tiny_language["train"], "epochs": 1, "micro_batch_size": "auto"}}
    record = run_training(spec)
    chosen = record["micro_batch"]
    assert record["status"] == "ok" and record["optimizer_steps"] == 4
    assert chosen["how"].startswith("auto on cuda") and chosen["tried"][-1] == {"micro_batch": chosen["micro_batch"],
                                                                               "fits": True}
    assert chosen["micro_batch"] >= 1 and 16 % chosen["micro_batch"] == 0
