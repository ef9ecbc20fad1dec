"""Additional-scan: extra SSM state dimensions per direction (MambaPEFT).

Each adapted direction gets ``n`` new state channels: ``A_log`` (D_inner, n) and an input-dependent
projection ``x_proj`` (D_inner -> 2n) giving the new B and C rows. With ``position: prefix`` the
effective parameters are ``A = [A_new | A]``, ``B = [B_new | B]``, ``C = [C_new | C]`` (the original
re-orders x_proj rows to ``[dt | B_new | B | C_new | C]``, which is the same function). The scan is the
stock kernel with d_state = N + n. The new x_proj keeps PyTorch's default init (not zero), as in
the original code, so the output changes at initialisation.

The fused mixer path takes the extension as that re-ordered x_proj weight and the extended A
(:meth:`AdditionalScan.extend_projection`; our short scan holds up to 24 states, mamba-ssm's more).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.mamba import plain, read_as_linear
from .registry import ORDER_MIXER, ParamGroup, SpecBase, register
from .targets import mamba1_mixers

POSITIONS = ("prefix", "suffix")
A_INITS = ("copy", "arange")


@dataclass(frozen=True)
class AdditionalScanSpec(SpecBase):
    n: int = 1
    """Extra state dimensions per direction (the original's ``scan_addition_num``)."""
    position: str = "prefix"
    """Where the new dimensions go in the state: ``prefix`` or ``suffix``."""
    A_init: str = "copy"
    """``copy``: every new A_log column copies the pretrained column at the same end (column 0 for
    prefix, -1 for suffix: ``scan_A_copy_from_last``); ``arange``: log(N+1 .. N+n) (mamba init)."""
    A_weight_decay_mult: float = 0.0
    """Weight-decay multiplier of the new A_log (0, as the original's ``.A_log`` rule)."""

    def __post_init__(self):
        super().__post_init__()
        if self.n < 1:
            raise ValueError(f"additional_scan `n` must be >= 1, got {self.n}")
        if self.position not in POSITIONS:
            raise ValueError(f"additional_scan `position` must be one of {POSITIONS}")
        if self.A_init not in A_INITS:
            raise ValueError(f"additional_scan `A_init` must be one of {A_INITS}")


class AdditionalScan(nn.Module):
    """Mixer extension point ``state_extensions[direction]``: (x, A, B, C) -> (A', B', C')."""

    def __init__(self, spec: AdditionalScanSpec, d_inner: int, pretrained_A_log: torch.Tensor):
        super().__init__()
        self.n_extra, self.prefix = spec.n, spec.position == "prefix"
        if spec.A_init == "copy":
            column = pretrained_A_log.detach()[:, 0 if self.prefix else -1].float()
            A_log = column[:, None].repeat(1, spec.n)
        else:
            n_state = pretrained_A_log.shape[1]
            A_log = torch.log(torch.arange(n_state + 1, n_state + spec.n + 1, dtype=torch.float32)).repeat(d_inner, 1)
        self.A_log = nn.Parameter(A_log.to(pretrained_A_log.device))  # (D_inner, n)
        self.x_proj = nn.Linear(d_inner, 2 * spec.n, bias=False, device=pretrained_A_log.device)

    def forward(self, x, A, B, C):
        """x: (B, D_inner, L)  A: (D_inner, N)  B, C: (B, N, L) -> A (D_inner, N+n), B, C (B, N+n, L)."""
        B_new, C_new = self.x_proj(x.transpose(1, 2)).transpose(1, 2).chunk(2, dim=1)  # (B, n, L) each
        pairs = ((self._new_A(), A), (B_new.to(B.dtype), B), (C_new.to(C.dtype), C))
        return tuple(torch.cat(self._ordered(*p), dim=1) for p in pairs)

    def _new_A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def _ordered(self, new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new state dimensions' part and the pretrained one in the extended state's order."""
        return (new, old) if self.prefix else (old, new)

    def reads_as_projection(self) -> bool:
        """Whether :meth:`extend_projection` stands for this module's call (this class's forward, nothing
        hooked, its x_proj's weight standing for its call), so a fused kernel may take the extended
        weights instead (``models/mamba.py: extends_projection``)."""
        return plain(self, AdditionalScan) and read_as_linear(self.x_proj)

    def extend_projection(self, x_proj_weight: torch.Tensor, A: torch.Tensor, dt_rank: int, a_log: bool = False):
        """What :meth:`forward` computes, as the weights a fused kernel reads: the mixer's x_proj weight
        (dt_rank + 2N, D_inner) with this module's B and C rows beside its own (dt_rank + 2(N+n),
        D_inner; projected once, its output splits into dt, B and C as forward's), and A (D_inner, N)
        as forward extends it (D_inner, N+n). With ``a_log``, A is the mixer's A_log and extended by this
        module's A_log (the fused function computes -exp of both: one kernel here a step, not three, and
        none in the backward, not two)."""
        dt, B, C = x_proj_weight.split([dt_rank, A.shape[1], A.shape[1]])
        B_new, C_new = self.x_proj.weight.chunk(2)
        weight = torch.cat([dt, *self._ordered(B_new, B), *self._ordered(C_new, C)])
        new = self.A_log.float() if a_log else self._new_A()
        return weight, torch.cat(self._ordered(new, A), dim=1)


@register("additional_scan", spec=AdditionalScanSpec, order=ORDER_MIXER, identity_at_init=False)
def apply(model: nn.Module, spec: AdditionalScanSpec) -> list[ParamGroup]:
    A_params, proj_params = [], []
    for index, mixer in enumerate(mamba1_mixers(model, "additional_scan")):
        if spec.layers is not None and index not in spec.layers:
            continue
        for direction in mixer.directions:
            ext = AdditionalScan(spec, mixer.d_inner, getattr(mixer, direction.A_log))
            mixer.state_extensions[direction.key] = ext
            A_params.append(ext.A_log)
            proj_params.append(ext.x_proj.weight)
    return [ParamGroup("additional_scan.A_log", A_params, spec.lr_mult, spec.A_weight_decay_mult),
            ParamGroup("additional_scan.x_proj", proj_params, spec.lr_mult, spec.weight_decay_mult)]
