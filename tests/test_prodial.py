"""ProDiaL: W' = s * W D_b + B A with D_b block-diagonal, its exact parameter count on Mamba-130m,
and the fp32 weight it folds into."""
import pytest
import torch
import torch.nn as nn

from mambapeft.models import build_model
from mambapeft.models.precision import frozen_linear_parameters
from mambapeft.peft import PeftConfigError, apply_peft
from mambapeft.peft.prodial import ProdialLinear, ProdialSpec
from mambapeft.report.params import count_params


def _trained_looking(linear: nn.Linear, block_size: int) -> ProdialLinear:
    wrapper = ProdialLinear(linear, ProdialSpec(block_size=block_size, rank=3, dropout=0.0))
    with torch.no_grad():
        for p in (wrapper.blocks, wrapper.row_scale, wrapper.low_rank.lora_up.weight):
            p.add_(0.1 * torch.randn_like(p))
    return wrapper.eval()


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_the_forward_is_the_scaled_block_diagonal_weight_plus_the_low_rank_update(block_size):
    linear = nn.Linear(8, 6)
    wrapper = _trained_looking(linear, block_size)
    D_b = torch.eye(8) + torch.block_diag(*wrapper.blocks)
    low_rank = wrapper.low_rank.scale * wrapper.low_rank.lora_up.weight @ wrapper.low_rank.lora_down.weight
    expected = wrapper.row_scale[:, None] * linear.weight @ D_b + low_rank
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), x @ expected.T + linear.bias)
        torch.testing.assert_close(wrapper.weight, expected)  # the merged weight: what folding would store


def _assert_the_modules_call(wrapper: ProdialLinear, leaf: torch.Tensor, ours, call, grad: torch.Tensor):
    """``ours`` and the module's ``call`` give the same output and gradients (the input ``leaf``, D_b's
    blocks, s, B and A): the output of ``ours``."""
    results = []
    for run in (ours, call):
        out = run()
        out.backward(grad)
        results.append((out, [t.grad for t in (leaf, *wrapper.parameters()) if t.requires_grad]))
        leaf.grad = None
        wrapper.zero_grad(set_to_none=True)
    (out, grads), (reference, reference_grads) = results
    torch.testing.assert_close(out, reference)
    assert len(grads) == 5 and all(g is not None for g in grads)
    for ours_grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(ours_grad, expected)
    return out


@pytest.mark.parametrize("block_size", [1, 2])
def test_in_projs_channel_major_output_is_the_modules_call(block_size):
    """ProDiaL on in_proj through linear_channel_major: its own (out, N) output, s W D_b's GEMM accumulating
    onto B A's update, equal to the module's call transposed, gradients included; a hook calls the module."""
    from mambapeft.models.mamba import linear_channel_major

    torch.manual_seed(0)
    wrapper = _trained_looking(nn.Linear(8, 6), block_size)
    wrapper.base.requires_grad_(False)
    x = torch.randn(3, 5, 8, requires_grad=True)
    _assert_the_modules_call(wrapper, x, lambda: linear_channel_major(wrapper, x),
                             lambda: wrapper(x).transpose(1, 2), torch.randn(3, 6, 5))
    assert wrapper.channel_major(x) is not None
    wrapper.low_rank.lora_up.register_forward_hook(lambda *args: None)
    assert wrapper.channel_major(x) is None


@pytest.mark.parametrize("block_size,bias,scale", [(1, False, 0.5), (2, True, 1.0)])
def test_out_proj_on_a_channel_major_input_is_one_node_with_the_scaled_weights_gradient(block_size, bias, scale):
    """ProDiaL on out_proj through call_channel_major (Vim: the directions' sum, scale 1/2): one node on y's
    columns whose output and gradients (y, D_b's blocks, s, B, A) are the module's call on (y * scale)'s
    transpose; a trainable bias, dropout the CPU cannot draw from a seed, or a hook: the module is called."""
    from mambapeft.models.mamba import call_channel_major

    torch.manual_seed(0)
    wrapper = _trained_looking(nn.Linear(8, 6, bias=bias), block_size)
    wrapper.base.requires_grad_(False)
    stored = torch.randn(8, 3, 5, requires_grad=True)  # (in, B, L): y channel-major
    y = stored.transpose(0, 1)
    out = _assert_the_modules_call(wrapper, stored, lambda: call_channel_major(wrapper, y, scale),
                                   lambda: wrapper((y * scale).transpose(1, 2)), torch.randn(3, 5, 6))
    (node, _), = out.grad_fn.next_functions  # (B*L, out) -> (B, L, out)
    assert type(node).__name__ == "_FrozenPlusLowRankBackward" and out.is_contiguous()
    steps_aside = []
    if bias:
        wrapper.base.bias.requires_grad_(True)
        steps_aside.append(wrapper.from_channel_major(y, scale))
        wrapper.base.bias.requires_grad_(False)
    wrapper.low_rank.dropout.p = 0.1
    steps_aside.append(wrapper.train().from_channel_major(y, scale))
    wrapper.eval().low_rank.lora_down.register_forward_hook(lambda *args: None)
    steps_aside.append(wrapper.from_channel_major(y, scale))
    assert steps_aside == [None] * len(steps_aside)


def test_both_proj_on_mamba_130m_counts_lora_plus_the_diagonal_and_the_scales():
    """The paper's Both-Proj LoRA (2.36M) is exactly our rank-16 part; it lists ProDiaL as 2.42M, which
    is LoRA + D_b (2,414,592) without the row scales s the original code also trains (92,160)."""
    layers, d_model, d_inner = 24, 768, 1536
    lora = layers * 16 * ((d_model + 2 * d_inner) + (d_inner + d_model))
    diagonal = layers * (d_model + d_inner)
    scales = layers * (2 * d_inner + d_model)
    assert lora == 2_359_296
    assert count_params("mamba-130m", "prodial")["trainable"] == lora + diagonal + scales == 2_506_752


def test_the_wrapped_weight_stays_fp32_under_bf16_storage():
    model = build_model("mamba-mini", vocab_size=64)
    apply_peft(model, [{"family": "prodial", "targets": ["mixer.in_proj"]}], "prodial")
    wrapped = {id(m.base.weight) for m in model.modules() if isinstance(m, ProdialLinear)}
    assert wrapped and not wrapped & {id(p) for p in frozen_linear_parameters(model)}


def test_a_block_size_that_does_not_divide_the_width_is_an_error():
    with pytest.raises(PeftConfigError, match="block_size"):
        apply_peft(build_model("mamba-mini", vocab_size=64), [{"family": "prodial", "block_size": 5}], "prodial")


def test_merging_folds_it_into_plain_linears():
    from mambapeft.peft.merge import merge_method

    model = build_model("mamba-mini", vocab_size=64)
    members = [{"family": "prodial", "block_size": 2}]
    result = apply_peft(model, members, "prodial")
    model.eval()  # no dropout on B A
    with torch.no_grad():
        for p in result.trainable.values():
            p.add_(0.05 * torch.randn_like(p))
        ids = torch.randint(0, 64, (2, 9))
        expected = model(ids)
        merge_method(model, members, "prodial")
        assert not any(isinstance(m, ProdialLinear) for m in model.modules())
        torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-5)


def _chain_and_node(rows: int, cols: int, device: str):
    """(the chain's, the Triton node's) (output, r's gradient, s's gradient) of s (W + W r) on one random W,
    r, s and output gradient: the chain as ``ProdialLinear.scaled_weight`` runs it off CUDA."""
    from mambapeft.models.scaled_weight_triton import diagonally_scaled

    generator = torch.Generator().manual_seed(0)
    weight, grad = (torch.randn(rows, cols, generator=generator).to(device) for _ in range(2))
    r, s = ((0.1 * torch.randn(n, generator=generator)).to(device) for n in (cols, rows))
    r_chain, r_node, s_chain, s_node = (t.clone().requires_grad_() for t in (r, r, s, s))
    three_d = weight.view(rows, cols, 1)
    chain = s_chain[:, None] * (three_d + three_d * r_chain.view(1, cols, 1)).reshape(rows, cols)
    node = diagonally_scaled(weight, r_node, s_node)
    chain.backward(grad)
    node.backward(grad)
    return (chain, r_chain.grad, s_chain.grad), (node, r_node.grad, s_node.grad)


@pytest.mark.parametrize("rows, cols", [(48, 40), (37, 300)])  # partial blocks of rows and of columns
def test_the_diagonal_scalings_triton_node_rounds_as_the_chain_and_gives_its_gradients(rows, cols):
    """The Triton node (models/scaled_weight_triton.py, in Triton's interpreter) against PyTorch's chain:
    the output bit for bit (the same roundings, no multiply-add), the two gradients up to their sums' order."""
    from triton_helpers import skip_unless_interpreted

    skip_unless_interpreted()
    (chain, *chain_grads), (node, *node_grads) = _chain_and_node(rows, cols, "cpu")
    assert torch.equal(node, chain)
    for ours, expected in zip(node_grads, chain_grads):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_on_a_gpu_the_diagonal_scalings_triton_node_is_what_prodial_runs_and_matches_the_chain():
    """On CUDA, 1x1 blocks, W frozen: scaled_weight is the Triton node (its output bit for bit the chain's,
    its gradients up to their sums' order, at Vim-S in_proj's shape); blocks of 2 or a trained W: the chain."""
    pytest.importorskip("triton")
    (chain, *chain_grads), (node, *node_grads) = _chain_and_node(1536, 384, "cuda")
    assert torch.equal(node, chain)
    for ours, expected in zip(node_grads, chain_grads):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    linear = nn.Linear(384, 1536).cuda().requires_grad_(False)
    assert type(ProdialLinear(linear, ProdialSpec()).scaled_weight().grad_fn).__name__ == "_DiagonallyScaledBackward"
    for wrapper in (ProdialLinear(linear, ProdialSpec(block_size=2)),
                    ProdialLinear(linear.requires_grad_(True), ProdialSpec())):
        assert type(wrapper.scaled_weight().grad_fn).__name__ == "MulBackward0"
