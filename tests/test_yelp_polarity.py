"""Yelp polarity, the length study's text-classification setting: the stand-in in the Hub's parquet
layout read through `datasets`, `data check`, the token cache (built once, what in-process tokenization
gives, refused when stale) and the short/long split by tokens, the LM classification head (pooling,
padding, inserted tokens, always trained), and a tiny train + evaluate, reading the cache and never
tokenizing, whose records the length study's table and figure take."""
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from workflow_helpers import REPO

from mambapeft.data import token_cache
from mambapeft.data.errors import DataError
from mambapeft.data.tokenizer import TextTokenizer, build_tokenizer, load_tokenizer
from mambapeft.data.yelp_polarity import (NUM_CLASSES, cached_reviews, check_yelp_polarity, read_split, standin_rows,
                                          tokenize_yelp, write_standin)
from mambapeft.eval.run import evaluate_run, evaluator_for
from mambapeft.eval.text_classification import evaluate_long_reviews, length_band
from mambapeft.models import build_model
from mambapeft.models.checkpoints import save_lm
from mambapeft.models.lm_classifier import MambaLMClassifier
from mambapeft.peft import apply_peft
from mambapeft.report.length_generalisation import write_length_generalisation
from mambapeft.runspec import Run, resolve_run, text_labels, text_tokens, training_spec, validate_config
from mambapeft.train.runner import run_training
from mambapeft.train.tasks import task_class
from mambapeft.train.text_classification import TextClassificationTask

ENTRY = {"kind": "yelp_polarity", "source": "mini", "seed": 0, "n_train": 48, "n_test": 40, "train_max_tokens": 40,
         "test_lengths": [100, 140]}


def test_the_standin_is_the_hubs_layout_and_deterministic(tmp_path):
    first = write_standin(tmp_path / "a", ENTRY)
    assert sorted(first) == ["plain_text/test-00000-of-00001.parquet", "plain_text/train-00000-of-00001.parquet"]
    assert write_standin(tmp_path / "b", ENTRY) == first  # same seed, same bytes
    assert write_standin(tmp_path / "c", {**ENTRY, "seed": 1}) != first
    table = pq.read_table(tmp_path / "a" / "plain_text/train-00000-of-00001.parquet")
    assert table.column_names == ["text", "label"] and table.num_rows == 48
    assert set(table.column("label").to_pylist()) == set(range(NUM_CLASSES))


def test_data_check_reads_every_row_and_names_a_bad_one(tmp_path, capsys):
    from mambapeft.cli import main

    write_standin(tmp_path, ENTRY)
    assert main(["data", "check", "--kind", "yelp_polarity", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["n"] == 48 and summary["test"]["n"] == 40
    assert summary["train"]["negative"] + summary["train"]["positive"] == 48
    bad = tmp_path / "plain_text/test-00000-of-00001.parquet"
    pq.write_table(pa.table({"text": ["fine"], "label": [2]}), bad)
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet \(split test, row 0\)"):
        check_yelp_polarity(tmp_path)
    assert main(["data", "check", "--kind", "yelp_polarity", str(tmp_path / "missing")]) == 2
    assert "fancyzhx/yelp_polarity" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    texts = [r["text"] for r in standin_rows(0, "train", 200)]
    build_tokenizer(texts, vocab_size=300, path=directory)
    return directory


def tokenize(root, tokenizer_dir, folder):
    """The stand-in under ``root`` tokenized into ``folder``: the cache's .json."""
    meta = folder / "cache.json"
    tokenize_yelp(root, tokenizer_dir / "tokenizer.json", folder / "cache.bin", folder / "cache.labels.bin", meta)
    return meta


def test_the_cache_holds_what_tokenizing_in_process_gives_and_splits_reviews_by_length(tmp_path, tokenizer_dir):
    write_standin(tmp_path / "data", ENTRY)
    meta = tokenize(tmp_path / "data", tokenizer_dir, tmp_path)
    tokenizer = load_tokenizer(tokenizer_dir)
    for split, lengths in (("train", {"max_tokens": 40}), ("test", {"min_tokens": 100})):
        in_process = [{"tokens": tokenizer.encode(row["text"]), "label": row["label"]}
                      for row in read_split(tmp_path / "data", split)]
        assert cached_reviews(meta, tmp_path / "data", split, tokenizer) == in_process
        kept = cached_reviews(meta, tmp_path / "data", split, tokenizer, **lengths)
        assert kept and kept == [r for r in in_process if lengths.get("min_tokens", 0) <= len(r["tokens"])
                                 <= lengths.get("max_tokens", 10**9)]
    with pytest.raises(DataError, match="no review of 100000..any tokens"):
        cached_reviews(meta, tmp_path / "data", "test", tokenizer, min_tokens=100_000)
    assert [length_band(n, [100, 140]) for n in (100, 139, 140, 900)] == [100, 100, 140, 140]


def test_a_cache_of_other_files_or_another_tokenizer_is_refused(tmp_path, tokenizer_dir):
    write_standin(tmp_path / "data", ENTRY)
    meta = tokenize(tmp_path / "data", tokenizer_dir, tmp_path)
    other = tmp_path / "other_tokenizer"
    build_tokenizer([r["text"] for r in standin_rows(1, "train", 50)], vocab_size=280, path=other)
    with pytest.raises(DataError, match=r"cache.json was tokenized with .*, not with this run's tokenizer .*"
                                        r"other_tokenizer.*; delete .*cache.json and re-run its tokenization"):
        cached_reviews(meta, tmp_path / "data", "train", load_tokenizer(other))
    write_standin(tmp_path / "data", {**ENTRY, "seed": 1})
    with pytest.raises(DataError, match=r"cache.json was tokenized from other files than the parquet files now under "
                                        r".*rule tokenize_labelled"):
        cached_reviews(meta, tmp_path / "data", "train", load_tokenizer(tokenizer_dir))


def _classifier(**tokens):
    torch.manual_seed(0)
    members = [{"family": "input_tokens", "name": "tokens", **tokens}] if tokens else []
    model = MambaLMClassifier(build_model("mamba-mini", d_model=16, n_layer=2, vocab_size=300), NUM_CLASSES)
    return model, apply_peft(model, members)


def test_the_head_reads_each_reviews_last_token_whatever_the_padding_and_inserted_tokens():
    model, _ = _classifier(n_tokens=2, period=4)
    reviews = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    with torch.no_grad():
        batched = model.classify(reviews)
        alone = torch.cat([model.classify([r]) for r in reviews])
        by_hand = torch.stack([model.classifier(model.forward_hidden(torch.tensor([r]))[0, -1]) for r in reviews])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched, by_hand, rtol=1e-4, atol=1e-5)


def test_the_head_always_trains_and_is_counted_apart():
    _, head_only = _classifier()
    assert set(head_only.trainable) == {"classifier.weight", "classifier.bias"} and head_only.count() == 0
    _, periodic = _classifier(n_tokens=2, period=4)
    assert set(periodic.trainable) == {"classifier.weight", "classifier.bias", "backbone.input_tokens.tokens"}
    assert periodic.count() == 2 * 16


def test_the_kind_dispatches_its_task_and_evaluator():
    spec = {"domain": "language", "data": {"kind": "yelp_polarity"}}
    assert task_class(spec) is TextClassificationTask and evaluator_for(spec) is evaluate_long_reviews


@pytest.fixture(scope="module")
def tiny_yelp(tmp_path_factory, tokenizer_dir):
    """head_only and periodic on a random tiny LM (with the stand-in's tokenizer), trained and
    evaluated in this process as the finetune and evaluate jobs run them."""
    root = tmp_path_factory.mktemp("yelp")
    weights = root / "lm"
    save_lm(build_model("mamba-mini", d_model=16, n_layer=2, vocab_size=300), weights)
    (weights / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = {
        "results_dir": str(root / "results"), "resources_dir": str(root / "res"), "device": "cpu",
        "scan_backend": "torch", "threads": 1,
        "data": {"yelp": {**ENTRY, "root": str(root / "data")}},
        "backbones": {"mamba-mini": {"source": "pretrain", "path": str(weights)}},
        "experiments": {"length_yelp": {
            "domain": "language", "data": "yelp", "backbones": ["mamba-mini"], "tasks": ["yelp_polarity"],
            "methods": ["head_only", "periodic"], "seeds": [0],
            "train": {"epochs": 1, "batch_size": 8, "val_size": 0, "select": "final", "checkpoint_every": 2,
                      "schedule": {"warmup_steps": 1}, "eval": {"batch_size": 8}},
            "method_overrides": {"periodic": {"tokens": {"n_tokens": 2, "period": 8}}}}},
        "length_generalisation": {"experiments": ["length_yelp"]},
    }
    validate_config(config)
    write_standin(root / "data", ENTRY)
    tokens, meta = text_tokens(config, "yelp", "mamba-mini")
    tokenize_yelp(root / "data", weights, tokens, text_labels(config, "yelp", "mamba-mini"), meta)
    metrics = []
    with pytest.MonkeyPatch.context() as patch:  # the jobs read the cache: tokenizing again would fail them
        patch.setattr(TextTokenizer, "encode", lambda *_: pytest.fail("a job tokenized a review"))
        patch.setattr(token_cache, "_batch_encoder", lambda *_: pytest.fail("a job tokenized the dataset"))
        for method in ("head_only", "periodic"):
            spec = resolve_run(config, Run("length_yelp", "mamba-mini", "yelp_polarity", method, 0))
            assert spec["data"]["tokens"] == str(meta)
            run_training(training_spec(spec))
            evaluate_run(spec)
            metrics.append(f"{spec['output_dir']}/metrics.json")
    return metrics


def test_training_on_short_reviews_and_accuracy_per_band_of_long_ones(tiny_yelp):
    record = json.loads(Path(tiny_yelp[1]).read_text())
    assert record["status"] == "ok" and record["trainable_params"] == 2 * 16
    assert 0 < record["train_examples"] < ENTRY["n_train"]  # only the short reviews
    assert set(record["results"]) <= {"100", "140"} and record["n_eval"] == sum(r["n"] for r in record["results"].values())
    assert 0 <= record["value"] <= 100


def test_the_study_table_and_figure_take_the_yelp_runs(tiny_yelp, tmp_path):
    csv, md, png = tmp_path / "t.csv", tmp_path / "t.md", tmp_path / "f.png"
    write_length_generalisation(tiny_yelp, REPO / "language" / "length_generalisation.yaml", csv, md, png)
    table = pd.read_csv(csv)
    assert set(table["source"]) == {"ours"} and set(table["method"]) == {"head_only", "periodic"}
    assert set(table["train_max_length"]) == {40} and set(table["generator"]) == {"yelp_polarity"}
    assert "## yelp_polarity, short → long (trained on reviews of at most 40 tokens), base mamba-mini" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
def test_on_cuda_kernels_the_head_reads_what_it_reads_on_the_cpu():
    from mambapeft.models.scan import cuda_kernels_available
    from mambapeft.runtime import autocast_for, place_model

    if not cuda_kernels_available():
        pytest.skip("needs a CUDA device with the mamba-ssm kernels (pip install -e .[cuda])")
    model, _ = _classifier(n_tokens=2, period=4)
    reviews = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13], [14, 15, 16, 17, 18]]
    with torch.no_grad():
        on_cpu = model.classify(reviews)
    device = torch.device("cuda")
    assert place_model(model, device, {"scan_backend": "cuda", "allow_torch_fallback": False}).startswith("cuda")
    with torch.no_grad(), autocast_for(device)():
        batched = model.classify(reviews).float()
        alone = torch.cat([model.classify([r]) for r in reviews]).float()
    torch.testing.assert_close(batched, alone, rtol=2e-2, atol=2e-2)  # bf16: padding changes nothing
    torch.testing.assert_close(batched.cpu(), on_cpu, rtol=5e-2, atol=5e-2)
