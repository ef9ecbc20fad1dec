"""A step on static tensors as the replay of one CUDA graph: generation's decode steps
(``decoding.py``) and the benchmarks' whole training steps (``bench/train.py``); and the values kept
from frozen parameters that graphs read as kept (:class:`GraphRead`), for every capture here and in
``train/graphs.py``."""
from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector collected, then off until the block ends. A collection
    during a capture can free an earlier graph (and its memory pool), a CUDA call a capturing stream
    does not permit: the capture fails, and the CUDA generator is left in capture mode, failing
    every capture after it (seen on the GPU machine as one failed capture and a cascade of
    "Offset increment outside graph capture" errors after it)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def is_capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream, for work on ``t``."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def storage_version(t: torch.Tensor) -> tuple[int, int]:
    """(storage address, version counter): what changes when ``t`` is written in place (an optimizer
    step, ``load_state_dict``) or given new storage."""
    return t.data_ptr(), t._version


@dataclass
class GraphRead:
    """A value computed from a frozen parameter and kept (``mamba.frozen_function_of``: A = -exp(A_log) and
    out_proj's scaled weight under PEFT) that a CUDA graph reads as it was before the capture, where it would
    otherwise compute it on every replay (two kernels a scan direction: 96 of a graphed Vim-S step's
    1,328). :meth:`refresh`, before each replay, writes it again in place where the parameter has been
    written since (a load after the capture), so that the replay reads the parameter as it is then."""

    parameter: torch.Tensor
    function: Callable[[torch.Tensor], torch.Tensor]
    value: torch.Tensor
    version: tuple[int, int]  # the parameter's storage_version the value was computed from

    def refresh(self) -> None:
        version = storage_version(self.parameter)
        if version != self.version:
            with torch.no_grad():
                self.value.copy_(self.function(self.parameter))
            self.version = version


_recording = threading.local()  # .reads: the list of the capture being recorded on this thread, or absent


@contextlib.contextmanager
def graph_reads_recorded() -> Iterator[list[GraphRead]]:
    """Collects the kept values the captures inside the block read (:func:`read_in_graph`): each
    replay of those graphs must be preceded by :func:`refreshed` of the list."""
    reads: list[GraphRead] = []
    outer = getattr(_recording, "reads", None)
    _recording.reads = reads
    try:
        yield reads
    finally:
        _recording.reads = outer


def read_in_graph(parameter: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor],
                  value: torch.Tensor) -> bool:
    """During a capture inside :func:`graph_reads_recorded`: records that the graph reads ``value``
    (``function(parameter)`` as the parameter is now) and returns True, the caller handing it to the
    graph; elsewhere False, the caller computing it in the graph (a capture made by other code)."""
    reads = getattr(_recording, "reads", None)
    if reads is None:
        return False
    reads.append(GraphRead(parameter, function, value, storage_version(parameter)))
    return True


def refreshed(reads: list[GraphRead], replay: Callable) -> Callable:
    """``replay`` with every read of ``reads`` refreshed before each call (:meth:`GraphRead.refresh`)."""
    def refreshed_replay(*args):
        for read in reads:
            read.refresh()
        return replay(*args)
    return refreshed_replay


def captured_replay(step: Callable[[], None], warmup: int = 2) -> Callable[[], None]:
    """``step`` as a CUDA graph's replay. It runs ``warmup`` times on a side stream first: lazy
    initialisation, kernel autotuning, library workspaces and an optimizer's state must not be
    created during capture. ``step`` must read and write only tensors that outlive it, since a
    replay repeats its kernels on exactly those."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with garbage_collection_paused(), graph_reads_recorded() as reads, torch.cuda.graph(graph):
        step()
    return refreshed(reads, graph.replay)


class InferenceGraph:
    """``model(inputs)`` without gradients, inputs of one shape replayed as a CUDA graph under bf16
    autocast; inputs of another shape (an evaluation's last batch) run eagerly. An eager Vim
    forward is launch-bound: thousands of small kernels, each with its Python (H200, Vim-S, batch
    32: ~70 ms a forward eagerly, a few ms replayed; ``mambapeft bench train``). The returned
    logits are the graph's own buffer, overwritten by the next replay: consume them first."""

    def __init__(self, model: torch.nn.Module, shape: tuple[int, ...], device: torch.device):
        self.model, self.inputs = model, torch.zeros(shape, device=device)
        self.outputs: torch.Tensor | None = None
        self.replay = captured_replay(self._forward)

    @torch.no_grad()
    def _forward(self) -> None:
        # autocast's weight cache would keep casts made during capture: off (as make_graphed_callables)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            self.outputs = self.model(self.inputs)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape != self.inputs.shape:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(inputs)
        self.inputs.copy_(inputs)
        self.replay()
        return self.outputs
