"""Our causal conv backward (models/conv_bwd.cu, compiled by NVRTC): where it runs, that every variant
compiles for Hopper (on any machine with the NVRTC wheel), and on a GPU its gradients against
PyTorch's conv under autograd in float64 and against causal-conv1d's kernel; the kernel's tests also
on the CPU through tests/cuda_emulation.h (conftest's kernel_device), against the float64 conv."""
from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

from mambapeft.models import conv_bwd, nvrtc, scan

from nvrtc_helpers import emulated_size, nvrtc_wheel_library, relative

CUDA = torch.device("cuda")


class _CudaLike:
    """What ``runs`` reads of a tensor, for a CUDA tensor on a machine without one."""

    def __init__(self, dtype=torch.bfloat16, time_stride=1, length=197):
        self.is_cuda, self.dtype, self.device, self._time_stride = True, dtype, CUDA, time_stride
        self.shape = (2, 8, length)

    def stride(self, dim):
        return self._time_stride


def test_runs_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(nvrtc, "nvrtc_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv(conv_bwd.ENV, raising=False)
    x, weight = _CudaLike(), torch.zeros(8, 4)
    assert conv_bwd.runs(x, weight, x)
    assert conv_bwd.runs(_CudaLike(torch.float32), torch.zeros(8, 2), _CudaLike(torch.float32))
    assert not conv_bwd.runs(x, torch.zeros(8, 5), x)  # widths 2 to 4
    assert not conv_bwd.runs(_CudaLike(torch.float16), weight, _CudaLike(torch.float16))
    assert not conv_bwd.runs(x, weight, _CudaLike(torch.float32))  # dout of another dtype
    assert not conv_bwd.runs(x, weight, _CudaLike(time_stride=3))
    assert conv_bwd.runs(_CudaLike(length=conv_bwd.MAX_LENGTH), weight, x)
    assert not conv_bwd.runs(_CudaLike(length=conv_bwd.MAX_LENGTH + 1), weight, x)  # causal-conv1d's is faster
    assert not conv_bwd.runs(torch.zeros(2, 8, 5), weight, torch.zeros(2, 8, 5))  # on the CPU
    monkeypatch.setenv(conv_bwd.ENV, "0")
    assert not conv_bwd.runs(x, weight, x)
    monkeypatch.setenv(conv_bwd.ENV, "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not conv_bwd.runs(x, weight, x)  # an A100: not measured, causal-conv1d's kernel
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(nvrtc, "nvrtc_available", lambda: False)
    assert not conv_bwd.runs(x, weight, x)


def test_longer_sequences_than_a_row_are_refused():  # the kernel holds one row of MAX_LENGTH steps
    x = torch.zeros(1, 2, conv_bwd.MAX_LENGTH + 1)
    with pytest.raises(ValueError, match=f"at most {conv_bwd.MAX_LENGTH} steps"):
        conv_bwd.backward(x, torch.zeros(2, 4), None, x, None, True)


def test_states_and_sequence_indices_are_refused():
    with pytest.raises(NotImplementedError, match="sequence indices or states"):
        conv_bwd.causal_conv1d_bwd_function(None, None, None, None, torch.zeros(1), None, None, None, False, True)


@pytest.mark.skipif(nvrtc_wheel_library() is None, reason="needs the nvidia-cuda-nvrtc wheel (test extras, Linux)")
def test_every_variant_compiles_for_hopper():
    library = ctypes.CDLL(str(nvrtc_wheel_library()))
    source = nvrtc.package_source(conv_bwd.SOURCE)
    directions = itertools.cycle(((False, False), (True, True), (False, True), (True, False)))  # reverse, accumulate
    for variant in itertools.product((torch.float32, torch.bfloat16), conv_bwd.WIDTHS, (True, False), (True, False)):
        variant = (*variant, *next(directions))  # dtype, width, bias, silu, reverse, accumulate
        cubin = nvrtc.compile_cubin(source, conv_bwd.SOURCE, "90", conv_bwd.macros(*variant), library)
        assert cubin[:4] == b"\x7fELF" and b"conv_bwd" in cubin, variant


# ------------------------------------------------------------------------------------------------
# On a GPU, and on the CPU through the emulation (conftest's kernel_device)
# ------------------------------------------------------------------------------------------------
def _inputs(batch, channels, length, width, dtype, channel_major, has_bias, generator, device):
    def sequence():
        shape = (channels, batch, length) if channel_major else (batch, channels, length)
        t = torch.randn(shape, generator=generator).to(dtype).to(device)
        return t.transpose(0, 1) if channel_major else t

    weight = (0.5 * torch.randn(channels, width, generator=generator)).to(device)
    bias = torch.randn(channels, generator=generator).to(device) if has_bias else None
    return sequence(), weight, bias, sequence()


@pytest.mark.parametrize("batch, channels, length, width, dtype, channel_major, has_bias, silu", [
    (32, 768, 197, 4, torch.bfloat16, True, True, True),   # Vim-S, channel-major as the fused function holds it
    (3, 96, 256, 4, torch.float32, False, True, True),     # the longest row, MAX_LENGTH
    (2, 16, 2, 4, torch.float32, True, True, True),        # shorter than the kernel
    (4, 40, 77, 3, torch.bfloat16, False, False, True),
    (5, 33, 255, 2, torch.float32, False, True, False),    # no SiLU, five rows over four warps
])
def test_against_the_float64_conv_as_close_as_causal_conv1d(kernel_device, batch, channels, length, width, dtype,
                                                           channel_major, has_bias, silu):
    batch, channels = emulated_size(kernel_device, batch, channels)
    x, weight, bias, dout = _inputs(batch, channels, length, width, dtype, channel_major, has_bias,
                                    torch.Generator().manual_seed(0), kernel_device)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias) if t is not None]
    scan.causal_conv1d_torch(leaves[0], leaves[1], leaves[2] if has_bias else None,
                             "silu" if silu else None).backward(dout.double())
    ours = [t for t in conv_bwd.backward(x, weight, bias, dout, None, silu) if t is not None]
    assert ours[0].stride() == x.stride()  # dx in x's layout
    floor = 1e-6 if dtype == torch.float32 else 4e-3  # fp32: a few roundings; bf16: dx's own rounding
    if scan._conv_bwd_kernel is None or kernel_device.type == "cpu":  # no causal-conv1d to compare with
        for got, leaf in zip(ours, leaves):
            assert relative(got, leaf.grad) <= floor
        return
    theirs = [t for t in scan._conv_bwd_kernel(x, weight, bias, dout.contiguous() if channel_major else dout,
                                                None, None, None, None, False, silu)[:3] if t is not None]
    for name, got, upstream, leaf in zip(("dx", "dweight", "dbias"), ours, theirs, leaves):
        assert relative(got, leaf.grad) <= max(3 * relative(upstream, leaf.grad), floor), name


def test_dx_is_written_into_the_tensor_given(kernel_device):
    x, weight, bias, dout = _inputs(2, 8, 50, 4, torch.float32, False, True, torch.Generator().manual_seed(0),
                                    kernel_device)
    dxz = torch.zeros(2, 16, 50, device=kernel_device)
    dx, _, _ = conv_bwd.backward(x, weight, bias, dout, dxz[:, :8], True)
    assert dx.data_ptr() == dxz.data_ptr() and bool((dxz[:, :8] != 0).any()) and bool((dxz[:, 8:] == 0).all())


@pytest.mark.parametrize("batch, length, dtype, channel_major", [(32, 197, torch.bfloat16, True),
                                                                 (21, 197, torch.bfloat16, True),
                                                                 (11, 50, torch.float32, True),
                                                                 (5, 77, torch.bfloat16, False)])
def test_add_dx_adds_x_gradient_to_the_one_given_as_pytorch_adds_them(kernel_device, batch, length, dtype,
                                                                     channel_major):
    """With ``add_dx`` (a Vim block's second direction), dx is what it held plus this conv's x gradient,
    that gradient rounded to the dtype first, as PyTorch adds two tensors: equal bit for bit, channel-major
    (as the fused function holds it) or not, rows over the warps evenly or not; the weight and bias
    gradients as without it."""
    generator = torch.Generator().manual_seed(0)
    x, weight, bias, dout = _inputs(batch, 40, length, 4, dtype, channel_major, True, generator, kernel_device)
    held = _inputs(batch, 40, length, 4, dtype, channel_major, False, generator, kernel_device)[0]
    alone = conv_bwd.backward(x, weight, bias, dout, None, True)
    into = held.clone()
    added = conv_bwd.backward(x, weight, bias, dout, into, True, add_dx=True)
    assert added[0].data_ptr() == into.data_ptr()
    assert torch.equal(added[0], held + alone[0])
    assert torch.equal(added[1], alone[1]) and torch.equal(added[2], alone[2])


@pytest.mark.parametrize("length", [197, 256, 2])
def test_reverse_is_the_backward_of_the_flipped_conv(kernel_device, length):
    """The backward of the conv run from the last step to the first: the gradients of the conv of x
    flipped along time (dx bit for bit, flipped back; the weight and bias sums over time in another
    order)."""
    x, weight, bias, dout = _inputs(3, 40, length, 4, torch.bfloat16, True, True, torch.Generator().manual_seed(0),
                                    kernel_device)
    dx, dweight, dbias = conv_bwd.backward(x, weight, bias, dout, None, True, reverse=True)
    dx_f, dweight_f, dbias_f = conv_bwd.backward(x.flip(-1), weight, bias, dout.flip(-1), None, True)
    assert torch.equal(dx, dx_f.flip(-1))
    torch.testing.assert_close(dweight, dweight_f)
    torch.testing.assert_close(dbias, dbias_f)
