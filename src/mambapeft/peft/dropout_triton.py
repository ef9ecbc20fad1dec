"""LoRA's ``lora_down(dropout(x))`` as one autograd node that keeps x and a seed, not the dropped x
and its mask, with the mask drawn by a Triton kernel from that seed.

``nn.Dropout`` keeps its mask (one byte an element) and ``lora_down`` the dropped x: at mamba-1.4b's
in_proj, micro-batch 32 x 256 tokens, 48 MiB a layer. Here the mask is Philox random numbers of
(seed, element index), drawn again in the backward, and x is what is kept: the block's normalised
input, which the norm's own saved tensors rebuild (``models/rebuild.py``), so nothing of this
node's is kept twice. Same distribution as ``nn.Dropout`` (each element kept with probability 1 - p,
scaled by 1 / (1 - p)), other draws. The seed is drawn from PyTorch's generator on the device, so
``torch.manual_seed`` reproduces a run and a CUDA graph draws a new mask at each replay. Imported
only by ``peft/lora.py``; reference: ``F.linear(x * mask / (1 - p), weight)`` with the kernel's mask.

Shapes: x (..., in) contiguous, weight (r, in) -> (..., r); fewer than 2**31 elements in x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 2048  # elements a program: 16 per thread at 4 warps
MAX_ELEMENTS = 2**31  # the Philox counter is the element's int32 index


@triton.jit
def _seeded_dropout_kernel(x_ptr, out_ptr, seed_ptr, numel, p, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    keep = tl.rand(tl.load(seed_ptr), offsets) >= p
    tl.store(out_ptr + offsets, tl.where(keep, x * scale, 0.0).to(out_ptr.dtype.element_ty), mask=inside)


def seeded_dropout(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """x (any shape, contiguous) with the mask of ``seed`` (an int64 tensor of one element) applied:
    ``where(keep, x * (1 / (1 - p)), 0)`` in fp32, rounded to x's dtype."""
    out = torch.empty_like(x)
    _seeded_dropout_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, seed, x.numel(), p, 1.0 / (1.0 - p), BLOCK=BLOCK)
    return out


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, p):
        seed = torch.randint(2**31 - 1, (1,), device=x.device)
        ctx.save_for_backward(x, weight, seed)
        ctx.p = p
        return F.linear(seeded_dropout(x, seed, p), weight)  # autocast casts as for lora_down

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        x, weight, seed = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])  # (N, r)
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            dx = seeded_dropout(grad_rows @ weight.to(grad.dtype), seed, ctx.p).view(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = seeded_dropout(x, seed, ctx.p).view(-1, x.shape[-1]).to(grad.dtype)
            dweight = (grad_rows.t() @ dropped).to(weight.dtype)
        return dx, dweight, None


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """``F.linear(dropout(x, p), weight)``, keeping x and a seed for the backward (module docstring)."""
    return _DropoutLinear.apply(x, weight, p)
