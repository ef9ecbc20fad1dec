"""One generation step of a causal depthwise conv as a single Triton kernel: what causal-conv1d's
``causal_conv1d_update`` does, for machines without that package (mamba-ssm then falls back to six
PyTorch kernels). Imported only by ``scan.py``, which wraps it as a backend's ``conv_update``; its
reference is ``scan.causal_conv1d_update_torch``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_CHANNELS = 128  # channels per program: 128 x width taps, one thread per channel at 4 warps


@triton.jit
def _conv_update_kernel(x_ptr, state_ptr, weight_ptr, bias_ptr, out_ptr, channels,
                        stride_x_batch, stride_x_channel,
                        stride_state_batch, stride_state_channel, stride_state_tap,
                        stride_weight_channel, stride_weight_tap,
                        stride_out_batch, stride_out_channel,
                        WIDTH: tl.constexpr, BLOCK_WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    batch = tl.program_id(1)
    channel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    tap = tl.arange(0, BLOCK_WIDTH)  # (BLOCK_WIDTH,)
    in_range = channel < channels
    taps = in_range[:, None] & (tap[None, :] < WIDTH)
    state = (state_ptr + batch * stride_state_batch + channel[:, None] * stride_state_channel
             + tap[None, :] * stride_state_tap)  # (BLOCK, BLOCK_WIDTH) pointers
    # the window after the update: taps 0..W-2 are the state's taps 1..W-1, tap W-1 the new input
    older = tl.load(state + stride_state_tap, mask=in_range[:, None] & (tap[None, :] < WIDTH - 1), other=0.0)
    x = tl.load(x_ptr + batch * stride_x_batch + channel * stride_x_channel, mask=in_range, other=0.0)
    window = tl.where(tap[None, :] == WIDTH - 1, x[:, None].to(older.dtype), older)
    weight = tl.load(weight_ptr + channel[:, None] * stride_weight_channel + tap[None, :] * stride_weight_tap,
                     mask=taps, other=0.0)
    out = tl.sum(window.to(tl.float32) * weight.to(tl.float32), axis=1)  # (BLOCK,)
    if HAS_BIAS:
        out += tl.load(bias_ptr + channel, mask=in_range, other=0.0).to(tl.float32)
    if SILU:
        out = out * tl.sigmoid(out)
    # every thread of the program has read the old window before any thread overwrites it (a
    # channel's taps may sit in different threads, and tap t is read to become tap t-1)
    tl.debug_barrier()
    tl.store(state, window, mask=taps)
    tl.store(out_ptr + batch * stride_out_batch + channel * stride_out_channel,
             out.to(out_ptr.dtype.element_ty), mask=in_range)


def causal_conv1d_update_triton(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None = None, activation: str | None = "silu") -> torch.Tensor:
    """x (B, D) enters ``conv_state`` (B, D, W) in place (the last W inputs, in the state's dtype);
    weight (D, W), bias (D,). Returns the (silu-)activated conv output (B, D) in x's dtype, computed in fp32."""
    batch, channels = x.shape
    width = weight.shape[-1]
    if conv_state.shape != (batch, channels, width):
        raise ValueError(f"conv state {tuple(conv_state.shape)} does not match x {tuple(x.shape)} and width {width}")
    out = torch.empty_like(x)
    grid = (triton.cdiv(channels, BLOCK_CHANNELS), batch)
    with torch.cuda.device(x.device.index):
        _conv_update_kernel[grid](
            x, conv_state, weight, x if bias is None else bias, out, channels,  # x: a valid, never-read pointer
            x.stride(0), x.stride(1), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
            weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
            WIDTH=width, BLOCK_WIDTH=triton.next_power_of_2(width), BLOCK=BLOCK_CHANNELS,
            HAS_BIAS=bias is not None, SILU=activation == "silu", num_warps=4)
    return out
