"""An RMSNorm's output rebuilt from its fp32 input and saved 1/rms, and its backward, as Triton kernels.

mamba_ssm's fused residual add + RMSNorm computes ``y = (x * rstd) * w`` in fp32 from the summed
residual x and each row's rstd, then rounds y to its dtype. The same two products on the same stored
x and rstd give the same y bit for bit, so a backward that needs y (LoRA's down-projection, where
the block's norm feeds in_proj) can rebuild it from what the norm keeps anyway (``scan.py:
add_rms_norm_cuda``, ``models/rebuild.py``), instead of keeping its own copy: 32 MiB a layer at
mamba-1.4b, micro-batch 32 x 256 tokens. One pass (read x, write y): three PyTorch elementwise kernels
would each write an fp32 temporary. Reference: ``(x * rstd[:, None] * w.float()).to(dtype)``.

The backward (:func:`rms_norm_backward`) computes what mamba_ssm's ``_layer_norm_bwd`` does for this
norm, but over a grid of row tiles: mamba_ssm's runs one program per SM, each stepping through its
rows one at a time (H200, Vim-S at batch 32, 6,304 x 384: 54 us a call, most of it waiting on each
row's loads; ``mambapeft bench profile``); the tiles add their share of the weight's gradient to one
sum. Reference: with x_hat = x * rstd and g = w * dy, ``dx = (g - x_hat * mean(x_hat * g)) * rstd
(+ dresidual)``, ``dw = sum over rows of dy * x_hat``.

Shapes: x (M, N) fp32, rows contiguous; rstd (M,) fp32; weight (N,); out (M, N) any float dtype;
dy, dresidual (M, N) rows contiguous.
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


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, rstd_ptr, w_ptr, dy_ptr, dres_ptr, dx_ptr, dres_in_ptr, dw_ptr, rowscale_ptr, rows,
                         cols, stride_x_row, stride_dy_row, stride_dres_row, stride_dx_row, stride_dres_in_row,
                         HAS_DRESIDUAL: tl.constexpr, STORE_DRESIDUAL: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
                         HAS_ROWSCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    inside = (row < rows)[:, None] & (col < cols)[None, :]
    row64 = row.to(tl.int64)[:, None]
    x = tl.load(x_ptr + row64 * stride_x_row + col[None, :], mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row64 * stride_dy_row + col[None, :], mask=inside, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
    w = tl.load(w_ptr + col, mask=col < cols, other=0.0).to(tl.float32)
    x_hat = x * rstd[:, None]
    g = w[None, :] * dy
    dx = (g - x_hat * (tl.sum(x_hat * g, axis=1) / cols)[:, None]) * rstd[:, None]
    if HAS_DRESIDUAL:
        dx += tl.load(dres_ptr + row64 * stride_dres_row + col[None, :], mask=inside, other=0.0).to(tl.float32)
    if STORE_DRESIDUAL:
        tl.store(dres_in_ptr + row64 * stride_dres_in_row + col[None, :], dx.to(dres_in_ptr.dtype.element_ty),
                 mask=inside)
    if HAS_ROWSCALE:  # the forward scaled hidden's rows before the add: hidden's gradient is the sum's times it
        dx *= tl.load(rowscale_ptr + row, mask=row < rows, other=0.0)[:, None]
    tl.store(dx_ptr + row64 * stride_dx_row + col[None, :], dx.to(dx_ptr.dtype.element_ty), mask=inside)
    if WEIGHT_GRAD:  # this tile's rows' sum, added to the zeroed sum of all (no partial sums summed after)
        tl.atomic_add(dw_ptr + col, tl.sum(dy * x_hat, axis=0), mask=col < cols, sem="relaxed")


BACKWARD_TILE = 4096  # elements a backward program holds: rows of the next power of two >= N


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                      dresidual: torch.Tensor | None, dx_dtype: torch.dtype, has_residual: bool,
                      weight_grad: bool, rowscale: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``y = x * rstd * weight`` (x the summed residual, (M, N) fp32) and of the residual
    passed on: (dx in ``dx_dtype``, dweight (N,) in weight's dtype when ``weight_grad`` else None, the
    residual input's gradient when ``has_residual`` (dx itself where x's dtype is dx's) else None), as mamba_ssm's
    ``_layer_norm_bwd(dy, x, weight, None, eps, None, rstd, dresidual, has_residual=...,
    is_rms_norm=True, x_dtype=dx_dtype, rowscale=rowscale)`` returns them: with ``rowscale`` (M,) fp32 (the
    forward's scale of each hidden row), dx times it and the residual's gradient not."""
    rows, cols = x.shape
    block_n = triton.next_power_of_2(cols)
    block_m = max(1, BACKWARD_TILE // block_n)
    grid = (triton.cdiv(rows, block_m),)
    dx = torch.empty(rows, cols, dtype=dx_dtype, device=x.device)
    store_residual = has_residual and (dx_dtype != x.dtype or rowscale is not None)
    dresidual_in = torch.empty_like(x) if store_residual else None
    # the weight's gradient summed by the tiles' atomic adds: a (tiles, N) partial sum reduced after took
    # a 16 us sum kernel a layer (788 x 384 at Vim-S's batch of 32, one H200) where the fill takes ~1 us;
    # in fp32 the order of the adds varies from run to run, as the scan's sums over channels do
    dw = torch.zeros(cols, dtype=torch.float32, device=x.device) if weight_grad else None
    _rms_norm_bwd_kernel[grid](x, rstd, weight, dy, dresidual, dx, dresidual_in, dw, rowscale, rows, cols,
                               x.stride(0), dy.stride(0), 0 if dresidual is None else dresidual.stride(0),
                               dx.stride(0), 0 if dresidual_in is None else dresidual_in.stride(0),
                               HAS_DRESIDUAL=dresidual is not None, STORE_DRESIDUAL=store_residual,
                               WEIGHT_GRAD=weight_grad, HAS_ROWSCALE=rowscale is not None,
                               BLOCK_M=block_m, BLOCK_N=block_n,
                               num_warps=4 if block_m * block_n <= BACKWARD_TILE else 8)
    if has_residual and not store_residual:
        dresidual_in = dx
    return dx, None if dw is None else dw.to(weight.dtype), dresidual_in
