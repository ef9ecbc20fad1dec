"""Partial tuning: train selected existing tensors (A_log, D, conv1d weights, dt bias, cls token,
position embedding), either directly or through a zero-initialised additive delta.

``mode: delta`` is MambaPEFT's "v2" reparametrisation ``W = W_pretrained + dW`` (dW starts at 0).
Decoupled weight decay on dW then pulls the tensor toward its *pretrained* value rather than to
zero, which is why these methods use decay multipliers of 10 (A, D, conv1d) or 100 (dt bias).
The delta is installed with ``torch.nn.utils.parametrize``, so the model code is unchanged and
``module.A_log`` returns the sum wherever it is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .registry import ORDER_TENSORS, ParamGroup, SpecBase, register
from .targets import find_parameters, fold_parametrizations, parent_and_attr

MODES = ("delta", "direct")


@dataclass(frozen=True)
class PartialSpec(SpecBase):
    targets: tuple[str, ...] = ()
    """Parameters to tune: exact path, dotted suffix (``mixer.A_log``, ``conv1d.weight``) or ``re:``."""
    mode: str = "delta"
    """``delta``: train a zero-initialised additive delta; ``direct``: unfreeze the tensor itself."""

    def __post_init__(self):
        super().__post_init__()
        if not self.targets:
            raise ValueError("partial needs at least one entry in `targets`")
        if self.mode not in MODES:
            raise ValueError(f"partial `mode` must be one of {MODES}, got {self.mode!r}")


class AddDelta(nn.Module):
    """Parametrisation original -> original + delta, with delta = 0 at creation."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(like, dtype=torch.float32))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original + self.delta.to(original.dtype)


def merge_partial(model: nn.Module) -> None:
    """Write every ``original + delta`` into the tensor itself and drop the parametrisation."""
    fold_parametrizations(model, (AddDelta,))


@register("partial", spec=PartialSpec, order=ORDER_TENSORS + 10, merge=merge_partial)
def apply(model: nn.Module, spec: PartialSpec) -> list[ParamGroup]:
    params = []
    for path in find_parameters(model, list(spec.targets), spec.layers):
        owner, attr = parent_and_attr(model, path)
        if spec.mode == "direct":
            params.append(getattr(owner, attr))
            continue
        delta = AddDelta(getattr(owner, attr))
        parametrize.register_parametrization(owner, attr, delta)
        params.append(delta.delta)
    return [spec.group("partial", params)]
