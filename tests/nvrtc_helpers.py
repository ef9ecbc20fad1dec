"""What the tests of our NVRTC-compiled kernels (test_scan_short.py, test_conv_bwd.py) share."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mambapeft.models import nvrtc


def nvrtc_wheel_library() -> Path | None:
    """libnvrtc from the nvidia-cuda-nvrtc wheel (a test extra), where pip put it."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(root).glob("cu*/lib/libnvrtc.so*")) + sorted(Path(root).glob("cuda_nvrtc/lib/libnvrtc.so*"))
        if found:
            return found[0]
    return None


def relative(t, reference) -> float:
    """The largest difference from ``reference`` over its largest magnitude."""
    return float((t.double() - reference).abs().max() / reference.abs().max())


def skip_without_a_gpu_and_nvrtc() -> None:
    """Skip the calling test where our kernels cannot run: no CUDA device, or no NVRTC."""
    if not torch.cuda.is_available() or not nvrtc.nvrtc_available():
        pytest.skip("needs a CUDA device with NVRTC")


def emulated_size(kernel_device: torch.device, batch: int, channels: int) -> tuple[int, int]:
    """(batch, channels) as given on the GPU; in the CPU emulation of the kernels (conftest's
    kernel_device) at most 4 x 96: Vim-S's 32 x 768 would take it a minute, through the same paths."""
    return (batch, channels) if kernel_device.type == "cuda" else (min(batch, 4), min(channels, 96))
