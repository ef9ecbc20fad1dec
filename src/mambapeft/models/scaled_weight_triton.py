"""ProDiaL's scaled weight where D_b is a diagonal (blocks of size 1), ``s[o] * (W[o, i] + W[o, i] r[i])``,
as one autograd node of Triton kernels, W frozen.

PyTorch's chain (``peft/prodial.py: ProdialLinear.scaled_weight``, the reference) runs three broadcast
kernels forward and four backward, one of them a sum over W's rows (9.6 us a call on average at Vim-S, one
H200), for each projection it wraps and each step. Here the forward is one elementwise pass, rounding as the
chain does (W r, then W + W r, then s times that: no multiply-add contracted); the backward one pass over
blocks of rows that writes s's gradient (the rows' sums of G P, P = W + W r recomputed) and each block's column
sums of G s W, summed by PyTorch after (a fixed order: no atomics). Imported only by ``peft/prodial.py``.

Shapes: W (out, in) contiguous fp32, r (in,) and s (out,) fp32 -> (out, in) fp32; the gradient G (out, in)
-> r's (in,) and s's (out,); fewer than 2**31 elements in W.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # the forward's elements a program
BLOCK_ROWS = 16  # the backward's rows a program: one row of the column sums it leaves
BLOCK_COLS = 128  # the backward's columns a step of a program's loop
MAX_ELEMENTS = 2**31  # element indices are int32
LAUNCH = {"enable_fp_fusion": False}  # the chain's roundings: each product rounded before its sum


@triton.jit
def _scaled_weight_kernel(w_ptr, r_ptr, s_ptr, out_ptr, rows, cols, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = index < rows * cols
    w = tl.load(w_ptr + index, mask=inside, other=0.0)
    r = tl.load(r_ptr + index % cols, mask=inside, other=0.0)
    s = tl.load(s_ptr + index // cols, mask=inside, other=0.0)
    tl.store(out_ptr + index, s * (w + w * r), mask=inside)


@triton.jit
def _scaled_weight_bwd_kernel(g_ptr, w_ptr, r_ptr, s_ptr, ds_ptr, column_sums_ptr, rows, cols,
                              BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_inside = row < rows
    s = tl.load(s_ptr + row, mask=row_inside, other=0.0)
    ds = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, cols, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        col_inside = col < cols
        inside = row_inside[:, None] & col_inside[None, :]
        at = row[:, None] * cols + col[None, :]
        g = tl.load(g_ptr + at, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + at, mask=inside, other=0.0)
        r = tl.load(r_ptr + col, mask=col_inside, other=0.0)
        ds += tl.sum(g * (w + w * r[None, :]), axis=1)  # d loss / d s: G times what s scales
        # d loss / d r: (G s) times W, as the chain's gradient of s's product reaches W r
        tl.store(column_sums_ptr + tl.program_id(0) * cols + col, tl.sum(g * s[:, None] * w, axis=0), mask=col_inside)
    tl.store(ds_ptr + row, ds, mask=row_inside)


class _DiagonallyScaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, column_scale, row_scale):
        out = torch.empty_like(weight)
        _scaled_weight_kernel[(triton.cdiv(weight.numel(), BLOCK),)](weight, column_scale, row_scale, out,
                                                                     *weight.shape, BLOCK=BLOCK, **LAUNCH)
        ctx.save_for_backward(weight, column_scale, row_scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, column_scale, row_scale = ctx.saved_tensors
        rows, cols = weight.shape
        programs = triton.cdiv(rows, BLOCK_ROWS)
        drow = torch.empty_like(row_scale)
        column_sums = weight.new_empty(programs, cols)
        _scaled_weight_bwd_kernel[(programs,)](grad.contiguous(), weight, column_scale, row_scale, drow, column_sums,
                                               rows, cols, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, **LAUNCH)
        return None, column_sums.sum(0), drow


def diagonally_scaled(weight: torch.Tensor, column_scale: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """``row_scale[:, None] * (weight + weight * column_scale)`` (module docstring); weight frozen."""
    return _DiagonallyScaled.apply(weight, column_scale, row_scale)
