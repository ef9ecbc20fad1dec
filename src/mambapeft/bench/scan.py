"""Selective-scan speed: our PyTorch scan (step by step or in chunks, by shape: models/scan.py) vs a
naive per-time-step loop under autograd (and the CUDA kernel when present), forward + backward, median
of repeated calls after a warm-up. The committed records (results/benchmarks/*.scan.json) predate the
step-by-step path and name the PyTorch row ``torch_chunked``."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ..models.scan import cuda_kernels_available, selective_scan_cuda, selective_scan_torch
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
