"""The Transformer side of the comparison: timm's ViT (models/vit.py), its official weights, HF peft's
tuners as the hf_peft family, and the backbone-aware method check."""
import copy
from pathlib import Path

import pytest
import torch
from run_helpers import metrics, run, tiny_vision_run
from safetensors.torch import load_file

from mambapeft.method_check import backbone_family
from mambapeft.models import VIM_VARIANTS, VIT_VARIANTS, build_model, family_of
from mambapeft.models.checkpoints import CheckpointError, load_vit, save_vim, vit_weights_file
from mambapeft.models.vit import ViTConfig, VisionTransformer
from mambapeft.peft import apply_peft, check_gradients, zero_initialised
from mambapeft.report.params import count_params
from mambapeft.runspec import ConfigError, grid, method_definition, methods_for, validate_config

FIXTURES = Path(__file__).parent / "fixtures"


# Written with timm 1.0.31 itself (torch.manual_seed(0); timm.models.vision_transformer.VisionTransformer(
# img_size=16, patch_size=8, embed_dim=12, depth=2, num_heads=3, num_classes=5).eval(); its state_dict()
# saved with safetensors; the reference holds a random input and timm's pre-logits features of it).
TIMM_TINY = dict(img_size=16, patch_size=8, embed_dim=12, depth=2, num_heads=3, num_classes=5, drop_path_rate=0.0)


def test_timm_state_dict_loads_strictly_and_gives_timms_features():
    model = VisionTransformer(ViTConfig(**TIMM_TINY)).eval()
    load_vit(model, FIXTURES / "timm_vit_tiny.safetensors")
    reference = load_file(str(FIXTURES / "timm_vit_tiny_reference.safetensors"))
    with torch.no_grad():
        features = model.forward_features(reference["images"])
    torch.testing.assert_close(features, reference["features"], rtol=0, atol=1e-6)


def test_wrong_or_missing_vit_weights_are_one_line_errors(tmp_path, monkeypatch):
    save_vim(build_model("vim-mini", num_classes=4), tmp_path / "vim.pth")
    with pytest.raises(CheckpointError, match="not a timm VisionTransformer") as err:
        load_vit(build_model("vit-mini", num_classes=4), tmp_path / "vim.pth", "vit-mini")
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="Hugging Face cache .timm/vit_small_patch16_224.augreg_in1k.") as err:
        vit_weights_file(tmp_path / "absent.safetensors", "vit-s")
    assert "\n" not in str(err.value)


def test_missing_file_falls_back_to_timms_copy_in_the_hub_cache(tmp_path, monkeypatch):
    """timm's pretrained=True leaves the file in the Hugging Face cache; it is read there, offline."""
    snapshot = tmp_path / "hub" / "models--timm--vit_small_patch16_224.augreg_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert vit_weights_file(tmp_path / "absent.safetensors", "vit-s") == snapshot / "model.safetensors"


def test_vit_s_counts():
    """vit-s as timm's vit_small_patch16_224 (21,665,664 without head, counted with timm 1.0.31);
    with CIFAR-100's head 21,704,164, the paper's 21,704K for ViT-S full fine-tuning."""
    counts = {m: count_params("vit-s", m) for m in methods_for("vision", "vit-s")}
    assert counts["vit_full"]["trainable"] == VIT_VARIANTS["vit-s"].backbone_params == 21_665_664
    assert counts["vit_full"]["total"] == 21_704_164
    assert counts["vit_linear_probe"]["trainable"] == 0
    assert counts["vit_lora_qkv"]["trainable"] == 12 * 8 * (384 + 3 * 384)  # A (8x384) and B (1152x8) per block
    assert counts["vit_bias"]["trainable"] == 12 * (3 * 384 + 384 + 4 * 384 + 384)  # qkv, proj, fc1, fc2 biases
    assert counts["vit_ia3"]["trainable"] == 12 * (3 * 384 + 4 * 384)  # qkv outputs, fc2 inputs


def test_backbone_family_prefix_is_the_registered_family():
    """The torch-free check (method_check.backbone_family) agrees with the model registry."""
    for name in [*VIM_VARIANTS, *VIT_VARIANTS]:
        assert backbone_family(name) == family_of(name)


def _config(tmp_path, backbones, methods) -> dict:
    return {"results_dir": str(tmp_path / "results"), "resources_dir": str(tmp_path / "resources"),
            "data": {"vtab": {"kind": "vtab", "source": "mini"}},
            "backbones": {b: {"source": "pretrain", "path": str(tmp_path / b)} for b in backbones},
            "experiments": {"vtab": {"domain": "vision", "data": "vtab", "backbones": backbones, "tasks": ["digits"],
                                     "methods": methods, "seeds": [0]}}}


def test_each_method_runs_on_the_backbones_it_fits(tmp_path):
    config = _config(tmp_path, ["vim-mini", "vit-mini"], ["linear_probe", "lorap_x", "vit_linear_probe"])
    validate_config(config)
    assert {(r.backbone, r.method) for r in grid(config)} == {
        ("vim-mini", "linear_probe"), ("vim-mini", "lorap_x"), ("vit-mini", "vit_linear_probe")}


@pytest.mark.parametrize("backbones", [["vit-mini"], ["vim-mini"]])
def test_a_method_on_the_wrong_backbone_family_is_a_one_line_config_error(tmp_path, backbones):
    method = "lorap_x" if backbones == ["vit-mini"] else "vit_lora_qkv"
    with pytest.raises(ConfigError, match=f"method '{method}' is for .* backbones") as err:
        validate_config(_config(tmp_path, backbones, [method]))
    assert "\n" not in str(err.value) and backbones[0] in str(err.value)
    with pytest.raises(ConfigError):
        method_definition("vision", method, backbones[0], None)


def test_vit_methods_train_save_the_adapter_alone_and_evaluate_rebuilds_it(tmp_path):
    spec = copy.deepcopy(tiny_vision_run(tmp_path, "vit_lora_qkv", backbone="vit-mini"))
    spec["train"]["epochs"] = 2
    run(spec, tmp_path / "run")
    record = metrics(tmp_path / "run")
    adapter = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    lora = sorted(k for k in adapter if ".lora_" in k)
    assert lora and set(adapter) == set(lora) | {"head.weight", "head.bias"}
    assert record["trainable_params"] == sum(adapter[k].numel() for k in lora)
    assert record["status"] == "ok" and 0 <= record["value"] <= 100
    assert record["config"]["run"]["backbone"] == "vit-mini" and record["backend"] == "none"  # no scan to pick


VIT_METHODS = sorted(methods_for("vision", "vit-mini"))


def _adapted_vit(method: str, device: str = "cuda"):
    torch.manual_seed(0)
    model = build_model("vit-mini", num_classes=4)
    result = apply_peft(model, method_definition("vision", method, "vit-mini", None)["peft"], method)
    with torch.no_grad():
        model.head.weight.normal_()  # a zero head would hide every upstream gradient
    return model.to(device), result


@pytest.mark.gpu
@pytest.mark.parametrize("method", VIT_METHODS)
def test_vit_methods_train_on_cuda_as_the_trainer_places_them(method):
    """place_model on CUDA stores frozen Linears (peft's base layers too) in bf16; under bf16
    autocast the outputs stay those of fp32 storage (up to where peft casts to the base weight's
    dtype) and every trainable tensor gets its gradient."""
    from mambapeft.runtime import PERMISSIVE, place_model

    images = torch.randn(4, 3, 32, 32, device="cuda")
    reference, _ = _adapted_vit(method)
    model, result = _adapted_vit(method, "cpu")
    place_model(model, torch.device("cuda"), dict(PERMISSIVE))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, out = reference.eval()(images), model.eval()(images)
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(images).float().logsumexp(-1).mean().backward()
    check_gradients(result, [n for n in zero_initialised(result) if not n.startswith("head.")])


@pytest.mark.gpu
@pytest.mark.parametrize("method", VIT_METHODS)
def test_vit_methods_capture_as_a_cuda_graph(method):
    """runtime `cuda_graphs` (paper.yaml): a replay of the graphed step computes the eager one."""
    from mambapeft.train.vision import GraphedForward

    model, _ = _adapted_vit(method)
    model.eval()  # no dropout: replay and eager see the same computation
    images = torch.randn(4, 3, 32, 32, device="cuda")
    graphed = GraphedForward(model, [images.shape], images.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, replayed = model(images), graphed(images)
    torch.testing.assert_close(replayed.float(), eager.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["vit_lora_qkv", "vit_bias", "vit_ia3"])
def test_hf_peft_methods_merge_into_the_plain_vit(method):
    """peft's own merge folds each tuner layer; the base modules come back with timm's names."""
    from mambapeft.peft.merge import merge_method

    model, result = _adapted_vit(method, "cpu")
    members = method_definition("vision", method, "vit-mini", None)["peft"]
    with torch.no_grad():
        for p in result.trainable.values():
            p.add_(torch.randn_like(p) * 0.05)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(images)
        merge_method(model, members, method)
        merged = model(images)
    assert set(model.state_dict()) == set(build_model("vit-mini", num_classes=4).state_dict())
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
