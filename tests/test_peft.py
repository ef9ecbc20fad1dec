"""PEFT methods: exact counts, trainability, zero-init identity, adapters on disk, composition."""
import copy
import json

import pytest
import torch

from mambapeft.cli import _user_errors, main as cli
from mambapeft.models import build_model
from mambapeft.peft import PeftConfigError, apply_peft, check_gradients, zero_initialised
from mambapeft.peft.lora import LoraLinear, merge_lora
from mambapeft.peft.state import AdapterError, load_adapter, read_adapter_method, save_adapter
from mambapeft.report.params import count_params
from mambapeft.runspec import domain_file, method_definition, methods_for

VISION = methods_for("vision", "vim-mini")  # the ViT rows: tests/test_vit.py
LANGUAGE = domain_file("language", "methods")

# The original code's Vim-S counts (reference §3 and §9), without the classification head.
VIM_S_COUNTS = {
    "lorap_x": 1_769_472, "lorap_z": 1_769_472, "lora_in_proj": 1_474_560, "lora_out_proj": 2_654_208,
    "lora_x_proj": 2_531_328, "lora_dt_proj": 2_433_024, "lorap_d": 2_433_024, "lorap_b": 2_408_448,
    "lorap_c": 2_408_448, "parallel_adapter": 663_552, "additional_scan": 663_552, "affix_noproj": 221_184,
    "affix": 115_685_376, "prompt_noproj": 3_072, "prompt": 298_752, "conv1d": 147_456, "a": 589_824,
    "d": 36_864, "bias": 36_864, "cls_token": 384, "pos_embed": 75_648, "lora_embed": 36_864,
    "linear_probe": 0, "full": 25_411_584, "scratch": 25_411_584, "all": 118_780_800,
}
# Language counts behind the paper's percentages (reference §7.2).
LM_COUNTS = {
    ("mamba-130m", "lorap_x"): 3_538_944, ("mamba-130m", "additional_scan"): 663_552,
    ("mamba-130m", "affix_noproj"): 221_184, ("mamba-130m", "lora_sll"): 1_898_304,
    ("mamba-130m", "lora_in_proj"): 2_949_120, ("mamba-1.4b", "lorap_x"): 18_874_368,
    ("mamba-1.4b", "additional_scan"): 3_538_944, ("mamba-1.4b", "affix_noproj"): 1_179_648,
    ("mamba-1.4b", "lora_sll"): 66_755_072, ("mamba-1.4b", "lora_in_proj"): 15_728_640,
}
PAPER_PCT = {("mamba-130m", "lorap_x"): 2.67, ("mamba-130m", "affix"): 64.64, ("mamba-1.4b", "lora_sll"): 4.64,
             ("mamba-1.4b", "affix_noproj"): 0.09, ("mamba-1.4b", "additional_scan"): 0.26}


@pytest.mark.parametrize("method,expected", sorted(VIM_S_COUNTS.items()))
def test_vim_s_counts_equal_the_original(method, expected):
    assert count_params("vim-s", method)["trainable"] == expected


@pytest.mark.parametrize("key,expected", sorted(LM_COUNTS.items()))
def test_language_counts(key, expected):
    assert count_params(*key)["trainable"] == expected


@pytest.mark.parametrize("key,pct", sorted(PAPER_PCT.items()))
def test_language_percentages_match_the_paper(key, pct):
    assert round(count_params(*key)["trainable_pct"], 2) == pct


def test_params_command_prints_one_json_object(capsys):
    assert cli(["params", "--backbone", "vim-s", "--method", "lorap_x", "--num-classes", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"backbone": "vim-s", "method": "lorap_x", "trainable": 1_769_472, "head": 3_850,
                   "total": out["total"], "trainable_pct": out["trainable_pct"]}
    assert out["total"] == 25_411_584 + 3_850 + 1_769_472


def mini(family):
    return build_model("vim-mini", num_classes=4) if family == "vision" else build_model("mamba-mini", vocab_size=64)


def members(domain, method, backbone):
    return method_definition(domain, method, backbone, None)["peft"]


@pytest.mark.parametrize("method", sorted(VISION))
def test_vision_method_trains_only_its_parameters(method):
    model = mini("vision")
    pretrained = {id(p): n for n, p in model.named_parameters() if not n.startswith("head.")}
    definition = members("vision", method, "vim-mini")
    result = apply_peft(model, definition, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(result.trainable)
    assert {"head.weight", "head.bias"} <= trainable
    unfrozen = {pretrained[id(p)] for p in result.trainable.values() if id(p) in pretrained}
    if any(m["family"] == "full" for m in definition):
        assert unfrozen == set(pretrained.values())
    else:  # a pretrained tensor trains only when a member unfreezes it directly
        direct = [m for m in definition if m.get("mode") == "direct"]
        assert bool(unfrozen) == bool(direct)
        assert all(n.endswith("dt_proj.bias") or n.endswith("dt_proj_b.bias") for n in unfrozen)


ZERO_INIT = ["lora_in_proj", "lorap_x", "lorap_z", "lora_out_proj", "lora_x_proj", "lora_dt_proj", "lorap_d",
             "lorap_b", "lorap_c", "lora_embed", "parallel_adapter", "a", "d", "conv1d", "bias", "cls_token",
             "pos_embed", "lorap_x_dora"]


@pytest.mark.parametrize("method", ZERO_INIT)
def test_zero_initialised_vision_methods_leave_outputs_unchanged(method):
    model = mini("vision").eval()
    with torch.no_grad():
        model.head.weight.normal_()
    images = torch.randn(3, 3, 32, 32)
    before = model(images)
    apply_peft(model, members("vision", method, "vim-mini"), method)
    assert torch.allclose(model.eval()(images), before, rtol=1e-5, atol=1e-5)  # DoRA re-normalises: rounding


@pytest.mark.parametrize("method", ["ia3", "lora_ia3", "lora_sll", "lorap_x", "lora_in_proj"])
def test_zero_initialised_language_methods_leave_outputs_unchanged(method):
    model = mini("language").eval()
    ids = torch.randint(0, 64, (2, 11))
    before = model(ids)
    apply_peft(model, members("language", method, "mamba-mini"), method)
    assert torch.allclose(model.eval()(ids), before, atol=1e-6)


@pytest.mark.parametrize("method", sorted(VISION))
def test_every_vision_method_reaches_the_loss(method):
    model = mini("vision")
    result = apply_peft(model, members("vision", method, "vim-mini"), method)
    zero = zero_initialised(result)
    with torch.no_grad():
        model.head.weight.normal_()  # after the first step the head is no longer zero
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    check_gradients(result, [n for n in zero if not n.startswith("head.")])


@pytest.mark.parametrize("method", sorted(LANGUAGE))
def test_every_language_method_reaches_the_loss_and_generates(method):
    model = mini("language")
    result = apply_peft(model, members("language", method, "mamba-mini"), method)
    ids = torch.randint(0, 64, (2, 50))
    if result.trainable:  # zero_shot trains nothing
        model(ids).logsumexp(-1).mean().backward()
        check_gradients(result, zero_initialised(result))
    model.eval()
    with torch.no_grad():  # step mode (generation) equals the parallel forward, whatever the method
        full = model(ids)
        states = model.empty_states(2)
        model(ids[:, :30], states)
        stepped = torch.stack([model._step_token(ids[:, t], t, states) for t in range(30, 50)], 1)
    assert torch.allclose(stepped, full[:, 30:], atol=1e-4)


def test_skipped_adapter_is_detected():
    model = mini("vision")
    result = apply_peft(model, members("vision", "lorap_x", "vim-mini"), "lorap_x")
    mixer = model.layers[0].mixer
    mixer.in_proj = mixer.in_proj.base  # what a fused kernel reading raw weights would do
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    with pytest.raises(RuntimeError, match=r"layers\.0\.mixer\.in_proj\.updates\.x\.lora_down\.weight"):
        check_gradients(result)


@pytest.mark.parametrize("method", ["lorap_x", "additional_scan", "affix", "hybrid_noproj", "prompt", "a"])
def test_adapter_round_trip_reproduces_outputs(tmp_path, method):
    definition = members("vision", method, "vim-mini")
    base = mini("vision")
    trained = copy.deepcopy(base)
    result = apply_peft(trained, definition, method)
    with torch.no_grad():
        for p in result.trainable.values():
            p.add_(torch.randn_like(p) * 0.05)
    save_adapter(tmp_path / "adapter.safetensors", result, {"id": method, "peft": definition})
    fresh = copy.deepcopy(base)
    fresh_result = apply_peft(fresh, read_adapter_method(tmp_path / "adapter.safetensors")["peft"], method)
    load_adapter(fresh_result, tmp_path / "adapter.safetensors")
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(trained.eval()(images), fresh.eval()(images))
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "adapter.safetensors"))) == set(result.trainable)


def test_adapter_for_another_method_is_refused(tmp_path):
    model = mini("vision")
    result = apply_peft(model, members("vision", "lorap_x", "vim-mini"), "lorap_x")
    save_adapter(tmp_path / "a.safetensors", result, {"id": "lorap_x"})
    other = mini("vision")
    other_result = apply_peft(other, members("vision", "lorap_z", "vim-mini"), "lorap_z")
    with pytest.raises(AdapterError, match="does not fit"):
        load_adapter(other_result, tmp_path / "a.safetensors")


def _adapter_cut_short(path):
    result = apply_peft(mini("vision"), members("vision", "lorap_x", "vim-mini"), "lorap_x")
    save_adapter(path, result, {"id": "lorap_x"})
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _plain_safetensors(path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(path))


@pytest.mark.parametrize("write, problem, remedy", [
    (_adapter_cut_short, "cannot be read as an adapter (SafetensorError", "re-run the training job"),
    (_plain_safetensors, "is not a mambapeft adapter", "`mambapeft train` job writes"),
])
def test_a_bad_adapter_file_is_a_user_error_naming_it(tmp_path, write, problem, remedy):
    """A user error is one line from the CLI, not a traceback: `lm-eval --model_args adapter=...` reads any file."""
    path = tmp_path / "adapter.safetensors"
    write(path)
    with pytest.raises(_user_errors()) as refused:
        read_adapter_method(path)
    message = str(refused.value)
    assert message.startswith(str(path)) and problem in message and remedy in message and "\n" not in message


def test_merged_lora_gives_equal_outputs():
    model = mini("vision")
    result = apply_peft(model, members("vision", "hybrid_noproj", "vim-mini"), "hybrid_noproj")
    with torch.no_grad():
        for p in result.trainable.values():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    before = model(images)
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert torch.allclose(model(images), before, atol=1e-5)


def test_unknown_method_lists_the_valid_ids():
    with pytest.raises(Exception, match="lorap_x"):
        method_definition("vision", "lora_everything", "vim-s", None)


def test_bad_member_keys_and_targets_fail_before_training():
    model = mini("vision")
    with pytest.raises(PeftConfigError, match="unknown key.*rnak.*valid keys"):
        apply_peft(model, [{"family": "lora", "targets": ["mixer.in_proj"], "rnak": 4}], "typo")
    with pytest.raises(PeftConfigError, match="valid families"):
        apply_peft(model, [{"family": "lorra"}], "typo")
    with pytest.raises(PeftConfigError, match="No module matches.*nearest"):
        apply_peft(mini("vision"), [{"family": "lora", "targets": ["mixer.inproj"]}], "typo")
    with pytest.raises(PeftConfigError, match="claimed by both"):
        apply_peft(mini("vision"), [{"family": "full"}, {"family": "partial", "targets": ["cls_token"], "mode": "direct"}], "x")
    with pytest.raises(PeftConfigError, match="already has a LoRA update on part 'x'"):
        apply_peft(mini("vision"), [{"family": "lora", "targets": ["mixer.in_proj"], "part": "x"}] * 2, "x")


def test_suffix_targets_are_not_substrings():
    model = mini("vision")
    result = apply_peft(model, [{"family": "lora", "targets": ["mixer.x_proj"], "style": "merged"}], "x_only")
    names = [n for n in result.trainable if "x_proj" in n]
    assert names and all("x_proj_b" not in n for n in names)  # `x_proj` does not match `x_proj_b`


def test_delta_parametrisation_decays_toward_pretrained():
    """The v2 delta starts at 0, so weight decay pulls A_log back to its pretrained value."""
    model = mini("vision")
    pretrained = model.layers[0].mixer.A_log.detach().clone()
    result = apply_peft(model, members("vision", "a", "vim-mini"), "a")
    delta = next(p for n, p in result.trainable.items() if n.startswith("layers.0.mixer.parametrizations.A_log"))
    with torch.no_grad():
        delta.fill_(0.3)
    optimizer = torch.optim.AdamW([delta], lr=0.1, weight_decay=1.0)
    for _ in range(50):
        delta.grad = torch.zeros_like(delta)
        optimizer.step()
    assert torch.allclose(model.layers[0].mixer.A_log, pretrained, atol=0.01)


@pytest.mark.parametrize("domain,method", [("language", "affix"), ("vision", "affix")])
def test_projected_affix_trains_over_several_steps(domain, method):
    """The projected tokens are recomputed every forward pass, whichever entry point is used."""
    model = mini(domain)
    apply_peft(model, members(domain, method, "vim-mini" if domain == "vision" else "mamba-mini"), method)
    for _ in range(3):
        if domain == "vision":
            model(torch.randn(2, 3, 32, 32)).sum().backward()
        else:
            model.forward_hidden(torch.randint(0, 64, (2, 9))).sum().backward()
