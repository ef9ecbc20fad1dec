"""Mamba's causal depthwise conv (+ SiLU) over a whole sequence, forward only, as one Triton kernel
with the interface of causal-conv1d's ``causal_conv1d_fwd_function``.

Same output bit for bit, in about half the time at the training shapes (one H200, bf16, x half of a
channel-major xz: (32, 4096, 256) 66 against 122 us, Vim-S's (32, 768, 197) 19 against 43 us; with
the tile below, 54-61 and 11 us). Each
program holds a (BLOCK_D channels x BLOCK_L steps) tile and reads the W-1 steps before it from the
same cached lines. The backward stays causal-conv1d's: a Triton one (the pre-activation recomputed
at the W steps after each position, weight and bias gradients summed per tile) took 394-720 us
against its 266 at the first shape, over twelve tile shapes. Imported only by ``scan.py``;
reference: ``scan.causal_conv1d_torch``.

Shapes: x, out: (B, D, L), any batch and channel strides, unit stride along L (a channel-major
(D, B, L) storage reads and writes uncopied); weight: (D, W); bias: (D,).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# 1,024 elements a tile, 16 per thread at 2 warps: four times the programs of 16 channels at 4 warps,
# and 16-20% faster at Vim-S's (32, 768, 197) (13.1-13.8 -> 10.9-11.1 us), 1-5% at Mamba-1.4b's (32,
# 4096, 256) (54.2-61.4 against 57.1-62.0 us); one H200, graph-timed, both directions. Of fifteen tiles
# (2-32 channels, 64-256 steps, 1-8 warps) none was faster at both shapes by more than the spread
# between runs; the output is bit for bit the same
BLOCK_D, BLOCK_L = 4, 256
# multiply-adds contracted to FMAs, as nvcc compiles causal-conv1d: the sums equal its bit for bit only
# so. Triton's default today, said explicitly (Triton 3.9 warns that 3.10 will not contract by default)
LAUNCH = {"num_warps": 2, "enable_fp_fusion": True}


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, channels, length,
                     stride_x_batch, stride_x_channel, stride_w_channel, stride_w_tap,
                     stride_out_batch, stride_out_channel,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    batch = tl.program_id(2)
    channel = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    step = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    in_channels = channel < channels
    x_rows = x_ptr + batch * stride_x_batch + channel[:, None] * stride_x_channel
    out = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    if HAS_BIAS:
        out += tl.load(b_ptr + channel, mask=in_channels, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(WIDTH):  # out_t = bias + sum_k w_k x_{t-(W-1)+k}, zero before the start
        # REVERSE: the conv from the last step to the first, at the positions stored: the sum runs over
        # the W-1 steps after (in the order the flipped sequence sums them), and the loads stay ascending
        source = step + (WIDTH - 1 - k) if REVERSE else step - (WIDTH - 1) + k
        w = tl.load(w_ptr + channel * stride_w_channel + k * stride_w_tap, mask=in_channels, other=0.0)
        x = tl.load(x_rows + source[None, :],
                    mask=in_channels[:, None] & ((source >= 0) & (source < length))[None, :], other=0.0)
        out += w.to(tl.float32)[:, None] * x.to(tl.float32)
    if SILU:
        out = out / (1.0 + tl.exp(-out))  # as causal-conv1d writes it (tl.sigmoid, a jit function, fails interpreted)
    tl.store(out_ptr + batch * stride_out_batch + channel[:, None] * stride_out_channel + step[None, :],
             out.to(out_ptr.dtype.element_ty), mask=in_channels[:, None] & (step < length)[None, :])


def _grid(x: torch.Tensor) -> tuple[int, int, int]:
    batch, channels, length = x.shape
    return triton.cdiv(length, BLOCK_L), triton.cdiv(channels, BLOCK_D), batch


def _unsupported(**arguments) -> None:
    """The causal-conv1d arguments this kernel does not implement must be None."""
    given = [name for name, value in arguments.items() if value is not None]
    if given:
        raise NotImplementedError(f"the Triton causal conv does not implement {', '.join(given)}")


def causal_conv1d_fwd_function(x, weight, bias, seq_idx, initial_states, final_states_out, silu, reverse=False):
    """causal-conv1d's forward: out (B, D, L), in x's layout where x is dense (``empty_like``, as there).
    ``reverse`` (ours only): the conv run from the last step to the first, as on x flipped along time,
    its output in x's order."""
    _unsupported(seq_idx=seq_idx, initial_states=initial_states, final_states_out=final_states_out)
    if x.stride(-1) != 1:
        raise ValueError("the Triton causal conv needs x with a unit stride along L")
    out = torch.empty_like(x)
    _conv_fwd_kernel[_grid(x)](x, weight, bias, out, x.shape[1], x.shape[2], *x.stride()[:2], *weight.stride(),
                               *out.stride()[:2], WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=bool(silu),
                               REVERSE=bool(reverse), BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, **LAUNCH)
    return out
