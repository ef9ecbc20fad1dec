"""Learning-rate schedules of the two recipes, as closed-form functions of the optimizer step.

A function of the step (not a stateful scheduler) makes resuming exact: the lr of step ``s`` is
the same whether or not the run was interrupted before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """VTAB-1k recipe (mmengine LinearLR + CosineAnnealingLR).

    Linear warm-up from ``base * start_factor`` to ``base`` stepped every iteration over the first
    ``warmup_epochs``; then cosine from ``base`` to ``min_lr`` over the remaining epochs, stepped
    once per epoch (constant inside an epoch).
    """

    base_lr: float
    iters_per_epoch: int
    epochs: int
    warmup_epochs: int
    warmup_start_factor: float
    min_lr: float

    def __call__(self, step: int) -> float:
        warmup_iters = self.warmup_epochs * self.iters_per_epoch
        if step < warmup_iters:
            factor = self.warmup_start_factor + (1 - self.warmup_start_factor) * step / warmup_iters
            return self.base_lr * factor
        epoch = step // self.iters_per_epoch
        progress = (epoch - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1)
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


@dataclass(frozen=True)
class WarmupLinear:
    """Language recipe (transformers' get_linear_schedule_with_warmup): 0 -> base over
    ``warmup_steps``, then linearly to 0 at ``total_steps``."""

    base_lr: float
    total_steps: int
    warmup_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / max(1, self.warmup_steps)
        return self.base_lr * max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


def build_schedule(recipe: dict, iters_per_epoch: int, total_steps: int):
    sched, base = recipe["schedule"], recipe["optimizer"]["lr"]
    if sched["kind"] == "warmup_cosine":
        return WarmupCosine(base, iters_per_epoch, recipe["epochs"], sched["warmup_epochs"],
                            sched["warmup_start_factor"], sched["min_lr"])
    if sched["kind"] == "warmup_linear":
        return WarmupLinear(base, total_steps, sched["warmup_steps"])
    raise ValueError(f"train/schedule/kind: unknown schedule {sched['kind']!r}; valid: warmup_cosine, warmup_linear")
