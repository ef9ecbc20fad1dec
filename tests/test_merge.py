"""Merging a trained method into the weights (`mambapeft merge`) and the Orca-Math data it is
first used for: merged logits equal the adapter model's; transformers and our mamba_ssm loader
read the exported directories and give the same logits; unmergeable methods are refused by name,
at config time too; an adapter training did not write for the run (swapped, no or a diverged
train.json, another method's) is refused; Orca-Math copies in each published layout read the same records."""
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from mambapeft.build import build_trainable
from mambapeft.cli import build_parser, main as cli
from mambapeft.data.orca_math import FIELDS, STANDIN_FILE, check_orca_math, corpus_entry, write_mini_orca_math
from mambapeft.data.text_corpus import iter_texts
from mambapeft.data.token_cache import load_tokens, tokenize_corpus
from mambapeft.data.tokenizer import build_tokenizer
from mambapeft.export import HF_DIR, MAMBA_SSM_DIR, MERGE_RECORD, write_layouts
from mambapeft.io import write_record_atomic
from mambapeft.models import build_model
from mambapeft.models.checkpoints import MAMBA_SSM_FIELDS, build_lm_from_dir, save_lm
from mambapeft.peft import PeftConfigError, apply_peft
from mambapeft.peft.merge import check_mergeable, merge_method
from mambapeft.peft.registry import discover_families
from mambapeft.peft.state import AdapterError
from mambapeft.runspec import (ADAPTER, TRAIN_RECORD, ConfigError, Run, method_definition, resolve_run, training_spec,
                               validate_config)
from mambapeft.train.orca_math import split_documents

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")

MEMBERS = {  # every mergeable family on the LM, tied head and embedding update included
    "lora_orca": [{"family": "lora", "targets": ["mixer.x_proj", "backbone.embedding", "mixer.in_proj",
                                                 "mixer.out_proj"], "rank": 4, "scale": 0.125}],
    "lora_sll": method_definition("language", "lora_sll", "mamba-mini", None)["peft"],
    "lora_ia3": method_definition("language", "lora_ia3", "mamba-mini", None)["peft"],
    "partial": [{"family": "partial", "targets": ["mixer.A_log", "mixer.D", "mixer.conv1d.weight"]}],
    "full": [{"family": "full"}],
}


def _trained(members: list[dict], vocab_size: int = 64):
    """A mini LM with ``members`` applied and every trainable tensor moved off its initial value."""
    model = build_model("mamba-mini", vocab_size=vocab_size, n_layer=2)
    result = apply_peft(model, members, "method")
    with torch.no_grad():
        for p in result.trainable.values():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("method", sorted(MEMBERS))
def test_merged_logits_equal_the_adapter_models(method):
    model = _trained(MEMBERS[method])
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        expected = model(ids)
        merge_method(model, MEMBERS[method], method)
        got = model(ids)
    plain = build_model("mamba-mini", vocab_size=64, n_layer=2)
    assert set(model.state_dict()) == set(plain.state_dict())  # nothing of the method is left
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_an_embedding_update_unties_the_head_and_leaves_it_pretrained():
    model = _trained(MEMBERS["lora_orca"])
    pretrained_head = model.lm_head.weight.detach().clone()
    merge_method(model, MEMBERS["lora_orca"], "lora_orca")
    assert not model.config.tie_embeddings
    assert torch.equal(model.lm_head.weight, pretrained_head)


@pytest.mark.parametrize("method,family", [("affix_noproj", "affix"), ("additional_scan", "additional_scan"),
                                           ("prefix", "input_tokens"), ("periodic", "input_tokens")])
def test_an_unmergeable_method_is_refused_by_name(method, family):
    with pytest.raises(PeftConfigError, match=rf"method '{method}' cannot be merged.*family '{family}'"):
        check_mergeable(method_definition("language", method, "mamba-mini", None)["peft"], method)


# how `mambapeft merge --help` names each PEFT family (registry name -> its words in the description)
FAMILY_WORDS = {"lora": "LoRA", "ia3": "(IA)3", "partial": "partial", "full": "full tuning", "prodial": "ProDiaL",
                "sdt": "SDT", "hybrid_importance": "hybrid by importance", "hf_peft": "peft's tuners",
                "affix": "affix", "prompt": "prompt", "input_tokens": "input-token", "additional_scan": "additional-scan",
                "state_offset": "state-offset", "parallel_adapter": "parallel-adapter"}


def test_merges_help_names_the_families_that_fold_and_those_that_cannot():
    """The description is prose: a family registered with (or without) a merge, or a new family, must reach it."""
    families = discover_families()
    assert set(FAMILY_WORDS) == set(families), "name each registered family in FAMILY_WORDS and in merge's help"
    description = " ".join(build_parser()._subparsers._group_actions[0].choices["merge"].description.split())
    folds, cannot = description.split(" fold; ")[0], description.split(" fold; ")[1].split(")")[0]
    for name, family in families.items():
        assert FAMILY_WORDS[name] in (folds if family.merge else cannot), name


def _orca_config(root, methods: list[str]) -> dict:
    """One merged Orca-Math experiment on a mini LM at ``root/lm``, data at ``root/data``."""
    return {"results_dir": str(root / "results"), "resources_dir": str(root / "resources"), "device": "cpu",
            "scan_backend": "torch",
            "data": {"orca": {"kind": "orca_math", "source": "mini", "n_train": 6, "root": str(root / "data")}},
            "backbones": {"mamba-mini": {"source": "pretrain", "path": str(root / "lm")}},
            "experiments": {"orca": {"domain": "language", "data": "orca", "backbones": ["mamba-mini"],
                                     "tasks": ["orca_math_200k"], "methods": methods, "seeds": [0], "merge": True,
                                     "train": {"epochs": 1, "batch_size": 1, "micro_batch_size": 1, "val_size": 0,
                                               "select": "final", "schedule": {"warmup_steps": 0}},
                                     "method_overrides": {"lora_orca": {"lora": {"rank": 4}}}}}}


def test_a_merged_experiment_with_an_unmergeable_method_fails_at_config_time(tmp_path):
    config = _orca_config(tmp_path, ["lora_orca", "affix_noproj"])
    with pytest.raises(ConfigError, match=r"experiments/orca/merge: method 'affix_noproj' cannot be merged.*"
                                          r"family 'affix'"):
        validate_config(config)


def _tokenizer(tmp_path, texts):
    path = tmp_path / "tokenizer.json"
    build_tokenizer(texts, vocab_size=320, path=path)
    return path


def test_transformers_and_mamba_ssm_layouts_give_the_merged_logits(tmp_path):
    tokenizer_path = _tokenizer(tmp_path, ["Mia has 3 apples. She buys 2 more apples."] * 20)
    model = _trained(MEMBERS["lora_orca"], vocab_size=320)
    merge_method(model, MEMBERS["lora_orca"], "lora_orca")
    write_layouts(model, str(tokenizer_path), tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / HF_DIR).eval()
    text = "Mia has 3 apples."
    ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(tmp_path / "out" / HF_DIR)(text)["input_ids"]])
    with torch.no_grad():
        expected = model(ids)
        assert torch.allclose(hf(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
        assert torch.allclose(build_lm_from_dir(tmp_path / "out" / MAMBA_SSM_DIR).eval()(ids), expected, atol=1e-6)
    assert set(json.loads((tmp_path / "out" / MAMBA_SSM_DIR / "config.json").read_text())) == set(MAMBA_SSM_FIELDS)


# --- Orca-Math data ----------------------------------------------------------------------------

def _records(root) -> list[str]:
    pytest.importorskip("datasets", reason="datasets is not installed (pip install -e '.[test]')")
    return [text for batch in iter_texts(corpus_entry(root)) for text in batch]


def test_the_published_layouts_read_the_same_records(tmp_path):
    import datasets

    write_mini_orca_math(tmp_path / "parquet", seed=0, n_train=12)
    frame = pd.read_parquet(tmp_path / "parquet" / STANDIN_FILE)
    assert list(frame.columns) == list(FIELDS)
    (tmp_path / "jsonl" / "data").mkdir(parents=True)
    frame.to_json(tmp_path / "jsonl" / "data" / "train.jsonl", orient="records", lines=True)
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "arrow"))
    expected = [q + a for q, a in zip(frame["question"], frame["answer"])]  # no separator, no template
    for layout in ("parquet", "jsonl", "arrow"):
        assert _records(tmp_path / layout) == expected, layout
    assert check_orca_math(tmp_path / "arrow")["splits"]["train"] == 12


def test_a_bad_record_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    pd.DataFrame({"question": ["What is 1 + 1?", "And 2 + 2?"], "answer": ["2", ""]}).to_parquet(
        tmp_path / "data" / "train-00000-of-00001.parquet")
    assert cli(["data", "check", "--kind", "orca_math", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "record 1" in err and "'answer'" in err


def test_the_token_cache_holds_one_eos_terminated_document_per_record(tmp_path):
    write_mini_orca_math(tmp_path, seed=0, n_train=10)
    tokenizer = _tokenizer(tmp_path, _records(tmp_path))
    record = tokenize_corpus(corpus_entry(tmp_path), tokenizer, "documents", tmp_path / "t.bin", tmp_path / "t.json")
    tokens, _ = load_tokens(tmp_path / "t.json")
    documents = split_documents(tokens, record["eos_id"])
    assert len(documents) == record["n_documents"] == 10
    assert all(d[-1] == record["eos_id"] and record["eos_id"] not in d[:-1] for d in documents)


def _orca_runs(root, methods: list[str], runtime: dict | None = None) -> dict[str, dict]:
    """Mini Orca-Math data, its tokenizer and a mini LM under ``root``, the tokens cached: each
    method's training spec (the rules' --spec for train and merge), not trained yet."""
    write_mini_orca_math(root / "data", seed=0, n_train=6)
    tokenizer = _tokenizer(root / "lm", _records(root / "data"))
    save_lm(build_model("mamba-mini", vocab_size=320, n_layer=2), root / "lm")
    config = {**_orca_config(root, methods), **(runtime or {})}
    validate_config(config)
    specs = {m: training_spec(resolve_run(config, Run("orca", "mamba-mini", "orca_math_200k", m, 0))) for m in methods}
    meta = Path(specs[methods[0]]["data"]["tokens"])  # one token cache: the runs share data and backbone
    tokenize_corpus(corpus_entry(root / "data"), tokenizer, "documents", meta.with_suffix(".bin"), meta)
    return specs


@pytest.mark.parametrize("runtime", [{"device": "cpu", "scan_backend": "torch"},
                                     pytest.param({"device": "cuda", "scan_backend": "auto", "cuda_graphs": True},
                                                  marks=pytest.mark.gpu, id="cuda-graphs")],
                         ids=lambda runtime: runtime["device"])
def test_train_then_merge_writes_a_model_transformers_loads(tmp_path, runtime):
    """The pipeline's path on a tiny stand-in: tokens cached, train (CPU, or the GPU's kernels and CUDA
    graphs as config/paper.yaml), merge and export on the CPU (the rules' commands)."""
    spec = _orca_runs(tmp_path, ["lora_orca"], runtime)["lora_orca"]
    assert cli(["-q", "train", "--spec", json.dumps(spec)]) == 0
    assert cli(["-q", "merge", "--spec", json.dumps(spec), "--out", str(tmp_path / "merged")]) == 0
    record = json.loads((tmp_path / "merged" / MERGE_RECORD).read_text())
    assert record["check"]["max_abs_logit_difference"] < 1e-4
    trained = json.loads((Path(spec["output_dir"]) / TRAIN_RECORD).read_text())
    assert record["adapter_sha256"] == trained["adapter_sha256"]  # which adapter the merged model holds
    # both exports compared on the run's device: where causal-conv1d is installed, transformers' Mamba
    # calls its CUDA kernel whatever the tensors' device (5.17), so a CPU check is not possible there
    device = runtime["device"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / HF_DIR).eval().to(device)
    ids = torch.randint(0, 320, (1, 12), device=device)
    with torch.no_grad():
        expected = build_lm_from_dir(tmp_path / "merged" / MAMBA_SSM_DIR).eval().to(device)(ids)
        assert torch.allclose(hf(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


# --- only the adapter training wrote for the run is merged ----------------------------------------

@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory) -> dict[str, dict]:
    """Two trained runs on one mini LM, their training specs by method; tests change copies of them."""
    specs = _orca_runs(tmp_path_factory.mktemp("orca"), ["lora_orca", "lorap_x"])
    for spec in specs.values():
        assert cli(["-q", "train", "--spec", json.dumps(spec)]) == 0
    return specs


def _run_copy(spec: dict, out: Path) -> dict:
    """The run's outputs copied to ``out`` and its spec there, train.json as if training had run there."""
    shutil.copytree(spec["output_dir"], out)
    record = json.loads((out / TRAIN_RECORD).read_text())
    write_record_atomic(out / TRAIN_RECORD, {**record, "config": {**record["config"], "output_dir": str(out)}})
    return {**spec, "output_dir": str(out)}


def _swap_adapter(run: Path, other: Path) -> None:
    shutil.copy(other / ADAPTER, run / ADAPTER)


def _swap_adapter_and_record(run: Path, other: Path) -> None:
    for name in (ADAPTER, TRAIN_RECORD):
        shutil.copy(other / name, run / name)


def _delete_record(run: Path, other: Path) -> None:  # an interrupted run: its adapter is written before train.json
    (run / TRAIN_RECORD).unlink()


def _diverge(run: Path, other: Path) -> None:
    """The record a diverged run writes, beside an adapter left from an earlier training."""
    config = json.loads((run / TRAIN_RECORD).read_text())["config"]
    write_record_atomic(run / TRAIN_RECORD, {"status": "diverged", "reason": "loss is nan at step 3", "config": config})


@pytest.mark.parametrize("change, needles", [
    (_swap_adapter, [ADAPTER, "differs from the one training wrote (sha256)", "re-run the training job"]),
    (_swap_adapter_and_record, [TRAIN_RECORD, "was written for another configuration of this run"]),
    (_delete_record, [TRAIN_RECORD, "is missing: run the training job first"]),
    (_diverge, [TRAIN_RECORD, "training ended with status 'diverged'", "no adapter to merge"]),
], ids=["swapped_adapter", "swapped_adapter_and_record", "no_record", "diverged"])
def test_merge_refuses_an_adapter_training_did_not_write_for_the_run(trained_runs, tmp_path, capsys, change, needles):
    spec = _run_copy(trained_runs["lora_orca"], tmp_path / "run")
    change(tmp_path / "run", Path(trained_runs["lorap_x"]["output_dir"]))
    assert cli(["-q", "merge", "--spec", json.dumps(spec), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(needle in err for needle in needles), err
    assert not (tmp_path / "merged").exists()


def test_an_adapter_of_another_method_is_refused_where_it_is_loaded(trained_runs):
    """Merging and evaluation build from the adapter's own members: those of another method would
    build that method, under the run's name."""
    other = Path(trained_runs["lorap_x"]["output_dir"]) / ADAPTER
    with pytest.raises(AdapterError, match=rf"^{re.escape(str(other))} is an adapter of method 'lorap_x', not of "
                                           r"'lora_orca'"):
        build_trainable(trained_runs["lora_orca"], adapter=other)
