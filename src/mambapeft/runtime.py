"""Where and how a model runs: device, autocast, scan-kernel backend and placement.

Training, evaluation, the benchmarks and the lm-eval model all place models through this module,
so none of them needs the trainer for it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import resource

import torch
import torch.nn as nn

from .models.image_classifier import ImageClassifier
from .models.mamba import Mixer
from .models.precision import store_frozen_linears_in_bf16
from .models.scan import resolve_backend

log = logging.getLogger("mambapeft.runtime")

# what a benchmark or an ad-hoc evaluation runs with: the kernels when present, never an error
PERMISSIVE = {"scan_backend": "auto", "allow_torch_fallback": True}
KEEP_ACTIVATIONS_ENV = "MAMBAPEFT_KEEP_ACTIVATIONS"  # "1" / "0": keeps_activations for every model / none


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime device 'cuda' was requested but no CUDA device is visible; set `device: auto`")
    return torch.device(requested)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def select_backend(model: nn.Module, device: torch.device, runtime: dict) -> str:
    """Put one scan backend on every mixer; a CUDA run on the PyTorch scan fails unless allowed.
    Returns the name recorded in metrics.json: the backend's, "-fused" added where mixers run a
    fused kernel after in_proj (mamba_inner, Mamba-2's split_conv1d_scan); "none" for a model
    without a selective scan (a ViT), whose run needs no kernel."""
    if not any(isinstance(module, Mixer) for module in model.modules()):
        return "none"
    backend = resolve_backend(device, runtime["scan_backend"])
    if device.type == "cuda" and backend.name == "torch" and not runtime["allow_torch_fallback"]:
        raise RuntimeError("This CUDA run would use the slow PyTorch scan (mamba-ssm missing or backend forced). "
                           "Install the CUDA extras (`mambapeft setup-gpu`) or set `allow_torch_fallback: true`.")
    mixers = [module for module in model.modules() if isinstance(module, Mixer)]
    keep = keeps_activations(model)
    for mixer in mixers:
        mixer.backend = backend
        mixer.keep_activations = keep
    fused = sum(m.uses_fused_inner() for m in mixers)
    if backend.fuses:
        log.info("mixers on a fused kernel after in_proj: %d of %d (the others: a method changes them "
                 "between in_proj and the output)", fused, len(mixers))
    return f"{backend.name}-fused" if fused else backend.name


def keeps_activations(model: nn.Module) -> bool:
    """Whether the fused mixers' forward keeps what their backward would recompute
    (scan.mamba_inner_cuda's ``keep_activations``: the conv output, delta and our scan's checkpoints
    of the state, three times xz's bf16 bytes per mixer direction; the backward skips the conv forward,
    delta's GEMM and one of the scan backward's three passes over time). Yes for image classifiers:
    a fixed batch, the scan most of the step, memory to spare (+2.8 GB at Vim-S, batch 32). No for
    language models, whose micro-batch is sized to the memory (+19 GB at Mamba-1.4b, micro-batch 32).
    $MAMBAPEFT_KEEP_ACTIVATIONS "1" or "0" decides for every model."""
    setting = os.environ.get(KEEP_ACTIVATIONS_ENV, "")
    if setting in ("0", "1"):
        return setting == "1"
    return isinstance(model, ImageClassifier)


def place_model(model: nn.Module, device: torch.device, runtime: dict) -> str:
    """Put ``model`` on ``device`` as training runs it there: on CUDA (bf16 autocast, which casts
    them anyway) frozen Linear weights stored in bf16; then :func:`select_backend`, whose recorded
    name it returns."""
    model.to(device)
    if device.type == "cuda":
        moved = store_frozen_linears_in_bf16(model)
        log.info("frozen Linear weights stored in bf16: %s parameters", f"{moved:,}")
    return select_backend(model, device, runtime)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def gpu_identity(device: torch.device) -> dict | None:
    """Which physical GPU ran the job ({index, uuid, name}), for the run record; None off CUDA."""
    from .gpus import describe_gpu

    return describe_gpu(device.index or 0) if device.type == "cuda" else None
