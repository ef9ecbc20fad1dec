"""Summed token cross-entropy on bf16 logits as two Triton kernels: the fp32 softmax read straight
from the logits, and their gradient written in their dtype.

``F.cross_entropy(logits.float(), ...)``, what the loss computed before, casts every chunk's logits to
fp32 (a copy of 256 x 50,280 values, twice: forward and recompute), runs the softmax on the copy,
zero-fills an fp32 gradient and casts it back: at mamba-1.4b, micro-batch 32, 8 ms of a 283 ms
step (one H200: copies 3.0 ms, softmax forward and backward 4.6 ms, fills 0.4 ms; these kernels
take 1.7 ms). Here one pass over the logits
gives each row's log-sum-exp and loss (saved: one fp32 per row), and one more the gradient,
softmax minus one-hot times the loss' gradient, cast once. Same values up to the order of fp32
additions in the row sums. Imported only by ``train/language.py``; reference: ``F.cross_entropy``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096  # vocabulary entries a program reads at a time: 16 per thread at 8 warps
NUM_WARPS = 8


@triton.jit
def _cross_entropy_fwd_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, stride_row, ignore_index,
                              VOCAB: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    start = logits_ptr + row.to(tl.int64) * stride_row
    offsets = tl.arange(0, BLOCK_V)
    running_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_V,), tl.float32)
    for first in range(0, VOCAB, BLOCK_V):  # online softmax: per lane, rescaled when its maximum rises
        x = tl.load(start + first + offsets, mask=first + offsets < VOCAB, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        rescale = tl.where(running_max == new_max, 1.0, tl.exp(running_max - new_max))
        running_sum = running_sum * rescale + tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    lse = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))
    target = tl.load(targets_ptr + row)  # < VOCAB: the same ids went through the embedding, which checks
    ignored = target == ignore_index
    picked = tl.load(start + tl.where(ignored, 0, target)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - picked))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(logits_ptr, targets_ptr, lse_ptr, grad_loss_ptr, grad_ptr, stride_row,
                              stride_grad_row, ignore_index, VOCAB: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_V
    offsets = first + tl.arange(0, BLOCK_V)
    in_vocab = offsets < VOCAB
    target = tl.load(targets_ptr + row)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offsets, mask=in_vocab, other=0.0).to(tl.float32)
    grad = tl.exp(x - tl.load(lse_ptr + row)) - tl.where(offsets == target, 1.0, 0.0)
    grad = tl.where(target == ignore_index, 0.0, grad * tl.load(grad_loss_ptr))
    tl.store(grad_ptr + row.to(tl.int64) * stride_grad_row + offsets, grad.to(grad_ptr.dtype.element_ty),
             mask=in_vocab)


class _TokenCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        rows, vocab = logits.shape
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        losses = logits.new_empty(rows, dtype=torch.float32)
        lse = torch.empty_like(losses)
        _cross_entropy_fwd_kernel[(rows,)](logits, targets, losses, lse, logits.stride(0), ignore_index,
                                           VOCAB=vocab, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        grad = torch.empty_like(logits)
        _cross_entropy_bwd_kernel[(rows, triton.cdiv(vocab, BLOCK_V))](
            logits, targets, lse, grad_loss.float(), grad, logits.stride(0), grad.stride(0), ctx.ignore_index,
            VOCAB=vocab, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
        return grad, None, None


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=...)``: logits (n, V)
    in any float dtype, targets (n,) int64; a 0-d fp32 tensor; the gradient in the logits' dtype."""
    return _TokenCrossEntropySum.apply(logits, targets, ignore_index)
