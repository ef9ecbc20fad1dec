"""Mamba's selective scan for training at short lengths: CUDA kernels (``scan_short.cu``) compiled at
run time by NVRTC, the compiler PyTorch's CUDA wheels ship, with the interface of mamba-ssm's
``selective_scan_cuda.fwd`` / ``.bwd`` for what the fused mixer function passes them (``scan.py:
_MambaInnerFn``): real A, B and C per step of one group, 16 states, D, z, delta_bias, softplus.

Why: mamba-ssm's kernels run a parallel scan along time per state, and at Vim's 197 tokens that, not
memory, is most of the step (the backward 0.56 ms at (32, 768, 256, 16) on one H200, where its inputs
stream in tens of microseconds). Here four lanes step one channel's 16 states through time (the
kernel file says how, and README "The short-sequence scan" what it measured).

Reference: ``scan.selective_scan_torch``. Shapes: u, delta, z, dout, out (B, D, L), any batch and channel
strides, unit stride along L; A (D, 16); B, C (B, 16, L); D, delta_bias (D,).
"""
from __future__ import annotations

import ctypes
import functools
import os
from importlib import resources

import torch

STATES = 16  # the kernels' state count (mamba's default d_state; Vim's and the Mamba LMs')
CHUNK = 8  # steps between the backward's checkpoints of the state (its shared memory holds one chunk)
CHANNELS, THREADS = 32, 128  # a thread block's channels and threads (four per channel)
SOURCE = "scan_short.cu"
# The longest sequence these kernels take; longer ones keep mamba-ssm's. Measured on one H200 (bf16,
# fwd + bwd, ours vs mamba-ssm's; README "The short-sequence scan"): faster at Vim's 197 steps and at
# 256, slower at 1,024.
MAX_LENGTH = 256
ENV = "MAMBAPEFT_SHORT_SCAN"  # "0": mamba-ssm's kernels at every length (A/B measurements)
MEASURED_ARCH_MAJOR = 9  # Hopper (H100, H200): the only architecture these kernels were timed on


def _nvrtc_check(nvrtc, result: int, program=None) -> None:
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
    raise RuntimeError(f"NVRTC: {error_string(result).decode()} compiling {SOURCE}\n{log.decode(errors='replace')}")


def compile_cubin(source: str, arch: str, options: list[str], nvrtc: ctypes.CDLL) -> bytes:
    """``source`` compiled for sm_``arch`` by the NVRTC library ``nvrtc``: the cubin's bytes."""
    program = ctypes.c_void_p()
    _nvrtc_check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), SOURCE.encode(),
                                                 0, None, None))
    try:
        # fast math as mamba-ssm's kernels are built (exp2 on the special-function unit); line info
        # for profilers (ncu's source view)
        flags = [f"--gpu-architecture=sm_{arch}", "--use_fast_math", "--std=c++17", "-lineinfo", *options]
        array = (ctypes.c_char_p * len(flags))(*(f.encode() for f in flags))
        _nvrtc_check(nvrtc, nvrtc.nvrtcCompileProgram(program, len(flags), array), program)
        size = ctypes.c_size_t()
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin))
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def macros(in_dtype: torch.dtype, bc_dtype: torch.dtype, has_D: bool, has_z: bool, has_bias: bool,
           softplus: bool) -> list[str]:
    """The compiler's -D options for one variant of the kernels."""
    values = {"IN_BF16": in_dtype == torch.bfloat16, "BC_BF16": bc_dtype == torch.bfloat16, "HAS_D": has_D,
              "HAS_Z": has_z, "HAS_BIAS": has_bias, "SOFTPLUS": softplus, "CHUNK": CHUNK}
    return [f"-D{name}={int(value)}" for name, value in values.items()]


@functools.cache
def _kernels(device_index: int, options: tuple[str, ...]):
    """(forward, backward) kernels of one variant, compiled for the device's architecture and loaded."""
    from torch.cuda._utils import _cuda_load_module, _get_gpu_rtc_library

    major, minor = torch.cuda.get_device_capability(device_index)
    source = resources.files(__package__).joinpath(SOURCE).read_text()
    try:
        cubin = compile_cubin(source, f"{major}{minor}", list(options), _get_gpu_rtc_library())
    except RuntimeError as error:
        raise RuntimeError(f"{error}\nOur short-sequence scan did not compile on this machine: set {ENV}=0 to "
                           "train with mamba-ssm's kernels, and report the log above") from error
    with torch.cuda.device(device_index):
        kernels = _cuda_load_module(cubin, ["scan_fwd", "scan_bwd"])
    return kernels["scan_fwd"], kernels["scan_bwd"]


_DTYPES = (torch.float32, torch.bfloat16)


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


def runs(device: torch.device, dtype: torch.dtype, states: int, length: int) -> bool:
    """Whether the fused mixer function scans with these kernels: a CUDA device of the architecture
    they were measured on (Hopper, compute capability 9.x: faster than mamba-ssm's there; elsewhere
    not measured), fp32 or bf16 sequences, 16 states, at most MAX_LENGTH steps, NVRTC present and
    $MAMBAPEFT_SHORT_SCAN not "0"."""
    return (device.type == "cuda" and dtype in _DTYPES and states == STATES and length <= MAX_LENGTH
            and os.environ.get(ENV, "1") != "0" and nvrtc_available()
            and torch.cuda.get_device_capability(device)[0] == MEASURED_ARCH_MAJOR)


def applies(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *sequences: torch.Tensor | None) -> bool:
    """Whether these kernels run this scan: on a CUDA device, real A (D, 16), B and C per step (their
    dtype fp32 or bf16), and u with every other sequence (delta, z, ...) of one dtype, fp32 or bf16."""
    return (u.is_cuda and A.dtype == torch.float32 and A.dim() == 2 and A.shape[1] == STATES
            and B.dim() == 3 and B.dtype in _DTYPES and u.dtype in _DTYPES
            and all(t is None or t.dtype == u.dtype for t in sequences))


def _strides(t: torch.Tensor) -> list[int]:
    if t.stride(-1) != 1:
        raise ValueError(f"the short scan needs a unit stride along time, got strides {t.stride()}")
    return [t.stride(0), t.stride(1)]


def _launch(kernel, u: torch.Tensor, args: list) -> None:
    """One block per (32 channels, batch element) of u, on u's device's current stream."""
    with torch.cuda.device(u.device):
        kernel(grid=((u.shape[1] + CHANNELS - 1) // CHANNELS, u.shape[0], 1), block=(THREADS, 1, 1), args=args)


def _variant(u, B, D, z, delta_bias, softplus):
    """(forward, backward) kernels for these inputs' dtypes and the arguments given."""
    return _kernels(u.device.index, tuple(macros(u.dtype, B.dtype, D is not None, z is not None,
                                                 delta_bias is not None, softplus)))


def forward(u, delta, A, B, C, D, z, delta_bias, softplus):
    """(out, out_z): without z, out = the scan's y (B, D, L) and out_z None; with z, out_z = y * silu(z)
    and out None (y is not kept: the backward recomputes it)."""
    fwd, _ = _variant(u, B, D, z, delta_bias, softplus)
    result = torch.empty_like(u)
    out, out_z = (None, result) if z is not None else (result, None)
    _launch(fwd, u, [u, delta, A.contiguous(), B, C, D if D is not None else A, z if z is not None else u,
                     delta_bias if delta_bias is not None else A, result, result, u.shape[1], u.shape[2],
                     *_strides(u), *_strides(delta), *_strides(z if z is not None else u), *_strides(B),
                     *_strides(C), *_strides(result), *_strides(result)])
    return out, out_z


def backward(u, delta, A, B, C, D, z, delta_bias, dout, dz, softplus):
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z) of out_z (or y without z) given
    dout, with out_z recomputed; dz a (B, D, L) tensor to write into or None.
    dA, dB, dC, dD and ddelta_bias are fp32; dD, ddelta_bias None where D, delta_bias are."""
    _, bwd = _variant(u, B, D, z, delta_bias, softplus)
    batch, channels, length = u.shape
    chunks = (length + CHUNK - 1) // CHUNK
    fp32 = dict(device=u.device, dtype=torch.float32)
    ckpt = torch.empty(batch, chunks, STATES, channels, **fp32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dA = torch.zeros(channels, STATES, **fp32)
    dB, dC = torch.zeros(batch, STATES, length, **fp32), torch.zeros(batch, STATES, length, **fp32)
    dD, ddelta_bias = torch.zeros(channels, **fp32), torch.zeros(channels, **fp32)
    if z is not None:
        dz = dz if dz is not None else torch.empty_like(z)
        out_z = torch.empty_like(u)
    else:
        dz, out_z = du, du  # unread and unwritten: any (B, D, L) tensor
    _launch(bwd, u, [u, delta, A.contiguous(), B, C, D if D is not None else dD, z if z is not None else u,
                     delta_bias if delta_bias is not None else dD, dout, ckpt,
                     du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z, channels, length, chunks,
                     *_strides(u), *_strides(delta), *_strides(z if z is not None else u), *_strides(B),
                     *_strides(C), *_strides(dout), *_strides(du), *_strides(ddelta), *_strides(dz),
                     *_strides(out_z), *_strides(dB), *_strides(dC)])
    return (du, ddelta, dA, dB, dC, dD if D is not None else None,
            ddelta_bias if delta_bias is not None else None,
            dz if z is not None else None, out_z if z is not None else None)


# mamba-ssm's ``selective_scan_cuda.fwd`` / ``.bwd`` interface (B and C of shape (batch, 1, N, L)), as
# ``scan._MambaInnerFn`` calls either
def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """(out, None, out_z): no chunk states, which only mamba-ssm's backward reads; with z, out is None
    (our backward recomputes y, so the caller keeps no (B, D, L) tensor for it)."""
    out, out_z = forward(u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias, delta_softplus)
    return out, None, out_z


def bwd(u, delta, A, B, C, D, z, delta_bias, dout, chunk_states, out, dz, delta_softplus, recompute_out_z):
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z); chunk_states and out are not read, out_z
    is always recomputed."""
    du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z = backward(u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias,
                                                                 dout, dz, delta_softplus)
    return du, ddelta, dA, dB.unsqueeze(1), dC.unsqueeze(1), dD, ddelta_bias, dz, out_z
