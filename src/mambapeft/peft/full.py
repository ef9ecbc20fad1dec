"""Full fine-tuning: every backbone parameter trains (``scratch`` is the same on random weights);
with ``layers``, only those blocks' parameters."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .registry import ORDER_TENSORS, ParamGroup, PeftConfigError, SpecBase, register
from .targets import layer_of


@dataclass(frozen=True)
class FullSpec(SpecBase):
    """No fields of its own: ``layers``, ``lr_mult`` and ``weight_decay_mult`` are the base's."""


def merge_full(model: nn.Module) -> None:
    """Nothing to fold: the trained tensors are the backbone's own."""


@register("full", spec=FullSpec, order=ORDER_TENSORS, merge=merge_full)
def apply(model: nn.Module, spec: FullSpec) -> list[ParamGroup]:
    classifier = tuple(f"{name}." for name in model.classifier_names())
    params = [p for n, p in model.named_parameters() if not n.startswith(classifier)
              and (spec.layers is None or layer_of(n) in spec.layers)]
    if not params:
        raise PeftConfigError(f"full: no backbone parameter in layers {list(spec.layers)}")
    return [spec.group("full", params)]
