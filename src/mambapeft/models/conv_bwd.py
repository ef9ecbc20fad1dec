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

import os

import torch

from . import nvrtc

SOURCE = "conv_bwd.cu"
THREADS = 128
WIDTHS = (2, 3, 4)
ENV = "MAMBAPEFT_CONV_BWD"  # "0": causal-conv1d's backward (A/B measurements)
_DTYPES = (torch.float32, torch.bfloat16)


def macros(dtype: torch.dtype, width: int, has_bias: bool, silu: bool) -> list[str]:
    """The compiler's -D options for one variant of the kernel."""
    values = {"IN_BF16": dtype == torch.bfloat16, "WIDTH": width, "HAS_BIAS": has_bias, "SILU": silu}
    return [f"-D{name}={int(value)}" for name, value in values.items()]


def runs(x: torch.Tensor, weight: torch.Tensor, dout: torch.Tensor) -> bool:
    """Whether the conv backward runs here: on a CUDA device of the architecture it was measured on
    (Hopper), x and dout of one dtype, fp32 or bf16, unit stride along time, a width of 2 to 4,
    NVRTC present and $MAMBAPEFT_CONV_BWD not "0"."""
    return (x.is_cuda and x.dtype in _DTYPES and dout.dtype == x.dtype and x.stride(-1) == 1
            and dout.stride(-1) == 1 and weight.shape[-1] in WIDTHS and os.environ.get(ENV, "1") != "0"
            and nvrtc.nvrtc_available() and nvrtc.on_measured_gpu(x.device))


def backward(x, weight, bias, dout, dx, silu):
    """(dx, dweight, dbias): the gradients of x, weight (D, W) and bias (None without) given dout;
    dx written into the (B, D, L) tensor given, or a new one in x's layout."""
    batch, channels, length = x.shape
    dx = dx if dx is not None else torch.empty_like(x)
    weight32 = weight.float().contiguous()
    dweight = torch.empty_like(weight32)
    dbias = torch.empty(channels, device=x.device, dtype=torch.float32)
    (kernel,) = nvrtc.load_kernels(SOURCE, x.device.index, tuple(macros(x.dtype, weight.shape[-1], bias is not None, silu)),
                                   ("conv_bwd",), ENV)
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
