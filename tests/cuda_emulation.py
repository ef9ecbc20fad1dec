"""Our NVRTC kernels run on the CPU: a kernel file compiled as C++ by the system's compiler against
``cuda_emulation.h`` (each CUDA thread a fiber, one block at a time), loaded with ctypes, and launched
with the arguments the package passes its CUDA kernels (tensors as pointers, ints), so that a kernel's
logic is tested where there is no GPU (CI). ``emulated(monkeypatch)`` puts it under ``nvrtc.load_kernels``
and ``nvrtc.launch``: the package's own Python wrappers (``scan_short.forward``, ...) then run it on CPU
tensors.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest
import torch

from mambapeft.models import nvrtc

HEADER = pathlib.Path(__file__).with_name("cuda_emulation.h")
KERNELS_FOLDER = pathlib.Path(nvrtc.__file__).parent  # where the .cu files include kernels.cuh from
# -O1: ~0.9 s a variant's compile on this machine (-O0 0.6 s, but slower runs: the tests took as long)
# -U_FORTIFY_SOURCE: the fibers' _longjmp between stacks, which the fortified one refuses
FLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing", "-w", "-U_FORTIFY_SOURCE"]
# $MAMBAPEFT_EMULATION_SANITIZE=address: the kernels built with AddressSanitizer, which names any read or write
# past a tensor's bytes (README "The tests" says how to run it: its runtime preloaded, pytest -s)
SANITIZE = os.environ.get("MAMBAPEFT_EMULATION_SANITIZE")
if SANITIZE:
    FLAGS += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"]


def compiler() -> str | None:
    """The C++ compiler on PATH ($CXX, c++ or g++), or None."""
    candidates = [os.environ.get("CXX"), "c++", "g++"]
    return next((path for name in candidates if name and (path := shutil.which(name))), None)


def skip_without_a_compiler() -> None:
    """Skip the calling test or test module where there is no C++ compiler to build the emulation with."""
    if compiler() is None:
        pytest.skip("the CPU emulation of our CUDA kernels needs a C++ compiler (c++, g++ or $CXX)",
                    allow_module_level=True)


@functools.cache
def library(source: str, options: tuple[str, ...], names: tuple[str, ...]) -> ctypes.CDLL:
    """CUDA ``source`` (it may include the package's headers) with ``options`` (-D macros) compiled for the
    CPU, exporting ``emulated_<name>`` for each kernel of ``names``; built once in a temporary folder,
    named by all it is built from (concurrent test workers: each builds under its own name, then renames)."""
    source = source + "".join(f"\nEMULATED({name})" for name in names) + "\n"
    headers = [nvrtc.package_source(name) for name in nvrtc.HEADERS]  # what the source includes
    digest = hashlib.sha256("\0".join([source, *headers, HEADER.read_text(), *options, *FLAGS]).encode()).hexdigest()
    folder = pathlib.Path(tempfile.gettempdir()) / "mambapeft-cuda-emulation"
    folder.mkdir(exist_ok=True)
    built = folder / f"{digest[:24]}.so"
    if not built.exists():
        cpp, so = (folder / f"{digest[:24]}.{os.getpid()}.{suffix}" for suffix in ("cpp", "so"))
        cpp.write_text(source)
        command = [compiler(), *FLAGS, "-include", str(HEADER), f"-I{KERNELS_FOLDER}", *options, "-x", "c++", str(cpp),
                   "-o", str(so)]
        result = subprocess.run(command, capture_output=True, text=True)
        cpp.unlink()
        if result.returncode:
            raise RuntimeError(f"{', '.join(names)} did not compile for the CPU emulation:\n{result.stderr[-4000:]}")
        so.replace(built)
    return ctypes.CDLL(str(built))


class EmulatedKernel:
    """A kernel callable as torch's loaded CUDA kernels are: ``kernel(grid=, block=, args=)``."""

    def __init__(self, library: ctypes.CDLL, name: str):
        self.name = name
        self.function = getattr(library, f"emulated_{name}")
        self.function.restype = ctypes.c_int

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: list) -> None:
        values = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if arg.device.type != "cpu":
                    raise ValueError(f"the emulated {self.name} takes CPU tensors, got one on {arg.device}")
                values.append(ctypes.c_void_p(arg.data_ptr()))
            else:
                values.append(ctypes.c_int(arg))
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values))
        if self.function(*grid, block[0], pointers):
            raise RuntimeError(f"the emulated {self.name} deadlocked at its barriers (its threads' paths differ)")


def load_kernels(source_name: str, device_index, options: tuple[str, ...], names: tuple[str, ...],
                 off_switch: str) -> tuple[EmulatedKernel, ...]:
    """``nvrtc.load_kernels``'s signature; the device and the off switch are not read."""
    compiled = library(nvrtc.package_source(source_name), tuple(options), tuple(names))
    return tuple(EmulatedKernel(compiled, name) for name in names)


def launch(kernel: EmulatedKernel, device: torch.device, grid: tuple[int, int, int], threads: int, args: list) -> None:
    kernel(grid=grid, block=(threads, 1, 1), args=args)


def emulated(monkeypatch) -> None:
    """The package's kernels compiled and launched on the CPU for the rest of the test."""
    monkeypatch.setattr(nvrtc, "load_kernels", load_kernels)
    monkeypatch.setattr(nvrtc, "launch", launch)


class _SeenAsCuda:
    """A tensor whose ``is_cuda`` is True, for the package's checks of where its kernels run."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __getattr__(self, name: str):
        return True if name == "is_cuda" else getattr(self.tensor, name)


def emulated_fused_function(monkeypatch) -> None:
    """As :func:`emulated`, and the fused mixer function (``scan.mamba_inner_cuda``, ``_MambaInnerFn``) on
    our kernels on CPU tensors: where they run is answered as on a Hopper GPU with NVRTC, the conv forward
    is our Triton one (Triton's interpreter on the CPU), and mamba-ssm's scan kernels, which ours replace
    at these lengths, a stand-in that fails if called."""
    from mambapeft.models import scan, scan_short

    if scan._triton_conv_fwd is None:
        raise RuntimeError("the fused function's conv forward needs triton (its interpreter on the CPU)")
    emulated(monkeypatch)
    monkeypatch.setattr(nvrtc, "switched_on", lambda device, off_switch: True)
    monkeypatch.setattr(scan_short, "applies", lambda u, A, B, *sequences, applies=scan_short.applies:
                        applies(_SeenAsCuda(u), A, B, *sequences))
    monkeypatch.setattr(scan, "_selective_scan_kernels", object())
    monkeypatch.setattr(scan, "_conv_fwd_kernel", scan._triton_conv_fwd)
