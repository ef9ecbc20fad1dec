"""The generation step's kernel sequence (mamba_ssm's step: conv state updated in place, dt_proj's
bias inside the state update, a block's residual add + RMSNorm in one kernel) computes what the
reference step computes, for every language method, and only plain modules take it: an adapter
on dt_proj or a norm keeps the reference step, so it is never silently skipped. Here with the
PyTorch references of those kernels (``STEP_TORCH``); tests/test_gpu_step.py runs the CUDA ones."""
import dataclasses

import pytest
import torch
from mixer_helpers import OpNames, set_backend
from test_fused_inner import _adapted, _mixers
from torch.nn.utils import parametrize

from mambapeft.models.mamba import Block, DropPath, Mamba, fused_add_norm
from mambapeft.models.scan import (
    TORCH_BACKEND,
    add_rms_norm_torch,
    causal_conv1d_step,
    causal_conv1d_update_torch,
)
from mambapeft.runspec import domain_file

STEP_TORCH = dataclasses.replace(TORCH_BACKEND, conv_update=causal_conv1d_update_torch,
                                 add_rms_norm=add_rms_norm_torch)


@torch.no_grad()
def stepped_logits(model, ids, prefill: int):
    """Prefill ``prefill`` tokens, then step through the rest: logits (B, L - prefill, V) and the states."""
    states = model.empty_states(ids.shape[0], "cpu")
    model(ids[:, :prefill], states)
    logits = torch.stack([model._step_token(ids[:, t], t, states) for t in range(prefill, ids.shape[1])], 1)
    return logits, states


@pytest.mark.parametrize("method", sorted(domain_file("language", "methods")))
def test_step_kernels_equal_the_reference_step_for_every_language_method(method):
    model = _adapted("language", method)
    ids = torch.randint(0, 64, (2, 16))
    expected, expected_states = stepped_logits(set_backend(model, TORCH_BACKEND), ids, 10)
    logits, states = stepped_logits(set_backend(model, STEP_TORCH), ids, 10)
    for mixer in _mixers(model):  # the kernel path wherever dt_proj is plain, the reference step elsewhere
        assert mixer.uses_step_kernels() == (type(mixer.dt_proj) is torch.nn.Linear and not mixer.dt_proj._forward_hooks)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for state, reference in zip(states, expected_states):
        torch.testing.assert_close(state.conv, reference.conv, rtol=0, atol=0)
        torch.testing.assert_close(state.ssm, reference.ssm, rtol=1e-5, atol=1e-6)


def test_a_hook_on_dt_proj_is_not_skipped_by_the_step():
    model = _adapted("language", "zero_shot")
    ids = torch.randint(0, 64, (2, 14))
    for mixer in _mixers(model):
        mixer.dt_proj.register_forward_hook(lambda module, args, out: out - 1.0)
    expected, _ = stepped_logits(set_backend(model, TORCH_BACKEND), ids, 10)
    logits, _ = stepped_logits(set_backend(model, STEP_TORCH), ids, 10)
    assert not any(m.uses_step_kernels() for m in _mixers(model))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_wrapped_dt_proj_or_norm_keeps_the_reference_step():
    block = Block(32, Mamba(32, d_state=4))
    block.mixer.backend = STEP_TORCH
    assert block.mixer.uses_step_kernels() and fused_add_norm(block.norm, STEP_TORCH) is not None
    block.mixer.dt_proj = torch.nn.Sequential(block.mixer.dt_proj)
    assert not block.mixer.uses_step_kernels()
    parametrize.register_parametrization(block.norm, "weight", torch.nn.Identity())
    assert fused_add_norm(block.norm, STEP_TORCH) is None
    assert fused_add_norm(block.norm, TORCH_BACKEND) is None and not Mamba(32).uses_step_kernels()


def test_a_lora_in_proj_still_takes_the_step_kernels():
    model = set_backend(_adapted("language", "lora_in_proj"), STEP_TORCH)
    assert all(m.uses_step_kernels() for m in _mixers(model))


def test_the_in_place_conv_update_equals_the_functional_step():
    torch.manual_seed(0)
    x, state, weight, bias = torch.randn(3, 10), torch.randn(3, 10, 4), torch.randn(10, 4), torch.randn(10)
    expected, new_state = causal_conv1d_step(x, state, weight, bias)
    out = causal_conv1d_update_torch(x, state, weight, bias)
    assert torch.equal(out, expected) and torch.equal(state, new_state)


@pytest.mark.parametrize("first", [True, False])
def test_the_fused_add_norm_reference_equals_the_block_add_and_norm(first):
    torch.manual_seed(0)
    block = Block(16, Mamba(16, d_state=4))
    block.norm.weight.data.normal_()
    hidden, residual = torch.randn(2, 1, 16), None if first else torch.randn(2, 1, 16)
    expected = block._add_and_norm(hidden, residual)
    got = add_rms_norm_torch(hidden, residual, block.norm.weight, block.norm.eps, True)
    for a, b in zip(got[:2], expected[:2]):  # the third: how to rebuild the normed tensor (fused only)
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("scaled", [False, True])
def test_the_fused_add_norm_reference_normalises_in_fp32_into_hiddens_dtype(first, scaled):
    """bf16 hidden (autocast's mixer output): the normed output in bf16, the residual in fp32, both the
    rounding of the fp32 sum (hidden's rows scaled first where a row scale is given)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 3, 16).bfloat16(), torch.rand(16) + 0.5
    residual = None if first else torch.randn(2, 3, 16)
    rowscale = torch.tensor([0.0, 2.0, 2.0, 0.0, 2.0, 2.0]) if scaled else None
    normed, new_residual, _ = add_rms_norm_torch(hidden, residual, weight, 1e-5, True, rowscale)
    total = hidden.float() * (rowscale.view(2, 3, 1) if scaled else 1) + (0 if first else residual)
    assert normed.dtype == torch.bfloat16 and new_residual.dtype == torch.float32
    assert torch.equal(new_residual, total)
    expected = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    torch.testing.assert_close(normed, expected.bfloat16())


def test_a_drop_paths_row_scales_are_its_forwards_scale_in_two_kernels():
    """row_scales: what the drop path multiplies each row by (the same draw as its call: each sample's
    rows kept and scaled by 1 / (1 - p), or zeroed), fp32 and one per row, made by two kernels (the draw
    and the divide that spreads it over the rows: casting and spreading it took two more)."""
    drop = DropPath(0.5).train()
    x = torch.randn(6, 3, 4, dtype=torch.bfloat16)
    torch.manual_seed(2)
    dropped = drop(x)
    torch.manual_seed(2)
    with OpNames() as ops:
        scales = drop.row_scales(x)
    assert scales.dtype == torch.float32 and scales.shape == (18,)
    torch.testing.assert_close(x.float() * scales.view(6, 3, 1), dropped.float(), rtol=0, atol=0)
    assert set(scales.tolist()) == {0.0, 2.0}  # at this seed, some samples dropped and some kept
    assert [name for name in ops.names if name not in ("new_empty", "expand", "view", "_unsafe_view")] == ["bernoulli_", "div"]


@pytest.mark.parametrize("hooked", [False, True])
def test_a_blocks_drop_path_runs_inside_the_fused_add_as_a_row_scale(hooked):
    """In training, a plain drop path is the fused add's per-row scale: the same masks drawn, the same
    outputs and gradients as the drop path called before the add (the unfused chain), and no drop-path
    call; a hooked one is called (never skipped), the add given no scale."""
    torch.manual_seed(0)
    block = Block(16, Mamba(16, d_state=4), drop_path=0.5).train()
    block.norm.weight.data.normal_()
    scales, calls = [], []

    def recorded(*args, **kwargs):
        scales.append(kwargs.get("rowscale", args[5] if len(args) > 5 else None))
        return add_rms_norm_torch(*args, **kwargs)

    if hooked:
        block.drop_path.register_forward_hook(lambda module, args, out: calls.append(1))
    hidden = torch.randn(6, 3, 16, requires_grad=True)
    residual = torch.randn(6, 3, 16, requires_grad=True)
    runs = []
    for backend in (TORCH_BACKEND, dataclasses.replace(STEP_TORCH, add_rms_norm=recorded)):
        block.mixer.backend = backend
        torch.manual_seed(1)  # the same masks in both runs
        normed, new_residual, _ = block._add_and_norm(hidden, residual)
        grads = torch.autograd.grad((normed.square().sum() + new_residual.sum()), (hidden, residual))
        runs.append((normed, new_residual, *grads))
    for got, expected in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, expected)
    dropped = runs[0][2].flatten(1).abs().sum(1) == 0  # samples whose hidden the mask dropped
    assert 0 < dropped.sum() < 6  # at p = 0.5 and this seed: some samples dropped, some kept
    if hooked:
        assert scales == [None] and len(calls) == 2  # called in both runs
    else:
        assert scales[0].shape == (18,) and scales[0].dtype == torch.float32 and set(scales[0].tolist()) <= {0.0, 2.0}
    block.eval()  # no drop path out of training: no scale
    block.mixer.backend = dataclasses.replace(STEP_TORCH, add_rms_norm=recorded)
    block._add_and_norm(hidden, residual)
    assert scales[-1] is None


def test_every_forward_takes_the_fused_add_norm_where_the_norm_is_plain():
    calls, rebuilds = [], []

    def counted(*args, **kwargs):
        calls.append(1)
        normed, residual, rebuild = add_rms_norm_torch(*args, **kwargs)
        return normed, residual, rebuild and (lambda: rebuilds.append(1) or rebuild())

    model = _adapted("language", "full").train()  # every weight trains: the norms' gradients are checked too
    ids = torch.randint(0, 64, (2, 8))
    expected = set_backend(model, TORCH_BACKEND)(ids)
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fused = set_backend(model, dataclasses.replace(STEP_TORCH, add_rms_norm=counted))(ids)
    fused.sum().backward()
    layers = len(model.backbone.layers)
    assert len(calls) == layers + 1  # every block and the final norm, in training too
    assert len(rebuilds) >= layers  # in_proj's weight gradient read each block's normed input, rebuilt
    torch.testing.assert_close(fused, expected)  # fp32 weights: the same norm as the PyTorch path
    for name, grad in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)
    calls.clear()
    parametrize.register_parametrization(model.backbone.layers[0].norm, "weight", torch.nn.Identity())
    model(ids, model.empty_states(2, "cpu"))  # a generation prefill
    assert len(calls) == layers  # all but the parametrised norm, which is never read past
