"""Mamba's selective scan for training at short lengths: CUDA kernels (``scan_short.cu``) compiled at
run time by NVRTC, the compiler PyTorch's CUDA wheels ship, with the interface of mamba-ssm's
``selective_scan_cuda.fwd`` / ``.bwd`` for what the fused mixer function passes them (``scan.py:
_MambaInnerFn``): real A, B and C per step of one group, up to 24 states (16, mamba's default, and the
17 or 22 of additional-scan's extended state), D, z, delta_bias, softplus, and (ours alone)
state-offset tuning's offset h' added to the state the output reads.

Why: mamba-ssm's kernels run a parallel scan along time per state, and at Vim's 197 tokens that, not
memory, is most of the step (the backward 0.56 ms at (32, 768, 256, 16) on one H200, where its inputs
stream in tens of microseconds). Here four lanes step one channel's N states through time (the
kernel file says how, and README "The short-sequence scan" what it measured).

Reference: ``scan.selective_scan_torch``. Shapes: u, delta, z, dout, out (B, D, L), any batch and channel
strides, unit stride along L; A (D, N); B, C (B, N, L), any strides; D, delta_bias (D,); offset (D, N).
"""
from __future__ import annotations

import functools

import torch

from . import nvrtc
from .nvrtc import SEQUENCE_DTYPES

LANES = 4  # lanes per channel, each holding ceil(N / 4) of its states
BLOCK_CHANNELS = 32  # the channels of a thread block, LANES threads each (the kernel file's CHANNELS)
# The state counts these kernels run: mamba's default d_state 16 (Vim's and the Mamba LMs') up to
# additional-scan's extensions of it (16 + 1 in the hybrid space's "all", 16 + 6). Measured on one H200
# against mamba-ssm's at 16, 17 and 22 (README "The short-sequence scan").
MIN_STATES, MAX_STATES = 16, 24
SOURCE = "scan_short.cu"
# The longest sequence these kernels take; longer ones keep mamba-ssm's. Measured on one H200 (bf16,
# fwd + bwd, ours vs mamba-ssm's; README "The short-sequence scan"): faster at Vim's 197 steps and at
# 256, slower at 1,024.
MAX_LENGTH = 256
ENV = "MAMBAPEFT_SHORT_SCAN"  # "0": mamba-ssm's kernels at every length (A/B measurements)


def chunk_steps(states: int) -> int:
    """Steps whose states the backward recomputes at once (its shared memory holds one chunk's; the
    kernel file's CHUNK): 8 up to 16 states, past them 4. Measured on one H200 at Vim-S's shape (bf16,
    graph-timed): at 22 states the backward 354.5 -> 320.7 us (then with a checkpoint every 4 steps);
    at 16 states 4 steps were slower (backward 200.4 -> 215.9)."""
    return 8 if states <= 4 * LANES else 4


# Steps between the checkpoints of the state the forward keeps for the backward (KEEP_EVERY), at every
# state count: past 16 states the backward recomputes a chunk's 4 steps from the checkpoint 4 steps
# before it
KEEP_EVERY = 8


# the backward's sums over steps and channels a caller may not want (a frozen A, D or delta_bias: a LoRA's
# training), by the name of the gradient; the kernels skip what is not wanted (scan_short.cu WANTS_*)
SUMS = ("dA", "dD", "ddelta_bias")


def macros(in_dtype: torch.dtype, bc_dtype: torch.dtype, has_D: bool, has_z: bool, has_bias: bool,
           softplus: bool, reverse: bool = False, has_offset: bool = False, states: int = 16,
           accumulate: bool = False, stores_out_z: bool = True, wants: tuple[str, ...] = SUMS,
           a_log: bool = False) -> list[str]:
    """The compiler's -D options for one variant of the kernels (``reverse``: scanning from the last
    step to the first, see kernels.cuh; ``has_offset``: a state offset h'; ``states``: N; ``accumulate``:
    the forward's output and the backward's dz added to what the tensors given hold; ``stores_out_z``:
    the backward writes the output it recomputes; ``wants``: the SUMS the backward computes; ``a_log``:
    A is given as A_log, the state matrix -exp(A_log), and dA is A_log's gradient)."""
    return nvrtc.defines({"NSTATE": states, "IN_BF16": in_dtype == torch.bfloat16,
                          "BC_BF16": bc_dtype == torch.bfloat16,
                          "HAS_D": has_D, "HAS_Z": has_z, "HAS_BIAS": has_bias, "SOFTPLUS": softplus,
                          "CHUNK": chunk_steps(states), "KEEP_EVERY": KEEP_EVERY,
                          "REVERSE": reverse, "HAS_OFFSET": has_offset, "ACCUMULATE": accumulate,
                          "STORES_OUT_Z": stores_out_z, "WANTS_DA": "dA" in wants, "WANTS_DD": "dD" in wants,
                          "WANTS_DBIAS": "ddelta_bias" in wants, "A_LOG": a_log})


def runs(device: torch.device, dtype: torch.dtype, states: int, length: int) -> bool:
    """Whether the fused mixer function scans with these kernels: a CUDA device of the architecture
    they were measured on (Hopper, compute capability 9.x: faster than mamba-ssm's there; elsewhere
    not measured), fp32 or bf16 sequences, MIN_STATES to MAX_STATES states, at most MAX_LENGTH steps,
    NVRTC present and $MAMBAPEFT_SHORT_SCAN not "0"."""
    return (dtype in SEQUENCE_DTYPES and MIN_STATES <= states <= MAX_STATES and length <= MAX_LENGTH
            and nvrtc.switched_on(device, ENV))


def applies(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *sequences: torch.Tensor | None) -> bool:
    """Whether these kernels run this scan: on a CUDA device, real A (D, N) with MIN_STATES to MAX_STATES
    states, B and C per step (their dtype fp32 or bf16), and u with every other sequence (delta, z,
    ...) of one dtype, fp32 or bf16."""
    return (u.is_cuda and A.dtype == torch.float32 and A.dim() == 2 and MIN_STATES <= A.shape[1] <= MAX_STATES
            and B.dim() == 3 and B.dtype in SEQUENCE_DTYPES and u.dtype in SEQUENCE_DTYPES
            and all(t is None or t.dtype == u.dtype for t in sequences))


def _strides(t: torch.Tensor) -> list[int]:
    if t.stride(-1) != 1:
        raise ValueError(f"the short scan needs a unit stride along time, got strides {t.stride()}")
    return [t.stride(0), t.stride(1)]


def _state_strides(t: torch.Tensor) -> list[int]:
    """B, C and their gradients (B, N, L): any strides (the fused function's are x_dbl's columns)."""
    return list(t.stride())


def _launch(kernel, u: torch.Tensor, args: list) -> None:
    """One block per (BLOCK_CHANNELS channels, batch element) of u, on u's device's current stream."""
    blocks = (u.shape[1] + BLOCK_CHANNELS - 1) // BLOCK_CHANNELS
    nvrtc.launch(kernel, u.device, (blocks, u.shape[0], 1), BLOCK_CHANNELS * LANES, args)


# Each kernel's integer arguments after its pointers, in order (scan_short.cu's signatures). All but the
# flags are the layout's sizes and strides, compiled into the kernel (KNOWN_*_ARGS) for the first
# MAX_LAYOUTS layouts a variant runs (a training run has a few: a batch's, an epoch's shorter last, an
# evaluation batch's); past them, the variant reading them as arguments (no compile per layout)
FORWARD_INTS = ("channels", "length", "keep_states", "u_sb", "u_sc", "delta_sb", "delta_sc", "z_sb", "z_sc",
                "B_sb", "B_sn", "B_sl", "C_sb", "C_sn", "C_sl", "out_sb", "out_sc", "out_z_sb", "out_z_sc")
BACKWARD_INTS = ("channels", "length", "states_given", "u_sb", "u_sc", "delta_sb", "delta_sc", "z_sb", "z_sc",
                 "B_sb", "B_sn", "B_sl", "C_sb", "C_sn", "C_sl", "dout_sb", "dout_sc", "du_sb", "du_sc",
                 "ddelta_sb", "ddelta_sc", "dz_sb", "dz_sc", "out_z_sb", "out_z_sc",
                 "dB_sb", "dB_sn", "dB_sl", "dC_sb", "dC_sn", "dC_sl")
FLAGS = ("keep_states", "states_given")
# per kernel: its integer arguments' names, and the macro its compiled-in layout goes into
KNOWN = {"scan_fwd": (FORWARD_INTS, "KNOWN_FORWARD_ARGS"), "scan_bwd": (BACKWARD_INTS, "KNOWN_BACKWARD_ARGS")}
MAX_LAYOUTS = 4
_layouts: dict[tuple, set] = {}  # the layouts compiled in, by variant


@functools.lru_cache(maxsize=256)
def known_args(names: tuple[str, ...], ints: tuple[int, ...]) -> str:
    """The layout's sizes and strides as the KNOWN_*_ARGS macros' assignments ("channels=768;length=197;...")."""
    return "".join(f"{name}={value};" for name, value in zip(names, ints) if name not in FLAGS)


def _run(name: str, u, A, B, D, z, delta_bias, softplus, reverse, offset, accumulate, stores_out_z, wants, a_log,
         pointers: list, ints: list[int]) -> None:
    """Kernel ``name`` ("scan_fwd" or "scan_bwd") of the variant for these inputs, with ``ints`` (its
    integer arguments) compiled in where the variant has room for another layout, one block per
    (BLOCK_CHANNELS channels, batch element) of u (:func:`_launch`)."""
    options = tuple(macros(u.dtype, B.dtype, D is not None, z is not None, delta_bias is not None, softplus,
                           reverse, offset is not None, A.shape[1], accumulate, stores_out_z, wants, a_log))
    names, macro = KNOWN[name]
    layout = known_args(names, tuple(ints))
    compiled = _layouts.setdefault((name, u.device.index, options), set())
    if layout in compiled or len(compiled) < MAX_LAYOUTS:
        compiled.add(layout)
        options += (f"-D{macro}={layout}",)
    kernel, = nvrtc.load_kernels(SOURCE, u.device.index, options, (name,), ENV)
    _launch(kernel, u, pointers + ints)


def checkpoints(u: torch.Tensor, states: int) -> torch.Tensor:
    """An empty tensor for the state before every KEEP_EVERY-th step of u (B, D, L) with ``states``
    states: (B, checkpoints, N', D) fp32, N' the lanes' padded count (multiple of 4): 64 bytes per channel
    every 8 steps at N = 16 (twice a bf16 xz's bytes; at 22 states 96 bytes: three times)."""
    batch, channels, length = u.shape
    padded = -(-states // LANES) * LANES
    return torch.empty(batch, -(-length // KEEP_EVERY), padded, channels, device=u.device, dtype=torch.float32)


def forward(u, delta, A, B, C, D, z, delta_bias, softplus, reverse=False, keep_states=False, offset=None,
            into=None, a_log=False):
    """(out, out_z, states): without z, out = the scan's y (B, D, L) and out_z None; with z, out_z =
    y * silu(z) and out None (y is not kept: the backward recomputes it). ``reverse``: the scan runs
    from the last step to the first, as on the sequences flipped along time, with its outputs in the
    inputs' order. ``keep_states``: states = the state before each chunk (:func:`checkpoints`), for
    :func:`backward` to read instead of recomputing them (one of its three passes over time), else None.
    ``offset`` (D, N) fp32 or None: y = C (h + offset) + D u at every step (state-offset tuning).
    ``into``: a (B, D, L) tensor of u's dtype the output is added to (``into + output`` rounded as
    PyTorch rounds it) and returned as it, or None (a new tensor). ``a_log``: A is A_log (D, N), the
    state matrix -exp(A_log) (computed in the kernel: a trained A_log's two kernels a call less)."""
    result = into if into is not None else torch.empty_like(u)
    out, out_z = (None, result) if z is not None else (result, None)
    states = checkpoints(u, A.shape[1]) if keep_states else None
    _run("scan_fwd", u, A, B, D, z, delta_bias, softplus, reverse, offset, into is not None, True, SUMS, a_log,
         [u, delta, A.contiguous(), B, C, D if D is not None else A, z if z is not None else u,
          delta_bias if delta_bias is not None else A, _given(offset, A), result, result, states if keep_states else A],
         [u.shape[1], u.shape[2], int(keep_states), *_strides(u), *_strides(delta),
          *_strides(z if z is not None else u), *_state_strides(B), *_state_strides(C), *_strides(result),
          *_strides(result)])
    return out, out_z, states


def backward(u, delta, A, B, C, D, z, delta_bias, dout, dz, softplus, reverse=False, states=None, offset=None,
             add_dz=False, recompute_out_z=True, wants=SUMS, a_log=False):
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z, doffset) of out_z (or y without z)
    given dout, with out_z recomputed where ``recompute_out_z`` (else None); dz a (B, D, L) tensor to
    write into (with ``add_dz``, to add z's gradient to: as :func:`forward`'s ``into``) or None;
    ``states``: what :func:`forward` kept with ``keep_states``, or None (computed here); ``offset`` as
    :func:`forward`'s; ``wants``: the SUMS computed, the others None; ``a_log`` as :func:`forward`'s (dA
    is then A_log's gradient, A dA). dA, dB, dC, dD, ddelta_bias and doffset are fp32; dD, ddelta_bias,
    doffset None where D, delta_bias, offset are."""
    unknown = set(wants) - set(SUMS)
    if unknown:
        raise ValueError(f"the short scan's backward computes {SUMS} on request, not {sorted(unknown)}")
    if add_dz and (z is None or dz is None):
        raise ValueError("the short scan adds z's gradient to a dz given: pass z and dz")
    recompute_out_z = recompute_out_z and z is not None
    (batch, channels, length), n = u.shape, A.shape[1]
    fp32 = dict(device=u.device, dtype=torch.float32)
    ckpt = states if states is not None else checkpoints(u, n)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    # the kernel's sums, zeroed by one fill (not one per gradient): dA, dD, ddelta_bias, and dB and dC
    # token-major, side by side (as x_proj's output holds B and C: the fused function's backward copies
    # them into its gradient at once, scan._side_by_side)
    offsets = channels * n if offset is not None else 0
    sums = torch.zeros(channels * (n + 2) + offsets + batch * length * 2 * n, **fp32)
    dA, dD, ddelta_bias, doffset, dBC = sums.split([channels * n, channels, channels, offsets, batch * length * 2 * n])
    dA, doffset = dA.view(channels, n), doffset.view(-1, n)
    dB, dC = dBC.view(batch, length, 2 * n).transpose(1, 2).split(n, dim=1)
    dz = (dz if dz is not None else torch.empty_like(z)) if z is not None else du  # without z: unread, unwritten
    out_z = torch.empty_like(u) if recompute_out_z else du  # as dz
    wants = tuple(name for name in SUMS if name in wants)  # one variant whatever the order
    _run("scan_bwd", u, A, B, D, z, delta_bias, softplus, reverse, offset, add_dz, recompute_out_z, wants, a_log,
         [u, delta, A.contiguous(), B, C, D if D is not None else dD, z if z is not None else u,
          delta_bias if delta_bias is not None else dD, _given(offset, dA), dout, ckpt,
          du, ddelta, dA, dB, dC, dD, ddelta_bias, doffset if offset is not None else dA, dz, out_z],
         [channels, length, int(states is not None), *_strides(u), *_strides(delta),
          *_strides(z if z is not None else u), *_state_strides(B), *_state_strides(C), *_strides(dout),
          *_strides(du), *_strides(ddelta), *_strides(dz), *_strides(out_z), *_state_strides(dB),
          *_state_strides(dC)])
    return (du, ddelta, dA if "dA" in wants else None, dB, dC, dD if D is not None and "dD" in wants else None,
            ddelta_bias if delta_bias is not None and "ddelta_bias" in wants else None,
            dz if z is not None else None, out_z if recompute_out_z else None,
            doffset if offset is not None else None)


def _given(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """An optional input as a kernel argument: a variant compiled without it never reads the stand-in."""
    if t is None:
        return stand_in
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"the short scan takes its state offset as a contiguous fp32 (D, N) tensor, got {t.dtype}")
    return t


# mamba-ssm's ``selective_scan_cuda.fwd`` / ``.bwd`` interface (B and C of shape (batch, 1, N, L)), as
# ``scan._MambaInnerFn`` calls either; ``reverse`` (ours only) as in :func:`forward`
def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False, keep_states=False, offset=None,
        into=None, a_log=False):
    """(out, states, out_z): states, our chunks' checkpoints with ``keep_states`` (:func:`forward`),
    else None; with z, out is None (our backward recomputes y, so the caller keeps no (B, D, L) tensor
    for it); ``into`` and ``a_log`` as :func:`forward`'s."""
    out, out_z, states = forward(u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias, delta_softplus, reverse,
                                 keep_states, offset, into, a_log)
    return out, states, out_z


def bwd(u, delta, A, B, C, D, z, delta_bias, dout, chunk_states, out, dz, delta_softplus, recompute_out_z,
        reverse=False, offset=None, add_dz=False, wants=SUMS, a_log=False):
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z) as mamba-ssm's (out_z None unless
    ``recompute_out_z``; dA, dD, ddelta_bias None where not in ``wants``), and doffset (None without an
    offset) tenth; chunk_states: what :func:`fwd` returned (our checkpoints or None); out is not read;
    ``add_dz``, ``wants`` and ``a_log`` as :func:`backward`'s."""
    du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z, doffset = backward(
        u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias, dout, dz, delta_softplus, reverse, chunk_states, offset,
        add_dz, recompute_out_z, wants, a_log)
    return du, ddelta, dA, dB.unsqueeze(1), dC.unsqueeze(1), dD, ddelta_bias, dz, out_z, doffset
