"""An RMSNorm's output rebuilt from its fp32 input and saved 1/rms, as one Triton kernel.

mamba_ssm's fused residual add + RMSNorm computes ``y = (x * rstd) * w`` in fp32 from the summed
residual x and each row's rstd, then rounds y to its dtype. The same two products on the same stored
x and rstd give the same y bit for bit, so a backward that needs y (LoRA's down-projection, where
the block's norm feeds in_proj) can rebuild it from what the norm keeps anyway (``scan.py:
add_rms_norm_cuda``, ``models/rebuild.py``), instead of keeping its own copy: 32 MiB a layer at
mamba-1.4b, micro-batch 32 x 256 tokens. One pass (read x, write y): three PyTorch elementwise kernels
would each write an fp32 temporary. Reference: ``(x * rstd[:, None] * w.float()).to(dtype)``.

Shapes: x (M, N) fp32, rows contiguous; rstd (M,) fp32; weight (N,); out (M, N) any float dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N = 4, 1024  # 4,096 elements a program: 32 per thread at 4 warps


@triton.jit
def _rms_normed_kernel(x_ptr, rstd_ptr, w_ptr, out_ptr, rows, cols, stride_x_row, stride_out_row,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (row < rows)[:, None] & (col < cols)[None, :]
    x = tl.load(x_ptr + row.to(tl.int64)[:, None] * stride_x_row + col[None, :], mask=inside, other=0.0)
    rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
    w = tl.load(w_ptr + col, mask=col < cols, other=0.0).to(tl.float32)
    y = (x * rstd[:, None]) * w[None, :]  # the norm kernel's x_hat = x * rstd; y = x_hat * w
    tl.store(out_ptr + row.to(tl.int64)[:, None] * stride_out_row + col[None, :],
             y.to(out_ptr.dtype.element_ty), mask=inside)


def rms_normed(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (..., N) fp32 with rows of unit stride, rstd (x.numel() // N,) fp32, weight (N,) -> (..., N) in ``dtype``."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape, dtype=dtype, device=x.device)
    grid = (triton.cdiv(rows.shape[0], BLOCK_M), triton.cdiv(rows.shape[1], BLOCK_N))
    _rms_normed_kernel[grid](rows, rstd, weight, out, rows.shape[0], rows.shape[1], rows.stride(0), out.stride(0),
                             BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return out.view(x.shape)
