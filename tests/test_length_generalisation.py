"""The learnable-input length study: the synthetic recall generators, their files and `data check`,
step-mode periodic tokens, the training task and evaluator on a tiny case, the study's table and
figure, and its DAG."""
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mambapeft.data.errors import DataError
from mambapeft.data.prepare import prepare_dataset
from mambapeft.data.synthetic import (COPY, GENERATORS, PAD, PASTE, VOCAB_SIZE, answer_of, check_synthetic,
                                      choice_lengths, sample, seeded_rng, uniform_lengths, write_synthetic)
from mambapeft.eval.run import evaluate_run, evaluator_for
from mambapeft.eval.synthetic import evaluate_lengths
from mambapeft.models import build_model
from mambapeft.models.checkpoints import build_lm_from_dir, save_lm
from mambapeft.peft import apply_peft
from mambapeft.report.length_generalisation import PLOT_READING, write_length_generalisation
from mambapeft.runspec import Run, dataset_spec, load_config, resolve_run, training_spec
from mambapeft.train.pretrain import pretrain_backbone
from mambapeft.train.runner import run_training
from mambapeft.train.synthetic import SyntheticTask, pad_right, query_logits
from mambapeft.train.tasks import task_class
from workflow_helpers import REPO, job_counts, snakemake

STUDY = REPO / "tests" / "config" / "length_generalisation.yaml"
READINGS = REPO / "language" / "length_generalisation.yaml"


# ------------------------------------------------------------------------------------------------
# generators and files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("length", [3, 4, 17, 300])
def test_every_sequence_is_labelled_correctly_by_construction(name, length):
    task = GENERATORS[name]
    for record in sample(name, choice_lengths([length]), 200, seeded_rng(0, "test", name)):
        tokens, body = record["tokens"], record["tokens"][:-1]
        assert len(tokens) == length and tokens[-1] == task.query
        assert body.count(COPY) == 1 and PASTE not in body and PAD not in body
        assert record["answer"] == body[body.index(COPY) + 1] == answer_of(tokens)
        assert 0 <= record["answer"] < task.symbols
        assert all(t < task.symbols for t in body if t != COPY)


def test_queries_and_vocabulary_follow_the_two_studies():
    """Zoology's induction heads ask with the trigger again (14 symbols: its vocab 16 counts the
    trigger and the noop); the Needle asks with PASTE over 16 symbols."""
    assert (GENERATORS["induction_heads"].query, GENERATORS["induction_heads"].symbols) == (COPY, 14)
    assert (GENERATORS["needle"].query, GENERATORS["needle"].symbols) == (PASTE, 16)
    assert VOCAB_SIZE == 19 and build_model("mamba_16").config.vocab_size == VOCAB_SIZE


def test_lengths_are_as_asked():
    rng = seeded_rng(0, "lengths")
    drawn = {uniform_lengths(5, 9)(rng) for _ in range(500)}
    assert drawn == set(range(5, 10))
    assert {choice_lengths([64, 256])(rng) for _ in range(100)} == {64, 256}
    with pytest.raises(DataError, match="min_length"):
        uniform_lengths(2, 9)


def _entry(**changes):
    entry = {"seed": 0, "n_train": 40, "n_test": 8, "test_lengths": [32, 16],
             "train_sets": {"ih": {"generator": "induction_heads", "setting": "short_long", "min_length": 4,
                                   "max_length": 12},
                            "nd": {"generator": "needle", "setting": "standard"}}}
    return {**entry, **changes}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_files_are_deterministic_by_seed_and_independent_of_each_other(tmp_path):
    write_synthetic(tmp_path / "a", _entry(), ["ih", "nd"])
    write_synthetic(tmp_path / "b", _entry(), ["ih", "nd"])
    write_synthetic(tmp_path / "seed1", _entry(seed=1), ["ih", "nd"])
    write_synthetic(tmp_path / "ih_only", _entry(), ["ih"])
    a = _files(tmp_path / "a")
    assert a == _files(tmp_path / "b")
    assert a["train/ih.jsonl"] != _files(tmp_path / "seed1")["train/ih.jsonl"]
    alone = _files(tmp_path / "ih_only")
    assert alone["train/ih.jsonl"] == a["train/ih.jsonl"]
    assert alone["test/induction_heads/length_16.jsonl"] == a["test/induction_heads/length_16.jsonl"]
    assert "test/needle/length_16.jsonl" not in alone


def test_training_sets_have_their_settings_lengths(tmp_path):
    write_synthetic(tmp_path, _entry(), ["ih", "nd"])
    lengths = {name: {len(json.loads(line)["tokens"]) for line in (tmp_path / "train" / f"{name}.jsonl").open()}
               for name in ("ih", "nd")}
    assert lengths["ih"] <= set(range(4, 13)) and len(lengths["ih"]) > 3  # short -> long: varied, <= 12
    assert lengths["nd"] == {16, 32}  # standard: the test lengths
    for length in (16, 32):
        test = (tmp_path / "test" / "needle" / f"length_{length}.jsonl").read_text().splitlines()
        assert len(test) == 8 and {len(json.loads(line)["tokens"]) for line in test} == {length}


def test_data_check_validates_every_record_and_names_a_wrong_one(tmp_path):
    write_synthetic(tmp_path, _entry(), ["ih", "nd"])
    summary = check_synthetic(tmp_path)
    assert summary["splits"] == {"train": 80, "val": None, "test": 32}
    assert summary["train_sets"]["ih"]["lengths"] == {"range": [4, 12]}
    assert check_synthetic(tmp_path, "nd")["test"] == {"needle": {"16": 8, "32": 8}}
    path = tmp_path / "test" / "needle" / "length_32.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[2])
    record["answer"] = (record["answer"] + 1) % 16
    path.write_text("\n".join(lines[:2] + [json.dumps(record)] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + ".*not the token after COPY"):
        check_synthetic(tmp_path)


def test_data_check_cli(tmp_path, capsys):
    from mambapeft.cli import main

    write_synthetic(tmp_path, _entry(), ["ih"])
    assert main(["data", "check", "--kind", "synthetic", str(tmp_path), "--task", "ih"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"] == 40
    assert main(["data", "check", "--kind", "synthetic", str(tmp_path / "missing")]) == 2
    assert "synthetic.json is missing" in capsys.readouterr().err


def test_an_undeclared_training_set_is_refused_when_the_config_loads(tmp_path):
    config = yaml.safe_load(STUDY.read_text())
    config["experiments"]["length_tiny"]["tasks"] = ["induction_heads", "needle"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"\['needle'\] are not training sets of data/synthetic"):
        load_config(path)


def test_prepare_data_writes_the_training_sets_experiments_use_and_a_manifest(tmp_path):
    config = load_config(STUDY, overrides={"resources_dir": str(tmp_path)})
    manifest = tmp_path / "manifest.json"
    record = prepare_dataset(dataset_spec(config, "synthetic"), manifest)
    assert json.loads(manifest.read_text()) == json.loads(json.dumps(record))
    assert set(record["checksums"]) == {"train/induction_heads.jsonl", "train/needle_standard.jsonl",
                                        *(f"test/{g}/length_{n}.jsonl" for g in GENERATORS for n in (24, 48))}
    assert check_synthetic(tmp_path / "data" / "synthetic")["splits"]["train"] == 2 * 64


def test_pretraining_a_base_model_on_the_recall_tasks(tmp_path):
    entry = yaml.safe_load(STUDY.read_text())["backbones"]["mamba_16"]
    record = pretrain_backbone("mamba_16", tmp_path / "weights", tmp_path / "checkpoint.json", entry["pretrain"])
    assert record["optimizer_steps"] == 4  # 2 tasks x 32 sequences at batch 16, one epoch
    assert set(record["heldout_accuracy"]) == {"induction_heads", "needle"} and record["heldout_length"] == 12
    assert set(record["checksums"]) == {"config.json", "pytorch_model.bin"}
    assert build_lm_from_dir(tmp_path / "weights").config.vocab_size == VOCAB_SIZE
    with pytest.raises(ValueError, match="pretrain.kind 'recall' is unknown; valid: synthetic"):
        pretrain_backbone("mamba_16", tmp_path / "w", tmp_path / "c.json", {**entry["pretrain"], "kind": "recall"})


# ------------------------------------------------------------------------------------------------
# step mode
# ------------------------------------------------------------------------------------------------
def _with_tokens(**fields):
    model = build_model("mamba_16").eval()
    apply_peft(model, [{"family": "input_tokens", **fields}], "tokens")
    with torch.no_grad():
        model.backbone.input_tokens.tokens.normal_()
    return model


@pytest.mark.parametrize("fields", [{"n_tokens": 3, "period": 5}, {"n_tokens": 2, "period": 1}, {"n_tokens": 4}],
                         ids=["periodic", "period1", "prefix"])
@pytest.mark.parametrize("prompt", [1, 4, 5, 6, 10])
def test_step_mode_reinserts_the_tokens_where_the_parallel_forward_does(fields, prompt):
    """Parallel logits of a sequence equal a parallel forward of its first ``prompt`` tokens
    followed by step mode for the rest (prompt lengths before, at and after period boundaries)."""
    model = _with_tokens(**fields)
    ids = torch.randint(0, VOCAB_SIZE, (2, 17))
    with torch.no_grad():
        parallel = model(ids)  # (B, L, V)
        states = model.empty_states(2)
        stepped = [model(ids[:, :prompt], states)]
        stepped += [model._step_token(ids[:, t], t, states).unsqueeze(1) for t in range(prompt, ids.shape[1])]
    torch.testing.assert_close(torch.cat(stepped, dim=1), parallel, rtol=1e-4, atol=1e-5)


def test_periodic_tokens_enter_before_every_period():
    model = _with_tokens(n_tokens=3, period=5)
    real, inserted, total = model.backbone.input_tokens.layout(12)
    assert total == 12 + 3 * 3 and inserted.tolist() == [0, 1, 2, 8, 9, 10, 16, 17, 18]
    assert real.tolist() == [3, 4, 5, 6, 7, 11, 12, 13, 14, 15, 19, 20]


# ------------------------------------------------------------------------------------------------
# training task and evaluator
# ------------------------------------------------------------------------------------------------
def test_query_logits_ignore_the_padding_after_each_sequence():
    model = _with_tokens(n_tokens=2, period=4)
    sequences = [[1, 2, COPY, 5, 3, 3, 3, PASTE], [COPY, 7, PASTE], [4, COPY, 9, 1, 2, PASTE]]
    ids, lengths = pad_right(sequences)
    assert ids.shape == (3, 8) and ids[1, 3:].eq(PAD).all()
    with torch.no_grad():
        batched = query_logits(model, ids, lengths)
        alone = [model(torch.tensor([s]))[0, -1] for s in sequences]
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-4, atol=1e-5)


def test_synthetic_kind_dispatches_its_task_and_evaluator_and_others_keep_their_domains():
    from mambapeft.eval.classification import evaluate_top1
    from mambapeft.eval.language import evaluate_language
    from mambapeft.train.language import LanguageTask
    from mambapeft.train.vision import VisionTask

    for domain, kind, task, evaluator in [("language", "synthetic", SyntheticTask, evaluate_lengths),
                                          ("language", "commonsense", LanguageTask, evaluate_language),
                                          ("language", "math", LanguageTask, evaluate_language),
                                          ("vision", "vtab", VisionTask, evaluate_top1)]:
        spec = {"domain": domain, "data": {"kind": kind}}
        assert task_class(spec) is task and evaluator_for(spec) is evaluator


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Every run of tests/config/length_generalisation.yaml, trained and evaluated in this process
    on a random mamba_16 (the pretraining rule is the DAG test's)."""
    root = tmp_path_factory.mktemp("study")
    config = load_config(STUDY, overrides={"results_dir": str(root / "results"), "resources_dir": str(root / "res")})
    config["backbones"]["mamba_16"]["path"] = str(root / "res" / "mamba_16")
    data = {**config["data"]["synthetic"], "root": str(root / "res" / "data")}
    write_synthetic(data["root"], data, ["induction_heads", "needle_standard"])
    save_lm(build_model("mamba_16"), root / "res" / "mamba_16")
    metrics = []
    for task in ("induction_heads", "needle_standard"):
        for method in ("prefix", "periodic"):
            for seed in (0, 1):
                spec = resolve_run(config, Run("length_tiny", "mamba_16", task, method, seed))
                spec["data"]["root"] = data["root"]
                run_training(training_spec(spec))
                evaluate_run(spec)
                metrics.append(f"{spec['output_dir']}/metrics.json")
    return root, metrics


def test_training_and_evaluation_record_accuracy_at_every_test_length(tiny_study):
    _, metrics = tiny_study
    record = json.loads(Path(metrics[2]).read_text())  # induction_heads, periodic, seed 0
    assert record["status"] == "ok" and record["config"]["run"]["method"] == "periodic"
    assert record["trainable_params"] == 2 * 8  # two tokens of width d_model
    assert record["optimizer_steps"] == 4  # 64 sequences at batch 16, one epoch
    assert set(record["results"]) == {"24", "48"} and record["generator"] == "induction_heads"
    for length, scores in record["results"].items():
        assert scores["n"] == 16 and scores["length"] == int(length) and 0 <= scores["acc"] <= 100
    predictions = (Path(metrics[2]).parent / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 32 and json.loads(predictions[0]).keys() == {"length", "index", "answer", "prediction"}


def test_the_study_table_and_figure(tiny_study, tmp_path):
    _, metrics = tiny_study
    csv, md, png = tmp_path / "t.csv", tmp_path / "t.md", tmp_path / "f.png"
    write_length_generalisation(metrics, READINGS, csv, md, png)
    table = pd.read_csv(csv)
    ours = table[table["source"] == "ours"]
    assert len(ours) == 2 * 2 * 2  # tasks x methods x test lengths
    assert (ours["seeds"] == 2).all() and ours["std"].notna().all()
    assert set(ours["setting"]) == {"short_long", "standard"}
    assert dict(zip(ours["task"], ours["train_max_length"])) == {"induction_heads": 24, "needle_standard": 48}
    assert (ours.groupby(["task", "method"])["trainable_params"].first() == 16).all()
    text = md.read_text()
    assert "## induction_heads, short → long (trained at lengths up to 24), base mamba_16" in text
    assert "## needle_standard (needle), standard (trained at the test lengths), base mamba_16" in text
    assert re.search(r"\| Periodic-tuning \| 16 \| \d+\.\d ± \d+\.\d \| \d+\.\d ± \d+\.\d \| 2 \|", text)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_study_command(tiny_study, tmp_path):
    from mambapeft.cli import main

    _, metrics = tiny_study
    outputs = [tmp_path / "t.csv", tmp_path / "t.md", tmp_path / "f.png"]
    assert main(["length-generalisation", "--readings", str(READINGS), "--csv", str(outputs[0]), "--md",
                 str(outputs[1]), "--figure", str(outputs[2]), *metrics]) == 0
    assert all(p.stat().st_size > 0 for p in outputs)


def test_the_study_reading_sits_beside_ours_labelled_as_read_from_a_plot(tiny_study, tmp_path):
    """The reading is for base mamba_16 on induction heads, short -> long: the tiny study's
    induction_heads panel, not its needle one."""
    _, metrics = tiny_study
    csv, md = tmp_path / "t.csv", tmp_path / "t.md"
    write_length_generalisation(metrics, READINGS, csv, md, tmp_path / "f.png")
    table = pd.read_csv(csv)
    study = table[table["source"] == PLOT_READING]
    assert set(study["method"]) == {"prefix", "periodic"} and set(study["task"]) == {"induction_heads"}
    periodic = study[study["method"] == "periodic"]
    assert dict(zip(periodic["length"], periodic["mean"]))[64] == 88.0 and set(periodic["period"]) == {40}
    text = md.read_text()
    header = "| method | trainable | 24 | 48 | 64 | 128 | 256 | 512 | 1024 | 2048 | 4096 | seeds |"
    assert header in text  # our lengths and the study's
    assert f"| Periodic-tuning (10 tokens, period 40): {PLOT_READING} |  |  |  | ≈88 | ≈57.5 | ≈35.5 |" in text
    assert "approximate values read from its plot" in text


# ------------------------------------------------------------------------------------------------
# workflow
# ------------------------------------------------------------------------------------------------
def test_the_study_target_dag(tmp_path):
    done = snakemake("-n", "length_generalisation", "--configfile", str(STUDY), cwd=tmp_path, timeout=300)
    assert job_counts(done.stdout) == {"prepare_backbone": 1, "prepare_data": 1, "finetune": 8, "evaluate": 8,
                                       "length_generalisation_report": 1, "length_generalisation": 1, "total": 20}
    default = snakemake("-n", "--configfile", str(STUDY), cwd=tmp_path, timeout=300).stdout
    assert "finetune" not in default  # its own target: the default builds nothing of it
    config = yaml.safe_load(STUDY.read_text())
    config["length_generalisation"]["default_target"] = True
    path = tmp_path / "in_default.yaml"
    path.write_text(yaml.safe_dump(config))
    assert job_counts(snakemake("-n", "--configfile", str(path), cwd=tmp_path, timeout=300).stdout)["finetune"] == 8
