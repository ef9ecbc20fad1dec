"""The micro-batch of a run: recipe key ``micro_batch_size``, a positive integer or ``auto``.

The loss is normalised over the whole batch, so the micro-batch trades memory for speed only:
gradient accumulation over ``batch_size / micro_batch`` micro-batches gives the same update for
any value (up to rounding; dropout masks are drawn per micro-batch, so with dropout the same in
distribution). ``auto`` on CUDA measures: the largest power of two that divides ``batch_size`` and
whose training step fits in GPU memory, found by running real forward and backward passes at the
widest shape, largest candidate first. Elsewhere host memory is not probed and ``auto`` keeps the
paper recipe's micro-batch (:data:`NOT_PROBED`), as CPU runs did before ``auto`` existed.
"""
from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

from ..runspec import ConfigError

log = logging.getLogger("mambapeft.train")

AUTO = "auto"
NOT_PROBED = 4  # sony/MambaPEFT finetune.py's micro_batch_size: `auto` where memory is not probed (CPU)


class MicroBatchError(ConfigError):
    """Not even one sequence of the widest shape fits in GPU memory."""


def micro_batch_setting(recipe: dict) -> int | str:
    """The recipe's ``micro_batch_size``: a positive integer, or ``auto`` (also when absent)."""
    value = recipe.get("micro_batch_size", AUTO)
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ConfigError(f"train/micro_batch_size: {value!r} is neither a positive integer nor {AUTO!r}; "
                      f"set sequences per forward pass or {AUTO!r} (measured on CUDA)")


def candidates(batch_size: int, cap: int | None = None) -> list[int]:
    """The powers of two that divide ``batch_size`` (and are at most ``cap``), largest first."""
    sizes, size = [], 1
    while size <= min(batch_size, cap or batch_size) and batch_size % size == 0:
        sizes.append(size)
        size *= 2
    return sizes[::-1]


def largest_fitting(batch_size: int, fits: Callable[[int], bool], cap: int | None = None) -> tuple[int, list[dict]]:
    """The first of :func:`candidates` that ``fits``, and every candidate tried with its answer."""
    tried = []
    for size in candidates(batch_size, cap):
        tried.append({"micro_batch": size, "fits": fits(size)})
        if tried[-1]["fits"]:
            return size, tried
    raise MicroBatchError("not even one sequence of the run's widest shape (train/cutoff_len) fits in GPU memory "
                          "beside the model and its optimizer state; lower train/cutoff_len or use a larger GPU")


def choose_micro_batch(setting: int | str, batch_size: int, device: torch.device, trial: Callable[[int], None],
                       held_bytes: int = 0, graph_bytes: int | None = None) -> dict:
    """The micro-batch for ``setting`` and how it was chosen (the run record's ``micro_batch``).

    ``trial(size)``: one training forward and backward of ``size`` sequences at the widest shape.
    ``held_bytes``: memory the run will hold that the trial does not allocate (the optimizer state
    before the first step). ``graph_bytes``: with CUDA graphs, what each capture keeps besides its
    activations (static gradient buffers); a size then must fit twice over, as the graph's private
    pool keeps one step's activations while a partial micro-batch runs eagerly beside it.
    """
    if setting != AUTO:
        return _record(setting, batch_size, "configured")
    if device.type != "cuda":
        size, _ = largest_fitting(batch_size, lambda m: True, cap=NOT_PROBED)
        return _record(size, batch_size, f"auto on {device.type}: the largest power of two <= {NOT_PROBED} dividing "
                                         "the batch (memory is probed on CUDA only)")
    size, tried = largest_fitting(batch_size, lambda m: _fits_on_cuda(trial, m, held_bytes, graph_bytes))
    torch.cuda.reset_peak_memory_stats()  # the run's peak memory is training's, not the probe's
    log.info("micro-batch %d of batch %d: the largest power of two whose step fits in GPU memory", size, batch_size)
    return _record(size, batch_size, "auto on cuda: the largest power of two dividing the batch whose forward and "
                                     "backward at the widest shape ran without running out of GPU memory", tried=tried)


def _record(size: int, batch_size: int, how: str, **extra) -> dict:
    return {"micro_batch": size, "batch_size": batch_size, "accumulation_steps": -(-batch_size // size), "how": how,
            **extra}


def _fits_on_cuda(trial: Callable[[int], None], size: int, held_bytes: int, graph_bytes: int | None) -> bool:
    peak = _peak_or_none(trial, size, held_bytes)
    if peak is None or graph_bytes is None:
        return peak is not None
    return _peak_or_none(trial, size, held_bytes + peak + graph_bytes) is not None


def _peak_or_none(trial: Callable[[int], None], size: int, held_bytes: int) -> int | None:
    """Bytes ``trial(size)`` allocated at its peak while ``held_bytes`` more are held; None when it
    ran out of memory. The memory is freed afterwards either way."""
    held = peak = None
    try:
        held = _hold(held_bytes)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trial(size)
        peak = torch.cuda.max_memory_allocated() - before
    except torch.cuda.OutOfMemoryError:
        pass  # leaving the handler drops the traceback and with it the tensors of the failed step
    del held
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def _hold(n_bytes: int) -> torch.Tensor:
    """``n_bytes`` of GPU memory, held while a trial runs beside it."""
    return torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
