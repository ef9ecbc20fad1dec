"""State-offset tuning (Kang et al., ACL 2025; furiosa-ai/ssm-state-tuning, bias type ``SILU_Z_C``).

A learnable offset h' (D_inner, N) per layer and scan direction is added to the state the output
reads at every step: y_t = C_t (h_t + h') + D x_t, gated by silu(z_t). Because the offset never
enters the recurrence, it is the extra output term ``silu(z_t) * C_t h'`` on top of the stock scan
(the original code adds exactly this to the scan's output): the CUDA scan, its step mode and its
last state stay as they are. The mixer extension point is ``state_offsets[direction]``. On the fused
path (``mamba_inner``, where the backend's function takes an offset: our short-sequence scan) the
kernel reads the offset with the state instead, ``C_t (h_t + h')``, the same function, where the
module stands for its call (:meth:`StateOffset.reads_as_offset`).
h' starts at zero (the original's ``bias_init: ZERO``), so the model is unchanged at init.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.mamba import plain
from ..models.scan import state_offset_term
from .registry import ORDER_MIXER, ParamGroup, SpecBase, register
from .targets import mamba1_mixers


@dataclass(frozen=True)
class StateOffsetSpec(SpecBase):
    """State-offset tuning on every Mamba-1 mixer (or ``layers``), one offset per scan direction."""


class StateOffset(nn.Module):
    """Mixer extension point ``state_offsets[direction]``: (C, z) -> silu(z) * C h'."""

    def __init__(self, d_inner: int, n_state: int, device=None):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(d_inner, n_state, device=device))  # h': (D_inner, N)

    def forward(self, C: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """C: (B, N, L) or (B, N) (one step), z: (B, D_inner, L) or (B, D_inner) -> z's shape."""
        return state_offset_term(C, z, self.offset)

    def reads_as_offset(self) -> bool:
        """Whether :attr:`offset` stands for this module's call, so a fused kernel may read it instead
        (``models/mamba.py: offset_of``): this class's forward and nothing hooked."""
        return plain(self, StateOffset)


# after additional_scan (same stage): the offset then covers the extended state the scan runs
@register("state_offset", spec=StateOffsetSpec, order=ORDER_MIXER + 10)
def apply(model: nn.Module, spec: StateOffsetSpec) -> list[ParamGroup]:
    params = []
    for index, mixer in enumerate(mamba1_mixers(model, "state_offset")):
        if spec.layers is not None and index not in spec.layers:
            continue
        for direction in mixer.directions:
            extensions = mixer.state_extensions
            n_extra = extensions[direction.key].n_extra if direction.key in extensions else 0
            n_state = mixer.d_state + n_extra
            offset = StateOffset(mixer.d_inner, n_state, device=getattr(mixer, direction.A_log).device)
            mixer.state_offsets[direction.key] = offset
            params.append(offset.offset)
    return [spec.group("state_offset", params)]
