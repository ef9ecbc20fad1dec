"""lm-evaluation-harness scores our models: the ``mambapeft`` model adapter and the local task
definitions, checked against lm-eval itself on the same data.

- the requests lm-eval builds from our task definitions are those of the records' real tasks
  (the strings `data check` expects, tests/choice_cases.py), for all eight commonsense formats;
- the acc / acc_norm lm-eval reports through the adapter equal a direct, unbatched computation
  with the model, and every per-choice log-likelihood agrees;
- an adapter saved by a run loads onto its backbone and scores as the model in memory did;
- generation, rolling log-likelihood and the `mambapeft lm-eval` command line.
"""
import contextlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from choice_cases import CASES
from mambapeft.data.choice_formats import mc_task
from mambapeft.data.errors import DataError
from mambapeft.data.language_tasks import language_task
from mambapeft.data.mini_text import write_mini_commonsense
from mambapeft.data.tokenizer import build_tokenizer, load_tokenizer
from mambapeft.eval.lm_eval_model import MambaPeftLM
from mambapeft.eval.lm_eval_tasks import evaluate_choice_tasks, write_task_definitions
from mambapeft.models.checkpoints import save_lm
from mambapeft.models.lm import build_lm
from mambapeft.peft import apply_peft
from mambapeft.peft.state import save_adapter

LORAP_X = {"id": "lorap_x", "peft": [{"family": "lora", "name": "lora", "targets": ["mixer.in_proj"], "part": "x",
                                       "rank": 4, "scale": 0.1, "dropout": 0.0}]}


pytestmark = pytest.mark.usefixtures("isolated_datasets_cache")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A random mamba-mini LM with a BPE tokenizer trained on the test records, in the mamba_ssm layout."""
    directory = tmp_path_factory.mktemp("lm")
    texts = [json.dumps(record) for record, _, _ in CASES.values()] * 4
    build_tokenizer(texts, vocab_size=400, path=directory / "tokenizer.json")
    torch.manual_seed(0)
    save_lm(build_lm("mamba-mini", vocab_size=load_tokenizer(directory).vocab_size), directory)
    return directory


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The eight real tasks (one hand-written record each) and the mini tasks, as eval files."""
    root = tmp_path_factory.mktemp("commonsense")
    write_mini_commonsense(root, seed=0, n_train=20, n_test=12)
    for name, (record, _, _) in CASES.items():
        path = root / "eval" / name / f"{language_task('commonsense', name)['split']}.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record) + "\n")
    return root


def _lm_eval_tasks(names, data_root, scratch):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(write_task_definitions(names, data_root, scratch)), include_defaults=False)
    return manager.load(list(names))["tasks"]


@pytest.mark.parametrize("name", list(CASES))
def test_lm_eval_builds_the_real_tasks_requests_from_our_definitions(name, data_root, tmp_path):
    task = _lm_eval_tasks([name], data_root, tmp_path)[name]
    task.build_all_requests(rank=0, world_size=1)
    _, requests, gold = CASES[name]
    assert [instance.args for instance in task.instances] == requests
    doc = next(iter(task.eval_docs))
    # lm-eval's gold: the target index, or for a multiple-input task (WinoGrande) doc_to_text's
    assert (task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)) == gold


def _reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One unpadded forward of context + continuation; lm-eval's split of the tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([whole]))[0].float(), -1)  # (L, V)
    return float(sum(log_probs[t - 1, whole[t]] for t in range(n_context, len(whole))))


def test_lm_eval_scores_through_the_adapter_equal_a_direct_computation(lm_dir, data_root):
    names = [*CASES, "mini_arc", "mini_boolq"]
    lm = MambaPeftLM(backbone=str(lm_dir), batch_size=5, device="cpu")
    results, rows = evaluate_choice_tasks(lm, names, data_root)
    for name in names:
        task = mc_task(name)
        docs = task.load(data_root / "eval" / name / f"{task.split}.jsonl")
        correct = {"acc": 0, "acc_norm": 0}
        task_rows = sorted((r for r in rows if r["task"] == name), key=lambda r: r["doc_id"])
        assert len(task_rows) == len(docs) == results[name]["n"]
        for doc, row in zip(docs, task_rows):
            lls = [_reference_loglikelihood(lm.model, lm.text_tokenizer, c, x) for c, x in task.requests(doc)]
            assert row["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
            lengths = [len(choice) for choice in task.choices(doc)]
            correct["acc"] += max(range(len(lls)), key=lambda i: lls[i]) == task.gold(doc)
            correct["acc_norm"] += max(range(len(lls)), key=lambda i: lls[i] / lengths[i]) == task.gold(doc)
        for metric in task.metrics:
            assert results[name][metric] == pytest.approx(100.0 * correct[metric] / len(docs)), (name, metric)
        assert results[name]["report"] == task.report


def test_a_saved_adapter_scores_as_the_model_it_was_trained_on(lm_dir, tmp_path):
    model = build_lm("mamba-mini", vocab_size=load_tokenizer(lm_dir).vocab_size)
    from mambapeft.models.checkpoints import load_lm

    load_lm(model, lm_dir)
    peft = apply_peft(model, LORAP_X["peft"], "lorap_x")
    with torch.no_grad():
        for p in peft.trainable.values():
            p.normal_(0, 0.2)  # a trained-looking, non-zero adapter
    save_adapter(tmp_path / "adapter.safetensors", peft, LORAP_X)
    tokenizer = load_tokenizer(lm_dir)
    pairs = [(tokenizer.encode("Question: is ice cold?\nAnswer:"), tokenizer.encode(" yes"))]
    in_memory = MambaPeftLM.wrap(model.eval(), tokenizer, device=torch.device("cpu"), autocast=contextlib.nullcontext, batch_size=1)
    loaded = MambaPeftLM(backbone=str(lm_dir), adapter=str(tmp_path / "adapter.safetensors"), device="cpu")
    plain = MambaPeftLM(backbone=str(lm_dir), device="cpu")
    assert loaded._score(pairs)[0][0] == pytest.approx(in_memory._score(pairs)[0][0], abs=1e-5)
    assert loaded._score(pairs)[0][0] != pytest.approx(plain._score(pairs)[0][0], abs=1e-3)


def test_generation_and_rolling_loglikelihood(lm_dir):
    lm = MambaPeftLM(backbone=str(lm_dir), device="cpu", batch_size=2)
    prompts = ["Question: How do I dry a shirt?\nAnswer:", "Q: Tracy stayed out late.\nA:", "The sun is"]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 6}), i) for i, p in enumerate(prompts)]
    outputs = lm.generate_until(requests)
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([lm.tok_encode(prompt)])
        expected = lm.tok_decode([t for t in lm.model.generate(ids, 6, stop_ids=(lm.eot_token_id,))[0].tolist()
                                  if t != lm.eot_token_id]).split("\n")[0]
        assert output == expected
    text = "Ethanol fuel is ethyl alcohol."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.eot_token_id, *lm.tok_encode(text)]
    with torch.no_grad():
        log_probs = F.log_softmax(lm.model(torch.tensor([ids]))[0], -1)
    assert rolling == pytest.approx(float(sum(log_probs[t - 1, ids[t]] for t in range(1, len(ids)))), abs=1e-4)


def test_command_line_evaluates_a_backbone_on_local_tasks(lm_dir, data_root, tmp_path):
    command = [sys.executable, "-m", "mambapeft.cli", "lm-eval", "--data-root", str(data_root), "--model", "mambapeft",
               "--model_args", f"backbone={lm_dir}", "--device", "cpu", "--tasks", "piqa", "mini_boolq", "--batch_size", "4",
               "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    reported = json.loads(results_file.read_text())["results"]
    in_process, _ = evaluate_choice_tasks(MambaPeftLM(backbone=str(lm_dir), device="cpu"), ["piqa", "mini_boolq"], data_root)
    for name in ("piqa", "mini_boolq"):
        assert 100.0 * reported[name]["acc,none"] == pytest.approx(in_process[name]["acc"])


def test_missing_eval_file_and_empty_data_root_are_clear_errors(lm_dir, tmp_path):
    with pytest.raises(DataError, match=r"eval/piqa/validation.jsonl: eval file of task 'piqa' not found"):
        write_task_definitions(["piqa"], tmp_path, tmp_path / "scratch")
    done = subprocess.run([sys.executable, "-m", "mambapeft.cli", "lm-eval", "--data-root", str(tmp_path), "--model",
                           "mambapeft", "--model_args", f"backbone={lm_dir}", "--tasks", "piqa"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no commonsense eval file" in done.stderr
