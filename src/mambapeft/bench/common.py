"""What the benchmarks share: synchronised wall-clock timing, and what surrounds one measured row
(memory released before or after it, a failure recorded as the row's error)."""
from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device``: CUDA runs asynchronously, a CPU call is done when it returns."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(call: Callable[[], object], repeats: int, device: torch.device | str) -> list[float]:
    """Seconds of each of ``repeats`` calls, the device synchronised before and after each."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def release_memory() -> None:
    """Collect what earlier rows left behind and return CUDA's cached blocks, so rows do not share memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_row(err: Exception) -> dict:
    """The row of a measurement that failed: the others still run."""
    return {"error": f"{type(err).__name__}: {err}"}
