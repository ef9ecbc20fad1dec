"""Selective-scan and causal-conv1d backends.

This is the only module that imports the optional CUDA kernels (``mamba_ssm``, ``causal_conv1d``).
It exports an exact pure-PyTorch implementation and a CUDA wrapper with the same signatures, and
one function, :func:`resolve_backend`, that picks between them for every caller.

Shapes of the Mamba-1 selective scan follow mamba_ssm's ``selective_scan_fn``:
    u, delta, z: (B, D, L)    A: (D, N)    B, C: (B, N, L)    D, delta_bias: (D,)
    out: (B, D, L)            last_state: (B, D, N)
and those of Mamba-2's chunked scan (SSD) its ``mamba_chunk_scan_combined``:
    x: (B, L, H, P)    dt: (B, L, H)    A, D, dt_bias: (H,)    B, C: (B, L, G, N)
    out: (B, L, H, P)  final_states: (B, H, P, N)
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import conv_bwd, nvrtc, scan_short
from .rebuild import checked


def _defer_mamba_ssm_package_init() -> None:
    """Let ``mamba_ssm.ops.*`` import without running ``mamba_ssm/__init__.py`` until a name of the
    package itself is used.

    That file imports mamba-ssm's model zoo and, through its generation utilities, transformers and
    scikit-learn: 6.5 s of the ~10 s every pipeline job spent importing on the GPU machine (measured,
    ``python -X importtime``), for modules this package never uses. A bare package module (the real
    spec and ``__path__``, so submodules import as usual) stands in; the first attribute that is not
    a submodule (``from mamba_ssm import MambaLMHeadModel``, as the benchmarks do) runs the real
    ``__init__`` in it, so the package behaves as if imported normally.
    """
    if "mamba_ssm" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("mamba_ssm")
    except (ImportError, ValueError):  # pragma: no cover - a broken installation: the imports below say why
        return
    if spec is None or spec.loader is None:
        return
    package = importlib.util.module_from_spec(spec)

    def run_init_on_first_use(name: str):
        del package.__getattr__  # a plain module from here on: a name __init__ does not define is absent
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = run_init_on_first_use
    sys.modules["mamba_ssm"] = package


_defer_mamba_ssm_package_init()
_IMPORT_ERRORS: dict[str, str] = {}  # why an optional kernel package did not import (setup-gpu reports it)
try:  # optional CUDA kernels; None when missing (as in mamba_ssm's own modules)
    import selective_scan_cuda as _selective_scan_kernels  # mamba_ssm's compiled scan, under its Python wrappers
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except ImportError as _error:  # pragma: no cover - depends on the machine
    _cuda_selective_scan, _selective_scan_kernels, _IMPORT_ERRORS["mamba_ssm"] = None, None, str(_error)
try:  # Triton SSD (mamba-ssm >= 2): Mamba-2's scan
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _cuda_chunk_scan
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined as _cuda_split_conv1d_scan
except ImportError as _error:  # pragma: no cover - depends on the machine
    _cuda_chunk_scan, _cuda_split_conv1d_scan, _IMPORT_ERRORS["mamba_ssm_ssd"] = None, None, str(_error)
try:  # one Triton kernel for a generation step of the selective scan (what mamba_ssm's own step runs)
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as _cuda_state_update
except ImportError as _error:  # pragma: no cover - depends on the machine
    _cuda_state_update, _IMPORT_ERRORS["mamba_ssm_state_update"] = None, str(_error)
try:  # mamba_ssm's fused residual add + LayerNorm/RMSNorm kernels (what its blocks run with fused_add_norm)
    from mamba_ssm.ops.triton.layer_norm import _layer_norm_bwd, _layer_norm_fwd
    from .norm_triton import rms_norm_backward as _rms_norm_backward
    from .norm_triton import rms_normed as _rms_normed
except ImportError as _error:  # pragma: no cover - depends on the machine
    _layer_norm_fwd = _layer_norm_bwd = _rms_norm_backward = _rms_normed = None
    _IMPORT_ERRORS["mamba_ssm_layer_norm"] = str(_error)
try:  # our Triton kernels: the conv step (causal-conv1d's causal_conv1d_update), for machines without that
    # package, and the conv forward (its causal_conv1d_fwd_function), run in place of that package's
    from .conv_step_triton import causal_conv1d_update_triton as _triton_conv_update
    from .conv_triton import causal_conv1d_fwd_function as _triton_conv_fwd
except ImportError as _error:  # pragma: no cover - depends on the machine
    _triton_conv_update, _triton_conv_fwd, _IMPORT_ERRORS["triton"] = None, None, str(_error)
try:  # causal-conv1d's own conv step, what mamba_ssm's step runs where that package is installed
    from causal_conv1d import causal_conv1d_update as _causal_conv1d_update
except ImportError as _error:  # pragma: no cover - depends on the machine
    _causal_conv1d_update, _IMPORT_ERRORS["causal_conv1d_update"] = None, str(_error)
try:
    from causal_conv1d import causal_conv1d_fn as _cuda_causal_conv1d
except ImportError as _error:  # pragma: no cover - depends on the machine
    _cuda_causal_conv1d, _IMPORT_ERRORS["causal_conv1d"] = None, str(_error)
try:  # causal-conv1d's raw forward and backward, which the conv and fused mixer functions call directly
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function as _conv_bwd_kernel
    from causal_conv1d.cpp_functions import causal_conv1d_fwd_function as _conv_fwd_kernel
except ImportError as _error:  # pragma: no cover - depends on the machine
    _conv_fwd_kernel, _conv_bwd_kernel, _IMPORT_ERRORS["causal_conv1d_cpp_functions"] = None, None, str(_error)
if _conv_fwd_kernel is not None and _triton_conv_fwd is not None:  # pragma: no cover - depends on the machine
    _conv_fwd_kernel = _triton_conv_fwd  # the same output bit for bit in about half the time (conv_triton.py)

BACKEND_ENV = "MAMBAPEFT_SCAN_BACKEND"
BACKEND_NAMES = ("auto", "torch", "cuda")


# ----------------------------------------------------------------------------------------------
# The recurrence h_t = exp(delta_t * A) h_{t-1} + b_t, step by step or vectorised in chunks
# ----------------------------------------------------------------------------------------------
# One step's block (batch x state x channels) from which the plain sequential recurrence beats the
# chunked one on a CPU. Forward + backward, 1 thread, 2-core machine (sequential vs chunked ms):
# block 24,576 (Vim-mini, L 17) 2.1 vs 5.0; 12,288 (mamba-mini, L 159) 12.4 vs 26.3; 3,072 (L 1,024)
# 30.2 vs 38.4; 1,536 (L 2,048) 41.5 vs 36.8; 768 (L 4,096) 58.5 vs 41.2.
SEQUENTIAL_MIN_BLOCK = 2048


def _chunk_length(length: int, block: int, device: torch.device) -> int:
    """Positions per chunk. The whole length on a CPU wherever a step's block holds at least
    SEQUENTIAL_MIN_BLOCK elements: one exp per element and nothing to carry, where chunks only save
    the per-op cost of L small steps (on a GPU each step is a kernel launch: chunks there). Otherwise
    ~sqrt(L), a divisor of L near it when there is one (no padding copy needed)."""
    if device.type == "cpu" and block >= SEQUENTIAL_MIN_BLOCK:
        return max(length, 1)
    root = math.isqrt(max(length, 1))
    for step in range(root, max(1, root // 2) - 1, -1):
        if length % step == 0 and length // step <= 2 * root + 1:
            return step
    return root + 1


def _chunked(x: torch.Tensor, step: int, copy: bool = False) -> torch.Tensor:
    """(L, ...) -> (chunks, step, ...), zero-padding the time axis when L is not a multiple.
    With ``copy`` the result never shares memory with ``x`` (it is updated in place)."""
    pad = -x.shape[0] % step
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    elif copy:
        x = x.clone(memory_format=torch.contiguous_format)
    return x.reshape(-1, step, *x.shape[1:])


def _decay(delta: torch.Tensor, A_t: torch.Tensor) -> torch.Tensor:
    """exp(delta (..., D) x A_t (N, D)) -> (..., N, D), computed in place after the broadcast product."""
    return torch.mul(delta.unsqueeze(-2), A_t).exp_()


def _recurrence(decay: torch.Tensor, h: torch.Tensor, delta: torch.Tensor, A_t: torch.Tensor,
                reverse: bool) -> torch.Tensor:
    """Solve, in place in ``h`` (chunks, step, B, N, D) holding the drive b:

    forward:  h_t = decay_t h_{t-1} + b_t          reverse: h_t = decay_{t+1} h_{t+1} + b_t

    One pass over the ~sqrt(L) positions of a chunk runs all chunks at once; a pass over the ~sqrt(L)
    chunks carries the state across boundaries; the carried state reaches every position through
    the decay accumulated from the chunk's edge, exp(partial sums of delta x A). A is constant in
    time, so those sums are taken on the small (L, B, D) delta. Only decays <= 1 are multiplied:
    the result is exact and cannot overflow. D is the innermost axis so every product vectorises.
    With one chunk the first pass is the whole (sequential) recurrence.
    """
    step = h.shape[1]
    positions = range(step - 2, -1, -1) if reverse else range(1, step)
    rows, decays = h.unbind(1), decay.unbind(1)  # the views made once, not per step
    for t in positions:
        neighbour = t + 1 if reverse else t - 1
        rows[t].addcmul_(decays[t + 1 if reverse else t], rows[neighbour])
    if h.shape[0] == 1:  # one chunk: the loop above was the whole recurrence
        return h
    sums = delta.cumsum(1)  # (chunks, step, B, D)
    if reverse:  # decay from position t+1 to the chunk's end
        edge = _decay(sums[:, -1:] - sums, A_t)
        chunks = range(h.shape[0] - 2, -1, -1)
    else:  # decay from the chunk's start to position t
        edge = _decay(sums, A_t)
        chunks = range(1, h.shape[0])
    carry = torch.zeros_like(h[:, 0])
    for c in chunks:
        if reverse:  # state entering chunk c from the right: decay of c+1's first step times its state
            carry[c] = decay[c + 1, 0] * (h[c + 1, 0] + edge[c + 1, 0] * carry[c + 1])
        else:
            carry[c] = torch.addcmul(h[c - 1, -1], edge[c - 1, -1], carry[c - 1])
    return h.addcmul_(edge, carry.unsqueeze(1))


class _SelectiveScanCore(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + du_t B_t, and a hand-written backward.

    delta, du: (L, B, D)  A_t: (N, D)  B, C: (L, B, N)  ->  y (L, B, D), last state (B, N, D).
    The state gradient is the same recurrence run in reverse, so nothing per time step is kept
    for autograd; a contraction over N is a batched matmul on the time-major layout, one over D a
    product and a sum.
    """

    @staticmethod
    def forward(ctx, delta, A_t, du, B, C):
        length = delta.shape[0]
        step = _chunk_length(length, B.shape[1] * A_t.numel(), delta.device)
        delta_c = _chunked(delta, step)  # (chunks, step, B, D); padded steps have delta 0 (decay 1)
        decay = _decay(delta_c, A_t)  # (chunks, step, B, N, D)
        drive = torch.mul(B.unsqueeze(-1), du.unsqueeze(-2))  # (L, B, N, D)
        h = _recurrence(decay, _chunked(drive, step), delta_c, A_t, reverse=False)
        states = h.flatten(0, 1)[:length]  # (L, B, N, D)
        y = torch.matmul(C.unsqueeze(-2), states).squeeze(-2)  # (L, B, D)
        ctx.save_for_backward(delta_c, A_t, du, B, C, decay, h)
        ctx.length = length
        last = states[-1].clone()
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, _grad_last):
        delta_c, A_t, du, B, C, decay, h = ctx.saved_tensors
        length, step = ctx.length, delta_c.shape[1]
        states = h.flatten(0, 1)[:length]
        grad_y = grad_y.contiguous()
        # the matrix-vector contractions as a product and a sum: as a batched matmul of L x B
        # (N, D) @ (D, 1) they take ~4x longer on a CPU
        grad_C = (states * grad_y.unsqueeze(-2)).sum(-1)  # (L, B, N)
        # state gradient: g_t = C_t grad_y_t + decay_{t+1} g_{t+1}
        g = _recurrence(decay, _chunked(torch.mul(C.unsqueeze(-1), grad_y.unsqueeze(-2)), step),
                        delta_c, A_t, reverse=True).flatten(0, 1)[:length]  # (L, B, N, D)
        grad_du = torch.matmul(B.unsqueeze(-2), g).squeeze(-2)  # (L, B, D)
        grad_B = (g * du.unsqueeze(-2)).sum(-1)  # (L, B, N)
        # d decay_t = g_t h_{t-1} and decay_t = exp(delta_t A): w_t = g_t h_{t-1} decay_t
        w = g[1:].mul_(states[:-1]).mul_(decay.flatten(0, 1)[1:length])
        delta = delta_c.flatten(0, 1)[:length]
        grad_A_t = (w * delta[1:].unsqueeze(-2)).sum((0, 1))  # (N, D)
        grad_delta = torch.cat([delta.new_zeros(1, *delta.shape[1:]), w.mul_(A_t).sum(-2)])
        return grad_delta, grad_A_t, grad_du, grad_B, grad_C


# ----------------------------------------------------------------------------------------------
# Selective scan: PyTorch reference and CUDA wrapper (same signature)
# ----------------------------------------------------------------------------------------------
def _outside_autocast(kernel: Callable) -> Callable:
    """Run a reference kernel in its own compute dtype under an active autocast, as the CUDA kernels
    do (autocast would otherwise run its matmuls in bf16 and hand the backward mixed dtypes)."""
    @functools.wraps(kernel)
    def run(first: torch.Tensor, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            return kernel(first, *args, **kwargs)
    return run


@_outside_autocast
def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Exact selective scan in PyTorch (fp32 compute), vectorised over time in chunks.

    u: (B, D, L)  delta: (B, D, L)  A: (D, N)  B: (B, N, L)  C: (B, N, L)  D: (D,)  z: (B, D, L)
    Returns out (B, D, L) [, last_state (B, D, N)].
    """
    dtype_in = u.dtype
    compute = torch.float64 if dtype_in == torch.float64 else torch.float32  # fp32, or fp64 for checks
    u, delta = u.to(compute), delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    def time_major(x):  # (B, C, L) -> (L, B, C): each time step one contiguous block
        return x.to(compute).permute(2, 0, 1).contiguous()

    delta_t = time_major(delta)
    y, last = _SelectiveScanCore.apply(delta_t, A.to(compute).t(), delta_t * time_major(u), time_major(B),
                                       time_major(C))
    out = y.permute(1, 2, 0)  # (B, D, L)
    if D is not None:
        out = out + u * D[..., None].to(compute)
    if z is not None:
        out = out * F.silu(z.to(compute))
    out = out.to(dtype_in)
    return (out, last.transpose(1, 2)) if return_last_state else out


def whole_kernel_chunks(length: int) -> int:
    """The length mamba-ssm's selective-scan kernels run ``length`` steps fastest at: each thread block
    covers 128, 256, 512, 1024 or 2048 steps (by the length), and a length short of a whole block
    takes a guarded load path: at Vim's 197 tokens (B 32, D 768, N 16, one H200) the forward took
    0.20 ms against 0.12 ms at 256 steps, forward + backward 0.86 against 0.72 ms. Lengths over
    2048, or less than half a block, are left as they are (not measured)."""
    block = next((b for b in (128, 256, 512, 1024, 2048) if length <= b), None)
    return block if block is not None and block <= 2 * length else length


class _ZeroPaddedInTime(torch.autograd.Function):
    """t (..., L) -> (..., length) with zeros after L, its dimensions in t's memory order (a
    channel-major t stays channel-major); the gradient is the first L steps of the padded one."""

    @staticmethod
    def forward(ctx, t, length):
        ctx.steps = t.shape[-1]
        order = sorted(range(t.dim() - 1), key=lambda i: -t.stride(i)) + [t.dim() - 1]  # outermost first, time last
        padded = t.new_empty([t.shape[i] for i in order[:-1]] + [length])
        padded = padded.permute(*(order.index(i) for i in range(t.dim())))
        padded[..., ctx.steps:].zero_()
        padded[..., :ctx.steps].copy_(t)
        return padded

    @staticmethod
    def backward(ctx, grad):
        return grad[..., :ctx.steps], None


def padded_to_whole_chunks(scan: Callable) -> Callable:
    """``scan`` (this module's selective-scan signature) run on inputs zero-padded at the end to
    :func:`whole_kernel_chunks`, its output cut back. Exact: the scan is causal, so the steps added
    after the end change none before it, and their output gets no gradient, so none flows back from
    them. Not where the final state is asked for (the added steps would move it)."""
    @functools.wraps(scan)
    def run(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        steps = u.shape[-1]
        length = whole_kernel_chunks(steps)
        if return_last_state or length == steps:
            return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

        def pad(t):  # B, C: (B, [G,] N, L) per step, or (D, N) fixed
            return t if t is None or t.dim() < 3 else _ZeroPaddedInTime.apply(t, length)

        return scan(pad(u), pad(delta), A, pad(B), pad(C), D, pad(z), delta_bias, delta_softplus)[..., :steps]
    return run


@padded_to_whole_chunks
def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """mamba_ssm's fused CUDA selective scan (``selective_scan_fn``); same arguments as above."""
    if _cuda_selective_scan is None:
        raise RuntimeError("The CUDA scan backend needs mamba-ssm: install it with "
                           "`pip install mamba-ssm` (or `mambapeft setup-gpu`).")
    # the kernel wants delta and z in u's dtype and B, C either fp32 or u's dtype (autocast mixes them);
    # any batch and channel strides, time contiguous (a channel-major layout goes in uncopied)
    def like_u(t):
        return t if t is None else time_contiguous(t.to(u.dtype))

    def fp32_or_like_u(t):
        return time_contiguous(t) if t.dtype == torch.float32 else like_u(t)

    return _cuda_selective_scan(time_contiguous(u), like_u(delta), A.float().contiguous(), fp32_or_like_u(B),
                                fp32_or_like_u(C), D, like_u(z), delta_bias, delta_softplus, return_last_state)


def time_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t (..., L) with a unit stride along L, as mamba-ssm's scan kernels require of every sequence."""
    return t if t.stride(-1) == 1 else t.contiguous()


@_outside_autocast
def selective_state_step(state, x, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False):
    """One recurrent step (generation). Updates ``state`` in place.

    state: (B, D, N)  x, delta, z: (B, D)  A: (D, N)  B, C: (B, N)  D: (D,). Returns y: (B, D).
    """
    compute = torch.promote_types(state.dtype, torch.float32)  # fp32 (fp64 in checks), whatever is stored
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(delta[..., None] * A.to(compute))  # (B, D, N)
    drive = (delta * x.to(compute))[..., None] * B.to(compute)[:, None, :]  # (B, D, N)
    new_state = state.to(compute) * decay + drive
    state.copy_(new_state)
    y = torch.einsum("bdn,bn->bd", new_state, C.to(compute))
    if D is not None:
        y = y + x.to(compute) * D.to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(x.dtype)


def selective_state_step_cuda(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's ``selective_state_update`` (Triton): the same step in one kernel, state updated in
    place in its own dtype (fp32 compute); same arguments as :func:`selective_state_step`."""
    # The kernel launch reads D's and dt_bias's strides unconditionally (None raises TypeError in
    # mamba-ssm 2.3), so an absent term goes in as zeros, which leave the step unchanged.
    zeros = None if D is not None and delta_bias is not None else x.new_zeros(x.shape[-1], dtype=torch.float32)
    return _cuda_state_update(state, x, delta, A.float(), B, C, D=zeros if D is None else D, z=z,
                              dt_bias=zeros if delta_bias is None else delta_bias, dt_softplus=delta_softplus)


# ----------------------------------------------------------------------------------------------
# Mamba-2's scan (SSD): PyTorch reference and Triton wrapper (same signature)
# ----------------------------------------------------------------------------------------------
NO_DT_LIMIT = (0.0, float("inf"))


def _discretised_dt(dt, dt_bias, dt_softplus, dt_limit, compute):
    """dt (..., H) -> the step sizes the recurrence uses, clamped to ``dt_limit`` as the Triton kernel
    always does (the default limit only removes negative steps)."""
    dt = dt.to(compute)
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(dt_limit[0], dt_limit[1])


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """x (..., T) -> (..., T, T) with [l, s] = x[s+1] + ... + x[l] for l >= s and -inf above the
    diagonal, so exp() of it is the decay from step s to step l. Summed from masked copies rather
    than as a difference of cumulative sums, which would cancel catastrophically (mamba_ssm's ``segsum``)."""
    ones = torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool, device=x.device)
    sums = x.unsqueeze(-1).expand(*x.shape, x.shape[-1]).masked_fill(~ones.tril(-1), 0).cumsum(-2)
    return sums.masked_fill(~ones.tril(), -torch.inf)


@_outside_autocast
def chunk_scan_torch(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False,
                     dt_limit=NO_DT_LIMIT, return_final_states=False):
    """Exact SSD in PyTorch (fp32 compute, fp64 for checks), mamba_ssm's ``ssd_minimal_discrete``:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t   (per head; head h reads
    group h // (H/G) of B and C). Within a chunk of ``chunk_size`` steps the output is the masked
    quadratic form C_l^T B_s decay(s -> l) dt_s x_s; across chunks only the states are carried.

    x: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  D, dt_bias: (H,)
    Returns out (B, L, H, P) in x's dtype [, final_states (B, H, P, N) in the compute dtype].
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, length, heads, headdim = x.shape
    groups, n = B.shape[2:]
    dt = _discretised_dt(dt, dt_bias, dt_softplus, dt_limit, compute)  # (B, L, H)
    step = min(chunk_size, length)  # the chunk length changes the cost, never the result
    pad = -length % step

    def chunks(t, *inner):
        """(B, L, ...) -> (B, c, step, *inner), zero-padded in time: a padded step has dt = 0,
        so it neither decays the state nor adds to it."""
        t = F.pad(t.to(compute), (0, 0) * (t.ndim - 2) + (0, pad))
        return t.reshape(batch, -1, step, *inner)

    x_dt = chunks(x * dt[..., None], groups, heads // groups, headdim)  # (B, c, l, G, R, P)
    Bc, Cc = chunks(B, groups, n), chunks(C, groups, n)  # (B, c, l, G, N)
    dA = chunks(dt * A.to(compute), groups, heads // groups).permute(0, 1, 3, 4, 2)  # (B, c, G, R, l)
    dA_cum = dA.cumsum(-1)
    # 1. within each chunk: the quadratic form
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # (B, c, G, l, s)
    y = torch.einsum("bcgls,bcgrls,bcsgrp->bclgrp", scores, _segsum(dA).exp(), x_dt)
    # 2. the state each chunk adds, decayed to the chunk's end: (B, c, G, R, P, N)
    added = torch.einsum("bclgn,bcgrl,bclgrp->bcgrpn", Bc, (dA_cum[..., -1:] - dA_cum).exp(), x_dt)
    # 3. the state entering each chunk (index 0: the zero initial state), and the final one
    chunk_decay = _segsum(F.pad(dA_cum[..., -1].permute(0, 2, 3, 1), (1, 0))).exp()  # (B, G, R, c+1, c+1)
    carried = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, torch.cat([torch.zeros_like(added[:, :1]), added], 1))
    # 4. the entering state's contribution to every position of its chunk
    y = y + torch.einsum("bclgn,bcgrpn,bcgrl->bclgrp", Cc, carried[:, :-1], dA_cum.exp())
    out = y.reshape(batch, -1, heads, headdim)[:, :length]
    if D is not None:
        out = out + x.to(compute) * D.to(compute)[:, None]
    out = out.to(x.dtype)
    return (out, carried[:, -1].reshape(batch, heads, headdim, n)) if return_final_states else out


def chunk_scan_cuda(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False,
                    dt_limit=NO_DT_LIMIT, return_final_states=False):
    """mamba_ssm's Triton SSD (``mamba_chunk_scan_combined``, what its Mamba2 runs outside the fused
    path); same arguments as :func:`chunk_scan_torch`."""
    return _cuda_chunk_scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                            dt_limit=dt_limit, return_final_states=return_final_states)


@_outside_autocast
def chunk_scan_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT):
    """One recurrent SSD step (generation). Updates ``state`` in place.

    state: (B, H, P, N)  x: (B, H, P)  dt: (B, H)  A, D, dt_bias: (H,)  B, C: (B, G, N). Returns y: (B, H, P).
    """
    compute = torch.promote_types(state.dtype, torch.float32)  # fp32 (fp64 in checks), whatever is stored
    batch, heads, headdim, n = state.shape
    dt = _discretised_dt(dt, dt_bias, dt_softplus, dt_limit, compute)
    grouped = state.view(batch, B.shape[1], -1, headdim, n)  # (B, G, R, P, N)
    x_dt = (x.to(compute) * dt[..., None]).view(grouped.shape[:-1])  # (B, G, R, P)
    decay = (dt * A.to(compute)).exp().view(grouped.shape[:3])  # (B, G, R)
    grouped.copy_(grouped * decay[..., None, None] + x_dt[..., None] * B.to(compute)[:, :, None, None])
    y = torch.einsum("bgrpn,bgn->bgrp", grouped, C.to(compute)).reshape(batch, heads, headdim)
    if D is not None:
        y = y + x.to(compute) * D.to(compute)[:, None]
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Causal depthwise conv1d
# ----------------------------------------------------------------------------------------------
def causal_conv1d_torch(x, weight, bias=None, activation="silu"):
    """x: (B, D, L)  weight: (D, W)  bias: (D,). Left-padded depthwise conv; returns (B, D, L)."""
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


class _CausalConv1d(torch.autograd.Function):
    """causal-conv1d's ``causal_conv1d_fn`` (time-contiguous x) on :data:`_conv_fwd_kernel` (ours, in
    Triton, where it imports) and causal-conv1d's backward kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return _conv_fwd_kernel(x, weight, bias, None, None, None, silu)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = _conv_backward(x, weight, bias, time_contiguous(dout), None, ctx.silu)
        return dx, dweight, dbias, None


def _conv_backward(x, weight, bias, dout, dx, silu, reverse=False, add_dx=False):
    """(dx, dweight, dbias) of the causal conv: our kernel where it runs (conv_bwd.py), else
    causal-conv1d's; dx written into the tensor given (or a new one). ``reverse`` (ours alone: the
    caller checked it runs on x) of the conv run from the last step; ``add_dx`` (ours alone, as
    reverse): dx added to what the tensor given holds."""
    if reverse or add_dx:
        return conv_bwd.backward(x, weight, bias, time_contiguous(dout.to(x.dtype)), dx, silu, reverse, add_dx)
    if conv_bwd.runs(x, weight, dout):
        return conv_bwd.backward(x, weight, bias, dout, dx, silu)
    dx, dweight, dbias, _ = _conv_bwd_kernel(x, weight, bias, dout, None, None, None, dx, False, silu)
    return dx, dweight, dbias if bias is not None else None


def causal_conv1d_cuda(x, weight, bias=None, activation="silu"):
    """causal-conv1d's CUDA kernels (the forward ours where Triton imports), or the PyTorch conv when
    the package is missing (documented)."""
    if _cuda_causal_conv1d is None:
        return causal_conv1d_torch(x, weight, bias, activation)
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal conv activation {activation!r}: use None, 'silu' or 'swish'")
    if _conv_fwd_kernel is None or _conv_bwd_kernel is None:  # pragma: no cover - a causal-conv1d without them
        return _cuda_causal_conv1d(x, weight, bias, activation=activation)
    return _CausalConv1d.apply(time_contiguous(x), weight, bias, activation in ("silu", "swish"))


def conv_state_of(x: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` conv inputs of x (B, D, L) -> (B, D, width), zero on the left when L < width:
    the state :func:`causal_conv1d_step` continues from after a prefill."""
    return F.pad(x, (max(width - x.shape[-1], 0), 0))[..., -width:].detach()


def causal_conv1d_step(x, conv_state, weight, bias=None, activation="silu"):
    """One step of the causal conv (generation): x (B, D) enters ``conv_state`` (B, D, W), the last
    W inputs; weight (D, W), bias (D,). Returns (out (B, D) in x's dtype, the new state)."""
    conv_state = torch.cat([conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    out = (conv_state * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return (F.silu(out) if activation == "silu" else out).to(x.dtype), conv_state


def causal_conv1d_update_cuda(x, conv_state, weight, bias=None, activation="silu"):
    """The conv step in place on CUDA: causal-conv1d's ``causal_conv1d_update`` (the kernel
    mamba_ssm's own step runs) where installed and the state has x's dtype, as its kernel requires;
    else our Triton kernel (any state dtype). Same arguments as :func:`causal_conv1d_update_torch`."""
    if _causal_conv1d_update is not None and conv_state.dtype == x.dtype:
        return _causal_conv1d_update(x, conv_state, weight, bias, activation)
    return _triton_conv_update(x, conv_state, weight, bias, activation)


def causal_conv1d_update_torch(x, conv_state, weight, bias=None, activation="silu"):
    """:func:`causal_conv1d_step` with ``conv_state`` updated in place (causal-conv1d's
    ``causal_conv1d_update``): returns out (B, D) in x's dtype. The reference of the Triton kernel."""
    out, new_state = causal_conv1d_step(x, conv_state, weight, bias, activation)
    conv_state.copy_(new_state)
    return out


# ----------------------------------------------------------------------------------------------
# Residual add + RMSNorm of a block (mamba_ssm's fused_add_norm)
# ----------------------------------------------------------------------------------------------
def _residual_dtype(hidden, residual, residual_in_fp32) -> torch.dtype:
    """The residual stream's dtype after a block's add: the incoming residual's, else (first block) fp32
    when residual_in_fp32, else hidden's."""
    if residual is not None:
        return residual.dtype
    return torch.float32 if residual_in_fp32 else hidden.dtype


def rms_normed_torch(x32, weight, eps):
    """RMSNorm of fp32 x (..., D) with weight (D,), in fp32: every PyTorch RMSNorm here (the module's and
    the fused add's reference and rebuild) is this expression, so they agree bit for bit."""
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def add_rms_norm_torch(hidden, residual, weight, eps, residual_in_fp32=True, rowscale=None):
    """residual <- hidden + residual (hidden alone when residual is None), summed and normalised in
    fp32: hidden, residual (..., D), weight (D,) -> (RMSNorm(residual) in hidden's dtype, residual in
    its own dtype (:func:`_residual_dtype`), a zero-argument function giving the first again bit for bit
    from the second, or None where that would not pay (:func:`_rebuild_of`)). ``rowscale`` (rows,) fp32,
    or None: each row of hidden is first multiplied by its entry, in fp32 (a drop path's per-sample
    scale, as mamba_ssm's kernel takes it: ``DropPath.row_scales``)."""
    scaled = hidden.float() if rowscale is None else hidden.float() * rowscale.view(*hidden.shape[:-1], 1)
    total = scaled if residual is None else scaled + residual.float()
    out = rms_normed_torch(total, weight, eps).to(hidden.dtype)
    residual, dtype = total.to(_residual_dtype(hidden, residual, residual_in_fp32)), out.dtype
    return out, residual, _rebuild_of(out, residual, lambda: rms_normed_torch(residual, weight, eps).to(dtype),
                                      weight)


def _rebuild_of(normed, residual, rebuild, *sources):
    """``rebuild`` (which reads ``residual`` and ``sources``) guarded by :func:`.rebuild.checked` where a
    rebuild of ``normed`` pays, else None: the residual must hold what the norm read (fp32), and the
    norm's backward keep it anyway (a graph reaches it; else the rebuild would keep it alone). The
    closure must not refer to ``normed`` (it would keep it)."""
    if residual.dtype != torch.float32 or not normed.requires_grad:
        return None
    return checked(rebuild, residual, *sources)


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(..., D) -> (rows, D) with unit stride along D, as mamba_ssm's norm kernels read it."""
    if t is None:
        return None
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


NORM_BACKWARD_COLUMNS = 8192  # widest row our norm backward holds in registers (d_model: 384 - 2,560 here)


class _AddRMSNorm(torch.autograd.Function):
    """mamba_ssm's ``LayerNormFn`` as a pre-norm block calls it (``prenorm=True, is_rms_norm=True``, no
    bias, dropout or second input), the forward on its kernel, the backward on ours
    (``norm_triton.rms_norm_backward``: the same gradients, the weight's only when it trains), also
    returning each row's 1/rms (not differentiable): with it and the fp32 residual the output is
    rebuilt bit for bit (``norm_triton.rms_normed``). A ``rowscale`` (rows,) multiplies hidden's rows
    first (mamba_ssm's kernels take it: a drop path in the same pass)."""

    @staticmethod
    def forward(ctx, hidden, residual, weight, eps, residual_dtype, rowscale):
        outputs = _layer_norm_fwd(_rows(hidden), weight.contiguous(), None, eps, _rows(residual),
                                  rowscale=rowscale, residual_dtype=residual_dtype, is_rms_norm=True)
        normed, rstd, residual_out = outputs[0], outputs[3], outputs[4]  # of (y, y1, mean, rstd, residual_out, ...)
        ctx.save_for_backward(residual_out, weight, rstd, rowscale)
        ctx.eps, ctx.has_residual, ctx.hidden_dtype, ctx.shape = eps, residual is not None, hidden.dtype, hidden.shape
        ctx.mark_non_differentiable(rstd)
        # rstd's gradient is never read: not materialised as zeros (a fill kernel a layer); nor dresidual's
        # where the residual goes unused (the kernel then adds none)
        ctx.set_materialize_grads(False)
        return normed.view(hidden.shape), residual_out.view(hidden.shape), rstd

    @staticmethod
    def backward(ctx, dnormed, dresidual, _drstd):
        residual_out, weight, rstd, rowscale = ctx.saved_tensors
        if dnormed is None:  # the normed output went unused
            dnormed = residual_out.new_zeros(ctx.shape, dtype=ctx.hidden_dtype)
        if residual_out.shape[1] <= NORM_BACKWARD_COLUMNS:  # ours (norm_triton.py): a grid of row tiles
            dhidden, dweight, dresidual_in = _rms_norm_backward(
                _rows(dnormed), residual_out, rstd, weight, _rows(dresidual), ctx.hidden_dtype,
                ctx.has_residual, weight_grad=ctx.needs_input_grad[2], rowscale=rowscale)
        else:
            dhidden, dweight, _, dresidual_in, *_ = _layer_norm_bwd(
                _rows(dnormed), residual_out, weight, None, ctx.eps, None, rstd, _rows(dresidual),
                rowscale=rowscale, has_residual=ctx.has_residual, is_rms_norm=True, x_dtype=ctx.hidden_dtype)
        return (dhidden.view(ctx.shape), dresidual_in.view(ctx.shape) if ctx.has_residual else None, dweight, None,
                None, None)


def add_rms_norm_cuda(hidden, residual, weight, eps, residual_in_fp32=True, rowscale=None):
    """mamba_ssm's ``layer_norm_fn(..., prenorm=True, is_rms_norm=True)``: the same in one kernel, and
    the rebuild from the fp32 residual and 1/rms in one more (``norm_triton.py``); same arguments and
    results as :func:`add_rms_norm_torch`."""
    normed, residual, rstd = _AddRMSNorm.apply(hidden, residual, weight, eps,
                                               _residual_dtype(hidden, residual, residual_in_fp32), rowscale)
    dtype = normed.dtype
    return normed, residual, _rebuild_of(normed, residual, lambda: _rms_normed(residual, rstd, weight, dtype),
                                         rstd, weight)


# ----------------------------------------------------------------------------------------------
# A unidirectional mixer after in_proj, in one piece: conv -> x_proj -> dt_proj -> scan -> gate -> out_proj
# ----------------------------------------------------------------------------------------------
def mamba_inner_torch(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                      out_proj_weight, out_proj_bias, A, D, reverse=False, keep_activations=False, state_offset=None,
                      a_log=False):
    """Reference of :func:`mamba_inner_cuda`, from this module's kernels.

    xz: (B, 2*D_inner, L)  conv_weight: (D_inner, 1, W)  x_proj_weight: (R + 2N, D_inner)
    dt_proj_weight: (D_inner, R)  out_proj_weight: (D_model, D_inner)  A: (D_inner, N)  D: (D_inner,)
    Returns (B, L, D_model), or with out_proj_weight None the gated scan output (B, D_inner, L) (the
    caller then calls its out_proj: a module whose call its weight does not stand for). ``reverse``:
    conv and scan from the last step to the first, as on xz flipped along time, the output in xz's
    order (the backward direction of a bidirectional block). ``keep_activations`` (memory for speed
    in :func:`mamba_inner_cuda`'s backward) changes nothing here: autograd keeps what it needs.
    ``state_offset`` (D_inner, N) or None: state-offset tuning's h', read with the state at every step
    (y + silu(z) C h', as ``peft/state_offset.py`` adds it on the unfused chain). ``a_log``: A is A_log,
    the state matrix -exp(A_log) (a trained A_log read raw: :class:`InnerWeights`).
    """
    if a_log:
        A = -torch.exp(A.float())
    if reverse:
        return mamba_inner_torch(xz.flip(-1), conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                                 out_proj_weight, out_proj_bias, A, D,
                                 state_offset=state_offset).flip(_time_dim(out_proj_weight))
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_torch(x, conv_weight.squeeze(1), conv_bias, "silu")
    rank, n = dt_proj_weight.shape[1], A.shape[1]
    dt, B, C = F.linear(x.transpose(1, 2), x_proj_weight).split([rank, n, n], dim=-1)  # (B, L, .)
    delta = F.linear(dt, dt_proj_weight).transpose(1, 2)
    y = selective_scan_torch(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z, dt_proj_bias,
                             delta_softplus=True)
    if state_offset is not None:
        y = y + state_offset_term(C.transpose(1, 2), z, state_offset).to(y.dtype)
    return y if out_proj_weight is None else F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def _time_dim(out_proj_weight) -> int:
    """The time dimension of the fused function's output: (B, L, D_model), or (B, D_inner, L) unprojected."""
    return -1 if out_proj_weight is None else 1


def _conv_silu(x, conv_weight, conv_bias, reverse=False):
    """The conv forward kernel (ours where Triton imports) with SiLU: x (B, D_inner, L) -> (B, D_inner, L),
    in x's layout; ``reverse`` (ours alone: mamba_inner_cuda checked it imports) from the last step."""
    if reverse:
        return _triton_conv_fwd(x, conv_weight, conv_bias, None, None, None, True, reverse=True)
    return _conv_fwd_kernel(x, conv_weight, conv_bias, None, None, None, True)  # SiLU


def _delta(dt_proj_weight, x_dbl, batch):
    """(D_inner, R) @ (R, B*L) -> (B, D_inner, L), channel-major as the scan wants it."""
    rank = dt_proj_weight.shape[1]
    return _from_channels_major(dt_proj_weight @ x_dbl[:, :rank].t(), batch)


def _aligned_projection(weight: torch.Tensor) -> torch.Tensor:
    """x_proj's weight (R + 2N, D_inner) with zero rows appended up to a multiple of 16 bytes a row of
    its output (B*L, R + 2N + pad): cuBLASLt's GEMM kernels need that of an operand's leading dimension
    and of the output's rows, else cuBLAS falls back to slower ones (Additional-scan's 24 + 2 x 22 rows
    at Vim-S: ~2 ms of a training step at batch 32, one H200). The output's extra columns are zero and
    never read; the weight itself where its rows are whole."""
    pad = -weight.shape[0] % (16 // weight.element_size())
    return F.pad(weight, (0, 0, 0, pad)) if pad else weight


def _tokens_major(t):
    """(B, C, L) -> (B*L, C): a view where t is channel-major, else one copy."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


def _channels_major(t):
    """(B, C, L) -> (C, B*L): a view where t is channel-major, else one copy."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _from_channels_major(t, batch):
    """(C, B*L) -> (B, C, L), a view (the inverse of :func:`_channels_major`)."""
    return t.unflatten(1, (batch, -1)).transpose(0, 1)


def _side_by_side(dB, dC):
    """dB, dC (B, 1, N, L) as one (B*L, 2N) view (x_proj's B and C columns), where they are the two halves
    of one token-major buffer's rows (our short scan writes them so), else None."""
    batch, _, n, length = dB.shape
    token_major = [length * 2 * n, 1, 2 * n]  # batch, state, step
    if ([dB.stride(i) for i in (0, 2, 3)] == [dC.stride(i) for i in (0, 2, 3)] == token_major and dB.dtype == dC.dtype
            and dC.data_ptr() == dB.data_ptr() + n * dB.element_size()):
        return dB.as_strided((batch * length, 2 * n), (2 * n, 1))
    return None


@dataclass(frozen=True)
class InnerWeights:
    """One scan direction's weights as the fused mixer functions read them (:func:`mamba_inner_cuda`'s
    arguments of these names): conv_weight (D_inner, 1, W), conv_bias (D_inner,) or None, x_proj_weight
    (R + 2N, D_inner), dt_proj_weight (D_inner, R), dt_proj_bias (D_inner,), A (D_inner, N), D
    (D_inner,), state_offset (D_inner, N) or None; ``reverse``: the direction runs from the last step to
    the first (Vim's backward one); ``a_log``: A holds A_log, the state matrix -exp(A_log) (a trained
    A_log, read raw: our short scan computes -exp and its gradient's product in its kernels)."""

    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    x_proj_weight: torch.Tensor
    dt_proj_weight: torch.Tensor
    dt_proj_bias: torch.Tensor
    A: torch.Tensor
    D: torch.Tensor
    reverse: bool = False
    state_offset: torch.Tensor | None = None
    a_log: bool = False

    def run(self, inner: Callable, xz: torch.Tensor, out_proj_weight: torch.Tensor | None = None,
            out_proj_bias: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """A unidirectional fused function (a backend's ``mamba_inner``: :func:`mamba_inner_cuda`,
        :func:`mamba_inner_torch`) on this direction's weights, projected by out_proj's where given, else
        (B, D_inner, L); the state offset and ``a_log`` passed only where set (a backend's function without
        them need not take the arguments)."""
        offset = {"state_offset": self.state_offset} if self.state_offset is not None else {}
        log = {"a_log": True} if self.a_log else {}
        return inner(xz, self.conv_weight, self.conv_bias, self.x_proj_weight, self.dt_proj_weight,
                     self.dt_proj_bias, out_proj_weight, out_proj_bias, self.A, self.D, reverse=self.reverse,
                     **offset, **log, **kwargs)

    def function_inputs(self) -> tuple:
        """The direction's tensors as :class:`_MambaInnerFn` takes them (``_PER_DIRECTION``, in its order)."""
        return (self.conv_weight.squeeze(1), self.conv_bias, self.x_proj_weight, self.dt_proj_weight, self.A.float(),
                self.D.float(), self.dt_proj_bias.float(),
                self.state_offset.float().contiguous() if self.state_offset is not None else None)


# a direction's tensors among _MambaInnerFn's inputs: conv_weight (D_inner, W), conv_bias, x_proj_weight,
# dt_proj_weight, A, D, delta_bias, state_offset (InnerWeights.function_inputs); their gradients in that order
_PER_DIRECTION = 8


class _MambaInnerFn(torch.autograd.Function):
    """mamba_ssm's ``MambaInnerFn`` (real A, B and C from x_proj, conv and delta recomputed in the
    backward: its checkpoint_lvl 1) with a backward that computes only the gradients asked for: under
    PEFT the out_proj, x_proj and dt_proj weights are frozen, and mamba_ssm's computes their gradient
    GEMMs anyway (11 ms of a 333 ms mamba-1.4b LoRA(in_proj) step at micro-batch 32, one H200). It
    also sums out_proj's bias gradient over every dimension (a scalar); here over tokens.

    One or more directions over one xz, their gated outputs summed (Vim's two: ``reverses`` says which
    run from the last step to the first, ``a_logs`` which are given A_log for A: InnerWeights.a_log),
    each direction's ``_PER_DIRECTION`` tensors in turn. Past
    the first, our short-sequence kernels add a direction's output and xz gradient to the first's (as
    PyTorch adds two tensors, rounding included): no sum of outputs, no sum of two xz gradients (those
    two kernels took 0.5 ms of a Vim-S step of 32 images, one H200; the kernels' adds ~0.2 ms); the
    output then unprojected.

    xz (B, 2*D_inner, L), L contiguous (a channel-major (2*D_inner, B, L) storage reads uncopied);
    out_proj_weight (D_model, D_inner) or None; a direction's: conv_weight (D_inner, W); x_proj_weight
    (R + 2N, D_inner); dt_proj_weight (D_inner, R); A (D_inner, N), D and delta_bias (D_inner,) fp32;
    state_offset (D_inner, N) fp32 or None (our short scan reads it; mamba_inner_cuda passes one only there).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, out_proj_weight, out_proj_bias, reverses, a_logs, keep_activations, *directions):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        # the weights' own dtypes, their gradients' (the GEMMs below read them cast to autocast's)
        ctx.out_proj_dtype = out_proj_weight.dtype if out_proj_weight is not None else None
        ctx.projection_dtypes = []  # x_proj's and dt_proj's, a direction's
        if dtype is not None:
            out_proj_weight, out_proj_bias = (w.to(dtype) if w is not None else None
                                              for w in (out_proj_weight, out_proj_bias))
        xz = time_contiguous(xz)
        x, z = xz.chunk(2, dim=1)
        out_z, saved, ctx.kernels = None, [], []
        for i, (reverse, a_log) in enumerate(zip(reverses, a_logs)):
            weights = list(directions[i * _PER_DIRECTION:(i + 1) * _PER_DIRECTION])
            ctx.projection_dtypes.append((weights[2].dtype, weights[3].dtype))
            if dtype is not None:  # x_proj's and dt_proj's weights, as autocast runs their GEMMs
                weights[2:4] = (w.to(dtype) for w in weights[2:4])
            out_z, kept, kernels = _direction_forward(x, z, *weights, reverse, a_log, keep_activations, out_z)
            saved += kept
            ctx.kernels.append(kernels)
        ctx.reverses, ctx.a_logs, ctx.has_out_bias = reverses, a_logs, out_proj_bias is not None
        ctx.save_for_backward(xz, out_proj_weight, *saved)
        if out_proj_weight is None:  # unprojected: the caller calls its out_proj (the backward gets out_z's gradient)
            return out_z
        return F.linear(out_z.transpose(1, 2), out_proj_weight, out_proj_bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        xz, out_proj_weight, *saved = ctx.saved_tensors
        want_out_proj, want_out_bias = ctx.needs_input_grad[1:3]
        x, z = xz.chunk(2, dim=1)
        if out_proj_weight is None:  # the output was out_z itself
            dy = time_contiguous(dout)  # (B, D_inner, L)
        else:
            dout = dout.reshape(-1, dout.shape[-1]).t()  # (D_model, B*L)
            dy = _from_channels_major(out_proj_weight.t() @ dout, xz.shape[0])  # (B, D_inner, L)
        dxz = torch.empty_like(xz)  # the first direction writes it, the others add to it
        grads, kept_each = [], len(saved) // len(ctx.reverses)
        for i, (reverse, a_log, kernels) in enumerate(zip(ctx.reverses, ctx.a_logs, ctx.kernels)):
            wants = ctx.needs_input_grad[6 + i * _PER_DIRECTION:6 + (i + 1) * _PER_DIRECTION]
            direction_grads, out_z = _direction_backward(x, z, dy, dxz, saved[i * kept_each:(i + 1) * kept_each],
                                                         reverse, a_log, kernels, wants, i > 0, want_out_proj,
                                                         ctx.projection_dtypes[i])
            grads += direction_grads
        # one direction: its out_z
        dout_proj = weight_gradient(dout, _tokens_major(out_z), ctx.out_proj_dtype) if want_out_proj else None
        dout_bias = dout.sum(dim=1) if ctx.has_out_bias and want_out_bias else None
        return (dxz, dout_proj, dout_bias, None, None, None, *grads)


def _direction_forward(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, state_offset,
                       reverse, a_log, keep_activations, into):
    """One direction of :class:`_MambaInnerFn`'s forward on x, z (B, D_inner, L): (out_z, what its
    backward reads, the scan kernels that ran); out_z added to ``into`` where given (ours only); with
    ``a_log``, A is A_log (our kernels read it so; for mamba-ssm's, -exp(A_log) computed here)."""
    batch, n = x.shape[0], A.shape[1]
    conv_out = _conv_silu(x, conv_weight, conv_bias, reverse)
    width = x_proj_weight.shape[0]
    x_proj_weight = _aligned_projection(x_proj_weight)  # kept so, for the backward's GEMMs
    x_dbl = F.linear(_tokens_major(conv_out), x_proj_weight)[:, :width]  # (B*L, R + 2N)
    delta = _delta(dt_proj_weight, x_dbl, batch)
    B, C = (x_dbl[:, i:i + n].unflatten(0, (batch, -1)).transpose(1, 2).unsqueeze(1)
            for i in (x_dbl.shape[1] - 2 * n, x_dbl.shape[1] - n))  # (B, 1, N, L) views of x_dbl
    # our short-sequence kernels where they apply (mamba_inner_cuda then did not pad; they read the
    # views), else mamba-ssm's (on copies: they need L contiguous), which take none of our arguments
    ours = scan_short.runs(x.device, x.dtype, n, x.shape[-1]) and scan_short.applies(conv_out, A, B[:, 0], delta, z)
    if not ours:
        B, C = B.contiguous(), C.contiguous()
        if reverse or state_offset is not None or into is not None:  # the callers check: a bug if not
            raise RuntimeError("the fused function was asked to scan in reverse, with a state offset or two "
                               "directions where our kernels do not run")
        if a_log:  # kept for the backward: A_log's gradient is A dA
            A = -torch.exp(A)
    kernels = scan_short if ours else _selective_scan_kernels
    extra = dict(reverse=reverse, keep_states=keep_activations, offset=state_offset, into=into,
                 a_log=a_log) if ours else {}
    out, scan_intermediates, out_z = kernels.fwd(conv_out, delta, A, B, C, D, z, delta_bias, True, **extra)
    # mamba-ssm's backward reads the states at chunk ends only past the first of its 2048-step
    # chunks: B x D_inner x 2N fp32 (16 MiB at 1.4b). Ours: our checkpoints (keep_activations) or None,
    # and out None (their backward recomputes y)
    if not ours and scan_intermediates.shape[2] == 1:
        scan_intermediates = None
    kept = (conv_out, delta) if keep_activations else (None, None)
    return out_z, [conv_weight, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, A, B, C, D, delta_bias,
                   state_offset, scan_intermediates, out, *kept], kernels


def _direction_backward(x, z, dy, dxz, kept, reverse, a_log, kernels, wants, add, want_out_z, projection_dtypes):
    """One direction of :class:`_MambaInnerFn`'s backward: its xz gradient written into dxz (with
    ``add``, added to it: ours only), (its tensors' gradients in _PER_DIRECTION order, None where not
    in ``wants``; x_proj's and dt_proj's in ``projection_dtypes``; A_log's where ``a_log``) and its out_z
    recomputed where ``want_out_z``."""
    (conv_weight, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, A, B, C, D, delta_bias, state_offset,
     scan_intermediates, out, conv_out, delta) = kept
    want_x_proj, want_dt_proj = wants[2:4]
    batch, rank, n = x.shape[0], dt_proj_weight.shape[1], A.shape[1]
    if conv_out is None:  # recomputed, not kept (mamba-ssm's checkpoint_lvl 1)
        conv_out = _conv_silu(x, conv_weight, conv_bias, reverse)
        delta = _delta(dt_proj_weight, x_dbl, batch)
    dx, dz = dxz.chunk(2, dim=1)
    ours = kernels is scan_short
    # the sums over channels and steps our backward skips for frozen tensors: A, D, delta_bias are
    # wants[4:7] (_PER_DIRECTION's order), in scan_short.SUMS's order
    sums = tuple(name for name, wanted in zip(scan_short.SUMS, wants[4:7]) if wanted)
    extra = dict(reverse=reverse, offset=state_offset, add_dz=add, wants=sums, a_log=a_log) if ours else {}
    grads = kernels.bwd(conv_out, delta, A, B, C, D, z, delta_bias, dy, scan_intermediates, out, dz, True,
                        want_out_z or not ours, **extra)  # mamba-ssm's returns out_z always
    dconv_out, ddelta, dA, dB, dC, dD, ddelta_bias, _, out_z = grads[:9]
    if a_log and not ours and dA is not None:  # A is -exp(A_log), computed by the forward
        dA = dA * A
    doffset = grads[9] if state_offset is not None else None  # ours return it tenth
    width = x_dbl.shape[1]
    dx_aligned = x_dbl.new_empty(x_dbl.shape[0], x_proj_weight.shape[0])  # x_proj_weight: aligned (forward)
    if dx_aligned.shape[1] > width:
        dx_aligned[:, width:].zero_()  # times the weight's zero rows: must not be NaN
    dx_dbl = dx_aligned[:, :width]
    dBC = _side_by_side(dB, dC)
    if dBC is not None:
        dx_dbl[:, rank:] = dBC
    else:
        dx_dbl[:, rank:rank + n] = dB[:, 0].transpose(1, 2).flatten(0, 1)
        dx_dbl[:, rank + n:] = dC[:, 0].transpose(1, 2).flatten(0, 1)
    ddelta = _channels_major(ddelta)  # (D_inner, B*L)
    x_proj_dtype, dt_proj_dtype = projection_dtypes
    ddt_proj = weight_gradient(ddelta, x_dbl[:, :rank], dt_proj_dtype) if want_dt_proj else None
    # written into its columns by the GEMM (a view of the aligned rows, as cuBLAS takes it), not copied there
    torch.mm(ddelta.t().to(dx_dbl.dtype), dt_proj_weight.to(dx_dbl.dtype), out=dx_dbl[:, :rank])
    dx_proj = weight_gradient(dx_aligned.t(), _tokens_major(conv_out), x_proj_dtype)[:width] if want_x_proj else None
    dconv_out = _channels_major(dconv_out)
    dconv_out = torch.addmm(dconv_out, x_proj_weight.t(), dx_aligned.t(), out=dconv_out)
    dconv_out = _from_channels_major(dconv_out, batch)
    _, dconv_weight, dconv_bias = _conv_backward(x, conv_weight, conv_bias, dconv_out, dx, True, reverse, add)
    return [dconv_weight, dconv_bias, dx_proj, ddt_proj, dA, dD, ddelta_bias, doffset], out_z


def gemm_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on t runs in: autocast's where it is on for t's device, else t's."""
    on = torch.is_autocast_enabled(t.device.type)
    return torch.get_autocast_dtype(t.device.type) if on and t.is_floating_point() else t.dtype


# PyTorch's GEMM writing fp32 from bf16 or fp16 operands (``torch.mm(..., out_dtype=)``, PyTorch 2.8 on)
_GEMM_WRITES_FP32 = "dtype" in torch.ops.aten.mm.overloads()


def weight_gradient(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """a @ b (times ``scale``, in place, in ``dtype``) as a parameter's gradient in its ``dtype``. Where the GEMM
    runs in bf16 or fp16 on CUDA and the parameter is fp32, cuBLAS writes its fp32 sums as they are
    (``out_dtype``): not rounded to the GEMM's dtype first, and no cast kernel after (autograd's, to the
    parameter's dtype: two a layer and direction at Vim-S full fine-tuning, 3 us each on one H200). Else the
    product in the GEMM's dtype, cast."""
    if (_GEMM_WRITES_FP32 and a.is_cuda and dtype == torch.float32 and a.dtype == b.dtype
            and a.dtype in (torch.bfloat16, torch.float16)):
        grad = torch.mm(a, b, out_dtype=dtype)
    else:
        grad = (a @ b).to(dtype)
    return grad.mul_(scale) if scale != 1 else grad


def scaled_operand(weight: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """weight * scale as a GEMM reads it, in ``dtype``: one kernel (the product rounded once, as autocast
    casts the fp32 product), kept for the backward instead of scaled and cast again there."""
    if scale == 1:
        return weight.to(dtype)
    return torch.mul(weight, scale, out=torch.empty(weight.shape, dtype=dtype, device=weight.device))


class _ChannelMajorProjection(torch.autograd.Function):
    """:func:`project_channel_major`: the backward's GEMMs as :class:`_MambaInnerFn`'s projected ones."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, y, weight, bias, scale, operand):
        ctx.scale, ctx.weight_dtype = scale, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        operand = operand if operand is not None else scaled_operand(weight, scale, gemm_dtype(y))
        ctx.save_for_backward(y if weight.requires_grad else None, operand)
        return F.linear(y.transpose(1, 2), operand, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        y, operand = ctx.saved_tensors
        want_y, want_weight, want_bias = ctx.needs_input_grad[:3]
        rows = dout.reshape(-1, dout.shape[-1])  # (B*L, out)
        dy = dweight = dbias = None
        if want_y:  # (in, B*L) -> (B, in, L), channel-major
            dy = _from_channels_major(operand.to(rows.dtype).t() @ rows.t(), dout.shape[0])
        if want_weight:
            dweight = weight_gradient(rows.t(), _tokens_major(y).to(rows.dtype), ctx.weight_dtype, ctx.scale)
        if want_bias:
            dbias = rows.sum(0).to(ctx.bias_dtype)
        return dy, dweight, dbias, None, None


def project_channel_major(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          scale: float = 1.0, operand: torch.Tensor | None = None) -> torch.Tensor:
    """A Linear (weight (out, in), bias) on y (B, in, L) times ``scale`` -> (B, L, out), as F.linear on
    y's transpose computes it, with y's gradient computed channel-major ((in, B*L), as one GEMM
    writes it): the layout the fused mixer function's backward reads uncopied (F.linear's autograd
    gives it token-major). Vim's fused bidirectional mixer projects its directions' sum with it.
    ``operand``: weight * scale as the GEMM reads it (:func:`scaled_operand` of y's GEMM dtype) where the
    caller keeps it (a frozen weight's), else None (made here)."""
    return _ChannelMajorProjection.apply(y, weight, bias, scale, operand)


class _LinearOnColumns(torch.autograd.Function):
    """:func:`linear_on_columns` with an fp32 weight that trains, the GEMM in bf16 or fp16: the weight's
    gradient written in fp32 by its GEMM (:func:`weight_gradient`), where autograd's (through autocast's
    cast) is the GEMM's product in bf16 and a cast kernel (Vim-S full fine-tuning's in_proj: 24 a step)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, weight, bias, columns, dtype):
        operand, columns = weight.to(dtype), columns.to(dtype)
        ctx.save_for_backward(operand, columns)
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, bias.dtype if bias is not None else None
        return _columns_product(operand, bias.to(dtype) if bias is not None else None, columns)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        operand, columns = ctx.saved_tensors
        want_weight, want_bias, want_columns = ctx.needs_input_grad[:3]  # dout: the output's dtype, the GEMM's
        dweight = weight_gradient(dout, columns.t(), ctx.weight_dtype) if want_weight else None
        dbias = dout.sum(1, dtype=torch.float32).to(ctx.bias_dtype) if want_bias else None
        dcolumns = None
        if want_columns:  # in the columns' layout, as autograd's mm gives it: transposed rows read as columns
            # (in_proj's input) get their gradient as rows, which the norm's backward reads uncopied
            dcolumns = (dout.t() @ operand).t() if columns.stride(0) == 1 else operand.t() @ dout
        return dweight, dbias, dcolumns, None


def linear_on_columns(weight: torch.Tensor, bias: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor:
    """weight (out, in) @ columns (in, N) (+ bias per row): a Linear applied to inputs stored as columns,
    as autocast computes it. An fp32 weight that trains on CUDA under bf16 or fp16 autocast gets its gradient
    in fp32 from the GEMM (:class:`_LinearOnColumns`)."""
    dtype = gemm_dtype(columns)
    if (_GEMM_WRITES_FP32 and columns.is_cuda and weight.requires_grad and torch.is_grad_enabled()
            and weight.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)):
        return _LinearOnColumns.apply(weight, bias, columns, dtype)
    return _columns_product(weight, bias, columns)


def _columns_product(weight: torch.Tensor, bias: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor:
    """weight (out, in) @ columns (in, N), plus bias (out,) on every column: one GEMM either way."""
    return weight @ columns if bias is None else torch.addmm(bias[:, None], weight, columns)


def state_offset_term(C: torch.Tensor, z: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """State-offset tuning's term of the gated output, silu(z) C h': C (B, N, L) or (B, N) (one step),
    z (B, D_inner, L) or (B, D_inner), offset h' (D_inner, N) -> z's shape."""
    return F.silu(z) * torch.einsum("bn...,dn->bd...", C, offset.to(C.dtype))


def takes_state_offset(xz: torch.Tensor, n_states: int) -> bool:
    """:func:`mamba_inner_cuda`'s ``state_offset`` support for xz (B, 2*D_inner, L) with ``n_states``:
    where our short-sequence scan runs (mamba-ssm's kernels have no such input)."""
    return scan_short.runs(xz.device, xz.dtype, n_states, xz.shape[-1])


def _reverse_in_kernels(xz: torch.Tensor, conv_weight: torch.Tensor) -> bool:
    """Whether the fused function can run from the last step to the first without flipping xz: our
    conv forward (Triton) and backward run, and the scan's inputs will all be of xz's dtype (autocast
    off, or to that dtype), as our scan needs (scan_short.applies)."""
    return (_triton_conv_fwd is not None and conv_bwd.runs_on(xz, conv_weight)
            and (not torch.is_autocast_enabled("cuda") or torch.get_autocast_dtype("cuda") == xz.dtype))


def mamba_inner_cuda(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                     out_proj_weight, out_proj_bias, A, D, reverse=False, keep_activations=False, state_offset=None,
                     a_log=False):
    """mamba_ssm's ``mamba_inner_fn`` (what its own Mamba and transformers' MambaForCausalLM train
    with) on its kernels: one autograd node that keeps xz and recomputes the conv and delta in the
    backward, instead of saving every intermediate; ours (:class:`_MambaInnerFn`) skips the
    gradients of frozen weights. Same arguments as :func:`mamba_inner_torch`; ``reverse`` runs in our
    kernels where they all run (:func:`_reverse_in_kernels`), else on xz flipped (two copies).
    ``keep_activations``: where a backward will run, the forward keeps what the backward would
    recompute (memory for speed): the conv output and delta ((B, D_inner, L) each), and where our
    short-sequence scan runs, its state every 8 steps (``scan_short.KEEP_EVERY``; fp32: twice xz's bf16
    bytes at 16 states), whose recompute is one of
    the scan backward's three passes over time (~15% of it at Vim-S). ``state_offset``: as
    :func:`mamba_inner_torch`'s, where our short-sequence scan runs only (:func:`takes_state_offset`).
    ``a_log`` as :func:`mamba_inner_torch`'s (mamba-ssm's kernels get -exp(A_log), computed here)."""
    if _selective_scan_kernels is None or _conv_fwd_kernel is None:
        raise RuntimeError("The fused mixer needs mamba-ssm and causal-conv1d: install them with "
                           "`pip install mamba-ssm causal-conv1d` (or `mambapeft setup-gpu`).")
    # zero steps added at the end to a whole kernel block of mamba-ssm's scan (as the unfused scan's
    # padded_to_whole_chunks): the causal conv and scan leave the steps before them as they are, and
    # their outputs, cut off, send no gradient back (one copy of xz; the scan's inputs are then
    # computed padded). Our short-sequence kernels (scan_short.py) take any length and scan unpadded.
    steps = xz.shape[-1]
    short = scan_short.runs(xz.device, xz.dtype, A.shape[1], steps)
    if state_offset is not None and not short:
        raise ValueError("the fused mixer takes a state offset only where our short-sequence scan runs "
                         "(scan.takes_state_offset); run the mixer's unfused chain for this input")
    if reverse and not (short and _reverse_in_kernels(xz, conv_weight)):
        return mamba_inner_cuda(xz.flip(-1), conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                                out_proj_weight, out_proj_bias, A, D, keep_activations=keep_activations,
                                state_offset=state_offset, a_log=a_log).flip(_time_dim(out_proj_weight))
    length = steps if short else whole_kernel_chunks(steps)
    padded = _ZeroPaddedInTime.apply(xz, length) if length != steps else xz
    inputs = (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, out_proj_weight, out_proj_bias,
              A, D, state_offset)
    keep = keep_activations and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    weights = InnerWeights(conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reverse,
                           state_offset, a_log)
    out = _MambaInnerFn.apply(padded, out_proj_weight, out_proj_bias, (reverse,), (a_log,), keep,
                              *weights.function_inputs())
    return steps_of(out, _time_dim(out_proj_weight), 0, steps)  # cut where padded


def mamba_inner_pair_torch(xz, first: InnerWeights, second: InnerWeights, keep_activations=False):
    """Reference of :func:`mamba_inner_pair_cuda`: the two directions' :func:`mamba_inner_torch`,
    unprojected, summed."""
    return first.run(mamba_inner_torch, xz) + second.run(mamba_inner_torch, xz)


def _adds_in_kernels(xz: torch.Tensor, w: InnerWeights) -> bool:
    """Whether our kernels run this direction of xz from either end and add its output and xz gradient
    to another's: the short-sequence scan runs, and the conv forward and backward (:func:`_reverse_in_kernels`)."""
    return scan_short.runs(xz.device, xz.dtype, w.A.shape[1], xz.shape[-1]) and _reverse_in_kernels(xz, w.conv_weight)


def mamba_inner_pair_cuda(xz, first: InnerWeights, second: InnerWeights, keep_activations=False):
    """Two directions of one xz (B, 2*D_inner, L) through the fused function, their gated scan outputs
    summed: (B, D_inner, L), Vim's bidirectional mixer before out_proj. One autograd node for both where
    our kernels run both (:func:`_adds_in_kernels`: they add the second's output and xz gradient to the
    first's, :class:`_MambaInnerFn`), else :func:`mamba_inner_cuda` per direction, summed.
    ``keep_activations`` as :func:`mamba_inner_cuda`'s."""
    if not (_adds_in_kernels(xz, first) and _adds_in_kernels(xz, second)):
        return (first.run(mamba_inner_cuda, xz, keep_activations=keep_activations)
                + second.run(mamba_inner_cuda, xz, keep_activations=keep_activations))
    inputs = (*first.function_inputs(), *second.function_inputs())
    keep = keep_activations and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xz, *inputs))
    return _MambaInnerFn.apply(xz, None, None, (first.reverse, second.reverse), (first.a_log, second.a_log), keep,
                               *inputs)


def steps_of(t: torch.Tensor, dim: int, first: int, length: int) -> torch.Tensor:
    """t's steps [first, first + length) along ``dim``: t itself where that is all of them (a slice's
    backward, even of every step, writes the gradient into a zeroed copy of the whole: a fill and a
    copy of each mixer direction's output a layer)."""
    return t if first == 0 and t.shape[dim] == length else t.narrow(dim, first, length)


def gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate):
    """mamba_ssm's gated RMSNorm (``rms_norm_ref``), fp32 compute: per group of ``group_size``
    channels, norm(x * silu(z)) (``norm_before_gate=False``, Mamba2's) or norm(x) * silu(z).
    x, z: (..., dim), weight: (dim,) -> (..., dim) in x's dtype."""
    x32, gate = x.float(), F.silu(z.float())
    if not norm_before_gate:
        x32 = x32 * gate
    grouped = x32.unflatten(-1, (-1, group_size))  # (..., groups, group_size)
    out = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if norm_before_gate:
        out = out * gate
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# A Mamba-2 mixer after in_proj, in one piece: split -> conv -> SSD -> gated RMSNorm -> out_proj
# ----------------------------------------------------------------------------------------------
def split_conv1d_scan_torch(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, dt_limit, rmsnorm_weight,
                            rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate):
    """Reference of :func:`split_conv1d_scan_cuda`, from this module's kernels.

    zxbcdt: (B, L, D_inner + conv_dim + H), conv_dim = D_inner + 2 G N  conv_weight: (conv_dim, W)
    dt_bias, A, D: (H,)  rmsnorm_weight: (D_inner,)  outproj_weight: (D_model, D_inner). Returns (B, L, D_model).
    """
    heads = A.shape[0]
    d_inner = heads * headdim
    z, xBC, dt = zxbcdt.split([d_inner, zxbcdt.shape[-1] - d_inner - heads, heads], dim=-1)
    xBC = causal_conv1d_torch(xBC.transpose(1, 2), conv_weight, conv_bias, "silu").transpose(1, 2)
    n = (xBC.shape[-1] - d_inner) // (2 * ngroups)
    x, B, C = xBC.split([d_inner, ngroups * n, ngroups * n], dim=-1)
    y = chunk_scan_torch(x.unflatten(-1, (heads, headdim)), dt, A, B.unflatten(-1, (ngroups, n)),
                         C.unflatten(-1, (ngroups, n)), chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                         dt_limit=dt_limit)
    y = gated_rms_norm(y.flatten(2), z, rmsnorm_weight, rmsnorm_eps, d_inner // ngroups, norm_before_gate)
    return F.linear(y, outproj_weight, outproj_bias)


def split_conv1d_scan_cuda(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, dt_limit, rmsnorm_weight,
                           rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate):
    """mamba_ssm's ``mamba_split_conv1d_scan_combined`` (what its Mamba2 trains with): one autograd
    node from in_proj's output to out_proj's, which keeps zxbcdt and recomputes the conv in the
    backward. Same arguments as :func:`split_conv1d_scan_torch`; conv_dim must be a multiple of 8."""
    return _cuda_split_conv1d_scan(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, dt_limit=dt_limit,
                                   rmsnorm_weight=rmsnorm_weight, rmsnorm_eps=rmsnorm_eps,
                                   outproj_weight=outproj_weight, outproj_bias=outproj_bias, headdim=headdim,
                                   ngroups=ngroups, norm_before_gate=norm_before_gate)


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanBackend:
    """A consistent set of kernels; ``name`` is recorded in every run's metrics.json.
    ``mamba_inner``, where set, replaces a plain Mamba-1 mixer's conv-to-out_proj chain, once per
    direction; ``mamba_inner_pair``, where set, both of a bidirectional one's at once (xz shared);
    ``chunk_scan`` is Mamba-2's scan (SSD); ``split_conv1d_scan``, where set, replaces a plain Mamba-2
    mixer's chain after in_proj; ``state_step`` is Mamba-1's generation step.
    ``conv_update`` (the conv step in place), where set, gives a generation step mamba_ssm's kernel
    sequence (``Mamba.uses_step_kernels``); ``add_rms_norm``, where set, is every block's residual
    add + RMSNorm, in training and generation (``models/mamba.py: add_and_norm``). Both read weights
    raw, so only plain modules take them. ``takes_state_offset(xz, n_states)``, where set, says whether
    ``mamba_inner`` takes a ``state_offset`` for that input (state-offset tuning on the fused path)."""

    name: str
    selective_scan: Callable
    causal_conv1d: Callable
    mamba_inner: Callable | None = None
    mamba_inner_pair: Callable | None = None
    chunk_scan: Callable = chunk_scan_torch
    split_conv1d_scan: Callable | None = None
    state_step: Callable = selective_state_step
    conv_update: Callable | None = None
    add_rms_norm: Callable | None = None
    takes_state_offset: Callable | None = None

    @property
    def fuses(self) -> bool:
        """Whether some mixer can run one fused kernel after in_proj on this backend."""
        return self.mamba_inner is not None or self.split_conv1d_scan is not None


TORCH_BACKEND = ScanBackend("torch", selective_scan_torch, causal_conv1d_torch)
# both fused functions run their conv through causal-conv1d's kernels: without them, the unfused
# chain; mamba-ssm 1.x has no SSD kernel: Mamba-2 mixers then scan in PyTorch
_fuses_inner = bool(_selective_scan_kernels and _conv_fwd_kernel and _cuda_causal_conv1d)
CUDA_BACKEND = ScanBackend("cuda", selective_scan_cuda, causal_conv1d_cuda,
                           mamba_inner=mamba_inner_cuda if _fuses_inner else None,
                           mamba_inner_pair=mamba_inner_pair_cuda if _fuses_inner else None,
                           chunk_scan=chunk_scan_cuda if _cuda_chunk_scan is not None else chunk_scan_torch,
                           split_conv1d_scan=(split_conv1d_scan_cuda if _cuda_split_conv1d_scan and _cuda_causal_conv1d
                                              else None),
                           state_step=(selective_state_step_cuda if _cuda_state_update is not None
                                       else selective_state_step),
                           conv_update=causal_conv1d_update_cuda if _triton_conv_update is not None else None,
                           add_rms_norm=add_rms_norm_cuda if _layer_norm_fwd is not None else None,
                           takes_state_offset=takes_state_offset)


def cuda_kernels_available() -> bool:
    return _cuda_selective_scan is not None and torch.cuda.is_available()


def installed_kernels() -> dict[str, bool | str]:
    """Which optional CUDA kernel packages imported (whether or not a GPU is present), and why not;
    ``nvrtc``: whether our short-sequence scan kernels can be compiled (scan_short.py)."""
    return {"mamba_ssm": _cuda_selective_scan is not None, "mamba_ssm_ssd": _cuda_chunk_scan is not None,
            "causal_conv1d": _cuda_causal_conv1d is not None, "nvrtc": nvrtc.nvrtc_available(),
            "errors": dict(_IMPORT_ERRORS)}


def resolve_backend(device: torch.device | str, requested: str | None = "auto") -> ScanBackend:
    """Pick the scan backend for ``device``.

    ``requested`` (or the environment variable MAMBAPEFT_SCAN_BACKEND when it is "auto"/None) is one
    of "auto", "torch", "cuda". "auto" means the CUDA kernels on a CUDA device when mamba-ssm is
    installed, else the PyTorch scan. Asking for "cuda" where it cannot run is an error.
    """
    requested = requested or "auto"
    if requested == "auto":
        requested = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if requested not in BACKEND_NAMES:
        raise ValueError(f"Unknown scan backend {requested!r} (from argument or ${BACKEND_ENV}); "
                         f"choose one of {', '.join(BACKEND_NAMES)}.")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "torch":
        return TORCH_BACKEND
    if requested == "cuda":
        if not on_cuda:
            raise ValueError("Scan backend 'cuda' was requested but the model is not on a CUDA device.")
        if _cuda_selective_scan is None:
            raise RuntimeError("Scan backend 'cuda' was requested but mamba-ssm is not installed: "
                               "`pip install mamba-ssm causal-conv1d` (see README, GPU setup).")
        return CUDA_BACKEND
    return CUDA_BACKEND if on_cuda and _cuda_selective_scan is not None else TORCH_BACKEND
