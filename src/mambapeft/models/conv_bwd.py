"""Mamba's causal depthwise conv (+ SiLU), backward: a CUDA kernel (``conv_bwd.cu``) compiled at run
time by NVRTC, with the interface of causal-conv1d's ``causal_conv1d_bwd_function`` for what our conv
and fused mixer functions pass it (no sequence indices, no initial or final states).

Why: causal-conv1d's backward sizes a block for sequences of 1,024 steps and more; at Vim-S's 197
most of its threads idle (81 us per call at (32, 768, 197), bf16, one H200; the kernel file says
how this one works, README "The short-sequence scan" what it measured).

Reference: ``scan.causal_conv1d_torch`` under autograd. Shapes: x, dout, dx (B, D, L), any batch and
channel strides, unit stride along L; weight (D, W), W 2 to 4; bias (D,).
"""
from __future__ import annotations

import torch

from . import nvrtc
from .nvrtc import SEQUENCE_DTYPES

SOURCE = "conv_bwd.cu"
THREADS = 128
WIDTHS = (2, 3, 4)
ENV = "MAMBAPEFT_CONV_BWD"  # "0": causal-conv1d's backward (A/B measurements)
# The longest sequence this kernel takes; longer ones keep causal-conv1d's. Measured on one H200 (bf16,
# channel-major, `bench scan-kernels`): 26 against 78 us at (32, 768, 197), 179 against 261 at
# (32, 4096, 256), but 85 against 33 at (8, 1536, 1024), where a warp's rows run long. The kernel holds
# a whole row (its SEGMENT): it computes nothing past this length.
MAX_LENGTH = 256


def macros(dtype: torch.dtype, width: int, has_bias: bool, silu: bool, reverse: bool = False,
           accumulate: bool = False) -> list[str]:
    """The compiler's -D options for one variant of the kernel (``reverse``: the conv along time from
    the last step to the first, see kernels.cuh; ``accumulate``: dx added to what it holds)."""
    return nvrtc.defines({"IN_BF16": dtype == torch.bfloat16, "WIDTH": width, "HAS_BIAS": has_bias, "SILU": silu,
                          "REVERSE": reverse, "ACCUMULATE": accumulate})


def runs_on(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the conv backward runs for this input: on a CUDA device of the architecture it was
    measured on (Hopper), x fp32 or bf16 with a unit stride along time and at most MAX_LENGTH steps,
    a width of 2 to 4, NVRTC present and $MAMBAPEFT_CONV_BWD not "0"."""
    return (x.dtype in SEQUENCE_DTYPES and x.stride(-1) == 1 and x.shape[-1] <= MAX_LENGTH
            and weight.shape[-1] in WIDTHS and nvrtc.switched_on(x.device, ENV))


def runs(x: torch.Tensor, weight: torch.Tensor, dout: torch.Tensor) -> bool:
    """:func:`runs_on` x, with dout of x's dtype and a unit stride along time."""
    return runs_on(x, weight) and dout.dtype == x.dtype and dout.stride(-1) == 1


def backward(x, weight, bias, dout, dx, silu, reverse=False, add_dx=False):
    """(dx, dweight, dbias): the gradients of x, weight (D, W) and bias (None without) given dout;
    dx written into the (B, D, L) tensor given (with ``add_dx``, added to what it holds, each sum
    rounded as PyTorch adds two tensors), or a new one in x's layout. ``reverse``: of the conv run from
    the last step to the first (the forward's ``reverse``)."""
    batch, channels, length = x.shape
    if length > MAX_LENGTH:
        raise ValueError(f"our conv backward takes sequences of at most {MAX_LENGTH} steps, not {length}: "
                         "call causal-conv1d's (conv_bwd.runs says which)")
    if add_dx and dx is None:
        raise ValueError("the conv backward adds x's gradient to a dx given: pass dx")
    dx = dx if dx is not None else torch.empty_like(x)
    weight32 = weight.float().contiguous()
    dweight = torch.empty_like(weight32)
    dbias = torch.empty(channels, device=x.device, dtype=torch.float32)
    options = macros(x.dtype, weight.shape[-1], bias is not None, silu, reverse, add_dx)
    (kernel,) = nvrtc.load_kernels(SOURCE, x.device.index, tuple(options), ("conv_bwd",), ENV)
    nvrtc.launch(kernel, x.device, (channels, 1, 1), THREADS,
                 [x, weight32, bias.float() if bias is not None else weight32, dout, dx, dweight, dbias, batch, length,
                  *x.stride()[:2], *dout.stride()[:2], *dx.stride()[:2]])
    return dx, dweight.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None


def causal_conv1d_bwd_function(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
                               return_dinitial_states, silu):
    """causal-conv1d's backward: (dx, dweight, dbias, None)."""
    if seq_idx is not None or initial_states is not None or dfinal_states is not None or return_dinitial_states:
        raise NotImplementedError("our conv backward does not implement sequence indices or states")
    return (*backward(x, weight, bias, dout, dx, silu), None)
