"""Where a training step's GPU time goes, by kernel family (``mambapeft bench profile``).

One step of a method as ``bench train`` times it, eager (every kernel launched from Python: the
default) or with ``cuda_graphs`` as the graphed trainer runs it (its forward and backward replayed from
CUDA graphs: what runs only in the graph, and the launches' count, show there), profiled with
torch.profiler; each GPU kernel, memcpy and memset is put in a family by its name
(:data:`KERNEL_FAMILIES`, first match wins) and the families are summed per step, and each kernel is
listed with its launches and time a step, most launches first. The report is JSON
(``<device>.<backbone>.profile.json``, ``<device>.<backbone>-cuda_graphs.profile.json`` graphed) with a
Markdown table beside it.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import write_json_atomic, write_text_atomic
from ..runtime import device_name
from .common import provenance, provenance_line, timed_calls


@dataclass(frozen=True)
class KernelTime:
    """One kernel name's GPU time over the profiled steps."""

    name: str
    total_us: float
    calls: int


# (family, pattern on the kernel's name): the first that matches names the family. Our Triton kernels
# are named in models/ and train/, our NVRTC ones (models/*.cu) plainly; mamba-ssm's by its CUDA and
# Triton sources; the rest by PyTorch.
KERNEL_FAMILIES: tuple[tuple[str, re.Pattern], ...] = tuple((family, re.compile(pattern)) for family, pattern in (
    ("selective scan backward (mamba-ssm)", r"selective_scan_bwd"),
    ("selective scan forward (mamba-ssm)", r"selective_scan_fwd"),
    ("selective scan backward (ours, scan_short.cu)", r"^scan_bwd$"),
    ("selective scan forward (ours, scan_short.cu)", r"^scan_fwd$"),
    ("Mamba-2 chunked scan (mamba-ssm SSD)",
     r"_chunk_scan|_chunk_state|_state_passing|_bmm_chunk|_chunk_cumsum|_selective_scan_update"),
    ("causal conv1d", r"causal_conv1d|_conv_fwd_kernel|_conv_update_kernel|^conv_bwd$"),
    ("embedding lookup", r"gather_kernel|embedding"),
    ("patch embedding (convolution)", r"convolve|cudnn|fprop|dgrad|wgrad|conv2d"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|splitKreduce"),
    ("residual add + RMSNorm", r"_layer_norm|_rms_normed|rms_norm"),
    ("LoRA dropout", r"_dropout_kernel|fused_dropout|bernoulli"),
    ("cross-entropy", r"_cross_entropy|softmax|nll_loss"),
    ("optimizer (foreach kernels)", r"multi_tensor_apply|fused_adam"),
    ("copies: casts, layout, padding, cat, flip", r"copy|Memcpy|Memset|CatArray|index_elementwise|FillFunctor|fill_kernel"),
    ("reductions", r"reduce_kernel"),
    ("other elementwise", r"elementwise|unrolled_|triton_"),
))
OTHER = "other"
KERNEL_ROWS = 30  # the Markdown's per-kernel table: this many, most launches first


def kernel_family(name: str) -> str:
    """The family of a GPU kernel (or memcpy/memset) by its name; :data:`OTHER` where none matches."""
    return next((family for family, pattern in KERNEL_FAMILIES if pattern.search(name)), OTHER)


def family_breakdown(kernels: Iterable[KernelTime], steps: int) -> list[dict]:
    """Per family, most time first: ``ms`` per step, ``share`` of the step's GPU time, ``calls`` per
    step and the ``kernels`` (names, most time first) it holds."""
    kernels = list(kernels)
    total = sum(k.total_us for k in kernels) or 1.0
    families: dict[str, list[KernelTime]] = {}
    for kernel in kernels:
        families.setdefault(kernel_family(kernel.name), []).append(kernel)
    rows = [{"family": family,
             "ms": sum(k.total_us for k in members) / 1e3 / steps,
             "share": sum(k.total_us for k in members) / total,
             "calls": sum(k.calls for k in members) // steps,
             "kernels": [k.name for k in sorted(members, key=lambda k: -k.total_us)]}
            for family, members in families.items()]
    return sorted(rows, key=lambda row: -row["ms"])


def kernel_rows(kernels: Iterable[KernelTime], steps: int) -> list[dict]:
    """Per kernel name, most launches a step first (then most time): ``calls`` and ``ms`` per step and its
    family: where a step's launches go (in a CUDA graph, each small kernel costs its run and ~1 us of gap
    after it)."""
    rows = [{"kernel": k.name, "family": kernel_family(k.name), "calls": k.calls // steps, "ms": k.total_us / 1e3 / steps}
            for k in kernels]
    return sorted(rows, key=lambda row: (-row["calls"], -row["ms"]))


def profiled_kernels(step: Callable[[], None], steps: int) -> list[KernelTime]:
    """The GPU kernels, memcpys and memsets of ``steps`` calls of ``step`` (warmed up by the caller),
    by name; the profiler's annotations of CPU ranges on the GPU timeline are not kernels and are left out."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return [KernelTime(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and e.self_device_time_total > 0]


def profile_report(domain: str, method: str, backbone: str, batch: int, steps: int = 5,
                   cuda_graphs: bool = False) -> dict:
    """Where one training step's GPU time goes (``batch`` images at 224 px, or sequences of 256
    tokens), eager or with ``cuda_graphs``: wall time against summed kernel time (the gap is launch and
    Python overhead, and the device's idle time between kernels), per family."""
    from .train import _language_step, _vision_step

    if domain == "vision":
        _, _, backend, step = _vision_step(method, backbone, batch, 224, cuda_graphs)
    else:
        _, _, backend, step = _language_step(method, backbone, batch, 256, cuda_graphs)
    wall_s = sorted(timed_calls(step, 3 + steps, "cuda")[3:])[steps // 2]  # median after 3 warm-up steps
    kernels = profiled_kernels(step, steps)
    return {"backbone": backbone, "method": method, "backend": backend, "batch": batch,
            "tokens_per_sequence": None if domain == "vision" else 256, "device": device_name(torch.device("cuda")),
            "cuda_graphs": cuda_graphs,
            "profiled_steps": steps, "wall_ms": wall_s * 1e3,
            "gpu_ms": sum(k.total_us for k in kernels) / 1e3 / steps,
            "launches": sum(k.calls for k in kernels) // steps,
            "families": family_breakdown(kernels, steps), "kernels": kernel_rows(kernels, steps)}


def markdown(reports: list[dict], source: dict | None = None) -> str:
    """One table per profiled step: family, ms per step, share, kernel calls per step, top kernel;
    ``source``: the run's :func:`~mambapeft.bench.common.provenance`, shown under the title."""
    lines = ["# Where a training step's GPU time goes (`mambapeft bench profile`)", ""]
    lines += provenance_line(source)
    for r in reports:
        unit = "images" if r["tokens_per_sequence"] is None else f"sequences of {r['tokens_per_sequence']} tokens"
        graphed = r.get("cuda_graphs", False)  # reports before the option were eager
        summary = (f"{r['wall_ms']:.1f} ms wall ({'CUDA graphs' if graphed else 'eager'}), {r['gpu_ms']:.1f} ms of "
                   f"GPU kernels in {r['launches']} launches per step.")
        lines += [f"## {r['backbone']} {r['method']}, {r['batch']} {unit} ({r['device']}, backend {r['backend']}"
                  f"{', CUDA graphs' if graphed else ''})",
                  "", summary, "",
                  "| kernel family | ms / step | share | calls / step | largest kernel |", "|---|---:|---:|---:|---|"]
        lines += [f"| {f['family']} | {f['ms']:.2f} | {f['share']:.1%} | {f['calls']} | `{_short(f['kernels'][0])}` |"
                  for f in r["families"]]
        lines.append("")
        if r.get("kernels"):  # reports before kernel_rows have families only
            lines += [f"Kernels, most launches a step first (the first {KERNEL_ROWS}; every one in the JSON):", "",
                      "| calls / step | ms / step | family | kernel |", "|---:|---:|---|---|"]
            lines += [f"| {k['calls']} | {k['ms']:.3f} | {k['family']} | `{_short(k['kernel'], 100)}` |"
                      for k in r["kernels"][:KERNEL_ROWS]]
            lines.append("")
    return "\n".join(lines)


def _short(name: str, width: int = 60) -> str:
    """A kernel name cut to ``width`` characters (templated CUDA names run to hundreds)."""
    name = name.replace("|", "/")
    return name if len(name) <= width else name[:width - 3] + "..."


def write_reports(reports: list[dict], out_dir: Path, source: dict | None = None) -> Path:
    """``<device>.<backbone>.profile.json`` (every report, one backbone's and one run's, eager or graphed,
    with ``source``, the run's provenance; ``<backbone>-cuda_graphs`` graphed) and the same ``.md``
    (:func:`markdown`) in ``out_dir``; returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    graphed = "-cuda_graphs" if reports[0].get("cuda_graphs") else ""
    stem = f"{reports[0]['device'].replace(' ', '_')}.{reports[0]['backbone']}{graphed}.profile"
    write_json_atomic(out_dir / f"{stem}.json", {"provenance": source, "reports": reports})
    write_text_atomic(out_dir / f"{stem}.md", markdown(reports, source))
    return out_dir / f"{stem}.json"
