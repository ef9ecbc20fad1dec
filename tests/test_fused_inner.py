"""The fused mixer path (a backend's ``mamba_inner``, mamba_ssm's mamba_inner_fn on CUDA) computes
what the unfused chain computes, and only mixers no method touches between in_proj and the output
take it: an adapter the fused kernel would skip keeps the unfused chain. Here with the PyTorch
reference of the fused function; tests/test_gpu.py runs the CUDA one."""
import copy

import pytest
import torch
import torch.nn.functional as F
from mixer_helpers import OpNames, assert_steps_continue_the_forward, recorded_backend
from triton_helpers import skip_unless_interpreted

from mambapeft.models import build_model, scan_short
from mambapeft.models.mamba import Mamba, Mixer
from mambapeft.models.scan import (
    TORCH_BACKEND,
    ScanBackend,
    causal_conv1d_torch,
    mamba_inner_torch,
    selective_scan_torch,
)
from mambapeft.peft import apply_peft
from mambapeft.runspec import domain_file, method_definition, methods_for

FUSED_TORCH = ScanBackend("torch", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d, mamba_inner_torch)
# methods whose every mixer keeps conv1d, x_proj and dt_proj plain (or parametrised, or LoRA on them
# with every update folded into the weight: merged style or DoRA, whose weight the fused function
# reads), any added scan state read as x_proj's weight and A extended; out_proj is called where its
# weight does not stand for its call
FUSED_LANGUAGE = {"zero_shot", "head_only", "full", "lora_in_proj", "lorap_x", "prefix", "periodic", "prefix_20", "prefix_30",
                  "periodic_20", "periodic_30", "dora_in_proj", "dorap_x", "prodial_in",
                  "hybrid_importance",  # its LoRA and (IA)3 tiers both wrap in_proj only
                  "dora_out_proj", "lora_sll", "dora_sll",
                  "lora_out_proj", "ia3", "lora_ia3", "prodial", "prodial_out", "sdt",  # out_proj called
                  "affix", "affix_noproj",  # affix tokens scanned as steps of xz, their outputs cut off
                  "additional_scan"}  # its B, C rows beside x_proj's, its A beside the mixer's
# the same for Vim (both directions' modules), partial tuning (parametrised parameters, read through the
# parametrisation) and methods outside the mixer included
FUSED_VISION = {"a", "cls_token", "d", "dora_embed", "dora_in_proj", "dorap_z", "full", "hybrid_importance",
                "linear_probe", "lora_embed", "lora_in_proj", "lorap_x", "lorap_x_dora", "lorap_z", "pos_embed",
                "prodial_in", "prompt", "prompt_noproj", "scratch",
                "lora_x_proj", "lora_dt_proj", "lorap_d", "lorap_b", "lorap_c",  # merged-style LoRA
                "dora_x_proj", "dora_dt_proj", "dora_out_proj", "dorap_d", "dorap_b", "dorap_c",
                "bias", "conv1d",  # deltas parametrising dt_proj's bias, conv1d's weight
                "lora_out_proj", "parallel_adapter", "prodial", "prodial_out", "sdt",  # out_proj called
                "affix", "affix_noproj", "hybrid", "hybrid_noproj",  # affix tokens: steps of xz, cut off
                "additional_scan", "all"}  # extended state: x_proj's weight and A extended


def _mixers(model) -> list[Mixer]:
    return [m for m in model.modules() if isinstance(m, Mixer)]


def _adapted(domain: str, method: str):
    torch.manual_seed(0)
    backbone = "vim-mini" if domain == "vision" else "mamba-mini"
    model = build_model(backbone, **({"num_classes": 4} if domain == "vision" else {"vocab_size": 64}))
    result = apply_peft(model, method_definition(domain, method, backbone, None)["peft"], method)
    with torch.no_grad():  # non-zero updates: a skipped adapter would change the output
        for p in result.trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _output_and_grads(model, backend, inputs):
    for m in _mixers(model):
        m.backend = backend
    out = model(inputs)
    if out.requires_grad:
        out.logsumexp(-1).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_fused_equals_unfused(model, fused_backend, inputs, fused: bool, label: str):
    """``model`` (left as it is) on the PyTorch chain and a copy on ``fused_backend``: every mixer of the
    copy takes the fused path exactly when ``fused``, and the outputs and gradients agree."""
    fused_model = copy.deepcopy(model)
    out, grads = _output_and_grads(model, TORCH_BACKEND, inputs)
    fused_out, fused_grads = _output_and_grads(fused_model, fused_backend, inputs)
    assert all(m.uses_fused_inner() == fused for m in _mixers(fused_model)), label
    torch.testing.assert_close(fused_out, out, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("domain,method", [("language", m) for m in sorted(domain_file("language", "methods"))]
                         + [("vision", m) for m in sorted(methods_for("vision", "vim-mini"))])
def test_fused_path_equals_the_unfused_chain_for_every_method(domain, method):
    """Vim's bidirectional mixer takes the fused function once per direction (out_proj applied once, to
    their sum) where both directions' modules are plain."""
    inputs = torch.randint(0, 64, (2, 24)) if domain == "language" else torch.randn(2, 3, 32, 32)
    fused = method in (FUSED_LANGUAGE if domain == "language" else FUSED_VISION)
    assert_fused_equals_unfused(_adapted(domain, method), FUSED_TORCH, inputs, fused, method)


@pytest.mark.parametrize("divide_out,bias", [(True, True), (False, True), (False, False)])
def test_a_bidirectional_mixer_adds_out_projs_bias_once(divide_out, bias):
    """The fused path projects the directions' sum once: the bias added once, the sum averaged or not."""
    torch.manual_seed(0)
    mixer = Mamba(16, d_state=4, bidirectional=True, divide_out=divide_out, bias=bias)
    if bias:
        torch.nn.init.normal_(mixer.out_proj.bias)
    fused = copy.deepcopy(mixer)
    fused.backend = FUSED_TORCH
    x = torch.randn(2, 9, 16)
    assert fused.uses_fused_inner() and not mixer.uses_fused_inner()
    torch.testing.assert_close(fused(x), mixer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale,bias,channel_major", [(0.5, True, True), (1.0, False, True), (0.5, True, False)])
def test_the_channel_major_projection_is_f_linear_with_its_input_gradient_channel_major(scale, bias, channel_major):
    """What Vim's fused mixer projects its directions' sum with: F.linear on y's transpose (times the
    scale), the same gradients, y's written channel-major ((in, B, L) storage: what the fused
    function's backward reads uncopied)."""
    from mambapeft.models.scan import project_channel_major
    torch.manual_seed(0)
    batch, d_in, length, d_out = 3, 8, 5, 6
    y = torch.randn(d_in, batch, length).transpose(0, 1) if channel_major else torch.randn(batch, d_in, length)
    y.requires_grad_()
    weight = torch.randn(d_out, d_in, requires_grad=True)
    b = torch.randn(d_out, requires_grad=True) if bias else None
    dout = torch.randn(batch, length, d_out)
    out = project_channel_major(y, weight, b, scale)
    grads = torch.autograd.grad(out, [t for t in (y, weight, b) if t is not None], dout)
    reference = F.linear(y.transpose(1, 2) * scale, weight, b)
    expected = torch.autograd.grad(reference, [t for t in (y, weight, b) if t is not None], dout)
    torch.testing.assert_close(out, reference)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert grads[0].permute(1, 0, 2).is_contiguous()  # channel-major


def test_the_channel_major_projection_scales_and_casts_its_frozen_weight_once():
    """Under autocast the scaled weight is made once, by one multiply that writes the GEMM's dtype, and
    the backward reads it: no multiply or cast of the weight there (it did both again before)."""
    from mambapeft.models.scan import project_channel_major

    y = torch.randn(2, 8, 5, dtype=torch.bfloat16, requires_grad=True)  # as the fused mixer sums it
    weight = torch.randn(6, 8)  # frozen, fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with OpNames() as forward_calls:
            out = project_channel_major(y, weight, None, 0.5)
        dout = torch.randn(out.shape, dtype=out.dtype)
        with OpNames() as backward_calls:
            (dy,) = torch.autograd.grad(out, y, dout)
    reference = F.linear(y.detach().transpose(1, 2), (weight * 0.5).bfloat16())
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert forward_calls.names.count("mul") == 1 and "_to_copy" not in forward_calls.names
    assert "mul" not in backward_calls.names and "_to_copy" not in backward_calls.names
    torch.testing.assert_close(dy, (dout @ (weight * 0.5).bfloat16()).transpose(1, 2))


@pytest.mark.parametrize("bias", [False, True])
def test_a_trained_fp32_weight_on_columns_gets_autocasts_output_and_gradients(bias):
    """scan._LinearOnColumns (what linear_on_columns runs for a trained fp32 weight on CUDA under bf16
    autocast), here on the CPU: autocast's output and gradients, the weight's as the cast product of the
    bf16 GEMM (on the CPU there is no GEMM writing fp32; tests/test_gpu_step.py checks the GPU's); the
    weight's copy in bf16 made once, not again in the backward."""
    from mambapeft.models.scan import _LinearOnColumns

    torch.manual_seed(0)
    weight = torch.randn(12, 8, requires_grad=True)
    b = torch.randn(12, requires_grad=True) if bias else None
    x = torch.randn(10, 8, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(12, 10, dtype=torch.bfloat16)
    leaves = [t for t in (weight, b, x) if t is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _LinearOnColumns.apply(weight, b, x.t(), torch.bfloat16)
        with OpNames() as backward_calls:
            grads = torch.autograd.grad(out, leaves, dout)
        reference = weight @ x.t() if b is None else torch.addmm(b[:, None], weight, x.t())
        expected = torch.autograd.grad(reference, leaves, dout)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert backward_calls.names.count("_to_copy") == 1  # the product's cast; the weight's bf16 copy is kept
    (dweight, *dbias, dx), (want_dweight, *want_dbias, want_dx) = grads, expected
    assert dweight.dtype == torch.float32 and dx.dtype == torch.bfloat16
    torch.testing.assert_close(dweight, want_dweight, rtol=0, atol=0)
    torch.testing.assert_close(dx, want_dx, rtol=0, atol=0)
    assert dx.is_contiguous()  # the rows' layout, as autograd's mm gives it
    if bias:  # summed in fp32, where autograd sums in bf16 and casts
        torch.testing.assert_close(dbias[0], dout.float().sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dbias[0], want_dbias[0], rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_hook_or_wrapper_between_in_proj_and_out_proj_keeps_the_unfused_chain(bidirectional):
    """Any direction's module: a hook on the backward scan's x_proj or a wrapped conv1d_b counts too.
    out_proj is called, not read, where it is wrapped or hooked: the fused path runs and so does the
    wrapper or hook (the output the unfused chain's)."""
    mixer = Mamba(32, d_state=4, bidirectional=bidirectional)
    mixer.backend = FUSED_TORCH
    assert mixer.uses_fused_inner()
    x_proj, conv = ("x_proj_b", "conv1d_b") if bidirectional else ("x_proj", "conv1d")
    handle = getattr(mixer, x_proj).register_forward_hook(lambda module, args, out: out * 2)
    assert not mixer.uses_fused_inner()
    handle.remove()
    assert mixer.uses_fused_inner()
    setattr(mixer, conv, torch.nn.Sequential(getattr(mixer, conv)))
    assert not mixer.uses_fused_inner()
    setattr(mixer, conv, getattr(mixer, conv)[0])
    mixer.out_proj = torch.nn.Sequential(mixer.out_proj)
    calls = []
    mixer.out_proj.register_forward_hook(lambda module, args, out: calls.append(1) or out * 2)
    assert mixer.uses_fused_inner()
    x = torch.randn(2, 9, 32)
    fused = mixer(x)
    unfused = copy.deepcopy(mixer)
    unfused.backend = TORCH_BACKEND
    torch.testing.assert_close(fused, unfused(x), rtol=1e-5, atol=1e-5)
    assert calls == [1, 1]  # once on each path


def test_a_parametrised_module_is_read_through_its_parametrisation_a_subclass_is_not():
    """A parametrisation leaves the module's forward as it is and the kernel reads the parametrised
    weight: fused (partial tuning's ``bias`` and ``conv1d`` methods are compared in full above). A
    subclass may compute anything in its forward: unfused."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    mixer = Mamba(32, d_state=4, bidirectional=True)
    mixer.backend = FUSED_TORCH
    parametrize.register_parametrization(mixer.conv1d_b, "weight", Doubled())
    parametrize.register_parametrization(mixer.x_proj, "weight", Doubled())
    assert mixer.uses_fused_inner()
    dt_proj = Scaled(mixer.dt_proj.in_features, mixer.dt_proj.out_features)
    dt_proj.load_state_dict(mixer.dt_proj.state_dict())
    mixer.dt_proj = dt_proj
    assert not mixer.uses_fused_inner()


def test_a_lora_folded_into_the_weight_takes_the_fused_path_unless_hooked():
    """LoRA on x_proj (merged style) is read through its merged weight; a hook on its update keeps the
    unfused chain, and so does an activation-style update on x_proj (dropout: its call is not its
    weight)."""
    mixer = _mixers(_adapted("vision", "lora_x_proj"))[0]
    mixer.backend = FUSED_TORCH
    assert mixer.uses_fused_inner()
    update = next(iter(mixer.x_proj_b.updates.values()))
    handle = update.lora_down.register_forward_hook(lambda module, args, out: out * 2)
    assert not mixer.uses_fused_inner()
    handle.remove()
    assert mixer.uses_fused_inner()
    model = build_model("vim-mini", num_classes=4)
    apply_peft(model, [{"family": "lora", "targets": [r"re:.*mixer\.x_proj(_b)?"], "rank": 4, "scale": 0.1,
                        "dropout": 0.1}], "lora_x_proj_activation")
    activation_style = _mixers(model)[0]
    activation_style.backend = FUSED_TORCH
    assert not activation_style.uses_fused_inner()


@pytest.mark.parametrize("hooked", ["extension", "its x_proj"])
def test_an_additional_scan_is_read_as_x_projs_weight_and_A_extended_unless_hooked(hooked):
    """Additional-scan's extra states reach the fused function as x_proj's weight with the extension's
    B and C rows beside its own and A extended (every state count: 4 + 2 here); a hook on the extension
    or on its projection keeps the unfused chain."""
    mixer = _mixers(_adapted("vision", "additional_scan"))[0]
    calls = []
    mixer.backend = ScanBackend("torch", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d,
                                lambda *args, **kwargs: calls.append(args) or mamba_inner_torch(*args, **kwargs))
    assert mixer.uses_fused_inner()
    mixer(torch.randn(2, 9, mixer.d_model))
    extension = mixer.state_extensions["fwd"]
    x_proj_weight, A = calls[0][3], calls[0][8]
    assert x_proj_weight.shape == (mixer.dt_rank + 2 * (mixer.d_state + extension.n_extra), mixer.d_inner)
    assert A.shape == (mixer.d_inner, mixer.d_state + extension.n_extra)
    module = extension if hooked == "extension" else extension.x_proj
    handle = module.register_forward_hook(lambda module, args, out: out)
    assert not mixer.uses_fused_inner()
    handle.remove()
    assert mixer.uses_fused_inner()


def test_cat_steps_is_torch_cat_along_time_stored_channel_major():
    from mambapeft.models.mamba import cat_steps

    tokens = torch.randn(6, 1, requires_grad=True)
    xz = torch.randn(6, 2, 5).transpose(0, 1).requires_grad_()  # channel-major, as in_proj's output
    for first, then in ((tokens.t().unsqueeze(0).expand(2, -1, -1).transpose(1, 2), xz),
                        (xz, tokens.t().unsqueeze(0).expand(2, -1, -1).transpose(1, 2))):
        out, expected = cat_steps(first, then), torch.cat([first, then], dim=2)
        assert torch.equal(out, expected) and out.transpose(0, 1).is_contiguous()
        dout = torch.randn_like(expected)
        torch.testing.assert_close(torch.autograd.grad(out, [tokens, xz], dout),
                                   torch.autograd.grad(expected, [tokens, xz], dout))
    # three parts: both directions' tokens around xz (models/mamba.py: Mamba._affixed)
    ahead, behind = (torch.randn(2, 6, n, requires_grad=True) for n in (1, 2))
    out, expected = cat_steps(ahead, xz, behind), torch.cat([ahead, xz, behind], dim=2)
    assert torch.equal(out, expected) and out.transpose(0, 1).is_contiguous()
    dout = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(out, [ahead, xz, behind], dout),
                               torch.autograd.grad(expected, [ahead, xz, behind], dout))


@pytest.mark.parametrize("domain,method", [("vision", "affix_noproj"), ("language", "affix")])
def test_affix_tokens_reach_the_fused_function_channel_major_as_in_projs_output(domain, method):
    """xz with the affix tokens added along time keeps in_proj's channel-major storage ((2*D_inner, B, L)):
    the fused function reads it uncopied (a batch-major xz made it copy its sequences)."""
    model = _adapted(domain, method)
    seen = []
    def recording(xz, *args, **kwargs):
        seen.append(xz)
        return mamba_inner_torch(xz, *args, **kwargs)

    for mixer in _mixers(model):
        mixer.backend = ScanBackend("torch", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d, recording)
    model(torch.randint(0, 64, (2, 24)) if domain == "language" else torch.randn(2, 3, 32, 32))
    assert seen and all(xz.transpose(0, 1).is_contiguous() for xz in seen)


def test_step_mode_after_a_fused_prefill_continues_the_sequence():
    """Generation prefills with a state (the unfused chain, which fills it) and then steps."""
    model = _adapted("language", "lora_in_proj")
    for m in _mixers(model):
        m.backend = FUSED_TORCH
    assert_steps_continue_the_forward(model, torch.randint(0, 64, (2, 30)), 20)


@pytest.mark.parametrize("backbone,recorded", [("mamba-mini", "torch-fused"), ("vim-mini", "torch-fused")])
def test_the_recorded_backend_says_whether_the_fused_path_ran(monkeypatch, backbone, recorded):
    model = build_model(backbone, **({"num_classes": 4} if backbone == "vim-mini" else {"vocab_size": 64}))
    assert recorded_backend(monkeypatch, model, FUSED_TORCH) == recorded


@pytest.mark.parametrize("backbone,setting,kept", [("vim-mini", None, True), ("mamba-mini", None, False),
                                                    ("vim-mini", "0", False), ("mamba-mini", "1", True)])
def test_image_classifiers_keep_activations_for_the_backward(monkeypatch, backbone, setting, kept):
    """Memory for speed where memory is to spare: Vim's fused mixers keep what their backward would
    recompute, a language model's (micro-batch sized to memory) do not; $MAMBAPEFT_KEEP_ACTIVATIONS
    decides for every model. What the fused function is asked, per call."""
    from mambapeft import runtime
    if setting is None:
        monkeypatch.delenv(runtime.KEEP_ACTIVATIONS_ENV, raising=False)
    else:
        monkeypatch.setenv(runtime.KEEP_ACTIVATIONS_ENV, setting)
    model = build_model(backbone, **({"num_classes": 4} if backbone == "vim-mini" else {"vocab_size": 64}))
    asked = []

    def recording_inner(*args, keep_activations=False, **kwargs):
        asked.append(keep_activations)
        return mamba_inner_torch(*args, **kwargs)

    recorded_backend(monkeypatch, model, ScanBackend("torch", TORCH_BACKEND.selective_scan,
                                                     TORCH_BACKEND.causal_conv1d, recording_inner))
    model(torch.randn(2, 3, 32, 32) if backbone == "vim-mini" else torch.randint(0, 64, (2, 12)))
    assert asked and set(asked) == {kept}


@pytest.mark.parametrize("wrap", ["plain", "bias_free", "hooked", "wrapped"])
def test_projections_come_out_channel_major_and_every_wrapper_still_runs(wrap):
    """The mixer's (B, channels, L) projections are stored as (channels, B, L), mamba_ssm's layout,
    whatever wraps the projection; a hook or wrapper is called, never read past."""
    from mambapeft.models.mamba import linear_channel_major
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 10, bias=wrap != "bias_free")
    calls = []
    if wrap == "hooked":
        linear.register_forward_hook(lambda module, args, out: calls.append(1) or out * 2)
    module = torch.nn.Sequential(linear, torch.nn.Tanh()) if wrap == "wrapped" else linear
    x = torch.randn(3, 5, 6)
    out = linear_channel_major(module, x)
    torch.testing.assert_close(out, module(x).transpose(1, 2))
    assert out.shape == (3, 10, 5) and out.permute(1, 0, 2).is_contiguous()
    assert out.transpose(1, 2).reshape(15, 10).data_ptr() == out.data_ptr()  # the next GEMM reads it uncopied
    assert len(calls) == (2 if wrap == "hooked" else 0)


LORA_CASES = {  # name: (bias, [(key, rows, spec arguments)])
    "full_rows": (False, [("full", (0, 10), {})]),
    "full_rows_with_bias": (True, [("full", (0, 10), {"scale": 2.0})]),
    "two_of_all_rows": (True, [("full", (0, 10), {}), ("x", (0, 10), {"rank": 3, "scale": 0.5})]),
    "x_half": (False, [("x", (0, 5), {"scale": 0.5})]),
    "z_half_and_full": (False, [("full", (0, 10), {}), ("z", (5, 10), {"rank": 3})]),
    "merged_with_bias": (True, [("full", (0, 10), {"style": "merged"})]),
    "dora_and_activation": (False, [("x", (0, 5), {"dora": True}), ("z", (5, 10), {})]),
    "dropout": (False, [("full", (0, 10), {"dropout": 0.3}), ("x", (0, 5), {"dropout": 0.5})]),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_projections_write_the_channel_major_layout_as_their_forward_computes(case):
    """LoRA's channel_major (the frozen GEMM and each update's GEMM writing mamba_ssm's layout) gives
    the output and every gradient that calling the module and copying does, dropout masks included."""
    from mambapeft.models.mamba import linear_channel_major
    from mambapeft.peft.lora import LoraLinear, LoraSpec, LowRankUpdate

    bias, updates = LORA_CASES[case]
    torch.manual_seed(0)
    module = LoraLinear(torch.nn.Linear(6, 10, bias=bias))
    for key, rows, args in updates:
        update = LowRankUpdate(6, rows, LoraSpec(targets=("in_proj",), rank=args.pop("rank", 2), **args), module.base.weight)
        torch.nn.init.normal_(update.lora_up.weight)  # a non-zero update
        module.add(key, update, "in_proj")
    module.base.weight.requires_grad_(False)
    x = torch.randn(3, 5, 6, requires_grad=True)
    grad_out = torch.randn(3, 10, 5)
    results = []
    for run in (lambda: linear_channel_major(module, x), lambda: module(x).transpose(1, 2)):
        torch.manual_seed(1)  # dropout draws the same masks in the same order
        out = run()
        out.backward(grad_out)
        grads = {n: p.grad.clone() for n, p in [("x", x), *module.named_parameters()] if p.grad is not None}
        x.grad = None
        module.zero_grad(set_to_none=True)
        results.append((out.detach(), grads))
    (out, grads), (reference, reference_grads) = results
    assert out.permute(1, 0, 2).is_contiguous()  # the layout, written directly
    torch.testing.assert_close(out, reference)
    assert grads.keys() == reference_grads.keys() and "x" in grads and len(grads) > 1
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], msg=name)


def _graph_nodes(tensor):
    """The names of the autograd nodes ``tensor``'s backward runs."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("rows", [(0, 5), (5, 10)])
def test_a_lora_block_update_leaves_the_outputs_gradient_uncopied(rows):
    """The first update of a block of rows runs padded to all rows, not in place on the block: autograd's
    in-place-on-a-view node (CopySlices) would clone and copy the whole output's gradient (Vim's xz
    gradient, per layer, for LoRAp(X))."""
    from mambapeft.models.mamba import linear_channel_major
    from mambapeft.peft.lora import LoraLinear, LoraSpec, LowRankUpdate

    module = LoraLinear(torch.nn.Linear(6, 10, bias=False))
    module.add("x", LowRankUpdate(6, rows, LoraSpec(targets=("in_proj",)), module.base.weight), "in_proj")
    nodes = _graph_nodes(linear_channel_major(module, torch.randn(3, 5, 6, requires_grad=True)))
    assert "CopySlices" not in nodes and "AddmmBackward0" in nodes


@pytest.mark.parametrize("hooked", ["lora_down", "wrapper"])
def test_lora_channel_major_steps_aside_for_a_hook(hooked):
    """A hook on any part of the LoRA module sends the projection through the module's own forward:
    the hook is called, nothing is read past."""
    from mambapeft.models.mamba import linear_channel_major
    from mambapeft.peft.lora import LoraLinear, LoraSpec, LowRankUpdate

    torch.manual_seed(0)
    module = LoraLinear(torch.nn.Linear(6, 10))
    update = LowRankUpdate(6, (0, 10), LoraSpec(targets=("in_proj",)), module.base.weight)
    module.add("full", update, "in_proj")
    x = torch.randn(3, 5, 6)
    assert module.channel_major(x) is not None
    calls = []
    handle = {"lora_down": update.lora_down, "wrapper": module}[hooked].register_forward_hook(
        lambda m, args, out: calls.append(1) or out * 2)
    assert module.channel_major(x) is None
    out = linear_channel_major(module, x)
    torch.testing.assert_close(out, module(x).transpose(1, 2))
    assert len(calls) == 2
    handle.remove()
    assert module.channel_major(x) is not None


@pytest.mark.parametrize("rows", [(0, 48), (0, 96)])  # a block (its own GEMM), all rows (under the frozen one's)
def test_lora_channel_major_under_autocast_computes_in_its_dtype(rows):
    """Under bf16 autocast (the CUDA training precision; here on the CPU) its GEMMs run in bf16 as the
    module's own do, fp32 weight and input included, and land close to them; gradients reach the
    fp32 LoRA weights."""
    from mambapeft.models.mamba import linear_channel_major
    from mambapeft.peft.lora import LoraLinear, LoraSpec, LowRankUpdate

    torch.manual_seed(0)
    module = LoraLinear(torch.nn.Linear(64, 96, bias=False))
    module.base.weight.requires_grad_(False)
    update = LowRankUpdate(64, rows, LoraSpec(targets=("in_proj",), rank=4), module.base.weight)
    torch.nn.init.normal_(update.lora_up.weight)
    module.add("x", update, "in_proj")
    x = torch.randn(2, 30, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_channel_major(module, x)
        reference = module(x).transpose(1, 2)
    assert out.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert update.lora_up.weight.grad.dtype == torch.float32 and update.lora_up.weight.grad.abs().sum() > 0
    assert update.lora_down.weight.grad.abs().sum() > 0


class _ReferenceScanKernels:
    """mamba_ssm's compiled ``selective_scan_cuda`` interface (fwd, bwd) computed by the PyTorch scan
    and autograd, so that the fused function's own code (layouts, the B/C/delta plumbing, which
    gradients it computes) runs on the CPU. B, C: (B, 1, N, L), as the fused function passes them."""

    @staticmethod
    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        out = selective_scan_torch(u, delta, A, B[:, 0], C[:, 0], D, None, delta_bias, delta_softplus)
        chunks = -(-u.shape[-1] // 2048)  # the kernel's: the state at each 2048-step chunk's end
        return out, torch.zeros(*u.shape[:2], chunks, 2 * A.shape[1]), out * F.silu(z)

    @staticmethod
    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, intermediates, out, dz, delta_softplus, recompute_out_z):
        if u.shape[-1] > 2048:  # the kernel's own check: it reads the chunk states past the first chunk
            assert intermediates is not None and intermediates.shape[2] == 2
        leaves = [t.detach().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
        u_, delta_, A_, B_, C_, D_, z_, bias_ = leaves
        with torch.enable_grad():  # a Function's backward runs without it
            out_z = selective_scan_torch(u_, delta_, A_, B_[:, 0], C_[:, 0], D_, z_, bias_, delta_softplus)
            grads = torch.autograd.grad(out_z, leaves, dout)
        dz.copy_(grads[6])  # into the caller's buffer, as the kernel writes it
        return (*grads[:6], grads[7], dz, out_z.detach())


class _SideBySideReferenceKernels(_ReferenceScanKernels):
    """As :class:`_ReferenceScanKernels`, dB and dC written as our short scan writes them: the two halves
    of one token-major (B, L, 2N) buffer's rows."""

    @staticmethod
    def bwd(*args):
        du, ddelta, dA, dB, dC, *rest = _ReferenceScanKernels.bwd(*args)
        buffer = torch.cat([dB[:, 0], dC[:, 0]], dim=1).transpose(1, 2).contiguous()  # (B, L, 2N)
        dB, dC = buffer.transpose(1, 2).split(dB.shape[2], dim=1)
        return du, ddelta, dA, dB.unsqueeze(1), dC.unsqueeze(1), *rest


def _time_order(reverse: bool):
    """t flipped along time where ``reverse`` (a kernel run from the last step is its forward run on
    the sequence flipped, flipped back), else as it is."""
    return (lambda t: t.flip(-1)) if reverse else (lambda t: t)


def _reference_conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu, reverse=False):
    """causal-conv1d's raw forward (and our Triton one's ``reverse``) from the PyTorch conv."""
    flip = _time_order(reverse)
    return flip(causal_conv1d_torch(flip(x), weight, bias, "silu" if silu else None))


def _reference_conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial, silu):
    """causal-conv1d's raw backward: dx into ``dx`` where given (the kernel's buffer), else a new tensor."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    with torch.enable_grad():
        out = causal_conv1d_torch(*leaves, "silu" if silu else None)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout)
    dx = grads[0] if dx is None else dx.copy_(grads[0])
    return dx, grads[1], grads[2] if bias is not None else None, None


@pytest.mark.parametrize("layout,length,bias,silu", [("channel-major", 300, True, True), ("batch-major", 7, False, True),
                                                     ("channel-major", 5, True, False), ("batch-major", 1, True, True)])
def test_the_triton_conv_forward_computes_the_reference(layout, length, bias, silu):
    """models/conv_triton.py's kernel (in Triton's interpreter here: conftest.py) against
    scan.causal_conv1d_torch: the output, in x's layout (300 steps: two time tiles, the second partial),
    forward and reverse."""
    skip_unless_interpreted()
    from mambapeft.models import conv_triton

    torch.manual_seed(0)
    b, d = 2, 20  # 20 channels: two channel tiles, the second partial
    x = torch.randn(d, b, length).transpose(0, 1) if layout == "channel-major" else torch.randn(b, d, length)
    weight, bias_t = torch.randn(d, 4) / 2, torch.randn(d) if bias else None
    out = conv_triton.causal_conv1d_fwd_function(x, weight, bias_t, None, None, None, silu)
    assert out.stride() == x.stride()
    activation = "silu" if silu else None
    torch.testing.assert_close(out, causal_conv1d_torch(x, weight, bias_t, activation))
    # from the last step to the first: the conv of x flipped along time, in x's order
    reverse = conv_triton.causal_conv1d_fwd_function(x, weight, bias_t, None, None, None, silu, reverse=True)
    torch.testing.assert_close(reverse, causal_conv1d_torch(x.flip(-1), weight, bias_t, activation).flip(-1))
    with pytest.raises(NotImplementedError, match="initial_states"):
        conv_triton.causal_conv1d_fwd_function(x, weight, bias_t, None, torch.zeros(b, d, 3), None, silu)


@pytest.mark.parametrize("bias", [True, False])
def test_the_cuda_conv_function_computes_the_reference(monkeypatch, bias):
    """scan.causal_conv1d_cuda's own autograd function on the kernels' interfaces: the forward our
    Triton kernel (interpreted), the backward causal-conv1d's served by PyTorch; output and gradients
    equal causal_conv1d_torch's, a channel-major x and a non-contiguous output gradient included."""
    skip_unless_interpreted()
    from mambapeft.models import conv_triton, scan

    monkeypatch.setattr(scan, "_cuda_causal_conv1d", lambda *a, **k: pytest.fail("causal_conv1d_fn called"))
    monkeypatch.setattr(scan, "_conv_fwd_kernel", conv_triton.causal_conv1d_fwd_function)
    monkeypatch.setattr(scan, "_conv_bwd_kernel", _reference_conv_bwd)
    torch.manual_seed(0)
    b, d, length = 2, 6, 11
    args = [torch.randn(d, b, length).transpose(0, 1), torch.randn(d, 4) / 2, torch.randn(d) if bias else None]
    grad_out = torch.randn(length, b, d).permute(1, 2, 0)  # time-major: the function makes it time-contiguous
    runs = []
    for conv in (scan.causal_conv1d_torch, scan.causal_conv1d_cuda):
        leaves = [a.detach().requires_grad_() if a is not None else None for a in args]
        out = conv(*leaves, "silu")
        out.backward(grad_out)
        runs.append((out.detach(), [t.grad for t in leaves if t is not None]))
    (reference, reference_grads), (out, grads) = runs
    torch.testing.assert_close(out, reference)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected)
    with pytest.raises(ValueError, match="'relu'"):  # causal-conv1d's activations only, not silently none
        scan.causal_conv1d_cuda(*args, "relu")


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("length,kernel_length,project,kernels", [
    (13, 13, True, _ReferenceScanKernels), (100, 128, True, _ReferenceScanKernels),
    (2049, 2049, True, _ReferenceScanKernels), (13, 13, False, _ReferenceScanKernels),
    (100, 128, False, _ReferenceScanKernels), (13, 13, True, _SideBySideReferenceKernels),
    (13, 13, False, _SideBySideReferenceKernels)])
def test_the_fused_mixer_functions_own_code_computes_the_reference(monkeypatch, frozen, length, kernel_length,
                                                                   project, kernels):
    """scan._MambaInnerFn with the CUDA kernels' interfaces served by the PyTorch scan and conv: the
    output and gradients equal mamba_inner_torch's, channel-major input included; frozen
    projections get no gradient (none computed), the rest the same; past 2048 steps the backward
    is given the chunk states it reads; a length short of a whole kernel block (100 of 128) runs
    the kernels padded with zero steps; without out_proj's weight (``project`` False) the output is
    the gated scan output (B, D_inner, L), cut along its own time dimension where padded; dB and dC
    as mamba-ssm's kernels write them or as ours do (one buffer, copied at once). (On the
    GPU, the same function on the real kernels is compared with mamba_ssm's: tests/test_gpu.py.)"""
    from mambapeft.models import scan

    lengths = []

    class RecordingKernels(kernels):
        @staticmethod
        def fwd(u, *args):
            lengths.append(u.shape[-1])
            return kernels.fwd(u, *args)

    monkeypatch.setattr(scan, "_selective_scan_kernels", RecordingKernels)
    monkeypatch.setattr(scan, "_conv_fwd_kernel", _reference_conv_fwd)
    monkeypatch.setattr(scan, "_conv_bwd_kernel", _reference_conv_bwd)
    torch.manual_seed(0)
    batch, d_inner, n, rank, d_model = 2, 8, 4, 3, 6
    xz = torch.randn(2 * d_inner, batch, length).transpose(0, 1)  # channel-major, as in_proj writes it
    args = [xz, torch.randn(d_inner, 1, 4) / 2, torch.randn(d_inner) / 2, torch.randn(rank + 2 * n, d_inner) / 4,
            torch.randn(d_inner, rank) / 2, torch.rand(d_inner) - 3, torch.randn(d_model, d_inner) / 4,
            torch.randn(d_model), -torch.rand(d_inner, n) - 0.5, torch.randn(d_inner)]
    projections = {3, 4, 6}  # x_proj, dt_proj, out_proj weights
    grad_out = torch.randn(batch, length, d_model)
    if not project:
        args[6] = args[7] = None
        grad_out = torch.randn(length, batch, d_inner).permute(1, 2, 0)  # time-major: made time-contiguous
    runs = []
    for fn in (scan.mamba_inner_torch, scan.mamba_inner_cuda):
        leaves = [a.detach().requires_grad_(not (frozen and i in projections)) if a is not None else None
                  for i, a in enumerate(args)]
        out = fn(*leaves)
        if fn is scan.mamba_inner_cuda:  # unpadded, no slice (its backward would copy the gradient whole)
            assert (type(out.grad_fn).__name__ == "_MambaInnerFnBackward") == (length == kernel_length)
        out.backward(grad_out)
        runs.append((out.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]))
    (reference, reference_grads), (out, grads) = runs
    assert lengths == [kernel_length]
    torch.testing.assert_close(out, reference)
    assert out.shape == ((batch, length, d_model) if project else (batch, d_inner, length))
    for i, (grad, expected) in enumerate(zip(grads, reference_grads)):
        absent = (frozen and i in projections) or args[i] is None
        assert (grad is None) == (expected is None) == absent, i
        if grad is not None:
            torch.testing.assert_close(grad, expected, msg=str(i))


def test_a_direction_without_affixes_hands_its_scan_output_on_uncut():
    """Without affix tokens the scan's output is passed on as it is, not through a slice of all its steps
    (whose backward writes the gradient into a zeroed copy: a fill and a copy per direction and layer)."""
    from mambapeft.models.mamba import FORWARD, Mamba
    from mambapeft.models.scan import ScanBackend, TORCH_BACKEND, mamba_inner_torch

    returned = []

    def remembered(function):
        def run(*args, keep_activations=False, **kwargs):
            returned.append(function(*args, **kwargs))
            return returned[-1]
        return run

    torch.manual_seed(0)
    mixer = Mamba(16, d_state=4)
    mixer.backend = ScanBackend("torch", remembered(TORCH_BACKEND.selective_scan), TORCH_BACKEND.causal_conv1d,
                                remembered(mamba_inner_torch))
    x = torch.randn(2, 7, 16, requires_grad=True)
    assert mixer.uses_fused_inner() and mixer(x) is returned[-1]  # projected inside the fused function
    assert mixer._scan_direction(torch.randn(2, 64, 7), FORWARD) is returned[-1]  # the unfused chain


def _short_scan_reference(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, offset):
    """Our short scan's gated output (scan_short.py's contract) from the PyTorch scan: from the last
    step where ``reverse``, the state offset's term silu(z) C h' added."""
    from mambapeft.models.scan import state_offset_term

    flip = _time_order(reverse)
    out_z = flip(selective_scan_torch(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, softplus))
    return out_z + state_offset_term(C, z, offset) if offset is not None else out_z


class _ReferenceShortScan:
    """Our short scan's interface (``scan_short``: runs, applies, SUMS, fwd, bwd with reverse, offset,
    into, add_dz, wants) served by the PyTorch scan and autograd, so that the fused function's paths that
    only our kernels take (two directions in one node) run on the CPU; records what each call was asked."""

    calls: list = []
    SUMS = scan_short.SUMS

    @staticmethod
    def runs(device, dtype, states, length):
        return True

    @staticmethod
    def applies(u, A, B, *sequences):
        return True

    @classmethod
    def fwd(cls, u, delta, A, B, C, D, z, delta_bias, softplus, reverse=False, keep_states=False, offset=None,
            into=None, a_log=False):
        cls.calls.append(("fwd", reverse, into is not None))
        A = -torch.exp(A) if a_log else A  # given A_log
        out_z = _short_scan_reference(u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias, softplus, reverse, offset)
        return None, None, into.add_(out_z) if into is not None else out_z

    @classmethod
    def bwd(cls, u, delta, A, B, C, D, z, delta_bias, dout, states, out, dz, softplus, recompute_out_z,
            reverse=False, offset=None, add_dz=False, wants=scan_short.SUMS, a_log=False):
        cls.calls.append(("bwd", reverse, add_dz, wants))
        leaves = [t.detach().requires_grad_() if t is not None else None
                  for t in (u, delta, A, B, C, D, z, delta_bias, offset)]
        with torch.enable_grad():  # with a_log, the gradient is A_log's
            A = -torch.exp(leaves[2]) if a_log else leaves[2]
            out_z = _short_scan_reference(*leaves[:2], A, leaves[3][:, 0], leaves[4][:, 0], *leaves[5:8], softplus,
                                          reverse, leaves[8])
            grads = torch.autograd.grad(out_z, [t for t in leaves if t is not None], dout)
        dz.add_(grads[6]) if add_dz else dz.copy_(grads[6])
        dA, dD, ddelta_bias = (grad if name in wants else None
                               for name, grad in zip(scan_short.SUMS, (grads[2], grads[5], grads[7])))
        return (*grads[:2], dA, *grads[3:5], dD, ddelta_bias, dz, out_z.detach() if recompute_out_z else None,
                grads[8] if offset is not None else None)


class _ReferenceConvBackward:
    """conv_bwd.py's interface (runs_on, runs, backward with reverse and add_dx) served by autograd."""

    calls: list = []

    @staticmethod
    def runs_on(x, weight):
        return True

    @staticmethod
    def runs(x, weight, dout):
        return True

    @classmethod
    def backward(cls, x, weight, bias, dout, dx, silu, reverse=False, add_dx=False):
        cls.calls.append((reverse, add_dx))
        flip = _time_order(reverse)
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        with torch.enable_grad():
            out = flip(causal_conv1d_torch(flip(leaves[0]), *leaves[1:], "silu" if silu else None))
            grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout)
        dx.add_(grads[0]) if add_dx else dx.copy_(grads[0])
        return dx, grads[1], grads[2] if bias is not None else None


@pytest.mark.parametrize("keep,frozen,offset,a_log", [(True, True, False, False), (False, False, True, False),
                                                      (True, False, True, False), (True, False, False, True),
                                                      (False, True, True, True)])
def test_both_directions_in_one_node_compute_the_two_directions_summed(monkeypatch, keep, frozen, offset, a_log):
    """scan.mamba_inner_pair_cuda where our kernels run both directions (here their interfaces served by
    the PyTorch scan and conv): one autograd node whose output and every gradient are the two
    directions' mamba_inner_torch summed (xz's included: the second direction's output and xz gradient
    added to the first's by the kernels, asked of the second direction's calls only); frozen
    projections get no gradient, nor do the second direction's A and delta_bias where frozen too (its scan
    backward asked for D's sum alone); state offsets per direction; with ``a_log``, A given as A_log (the
    gradient A_log's). (On the GPU, the real kernels against mamba_inner_cuda per direction:
    tests/test_scan_short.py.)"""
    from mambapeft.models import scan

    monkeypatch.setattr(scan, "scan_short", _ReferenceShortScan)
    monkeypatch.setattr(scan, "conv_bwd", _ReferenceConvBackward)
    monkeypatch.setattr(scan, "_triton_conv_fwd", _reference_conv_fwd)
    monkeypatch.setattr(scan, "_conv_fwd_kernel", _reference_conv_fwd)
    monkeypatch.setattr(_ReferenceShortScan, "calls", [])
    monkeypatch.setattr(_ReferenceConvBackward, "calls", [])
    torch.manual_seed(0)
    batch, d_inner, n, rank, length = 2, 8, 4, 3, 13
    xz = torch.randn(2 * d_inner, batch, length).transpose(0, 1)  # channel-major, as in_proj writes it

    def direction(reverse):
        return [torch.randn(d_inner, 1, 4) / 2, torch.randn(d_inner) / 2, torch.randn(rank + 2 * n, d_inner) / 4,
                torch.randn(d_inner, rank) / 2, torch.rand(d_inner) - 3, state_matrix(torch.rand(d_inner, n) + 0.5),
                torch.randn(d_inner), torch.randn(d_inner, n) if offset and reverse else None]

    def state_matrix(magnitude):  # A, or A_log where the functions are given that
        return magnitude.log() if a_log else -magnitude

    args = [xz, *direction(False), *direction(True)]
    projections = {3, 4, 11, 12}  # x_proj, dt_proj weights of each direction
    frozen_set = projections | {13, 14}  # with the second direction's delta_bias and A
    grad_out = torch.randn(batch, d_inner, length)
    runs = []
    for pair in (scan.mamba_inner_pair_torch, scan.mamba_inner_pair_cuda):
        leaves = [a.detach().requires_grad_(not (frozen and i in frozen_set)) if a is not None else None
                  for i, a in enumerate(args)]
        first, second = (scan.InnerWeights(*leaves[1 + 8 * i:8 + 8 * i], reverse=bool(i), state_offset=leaves[8 + 8 * i],
                                           a_log=a_log) for i in (0, 1))
        out = pair(leaves[0], first, second, keep_activations=keep)
        if pair is scan.mamba_inner_pair_cuda:
            assert type(out.grad_fn).__name__ == "_MambaInnerFnBackward"  # one node for both
        out.backward(grad_out)
        runs.append((out.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]))
    (reference, reference_grads), (out, grads) = runs
    torch.testing.assert_close(out, reference)
    if a_log:  # what the pair computes given A = -exp(A_log) itself
        given_A = (scan.InnerWeights(*args[1 + 8 * i:6 + 8 * i], -torch.exp(args[6 + 8 * i]), args[7 + 8 * i],
                                     reverse=bool(i), state_offset=args[8 + 8 * i]) for i in (0, 1))
        torch.testing.assert_close(out, scan.mamba_inner_pair_torch(args[0], *given_A))
    for i, (grad, expected) in enumerate(zip(grads, reference_grads)):
        assert (grad is None) == (expected is None) == ((frozen and i in frozen_set) or args[i] is None), i
        if grad is not None:
            torch.testing.assert_close(grad, expected, msg=str(i))
    second_wants = ("dD",) if frozen else scan_short.SUMS
    assert _ReferenceShortScan.calls == [("fwd", False, False), ("fwd", True, True),
                                         ("bwd", False, False, scan_short.SUMS), ("bwd", True, True, second_wants)]
    assert _ReferenceConvBackward.calls == [(False, False), (True, True)]


@pytest.mark.parametrize("method", ["lorap_x", "additional_scan", "affix_noproj", "affix", "hybrid_noproj"])
def test_a_vim_mixer_hands_both_directions_to_the_pair_function_affix_tokens_included(method):
    """Vim's fused mixers call the backend's mamba_inner_pair once for both directions (each
    direction's weights as mamba_inner reads them: additional-scan's extended) and compute what the
    per-direction calls compute, gradients included; affix tokens: both directions' on one xz, each
    ahead of xz in its direction's order (the forward's first, the backward's last), cut after out_proj."""
    from mambapeft.models.scan import mamba_inner_pair_torch

    model = _adapted("vision", method)
    images = torch.randn(2, 3, 32, 32)
    pairs = []

    def recording_pair(xz, first, second, keep_activations=False):
        pairs.append((xz.shape[-1], first, second))
        return mamba_inner_pair_torch(xz, first, second)

    runs = []
    for backend in (FUSED_TORCH, ScanBackend("torch", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d,
                                             mamba_inner_torch, recording_pair)):
        copied = copy.deepcopy(model)
        runs.append(_output_and_grads(copied, backend, images))
        assert all(m.uses_fused_inner() for m in _mixers(copied))
    mixers = _mixers(model)
    assert len(pairs) == len(mixers)
    steps = model.config.num_patches + 1  # + the class token
    for mixer, (length, first, second) in zip(mixers, pairs):
        affix_steps = sum(mixer._affix_tokens(d, torch.zeros(1, 1, 1)).shape[-1] for d in mixer.directions
                          if d.key in mixer.affixes)
        assert length == steps + affix_steps and (affix_steps > 0) == method.startswith(("affix", "hybrid"))
        assert not first.reverse and second.reverse
        assert first.x_proj_weight.shape == second.x_proj_weight.shape and first.A.shape[1] == second.A.shape[1]
    (out, grads), (paired_out, paired_grads) = runs
    torch.testing.assert_close(paired_out, out)
    for name, grad in grads.items():
        torch.testing.assert_close(paired_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype,rows,aligned", [(torch.bfloat16, 68, 72), (torch.bfloat16, 56, 56), (torch.float32, 11, 12)])
def test_x_projs_weight_gets_zero_rows_up_to_16_byte_output_rows(dtype, rows, aligned):
    """x_proj's weight as the fused function's GEMMs read it (Additional-scan's 24 + 2 x 22 rows at
    Vim-S): zero rows appended until a row of its output is a multiple of 16 bytes (cuBLASLt's
    kernels need it), the weight itself where it is already."""
    from mambapeft.models.scan import _aligned_projection

    weight = torch.randn(rows, 5, dtype=dtype)
    padded = _aligned_projection(weight)
    assert padded.shape == (aligned, 5) and padded.dtype == dtype and (padded is weight) == (rows == aligned)
    assert torch.equal(padded[:rows], weight) and not padded[rows:].any()


def _one_update_lora(rows, bias=False, rank=3, dropout=0.0):
    """LoraLinear(6 -> 10) with one activation-style update of ``rows``, base frozen, update nudged off zero."""
    from mambapeft.peft.lora import LoraLinear, LoraSpec, LowRankUpdate

    module = LoraLinear(torch.nn.Linear(6, 10, bias=bias))
    update = LowRankUpdate(6, rows, LoraSpec(targets=("in_proj",), rank=rank, scale=0.5, dropout=dropout),
                           module.base.weight)
    torch.nn.init.normal_(update.lora_up.weight)
    module.add("x", update, "in_proj")
    module.base.requires_grad_(False)
    return module


@pytest.mark.parametrize("rows,bias,frozen", [((0, 5), False, ()), ((0, 10), True, ()), ((5, 10), True, ("x",)),
                                              ((2, 7), False, ("lora_down",)), ((0, 5), False, ("lora_up",))])
def test_one_update_on_a_frozen_projection_is_one_node_computing_the_modules_call(rows, bias, frozen):
    """One activation-style update on a frozen Linear: channel_major is one autograd node (the frozen GEMM
    writing the output, the update added to its rows in place) whose output and gradients are the
    module's call's, with x or either LoRA weight frozen (their gradients not asked for, the others
    unchanged)."""
    from mambapeft.models.mamba import linear_channel_major

    torch.manual_seed(0)
    module = _one_update_lora(rows, bias)
    update = module.updates["x"]
    for name in frozen:
        if name != "x":
            getattr(update, name).weight.requires_grad_(False)
    x = torch.randn(3, 5, 6, requires_grad="x" not in frozen)
    out, nodes = _as_the_modules_call(module, ("x", x), lambda: linear_channel_major(module, x),
                                      lambda: module(x).transpose(1, 2), torch.randn(3, 10, 5), 3 - len(frozen))
    assert "_FrozenPlusLowRankBackward" in nodes and "AddmmBackward0" not in nodes
    assert out.permute(1, 0, 2).is_contiguous()


def _as_the_modules_call(module, leaf, ours, call, grad_out, n_grads):
    """(output, autograd node names) of ``ours``, after asserting that its output and the gradients of
    ``leaf`` (name, tensor) and the module's parameters (``n_grads`` of them) are those of ``call``."""
    name, tensor = leaf
    results = []
    for run in (ours, call):
        out = run()
        nodes = _graph_nodes(out)
        out.backward(grad_out)
        leaves = [(name, tensor), *module.named_parameters()]
        results.append((out.detach(), {n: p.grad for n, p in leaves if p.grad is not None}, nodes))
        tensor.grad = None
        module.zero_grad(set_to_none=True)
    (out, grads, nodes), (reference, reference_grads, _) = results
    torch.testing.assert_close(out, reference)
    assert grads.keys() == reference_grads.keys() and len(grads) == n_grads
    for key, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[key], msg=key)
    return out, nodes


@pytest.mark.parametrize("rows,bias,scale,frozen", [((0, 10), True, 0.5, ()), ((0, 10), False, 1.0, ("y",)),
                                                    ((5, 10), False, 0.5, ("lora_down",)), ((2, 7), True, 0.5, ("lora_up",))])
def test_one_update_on_a_frozen_out_proj_reads_its_channel_major_input_as_one_node(rows, bias, scale, frozen):
    """out_proj's LoRA on the fused mixer's channel-major output (call_channel_major; Vim: scale 1/2): one
    autograd node on y's columns whose output and gradients are the module's call on (y * scale)'s
    transpose, y's gradient channel-major, with y or either LoRA weight frozen."""
    from mambapeft.models.mamba import call_channel_major

    torch.manual_seed(0)
    module = _one_update_lora(rows, bias)
    for name in frozen:
        if name != "y":
            getattr(module.updates["x"], name).weight.requires_grad_(False)
    stored = torch.randn(6, 3, 5, requires_grad="y" not in frozen)  # (in, B, L): y channel-major
    y = stored.transpose(0, 1)
    out, nodes = _as_the_modules_call(module, ("y", stored), lambda: call_channel_major(module, y, scale),
                                      lambda: module((y * scale).transpose(1, 2)), torch.randn(3, 5, 10),
                                      3 - len(frozen))
    assert "_FrozenPlusLowRankBackward" in nodes and not nodes & {"AddBackward0", "MulBackward0", "AddmmBackward0"}
    assert out.is_contiguous()


@pytest.mark.parametrize("method", ["lora_out_proj", "prodial_out"])
def test_a_vim_mixers_out_proj_lora_reads_the_summed_directions_as_one_node(method):
    """LoRA(out_proj) and ProDiaL(out_proj) on Vim's fused bidirectional mixer (dropout off: eval) run as
    one node on the directions' sum, its average folded in (no division); a hook on the low-rank update's
    down-projection calls the module instead."""
    model = _adapted("vision", method)
    mixer = _mixers(model)[0]
    mixer.backend = FUSED_TORCH
    x = torch.randn(2, 7, mixer.d_model, requires_grad=True)
    out = mixer(x)
    (node, _), = out.grad_fn.next_functions  # (B*L, out) -> (B, L, out)
    assert type(node).__name__ == "_FrozenPlusLowRankBackward" and "DivBackward0" not in _graph_nodes(out)
    update = mixer.out_proj.low_rank if method == "prodial_out" else mixer.out_proj.updates["full"]
    update.lora_down.register_forward_hook(lambda *args: None)
    assert "_FrozenPlusLowRankBackward" not in _graph_nodes(mixer(x))


@pytest.mark.parametrize("case", ["trainable_base", "second_update", "dora", "dropout_on_cpu", "hooked_up"])
def test_the_one_node_steps_aside_where_it_would_not_be_the_modules_call(case):
    """A trainable base weight, a second update, DoRA (folded into the weight), an active dropout where
    its mask cannot be drawn from a seed (the CPU), a hook on lora_up: autograd's own graph of the same."""
    from mambapeft.models.mamba import linear_channel_major
    from mambapeft.peft.lora import LoraSpec, LowRankUpdate

    torch.manual_seed(0)
    module = _one_update_lora((0, 5), dropout=0.5 if case == "dropout_on_cpu" else 0.0)
    if case == "trainable_base":
        module.base.weight.requires_grad_(True)
    elif case == "second_update":
        module.add("z", LowRankUpdate(6, (5, 10), LoraSpec(targets=("in_proj",)), module.base.weight), "in_proj")
    elif case == "dora":
        module.updates["x"] = LowRankUpdate(6, (0, 5), LoraSpec(targets=("in_proj",), dora=True), module.base.weight)
    elif case == "hooked_up":
        module.updates["x"].lora_up.register_forward_hook(lambda *args: None)
    out = linear_channel_major(module, torch.randn(3, 5, 6, requires_grad=True))
    assert "_FrozenPlusLowRankBackward" not in _graph_nodes(out)


def test_a_frozen_out_projs_scaled_weight_is_kept_across_forwards(monkeypatch):
    """Vim's fused mixer projects its directions' sum with out_proj's weight times 1/2 (one kernel makes
    that operand): while the weight is frozen it is made once and kept, made again once the weight is
    written (an optimizer step, a load), and made in every forward where the weight trains, whose
    gradient then flows as before."""
    from mambapeft.models import mamba, scan
    from mambapeft.models.scan import mamba_inner_pair_torch

    real, made = scan.scaled_operand, []
    counted = lambda weight, scale, dtype: made.append(scale) or real(weight, scale, dtype)  # noqa: E731
    monkeypatch.setattr(mamba, "scaled_operand", counted)
    monkeypatch.setattr(scan, "scaled_operand", counted)
    torch.manual_seed(0)
    mixer = mamba.Mamba(16, d_state=4, bidirectional=True)
    mixer.backend = ScanBackend("torch", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d, mamba_inner_torch,
                                mamba_inner_pair_torch)
    mixer.out_proj.weight.requires_grad_(False)
    x = torch.randn(2, 7, 16, requires_grad=True)
    first = mixer(x)
    assert torch.equal(mixer(x), first) and made == [0.5]
    with torch.no_grad():
        mixer.out_proj.weight.mul_(2)
    assert torch.allclose(mixer(x), 2 * first) and made == [0.5, 0.5]
    mixer.out_proj.weight.requires_grad_(True)
    unfused = copy.deepcopy(mixer)
    unfused.backend = TORCH_BACKEND  # the unfused chain: out_proj called
    trained = mixer(x)
    trained.sum().backward()
    assert len(made) == 3 and torch.allclose(trained, 2 * first)
    unfused(x).sum().backward()
    torch.testing.assert_close(mixer.out_proj.weight.grad, unfused.out_proj.weight.grad)


def test_a_trained_plain_A_log_is_handed_to_the_fused_function_raw():
    """Where A_log trains and is plain (full fine-tuning), the fused function is given A_log itself
    (``InnerWeights.a_log``: -exp(A_log) computed by it, in our kernels) and the mixer computes no A;
    frozen (A kept), parametrised (read through the parametrisation) or with no gradient asked, it is
    given A; either way the same output and A_log gradient."""
    from torch.nn.utils import parametrize

    from mambapeft.models.mamba import BACKWARD, FORWARD

    torch.manual_seed(0)
    mixer = Mamba(16, d_state=4, bidirectional=True)
    mixer.backend = FUSED_TORCH
    weights = mixer._inner_weights(BACKWARD)
    assert weights.a_log and weights.A is mixer.A_b_log
    x = torch.randn(2, 7, 16)
    out = mixer(x)
    out.sum().backward()
    trained_grad = mixer.A_log.grad.clone()
    with torch.no_grad():
        assert not mixer._inner_weights(FORWARD).a_log
    mixer.A_log.requires_grad_(False)
    assert not mixer._inner_weights(FORWARD).a_log and mixer._inner_weights(FORWARD).A is mixer._state_matrix(FORWARD)
    torch.testing.assert_close(mixer(x), out)
    mixer.A_log.requires_grad_(True)
    parametrize.register_parametrization(mixer, "A_log", _Identity())
    assert not mixer._inner_weights(FORWARD).a_log
    mixer.zero_grad()
    torch.testing.assert_close(mixer(x), out)
    mixer(x).sum().backward()
    torch.testing.assert_close(mixer.parametrizations.A_log.original.grad, trained_grad)


@pytest.mark.parametrize("extension_trains", [True, False])
def test_an_additional_scans_A_log_is_handed_to_the_fused_function_raw_and_extended(extension_trains):
    """Where the extension's A_log trains (Additional-scan), the fused function is given A_log extended
    by it, raw (``InnerWeights.a_log``: -exp of both computed by the function, in our kernels), the
    extension's columns where its state order puts them; frozen, A extended (-exp in the mixer). Either
    way the same output, and the extension's A_log gradient is the unfused chain's."""
    mixer = _mixers(_adapted("vision", "additional_scan"))[0]
    mixer.backend = FUSED_TORCH
    extension = mixer.state_extensions["fwd"]
    extension.A_log.requires_grad_(extension_trains)
    weights = mixer._inner_weights(mixer.directions[0])
    assert weights.a_log == extension_trains and not mixer.A_log.requires_grad
    expected = torch.cat(extension._ordered(extension.A_log, mixer.A_log), dim=1)
    torch.testing.assert_close(weights.A, expected if extension_trains else -torch.exp(expected))
    x = torch.randn(2, 9, mixer.d_model)
    unfused = copy.deepcopy(mixer)
    unfused.backend = TORCH_BACKEND
    assert mixer.uses_fused_inner() and not unfused.uses_fused_inner()
    out, unfused_out = mixer(x), unfused(x)
    torch.testing.assert_close(out, unfused_out, rtol=1e-5, atol=1e-5)
    if extension_trains:
        out.sum().backward()
        unfused_out.sum().backward()
        torch.testing.assert_close(extension.A_log.grad, unfused.state_extensions["fwd"].A_log.grad,
                                   rtol=1e-4, atol=1e-6)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x
