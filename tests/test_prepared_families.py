"""Families that measure before they apply (``prepare`` hooks): SDT's warm-up dimension selection
and the importance-ranked LoRA/(IA)3 hybrid. Their sparse updates, their splits, and the run
contract: what was measured travels with the adapter, so evaluation rebuilds the trained model."""
import json

import pytest
import torch
from run_helpers import metrics, run

from mambapeft.build import build_trainable
from mambapeft.models import build_model
from mambapeft.peft import PeftConfigError, apply_peft
from mambapeft.peft.groups import param_groups
from mambapeft.peft.hybrid_importance import HybridImportanceSpec, split_layers
from mambapeft.peft.sdt import select_dims
from mambapeft.peft.state import read_adapter_method
from mambapeft.runspec import deep_merge, method_definition, training_spec
from mambapeft.train.optim import build_optimizer
from mambapeft.train.runner import PREPARED, Trainer


def _sdt_tensors(mixer) -> dict[str, tuple[torch.nn.Module, str]]:
    """(owner, attribute) of the tensors SDT updates in one Vim mixer."""
    return {"A_log": (mixer, "A_log"), "A_b_log": (mixer, "A_b_log"),
            "x_proj": (mixer.x_proj, "weight"), "x_proj_b": (mixer.x_proj_b, "weight")}


def test_frozen_dimensions_stay_bit_identical_under_adamw_weight_decay():
    torch.manual_seed(0)
    model = build_model("vim-mini", num_classes=4)
    with torch.no_grad():
        model.head.weight.normal_()
    mixer = model.layers[1].mixer
    pretrained = {n: getattr(*where).detach().clone() for n, where in _sdt_tensors(mixer).items()}
    # decay on the sparse values too: AdamW's decoupled decay must not reach a single frozen entry
    result = apply_peft(model, [{"family": "sdt", "weight_decay_mult": 1.0}], "sdt")
    optimizer = build_optimizer(param_groups(model, result, {"lr": 1e-2, "weight_decay": 0.5}),
                                {"name": "adamw", "lr": 1e-2, "weight_decay": 0.5, "betas": [0.9, 0.999], "eps": 1e-8})
    for _ in range(3):
        model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, (owner, attr) in _sdt_tensors(mixer).items():
        changed = (getattr(owner, attr).detach().view(torch.int32) != pretrained[name].view(torch.int32)).flatten()
        tuned = torch.zeros_like(changed)
        tuned[owner.parametrizations[attr][0].index] = True
        assert tuned.sum() < tuned.numel() / 4, name
        assert not changed[~tuned].any(), f"{name}: a frozen entry changed (bits)"
        assert changed[tuned].all(), f"{name}: a tuned entry did not train"


def test_dims_are_the_channels_and_states_that_changed_most():
    change = torch.zeros(6, 4)  # (D_inner, N)
    change[4] = torch.tensor([0.1, 3.0, 0.0, 2.0])  # largest channel; its states 1 and 3
    change[1] = torch.tensor([1.0, 0.0, 1.5, 0.0])  # second; states 2 and 0
    change[5, 0] = 0.5
    assert select_dims(change, n_channels=2, n_states=2) == [1 * 4 + 0, 1 * 4 + 2, 4 * 4 + 1, 4 * 4 + 3]


def test_measurements_from_another_model_are_refused():
    with pytest.raises(PeftConfigError, match="mixer directions"):
        apply_peft(build_model("vim-mini", num_classes=4), [{"family": "sdt", "dims": [[0, 1]]}], "sdt")
    with pytest.raises(PeftConfigError, match="3 values for 4 layers"):
        apply_peft(build_model("vim-mini", num_classes=4),
                   [{"family": "hybrid_importance", "importance": [1.0, 2.0, 3.0]}], "hybrid_importance")


def test_importance_split_by_thirds_and_by_budget():
    model = build_model("vim-mini", num_classes=4)  # 4 blocks
    thirds = split_layers(model, HybridImportanceSpec(importance=(0.1, 0.4, 0.3, 0.2)))
    assert (thirds.lora, thirds.ia3, thirds.frozen) == ((1, 2), (3,), (0,))
    three = {"layers": (0, 1, 2), "importance": (0.5, 0.1, 0.9)}
    lora_cost, ia3_cost = 8 * (48 + 192), 192  # in_proj 48 -> 192 on vim-mini
    budgeted = split_layers(model, HybridImportanceSpec(split="budget", budget=lora_cost + ia3_cost, **three))
    assert budgeted == split_layers(model, HybridImportanceSpec(**three))  # the thirds' count: the thirds' split
    assert (budgeted.lora, budgeted.ia3, budgeted.frozen) == ((2,), (0,), (1,))
    only_ia3 = split_layers(model, HybridImportanceSpec(split="budget", budget=2 * ia3_cost, **three))
    assert (only_ia3.lora, only_ia3.ia3) == ((), (0, 2))
    with pytest.raises(PeftConfigError, match="budget"):
        split_layers(model, HybridImportanceSpec(split="budget", budget=10, **three))


@pytest.mark.parametrize("member", [{"family": "sdt"}, {"family": "hybrid_importance", "importance": [1, 3, 2, 0]}])
def test_both_merge_into_the_plain_weights(member):
    from mambapeft.peft.merge import merge_method

    model = build_model("mamba-mini", vocab_size=64)
    result = apply_peft(model, [member], "method")
    with torch.no_grad():
        for p in result.trainable.values():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        expected = model.eval()(ids)
        merge_method(model, [member], "method")
        got = model(ids)
    assert set(model.state_dict()) == set(build_model("mamba-mini", vocab_size=64).state_dict())
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def _with_method(spec: dict, method: str) -> dict:
    definition = method_definition("vision", method, "vim-mini", None)
    train = deep_merge(spec["train"], definition.pop("train"))
    return {**spec, "run": {**spec["run"], "method": method}, "method": definition, "train": train}


@pytest.fixture(scope="module")
def tiny_sdt(tmp_path_factory):
    from run_helpers import tiny_vision_run

    return tiny_vision_run(tmp_path_factory.mktemp("prepared"), "sdt")


@pytest.mark.parametrize("method,measured", [("sdt", "dims"), ("hybrid_importance", "importance")])
def test_evaluation_rebuilds_the_trained_model_from_its_adapter(tiny_sdt, tmp_path, method, measured):
    spec = {**_with_method(tiny_sdt, method), "output_dir": str(tmp_path)}
    trainer = Trainer(training_spec(spec))
    record = trainer.run()
    assert not (tmp_path / PREPARED).exists()  # removed with the checkpoint
    member = read_adapter_method(tmp_path / "adapter.safetensors")["peft"][0]
    assert member[measured] is not None and member[measured] == trainer.members[0][measured]
    assert record["prepared"][method]  # what was measured, in train.json
    rebuilt = build_trainable(spec, torch.device("cpu"), adapter=tmp_path / "adapter.safetensors")
    assert rebuilt.counts()["trainable"] == record["trainable_params"]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.model.eval()(images), trainer.model.eval()(images))
    if method == "sdt":  # training updated exactly the measured entries
        assert trainer.model.layers[0].mixer.parametrizations.A_log[0].index.tolist() == member["dims"][0]


def test_importance_and_split_are_recorded_and_evaluated(tiny_sdt, tmp_path):
    spec = _with_method(tiny_sdt, "hybrid_importance")
    run(spec, tmp_path)
    record = metrics(tmp_path)
    assert record["status"] == "ok" and 0 <= record["value"] <= 100
    prepared = record["prepared"]["hybrid_importance"]
    assert prepared["batches"] == 4 and len(prepared["importance"]) == 4
    assert sorted(prepared["lora_layers"] + prepared["ia3_layers"] + prepared["frozen_layers"]) == [0, 1, 2, 3]
    ranked = sorted(prepared["importance"], key=lambda layer: -prepared["importance"][layer])
    assert sorted(map(int, ranked[:2])) == prepared["lora_layers"]
    assert json.loads(json.dumps(prepared)) == prepared


def test_a_resumed_run_does_not_measure_again(tiny_sdt, tmp_path, monkeypatch):
    spec = training_spec({**_with_method(tiny_sdt, "sdt"), "output_dir": str(tmp_path)})
    first = Trainer(spec).members
    assert (tmp_path / PREPARED).is_file()
    monkeypatch.setattr(Trainer, "warm_up", lambda *args: pytest.fail("the warm-up ran again"))
    assert Trainer(spec).members == first


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["sdt", "hybrid_importance"])
def test_measuring_training_and_rebuilding_on_the_cuda_kernels(tiny_sdt, tmp_path, method):
    """The prepare hooks on the GPU: the warm-up copy placed as training places it (bf16 frozen
    Linears, CUDA scan), then training and the rebuild from the adapter on the same kernels."""
    from mambapeft.models.scan import cuda_kernels_available

    if not cuda_kernels_available():
        pytest.skip("needs the mamba-ssm CUDA kernels")
    spec = {**_with_method(tiny_sdt, method), "output_dir": str(tmp_path)}
    spec["runtime"] = {**spec["runtime"], "device": "cuda", "scan_backend": "cuda"}
    trainer = Trainer(training_spec(spec))
    record = trainer.run()
    assert record["status"] == "ok" and record["prepared"][method]
    # both run the fused function (recorded so): hybrid_importance leaves a layer's mixer plain; SDT's
    # parametrised A_log and x_proj are read through their parametrisations, its LoRA'd out_proj called
    assert record["backend"] == "cuda-fused"
    rebuilt = build_trainable(spec, torch.device("cuda"), adapter=tmp_path / "adapter.safetensors")
    images = torch.randn(3, 3, 32, 32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected, got = trainer.model.eval()(images).float(), rebuilt.model.eval()(images).float()
    assert float((got - expected).norm() / expected.norm().clamp_min(1e-12)) <= 1e-3
