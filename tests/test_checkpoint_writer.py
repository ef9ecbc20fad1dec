"""Checkpoints written in the background (train/checkpoint_writer.py): the file holds the state as it
was when saved, whatever the loop does to the tensors next, and a failed write reaches the loop."""
import threading

import pytest
import torch

from mambapeft.io import torch_load_verified
from mambapeft.train import checkpoint_writer
from mambapeft.train.checkpoint_writer import CheckpointWriter


def _state():
    return {"step": 3, "trainable": {"w": torch.arange(6.0)}, "history": [{"loss": 1.5}], "pair": (1, torch.ones(2))}


def test_the_file_holds_the_state_as_saved_not_as_updated_after(tmp_path):
    state, writer = _state(), CheckpointWriter(torch.device("cpu"))
    writer.save(state, tmp_path / "checkpoint.pt")
    state["trainable"]["w"].add_(100.0)  # the next optimizer step, in place
    state["history"].append({"loss": 1.0})
    writer.wait()
    saved = torch_load_verified(tmp_path / "checkpoint.pt", map_location="cpu")
    assert torch.equal(saved["trainable"]["w"], torch.arange(6.0))
    assert saved["history"] == [{"loss": 1.5}] and saved["step"] == 3
    assert isinstance(saved["pair"], tuple) and torch.equal(saved["pair"][1], torch.ones(2))


def test_writes_run_on_another_thread_one_at_a_time(tmp_path, monkeypatch):
    writers, started, release = [], threading.Event(), threading.Event()

    def slow_save(state, path):
        writers.append(threading.current_thread().name)
        started.set()
        release.wait(5)
        path.write_text(str(state["step"]))

    monkeypatch.setattr(checkpoint_writer, "torch_save_verifiable", slow_save)
    writer = CheckpointWriter(torch.device("cpu"))
    writer.save({"step": 1}, tmp_path / "a")
    assert started.wait(5) and writers == ["checkpoint-writer"] and not (tmp_path / "a").exists()  # save returned before the write
    release.set()
    writer.save({"step": 2}, tmp_path / "a")  # waits for the first
    writer.wait()
    assert (tmp_path / "a").read_text() == "2" and writers == ["checkpoint-writer"] * 2


def test_a_failed_write_is_raised_in_the_loop(tmp_path, monkeypatch):
    def full_disk(state, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_writer, "torch_save_verifiable", full_disk)
    writer = CheckpointWriter(torch.device("cpu"))
    writer.save({"step": 1}, tmp_path / "a")
    with pytest.raises(OSError, match="No space"):
        writer.wait()
    writer.wait()  # raised once


def test_a_state_over_the_limit_is_written_before_save_returns(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_writer, "BACKGROUND_BYTES", 8)
    state, writer = _state(), CheckpointWriter(torch.device("cpu"))
    writer.save(state, tmp_path / "checkpoint.pt")
    assert writer._thread is None and (tmp_path / "checkpoint.pt").is_file()
    assert checkpoint_writer.tensor_bytes(state) == 8 * 4


def test_writing_says_whether_a_write_is_in_flight_and_raises_a_failed_one(tmp_path, monkeypatch):
    release, outcomes = threading.Event(), iter([None, OSError(28, "No space left on device")])

    def slow_save(state, path):
        release.wait(5)
        failure = next(outcomes)
        if failure is not None:
            raise failure
        path.write_text(str(state["step"]))

    monkeypatch.setattr(checkpoint_writer, "torch_save_verifiable", slow_save)
    writer = CheckpointWriter(torch.device("cpu"))
    assert not writer.writing(1)
    writer.save({"step": 1}, tmp_path / "a")
    assert writer.writing(2)  # the loop skips the checkpoint due at step 2
    release.set()
    writer._thread.join(5)
    assert not writer.writing(3) and (tmp_path / "a").read_text() == "1"
    writer.save({"step": 3}, tmp_path / "a")
    writer._thread.join(5)
    with pytest.raises(OSError, match="No space"):
        writer.writing(4)
