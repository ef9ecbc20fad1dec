"""The mixer interface every backbone block holds (:class:`Mixer`), the Mamba-1 mixer (parameter
names and shapes as mamba_ssm's ``Mamba``) with Vim's bidirectional "v2" variant, and the pre-norm
residual block both backbones use. Mamba-2 is ``models/mamba2.py``.

PEFT methods change the mixer only through named extension points whose defaults reproduce the
base model exactly:
  * the projections (``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj``) are *called*, not read
    as raw weights, so a wrapper around them (LoRA, adapters) is never skipped;
  * ``conv1d`` is read as raw ``weight`` and ``bias`` (the causal-conv kernel and :meth:`Mamba.step`
    take the tensors), so it takes a ``parametrize`` delta (partial tuning) but a module wrapper
    or forward hook on it would be skipped;
  * the fused ``mamba_inner`` path (per direction, or ``mamba_inner_pair`` for both of Vim's directions
    at once) reads conv1d, x_proj and dt_proj raw, so it runs only where their weights stand for
    their calls: plain or parametrised (no wrapper or hook:
    :func:`read_as_written`), or a LoRA folded into the weight (:func:`read_as_linear`), any state
    extension and offset is read as below (:meth:`Mamba.uses_fused_inner`; affix tokens are steps it
    runs, their outputs cut off); out_proj it reads the same way where it can, and otherwise calls on
    its output;
  * the generation step's kernels (mamba_ssm's step: conv update in place, dt_proj's bias inside the
    state update) read ``dt_proj`` raw, so they run only where it is plain (:meth:`Mamba.uses_step_kernels`);
  * a block's residual add + RMSNorm runs in one kernel on CUDA (training and generation), reading the
    norm's weight raw: only where the norm is plain (:func:`fused_add_norm`); its drop path, a plain
    :class:`DropPath`, as a per-row scale inside it (else called);
  * ``state_extensions[direction]``: extra SSM state dimensions (additional-scan); the fused path reads
    them as x_proj's weight and A extended, only where the module stands for its call
    (:func:`extends_projection`);
  * ``affixes[direction]``: tokens prepended to the scan input in xz space (affix-tuning);
  * ``state_offsets[direction]``: a term added to the gated scan output, computed from the scan's
    C and z (state-offset tuning: ``y_t + silu(z_t) * C_t h'``), in the parallel and the step forward;
    the fused path reads its ``offset`` raw (inside our short scan: the state read as h + h'), only
    where the module stands for its call (:func:`offset_of`: nothing hooked) and the backend's fused
    function takes it for the input (``ScanBackend.takes_state_offset``);
  * parameters such as ``A_log`` may carry a ``torch.nn.utils.parametrize`` delta (partial tuning).
"""
from __future__ import annotations

import abc
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from . import cuda_graphs
from .rebuild import rebuilt_when_saved
from .scan import (
    TORCH_BACKEND,
    InnerWeights,
    ScanBackend,
    causal_conv1d_step,
    conv_state_of,
    gemm_dtype,
    linear_on_columns,
    project_channel_major,
    rms_normed_torch,
    scaled_operand,
    steps_of,
)


@dataclass(frozen=True)
class Direction:
    """Names of one scan direction's parameters (Vim's v2 mixer suffixes the backward ones)."""

    key: str
    conv1d: str
    x_proj: str
    dt_proj: str
    A_log: str
    D: str


FORWARD = Direction("fwd", "conv1d", "x_proj", "dt_proj", "A_log", "D")
BACKWARD = Direction("bwd", "conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b")


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (Vim's CustomRMSNorm / mamba_ssm's RMSNorm reference)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> same shape and dtype."""
        return rms_normed_torch(x.float(), self.weight, self.eps).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample (as timm's DropPath), active only in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def _active(self) -> bool:
        return self.p > 0.0 and self.training

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._active():
            return x
        return x * self._mask(x) / (1.0 - self.p)

    def row_scales(self, x: torch.Tensor) -> torch.Tensor | None:
        """What :meth:`forward` multiplies each row (last dimension) of x by, as one fp32 (rows,) tensor
        (the same draw: mask / (1 - p)), or None where it passes x on as it is: for a kernel that scales
        rows in its own pass (the fused residual add: ``add_and_norm``)."""
        if not self._active():
            return None
        # the mask drawn in fp32 (0 and 1 in any dtype: the same draw) and divided as it is spread over
        # the rows, in one pass: two kernels, where casting, dividing and spreading it took four
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 2), dtype=torch.float32).bernoulli_(1.0 - self.p)
        return (mask.expand(x.shape[:-1]) / (1.0 - self.p)).reshape(-1)


@dataclass
class MixerState:
    """Recurrent state of one mixer for generation: conv (B, conv channels, d_conv), the last conv
    inputs; ssm, Mamba-1: (B, D_inner, N'), Mamba-2: (B, H, P, N)."""

    conv: torch.Tensor
    ssm: torch.Tensor


class Mixer(nn.Module, abc.ABC):
    """What a backbone block, ``runtime.select_backend`` and the PEFT families use of a sequence mixer.

    ``backend`` is the set of scan kernels it runs (set for every mixer by ``select_backend``);
    ``label`` names the architecture in errors; the constructor's arguments other than
    :attr:`backbone_args` are the keys a config's ``ssm_cfg`` may set.
    """

    label: str
    backbone_args: tuple[str, ...] = ("d_model", "layer_idx", "device", "dtype")
    """Constructor arguments the backbone sets, never a config's ssm_cfg."""

    def __init__(self):
        super().__init__()
        self.backend: ScanBackend = TORCH_BACKEND
        # the fused path's forward keeps what its backward would recompute (memory for speed:
        # scan.mamba_inner_cuda's keep_activations); set with the backend by select_backend
        self.keep_activations = False

    @classmethod
    def ssm_cfg_keys(cls) -> set[str]:
        return set(inspect.signature(cls).parameters) - set(cls.backbone_args)

    def uses_fused_inner(self, xz: torch.Tensor | None = None) -> bool:
        """Whether :meth:`forward` runs one fused kernel from in_proj's output to the mixer output (for
        the input ``xz``, where given)."""
        return False

    @abc.abstractmethod
    def forward(self, hidden_states: torch.Tensor, state: MixerState | None = None) -> torch.Tensor:
        """hidden_states: (B, L, D_model) -> (B, L, D_model); fills ``state`` (generation prefill) when given."""

    @abc.abstractmethod
    def empty_state(self, batch: int, device=None) -> MixerState:
        """The state before the first token (zeros)."""

    @abc.abstractmethod
    def step(self, hidden_states: torch.Tensor, state: MixerState) -> torch.Tensor:
        """One token: hidden_states (B, 1, D_model) -> (B, 1, D_model); advances ``state``."""


class Mamba(Mixer):
    """Mamba-1 selective-SSM mixer.

    bidirectional=False is mamba_ssm's ``Mamba``; bidirectional=True is Vim's ``bimamba_type="v2"``
    mixer: shared in_proj/out_proj, per-direction conv1d/x_proj/dt_proj/A_log/D (``_b`` suffix for
    the backward scan), output ``out_proj((y_fwd + flip(y_bwd)) / 2)`` (``/2`` when divide_out).
    """

    label = "Mamba-1"
    # the bidirectional variant is Vim's choice (models/vim.py), not a language config's
    backbone_args = Mixer.backbone_args + ("bidirectional", "divide_out")

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, conv_bias: bool = True,
                 bias: bool = False, bidirectional: bool = False, divide_out: bool = True,
                 layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bidirectional, self.divide_out, self.layer_idx = bidirectional, divide_out, layer_idx
        self._frozen: dict[str, tuple[tuple, torch.Tensor]] = {}  # frozen_function_of's values, by parameter name

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        for direction in self.directions:
            self._init_direction(direction, conv_bias, dt_min, dt_max, dt_init_floor, dt_scale, factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.state_extensions = nn.ModuleDict()
        self.affixes = nn.ModuleDict()
        self.state_offsets = nn.ModuleDict()

    @property
    def directions(self) -> tuple[Direction, ...]:
        return (FORWARD, BACKWARD) if self.bidirectional else (FORWARD,)

    def _init_direction(self, d: Direction, conv_bias, dt_min, dt_max, dt_init_floor, dt_scale, factory):
        """Create one direction's parameters with mamba_ssm's initialisation."""
        conv = nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner,
                         padding=self.d_conv - 1, bias=conv_bias, **factory)
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        dt_std = self.dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(dt_proj.weight, -dt_std, dt_std)
        dt = torch.exp(torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():  # inverse softplus, so softplus(bias) == dt at init
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=factory["device"])
        A_log = nn.Parameter(torch.log(A).repeat(self.d_inner, 1))  # (d_inner, d_state)
        A_log._no_weight_decay = True
        D = nn.Parameter(torch.ones(self.d_inner, device=factory["device"]))
        D._no_weight_decay = True
        for name, module in ((d.conv1d, conv), (d.x_proj, x_proj), (d.dt_proj, dt_proj)):
            self.add_module(name, module)
        self.register_parameter(d.A_log, A_log)
        self.register_parameter(d.D, D)

    # -- one direction of the SSM ------------------------------------------------------------
    def _state_matrix(self, d: Direction) -> torch.Tensor:
        """A = -exp(A_log) (D_inner, N) in fp32, read through any parametrisation of A_log; computed once
        while A_log is a plain parameter no gradient is asked of (frozen under PEFT) and unchanged
        (:func:`frozen_function_of`): two kernels per direction and forward less (96 of an eager Vim-S
        step's ~1,460 launches; a CUDA graph reads it kept, refreshed before each replay)."""
        A_log = getattr(self, d.A_log)
        if parametrize.is_parametrized(self, d.A_log):
            return _state_matrix_of(A_log)
        return frozen_function_of(self._frozen, d.A_log, A_log, _state_matrix_of)

    def _merged(self, summed: torch.Tensor) -> torch.Tensor:
        """The two directions' outputs (the backward one back in time order) summed: averaged when divide_out."""
        return summed / 2 if self.divide_out else summed

    def _ssm_inputs(self, x: torch.Tensor, d: Direction, dt_bias: bool = True):
        """x: (B, D_inner, L) after conv. Returns delta (B, D_inner, L), A (D_inner, N'), B, C (B, N', L).
        Without ``dt_bias`` delta leaves out dt_proj's bias (a plain dt_proj's: the step kernel adds it)."""
        x_dbl = getattr(self, d.x_proj)(x.transpose(1, 2))  # (B, L, dt_rank + 2N); no copy when x is channel-major
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_proj = getattr(self, d.dt_proj)
        delta = (linear_channel_major(dt_proj, dt) if dt_bias
                 else F.linear(dt, dt_proj.weight).transpose(1, 2))  # (B, D_inner, L)
        A = self._state_matrix(d)
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # (B, N, L)
        if d.key in self.state_extensions:
            A, B, C = self.state_extensions[d.key](x, A, B, C)
        return delta, A, B, C

    def _scan_direction(self, xz: torch.Tensor, d: Direction, state: MixerState | None = None):
        """xz: (B, 2*D_inner, L) in this direction's time order -> y: (B, D_inner, L)."""
        n_affix = 0
        if d.key in self.affixes:
            tokens = self._affix_tokens(d, xz)
            n_affix = tokens.shape[-1]
            xz = torch.cat([tokens, xz], dim=2)
        x, z = xz.chunk(2, dim=1)  # (B, D_inner, L')
        conv = getattr(self, d.conv1d)
        x_conv = self.backend.causal_conv1d(x, conv.weight.squeeze(1), conv.bias, "silu")
        delta, A, B, C = self._ssm_inputs(x_conv, d)
        result = self.backend.selective_scan(x_conv, delta, A, B, C, getattr(self, d.D).float(), z,
                                             delta_softplus=True, return_last_state=state is not None)
        if state is not None:
            y, last = result
            state.ssm = last.float()
            state.conv = conv_state_of(x, self.d_conv)
        else:
            y = result
        if d.key in self.state_offsets:
            y = y + self.state_offsets[d.key](C, z).to(y.dtype)
        return steps_of(y, -1, n_affix, y.shape[-1] - n_affix)  # xz's steps

    def _affix_tokens(self, d: Direction, xz: torch.Tensor) -> torch.Tensor:
        """Direction ``d``'s affix tokens as xz-space steps (B, 2*D_inner, n) in xz's batch and dtype."""
        return self.affixes[d.key]().t().unsqueeze(0).expand(xz.shape[0], -1, -1).to(xz.dtype)

    def _affixed(self, xz: torch.Tensor, directions: tuple[Direction, ...]) -> tuple[torch.Tensor, int]:
        """xz with the affix tokens of ``directions`` added as steps, each direction's ahead of xz in its
        own time order (the forward's before xz's first step, the backward's after its last, flipped),
        stored channel-major (:func:`cat_steps`); and the step where xz's own start. A direction's steps
        past xz's come after every step of xz in its order: they change none of xz's outputs there, so
        both directions can scan one xz with both directions' tokens."""
        ahead = [self._affix_tokens(d, xz) for d in directions if d is not BACKWARD and d.key in self.affixes]
        behind = [self._affix_tokens(d, xz).flip(-1) for d in directions if d is BACKWARD and d.key in self.affixes]
        if not (ahead or behind):
            return xz, 0
        return cat_steps(*ahead, xz, *behind), sum(t.shape[-1] for t in ahead)

    def uses_fused_inner(self, xz: torch.Tensor | None = None) -> bool:
        """Whether :meth:`forward` runs the backend's fused ``mamba_inner``, once per direction, or its
        ``mamba_inner_pair`` for both (the kernels read conv1d's, x_proj's and dt_proj's weights
        directly: only where no method changes anything between in_proj and out_proj but through those
        weights or a state extension or offset it reads, so no adapter, hook or parametrisation can be
        skipped by it; out_proj is called where its weight does not stand for its call). Affix tokens
        are steps of xz: they run through it too. ``xz``: the input, where known (a state offset fuses
        for the inputs the backend's function takes it for: ``ScanBackend.takes_state_offset``)."""
        return (self.backend.mamba_inner is not None and self._offsets_fuse(xz)
                and all(extends_projection(m) for m in self.state_extensions.values())
                and all(read_as_written(getattr(self, d.conv1d), nn.Conv1d) and read_as_linear(getattr(self, d.x_proj))
                        and read_as_linear(getattr(self, d.dt_proj)) for d in self.directions))

    def _offsets_fuse(self, xz: torch.Tensor | None) -> bool:
        """No state offset, or every one read raw by the fused function (:func:`offset_of`) where the
        backend's takes one (for ``xz``, where given)."""
        if not self.state_offsets:
            return True
        takes = self.backend.takes_state_offset
        return (takes is not None and all(offset_of(m) is not None for m in self.state_offsets.values())
                and (xz is None or all(takes(xz, self._scan_states(d)) for d in self.directions
                                       if d.key in self.state_offsets)))

    def _scan_states(self, d: Direction) -> int:
        """The states direction ``d`` scans: d_state, plus any state extension's."""
        return self.d_state + (self.state_extensions[d.key].n_extra if d.key in self.state_extensions else 0)

    def _fused_direction(self, xz: torch.Tensor, d: Direction, project: bool,
                         out_bias: torch.Tensor | None) -> torch.Tensor:
        """The backend's ``mamba_inner`` on xz (B, 2*D_inner, L) with this direction's weights, in xz's
        time order (the backward direction runs from the last step to the first: ``reverse``, in the
        kernels where they can, with no flip): with ``project``, through out_proj's weight (bias
        ``out_bias``) -> (B, L, D_model); else the gated scan output (B, D_inner, L) (out_bias None).
        Affix tokens go first in the direction's time order (:meth:`_affixed`), their outputs cut off."""
        length = xz.shape[-1]
        xz, first = self._affixed(xz, (d,))
        out = self._inner_weights(d).run(self.backend.mamba_inner, xz, self.out_proj.weight if project else None,
                                         out_bias, keep_activations=self.keep_activations)
        return steps_of(out, 1 if project else -1, first, length)  # xz's steps

    def _inner_weights(self, d: Direction) -> InnerWeights:
        """Direction ``d``'s weights as the fused functions read them: x_proj's weight and A extended by a
        state extension's, a state offset read raw (:func:`offset_of`), a trained plain A_log read raw
        (the fused function computes -exp(A_log): in our short scan's kernels, not two kernels here and
        two in the backward a direction and layer), as is the extended one where the extension's or the
        mixer's A_log trains."""
        conv, dt_proj = getattr(self, d.conv1d), getattr(self, d.dt_proj)
        x_proj_weight, A_log = getattr(self, d.x_proj).weight, getattr(self, d.A_log)
        extension = self.state_extensions[d.key] if d.key in self.state_extensions else None
        trained = A_log.requires_grad or (extension is not None and extension.A_log.requires_grad)
        a_log = torch.is_grad_enabled() and trained and not parametrize.is_parametrized(self, d.A_log)
        A = A_log if a_log else self._state_matrix(d)
        if extension is not None:
            x_proj_weight, A = extension.extend_projection(x_proj_weight, A, self.dt_rank, a_log)
        offset = offset_of(self.state_offsets[d.key]) if d.key in self.state_offsets else None
        return InnerWeights(conv.weight, conv.bias, x_proj_weight, dt_proj.weight, dt_proj.bias, A, getattr(self, d.D),
                            d is BACKWARD, offset, a_log)

    def _frozen_out_operand(self, scale: float, dtype: torch.dtype) -> torch.Tensor | None:
        """out_proj's weight times ``scale`` in ``dtype``, as :func:`project_channel_major` reads it, kept
        across steps while the weight is frozen (:func:`frozen_function_of`: one kernel a layer and step
        less), else None (the projection makes it)."""
        weight = self.out_proj.weight
        if weight.requires_grad:
            return None
        return frozen_function_of(self._frozen, f"out_proj.weight*{scale}:{dtype}", weight,
                                  lambda w: scaled_operand(w, scale, dtype))

    def _fused_directions_summed(self, xz: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Both directions' gated scan outputs on xz, summed, and the step where xz's own start in it:
        the backend's ``mamba_inner_pair`` where it has one, on xz with both directions' affix tokens
        (:meth:`_affixed`: (B, D_inner, L + affix steps), one copy of xz where each direction made its
        own, one call), else its ``mamba_inner`` per direction, each cut to xz's steps (B, D_inner, L)."""
        if self.backend.mamba_inner_pair is not None:
            xz, first = self._affixed(xz, (FORWARD, BACKWARD))
            return self.backend.mamba_inner_pair(xz, *(self._inner_weights(d) for d in (FORWARD, BACKWARD)),
                                                 keep_activations=self.keep_activations), first
        forward, backward = (self._fused_direction(xz, d, False, None) for d in (FORWARD, BACKWARD))
        return forward + backward, 0

    def forward(self, hidden_states: torch.Tensor, state: MixerState | None = None) -> torch.Tensor:
        """hidden_states: (B, L, D_model) -> (B, L, D_model).

        When ``state`` is given (unidirectional only), it is filled with the final recurrent state,
        so :meth:`step` can continue the sequence (generation prefill).
        """
        xz = linear_channel_major(self.in_proj, hidden_states)  # (B, 2*D_inner, L), channel-major
        if state is None and self.uses_fused_inner(xz):
            # out_proj's weight read where it stands for its call: inside the fused function, or for
            # both directions at once on their sum (one projection, and one GEMM back, instead of one
            # per direction: out_proj is linear); else called (its wrapper, dropout included, runs) on
            # the directions merged, as the chain below calls it
            project = read_as_linear(self.out_proj)
            if not self.bidirectional:
                out = self._fused_direction(xz, FORWARD, project, self.out_proj.bias if project else None)
                return out if project else call_channel_major(self.out_proj, out)
            summed, first = self._fused_directions_summed(xz)
            scale = 0.5 if self.divide_out else 1.0  # the directions averaged (exact: a power of two)
            if project:
                out = project_channel_major(summed, self.out_proj.weight, self.out_proj.bias, scale,
                                            self._frozen_out_operand(scale, gemm_dtype(summed)))
            else:
                out = call_channel_major(self.out_proj, summed, scale)
            # affix steps cut after out_proj (per token): the sum stays channel-major, as out_proj reads it
            return steps_of(out, 1, first, xz.shape[-1])
        y = self._scan_direction(xz, FORWARD, state)
        if self.bidirectional:
            if state is not None:
                raise ValueError("Recurrent state is only defined for unidirectional mixers.")
            y_b = self._scan_direction(xz.flip(-1), BACKWARD).flip(-1)
            y = self._merged(y + y_b)
        return self.out_proj(y.transpose(1, 2))

    def empty_state(self, batch: int, device=None) -> MixerState:
        return MixerState(conv=torch.zeros(batch, self.d_inner, self.d_conv, device=device),
                          ssm=torch.zeros(batch, self.d_inner, self._scan_states(FORWARD), device=device))

    def uses_step_kernels(self) -> bool:
        """Whether :meth:`step` runs the backend's step kernels as mamba_ssm's step does: dt_proj's
        bias added inside the state update (read raw: only where dt_proj is plain, so a wrapper or
        parametrisation on it is never skipped). The conv step is the backend's on every path."""
        return self.backend.conv_update is not None and plain(self.dt_proj, nn.Linear)

    def step(self, hidden_states: torch.Tensor, state: MixerState) -> torch.Tensor:
        """One token: hidden_states (B, 1, D_model) -> (B, 1, D_model); updates ``state``."""
        if self.bidirectional:
            raise ValueError("Step mode is only defined for unidirectional (language) mixers.")
        xz = self.in_proj(hidden_states.squeeze(1))  # (B, 2*D_inner)
        x, z = xz.chunk(2, dim=-1)
        x_conv = conv_step(self.conv1d, x, state, self.backend)  # the conv weight is read raw on every path
        kernels = self.uses_step_kernels()
        delta, A, B, C = self._ssm_inputs(x_conv.unsqueeze(-1), FORWARD, dt_bias=not kernels)
        D, delta_bias = (self.D, self.dt_proj.bias) if kernels else (self.D.float(), None)
        y = self.backend.state_step(state.ssm, x_conv, delta[..., 0], A, B[..., 0], C[..., 0], D, z,
                                    delta_bias=delta_bias, delta_softplus=True)
        if FORWARD.key in self.state_offsets:
            y = y + self.state_offsets[FORWARD.key](C[..., 0], z).to(y.dtype)
        return self.out_proj(y).unsqueeze(1)


def _state_matrix_of(A_log: torch.Tensor) -> torch.Tensor:
    return -torch.exp(A_log.float())


def frozen_function_of(cache: dict, name: str, parameter: torch.Tensor,
                       function: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``function(parameter)``, kept in ``cache[name]`` and reused while no gradient is asked of
    ``parameter`` and it is the same tensor, unchanged: same storage and version counter (an optimizer
    step, ``load_state_dict`` or any in-place write bumps it; ``.to()`` makes a new storage). Computed
    afresh, and not kept, where the gradient is asked for and in inference mode (its tensors cannot be
    saved for a later backward). A CUDA graph being captured reads the value kept before the capture,
    refreshed before each replay (``cuda_graphs.GraphRead``: a replay reads ``parameter`` as it is
    then); one not kept yet, or a capture not recording its reads, computes it in the graph."""
    if (torch.is_grad_enabled() and parameter.requires_grad) or torch.is_inference_mode_enabled():
        return function(parameter)
    key = (*cuda_graphs.storage_version(parameter), parameter.device, parameter.dtype, parameter.shape)
    kept = cache.get(name)
    if cuda_graphs.is_capturing(parameter):
        if kept is not None and kept[0] == key and cuda_graphs.read_in_graph(parameter, function, kept[1]):
            return kept[1]
        return function(parameter)  # kept during the capture, it would be written by replays only
    if kept is None or kept[0] != key:
        with torch.no_grad():
            kept = cache[name] = (key, function(parameter))
    return kept[1]


def extends_projection(module: nn.Module) -> bool:
    """Whether a fused kernel may read a ``state_extensions`` entry as x_proj's weight and A extended
    (its ``extend_projection``) in place of calling it: where its ``reads_as_projection()`` says that
    stands for its call (additional-scan, nothing hooked: ``peft/additional_scan.py``)."""
    return _answers_yes(module, "reads_as_projection")


def offset_of(module: nn.Module) -> torch.Tensor | None:
    """The state offset h' (D_inner, N) a fused kernel may read in place of calling ``module`` (a
    ``state_offsets`` entry): its ``offset`` where its ``reads_as_offset()`` says that stands for its
    call (nothing hooked on it: ``peft/state_offset.py``), else None."""
    return module.offset if _answers_yes(module, "reads_as_offset") else None


def _answers_yes(module: nn.Module, question: str) -> bool:
    """Whether ``module`` has a method ``question`` (a ``reads_as_*`` check: what a kernel may read in
    place of calling it) and it returns True."""
    ask = getattr(module, question, None)
    return callable(ask) and ask()


def unhooked(module: nn.Module) -> bool:
    """Without forward hooks: reading its parameters directly skips nothing its call would run."""
    return not module._forward_hooks and not module._forward_pre_hooks


def plain(module: nn.Module, kind: type) -> bool:
    """Exactly ``kind`` (a wrapper or parametrisation changes the type) and without forward hooks."""
    return type(module) is kind and unhooked(module)


def read_as_written(module: nn.Module, kind: type) -> bool:
    """``kind``, or the class ``torch.nn.utils.parametrize`` makes of it (its forward ``kind``'s, reading
    the parameters through their parametrisations, as a kernel reading ``module.weight`` does), without
    forward hooks: its parameters, read, stand for its call (partial tuning's deltas: peft/partial.py)."""
    cls = type(module)
    return unhooked(module) and (cls is kind or (parametrize.is_parametrized(module) and cls.__bases__ == (kind,)
                                                 and cls.forward is kind.forward))


def read_as_linear(module: nn.Module) -> bool:
    """Whether a fused kernel may read ``module.weight`` and ``module.bias`` instead of calling it: an
    ``nn.Linear`` (parametrised or not: :func:`read_as_written`), or a module whose ``reads_as_linear()``
    says its weight stands for its call (LoRA with every update folded into the weight: merged style,
    DoRA). Its weight is then a function of the adapter's parameters, so the kernel's weight gradient
    reaches them through autograd."""
    return read_as_written(module, nn.Linear) or _answers_yes(module, "reads_as_linear")


def linear_channel_major(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear`` on x (B, L, in) -> (B, out, L) stored channel-major, as (out, B, L): mamba_ssm's own
    layout. L is contiguous, as the kernels want, and the (B, L, channels) views the next projection
    takes fold into its GEMM as a transposed operand: without it the mixer copied (B, D_inner, L)-sized
    tensors about nine times per layer (prefill of mamba-1.4b at batch 64: a third of the GPU time).
    A plain ``nn.Linear`` computes it directly (weight @ x^T), a module with a ``channel_major(x)``
    method (LoRA's: (..., in) -> (out, N), or None where it cannot stand in for the call) through it;
    any other module (a wrapper, hook or parametrisation, so that none is skipped) is called and its
    output copied once into the layout."""
    batch, length = x.shape[:2]
    if plain(linear, nn.Linear):
        rows = x.reshape(batch * length, x.shape[-1]).t()  # (in, B*L)
        out = linear_on_columns(linear.weight, linear.bias, rows)
    else:
        direct = getattr(linear, "channel_major", None)
        out = direct(x) if callable(direct) else None
        if out is None:
            out = linear(x).flatten(0, 1).t().contiguous()
    return out.unflatten(1, (batch, length)).transpose(0, 1)


def call_channel_major(module: nn.Module, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``module`` on (y * scale).transpose(1, 2), y (B, in, L) stored channel-major (the fused mixer
    function's output) -> (B, L, out): through the module's ``from_channel_major(y, scale)`` where that
    stands in for its call (LoRA's: one node reading y's columns; None where it cannot), else the module
    called on the transposed view (its wrappers and hooks run)."""
    direct = getattr(module, "from_channel_major", None)
    out = direct(y, scale) if callable(direct) else None
    return out if out is not None else module((y * scale if scale != 1 else y).transpose(1, 2))


def cat_steps(*parts: torch.Tensor) -> torch.Tensor:
    """(B, C, L1), (B, C, L2), ... -> (B, C, L1 + L2 + ...) along time, stored channel-major as
    :func:`linear_channel_major`'s output: what the fused function reads uncopied. (torch.cat's output
    is batch-major: the fused function then copied each direction's (B*L, D_inner) sequences and ran
    its GEMMs on a slower path, ~6 ms of a Vim-S affix step, one H200.)"""
    return _CatSteps.apply(*parts)


class _CatSteps(torch.autograd.Function):
    """:func:`cat_steps` as one copy a part into its steps of one new tensor: torch.cat's kernel took 48 us
    for a Vim-S block's xz and one affix step (19 MB: 0.8 TB/s, one H200); its backward, views of the
    gradient as cat's."""

    @staticmethod
    def forward(ctx, *parts):
        ctx.lengths = [part.shape[-1] for part in parts]
        batch, channels = parts[0].shape[:2]
        dtype = functools.reduce(torch.promote_types, (part.dtype for part in parts))
        out = torch.empty(channels, batch, sum(ctx.lengths), dtype=dtype, device=parts[0].device).transpose(0, 1)
        for part, steps in zip(parts, out.split(ctx.lengths, dim=-1)):
            steps.copy_(part)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad.split(ctx.lengths, dim=-1)


def conv_step(conv: nn.Conv1d, x: torch.Tensor, state: MixerState, backend: ScanBackend) -> torch.Tensor:
    """One step of the depthwise causal ``conv`` (its weight and bias read raw): x (B, C) -> (B, C),
    advancing ``state.conv``; in place by the backend's ``conv_update`` where it has one, else the
    PyTorch step, which hands back a new state tensor."""
    weight, bias = conv.weight.squeeze(1), conv.bias
    if backend.conv_update is not None:
        return backend.conv_update(x, state.conv, weight, bias)
    out, state.conv = causal_conv1d_step(x, state.conv, weight, bias)
    return out


def fused_add_norm(norm: nn.Module, backend: ScanBackend) -> Callable | None:
    """The backend's fused residual add + RMSNorm where it can stand in for ``norm`` (it reads the
    weight raw: a plain :class:`RMSNorm` only, so a wrapped or parametrised norm is never skipped), else None. Called as
    ``(hidden, residual, weight, eps, residual_in_fp32, rowscale=None) -> (normed, residual, rebuild of normed
    or None)``."""
    return backend.add_rms_norm if backend.add_rms_norm is not None and plain(norm, RMSNorm) else None


def add_and_norm(norm: nn.Module, backend: ScanBackend, hidden, residual, residual_in_fp32: bool = True,
                 drop_path: nn.Module | None = None):
    """residual <- residual + drop_path(hidden) (hidden alone when residual is None); returns
    (norm(residual), residual, rebuild), the residual in fp32 when ``residual_in_fp32``. In the backend's
    fused kernel where it can stand in for ``norm`` (:func:`fused_add_norm`), with a zero-argument ``rebuild``
    giving the normalised tensor again bit for bit from what the norm's backward keeps (None where it
    would not pay), else ``norm`` called on the residual in its weight's dtype (mamba_ssm's
    ``fused_add_norm=False``) and no rebuild. A plain :class:`DropPath` runs inside the fused kernel, as
    a scale of hidden's rows (``DropPath.row_scales``: the same mask, applied in fp32; four elementwise
    passes over the block's input a layer, forward and backward, less); any other module is called."""
    fused = fused_add_norm(norm, backend)
    rowscale = None
    if drop_path is not None and residual is not None:
        if fused is not None and plain(drop_path, DropPath):
            rowscale = drop_path.row_scales(hidden)
        else:
            hidden = drop_path(hidden)
    if fused is not None:
        return fused(hidden, residual, norm.weight, norm.eps, residual_in_fp32, rowscale)
    residual = hidden if residual is None else residual + hidden
    normed = norm(residual.to(norm.weight.dtype))
    return normed, residual.float() if residual_in_fp32 else residual, None


class Block(nn.Module):
    """Pre-norm residual block of Vim and mamba_ssm.

    residual <- residual + drop_path(hidden); hidden <- mixer(norm(residual)); the residual stream
    is kept in fp32 when residual_in_fp32. Vim applies each block's drop-path to the *incoming*
    previous-layer output. On a backend with ``add_rms_norm`` (CUDA) the add and norm run in one kernel
    with its own backward, the drop path too (:func:`add_and_norm`), mamba_ssm's ``fused_add_norm=True``:
    the norm of the fp32 residual. That is
    ``fused_add_norm=False``'s result (the PyTorch path here) wherever the norm's weight is fp32, as in
    training; a bf16 model (generation) normalises the fp32 residual instead of its bf16 rounding.
    """

    def __init__(self, d_model: int, mixer: Mixer, norm_eps: float = 1e-5, drop_path: float = 0.0,
                 residual_in_fp32: bool = True, device=None, dtype=None):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(d_model, eps=norm_eps, device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path)
        self.residual_in_fp32 = residual_in_fp32

    def _add_and_norm(self, hidden, residual):
        return add_and_norm(self.norm, self.mixer.backend, hidden, residual, self.residual_in_fp32, self.drop_path)

    def forward(self, hidden, residual=None, state: MixerState | None = None):
        """hidden, residual: (B, L, D) -> (mixer output, residual). What the mixer saves of its input
        for the backward (LoRA's down-projection on in_proj does) is rebuilt there from the norm's
        own saved tensors where the add and norm fuse (``models/rebuild.py``), not kept twice."""
        normed, residual, rebuild = self._add_and_norm(hidden, residual)
        with rebuilt_when_saved(normed, rebuild):
            return self.mixer(normed, state=state), residual

    def step(self, hidden, residual, state: MixerState):
        """hidden, residual: (B, 1, D) -> (mixer output, residual) for one generated token."""
        normed, residual, _ = self._add_and_norm(hidden, residual)
        return self.mixer.step(normed, state), residual
