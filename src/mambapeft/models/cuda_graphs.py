"""A step on static tensors as the replay of one CUDA graph: generation's decode steps
(``decoding.py``) and the benchmarks' whole training steps (``bench/train.py``)."""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

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
    with garbage_collection_paused(), torch.cuda.graph(graph):
        step()
    return graph.replay
