"""The Orca-Math study's lm-eval suite: its eleven task definitions load from local files (the
stand-ins, in each real record format), a merged model scored through lm-eval's own ``hf`` model
agrees with the same run scored as backbone + unmerged adapter through ours, and the table and figure
come out of small records."""
import json
import math

import pandas as pd
import pytest
import torch

from mambapeft.build import bare_spec
from mambapeft.data.errors import DataError
from mambapeft.data.language_tasks import language_tasks
from mambapeft.data.mini_text.suite import write_mini_suite
from mambapeft.data.tokenizer import build_tokenizer, load_tokenizer
from mambapeft.eval.lm_eval_suite import FAMILY, agreement, evaluate_suite
from mambapeft.eval.lm_eval_tasks import write_task_definitions
from mambapeft.export import merge_run
from mambapeft.io import sha256_file, write_record_atomic
from mambapeft.models.checkpoints import save_lm
from mambapeft.models.lm import build_lm
from mambapeft.peft import apply_peft
from mambapeft.peft.state import save_adapter
from mambapeft.report.lm_eval_suite import write_suite_report
from mambapeft.runspec import ADAPTER, TRAIN_RECORD, repo_root, training_spec

LORA = {"id": "lora_suite_test", "peft": [{"family": "lora", "name": "lora", "targets": ["mixer.in_proj", "mixer.out_proj"],
                                           "rank": 4, "scale": 0.5, "dropout": 0.0}]}
SUITE = list(language_tasks(FAMILY))
# choices per document, or the output type's request count, of each stand-in task (the real task's shape)
REQUESTS_PER_DOC = {"hellaswag": 4, "cola": 2, "openbookqa": 4, "mathqa": 5, "winogrande": 2, "arc_easy": 4,
                    "arc_challenge": 4, "wikitext": 1, "lambada_openai": 1, "lambada_standard": 1, "gsm8k": 1}


pytestmark = pytest.mark.usefixtures("isolated_datasets_cache")


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    write_mini_suite(root, list(language_tasks(FAMILY).values()), seed=0, n_test=4, n_fewshot=5)
    return root


def test_every_suite_task_is_lm_evals_definition_over_the_local_files(suite_root, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert set(SUITE) == set(REQUESTS_PER_DOC)
    manager = TaskManager(include_path=str(write_task_definitions(SUITE, suite_root, tmp_path, FAMILY)),
                          include_defaults=False)
    tasks = manager.load(SUITE)["tasks"]
    for name, task in tasks.items():
        task.build_all_requests(rank=0, world_size=1)
        assert len(task.instances) == 4 * REQUESTS_PER_DOC[name], name
    gsm8k = tasks["gsm8k"].instances[0].args[0]
    assert gsm8k.count("Question:") == 6 and gsm8k.count("####") == 5  # 5-shot from the local train split
    assert [m["metric"] for m in tasks["cola"].config.metric_list] == ["acc", "acc_norm"]  # not lm-eval's mcc
    assert tasks["wikitext"].OUTPUT_TYPE == "loglikelihood_rolling"


def test_a_missing_suite_file_names_it(tmp_path):
    write_mini_suite(tmp_path, [language_tasks(FAMILY)["gsm8k"]], seed=0, n_test=2, n_fewshot=1)
    (tmp_path / "eval" / "gsm8k" / "train.jsonl").unlink()
    with pytest.raises(DataError, match=r"eval/gsm8k/train.jsonl: eval file of task 'gsm8k' not found"):
        write_task_definitions(["gsm8k"], tmp_path, tmp_path / "scratch", FAMILY)


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory, suite_root):
    """A mini LM, a trained-looking LoRA adapter on it, and the merge job's output for that run."""
    base = tmp_path_factory.mktemp("lm")
    texts = [line for path in suite_root.rglob("*.jsonl") for line in path.read_text().splitlines()]
    build_tokenizer(texts * 3, vocab_size=400, path=base / "tokenizer.json")
    torch.manual_seed(0)
    model = build_lm("mamba-mini", vocab_size=load_tokenizer(base).vocab_size)
    save_lm(model, base)
    peft = apply_peft(model, LORA["peft"], LORA["id"])
    with torch.no_grad():
        for p in peft.trainable.values():
            p.normal_(0, 0.2)
    run_dir = tmp_path_factory.mktemp("run")
    save_adapter(run_dir / ADAPTER, peft, LORA)
    spec = {**bare_spec("language", None, LORA, path=str(base)), "output_dir": str(run_dir)}
    # the training record the trainer writes last, which the merge checks the adapter against
    write_record_atomic(run_dir / TRAIN_RECORD, {"status": "ok", "config": training_spec(spec),
                                                 "adapter_sha256": sha256_file(run_dir / ADAPTER)})
    merged = tmp_path_factory.mktemp("merged")
    merge_run(spec, merged)
    return base, run_dir / ADAPTER, merged / "hf"


def _hf_and_adapter_scores(merged_run, suite_root, tasks, device):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[test]')")
    base, adapter, merged = merged_run
    settings = {"device": device, "batch_size": 4, "gen_kwargs": "max_gen_toks=8"}
    # ours first: registering it must leave lm-eval's own models (hf) registered
    ours = evaluate_suite("mambapeft", {"backbone": str(base), "adapter": str(adapter)}, tasks, suite_root, **settings)
    hf = evaluate_suite("hf", {"pretrained": str(merged), "dtype": "float32"}, tasks, suite_root, **settings)
    plain = evaluate_suite("mambapeft", {"backbone": str(base)}, tasks[:1], suite_root, **settings)
    return hf, ours, plain


def test_the_merged_model_through_hf_agrees_with_the_adapter_model(merged_run, suite_root):
    tasks = ["mathqa", "wikitext", "gsm8k"]  # multiple choice, rolling log-likelihood, 5-shot generation
    hf, ours, plain = _hf_and_adapter_scores(merged_run, suite_root, tasks, "cpu")
    check = agreement(hf, ours, atol=1e-4)
    assert check["agree"] and check["same_generations"], check
    for task in tasks:
        for metric, value in hf["scores"][task].items():
            assert ours["scores"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    assert agreement(hf, plain, atol=1e-4)["max_loglikelihood_difference"] > 1e-2  # the adapter is in the merge


@pytest.mark.gpu
def test_on_cuda_the_merged_model_agrees_with_the_adapter_model_within_bf16(merged_run, suite_root):
    """Ours runs under bf16 autocast on CUDA, hf in fp32: config/paper.yaml's crosscheck tolerance."""
    hf, ours, plain = _hf_and_adapter_scores(merged_run, suite_root, ["mathqa", "lambada_openai"], "cuda")
    check = agreement(hf, ours, atol=0.25)
    assert check["agree"], check
    assert agreement(hf, plain, atol=0.25)["max_loglikelihood_difference"] > check["max_loglikelihood_difference"]


def _record(backbone, model, scores, **extra):
    run = {"experiment": "orca_math", "backbone": backbone, "task": "orca_math", "method": "lora_orca", "seed": 0}
    return {"status": "ok", "backbone": backbone, "model": model, "run": run if model == "fine-tuned" else None,
            "tasks": list(scores), "data_source": "mini", "lm_eval_model": "hf" if model == "fine-tuned" else "mambapeft",
            "scores": scores, **extra}


def test_table_and_figure_from_records(tmp_path):
    check = {"tasks": ["mathqa"], "atol": 1e-4, "max_loglikelihood_difference": 2e-6, "same_generations": True, "agree": True}
    records = [
        _record("mamba-130m", "base", {"mathqa": {"acc": 20.0, "acc_norm": 21.0, "n": 10}, "wikitext": {"word_perplexity": 40.0, "n": 2}}),
        _record("mamba-130m", "fine-tuned", {"mathqa": {"acc": 25.0, "acc_norm": 20.0, "n": 10}, "wikitext": {"word_perplexity": 30.0, "n": 2}},
                crosscheck=check),
    ]
    paths = []
    for i, record in enumerate(records):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(record))
    csv, md, png = tmp_path / "t.csv", tmp_path / "t.md", tmp_path / "f.png"
    write_suite_report([str(p) for p in paths], repo_root() / "language" / "orca_math_lm_eval.yaml", csv, md, png, "orca_math")
    table = pd.read_csv(csv).set_index(["task", "metric"])
    assert table.loc[("mathqa", "acc"), "change"] == pytest.approx(5.0)
    assert table.loc[("mathqa", "acc_norm"), ["study_base", "study_fine_tuned"]].tolist() == [22.85, 24.2]
    assert table.loc[("wikitext", "word_perplexity"), "change"] == pytest.approx(-10.0)
    assert math.isnan(table.loc[("wikitext", "word_perplexity"), "study_base"])
    text = md.read_text()
    assert "20.00 → 25.00" in text and "22.85 → ≈24.20" in text and "approximate, read from the study's poster plot" in text
    assert "Mini run" in text and "agree on mathqa" in text
    assert png.stat().st_size > 0
