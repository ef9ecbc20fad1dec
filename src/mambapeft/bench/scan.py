"""Selective-scan speed: our PyTorch scan (step by step or in chunks, by shape: models/scan.py) vs a
naive per-time-step loop under autograd (and the CUDA kernel when present), forward + backward, median
of repeated calls after a warm-up. The committed records (results/benchmarks/*.scan.json) predate the
step-by-step path and name the PyTorch row ``torch_chunked``. And on CUDA, the kernels alone: our
short-sequence scan (models/scan_short.cu) against mamba-ssm's, our conv backward (models/conv_bwd.cu)
against causal-conv1d's (``bench scan-kernels``)."""
from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models import conv_bwd, nvrtc, scan_short
from ..models.scan import (_conv_bwd_kernel, _selective_scan_kernels, cuda_kernels_available, selective_scan_cuda,
                           selective_scan_torch, whole_kernel_chunks)
from .common import synchronize


def naive_loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False):
    """What users write first: one step at a time under autograd (mamba_ssm's selective_scan_ref shape)."""
    delta = delta + delta_bias[..., None] if delta_bias is not None else delta
    delta = F.softplus(delta) if delta_softplus else delta
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        state = decay[:, :, t] * state + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", state, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    y = y + u * D[..., None] if D is not None else y
    return y * F.silu(z) if z is not None else y


def _inputs(batch, d_inner, length, n_state, device):
    g = torch.Generator(device=device).manual_seed(0)
    def r(*shape):
        return torch.randn(*shape, device=device, generator=g)
    return [r(batch, d_inner, length), r(batch, d_inner, length) * 0.5 - 2.0, -torch.exp(r(d_inner, n_state) * 0.5),
            r(batch, n_state, length), r(batch, n_state, length), r(d_inner), r(batch, d_inner, length)]


def _time(fn, args, repeats: int, device: str) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        inputs = [a.detach().clone().requires_grad_() for a in args]
        synchronize(device)
        start = time.perf_counter()
        fn(*inputs[:5], inputs[5], inputs[6], delta_softplus=True).sum().backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def bench_scan(batch=8, d_inner=1536, length=512, n_state=16, repeats=3, device="cpu", naive=True) -> dict:
    args = _inputs(batch, d_inner, length, n_state, device)
    shape = {"batch": batch, "d_inner": d_inner, "length": length, "d_state": n_state, "device": device,
             "threads": torch.get_num_threads()}
    rows = {}
    candidates = {"torch": selective_scan_torch}
    if naive:
        candidates["naive_loop"] = naive_loop_scan
    if device == "cuda" and cuda_kernels_available():
        candidates["cuda_kernel"] = selective_scan_cuda
    for name, fn in candidates.items():
        times = _time(fn, args, 1 if name == "naive_loop" else repeats, device)
        rows[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}
    if "naive_loop" in rows:
        shape["speedup_vs_naive"] = rows["naive_loop"]["median_s"] / rows["torch"]["median_s"]
    return {**shape, "fwd_bwd": rows}


# ------------------------------------------------------------------------------------------------
# CUDA: our short-sequence scan kernels (models/scan_short.cu) against mamba-ssm's, forward and backward
# ------------------------------------------------------------------------------------------------
# Vim-S, a 256-step Vim-S, Mamba-1.4b at micro-batch 32, and a length past MAX_LENGTH
KERNEL_SHAPES = ((32, 768, 197), (32, 768, 256), (32, 4096, 256), (8, 1536, 1024))


def kernel_inputs(batch: int, channels: int, length: int, dtype: torch.dtype, channel_major: bool,
                  generator: torch.Generator, device: str = "cuda", states: int = 16) -> list[torch.Tensor]:
    """u, delta, A, B, C, D, z, delta_bias, dout of a training scan with ``states`` states; u, delta, z
    and dout channel-major ((D, B, L) storage, as the fused mixer function holds them) or batch-major."""
    def sequence(scale=1.0, shift=0.0):
        shape = (channels, batch, length) if channel_major else (batch, channels, length)
        t = (torch.randn(shape, generator=generator) * scale + shift).to(dtype).to(device)
        return t.transpose(0, 1) if channel_major else t

    u, delta, z, dout = sequence(), sequence(0.5, -1.0), sequence(), sequence()
    A = (-1 - 15 * torch.rand(channels, states, generator=generator)).to(device)
    B, C = (torch.randn(batch, states, length, generator=generator).to(dtype).to(device) for _ in range(2))
    D = torch.randn(channels, generator=generator).to(device)
    bias = (0.5 * torch.randn(channels, generator=generator)).to(device)
    return [u, delta, A, B, C, D, z, bias, dout]


def _mean_us(call: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    """Mean microseconds of ``call`` over ``repeats`` calls captured in one CUDA graph (as training
    steps run), after warm-ups: the kernels' time alone. Queued eagerly, a call's Python (tens of
    microseconds) outlasts the shortest kernels, and the clock would time it instead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-ups (compiles, allocator pools) off the capture
        for _ in range(warmup):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def _mamba_ssm_calls(u, delta, A, B, C, D, z, bias, dout):
    """mamba-ssm's forward and backward calls (``selective_scan_cuda``), as the fused function makes them."""
    B4, C4 = B.unsqueeze(1).contiguous(), C.unsqueeze(1).contiguous()
    out, states, _ = _selective_scan_kernels.fwd(u, delta, A, B4, C4, D, z, bias, True)
    return (lambda: _selective_scan_kernels.fwd(u, delta, A, B4, C4, D, z, bias, True),
            lambda: _selective_scan_kernels.bwd(u, delta, A, B4, C4, D, z, bias, dout, states, out, None, True, True))


def _conv_backward_calls(x, dout):
    """Our conv backward's call and causal-conv1d's (width 4, bias, SiLU) on x, dout (B, D, L), writing
    dx into a channel-major tensor as the fused function does."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = (torch.randn(*shape, generator=generator).cuda() for shape in ((x.shape[1], 4), (x.shape[1],)))
    dx = torch.empty_like(x)
    return (lambda: conv_bwd.backward(x, weight, bias, dout, dx, True),
            lambda: _conv_bwd_kernel(x, weight, bias, dout, None, None, None, dx, False, True))


def bench_scan_kernels(shapes=KERNEL_SHAPES, repeats: int = 50, states=(16,)) -> dict:
    """Forward and backward microseconds of our short-sequence kernels and mamba-ssm's at each
    (batch, channels, length) of ``shapes`` and each state count of ``states`` (bf16, channel-major, D,
    z, delta_bias, softplus: what the fused mixer function runs), mamba-ssm's also at the length of its
    whole block (where the fused function pads to for it); and our causal conv backward against
    causal-conv1d's (once per shape)."""
    if not (torch.cuda.is_available() and cuda_kernels_available() and nvrtc.nvrtc_available()):
        raise RuntimeError("bench scan-kernels needs a CUDA device with mamba-ssm (`mambapeft setup-gpu`) "
                           "and PyTorch's NVRTC (a CUDA build of PyTorch 2.8 or later)")
    rows = []
    for (batch, channels, length), n in itertools.product(shapes, states):
        args = kernel_inputs(batch, channels, length, torch.bfloat16, True, torch.Generator().manual_seed(0),
                             states=n)
        u, delta, A, B, C, D, z, bias, dout = args
        row = {"batch": batch, "channels": channels, "length": length, "states": n}
        row["ours_fwd_us"] = _mean_us(lambda: scan_short.forward(u, delta, A, B, C, D, z, bias, True), repeats)
        row["ours_bwd_us"] = _mean_us(lambda: scan_short.backward(u, delta, A, B, C, D, z, bias, dout, None, True),
                                      repeats)
        runs = {"mamba_ssm": args}
        if whole_kernel_chunks(length) != length:
            runs["mamba_ssm_padded"] = kernel_inputs(batch, channels, whole_kernel_chunks(length), torch.bfloat16,
                                                     True, torch.Generator().manual_seed(0), states=n)
        for label, inputs in runs.items():
            forward, backward = _mamba_ssm_calls(*inputs)
            row[f"{label}_fwd_us"], row[f"{label}_bwd_us"] = _mean_us(forward, repeats), _mean_us(backward, repeats)
            row[f"{label}_length"] = inputs[0].shape[-1]
        if _conv_bwd_kernel is not None and n == states[0]:
            ours, theirs = _conv_backward_calls(u, dout)
            row["causal_conv1d_bwd_us"] = _mean_us(theirs, repeats)
            if length <= conv_bwd.MAX_LENGTH:  # ours holds a row of at most that many steps
                row["ours_conv_bwd_us"] = _mean_us(ours, repeats)
        rows.append(row)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
            "repeats": repeats, "rows": rows}
