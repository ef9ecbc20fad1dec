"""(IA)^3: learned per-channel scaling vectors, initialised to one (no change at init).

``side: output`` scales a projection's output channels (e.g. in_proj's x and z), ``side: input``
scales its input channels (e.g. out_proj's input, the analogue of IA3's feed-forward scaling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .registry import ORDER_WRAPPERS, ParamGroup, SpecBase, register
from .targets import find_modules, fold_wrappers, plain_linear, replace_module

SIDES = ("output", "input")


@dataclass(frozen=True)
class IA3Spec(SpecBase):
    targets: tuple[str, ...] = ()
    """Linear modules to scale (exact path, dotted suffix or ``re:``)."""
    side: str = "output"
    """``output``: scale the module's output channels; ``input``: scale its input channels."""
    weight_decay_mult: float | None = 0.0
    """Weight-decay multiplier (0: decay toward zero would disable the channel)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.targets:
            raise ValueError("ia3 needs at least one entry in `targets`")
        if self.side not in SIDES:
            raise ValueError(f"ia3 `side` must be one of {SIDES}, got {self.side!r}")


class IA3Linear(nn.Module):
    def __init__(self, base: nn.Linear, side: str):
        super().__init__()
        self.base, self.side = base, side
        width = base.out_features if side == "output" else base.in_features
        self.ia3_scale = nn.Parameter(torch.ones(width, device=base.weight.device))

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """A plain Linear whose weight carries the scaling (output side: its rows and bias; input side: its columns)."""
        scale, bias = self.ia3_scale.to(self.base.weight.dtype), self.base.bias
        if self.side == "output":
            return plain_linear(self.base, self.base.weight * scale[:, None], None if bias is None else bias * scale)
        return plain_linear(self.base, self.base.weight * scale[None, :], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "input":
            return self.base(x * self.ia3_scale.to(x.dtype))
        out = self.base(x)
        return out * self.ia3_scale.to(out.dtype)


def merge_ia3(model: nn.Module) -> None:
    fold_wrappers(model, (IA3Linear,))


@register("ia3", spec=IA3Spec, order=ORDER_WRAPPERS + 20, merge=merge_ia3)
def apply(model: nn.Module, spec: IA3Spec) -> list[ParamGroup]:
    params = []
    for path, base in find_modules(model, list(spec.targets), spec.layers, kinds=(nn.Linear,)).items():
        wrapper = IA3Linear(base, spec.side)
        replace_module(model, path, wrapper)
        params.append(wrapper.ia3_scale)
    return [spec.group("ia3", params)]
