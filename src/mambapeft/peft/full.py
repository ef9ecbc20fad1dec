"""Full fine-tuning: every backbone parameter trains (``scratch`` is the same on random weights)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .registry import ParamGroup, register


@dataclass(frozen=True)
class FullSpec:
    lr_mult: float = 1.0
    """Learning-rate multiplier."""
    weight_decay_mult: float | None = None
    """Weight-decay multiplier (None: the trainer's default rule per tensor)."""


@register("full", spec=FullSpec)
def apply(model: nn.Module, spec: FullSpec) -> list[ParamGroup]:
    classifier = tuple(f"{name}." for name in model.classifier_names())
    params = [p for n, p in model.named_parameters() if not n.startswith(classifier)]
    return [ParamGroup("full", params, spec.lr_mult, spec.weight_decay_mult)]
