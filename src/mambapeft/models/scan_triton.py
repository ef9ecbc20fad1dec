"""Mamba-1's selective scan for short sequences as two Triton kernels, forward and backward.

mamba-ssm's CUDA scan gives each (batch, channel) pair its own thread block and adds that channel's
share of dB and dC (per batch, state and step) to global memory with an atomic add: D_inner adds per
element, half of its backward at the training shapes (one H200: with B and C fixed instead, the
backward took 0.31 against 0.66 ms at Vim-S's (32, 768, 197, 16) and 1.38 against 2.93 ms at
Mamba-1.4b's (32, 4096, 256, 16)). Here one program holds a tile of BLOCK_D channels by the whole
sequence in registers, runs each state's recurrence as a parallel scan along time
(``tl.associative_scan``), and sums its channels' share of dB and dC before one atomic add: D_inner /
BLOCK_D adds per element. The sequence must fit one tile (:data:`MAX_LENGTH`); the backward
recomputes the states instead of saving them, as mamba-ssm's does.

Imported only by ``scan.py``. Shapes (mamba_ssm's ``selective_scan_fn``, one group of B and C):
    u, delta, z: (B, D, L), time contiguous    A: (D, N) fp32    B, C: (B, N, L)    D, delta_bias: (D,) fp32
Reference: ``scan.selective_scan_torch``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_LENGTH = 1024  # the longest sequence one program holds: BLOCK_D x this many steps of each tile


@triton.jit
def _linear_recurrence(decay_left, value_left, decay_right, value_right):
    """Two consecutive spans of h_t = decay_t * h_{t-1} + value_t composed into one."""
    return decay_left * decay_right, value_left * decay_right + value_right


@triton.jit
def _step_sizes(delta_ptrs, bias_ptr, channel, in_channels, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta (+ bias), through softplus: dt (BLOCK_D, BLOCK_L) fp32, 0 outside ``mask`` (a padded
    step then keeps the state and adds nothing), and softplus' derivative for the backward."""
    raw = tl.load(delta_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + channel, mask=in_channels, other=0.0).to(tl.float32)[:, None]
    slope = tl.full(raw.shape, 1.0, tl.float32)
    if SOFTPLUS:  # mamba-ssm's: log1p(exp(x)) up to 20, x above
        dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(raw, 20.0))), raw)
        slope = tl.sigmoid(raw)
    else:
        dt = raw
    return tl.where(mask, dt, 0.0), slope


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, out_z_ptr, last_ptr,
                     channels, length,
                     stride_u_batch, stride_u_channel, stride_delta_batch, stride_delta_channel,
                     stride_A_channel, stride_A_state, stride_B_batch, stride_B_state,
                     stride_C_batch, stride_C_state, stride_z_batch, stride_z_channel,
                     stride_out_batch, stride_out_channel, stride_out_z_batch, stride_out_z_channel,
                     stride_last_batch, stride_last_channel, stride_last_state,
                     STATES: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, WRITE_LAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    batch = tl.program_id(1)
    channel = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    step = tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    in_channels, in_time = channel < channels, step < length
    mask = in_channels[:, None] & in_time[None, :]
    u = tl.load(u_ptr + batch * stride_u_batch + channel[:, None] * stride_u_channel + step[None, :],
                mask=mask, other=0.0).to(tl.float32)
    dt, _ = _step_sizes(delta_ptr + batch * stride_delta_batch + channel[:, None] * stride_delta_channel + step[None, :],
                        bias_ptr, channel, in_channels, mask, HAS_BIAS, SOFTPLUS)
    dt_u = dt * u
    y = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    for n in range(STATES):
        a = tl.load(A_ptr + channel * stride_A_channel + n * stride_A_state, mask=in_channels, other=0.0)
        b = tl.load(B_ptr + batch * stride_B_batch + n * stride_B_state + step, mask=in_time, other=0.0).to(tl.float32)
        c = tl.load(C_ptr + batch * stride_C_batch + n * stride_C_state + step, mask=in_time, other=0.0).to(tl.float32)
        _, h = tl.associative_scan((tl.exp(dt * a[:, None]), dt_u * b[None, :]), 1, _linear_recurrence)
        y += h * c[None, :]
        if WRITE_LAST:  # padded steps keep the state: the last column is the state after step L-1
            last = tl.sum(tl.where(step[None, :] == BLOCK_L - 1, h, 0.0), axis=1)
            tl.store(last_ptr + batch * stride_last_batch + channel * stride_last_channel + n * stride_last_state,
                     last, mask=in_channels)
    if HAS_D:
        y += u * tl.load(D_ptr + channel, mask=in_channels, other=0.0)[:, None]
    tl.store(out_ptr + batch * stride_out_batch + channel[:, None] * stride_out_channel + step[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_Z:
        z = tl.load(z_ptr + batch * stride_z_batch + channel[:, None] * stride_z_channel + step[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        tl.store(out_z_ptr + batch * stride_out_z_batch + channel[:, None] * stride_out_z_channel + step[None, :],
                 (y * z * tl.sigmoid(z)).to(out_z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, dout_ptr,
                     du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, out_z_ptr,
                     channels, length,
                     stride_u_batch, stride_u_channel, stride_delta_batch, stride_delta_channel,
                     stride_A_channel, stride_A_state, stride_B_batch, stride_B_state,
                     stride_C_batch, stride_C_state, stride_z_batch, stride_z_channel,
                     stride_out_batch, stride_out_channel, stride_dout_batch, stride_dout_channel,
                     stride_du_batch, stride_du_channel, stride_ddelta_batch, stride_ddelta_channel,
                     stride_dz_batch, stride_dz_channel, stride_out_z_batch, stride_out_z_channel,
                     STATES: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, WRITE_OUT_Z: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """dA (D, N), dB and dC (B, N, L), dD and dbias (D,) are fp32 and zeroed: this adds to them."""
    batch = tl.program_id(1)
    channel = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    step = tl.arange(0, BLOCK_L)
    in_channels, in_time = channel < channels, step < length
    mask = in_channels[:, None] & in_time[None, :]
    tile = channel[:, None] * 0 + step[None, :]  # offsets along time, broadcast to the tile
    u = tl.load(u_ptr + batch * stride_u_batch + channel[:, None] * stride_u_channel + tile,
                mask=mask, other=0.0).to(tl.float32)
    delta_ptrs = delta_ptr + batch * stride_delta_batch + channel[:, None] * stride_delta_channel + tile
    dt, slope = _step_sizes(delta_ptrs, bias_ptr, channel, in_channels, mask, HAS_BIAS, SOFTPLUS)
    # dt one step later: the decay that carries the state's gradient from step t+1 back to step t
    dt_next, _ = _step_sizes(delta_ptrs + 1, bias_ptr, channel, in_channels, mask & (tile + 1 < length), HAS_BIAS, SOFTPLUS)
    dy = tl.load(dout_ptr + batch * stride_dout_batch + channel[:, None] * stride_dout_channel + tile,
                 mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:  # out = y * silu(z), y saved by the forward
        z = tl.load(z_ptr + batch * stride_z_batch + channel[:, None] * stride_z_channel + tile,
                    mask=mask, other=0.0).to(tl.float32)
        y = tl.load(out_ptr + batch * stride_out_batch + channel[:, None] * stride_out_channel + tile,
                    mask=mask, other=0.0).to(tl.float32)
        gate = tl.sigmoid(z)
        tl.store(dz_ptr + batch * stride_dz_batch + channel[:, None] * stride_dz_channel + tile,
                 (dy * y * gate * (1.0 + z * (1.0 - gate))).to(dz_ptr.dtype.element_ty), mask=mask)
        if WRITE_OUT_Z:
            tl.store(out_z_ptr + batch * stride_out_z_batch + channel[:, None] * stride_out_z_channel + tile,
                     (y * z * gate).to(out_z_ptr.dtype.element_ty), mask=mask)
        dy = dy * z * gate
    du = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    if HAS_D:
        du += dy * tl.load(D_ptr + channel, mask=in_channels, other=0.0)[:, None]
        tl.atomic_add(dD_ptr + channel, tl.sum(dy * u, axis=1), mask=in_channels)
    ddt = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    dt_u = dt * u
    for n in range(STATES):
        a = tl.load(A_ptr + channel * stride_A_channel + n * stride_A_state, mask=in_channels, other=0.0)
        b = tl.load(B_ptr + batch * stride_B_batch + n * stride_B_state + step, mask=in_time, other=0.0).to(tl.float32)
        c = tl.load(C_ptr + batch * stride_C_batch + n * stride_C_state + step, mask=in_time, other=0.0).to(tl.float32)
        added = dt_u * b[None, :]
        _, h = tl.associative_scan((tl.exp(dt * a[:, None]), added), 1, _linear_recurrence)
        # g_t = dL/dh_t = c_t dy_t + decay_{t+1} g_{t+1}: the same recurrence, run backwards in time
        _, g = tl.associative_scan((tl.exp(dt_next * a[:, None]), dy * c[None, :]), 1, _linear_recurrence,
                                   reverse=True)
        carried = h - added  # decay_t * h_{t-1}, as mamba-ssm's backward gets it
        g_dt = g * dt
        du += g_dt * b[None, :]
        ddt += g * (a[:, None] * carried + u * b[None, :])
        tl.atomic_add(dA_ptr + channel * STATES + n, tl.sum(g_dt * carried, axis=1), mask=in_channels)
        tl.atomic_add(dB_ptr + (batch * STATES + n) * length + step, tl.sum(g_dt * u, axis=0), mask=in_time)
        tl.atomic_add(dC_ptr + (batch * STATES + n) * length + step, tl.sum(dy * h, axis=0), mask=in_time)
    ddt *= slope
    tl.store(du_ptr + batch * stride_du_batch + channel[:, None] * stride_du_channel + tile,
             du.to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(ddelta_ptr + batch * stride_ddelta_batch + channel[:, None] * stride_ddelta_channel + tile,
             ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + channel, tl.sum(ddt, axis=1), mask=in_channels)


def fits(length: int) -> bool:
    """Whether a sequence of ``length`` steps fits one program's tile."""
    return length <= MAX_LENGTH


def _tile(length: int, block_d: int | None = None, num_warps: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, num_warps): about 2,048 elements of each tile, 16 per thread at 4 warps."""
    block_l = max(16, triton.next_power_of_2(length))
    return block_d or max(1, 2048 // block_l), block_l, num_warps or 4


def _one_group(t: torch.Tensor) -> torch.Tensor:
    """B or C as (B, N, L), time contiguous: (B, 1, N, L) (the kernels' grouped form) loses its group."""
    if t.dim() == 4:
        if t.shape[1] != 1:
            raise ValueError(f"the Triton scan takes one group of B and C, not {t.shape[1]}")
        t = t[:, 0]
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_time_contiguous(*tensors: torch.Tensor | None) -> None:
    """The kernels step through time by unit offsets, as mamba-ssm's require of every sequence."""
    if any(t is not None and t.stride(-1) != 1 for t in tensors):
        raise ValueError("the Triton scan needs every (..., L) input with a unit stride along L")


def _strides(t: torch.Tensor | None, dims: int = 2) -> tuple[int, ...]:
    return t.stride()[:dims] if t is not None else (0,) * dims


def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=False, block_d=None, num_warps=None):
    """mamba_ssm's ``selective_scan_cuda.fwd``: (out before the gate, None (nothing saved for the
    backward), out * silu(z) or None), and the last state (B, D, N) fp32 when asked for."""
    _check_time_contiguous(u, delta, z)
    batch, channels, length = u.shape
    states = A.shape[1]
    B, C = _one_group(B), _one_group(C)
    out = torch.empty_like(u)
    out_z = torch.empty_like(u) if z is not None else None
    last = u.new_empty(batch, channels, states, dtype=torch.float32) if return_last_state else None
    block_d, block_l, warps = _tile(length, block_d, num_warps)
    grid = (triton.cdiv(channels, block_d), batch)
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, out, out_z, last, channels, length,
        *_strides(u), *_strides(delta), *A.stride(), *_strides(B), *_strides(C), *_strides(z), *_strides(out),
        *_strides(out_z), *(last.stride() if last is not None else (0, 0, 0)),
        STATES=states, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), WRITE_LAST=return_last_state, BLOCK_D=block_d, BLOCK_L=block_l,
        num_warps=warps)
    return (out, None, out_z, last) if return_last_state else (out, None, out_z)


def bwd(u, delta, A, B, C, D, z, delta_bias, dout, intermediates, out, dz, delta_softplus, recompute_out_z,
        block_d=None, num_warps=None):
    """mamba_ssm's ``selective_scan_cuda.bwd``: (du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z),
    dB and dC in B's and C's shape; dz written into ``dz`` where given; ``intermediates`` unused (the
    states are recomputed); ``out`` is the forward's output before the gate (read only with z)."""
    _check_time_contiguous(u, delta, z, dout, out)
    batch, channels, length = u.shape
    states = A.shape[1]
    B_shape, C_shape = B.shape, C.shape
    B, C = _one_group(B), _one_group(C)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    if z is not None and dz is None:
        dz = torch.empty_like(z)
    out_z = torch.empty_like(u) if z is not None and recompute_out_z else None
    dA = torch.zeros_like(A, dtype=torch.float32)
    dB, dC = (torch.zeros(batch, states, length, device=u.device, dtype=torch.float32) for _ in range(2))
    dD = torch.zeros_like(D, dtype=torch.float32) if D is not None else None
    dbias = torch.zeros_like(delta_bias, dtype=torch.float32) if delta_bias is not None else None
    block_d, block_l, warps = _tile(length, block_d, num_warps)
    grid = (triton.cdiv(channels, block_d), batch)
    _scan_bwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, out, dout, du, ddelta, dA, dB, dC, dD, dz, dbias, out_z,
        channels, length,
        *_strides(u), *_strides(delta), *A.stride(), *_strides(B), *_strides(C), *_strides(z), *_strides(out),
        *_strides(dout), *_strides(du), *_strides(ddelta), *_strides(dz), *_strides(out_z),
        STATES=states, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), WRITE_OUT_Z=out_z is not None, BLOCK_D=block_d, BLOCK_L=block_l,
        num_warps=warps)
    cast = lambda grad, like: grad.to(like.dtype) if grad is not None else None  # noqa: E731
    return (du, ddelta, cast(dA, A), dB.to(B.dtype).view(B_shape), dC.to(C.dtype).view(C_shape),
            cast(dD, D), cast(dbias, delta_bias), dz, out_z)
