"""models/scan_short.py: our short-sequence selective scan (CUDA, compiled by NVRTC).

On the CPU: which calls take it, and that every variant of its source compiles for sm_90 (NVRTC from
the `nvidia-cuda-nvrtc` wheel of the test extras). On a GPU (`gpu` marker): outputs and every gradient
against the float64 PyTorch scan, fp32 and bf16, next to mamba-ssm's kernels' errors against the same
reference; and the fused mixer function on it against mamba-ssm's kernels. The kernels' own tests run
twice (conftest's kernel_device): on the GPU, and on the CPU through tests/cuda_emulation.h, which
checks their logic where CI has no GPU (against the float64 scan and each other, at most 4 x 96).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import itertools
import os
import pathlib
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mambapeft.bench.scan import kernel_inputs
from mambapeft.cli.bench import _shape, cmd_bench_scan_kernels
from mambapeft.models import conv_bwd, nvrtc, scan, scan_short
from nvrtc_helpers import emulated_size, nvrtc_wheel_library, relative

CUDA = torch.device("cuda")


def test_runs_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(nvrtc, "nvrtc_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv(scan_short.ENV, raising=False)
    assert scan_short.runs(CUDA, torch.bfloat16, 16, 197)
    assert scan_short.runs(CUDA, torch.float32, 16, scan_short.MAX_LENGTH)
    assert not scan_short.runs(CUDA, torch.bfloat16, 16, scan_short.MAX_LENGTH + 1)
    assert scan_short.runs(CUDA, torch.bfloat16, 22, 197)  # additional-scan's 16 + 6
    assert not scan_short.runs(CUDA, torch.bfloat16, 8, 197)  # not measured against mamba-ssm's
    assert not scan_short.runs(CUDA, torch.bfloat16, scan_short.MAX_STATES + 1, 197)
    assert not scan_short.runs(CUDA, torch.float16, 16, 197)
    assert not scan_short.runs(torch.device("cpu"), torch.float32, 16, 197)
    monkeypatch.setenv(scan_short.ENV, "0")
    assert not scan_short.runs(CUDA, torch.bfloat16, 16, 197)
    monkeypatch.setenv(scan_short.ENV, "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not scan_short.runs(CUDA, torch.bfloat16, 16, 197)  # an A100: not measured, mamba-ssm's kernels
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(nvrtc, "nvrtc_available", lambda: False)
    assert not scan_short.runs(CUDA, torch.bfloat16, 16, 197)


def test_applies_checks_shapes_and_dtypes():
    u = torch.zeros(2, 8, 5, dtype=torch.bfloat16)
    A, B = torch.zeros(8, 16), torch.zeros(2, 16, 5, dtype=torch.bfloat16)
    assert not scan_short.applies(u, A, B, u)  # a CPU tensor
    cuda_like = type("CudaLike", (), {"is_cuda": True, "dtype": torch.bfloat16})()
    assert scan_short.applies(cuda_like, A, B, u, None)
    assert not scan_short.applies(cuda_like, A, B, u.float())  # delta or z of another dtype
    assert not scan_short.applies(cuda_like, A.double(), B, u)
    assert not scan_short.applies(cuda_like, torch.zeros(8, 8), B, u)
    assert scan_short.applies(cuda_like, torch.zeros(8, 22), torch.zeros(2, 22, 5, dtype=torch.bfloat16), u)
    assert not scan_short.applies(cuda_like, A, B.unsqueeze(1), u)  # B grouped: (batch, groups, N, L)


@pytest.mark.parametrize("states, padded, chunk", [(16, 16, 8), (17, 20, 4), (22, 24, 4)])
def test_the_forward_keeps_a_checkpoint_every_8_steps_at_every_state_count(states, padded, chunk):
    """Past 16 states the backward recomputes 4 steps at a time (its shared memory) but the forward keeps
    the state every 8 steps as at 16: half the checkpoints' memory (the kernel asserts KEEP_EVERY is a
    multiple of CHUNK dividing the tile)."""
    u = torch.empty(3, 96, 197, device="meta")
    assert scan_short.checkpoints(u, states).shape == (3, 25, padded, 96)  # ceil(197 / 8) checkpoints
    assert scan_short.chunk_steps(states) == chunk
    defines = scan_short.macros(torch.bfloat16, torch.bfloat16, True, True, True, True, states=states)
    assert f"-DKEEP_EVERY={scan_short.KEEP_EVERY}" in defines and f"-DCHUNK={chunk}" in defines


def test_launch_covers_every_channel_on_the_tensors_device(monkeypatch):
    entered, calls = [], []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext(entered.append(device)))
    u = torch.zeros(3, 70, 5)  # 70 channels: three blocks of 32, the last partly empty
    scan_short._launch(lambda **launch: calls.append(launch), u, ["args"])
    assert calls == [{"grid": (3, 3, 1), "block": (128, 1, 1), "args": ["args"]}]
    assert entered == [u.device]


def test_the_launch_gives_a_block_the_channels_the_kernels_hold():
    """The kernel file's CHANNELS (the channels a block's threads step) is the launch's BLOCK_CHANNELS: a
    launch of fewer blocks would leave channels unscanned, of more scan some twice."""
    source = nvrtc.package_source(scan_short.SOURCE)
    assert re.search(r"^#define CHANNELS (\d+)\b", source, re.M).group(1) == str(scan_short.BLOCK_CHANNELS)
    assert re.search(r"^#define LANES (\d+)\b", source, re.M).group(1) == str(scan_short.LANES)


def test_the_first_layouts_a_variant_runs_are_compiled_in_and_later_ones_read_as_arguments(monkeypatch):
    """Each kernel's sizes and strides go into its compile (KNOWN_*_ARGS) for its first MAX_LAYOUTS
    layouts (a training run's few); a layout seen before takes its kernel again; past them the kernel
    reads them as arguments, as it always receives them (one compile for any number of layouts)."""
    kernels = []
    monkeypatch.setattr(scan_short, "_layouts", {})
    monkeypatch.setattr(nvrtc, "load_kernels", lambda source, index, options, names, switch: (options[-1],))
    monkeypatch.setattr(scan_short, "_launch", lambda kernel, u, args: kernels.append((kernel, args[12:])))
    A = torch.zeros(5, 16)
    for length in (7, 8, 9, 10, 11, 7):
        u = torch.zeros(2, 5, length)
        B = torch.zeros(2, length, 16).transpose(1, 2)  # token-major
        scan_short.forward(u, u, A, B, B, None, None, None, False)
    assert kernels[0] == ("-DKNOWN_FORWARD_ARGS=channels=5;length=7;u_sb=35;u_sc=7;delta_sb=35;delta_sc=7;z_sb=35;"
                          "z_sc=7;B_sb=112;B_sn=1;B_sl=16;C_sb=112;C_sn=1;C_sl=16;out_sb=35;out_sc=7;out_z_sb=35;out_z_sc=7;",
                          [5, 7, 0, 35, 7, 35, 7, 35, 7, 112, 1, 16, 112, 1, 16, 35, 7, 35, 7])
    assert [f"length={length};" in kernel for (kernel, _), length in zip(kernels, (7, 8, 9, 10))] == [True] * 4
    assert not kernels[4][0].startswith("-DKNOWN")  # the 5th: as arguments
    assert kernels[4][1][1] == 11 and kernels[5] == kernels[0]  # length 7 again: its kernel


def _assignments(option: str) -> dict[str, str]:
    """A KNOWN_*_ARGS option's assignments ("-DKNOWN_BACKWARD_ARGS=channels=768;length=197;..."), by name."""
    return dict(item.split("=") for item in option.split("=", 1)[1].rstrip(";").split(";"))


def test_sass_regions_counts_the_layout_the_fused_function_passes_at_vim_s():
    """results/benchmarks/profile/sass_regions.py compiles in, by default, the backward's layout as Vim-S's
    fused mixer passes it (scan_short.backward's arguments captured on meta tensors): channel-major
    sequences, B and C in x_proj's token-major rows padded to 16 bytes, dB and dC side by side."""
    path = pathlib.Path(__file__).parents[1] / "results/benchmarks/profile/sass_regions.py"
    spec = importlib.util.spec_from_file_location("sass_regions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = scan_short._run
    option = module.vim_s_layout(22)
    assert scan_short._run is run and option.startswith("-DKNOWN_BACKWARD_ARGS=")
    layout = _assignments(option)
    assert list(layout) == [name for name in scan_short.BACKWARD_INTS if name not in scan_short.FLAGS]
    assert (layout["channels"], layout["length"]) == ("768", "197")
    assert layout["u_sb"] == layout["dz_sb"] == "197" and layout["u_sc"] == layout["dz_sc"] == str(32 * 197)
    assert (layout["B_sn"], layout["B_sl"], layout["C_sl"]) == ("1", "72", "72")  # 24 + 2 x 22 columns, padded
    assert (layout["dB_sb"], layout["dB_sl"]) == (str(197 * 44), "44")
    forward = module.vim_s_layout(16, kernel="fwd")  # --kernel fwd: the forward's, as the first direction's
    assert scan_short._run is run and forward.startswith("-DKNOWN_FORWARD_ARGS=")
    layout = _assignments(forward)
    assert list(layout) == [name for name in scan_short.FORWARD_INTS if name not in scan_short.FLAGS]
    assert layout["u_sc"] == layout["out_z_sc"] == str(32 * 197) and layout["B_sl"] == "56"  # 24 + 2 x 16
    source = nvrtc.package_source(scan_short.SOURCE)  # every region's marker finds its line, once
    for name, kernel in module.KERNELS.items():
        assert module.marked(source, name).count("pmevent") == len(kernel.marks), name


def test_a_sequence_strided_along_time_is_refused():
    with pytest.raises(ValueError, match="unit stride along time"):
        scan_short._strides(torch.zeros(2, 5, 4).transpose(1, 2))


def test_kernel_inputs_are_channel_major_as_the_fused_function_holds_them():
    u, delta, A, B, C, D, z, bias, dout = kernel_inputs(2, 5, 7, torch.bfloat16, True, torch.Generator().manual_seed(0),
                                                        device="cpu")
    assert u.shape == delta.shape == z.shape == dout.shape == (2, 5, 7) and u.stride() == (7, 14, 1)
    assert (A.shape, B.shape, C.shape, D.shape, bias.shape) == ((5, 16), (2, 16, 7), (2, 16, 7), (5,), (5,))
    assert bool((A < 0).all()) and u.dtype == B.dtype == torch.bfloat16 and A.dtype == torch.float32


def test_bench_scan_kernels_without_a_gpu_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one (CI's)
    with pytest.raises(SystemExit, match="needs a CUDA device with mamba-ssm"):
        cmd_bench_scan_kernels(argparse.Namespace(shapes=None, repeats=1, states=[16], out=None))
    assert _shape("32,768,197") == (32, 768, 197)
    with pytest.raises(argparse.ArgumentTypeError, match="BATCH,CHANNELS,LENGTH"):
        _shape("32,768")


def test_nvrtc_not_found_on_a_cpu_build():
    if torch.version.cuda is None:
        assert not nvrtc.nvrtc_available()


# a layout compiled in (Vim-S's: u, delta, z, dout channel-major, B and C token-major) for both kernels
KNOWN = [f"-DKNOWN_FORWARD_ARGS={scan_short.known_args(scan_short.FORWARD_INTS, (768, 197, 1, *[197, 6304] * 3, *[11032, 1, 56] * 2, *[197, 6304] * 2))}",
         f"-DKNOWN_BACKWARD_ARGS={scan_short.known_args(scan_short.BACKWARD_INTS, (768, 197, 1, *[197, 6304] * 3, *[11032, 1, 56] * 2, *[197, 6304] * 5, *[6304, 1, 32] * 2))}"]
VARIANTS = [(in_dtype, bc_dtype, has_D, has_z, has_bias, softplus, *rest)
            for in_dtype, bc_dtype in itertools.product((torch.float32, torch.bfloat16), repeat=2)
            for has_D, has_z, has_bias, softplus in ((True, True, True, True), (False, False, False, False))
            # reverse, has_offset, states, accumulate, stores_out_z, wants, a_log
            for rest in ((False, False, 16, False, True, scan_short.SUMS, False), (True, True, 16, True, False, (), True),
                         (False, True, 17, True, True, ("dD",), False),
                         (True, False, 24, False, False, ("dA", "ddelta_bias"), True))]


@pytest.mark.skipif(nvrtc_wheel_library() is None, reason="needs the nvidia-cuda-nvrtc wheel (test extras, Linux)")
def test_every_variant_compiles_for_hopper():
    """The compiler's errors surface here, not at a user's first training step."""
    library = ctypes.CDLL(str(nvrtc_wheel_library()))
    source = nvrtc.package_source(scan_short.SOURCE)

    def compile_variant(variant):
        return nvrtc.compile_cubin(source, scan_short.SOURCE, "90", scan_short.macros(*variant) + KNOWN, library)

    # on every core: NVRTC compiles programs concurrently, and ctypes lets go of the GIL during its calls
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for variant, cubin in zip(VARIANTS, pool.map(compile_variant, VARIANTS)):
            assert cubin[:4] == b"\x7fELF", variant  # a cubin is an ELF file
            assert b"scan_fwd" in cubin and b"scan_bwd" in cubin


@pytest.mark.skipif(nvrtc_wheel_library() is None, reason="needs the nvidia-cuda-nvrtc wheel (test extras, Linux)")
def test_a_compile_error_names_the_line():
    library = ctypes.CDLL(str(nvrtc_wheel_library()))
    with pytest.raises(RuntimeError, match="NVRTC.*scan_short.cu"):
        nvrtc.compile_cubin("extern \"C\" __global__ void scan_fwd() { undefined_name; }", scan_short.SOURCE, "90", [],
                            library)


# ------------------------------------------------------------------------------------------------
# On a GPU, and (but the fused mixer function's) on the CPU through the emulation (conftest's kernel_device)
# ------------------------------------------------------------------------------------------------
def _reference(u, delta, A, B, C, D, z, bias, dout):
    """out_z and the gradients of (u, delta, A, B, C, D, delta_bias, z), the PyTorch scan in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    out = scan.selective_scan_torch(*leaves[:6], leaves[6], leaves[7], delta_softplus=True)
    out.backward(dout.double())
    grads = [t.grad for t in leaves]
    return out.detach(), grads[:6] + [grads[7], grads[6]]


def _ours(u, delta, A, B, C, D, z, bias, dout, reverse=False, keep_states=False, offset=None, wants=scan_short.SUMS,
          a_log=False):
    out, out_z, states = scan_short.forward(u, delta, A, B, C, D, z, bias, True, reverse, keep_states, offset,
                                            a_log=a_log)
    assert out is None  # y is not kept where z gates it
    assert (states is not None) == keep_states
    du, ddelta, dA, dB, dC, dD, dbias, dz, out_z_again, doffset = scan_short.backward(
        u, delta, A, B, C, D, z, bias, dout, None, True, reverse, states, offset, wants=wants, a_log=a_log)
    assert torch.equal(out_z_again, out_z)  # y recomputed as the forward computed it
    assert (doffset is None) == (offset is None)
    return out_z, [du, ddelta, dA, dB, dC, dD, dbias, dz] + ([doffset] if offset is not None else [])


def _mamba_ssm(u, delta, A, B, C, D, z, bias, dout):
    import selective_scan_cuda

    B4, C4 = B.unsqueeze(1).contiguous(), C.unsqueeze(1).contiguous()
    out, states, out_z = selective_scan_cuda.fwd(u, delta, A, B4, C4, D, z, bias, True)
    du, ddelta, dA, dB, dC, dD, dbias, dz = selective_scan_cuda.bwd(u, delta, A, B4, C4, D, z, bias, dout, states, out,
                                                                   None, True, False)[:8]
    return out_z, [du, ddelta, dA, dB[:, 0], dC[:, 0], dD, dbias, dz]


NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias", "z")


def _bound(ours, theirs, reference, floor: float) -> float:
    """A result's bound against the float64 reference: 3x mamba-ssm's error (``theirs``, its result on
    the GPU) or ``floor``. In the CPU emulation (``theirs`` None: no mamba-ssm there; the C library's
    exact math where the GPU's is fast) the floor, or a bf16 result's own rounding: half its step, up to
    2^-8 of the largest element."""
    if theirs is None:
        return 2 ** -8 if ours.dtype == torch.bfloat16 else floor
    return max(3 * relative(theirs, reference), floor)



@pytest.mark.parametrize("batch, channels, length, dtype, channel_major, states", [
    (2, 70, 37, torch.float32, False, 16),      # channels past a block's 32, a partial last tile
    (3, 64, 200, torch.float32, True, 16),
    (32, 768, 197, torch.bfloat16, True, 16),   # Vim-S, channel-major as the fused function holds it
    (4, 96, 256, torch.bfloat16, False, 16),
    (2, 70, 37, torch.float32, False, 17),      # additional-scan's extended states: the last lane's 5
    (3, 64, 200, torch.float32, True, 22),      # of which 3 (and 2 of 6) are real
    (32, 768, 197, torch.bfloat16, True, 22),
    (4, 96, 256, torch.bfloat16, False, 24),
])
def test_against_the_float64_scan_as_close_as_mamba_ssm(kernel_device, batch, channels, length, dtype, channel_major,
                                                        states):
    on_gpu = kernel_device.type == "cuda"
    if on_gpu:
        pytest.importorskip("selective_scan_cuda")
    batch, channels = emulated_size(kernel_device, batch, channels)
    inputs = kernel_inputs(batch, channels, length, dtype, channel_major, torch.Generator().manual_seed(0),
                           kernel_device, states)
    out_ref, grads_ref = _reference(*inputs)
    out, grads = _ours(*inputs)
    out_m, grads_m = _mamba_ssm(*inputs) if on_gpu else (None, [None] * len(NAMES))
    # fp32: a few float32 roundings; bf16: the output's rounding. Ours within 3x mamba-ssm's error or
    # (sums over channels kept in fp32 where mamba-ssm's are not) well under the dtype's step
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert relative(out, out_ref) <= _bound(out, out_m, out_ref, floor)
    for name, ours, theirs, reference in zip(NAMES, grads, grads_m, grads_ref):
        assert relative(ours, reference) <= _bound(ours, theirs, reference, floor), name


@pytest.mark.parametrize("length, dtype, states", [(197, torch.bfloat16, 16), (37, torch.float32, 16),
                                                   (200, torch.float32, 22)])
def test_without_a_gate_the_output_is_y_as_close_to_the_float64_scan_as_mamba_ssm(kernel_device, length, dtype, states):
    """The ungated variant (y itself the output, as `setup-gpu --check` runs it; the backward's per-step
    sums then two, not three): out and every gradient against the float64 scan, within 3x mamba-ssm's
    error (its autograd function, also ungated) or under the dtype's step."""
    on_gpu = kernel_device.type == "cuda"
    interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface") if on_gpu else None
    u, delta, A, B, C, D, _, bias, dout = kernel_inputs(3, 70, length, dtype, True, torch.Generator().manual_seed(2),
                                                        kernel_device, states)
    leaves = [t.detach().double().requires_grad_() for t in (u, delta, A, B, C, D, bias)]
    out_ref = scan.selective_scan_torch(*leaves[:6], None, leaves[6], delta_softplus=True)
    out_ref.backward(dout.double())

    out_m, theirs = None, [None] * len(leaves)
    if on_gpu:
        theirs = [t.detach().clone().requires_grad_() for t in (u, delta, A, B, C, D, bias)]
        out_m = interface.selective_scan_fn(*theirs[:6], None, theirs[6], delta_softplus=True)
        out_m.backward(dout)
        out_m, theirs = out_m.detach(), [t.grad for t in theirs]

    out, out_z, kept = scan_short.forward(u, delta, A, B, C, D, None, bias, True)
    assert out_z is None and kept is None
    *grads, dz, out_z_again, doffset = scan_short.backward(u, delta, A, B, C, D, None, bias, dout, None, True)
    assert dz is None and out_z_again is None and doffset is None
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert relative(out, out_ref.detach()) <= _bound(out, out_m, out_ref.detach(), floor)
    for name, ours, mamba, reference in zip(NAMES, grads, theirs, leaves):
        assert relative(ours, reference.grad) <= _bound(ours, mamba, reference.grad, floor), name


def _reference_with_offset(u, delta, A, B, C, D, z, bias, dout, offset, reverse):
    """out_z = (C (h + h') + D u) silu(z) in float64 as the unfused chain computes it (the scan, plus
    peft/state_offset.py's term ``silu(z) * C h'``), and the gradients of (u, delta, A, B, C, D,
    delta_bias, z, h'); ``reverse``: the scan from the last step to the first."""
    leaves = [t.detach().double().requires_grad_() for t in (u, delta, A, B, C, D, z, bias, offset)]
    u_, delta_, A_, B_, C_, D_, z_, bias_, offset_ = leaves
    time = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
    out = time(scan.selective_scan_torch(time(u_), time(delta_), A_, time(B_), time(C_), D_, time(z_), bias_,
                                         delta_softplus=True))
    out = out + torch.nn.functional.silu(z_) * torch.einsum("bnl,dn->bdl", C_, offset_)
    out.backward(dout.double())
    grads = [t.grad for t in leaves]
    return out.detach(), grads[:6] + [grads[7], grads[6], grads[8]]


@pytest.mark.parametrize("length, reverse, dtype, states", [(197, False, torch.bfloat16, 16),
                                                           (197, True, torch.bfloat16, 16),
                                                           (37, False, torch.float32, 16),
                                                           (197, True, torch.bfloat16, 22)])
def test_a_state_offset_is_read_with_the_state_as_the_float64_chain_adds_it(kernel_device, length, reverse, dtype,
                                                                           states):
    """State-offset tuning's h' inside the scan: out_z and every gradient (h''s too) against the float64
    scan plus the PyTorch offset term, within 3x the error of the same scan without an offset against
    its own reference (or the dtype's floor); h''s gradient, an fp32 sum, within 1e-5."""
    inputs = kernel_inputs(4, 96, length, dtype, True, torch.Generator().manual_seed(5), kernel_device, states)
    offset = torch.randn(96, states, generator=torch.Generator().manual_seed(6)).to(kernel_device)
    out, grads = _ours(*inputs, reverse=reverse, offset=offset)
    out_ref, grads_ref = _reference_with_offset(*inputs, offset, reverse)
    plain, plain_grads = _ours(*inputs, reverse=reverse)
    plain_ref, plain_grads_ref = _reference_with_offset(*inputs, torch.zeros_like(offset), reverse)
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert relative(out, out_ref) <= max(3 * relative(plain, plain_ref), floor)
    for name, got, expected, plain_got, plain_expected in zip(NAMES, grads, grads_ref, plain_grads, plain_grads_ref):
        assert relative(got, expected) <= max(3 * relative(plain_got, plain_expected), floor), name
    assert relative(grads[8], grads_ref[8]) <= 1e-5


@pytest.mark.parametrize("length", [197, 37])
def test_reverse_is_the_scan_of_the_flipped_sequences(kernel_device, length):
    """From the last step to the first, in the inputs' order: what the scan of the sequences flipped
    along time gives, flipped back (the same sums: equal but for the order of the float atomics that
    sum dA, dB, dC, dD and delta_bias's gradient over channels)."""
    inputs = kernel_inputs(4, 96, length, torch.bfloat16, True, torch.Generator().manual_seed(0), device=kernel_device)
    out, grads = _ours(*inputs, reverse=True)
    flipped = [t.flip(-1) if t.dim() == 3 else t for t in inputs]  # u, delta, B, C, z, dout
    out_f, grads_f = _ours(*flipped)
    assert torch.equal(out, out_f.flip(-1))
    for name, got, expected in zip(NAMES, grads, grads_f):
        expected = expected.flip(-1) if expected.dim() == 3 else expected
        if name in ("u", "delta", "z"):
            assert torch.equal(got, expected), name
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


@pytest.mark.parametrize("length, reverse, states", [(197, False, 16), (197, True, 16), (37, False, 16), (16, True, 16),
                                                     (8, False, 16), (197, True, 22), (37, False, 17)])
def test_states_kept_by_the_forward_give_the_backward_its_gradients(kernel_device, length, reverse, states):
    """With keep_states the forward writes the checkpoints the backward would compute (lengths: past
    whole chunks, a partial tile, one tile, one chunk: no checkpoint at all) and the backward reads
    them: the same gradients (the float atomics' order aside) as the backward that recomputes them."""
    inputs = kernel_inputs(4, 96, length, torch.bfloat16, True, torch.Generator().manual_seed(2), kernel_device, states)
    out, grads = _ours(*inputs, reverse=reverse)
    out_kept, grads_kept = _ours(*inputs, reverse=reverse, keep_states=True)
    assert torch.equal(out, out_kept)
    for name, got, expected in zip(NAMES, grads_kept, grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


@pytest.mark.parametrize("states, reverse", [(16, False), (16, True), (22, True)])
def test_a_layout_compiled_in_computes_what_its_arguments_do(kernel_device, monkeypatch, states, reverse):
    """The kernels with the layout's sizes and strides compiled in (KNOWN_*_ARGS) and reading them as
    arguments (past MAX_LAYOUTS): the same output and sequence gradients bit for bit, the sums over
    channels and steps (float atomics, in any order) to rounding."""
    inputs = kernel_inputs(4, 96, 197, torch.bfloat16, True, torch.Generator().manual_seed(3), kernel_device, states)
    monkeypatch.setattr(scan_short, "_layouts", {})
    out, grads = _ours(*inputs, reverse=reverse, keep_states=True)
    assert all(any(layout) for layout in scan_short._layouts.values())  # compiled in
    monkeypatch.setattr(scan_short, "MAX_LAYOUTS", 0)
    monkeypatch.setattr(scan_short, "_layouts", {})
    out_args, grads_args = _ours(*inputs, reverse=reverse, keep_states=True)
    assert torch.equal(out, out_args)
    for name, got, expected in zip(NAMES, grads_args, grads):
        if name in ("u", "delta", "z"):
            assert torch.equal(got, expected), name
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


@pytest.mark.parametrize("states, reverse, wants", [(16, False, ()), (16, True, ("dD",)), (22, True, ("dA",)),
                                                    (17, False, ("ddelta_bias",))])
def test_sums_not_wanted_are_none_and_the_other_gradients_the_same(kernel_device, states, reverse, wants):
    """A backward asked for only some of A's, D's and delta_bias's gradients (scan_short.SUMS: a LoRA's
    training wants none) returns None for the others and the same output and sequence gradients bit for
    bit as one that wants them all; dB, dC and the sums it computes to rounding (float atomics)."""
    inputs = kernel_inputs(4, 96, 197, torch.bfloat16, True, torch.Generator().manual_seed(4), kernel_device, states)
    out, grads = _ours(*inputs, reverse=reverse, keep_states=True)
    out_some, grads_some = _ours(*inputs, reverse=reverse, keep_states=True, wants=wants)
    assert torch.equal(out, out_some)
    sum_of = dict(zip(("A", "D", "delta_bias"), scan_short.SUMS))  # an input's gradient by its SUMS name
    for name, got, expected in zip(NAMES, grads_some, grads):
        if name in sum_of and sum_of[name] not in wants:
            assert got is None, name
        elif name in ("u", "delta", "z"):
            assert torch.equal(got, expected), name
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


@pytest.mark.parametrize("states, reverse", [(16, False), (16, True), (22, True)])
def test_A_given_as_A_log_scans_with_minus_its_exp(kernel_device, states, reverse):
    """With a_log the kernels read A_log (a trained one, raw), scan with A = -exp(A_log) computed in them
    and return A_log's gradient (A dA): what they compute given that A from PyTorch, to the rounding of
    their exp (fast math) against PyTorch's."""
    inputs = kernel_inputs(4, 96, 197, torch.bfloat16, True, torch.Generator().manual_seed(5), kernel_device, states)
    A_log = (-inputs[2]).log()
    given_A = list(inputs)
    given_A[2] = -torch.exp(A_log)
    out, grads = _ours(*given_A, reverse=reverse, keep_states=True)
    out_log, grads_log = _ours(*inputs[:2], A_log, *inputs[3:], reverse=reverse, keep_states=True, a_log=True)
    def tolerance(t):  # bf16: an element's rounding may flip (2^-8 of the largest at most); fp32 sums
        return 2 ** -7 if t.dtype == torch.bfloat16 else 1e-4

    assert relative(out_log, out) < tolerance(out)
    grads[2] = grads[2] * given_A[2]  # A_log's gradient
    for name, got, expected in zip(NAMES, grads_log, grads):
        assert relative(got, expected) < tolerance(expected), name


def test_a_sum_the_backward_does_not_know_is_refused():
    u = torch.empty(1, 32, 8)
    with pytest.raises(ValueError, match="dA.*not.*dX"):
        scan_short.backward(u, u, torch.empty(32, 16), *[torch.empty(1, 16, 8)] * 2, None, None, None, u, None, True,
                            wants=("dX",))


def test_B_and_C_read_token_major_as_the_fused_function_holds_them(kernel_device):
    """B and C as columns of a token-major (B*L, R + 2N) tensor (x_proj's output: 2N + R apart along
    time) scan as their contiguous copies do; dB and dC come back token-major, side by side."""
    u, delta, A, B, C, D, z, bias, dout = kernel_inputs(4, 96, 197, torch.bfloat16, True,
                                                        torch.Generator().manual_seed(4), device=kernel_device)
    x_dbl = torch.cat([torch.zeros_like(B[:, :5]), B, C], dim=1).transpose(1, 2).contiguous()  # (B, L, 5 + 2N)
    B_view, C_view = x_dbl[..., 5:21].transpose(1, 2), x_dbl[..., 21:].transpose(1, 2)
    assert B_view.stride(-1) == 37
    out, grads = _ours(u, delta, A, B, C, D, z, bias, dout)
    out_v, grads_v = _ours(u, delta, A, B_view, C_view, D, z, bias, dout)
    assert torch.equal(out, out_v)
    for name, got, expected in zip(NAMES, grads_v, grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)
    dB, dC = grads_v[3], grads_v[4]
    assert dB.stride() == (197 * 32, 1, 32) and dC.data_ptr() == dB.data_ptr() + 16 * 4


def _needs_the_fused_function_on_it(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.delenv(scan_short.ENV, raising=False)
    if not scan_short.runs(CUDA, torch.bfloat16, 16, 197):
        pytest.skip("the fused function scans with our kernels on a Hopper GPU with NVRTC only")


def _fused_function_inputs(batch, d_model, d_inner, length, rank, seed):
    """xz (bf16, (2 D_inner, B, L) storage) and the fused function's weights (16 states), as leaves."""
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=0.1):
        return (torch.randn(*shape, generator=generator) * scale).cuda().requires_grad_()

    xz = torch.randn(2 * d_inner, batch, length, generator=generator).to(torch.bfloat16).cuda().requires_grad_()
    weights = (leaf(d_inner, 1, 4), leaf(d_inner), leaf(rank + 32, d_inner), leaf(d_inner, rank, scale=0.5),
               leaf(d_inner), leaf(d_model, d_inner), leaf(d_model),
               (-torch.arange(1, 17).float().repeat(d_inner, 1)).cuda().requires_grad_(), leaf(d_inner, scale=1.0))
    return xz, weights


@pytest.mark.gpu
def test_fused_mixer_on_it_matches_mamba_ssm_kernels(monkeypatch):
    """The fused mixer function (Vim-S's shape, bf16 autocast) with our scan against mamba-ssm's."""
    _needs_the_fused_function_on_it(monkeypatch)
    if scan.CUDA_BACKEND.mamba_inner is None:
        pytest.skip("needs mamba-ssm and causal-conv1d")
    xz, weights = _fused_function_inputs(batch=8, d_model=384, d_inner=768, length=197, rank=24, seed=1)
    calls = []
    monkeypatch.setattr(scan_short, "fwd", lambda *args, run=scan_short.fwd, **kw: calls.append(1) or run(*args, **kw))
    results = []
    for enabled in ("1", "0"):  # ours (scan and conv backward), then the packages' kernels alone
        monkeypatch.setenv(scan_short.ENV, enabled)
        monkeypatch.setenv(conv_bwd.ENV, enabled)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = scan.mamba_inner_cuda(xz.transpose(0, 1), *weights)
        out.float().square().mean().backward()
        results.append([out.detach().float()] + [t.grad.clone() for t in (xz, *weights)])
        for t in (xz, *weights):
            t.grad = None
    assert len(calls) == 1  # ours with the variable set to 1, mamba-ssm's with 0
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, rtol=3e-2, atol=3e-2 * float(theirs.abs().max())), (ours - theirs).abs().max()


@pytest.mark.gpu
def test_fused_mixer_in_reverse_runs_the_kernels_backwards_without_flipping(monkeypatch):
    """The backward direction of a Vim block (``reverse``): output and gradients of the fused function
    on xz flipped along time, flipped back, with no flip run (the kernels read the steps backwards)."""
    _needs_the_fused_function_on_it(monkeypatch)
    if scan.CUDA_BACKEND.mamba_inner is None:
        pytest.skip("needs mamba-ssm and causal-conv1d")
    monkeypatch.delenv(conv_bwd.ENV, raising=False)
    xz, weights = _fused_function_inputs(batch=4, d_model=64, d_inner=128, length=197, rank=8, seed=2)
    results, flips = [], []
    for reverse in (True, False):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                channel_major = xz.transpose(0, 1)
                out = (scan.mamba_inner_cuda(channel_major, *weights, reverse=True) if reverse else
                       scan.mamba_inner_cuda(channel_major.flip(-1), *weights).flip(1))
            out.float().square().mean().backward()
        flips.append(sum(event.count for event in profile.key_averages() if event.key == "aten::flip"))
        results.append([out.detach().float()] + [t.grad.clone() for t in (xz, *weights)])
        for t in (xz, *weights):
            t.grad = None
    assert flips[0] == 0 and flips[1] > 0
    for ours, flipped in zip(*results):
        torch.testing.assert_close(ours, flipped, rtol=1e-2, atol=1e-2 * float(flipped.abs().max()))


@pytest.mark.gpu
def test_fused_mixer_on_it_keeps_no_scan_output(monkeypatch):
    """With our kernels the fused function keeps no (B, D, L) scan output for its backward (y is
    recomputed there): its saved tensors are that much smaller than with mamba-ssm's kernels."""
    _needs_the_fused_function_on_it(monkeypatch)
    if scan.CUDA_BACKEND.mamba_inner is None:
        pytest.skip("needs mamba-ssm and causal-conv1d")
    batch, d_inner, length, rank, d_model = 4, 128, 256, 8, 64
    xz = torch.randn(2 * d_inner, batch, length, device="cuda", dtype=torch.bfloat16).transpose(0, 1).requires_grad_()
    weights = [torch.randn(*shape, device="cuda") * 0.1 for shape in
               ((d_inner, 1, 4), (d_inner,), (rank + 32, d_inner), (d_inner, rank), (d_inner,), (d_model, d_inner),
                (d_model,))] + [-torch.arange(1, 17, device="cuda").float().repeat(d_inner, 1), torch.ones(d_inner, device="cuda")]
    kept = {}
    for enabled in ("1", "0"):
        monkeypatch.setenv(scan_short.ENV, enabled)
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cuda", dtype=torch.bfloat16):
            scan.mamba_inner_cuda(xz, *weights)
        kept[enabled] = sum(sizes)
    assert kept["0"] - kept["1"] == batch * d_inner * length * 2  # mamba-ssm's y, bf16


@pytest.mark.gpu
def test_fused_mixer_keeping_activations_saves_them_for_the_same_gradients(monkeypatch):
    """keep_activations (what Vim trains with): the fused function, both directions, saves the conv
    output, delta and our checkpoints of the state (fp32, every 8 steps) for its backward and gives
    the gradients it gives without them; without gradients to take it keeps none."""
    _needs_the_fused_function_on_it(monkeypatch)
    if scan.CUDA_BACKEND.mamba_inner is None:
        pytest.skip("needs mamba-ssm and causal-conv1d")
    monkeypatch.delenv(conv_bwd.ENV, raising=False)
    batch, d_inner, length = 4, 128, 197
    xz, weights = _fused_function_inputs(batch=batch, d_model=64, d_inner=d_inner, length=length, rank=8, seed=3)
    saved, results = {}, {}
    for keep in (False, True):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cuda", dtype=torch.bfloat16):
            out = sum(scan.mamba_inner_cuda(xz.transpose(0, 1), *weights, reverse=reverse, keep_activations=keep)
                      for reverse in (False, True))
        out.float().square().mean().backward()
        saved[keep], results[keep] = sum(sizes), [out.detach().float()] + [t.grad.clone() for t in (xz, *weights)]
        for t in (xz, *weights):
            t.grad = None
    chunks = -(-length // scan_short.KEEP_EVERY)
    states, conv_out_and_delta = batch * chunks * 16 * d_inner * 4, 2 * batch * d_inner * length * 2
    assert saved[True] - saved[False] == 2 * (states + conv_out_and_delta)  # two directions; fp32, bf16
    for kept, recomputed in zip(results[True], results[False]):  # bf16 gradients after float atomics' sums
        torch.testing.assert_close(kept, recomputed, rtol=1e-2, atol=1e-2 * float(recomputed.abs().max()))
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        calls = []
        monkeypatch.setattr(scan_short, "checkpoints",
                            lambda u, n, run=scan_short.checkpoints: calls.append(1) or run(u, n))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            scan.mamba_inner_cuda(xz.transpose(0, 1), *weights, keep_activations=True)
    assert calls == []  # no backward to come: nothing kept


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,states,offset", [(torch.bfloat16, 16, False), (torch.float32, 16, True),
                                                 (torch.bfloat16, 22, True)])
def test_both_directions_in_one_node_add_as_pytorch_adds_them(monkeypatch, dtype, states, offset):
    """mamba_inner_pair_cuda (Vim's two directions over one xz in one autograd node, the second's output
    and z gradient added by our scan kernels to the first's, its x gradient by the conv backward)
    against mamba_inner_cuda per direction summed by PyTorch, keeping activations as Vim trains: the
    same output and z gradient bit for bit (the kernels add and round as PyTorch's add does), the
    other gradients as close as two float-atomic orders of dB and dC allow; bf16 autocast and fp32,
    16 states and additional-scan's 22, a state offset on the second direction."""
    _needs_the_fused_function_on_it(monkeypatch)
    if scan.CUDA_BACKEND.mamba_inner is None:
        pytest.skip("needs mamba-ssm and causal-conv1d")
    monkeypatch.delenv(conv_bwd.ENV, raising=False)
    generator = torch.Generator().manual_seed(11)
    batch, d_inner, length, rank = 4, 128, 197, 8

    def leaf(*shape, scale=0.1):
        return (torch.randn(*shape, generator=generator) * scale).cuda().requires_grad_()

    def direction(reverse):
        return scan.InnerWeights(leaf(d_inner, 1, 4), leaf(d_inner), leaf(rank + 2 * states, d_inner),
                                 leaf(d_inner, rank, scale=0.5), leaf(d_inner),
                                 (-torch.arange(1, states + 1).float().repeat(d_inner, 1)).cuda().requires_grad_(),
                                 leaf(d_inner, scale=1.0), reverse, leaf(d_inner, states) if offset and reverse else None)

    xz = torch.randn(2 * d_inner, batch, length, generator=generator).to(dtype).cuda().requires_grad_()
    first, second = direction(False), direction(True)
    leaves = [xz] + [t for w in (first, second) for t in (w.conv_weight, w.conv_bias, w.x_proj_weight, w.dt_proj_weight,
                                                          w.dt_proj_bias, w.A, w.D, w.state_offset) if t is not None]
    grad_out = torch.randn(batch, d_inner, length, generator=generator).cuda().to(dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    results = []
    for paired in (True, False):
        with autocast:
            out = (scan.mamba_inner_pair_cuda(xz.transpose(0, 1), first, second, keep_activations=True) if paired else
                   sum(w.run(scan.mamba_inner_cuda, xz.transpose(0, 1), keep_activations=True)
                       for w in (first, second)))
        assert (type(out.grad_fn).__name__ == "_MambaInnerFnBackward") == paired
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    (out, *grads), (summed, *summed_grads) = results
    assert out.dtype == dtype and torch.equal(out, summed)
    assert torch.equal(grads[0][d_inner:], summed_grads[0][d_inner:])  # z's half of xz: no atomics upstream
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for i, (grad, expected) in enumerate(zip(grads, summed_grads)):
        torch.testing.assert_close(grad, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()), msg=str(i))


@pytest.mark.gpu
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_mixer_with_a_state_offset_computes_the_reference(monkeypatch, reverse):
    """State-offset tuning on the fused path: the function on our kernels with h' (each direction, with
    kept activations as Vim trains) against mamba_inner_torch with the same offset (the chain's term
    silu(z) C h'), bf16 autocast: output and every gradient, h''s included; where our scan does not run
    (mamba-ssm's kernels) it refuses the offset."""
    _needs_the_fused_function_on_it(monkeypatch)
    if scan.CUDA_BACKEND.mamba_inner is None:
        pytest.skip("needs mamba-ssm and causal-conv1d")
    xz, weights = _fused_function_inputs(batch=4, d_model=64, d_inner=128, length=197, rank=8, seed=7)
    offset = torch.randn(128, 16, device="cuda").requires_grad_()
    leaves = (xz, *weights, offset)
    results = []
    for fn, keep in ((scan.mamba_inner_torch, False), (scan.mamba_inner_cuda, True)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(xz.transpose(0, 1), *weights, reverse=reverse, keep_activations=keep, state_offset=offset)
        out.float().square().mean().backward()
        results.append([out.detach().float()] + [t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    for ours, reference in zip(results[1], results[0]):
        torch.testing.assert_close(ours, reference, rtol=3e-2, atol=3e-2 * float(reference.abs().max()))
    monkeypatch.setenv(scan_short.ENV, "0")
    with pytest.raises(ValueError, match="state offset only where our short-sequence scan runs"):
        scan.mamba_inner_cuda(xz.transpose(0, 1), *weights, state_offset=offset)
