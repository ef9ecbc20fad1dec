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

BLOCK = 2048  # elements a program: 16 per thread at 4 warps, four runs of BLOCK // 4
MAX_ELEMENTS = 2**31  # element indices are int32


@triton.jit
def _masked_run(src_ptr, dst_ptr, index, keep, numel, scale, ADD: tl.constexpr):
    # ADD: dst + the masked src, in fp32, rounded once (each element read before it is written)
    inside = index < numel
    x = tl.load(src_ptr + index, mask=inside, other=0.0).to(tl.float32)
    value = tl.where(keep, x * scale, 0.0)
    if ADD:
        value += tl.load(dst_ptr + index, mask=inside, other=0.0).to(tl.float32)
    tl.store(dst_ptr + index, value.to(dst_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _masked_runs(a_ptr, a_out_ptr, b_ptr, b_out_ptr, index, keep, numel, scale, HAS_B: tl.constexpr,
                 ADD_B: tl.constexpr):
    _masked_run(a_ptr, a_out_ptr, index, keep, numel, scale, False)
    if HAS_B:
        _masked_run(b_ptr, b_out_ptr, index, keep, numel, scale, ADD_B)


@triton.jit
def _dropout_kernel(a_ptr, a_out_ptr, b_ptr, b_out_ptr, seed_ptr, numel, p, scale,
                    HAS_B: tl.constexpr, ADD_B: tl.constexpr, QUARTER: tl.constexpr):
    # one Philox draw (four uniforms) for four elements: the k-th run of QUARTER elements reads the k-th
    counter = tl.program_id(0) * QUARTER + tl.arange(0, QUARTER)
    r0, r1, r2, r3 = tl.rand4x(tl.load(seed_ptr), counter)
    start = tl.program_id(0) * (4 * QUARTER) + tl.arange(0, QUARTER)
    _masked_runs(a_ptr, a_out_ptr, b_ptr, b_out_ptr, start, r0 >= p, numel, scale, HAS_B, ADD_B)
    _masked_runs(a_ptr, a_out_ptr, b_ptr, b_out_ptr, start + QUARTER, r1 >= p, numel, scale, HAS_B, ADD_B)
    _masked_runs(a_ptr, a_out_ptr, b_ptr, b_out_ptr, start + 2 * QUARTER, r2 >= p, numel, scale, HAS_B, ADD_B)
    _masked_runs(a_ptr, a_out_ptr, b_ptr, b_out_ptr, start + 3 * QUARTER, r3 >= p, numel, scale, HAS_B, ADD_B)


def _launch(x, x_out, y, y_out, seed, p, add_y=False) -> None:
    _dropout_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, x_out, y, y_out, seed, x.numel(), p, 1.0 / (1.0 - p),
                                                     HAS_B=y is not x, ADD_B=add_y, QUARTER=BLOCK // 4)


def seeded_dropout(x: torch.Tensor, seed: torch.Tensor, p: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (any shape, contiguous) with the mask of ``seed`` (an int64 tensor of one element) applied:
    ``where(keep, x * (1 / (1 - p)), 0)`` in fp32, written in ``dtype`` (x's by default)."""
    out = torch.empty_like(x, dtype=dtype)
    _launch(x, out, x, out, seed, p)
    return out


def seeded_dropout_pair(x: torch.Tensor, y: torch.Tensor, seed: torch.Tensor, p: float, x_dtype: torch.dtype,
                        y_dtype: torch.dtype, added_to: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`seeded_dropout` of x and of y (x's shape, contiguous) with the same mask, in one pass; with
    ``added_to`` (x's shape, contiguous, y_dtype), y's added to it in place (fp32 sum, rounded once),
    and ``added_to`` returned in y's place."""
    x_out = torch.empty_like(x, dtype=x_dtype)
    y_out = torch.empty_like(y, dtype=y_dtype) if added_to is None else added_to
    _launch(x, x_out, y, y_out, seed, p, add_y=added_to is not None)
    return x_out, y_out


class _DropoutLinear(torch.autograd.Function):
    """``F.linear(seeded_dropout(x, seed), weight)`` with a new seed per call, keeping x, weight and the seed."""

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
        want_x, want_weight = ctx.needs_input_grad[:2]
        dx = dweight = dropped = None
        if want_x:  # the mask once for both: the dropped x (weight's gradient) and x's gradient
            dmasked = (grad_rows @ weight.to(grad.dtype)).view(x.shape)
            dropped, dx = seeded_dropout_pair(x, dmasked, seed, ctx.p, grad.dtype, x.dtype)
        elif want_weight:
            dropped = seeded_dropout(x, seed, ctx.p, grad.dtype)
        if want_weight:
            dweight = (grad_rows.t() @ dropped.view(-1, x.shape[-1])).to(weight.dtype)
        return dx, dweight, None


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """``F.linear(dropout(x, p), weight)``, keeping x and a seed for the backward (module docstring)."""
    return _DropoutLinear.apply(x, weight, p)
