"""A Mamba-1 mixer after in_proj in one autograd node on mamba-ssm's and causal-conv1d's CUDA kernels:
mamba_ssm's ``MambaInnerFn`` (real A, B and C from x_proj, conv and delta recomputed in the
backward), with a backward that computes only the gradients asked for.

``mamba_inner_fn`` computes every weight's gradient whether it trains or not; under PEFT the
out_proj, x_proj and dt_proj weights are frozen, and their gradient GEMMs were 11 ms of a 333 ms
mamba-1.4b LoRA(in_proj) step at micro-batch 32 (one H200). It also sums out_proj's bias gradient
over every dimension (a scalar); here it is summed over tokens. The reference is
``scan.mamba_inner_torch``; the GPU tests compare both with ``mamba_inner_fn``.

Shapes: xz (B, 2*D_inner, L), L contiguous (channel-major (2*D_inner, B, L) storage reads without
copies); conv_weight (D_inner, W); x_proj_weight (R + 2N, D_inner); dt_proj_weight (D_inner, R);
out_proj_weight (D_model, D_inner); A (D_inner, N) fp32; D, delta_bias (D_inner,) fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional CUDA kernels (scan.py reports what is missing)
    import selective_scan_cuda
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function
except ImportError:  # pragma: no cover - depends on the machine
    selective_scan_cuda = causal_conv1d_fwd_function = causal_conv1d_bwd_function = None


def _conv(x, conv_weight, conv_bias):
    return causal_conv1d_fwd_function(x, conv_weight, conv_bias, None, None, None, True)  # SiLU


def _delta(dt_proj_weight, x_dbl, batch):
    """(D_inner, R) @ (R, B*L) -> (B, D_inner, L), channel-major as the scan wants it."""
    rank = dt_proj_weight.shape[1]
    return (dt_proj_weight @ x_dbl[:, :rank].t()).unflatten(1, (batch, -1)).transpose(0, 1)


def _tokens_major(t):
    """(B, C, L) -> (B*L, C): a view where t is channel-major, else one copy."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


def _channels_major(t):
    """(B, C, L) -> (C, B*L): a view where t is channel-major, else one copy."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


class MambaInnerFn(torch.autograd.Function):

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight,
                out_proj_bias, A, D, delta_bias):
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            x_proj_weight, dt_proj_weight, out_proj_weight = (
                w.to(dtype) for w in (x_proj_weight, dt_proj_weight, out_proj_weight))
            out_proj_bias = out_proj_bias.to(dtype) if out_proj_bias is not None else None
        xz = xz if xz.stride(-1) == 1 else xz.contiguous()
        batch, n = xz.shape[0], A.shape[1]
        x, z = xz.chunk(2, dim=1)
        conv_out = _conv(x, conv_weight, conv_bias)
        x_dbl = F.linear(_tokens_major(conv_out), x_proj_weight)  # (B*L, R + 2N)
        delta = _delta(dt_proj_weight, x_dbl, batch)
        B, C = (x_dbl[:, i:i + n].unflatten(0, (batch, -1)).transpose(1, 2).unsqueeze(1).contiguous()
                for i in (x_dbl.shape[1] - 2 * n, x_dbl.shape[1] - n))  # (B, 1, N, L)
        out, scan_intermediates, out_z = selective_scan_cuda.fwd(conv_out, delta, A, B, C, D, z, delta_bias, True)
        ctx.has_out_bias = out_proj_bias is not None
        ctx.save_for_backward(xz, conv_weight, conv_bias, x_dbl, x_proj_weight, dt_proj_weight,
                              out_proj_weight, A, B, C, D, delta_bias, scan_intermediates, out)
        return F.linear(out_z.transpose(1, 2), out_proj_weight, out_proj_bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        (xz, conv_weight, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, out_proj_weight,
         A, B, C, D, delta_bias, scan_intermediates, out) = ctx.saved_tensors
        want_x_proj, want_dt_proj, want_out_proj, want_out_bias = ctx.needs_input_grad[3:7]
        batch, rank, n = xz.shape[0], dt_proj_weight.shape[1], A.shape[1]
        x, z = xz.chunk(2, dim=1)
        conv_out = _conv(x, conv_weight, conv_bias)  # recomputed, not saved (mamba_ssm's checkpoint_lvl 1)
        delta = _delta(dt_proj_weight, x_dbl, batch)
        dxz = torch.empty_like(xz)
        dx, dz = dxz.chunk(2, dim=1)
        dout = dout.reshape(-1, dout.shape[-1]).t()  # (D_model, B*L)
        dy = (out_proj_weight.t() @ dout).unflatten(1, (batch, -1)).transpose(0, 1)  # (B, D_inner, L)
        dconv_out, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z = selective_scan_cuda.bwd(
            conv_out, delta, A, B, C, D, z, delta_bias, dy, scan_intermediates, out, dz, True, True)
        dout_proj = dout @ _tokens_major(out_z) if want_out_proj else None
        dout_bias = dout.sum(dim=1) if ctx.has_out_bias and want_out_bias else None
        dx_dbl = torch.empty_like(x_dbl)
        dx_dbl[:, rank:rank + n] = dB[:, 0].transpose(1, 2).flatten(0, 1)
        dx_dbl[:, rank + n:] = dC[:, 0].transpose(1, 2).flatten(0, 1)
        ddelta = _channels_major(ddelta)  # (D_inner, B*L)
        ddt_proj = ddelta @ x_dbl[:, :rank] if want_dt_proj else None
        dx_dbl[:, :rank] = ddelta.t() @ dt_proj_weight
        dx_proj = dx_dbl.t() @ _tokens_major(conv_out) if want_x_proj else None
        dconv_out = _channels_major(dconv_out)
        dconv_out = torch.addmm(dconv_out, x_proj_weight.t(), dx_dbl.t(), out=dconv_out)
        dconv_out = dconv_out.unflatten(1, (batch, -1)).transpose(0, 1)
        dx, dconv_weight, dconv_bias, *_ = causal_conv1d_bwd_function(
            x, conv_weight, conv_bias, dconv_out, None, None, None, dx, False, True)
        return (dxz, dconv_weight, dconv_bias if conv_bias is not None else None, dx_proj, ddt_proj,
                dout_proj, dout_bias, dA, dD, ddelta_bias)


def mamba_inner_fn(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight,
                   out_proj_bias, A, D, delta_bias):
    """(B, 2*D_inner, L) -> (B, L, D_model); the module docstring gives the shapes. conv_weight is
    (D_inner, W) (a Conv1d's weight squeezed)."""
    return MambaInnerFn.apply(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight,
                              out_proj_bias, A, D, delta_bias)
