"""lm-eval formatting of the commonsense tasks, checked on hand-written records.

Expected strings follow the lm-evaluation-harness task YAMLs (super_glue/boolq, piqa, siqa,
hellaswag + utils.py, winogrande + preprocess_winogrande.py, arc, openbookqa): zero-shot context
= doc_to_text, continuation = " " + choice (WinoGrande: per-option context, shared continuation).
"""

import json

import pytest

from choice_cases import CASES
from mambapeft.data.choice_formats import mc_task, mc_task_names
from mambapeft.data.errors import DataError


def _load_one(task, doc, tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(doc) + "\n\n")  # trailing blank line is skipped
    docs = task.load(path)
    assert len(docs) == 1
    return docs[0]


@pytest.mark.parametrize("name", list(CASES))
def test_requests_and_gold_match_lm_eval(name, tmp_path):
    record, requests, gold = CASES[name]
    task = mc_task(name)
    doc = _load_one(task, record, tmp_path)
    assert task.requests(doc) == requests
    assert task.gold(doc) == gold
    assert task.target_delimiter == " "


def test_choices_are_lm_evals_doc_to_choice(tmp_path):
    task = mc_task("hellaswag")
    doc = _load_one(task, CASES["hellaswag"][0], tmp_path)
    assert task.choices(doc) == [", the man adds wax.", "Get a scraper. Scrape the car Gently.", "he leaves.", "the man continues."]
    wino = mc_task("winogrande")
    assert wino.choices(CASES["winogrande"][0]) == [context for context, _ in CASES["winogrande"][1]]


def test_mini_tasks_reuse_the_real_formats(tmp_path):
    assert {"mini_arc", "mini_boolq"} <= set(mc_task_names())
    for mini, real in (("mini_arc", "arc_challenge"), ("mini_boolq", "boolq")):
        record, requests, gold = CASES[real]
        doc = _load_one(mc_task(mini), record, tmp_path)
        assert mc_task(mini).requests(doc) == requests and mc_task(mini).gold(doc) == gold


def test_metadata_from_the_task_table():
    assert mc_task("hellaswag").metrics == ("acc", "acc_norm") and mc_task("hellaswag").report == "acc_norm"
    assert mc_task("boolq").split == "validation" and mc_task("openbookqa").split == "test"


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError, match="unknown commonsense task 'siqa'.*boolq, piqa, social_iqa"):
        mc_task("siqa")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "eval.jsonl:2: not valid JSON"),
        ('{"question": "q", "answerKey": "A"}', r"eval.jsonl:2: record lacks \['choices'\]"),
        ('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}', "eval.jsonl:2: record does not fit"),
    ],
)
def test_bad_eval_records_name_file_and_line(tmp_path, line, message):
    good = json.dumps(CASES["arc_challenge"][0])
    path = tmp_path / "eval.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        mc_task("arc_easy").load(path)


def test_gold_outside_choices_and_empty_file_are_refused(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(dict(CASES["piqa"][0], label=2)) + "\n")
    with pytest.raises(DataError, match="eval.jsonl:1: gold index 2 is outside the 2 choices"):
        mc_task("piqa").load(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="eval.jsonl: eval file for task 'piqa' is empty"):
        mc_task("piqa").load(path)
