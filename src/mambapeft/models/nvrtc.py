"""Our CUDA kernels (``scan_short.cu``, ``conv_bwd.cu``), compiled at run time by NVRTC, the compiler
PyTorch's CUDA wheels ship, and loaded by PyTorch (``torch.cuda._utils``): no build step, no compiler
on the user's machine. ``kernels.cuh`` holds what both files share, handed to NVRTC as a header.

Each compiled variant is kept on disk (:func:`cached_cubin`, under ``$MAMBAPEFT_KERNEL_CACHE`` or
``~/.cache/mambapeft/kernels``), so that every training process of a grid does not compile the same
variants again: a file per (source, headers, options, architecture, NVRTC version), named by their
SHA-256, written atomically (processes compiling the same variant at once each write a whole file).
``MAMBAPEFT_KERNEL_CACHE=off`` compiles in every process; a cache that cannot be written is skipped.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
from importlib import resources
from pathlib import Path

import torch

from ..io import write_bytes_atomic

log = logging.getLogger("mambapeft.kernels")
CACHE_ENV = "MAMBAPEFT_KERNEL_CACHE"  # a folder for compiled kernels, or "off"

HEADERS = ("kernels.cuh",)
MEASURED_ARCH_MAJOR = 9  # Hopper (H100, H200): the only architecture our kernels were timed on
SEQUENCE_DTYPES = (torch.float32, torch.bfloat16)  # the sequences' dtypes the kernels are built for (IN_BF16)


def _check(nvrtc, result: int, source_name: str, program=None) -> None:
    if result == 0:
        return
    log = b""
    if program is not None:
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, buffer)
        log = buffer.value
    error_string = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_int)(("nvrtcGetErrorString", nvrtc))
    raise RuntimeError(f"NVRTC: {error_string(result).decode()} compiling {source_name}\n"
                       f"{log.decode(errors='replace')}")


def package_source(name: str) -> str:
    """The text of one of this package's CUDA files (``scan_short.cu``, ``kernels.cuh``, ...)."""
    return resources.files(__package__).joinpath(name).read_text()


def compile_cubin(source: str, source_name: str, arch: str, options: list[str], nvrtc: ctypes.CDLL,
                  headers: dict[str, str] | None = None) -> bytes:
    """``source`` (named ``source_name`` in errors) compiled for sm_``arch`` by the NVRTC library
    ``nvrtc``, ``headers`` (include name: text) where it includes them: the cubin's bytes."""
    headers = headers if headers is not None else {name: package_source(name) for name in HEADERS}
    program = ctypes.c_void_p()
    texts = (ctypes.c_char_p * len(headers))(*(text.encode() for text in headers.values()))
    names = (ctypes.c_char_p * len(headers))(*(name.encode() for name in headers))
    _check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), source_name.encode(),
                                           len(headers), texts, names), source_name)
    try:
        # fast math as mamba-ssm's kernels are built (exp2 on the special-function unit); line info
        # for profilers (ncu's source view); -default-device: a lambda inside a kernel is device code
        # (NVRTC 13.0 takes no annotation on one and reads one without as host code)
        flags = [f"--gpu-architecture=sm_{arch}", "--use_fast_math", "--std=c++17", "-lineinfo", "-default-device",
                 *options]
        array = (ctypes.c_char_p * len(flags))(*(f.encode() for f in flags))
        _check(nvrtc, nvrtc.nvrtcCompileProgram(program, len(flags), array), source_name, program)
        size = ctypes.c_size_t()
        _check(nvrtc, nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)), source_name)
        cubin = ctypes.create_string_buffer(size.value)
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin), source_name)
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def cache_folder() -> Path | None:
    """Where compiled kernels are kept: ``$MAMBAPEFT_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/mambapeft/kernels``
    (``~/.cache/mambapeft/kernels``); None where the variable is "off" or there is no home folder."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen)
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mambapeft" / "kernels"
    try:
        return Path.home() / ".cache" / "mambapeft" / "kernels"
    except RuntimeError:  # no home folder to be found (a bare container): compile in each process
        return None


def _version(nvrtc: ctypes.CDLL) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def cached_cubin(source_name: str, arch: str, options: list[str], nvrtc: ctypes.CDLL) -> bytes:
    """:func:`compile_cubin` of this package's ``source_name`` (with its headers), read from the
    kernel cache (:func:`cache_folder`) where an earlier process compiled the same variant, else
    compiled and kept there."""
    source = package_source(source_name)
    headers = {name: package_source(name) for name in HEADERS}
    key = hashlib.sha256("\0".join([source, *headers, *headers.values(), arch, *options, _version(nvrtc)]).encode())
    folder = cache_folder()
    path = folder / f"{source_name}.{key.hexdigest()[:32]}.sm_{arch}.cubin" if folder is not None else None
    if path is not None:
        try:
            cubin = path.read_bytes()
        except OSError:  # not there yet (or unreadable)
            cubin = b""
        if cubin[:4] == b"\x7fELF":  # a cubin; anything else is compiled again and replaced
            return cubin
    cubin = compile_cubin(source, source_name, arch, options, nvrtc, headers)
    if path is not None:
        try:
            write_bytes_atomic(path, cubin)
        except OSError as err:  # a read-only or full cache: compile in each process instead
            log.debug("kernel cache %s not written (%s)", path, err)
    return cubin


@functools.cache
def nvrtc_available() -> bool:
    """Whether PyTorch's NVRTC library loads (CUDA builds of PyTorch ship it) and PyTorch can load a
    compiled module (``torch.cuda._utils``, PyTorch 2.8 and later)."""
    try:
        from torch.cuda._utils import _cuda_load_module, _get_gpu_rtc_library  # noqa: F401
        _get_gpu_rtc_library()
    except (ImportError, OSError, AttributeError, TypeError):  # a CPU build (no CUDA version) or no library
        return False
    return True


def switched_on(device: torch.device, off_switch: str) -> bool:
    """Whether our kernels may run on ``device``: a CUDA device of the architecture they were measured
    on (elsewhere they may be slower than the packages' kernels they replace), NVRTC present, and the
    environment variable ``off_switch`` not "0" (A/B runs)."""
    return (device.type == "cuda" and os.environ.get(off_switch, "1") != "0" and nvrtc_available()
            and torch.cuda.get_device_capability(device)[0] == MEASURED_ARCH_MAJOR)


def defines(values: dict[str, int | bool]) -> list[str]:
    """The compiler's -D options for one variant of a kernel file: each macro's value as an integer."""
    return [f"-D{name}={int(value)}" for name, value in values.items()]


@functools.cache
def load_kernels(source_name: str, device_index: int, options: tuple[str, ...], names: tuple[str, ...],
                 off_switch: str) -> tuple:
    """The kernels ``names`` of ``source_name`` compiled with ``options`` for the device's architecture
    and loaded on it; a compile error says to set ``off_switch`` to 0 (the packages' kernels instead)."""
    from torch.cuda._utils import _cuda_load_module, _get_gpu_rtc_library

    major, minor = torch.cuda.get_device_capability(device_index)
    try:
        cubin = cached_cubin(source_name, f"{major}{minor}", list(options), _get_gpu_rtc_library())
    except RuntimeError as error:
        raise RuntimeError(f"{error}\nOur {source_name} did not compile on this machine: set {off_switch}=0 to "
                           "train with the packages' kernels, and report the log above") from error
    with torch.cuda.device(device_index):
        module = _cuda_load_module(cubin, list(names))
    return tuple(module[name] for name in names)


def launch(kernel, device: torch.device, grid: tuple[int, int, int], threads: int, args: list) -> None:
    """``kernel`` on ``device``'s current stream."""
    with torch.cuda.device(device):
        kernel(grid=grid, block=(threads, 1, 1), args=args)
