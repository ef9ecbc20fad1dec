"""What a training step keeps for its backward: the block's normalised input rebuilt from the norm's
own saved tensors (models/rebuild.py, models/norm_triton.py) and LoRA's dropout kept as a seed
(models/dropout_triton.py), with the gradients they give. The Triton kernels run in Triton's
interpreter here (conftest.py); tests/test_gpu_step.py and tests/test_gpu.py run them on the GPU."""
import weakref

import pytest
import torch
import torch.nn.functional as F
from mixer_helpers import set_backend
from triton_helpers import skip_unless_interpreted

from mambapeft.models.rebuild import checked, rebuilt_when_saved
from mambapeft.models.scan import add_rms_norm_torch


def _normed_and_rebuild(calls):
    torch.manual_seed(0)
    hidden, residual = torch.randn(3, 5, 8, requires_grad=True), torch.randn(3, 5, 8)
    normed, residual, rebuild = add_rms_norm_torch(hidden, residual, torch.rand(8) + 0.5, 1e-5)

    def counted():
        calls.append(1)
        return rebuild()

    return hidden, normed, counted


def _gradients(rebuilt: bool):
    """Gradients of the norm's input and a weight through ops that save normed, a view of it and a
    product of it; and how many saves were rebuilt."""
    calls, weight = [], torch.randn(8, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    hidden, normed, rebuild = _normed_and_rebuild(calls)
    with rebuilt_when_saved(normed, rebuild if rebuilt else None):
        loss = (normed @ weight).square().sum() + normed.reshape(-1, 8).t().sin().sum() + (normed * normed).sum()
    loss.backward()
    return hidden.grad, weight.grad, len(calls)


def test_saves_of_the_normed_tensor_and_its_views_are_rebuilt_with_the_same_gradients():
    *expected, kept = _gradients(rebuilt=False)
    *got, rebuilt = _gradients(rebuilt=True)
    assert (kept, rebuilt) == (0, 4)  # the matmul, the sine of a transposed view, both factors of the product
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("consumer", ["matmul", "dropout_linear"])
def test_a_rebuilt_tensor_is_freed_after_the_forward(consumer):
    """Nothing of the context keeps the tensor (autograd holds a pack hook as long as what it saved)."""
    if consumer == "dropout_linear":
        skip_unless_interpreted()
        from mambapeft.models.dropout_triton import dropout_linear
    base, weight = torch.randn(64, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    x = base * 2
    alive = weakref.ref(x)
    with rebuilt_when_saved(x, lambda: (base * 2).detach()):
        out = F.linear(x, weight) if consumer == "matmul" else dropout_linear(x, weight, 0.5)
    del x
    assert alive() is None
    out.square().sum().backward()
    assert weight.grad.abs().sum() > 0


def test_an_op_saving_its_own_output_inside_leaves_no_cycle_where_its_node_never_runs_backward():
    """An output saved by its own op (a norm) and detached in the forward, as DoRA's column norms are: the
    pack hook handing autograd the live output made a cycle (output -> node -> save -> output) that no
    collection freed, keeping what the node saved; the gradients through the rest are unchanged."""
    import gc

    hidden, normed, rebuild = _normed_and_rebuild([])
    weight = torch.randn(8, 4, requires_grad=True)
    with rebuilt_when_saved(normed, rebuild):
        column_norms = weight.norm(dim=0)  # saves its output
        alive = weakref.ref(column_norms)
        loss = (normed @ (weight / column_norms.detach())).square().sum()
    del column_norms
    gc.collect()
    assert alive() is None
    loss.backward()
    expected = torch.autograd.grad((normed.detach() @ (weight / weight.norm(dim=0).detach())).square().sum(), weight)[0]
    assert torch.allclose(weight.grad, expected)


@pytest.mark.parametrize("method", ["dora_in_proj", "lora_in_proj"])
def test_eager_steps_of_an_lm_with_its_norm_fused_keep_nothing_of_theirs(method):
    """A mamba-mini LM on the fused path's PyTorch reference with the fused add + norm (so its normed input
    is rebuilt where saved, as on CUDA): no (B, L, D) tensor of a step outlives it. DoRA's column norms,
    detached in the forward, once kept each step's graph through the save hook (3 more after each step
    here; on one H200, ~290 MiB a Vim-S step)."""
    import dataclasses
    import gc

    from mambapeft.models import build_model
    from mambapeft.models.scan import TORCH_BACKEND, mamba_inner_torch
    from mambapeft.peft import apply_peft
    from mambapeft.runspec import method_definition

    fused = dataclasses.replace(TORCH_BACKEND, mamba_inner=mamba_inner_torch, add_rms_norm=add_rms_norm_torch)
    torch.manual_seed(0)
    model = set_backend(build_model("mamba-mini", vocab_size=64).train(), fused)
    apply_peft(model, method_definition("language", method, "mamba-mini", None)["peft"], method)
    ids = torch.randint(0, 64, (2, 16))
    shape = (*ids.shape, model.config.d_model)

    def alive():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and tuple(o.shape) == shape)

    before, after = alive(), []
    for _ in range(3):
        model(ids).float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
        after.append(alive())
    assert after == [before] * 3


def test_a_tensor_that_is_part_of_its_storage_is_saved_as_usual():
    """A rebuild of it could not give back views of the rest of its storage: no hooks."""
    calls, whole = [], torch.randn(6, 8, requires_grad=True) * 1
    part = whole[:3]  # contiguous, at offset 0, half of the storage
    with rebuilt_when_saved(part, lambda: calls.append(1) or part.detach()):
        loss = (part * part).sum() + (whole * whole).sum()
    loss.backward()
    assert calls == []


def test_the_rebuild_of_the_fp32_residual_is_the_normed_tensor_bit_for_bit():
    hidden, normed, rebuild = _normed_and_rebuild([])
    assert torch.equal(rebuild(), normed)
    _, _, none = add_rms_norm_torch(hidden, torch.randn(3, 5, 8).bfloat16(), torch.ones(8), 1e-5)
    assert none is None  # a bf16 residual is a rounding of what the norm read: no rebuild


def test_a_rebuild_whose_inputs_changed_in_place_raises():
    source = torch.ones(4)
    rebuild = checked(lambda: source * 2, source)
    assert torch.equal(rebuild(), torch.full((4,), 2.0))
    source.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        rebuild()


def test_the_triton_norm_rebuild_computes_the_torch_products():
    skip_unless_interpreted()
    from mambapeft.models.norm_triton import BLOCK_N, rms_normed

    torch.manual_seed(0)
    x = torch.randn(7, BLOCK_N + 100)  # 7 rows: two row tiles, the second partial; so are the columns
    rstd, weight = torch.rand(7) + 0.5, torch.randn(BLOCK_N + 100)
    # fp32 out: the interpreter rounds to bf16 by truncation, the GPU to nearest (bf16: tests/test_gpu_step.py)
    assert torch.equal(rms_normed(x, rstd, weight, torch.float32), x * rstd[:, None] * weight)


def _mask(seed, shape, p):
    """The kernel's mask of ``seed``: True where an element is kept."""
    from mambapeft.models.dropout_triton import seeded_dropout

    return seeded_dropout(torch.ones(shape), seed, p) != 0


def test_the_seeded_dropout_draws_one_mask_per_seed_of_the_right_rate():
    skip_unless_interpreted()
    from mambapeft.models.dropout_triton import seeded_dropout

    seed, other, p = torch.tensor([7]), torch.tensor([8]), 0.25
    mask = _mask(seed, (40, 500), p)
    assert abs(mask.float().mean().item() - 0.75) < 0.01
    assert torch.equal(mask, _mask(seed, (40, 500), p)) and not torch.equal(mask, _mask(other, (40, 500), p))
    x = torch.randn(40, 500)
    assert torch.equal(seeded_dropout(x, seed, p), torch.where(mask, x * (1 / (1 - p)), 0.0))


@pytest.mark.parametrize("x_grad", [True, False])
def test_dropout_linear_computes_and_differentiates_the_reference(x_grad):
    """The output and gradients against F.linear on x times the kernel's mask; x without a gradient
    (a first block's input) takes the backward's other branch. 2 x 9 x 300 elements: 3 programs, the
    last partial, in each of its four runs."""
    skip_unless_interpreted()
    from mambapeft.models.dropout_triton import dropout_linear

    torch.manual_seed(0)
    x, weight, p = torch.randn(2, 9, 300, requires_grad=x_grad), torch.randn(4, 300, requires_grad=True), 0.1
    state = torch.get_rng_state()
    out = dropout_linear(x, weight, p)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.set_rng_state(state)  # the same seed draw, for the reference's mask
    seed = torch.randint(2**31 - 1, (1,))
    mask = _mask(seed, x.shape, p)
    reference = torch.where(mask, x.detach() * (1 / (1 - p)), 0.0).requires_grad_(x_grad)
    weight_ref = weight.detach().clone().requires_grad_()
    expected = F.linear(reference, weight_ref)
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weight.grad, weight_ref.grad)
    if x_grad:
        torch.testing.assert_close(x.grad, torch.where(mask, reference.grad * (1 / (1 - p)), 0.0))


def test_the_triton_norm_backward_sums_the_weights_gradient_in_its_kernel():
    """The row tiles add their shares of the weight's gradient to one zeroed sum: no per-tile partial
    sums reduced by a kernel after (16 us a layer at Vim-S's batch of 32 on one H200, where the fill of
    the sum takes ~1 us); the sum over all 7 rows of 4 tiles, as autograd's."""
    skip_unless_interpreted()
    from mixer_helpers import OpNames

    from mambapeft.models.norm_triton import rms_norm_backward

    torch.manual_seed(0)
    x, dy, weight = torch.randn(7, 1300), torch.randn(7, 1300), torch.randn(1300)
    rstd = x.pow(2).mean(-1).add(1e-5).rsqrt()
    with OpNames() as ops:
        _, dw, _ = rms_norm_backward(dy, x, rstd, weight, None, torch.float32, False, True)
    assert "sum" not in ops.names
    torch.testing.assert_close(dw, (dy * x * rstd[:, None]).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("has_residual,dresidual", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_the_triton_norm_backward_computes_the_torch_gradients(has_residual, dresidual, weight_grad):
    """norm_triton.rms_norm_backward against autograd through x * rstd * w (rstd held fixed, as the
    kernel's saved one): partial row tiles (5 rows of 3 per tile at 1,300 columns), the residual's
    gradient added, passed on (a separate fp32 tensor when dx is bf16), the weight's when it trains."""
    skip_unless_interpreted()
    from mambapeft.models.norm_triton import rms_norm_backward

    torch.manual_seed(0)
    rows, cols = 5, 1300
    x = torch.randn(rows, cols)
    rstd = x.pow(2).mean(-1).add(1e-5).rsqrt()
    weight = torch.randn(cols, requires_grad=True)
    xr = x.clone().requires_grad_()
    dy, dres = torch.randn(rows, cols), torch.randn(rows, cols) if dresidual else None
    # the norm's gradient with rstd recomputed from x (the kernel's formula is that derivative)
    normed = xr * xr.pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt() * weight
    dx_expected, dw_expected = torch.autograd.grad(normed, [xr, weight], dy)
    if dres is not None:
        dx_expected = dx_expected + dres
    for dx_dtype in (torch.float32, torch.bfloat16):
        dx, dw, dres_in = rms_norm_backward(dy, x, rstd, weight.detach(), dres, dx_dtype, has_residual, weight_grad)
        assert dx.dtype == dx_dtype
        torch.testing.assert_close(dx.float(), dx_expected, rtol=1e-4 if dx_dtype == torch.float32 else 1e-2,
                                   atol=1e-4 if dx_dtype == torch.float32 else 1e-2)
        if weight_grad:
            torch.testing.assert_close(dw, dw_expected, rtol=1e-4, atol=1e-4)
        else:
            assert dw is None
        if not has_residual:
            assert dres_in is None
        elif dx_dtype == torch.float32:
            assert dres_in is dx
        else:  # the residual stream's gradient kept in fp32
            assert dres_in.dtype == torch.float32
            torch.testing.assert_close(dres_in, dx_expected, rtol=1e-4, atol=1e-4)
