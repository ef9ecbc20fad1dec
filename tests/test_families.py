"""Every registered PEFT family, whatever it is: its spec, its schema, identity at init, gradients,
and its adapter on disk. A new family is covered here by being registered and used in a methods.yaml."""
from dataclasses import MISSING, fields

import pytest
import torch

from mambapeft.models import build_model
from mambapeft.peft import apply_peft, check_gradients, zero_initialised
from mambapeft.peft.registry import SpecBase, discover_families
from mambapeft.peft.schema import schema_path, schema_text
from mambapeft.peft.state import load_adapter, read_adapter_method, save_adapter
from mambapeft.runspec import methods_for

FAMILIES = discover_families()
MINI_BACKBONES = {"vision": ("vim-mini", "vit-mini"), "language": ("mamba-mini",)}


def example(family: str) -> tuple[str, dict]:
    """(mini backbone, member): the first use of the family in vision/ or language/methods.yaml, on
    the first mini backbone its method fits."""
    for domain, backbones in MINI_BACKBONES.items():
        for backbone in backbones:
            for definition in methods_for(domain, backbone).values():
                for member in definition.get("peft", []):
                    if member["family"] == family:
                        return backbone, member
    pytest.fail(f"PEFT family {family!r} is used by no method in vision/ or language/methods.yaml: add one")


def model_and_inputs(backbone: str):
    if backbone in MINI_BACKBONES["vision"]:
        model = build_model(backbone, num_classes=4)
        with torch.no_grad():
            model.head.weight.normal_()  # a zero head would hide every upstream change and gradient
        return model, torch.randn(3, 3, 32, 32)
    return build_model("mamba-mini", vocab_size=64), torch.randint(0, 64, (2, 13))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_spec_fields_have_defaults_docs_and_a_schema(name):
    family = FAMILIES[name]
    assert issubclass(family.spec_cls, SpecBase)
    assert all(f.default is not MISSING for f in fields(family.spec_cls)), "every spec field needs a default"
    from mambapeft.peft.schema import member_schema

    properties = member_schema(family)["properties"]
    assert all(properties[f.name]["description"] for f in fields(family.spec_cls)), "every field needs a docstring"
    backbone, member = example(name)
    family.spec_cls(**{k: v for k, v in member.items() if k != "family"})


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_is_identity_at_init_reaches_the_loss_and_round_trips(name, tmp_path):
    backbone, member = example(name)
    model, inputs = model_and_inputs(backbone)
    model.eval()
    with torch.no_grad():
        before = model(inputs)
    result = apply_peft(model, [member], name)
    with torch.no_grad():
        after = model(inputs)
    if FAMILIES[name].identity_at_init:
        assert torch.allclose(after, before, rtol=1e-5, atol=1e-5), "identity_at_init families must not change outputs"
    zero = [n for n in zero_initialised(result) if not n.startswith("head.")]
    model.train()
    model(inputs).float().logsumexp(-1).mean().backward()
    check_gradients(result, zero)

    with torch.no_grad():  # trained-looking tensors, so the round trip is not trivially zeros
        for p in result.trainable.values():
            p.add_(torch.randn_like(p) * 0.01)
    save_adapter(tmp_path / "adapter.safetensors", result, {"id": name, "peft": [member]})
    model.eval()
    with torch.no_grad():
        expected = model(inputs)
    torch.manual_seed(123)  # a fresh model whose random parts differ
    fresh, _ = model_and_inputs(backbone)
    fresh_result = apply_peft(fresh, read_adapter_method(tmp_path / "adapter.safetensors")["peft"], name)
    load_adapter(fresh_result, tmp_path / "adapter.safetensors")
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in result.trainable}, strict=False)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(inputs), expected, atol=1e-6)


def test_the_committed_member_schema_is_current():
    assert schema_path().read_text() == schema_text(), (
        "workflow/schemas/peft_members.schema.json is stale: run `mambapeft peft-schema`")
