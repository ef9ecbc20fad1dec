"""CUDA graphs of a training forward and its backward (runtime key ``cuda_graphs``).

Mamba training steps at the paper's sizes are launch-bound: thousands of small kernels per step,
the GPU idle for half of it or more (``mambapeft bench profile``). A graph replays one captured
forward and backward with a single launch. It only replays the shapes it was captured for, so
each task keeps its eager path for the others. Dropout draws from the CUDA generator, which a
graph advances on every replay.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..models.cuda_graphs import garbage_collection_paused, graph_reads_recorded, refreshed


class _Call(nn.Module):
    """``fn(model, *inputs)`` as a module of its own: make_graphed_callables replaces this
    wrapper's forward, so the model keeps its eager one."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, *inputs)


def capture(model: nn.Module, fn: Callable, sample_args: tuple[torch.Tensor, ...], pool=None) -> Callable:
    """``fn(model, *args)`` and its backward as a graphed callable for inputs shaped as ``sample_args``,
    run under bf16 autocast. Captures given one ``pool`` share its memory; they must not run
    concurrently (a replay's outputs are consumed before the next replay)."""
    # autocast's weight cache must be off while capturing (torch.cuda.make_graphed_callables)
    with (garbage_collection_paused(), graph_reads_recorded() as reads,
          torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)):
        graphed = torch.cuda.make_graphed_callables(_Call(model, fn), sample_args, pool=pool)
    return refreshed(reads, graphed)  # the values kept from frozen parameters it reads, brought up to date


def capture_each(model: nn.Module, fn: Callable, samples: dict) -> dict:
    """{key: :func:`capture` of ``fn`` for inputs shaped as ``samples[key]``}, the captures sharing one
    memory pool: only one may run at a time (a replay's outputs consumed before the next replay)."""
    pool = torch.cuda.graph_pool_handle()
    return {key: capture(model, fn, sample_args, pool=pool) for key, sample_args in samples.items()}
