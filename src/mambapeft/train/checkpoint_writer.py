"""Resumable checkpoints written while training goes on.

A checkpoint (``runner.py``, ``from_scratch.py``) is checksummed (``io.state_digest``), serialised and
flushed to disk: tens of milliseconds for a PEFT method's state, where a VTAB-1k epoch of Vim-S is
32 steps of ~20 ms on one H200 and the recipe checkpoints every epoch. Written in the loop, the GPU
waits for it. :class:`CheckpointWriter` takes a snapshot of the state instead (copies queued on the
device after the step that made it, so the next steps' in-place updates do not reach it) and writes
the snapshot on a thread of its own while the next steps run. The file is written atomically as
before: a run killed mid-write resumes from the checkpoint before.

A write can take longer than the steps between checkpoints (full fine-tuning of Vim-S on one H200
host: its 300 MB checksummed, serialised and flushed outlast its VTAB-1k epoch of 0.7 s): the loop then
skips a checkpoint that falls due while the one before is still being written (:meth:`writing`)
rather than wait for the disk, and takes the next one due.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from ..io import torch_save_verifiable

log = logging.getLogger("mambapeft.train")

# A snapshot is held in (pinned) host memory until written: larger states (full fine-tuning of a
# model of over ~170M parameters: weights and AdamW's two moments in fp32) are written in the loop,
# as they were, so that a job's host memory stays what its resources ask for.
BACKGROUND_BYTES = 2 << 30


class CheckpointWriter:
    """Writes one checkpoint at a time (:func:`io.torch_save_verifiable`) from a snapshot, in the
    background where the state is at most :data:`BACKGROUND_BYTES`. :meth:`wait` joins the write in
    flight and raises what it raised (a full disk: ``io.DiskFullError``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def writing(self, step: int) -> bool:
        """Whether a checkpoint is still being written, so that the one due at ``step`` is skipped (and
        the next one due taken); a write that failed is raised here."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
        if self._thread is not None:
            log.debug("step %d: checkpoint skipped, the one before is still being written", step)
        return self._thread is not None

    def save(self, state: dict, path: Path) -> None:
        self.wait()
        if tensor_bytes(state) > BACKGROUND_BYTES:
            torch_save_verifiable(state, path)
            return
        snapshot = host_copy(state)
        copied = None
        if self.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
        self._thread = threading.Thread(target=self._write, args=(snapshot, copied, path),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, snapshot: dict, copied: torch.cuda.Event | None, path: Path) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            torch_save_verifiable(snapshot, path)
        except BaseException as err:  # raised in the training thread by wait()
            self._failure = err

    def wait(self) -> None:
        """Until the checkpoint being written is on disk."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure


def host_copy(value):
    """``value`` (nested dicts, lists and tuples of tensors, NumPy arrays and plain values) with its
    tensors and containers copied as they are now: the device tensors of a dtype gathered into one
    buffer and that copied into pinned host memory by one copy queued on the device (read them once the
    device has run it; a copy a tensor took ~16 ms of host time for LoRAp(X)'s ~400 on an H200 host,
    the device idle meanwhile), host tensors and arrays cloned."""
    on_device: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in _tensors(value):
        if t.device.type != "cpu":
            on_device.setdefault(t.dtype, []).append(t)
    views = {}
    for dtype, tensors in on_device.items():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        host = torch.empty(flat.shape, dtype=dtype, pin_memory=True).copy_(flat, non_blocking=True)
        for t, part in zip(tensors, host.split([t.numel() for t in tensors])):
            views[id(t)] = part.view(t.shape)
    return _rebuilt(value, views)


def _rebuilt(value, views: dict):
    if isinstance(value, dict):
        return {key: _rebuilt(item, views) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_rebuilt(item, views) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, torch.Tensor):
        return views[id(value)] if value.device.type != "cpu" else value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value  # immutable: str, bytes, numbers, None


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a nested state."""
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _tensors(value):
    """The tensors of a nested state (dicts, lists, tuples), in order."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, torch.Tensor):
        yield value
