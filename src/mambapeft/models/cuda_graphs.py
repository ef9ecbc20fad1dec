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
