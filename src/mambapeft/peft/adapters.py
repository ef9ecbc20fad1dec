"""Parallel adapter (AdaptFormer-style), MambaPEFT's "ParallelAdapter": a bottleneck MLP beside a
projection, ``out = base(y) + s * up(dropout(relu(down(y))))``, with ``up`` zero-initialised.
In the paper it sits parallel to ``out_proj`` only (not the whole block)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .registry import ORDER_WRAPPERS, ParamGroup, SpecBase, register
from .targets import find_modules, replace_module

ACTIVATIONS = {"relu": nn.ReLU, "identity": nn.Identity}


@dataclass(frozen=True)
class ParallelAdapterSpec(SpecBase):
    targets: tuple[str, ...] = ("mixer.out_proj",)
    """Linear modules to put the adapter beside (exact path, dotted suffix or ``re:``)."""
    dim: int = 32
    """Bottleneck width."""
    scale: float = 0.1
    """Multiplier of the adapter output (the original's ``s_adaptf``)."""
    dropout: float = 0.1
    """Dropout inside the bottleneck."""
    activation: str = "relu"
    """``relu`` or ``identity``."""

    def __post_init__(self):
        super().__post_init__()
        if self.dim < 1:
            raise ValueError(f"parallel_adapter `dim` must be >= 1, got {self.dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"parallel_adapter `activation` must be one of {sorted(ACTIVATIONS)}")


class ParallelAdapter(nn.Module):
    def __init__(self, base: nn.Linear, spec: ParallelAdapterSpec):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.adapter_down = nn.Linear(base.in_features, spec.dim, bias=False, device=device)
        self.adapter_up = nn.Linear(spec.dim, base.out_features, bias=False, device=device)
        nn.init.zeros_(self.adapter_up.weight)
        self.act, self.dropout, self.scale = ACTIVATIONS[spec.activation](), nn.Dropout(spec.dropout), spec.scale

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y: (..., in) -> (..., out)."""
        return self.base(y) + self.scale * self.adapter_up(self.dropout(self.act(self.adapter_down(y))))


@register("parallel_adapter", spec=ParallelAdapterSpec, order=ORDER_WRAPPERS + 10)
def apply(model: nn.Module, spec: ParallelAdapterSpec) -> list[ParamGroup]:
    params = []
    for path, base in find_modules(model, list(spec.targets), spec.layers, kinds=(nn.Linear,)).items():
        wrapper = ParallelAdapter(base, spec)
        replace_module(model, path, wrapper)
        params += [wrapper.adapter_down.weight, wrapper.adapter_up.weight]
    return [spec.group("parallel_adapter", params)]
