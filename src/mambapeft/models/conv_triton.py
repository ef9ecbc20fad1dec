"""Mamba's causal depthwise conv (+ SiLU) over a whole sequence, forward and backward, as two Triton
kernels with the interface of causal-conv1d's ``causal_conv1d_fwd_function`` / ``_bwd_function``.

Each program holds a (BLOCK_D channels x BLOCK_L steps) tile and reads the W-1 steps before it
from the same (cached) lines; the backward recomputes the pre-activation it needs (the W steps
after each position) instead of reading it, and sums its tile's share of the weight and bias
gradients before one atomic add per channel and tap. Imported only by ``scan.py``; reference:
``scan.causal_conv1d_torch``.

Shapes: x, out, dout, dx: (B, D, L), any batch and channel strides, unit stride along L (a
channel-major (D, B, L) storage reads and writes uncopied); weight: (D, W); bias: (D,).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D, BLOCK_L = 16, 256  # 4,096 elements a tile: 32 per thread at 4 warps


@triton.jit
def _pre_activation(x_ptrs, w_ptr, bias, channel, in_channels, shift, length, stride_w_channel, stride_w_tap,
                    step, WIDTH: tl.constexpr):
    """bias + sum_k w_k x_{t + shift - (W-1) + k}: the conv at step t + shift, (BLOCK_D, BLOCK_L) fp32."""
    acc = bias
    for k in tl.static_range(WIDTH):
        source = step + shift - (WIDTH - 1) + k
        w = tl.load(w_ptr + channel * stride_w_channel + k * stride_w_tap, mask=in_channels, other=0.0).to(tl.float32)
        x = tl.load(x_ptrs + (shift - (WIDTH - 1) + k),
                    mask=in_channels[:, None] & ((source >= 0) & (source < length))[None, :], other=0.0)
        acc += w[:, None] * x.to(tl.float32)
    return acc


@triton.jit
def _bias_tile(b_ptr, channel, in_channels, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    bias = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + channel, mask=in_channels, other=0.0).to(tl.float32)[:, None]
    return bias


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, channels, length,
                     stride_x_batch, stride_x_channel, stride_w_channel, stride_w_tap,
                     stride_out_batch, stride_out_channel,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    batch = tl.program_id(2)
    channel = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    step = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    in_channels = channel < channels
    x_ptrs = x_ptr + batch * stride_x_batch + channel[:, None] * stride_x_channel + step[None, :]
    out = _pre_activation(x_ptrs, w_ptr, _bias_tile(b_ptr, channel, in_channels, HAS_BIAS, BLOCK_D, BLOCK_L),
                          channel, in_channels, 0, length, stride_w_channel, stride_w_tap, step, WIDTH)
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(out_ptr + batch * stride_out_batch + channel[:, None] * stride_out_channel + step[None, :],
             out.to(out_ptr.dtype.element_ty), mask=in_channels[:, None] & (step < length)[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, channels, length,
                     stride_x_batch, stride_x_channel, stride_w_channel, stride_w_tap,
                     stride_dout_batch, stride_dout_channel, stride_dx_batch, stride_dx_channel,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """dw (D, W) and db (D,) are fp32 and zeroed: this adds to them."""
    batch = tl.program_id(2)
    channel = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    step = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    in_channels = channel < channels
    x_ptrs = x_ptr + batch * stride_x_batch + channel[:, None] * stride_x_channel + step[None, :]
    dout_ptrs = dout_ptr + batch * stride_dout_batch + channel[:, None] * stride_dout_channel + step[None, :]
    bias = _bias_tile(b_ptr, channel, in_channels, HAS_BIAS, BLOCK_D, BLOCK_L)
    dx = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    for shift in tl.static_range(WIDTH):  # x_t feeds the outputs at t .. t + W-1, through tap W-1-shift
        later = step + shift
        grad = tl.load(dout_ptrs + shift, mask=in_channels[:, None] & (later < length)[None, :],
                       other=0.0).to(tl.float32)
        if SILU:
            pre = _pre_activation(x_ptrs, w_ptr, bias, channel, in_channels, shift, length, stride_w_channel,
                                  stride_w_tap, step, WIDTH)
            gate = tl.sigmoid(pre)
            grad = grad * gate * (1.0 + pre * (1.0 - gate))
        w = tl.load(w_ptr + channel * stride_w_channel + (WIDTH - 1 - shift) * stride_w_tap,
                    mask=in_channels, other=0.0).to(tl.float32)
        dx += w[:, None] * grad
        if shift == 0:  # this tile's own outputs: their share of the weight and bias gradients
            for k in tl.static_range(WIDTH):
                source = step - (WIDTH - 1) + k
                x = tl.load(x_ptrs + (k - (WIDTH - 1)),
                            mask=in_channels[:, None] & ((source >= 0) & (source < length))[None, :], other=0.0)
                tl.atomic_add(dw_ptr + channel * WIDTH + k, tl.sum(grad * x.to(tl.float32), axis=1),
                              mask=in_channels)
            if HAS_BIAS:
                tl.atomic_add(db_ptr + channel, tl.sum(grad, axis=1), mask=in_channels)
    tl.store(dx_ptr + batch * stride_dx_batch + channel[:, None] * stride_dx_channel + step[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=in_channels[:, None] & (step < length)[None, :])


def _grid(x: torch.Tensor) -> tuple[int, int, int]:
    batch, channels, length = x.shape
    return triton.cdiv(length, BLOCK_L), triton.cdiv(channels, BLOCK_D), batch


def _unsupported(**arguments) -> None:
    """The causal-conv1d arguments these kernels do not implement must be left unset."""
    given = [name for name, value in arguments.items() if value not in (None, False)]
    if given:
        raise NotImplementedError(f"the Triton causal conv does not implement {', '.join(given)}")


def causal_conv1d_fwd_function(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
    """causal-conv1d's forward: out (B, D, L), in x's layout where x is dense (``empty_like``, as there)."""
    _unsupported(seq_idx=seq_idx, initial_states=initial_states, final_states_out=final_states_out)
    if x.stride(-1) != 1:
        raise ValueError("the Triton causal conv needs x with a unit stride along L")
    out = torch.empty_like(x)
    _conv_fwd_kernel[_grid(x)](x, weight, bias, out, x.shape[1], x.shape[2], *x.stride()[:2], *weight.stride(),
                               *out.stride()[:2], WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=bool(silu),
                               BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, num_warps=4)
    return out


def causal_conv1d_bwd_function(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial,
                               silu):
    """causal-conv1d's backward: (dx, dweight, dbias, None); dx written into ``dx`` where given."""
    _unsupported(seq_idx=seq_idx, initial_states=initial_states, dfinal_states=dfinal_states,
                 return_dinitial=return_dinitial)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dx = torch.empty_like(x) if dx is None else dx
    dweight = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    dbias = torch.zeros(weight.shape[0], device=x.device, dtype=torch.float32) if bias is not None else None
    _conv_bwd_kernel[_grid(x)](x, weight, bias, dout, dx, dweight, dbias, x.shape[1], x.shape[2], *x.stride()[:2],
                               *weight.stride(), *dout.stride()[:2], *dx.stride()[:2], WIDTH=weight.shape[1],
                               HAS_BIAS=bias is not None, SILU=bool(silu), BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L,
                               num_warps=4)
    return (dx, dweight.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None, None)
