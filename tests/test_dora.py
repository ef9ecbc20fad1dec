"""DoRA on every LoRA target: each `dora_*` row is the model unchanged at init and trains every
tensor; on a patch-embedding Conv2d and an Embedding it is the re-normalised weight as on a Linear."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mambapeft.models import build_model
from mambapeft.peft import apply_peft, check_gradients, zero_initialised
from mambapeft.peft.lora import LoraConv2d, LoraEmbedding, LoraSpec
from mambapeft.runspec import domain_file, method_definition

DORA_ROWS = [(d, m) for d in ("vision", "language") for m, entry in domain_file(d, "methods").items()
             if any(member.get("dora") for member in entry.get("peft", []))]
MINI = {"vision": ("vim-mini", {"num_classes": 4}), "language": ("mamba-mini", {"vocab_size": 64})}


@pytest.mark.parametrize("domain,method", DORA_ROWS)
def test_dora_rows_start_as_the_model_and_train_every_tensor(domain, method):
    backbone, kwargs = MINI[domain]
    model = build_model(backbone, **kwargs).eval()
    inputs = torch.randn(2, 3, 32, 32) if domain == "vision" else torch.randint(0, 64, (2, 9))
    if domain == "vision":
        with torch.no_grad():
            model.head.weight.normal_()
    with torch.no_grad():
        before = model(inputs)
    result = apply_peft(model, method_definition(domain, method, backbone, None)["peft"], method)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), before, rtol=1e-5, atol=1e-5)
    assert any(name.endswith("magnitude") for name in result.trainable)
    model(inputs).logsumexp(-1).sum().backward()
    check_gradients(result, [n for n in zero_initialised(result) if not n.startswith("head.")])


def _trained(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("base."):
                p.add_(0.1 * torch.randn_like(p))
    return module


def test_conv_dora_is_the_column_normalised_kernel():
    conv = nn.Conv2d(3, 8, 4, stride=4)
    wrapper = _trained(LoraConv2d(conv, LoraSpec(targets=("x",), rank=2, dora=True)))
    flat = conv.weight.flatten(1) + wrapper.scale * wrapper.lora_up.weight.flatten(1) @ wrapper.lora_down.weight.flatten(1)
    kernel = (wrapper.magnitude * flat / flat.norm(dim=0)).view_as(conv.weight)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(wrapper(x), F.conv2d(x, kernel, conv.bias, stride=4))


def test_embedding_dora_is_the_row_normalised_table():
    embedding = nn.Embedding(10, 6)
    wrapper = _trained(LoraEmbedding(embedding, LoraSpec(targets=("x",), rank=2, dora=True)))
    table = embedding.weight + wrapper.scale * wrapper.lora_down @ wrapper.lora_up
    table = wrapper.magnitude[:, None] * table / table.norm(dim=1, keepdim=True)
    ids = torch.randint(0, 10, (3, 5))
    torch.testing.assert_close(wrapper(ids), F.embedding(ids, table))
