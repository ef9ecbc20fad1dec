"""Mamba-2 mixer, as mamba_ssm 2.x's ``Mamba2`` defines it (its parameter names, so the official
state-spaces/mamba2-* and transformers' Mamba2ForCausalLM checkpoints load without renaming).

in_proj -> [z | x | B | C | dt]; a depthwise causal conv over xBC = [x | B | C]; the SSD scan with
one scalar decay per head (``A_log``, ``D``, ``dt_bias``: (H,)) and ``ngroups`` groups of B and C
shared by the heads; a gated RMSNorm ``norm(y, z)``; out_proj.

Extension points for PEFT are those of every mixer (``models/mamba.py``): the projections are
called (LoRA, (IA)3 wrap them), ``conv1d``, ``A_log``, ``D`` and ``dt_bias`` are read as raw tensors
(partial tuning's parametrisations apply). The fused path (the backend's ``split_conv1d_scan``,
mamba_ssm's ``mamba_split_conv1d_scan_combined`` on CUDA) reads conv1d, norm and out_proj raw, so it
runs only where their weights stand for their calls: plain or parametrised, or a LoRA folded into
out_proj's weight (:meth:`Mamba2.uses_fused_inner`). Mamba-1's ``state_extensions`` and
``affixes`` do not exist here; the families that use them refuse Mamba-2 models.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .dt_init import DEFAULT_DT_INIT, initial_dt, inverse_softplus
from .mamba import Mixer, MixerState, conv_step, read_as_linear, read_as_written
from .scan import (
    NO_DT_LIMIT,
    chunk_scan_step,
    conv_state_of,
    gated_rms_norm,
)


class RMSNormGated(nn.Module):
    """mamba_ssm's gated RMSNorm (``rms_norm_ref``), fp32 compute: per group of ``group_size``
    channels, norm(x * silu(z)) (``norm_before_gate=False``, Mamba2's) or norm(x) * silu(z)."""

    def __init__(self, dim: int, eps: float = 1e-5, norm_before_gate: bool = False, group_size: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.eps, self.norm_before_gate, self.group_size = eps, norm_before_gate, group_size or dim
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: (..., dim) -> (..., dim) in x's dtype."""
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)


class Mamba2(Mixer):
    """Mamba-2 (SSD) mixer; the arguments are mamba_ssm's ``Mamba2`` arguments it implements
    (not its gated-MLP ``d_ssm``, per-channel ``D_has_hdim``, ungated ``rmsnorm=False`` or the
    tensor-parallel ones), plus ours: ``dt_init``, the strategy of the initial dt per head
    (``models/dt_init.py``; the default, ``uniform``, is upstream's draw).

    Sizes: D_inner = expand * d_model, H = D_inner / headdim heads of P = headdim channels, G =
    ngroups, N = d_state; xBC has D_inner + 2 G N channels.
    """

    label = "Mamba-2"

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: float | None = None,
                 expand: int = 2, headdim: int = 64, ngroups: int = 1, A_init_range: tuple[float, float] = (1, 16),
                 norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_limit: tuple[float, float] = NO_DT_LIMIT, bias: bool = False,
                 conv_bias: bool = True, chunk_size: int = 256, dt_init: str = DEFAULT_DT_INIT,
                 layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"Mamba2: expand * d_model = {self.d_inner} is not a multiple of headdim {headdim}; "
                             "set ssm_cfg.headdim to a divisor of it")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2: {self.nheads} heads do not split into ngroups={ngroups} groups; "
                             "set ssm_cfg.ngroups to a divisor of the head count")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"Mamba2: A_init_range {A_init_range} must be 0 < low <= high")
        self.dt_limit, self.chunk_size, self.layer_idx = tuple(dt_limit), chunk_size, layer_idx
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        dt = initial_dt(dt_init, self.nheads, dt_min, dt_max, dt_init_floor, **factory)  # (H,)
        self.dt_bias = nn.Parameter(inverse_softplus(dt))  # softplus(dt_bias) == dt
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))  # (H,)
        self.D = nn.Parameter(torch.ones(self.nheads, device=device))  # (H,)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=norm_before_gate,
                                 group_size=self.d_inner // ngroups, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _split(self, zxbcdt: torch.Tensor):
        """(..., in_proj out) -> z (..., D_inner), xBC (..., conv_dim), dt (..., H)."""
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _heads(self, xBC: torch.Tensor):
        """xBC (..., conv_dim) after the conv -> x (..., H, P), B and C (..., G, N)."""
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        return (x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (self.ngroups, self.d_state)),
                C.unflatten(-1, (self.ngroups, self.d_state)))

    def uses_fused_inner(self, xz: torch.Tensor | None = None) -> bool:
        """Whether :meth:`forward` runs the backend's fused ``split_conv1d_scan`` (for any input). The kernel reads
        conv1d, the gated norm and out_proj as raw weights, so only where those modules are plain or
        parametrised (no wrapper or hook, which it would skip: :func:`read_as_written`; out_proj may be
        a LoRA folded into its weight, :func:`read_as_linear`); A_log, D and dt_bias are read
        through their attributes, so a parametrised delta on them is kept. causal-conv1d's kernel
        wants the conv channels in multiples of 8."""
        return (self.backend.split_conv1d_scan is not None and self.conv_dim % 8 == 0
                and read_as_written(self.conv1d, nn.Conv1d) and read_as_written(self.norm, RMSNormGated)
                and read_as_linear(self.out_proj))

    def forward(self, hidden_states: torch.Tensor, state: MixerState | None = None) -> torch.Tensor:
        """hidden_states: (B, L, D_model) -> (B, L, D_model).

        When ``state`` is given, it is filled with the final conv inputs and SSM state, so
        :meth:`step` can continue the sequence (generation prefill; the unfused chain, which returns them).
        """
        zxbcdt = self.in_proj(hidden_states)
        if state is None and self.uses_fused_inner():
            return self.backend.split_conv1d_scan(
                zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, -torch.exp(self.A_log.float()),
                self.D, self.chunk_size, self.dt_limit, self.norm.weight, self.norm.eps, self.out_proj.weight,
                self.out_proj.bias, self.headdim, self.ngroups, self.norm.norm_before_gate)
        z, xBC, dt = self._split(zxbcdt)  # (B, L, D_inner), (B, L, conv_dim), (B, L, H)
        # (B, conv_dim, L) with L contiguous: causal-conv1d's channel-last path would need in_proj's
        # width (D_inner + conv_dim + H) to be a multiple of 8, which it need not be
        xBC = xBC.transpose(1, 2).contiguous()
        if state is not None:
            state.conv = conv_state_of(xBC, self.d_conv)
        xBC = self.backend.causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        x, B, C = self._heads(xBC.transpose(1, 2))  # (B, L, H, P), (B, L, G, N), (B, L, G, N)
        result = self.backend.chunk_scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.chunk_size, D=self.D,
                                         dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
                                         return_final_states=state is not None)
        if state is not None:
            y, last = result
            state.ssm = last.float()  # (B, H, P, N)
        else:
            y = result
        return self.out_proj(self.norm(y.flatten(2), z))  # y: (B, L, D_inner)

    def empty_state(self, batch: int, device=None) -> MixerState:
        return MixerState(conv=torch.zeros(batch, self.conv_dim, self.d_conv, device=device),
                          ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device))

    def step(self, hidden_states: torch.Tensor, state: MixerState) -> torch.Tensor:
        """One token: hidden_states (B, 1, D_model) -> (B, 1, D_model); updates ``state``."""
        z, xBC, dt = self._split(self.in_proj(hidden_states.squeeze(1)))  # (B, D_inner), (B, conv_dim), (B, H)
        xBC = conv_step(self.conv1d, xBC, state, self.backend)  # the conv weight is read raw on every path
        x, B, C = self._heads(xBC)  # (B, H, P), (B, G, N), (B, G, N)
        y = chunk_scan_step(state.ssm, x, dt, -torch.exp(self.A_log.float()), B, C, D=self.D, dt_bias=self.dt_bias,
                            dt_softplus=True, dt_limit=self.dt_limit)
        return self.out_proj(self.norm(y.flatten(1), z)).unsqueeze(1)
