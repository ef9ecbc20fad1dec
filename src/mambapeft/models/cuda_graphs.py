"""A step on static tensors as the replay of one CUDA graph: generation's decode steps
(``decoding.py``) and the benchmarks' whole training steps (``bench/train.py``)."""
from __future__ import annotations

from collections.abc import Callable

import torch


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
    with torch.cuda.graph(graph):
        step()
    return graph.replay
