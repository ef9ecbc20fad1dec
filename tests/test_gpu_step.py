"""On a CUDA machine with mamba-ssm: the generation step's kernels (our Triton conv update,
mamba_ssm's fused residual add + RMSNorm and selective_state_update) compute what the PyTorch step
computes, layer by layer in fp32 and bf16; decoding with several steps per CUDA graph replay gives
the eager tokens; a hooked dt_proj or a parametrised norm keeps the reference step. The CPU side of
these checks (every method, with the kernels' PyTorch references) is tests/test_step_kernels.py.

Tolerances: fp32 results differ only by the kernels' summation order and exp/rsqrt approximations
(~1e-6 relative); a bf16 output may differ by one bf16 rounding (2^-8 relative); a bf16 block step
rounds its norm input and dt (+ bias) at different places than the reference: a few roundings."""
import pytest
import torch
from mixer_helpers import OpNames, set_backend
from test_decoding import adapted_model
from test_fused_inner import _mixers
from torch.nn.utils import parametrize

from mambapeft.models.decoding import GreedyDecoder
from mambapeft.models.mamba import Block, Mamba, MixerState, fused_add_norm
from mambapeft.models.scan import (
    CUDA_BACKEND,
    TORCH_BACKEND,
    add_rms_norm_torch,
    causal_conv1d_update_torch,
    cuda_kernels_available,
)

pytestmark = pytest.mark.gpu
needs_kernels = pytest.mark.skipif(not cuda_kernels_available() or CUDA_BACKEND.conv_update is None
                                   or CUDA_BACKEND.add_rms_norm is None,
                                   reason="needs a CUDA device with mamba-ssm and triton")
BF16_ROUNDING = 2 ** -8


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@needs_kernels
@pytest.mark.parametrize("x_dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_conv_update_equals_the_torch_one(x_dtype, state_dtype, bias):
    torch.manual_seed(0)
    channels = 200  # not a multiple of the kernel's 128-channel block: the masked tail runs too
    xz = torch.randn(3, 2 * channels, device="cuda", dtype=x_dtype)
    x = xz[:, :channels]  # a strided view, as the step's chunk of in_proj's output
    state = torch.randn(3, channels, 4, device="cuda").to(state_dtype)
    weight, b = torch.randn(channels, 4, device="cuda"), torch.randn(channels, device="cuda") if bias else None
    expected_state = state.clone()
    expected = causal_conv1d_update_torch(x, expected_state, weight, b)
    out = CUDA_BACKEND.conv_update(x, state, weight, b)
    assert out.dtype == x_dtype and torch.equal(state, expected_state)  # the state update is a copy: exact
    tol = 1e-5 if x_dtype == torch.float32 else 2 * BF16_ROUNDING
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first", [True, False])
def test_fused_add_rms_norm_equals_the_torch_one(dtype, first):
    torch.manual_seed(0)
    hidden = torch.randn(4, 1, 256, device="cuda", dtype=dtype)
    residual = None if first else torch.randn(4, 1, 256, device="cuda")
    weight = torch.randn(256, device="cuda", dtype=dtype)
    expected = add_rms_norm_torch(hidden, residual, weight, 1e-5, True)
    got = CUDA_BACKEND.add_rms_norm(hidden, residual, weight, 1e-5, True)
    tol = 1e-5 if dtype == torch.float32 else 2 * BF16_ROUNDING
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)  # an fp32 sum either way


@needs_kernels
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first,scaled", [(True, False), (False, False), (False, True), (True, True)])
def test_fused_add_rms_norm_trains_as_the_torch_one(hidden_dtype, first, scaled):
    """Training shapes: an fp32 weight, a mixer output in fp32 or bf16 (autocast), an fp32 residual
    stream. Outputs and the gradients of hidden, residual and weight, through both outputs; ``scaled``:
    hidden's rows scaled first (a drop path's per-sample mask / keep: mamba_ssm's forward, our backward)."""
    torch.manual_seed(0)
    hidden = torch.randn(8, 197, 384, device="cuda").to(hidden_dtype).requires_grad_()
    residual = None if first else torch.randn(8, 197, 384, device="cuda", requires_grad=True)
    weight = torch.randn(384, device="cuda").add(1.0).requires_grad_()
    out_grad, residual_grad = torch.randn(2, 8, 197, 384, device="cuda")
    leaves = [t for t in (hidden, residual, weight) if t is not None]
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0], device="cuda") / 0.9
    rowscale = keep[:, None].expand(8, 197).reshape(-1) if scaled else None
    results = []
    for add_norm in (add_rms_norm_torch, CUDA_BACKEND.add_rms_norm):
        normed, new_residual, rebuild = add_norm(hidden, residual, weight, 1e-5, True, rowscale)
        assert torch.equal(rebuild(), normed)  # bit for bit, from the residual (and the kernel's 1/rms)
        grads = torch.autograd.grad([normed, new_residual], leaves, [out_grad.to(normed.dtype), residual_grad])
        results.append((normed, new_residual, grads))
    (expected, expected_residual, expected_grads), (got, got_residual, got_grads) = results
    tol = 1e-5 if hidden_dtype == torch.float32 else 2 * BF16_ROUNDING
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(got_residual, expected_residual, rtol=1e-6, atol=1e-6)
    names = ("hidden", "weight") if first else ("hidden", "residual", "weight")
    for name, g, e in zip(names, got_grads, expected_grads):
        assert rel(g, e) < (1e-5 if hidden_dtype == torch.float32 else 4 * BF16_ROUNDING), name


@needs_kernels
@pytest.mark.parametrize("cols", [384, 2048, 2560])  # Vim-S, Mamba-1.4b, Mamba-2.8b widths
@pytest.mark.parametrize("first,weight_grad,scaled", [(True, True, False), (False, True, False), (False, False, False),
                                                    (False, True, True)])
def test_our_norm_backward_computes_what_mamba_ssms_does(cols, first, weight_grad, scaled):
    """norm_triton.rms_norm_backward against mamba_ssm's _layer_norm_bwd on the same saved tensors:
    a bf16 dx within one rounding, the fp32 residual gradient and the weight's within fp32 summation
    order; ``scaled``: with a per-row scale of the forward's hidden (a drop path)."""
    from mamba_ssm.ops.triton.layer_norm import _layer_norm_bwd

    from mambapeft.models.norm_triton import rms_norm_backward

    torch.manual_seed(0)
    rows = 1000 + 3  # not a whole number of row tiles
    x = torch.randn(rows, cols, device="cuda")
    rstd = x.pow(2).mean(-1).add(1e-5).rsqrt()
    weight = torch.randn(cols, device="cuda")
    dy = torch.randn(rows, cols, device="cuda").bfloat16()
    dres = None if first else torch.randn(rows, cols, device="cuda")
    rowscale = (torch.rand(rows, device="cuda") > 0.3).float() / 0.7 if scaled else None
    dx, dw, _, dres_in, *_ = _layer_norm_bwd(dy, x, weight, None, 1e-5, None, rstd, dres, rowscale=rowscale,
                                             has_residual=not first, is_rms_norm=True, x_dtype=torch.bfloat16)
    our_dx, our_dw, our_dres_in = rms_norm_backward(dy, x, rstd, weight, dres, torch.bfloat16, not first, weight_grad,
                                                    rowscale)
    assert rel(our_dx, dx) < BF16_ROUNDING
    assert (our_dres_in is None) == first
    if not first:
        assert rel(our_dres_in, dres_in) < 1e-6
    assert (our_dw is None) != weight_grad
    if weight_grad:
        assert rel(our_dw, dw) < 1e-5


@needs_kernels
def test_the_fused_add_norms_backward_runs_no_fill_and_no_sum():
    """The backward of a block's residual add + RMSNorm (add_rms_norm_cuda) at Vim-S's width: no zeros
    filled for its 1/rms output (not differentiable, so never read) and no reduction of per-tile sums of
    the weight's gradient (the kernel's tiles add to one sum), each a kernel a layer; the gradients are
    autograd's through the PyTorch reference."""
    from mambapeft.models.scan import add_rms_norm_cuda

    torch.manual_seed(0)
    hidden = torch.randn(4, 197, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    residual = torch.randn(4, 197, 384, device="cuda", requires_grad=True)
    weight = torch.randn(384, device="cuda", requires_grad=True)
    dnormed, dresidual = torch.randn_like(hidden), torch.randn_like(residual)
    grads = {}
    for name, add_norm in (("ours", add_rms_norm_cuda), ("torch", add_rms_norm_torch)):
        normed, summed, _ = add_norm(hidden, residual, weight, 1e-5)
        with OpNames() as ops:
            grads[name] = torch.autograd.grad([normed, summed], [hidden, residual, weight], [dnormed, dresidual])
        if name == "ours":  # the backward's ops were recorded (its empty dx); one fill: the weight's sum
            assert "empty" in ops.names and "sum" not in ops.names
            assert len([op for op in ops.names if "zero" in op or op.startswith("fill")]) == 1, ops.names
    for ours, expected in zip(grads["ours"], grads["torch"]):
        assert rel(ours, expected) < (BF16_ROUNDING if ours.dtype == torch.bfloat16 else 1e-5)


@needs_kernels
def test_a_weight_gradient_is_written_in_fp32_by_its_gemm():
    """scan.weight_gradient of bf16 operands for an fp32 parameter: one GEMM writing fp32 (no bf16
    product cast after), the transposed operands read as they are; the sums as the fp32 product's."""
    from mambapeft.models.scan import weight_gradient

    torch.manual_seed(0)
    a, b = (torch.randn(6304, n, device="cuda").bfloat16() for n in (56, 768))
    a_t = a.t()  # (56, 6304), transposed: a weight gradient's first operand, as the backward passes it
    with OpNames() as ops:
        grad = weight_gradient(a_t, b, torch.float32)
    assert grad.dtype == torch.float32 and ops.names == ["mm"]
    assert rel(grad, a.float().t() @ b.float()) < 1e-5
    assert weight_gradient(a_t, b, torch.bfloat16).dtype == torch.bfloat16


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
def test_a_trained_fp32_linear_on_columns_gets_its_weights_gradient_from_one_fp32_gemm(bias):
    """scan.linear_on_columns as full fine-tuning's in_proj runs it (Vim-S's shape, bf16 autocast): the
    weight's gradient written in fp32 by the GEMM (no bf16 product cast after), with the sums of the fp32
    product of the bf16 operands; the output and the columns' and bias's gradients as autocast's."""
    from mambapeft.models.scan import linear_on_columns

    torch.manual_seed(0)
    weight = torch.randn(1536, 384, device="cuda", requires_grad=True)
    b = torch.randn(1536, device="cuda", requires_grad=True) if bias else None
    x = torch.randn(6304, 384, device="cuda").bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = linear_on_columns(weight, b, x.t())
    dout = torch.randn_like(out)
    with OpNames() as ops:
        out.backward(dout)
    assert out.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert ops.names.count("mm") == 2 and "_to_copy" not in ops.names, ops.names
    assert rel(weight.grad, dout.float() @ x.float()) < 1e-5
    expected_out = weight.bfloat16().float() @ x.float().t() + (b.bfloat16().float()[:, None] if bias else 0)
    assert rel(out.float(), expected_out) < BF16_ROUNDING
    assert rel(x.grad.float(), (weight.bfloat16().float().t() @ dout.float()).t()) < BF16_ROUNDING
    assert x.grad.is_contiguous()  # in x's layout (rows), as autograd's mm gives it
    if bias:
        assert b.grad.dtype == torch.float32 and rel(b.grad, dout.float().sum(1)) < 1e-5


@needs_kernels
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 6 * BF16_ROUNDING)])
@pytest.mark.parametrize("first", [True, False])
def test_a_block_step_on_the_kernels_equals_the_torch_step(dtype, tolerance, first):
    """One block (add + norm + mixer step) from the same state: outputs, residual and both states."""
    torch.manual_seed(0)
    block = Block(128, Mamba(128, d_state=16, device="cuda"), device="cuda").eval()
    block.norm.weight.data.normal_(1.0, 0.2)
    block = block.to(dtype)
    state = MixerState(conv=torch.randn(3, 256, 4, device="cuda").to(dtype).float(),
                       ssm=torch.randn(3, 256, 16, device="cuda"))
    hidden = torch.randn(3, 1, 128, device="cuda", dtype=dtype)
    residual = None if first else torch.randn(3, 1, 128, device="cuda")
    results = {}
    for backend in (TORCH_BACKEND, CUDA_BACKEND):
        block.mixer.backend = backend
        copy = MixerState(state.conv.clone(), state.ssm.clone())
        with torch.no_grad():
            out, res = block.step(hidden, residual, copy)
        results[backend.name] = (out, res, copy.conv, copy.ssm)
    assert block.mixer.uses_step_kernels() and fused_add_norm(block.norm, CUDA_BACKEND) is not None
    (out, res, conv, ssm), (ref_out, ref_res, ref_conv, ref_ssm) = results["cuda"], results["torch"]
    # the conv state's newest tap is in_proj of the normed input, and the fused norm rounds differently
    assert out.dtype == ref_out.dtype and res.dtype == torch.float32 and rel(conv, ref_conv) <= tolerance
    assert rel(out, ref_out) <= tolerance and rel(ssm, ref_ssm) <= tolerance
    assert rel(res, ref_res) <= 1e-6


@needs_kernels
@pytest.mark.parametrize("method", ["zero_shot", "additional_scan", "periodic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_steps_per_graph_replay_give_the_eager_tokens(method, dtype):
    """The 4-step graph (with 1-step graphs for the remainder and periodic's insertions) replays
    what the eager kernel path computes; in fp32 that is also the PyTorch step's tokens."""
    model = set_backend(adapted_model("mamba-mini", method).to("cuda", dtype), CUDA_BACKEND)
    assert all(m.uses_step_kernels() for m in _mixers(model))
    ids = torch.randint(0, 64, (3, 30), device="cuda")

    def autocast():  # as bench generate runs bf16 (the adapters' fp32 pieces); no cast cached across a capture
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False, enabled=dtype == torch.bfloat16)

    eager = GreedyDecoder(model, 3, "cuda", steps_per_call=1, autocast=autocast).generate(ids, 21)
    graphed = GreedyDecoder(model, 3, "cuda", cuda_graph=True, steps_per_call=4, autocast=autocast)
    for _ in range(2):
        assert torch.equal(graphed.generate(ids, 21), eager)
    if dtype == torch.float32:
        reference = GreedyDecoder(set_backend(model, TORCH_BACKEND), 3, "cuda").generate(ids, 21)
        assert torch.equal(eager, reference)


@needs_kernels
def test_bf16_states_replay_as_the_eager_steps():
    """States stored in bf16 (as bench generate and mamba_ssm keep them): the graphs replay the eager
    kernel path's tokens, and the states stay bf16 across replays."""
    model = set_backend(adapted_model("mamba-mini", "zero_shot").to("cuda", torch.bfloat16), CUDA_BACKEND)
    ids = torch.randint(0, 64, (3, 30), device="cuda")
    eager = GreedyDecoder(model, 3, "cuda", steps_per_call=1, state_dtype=torch.bfloat16).generate(ids, 21)
    graphed = GreedyDecoder(model, 3, "cuda", cuda_graph=True, steps_per_call=4, state_dtype=torch.bfloat16)
    for _ in range(2):
        assert torch.equal(graphed.generate(ids, 21), eager)
    assert all(s.conv.dtype == s.ssm.dtype == torch.bfloat16 for s in graphed.states)


@needs_kernels
def test_a_hooked_dt_proj_and_a_parametrised_norm_keep_the_reference_step_on_cuda():
    model = adapted_model("mamba-mini", "zero_shot").cuda()
    for mixer in _mixers(model):
        mixer.dt_proj.register_forward_hook(lambda module, args, out: out - 1.0)
    for layer in model.backbone.layers:
        parametrize.register_parametrization(layer.norm, "weight", torch.nn.Identity())
    set_backend(model, CUDA_BACKEND)
    assert not any(m.uses_step_kernels() for m in _mixers(model))
    assert all(fused_add_norm(layer.norm, CUDA_BACKEND) is None for layer in model.backbone.layers)
    ids = torch.randint(0, 64, (2, 30), device="cuda")
    graphed = GreedyDecoder(model, 2, "cuda", cuda_graph=True, steps_per_call=4).generate(ids, 13)
    assert torch.equal(graphed, GreedyDecoder(set_backend(model, TORCH_BACKEND), 2, "cuda").generate(ids, 13))
