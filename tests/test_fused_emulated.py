"""The fused mixer function (models/scan.py: mamba_inner_cuda, mamba_inner_pair_cuda, _MambaInnerFn) on our
kernels, on the CPU: the scan and the conv backward through the CPU emulation (tests/cuda_emulation.h), the
conv forward in Triton's interpreter, against the PyTorch references (mamba_inner_torch,
mamba_inner_pair_torch) in fp32, the output and every input's gradient. The GPU tests (test_scan_short.py's
fused ones, test_fused_inner.py) check it against mamba-ssm's kernels in bf16; these check its own logic
where CI has no GPU: the directions, reverse without flips, the activations kept, the state offset, A_log
and the gradients of frozen weights it skips."""
from __future__ import annotations

import pytest
import torch

import cuda_emulation
from mambapeft.models import scan, scan_short
from triton_helpers import skip_unless_interpreted

cuda_emulation.skip_without_a_compiler()

BATCH, D_INNER, LENGTH, RANK, D_MODEL = 2, 40, 37, 6, 24  # two blocks of channels, the second partly empty


@pytest.fixture(autouse=True)
def _fused_on_the_cpu(monkeypatch):
    skip_unless_interpreted()  # the conv forward: our Triton kernel, in Triton's interpreter on CPU tensors
    cuda_emulation.emulated_fused_function(monkeypatch)


def _direction(generator, states, reverse=False, offset=False, a_log=False) -> scan.InnerWeights:
    def leaf(*shape, scale=0.1):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_()

    A = -torch.arange(1, states + 1).float().repeat(D_INNER, 1)
    return scan.InnerWeights(leaf(D_INNER, 1, 4), leaf(D_INNER), leaf(RANK + 2 * states, D_INNER),
                             leaf(D_INNER, RANK, scale=0.5), leaf(D_INNER),
                             ((-A).log() if a_log else A).requires_grad_(), leaf(D_INNER, scale=1.0), reverse,
                             leaf(D_INNER, states) if offset else None, a_log)


def _leaves(*directions: scan.InnerWeights) -> list[torch.Tensor]:
    return [t for w in directions for t in (w.conv_weight, w.conv_bias, w.x_proj_weight, w.dt_proj_weight,
                                            w.dt_proj_bias, w.A, w.D, w.state_offset) if t is not None]


def _output_and_gradients(run, leaves: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor | None]:
    out = run()
    out.backward(grad_out)
    results = [out.detach()] + [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    return results


def _assert_close(results, references):
    for i, (got, expected) in enumerate(zip(results, references)):
        assert (got is None) == (expected is None), i
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=str(i))


@pytest.mark.parametrize("states, reverse, keep, offset, a_log", [
    (16, False, False, False, False),
    (16, True, True, False, False),   # from the last step, activations kept (as Vim trains)
    (22, True, False, True, False),   # additional-scan's extended state, state-offset tuning's h'
    (17, False, True, False, True),   # A given as A_log
])
def test_the_fused_function_computes_the_reference(states, reverse, keep, offset, a_log):
    generator = torch.Generator().manual_seed(states)
    w = _direction(generator, states, reverse, offset, a_log)
    xz = torch.randn(BATCH, 2 * D_INNER, LENGTH, generator=generator).requires_grad_()
    out_proj = [(torch.randn(*shape, generator=generator) * 0.1).requires_grad_() for shape in ((D_MODEL, D_INNER),
                                                                                               (D_MODEL,))]
    leaves = [xz, *out_proj, *_leaves(w)]
    grad_out = torch.randn(BATCH, LENGTH, D_MODEL, generator=generator)
    ours = _output_and_gradients(lambda: w.run(scan.mamba_inner_cuda, xz, *out_proj, keep_activations=keep), leaves,
                                 grad_out)
    reference = _output_and_gradients(lambda: w.run(scan.mamba_inner_torch, xz, *out_proj), leaves, grad_out)
    _assert_close(ours, reference)


@pytest.mark.parametrize("states", [16, 22])
def test_both_directions_in_one_node_compute_the_sum_of_theirs(states):
    """Vim's two directions over one xz in one autograd node (the second's output and xz gradient added to
    the first's by our kernels), a state offset on the second: the two references' sum."""
    generator = torch.Generator().manual_seed(3)
    first, second = _direction(generator, states), _direction(generator, states, reverse=True, offset=True)
    xz = torch.randn(BATCH, 2 * D_INNER, LENGTH, generator=generator).requires_grad_()
    leaves = [xz, *_leaves(first, second)]
    grad_out = torch.randn(BATCH, D_INNER, LENGTH, generator=generator)
    paired = scan.mamba_inner_pair_cuda(xz, first, second, keep_activations=True)
    assert type(paired.grad_fn).__name__ == "_MambaInnerFnBackward"  # one node, not two summed
    ours = _output_and_gradients(lambda: paired, leaves, grad_out)
    reference = _output_and_gradients(lambda: scan.mamba_inner_pair_torch(xz, first, second), leaves, grad_out)
    _assert_close(ours, reference)


def test_frozen_weights_get_no_gradient_and_the_others_theirs(monkeypatch):
    """A LoRA's training: x_proj, dt_proj, A, D and delta_bias frozen. The scan's backward is asked for none
    of its sums over channels and steps (scan_short.SUMS), and the trained tensors get the reference's
    gradients."""
    asked = []
    monkeypatch.setattr(scan_short, "bwd", lambda *args, bwd=scan_short.bwd, **kwargs: asked.append(kwargs["wants"])
                        or bwd(*args, **kwargs))
    generator = torch.Generator().manual_seed(4)
    w = _direction(generator, 16, reverse=True)
    for frozen in (w.x_proj_weight, w.dt_proj_weight, w.A, w.D, w.dt_proj_bias):
        frozen.requires_grad_(False)
    xz = torch.randn(BATCH, 2 * D_INNER, LENGTH, generator=generator).requires_grad_()
    leaves = [xz, w.conv_weight, w.conv_bias]
    grad_out = torch.randn(BATCH, D_INNER, LENGTH, generator=generator)
    ours = _output_and_gradients(lambda: w.run(scan.mamba_inner_cuda, xz, keep_activations=True), leaves, grad_out)
    reference = _output_and_gradients(lambda: w.run(scan.mamba_inner_torch, xz), leaves, grad_out)
    _assert_close(ours, reference)
    assert asked == [()] and all(t.grad is None for t in (w.x_proj_weight, w.dt_proj_weight, w.A, w.D, w.dt_proj_bias))
