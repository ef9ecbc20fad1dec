"""Frozen Linear weights stored in bf16 give the same bf16-autocast training as fp32 storage."""
import copy

import pytest
import torch

from mambapeft.models import build_model
from mambapeft.peft import apply_peft
from mambapeft.runspec import domain_file, method_definition, methods_for
from mambapeft.models.precision import (
    frozen_linear_parameters,
    keep_ssm_parameters_in_fp32,
    store_frozen_linears_in_bf16,
)

VISION = sorted(methods_for("vision", "vim-mini"))  # the ViT rows: tests/test_vit.py
LANGUAGE = sorted(domain_file("language", "methods"))


def _pair(domain: str, method: str):
    """The same adapted mini model twice, the second with its frozen Linears in bf16."""
    torch.manual_seed(0)
    if domain == "vision":
        model = build_model("vim-mini", num_classes=4)
        backbone = "vim-mini"
    else:
        model = build_model("mamba-mini", vocab_size=64)
        backbone = "mamba-mini"
    result = apply_peft(model, method_definition(domain, method, backbone, None)["peft"], method)
    with torch.no_grad():  # non-zero updates, so a LoRA's folded weight differs from its base
        for p in result.trainable.values():
            p.add_(0.01 * torch.randn_like(p))
    stored = copy.deepcopy(model)
    store_frozen_linears_in_bf16(stored)
    return model.eval(), stored.eval()


def _run(model, inputs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs)
    if out.requires_grad:  # zero_shot trains nothing
        out.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("domain,method", [("vision", m) for m in VISION] + [("language", m) for m in LANGUAGE])
def test_bf16_storage_is_bitwise_the_autocast_computation(domain, method):
    model, stored = _pair(domain, method)
    inputs = torch.randn(2, 3, 32, 32) if domain == "vision" else torch.randint(0, 64, (2, 24))
    out, grads = _run(model, inputs)
    out_stored, grads_stored = _run(stored, inputs)
    assert torch.equal(out, out_stored)
    assert grads.keys() == grads_stored.keys()
    for name, grad in grads.items():
        assert (grad is None) == (grads_stored[name] is None), name
        assert grad is None or torch.equal(grad, grads_stored[name]), name


def _moved(model) -> set[str]:
    ids = {id(p) for p in frozen_linear_parameters(model)}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}


def test_only_plain_frozen_linears_move():
    model = build_model("mamba-mini", vocab_size=64)
    apply_peft(model, method_definition("language", "lora_in_proj", "mamba-mini", None)["peft"], "lora_in_proj")
    moved = _moved(model)
    layer = "backbone.layers.0.mixer."
    assert {layer + "in_proj.base.weight", layer + "x_proj.weight", layer + "dt_proj.weight",
            layer + "out_proj.weight"} <= moved
    kept = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in moved]
    # embeddings and the LM head tied to them, norms, convolutions, A_log, D and biases stay fp32; so does LoRA
    assert all(any(k in n for k in ("embedding", "lm_head", "norm", "conv1d", "A_log", ".D", "lora_", "bias"))
               for n in kept), kept
    assert layer + "dt_proj.bias" in kept  # the fused mixer kernel reads it in fp32
    assert "lm_head.weight" in kept and "backbone.embedding.weight" in kept
    expected = sum(p.numel() for p in frozen_linear_parameters(model))
    assert store_frozen_linears_in_bf16(model) == expected
    assert frozen_linear_parameters(model) == []  # a second call moves nothing
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n in moved)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n not in moved)


@pytest.mark.parametrize("method,kept", [("lora_x_proj", "x_proj.base.weight"), ("bias", "dt_proj.bias"),
                                         ("lorap_x_dora", "in_proj.base.weight")])
def test_weights_a_method_reads_or_trains_stay_fp32(method, kept):
    model = build_model("vim-mini", num_classes=4)
    apply_peft(model, method_definition("vision", method, "vim-mini", None)["peft"], method)
    moved = _moved(model)
    assert moved, "some frozen Linear should move"
    assert not any(n.endswith(kept) for n in moved)


def test_a_bf16_model_keeps_its_ssm_parameters_in_fp32_as_mamba_ssm():
    """What bench generate runs: every other tensor bf16, A_log and D fp32 (no cast kernel per step)."""
    model = build_model("mamba-mini", vocab_size=64)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.to(torch.bfloat16)
    keep_ssm_parameters_in_fp32(model)
    for name, p in model.named_parameters():
        ssm = name.rsplit(".", 1)[-1] in ("A_log", "D")
        assert p.dtype == (torch.float32 if ssm else torch.bfloat16), name
        if ssm:  # restored from bf16: the bf16 rounding of the original values, now held in fp32
            assert torch.equal(p, reference[name].to(torch.bfloat16).float()), name
