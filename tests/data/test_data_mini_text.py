"""Offline language stand-ins: corpus content, file formats, determinism, no test leakage."""

import json
import re

import pytest

from mambapeft.data import mini_text
from mambapeft.data.choice_formats import mc_task
from mambapeft.data.instruct import read_instruct_json
from mambapeft.data.math_answers import extract_answer, is_correct
from mambapeft.io import sha256_file


def test_corpus_is_plain_declarative_text():
    docs = mini_text.pretrain_corpus(seed=0, n_docs=400)
    assert len(docs) == 400 and all(doc.strip() for doc in docs)
    text = "\n".join(docs)
    for marker in ("Question:", "Answer:", "### Instruction", "### Response", "Below is an instruction", "the correct answer is"):
        assert marker not in text
    assert re.search(r"Now \w+ has \d+ \w+\.", text)  # arithmetic stories
    assert re.search(r"said (yes|no), the", text)  # yes/no only in reported speech
    assert mini_text.pretrain_corpus(seed=0, n_docs=400) == docs
    assert mini_text.pretrain_corpus(seed=1, n_docs=400) != docs



def test_corpus_uses_the_words_and_layout_of_the_prompt_formats():
    """Their tokens get trained embeddings upstream, which PEFT methods cannot train."""
    text = "\n".join(mini_text.pretrain_corpus(seed=0, n_docs=2000))
    words = ("Below", "instruction", "describes", "task", "Write", "response", "appropriately", "completes", "request",
             "Instruction", "Response", "Please", "choose", "correct", "answer", "question", "format", "true/false",
             "solution1", "option1", "ending1", "answer1", "fill in the blank", "What", "Which", "Where", ":", "?", "\n")
    assert [word for word in words if word not in text] == []
    assert "  \n\n" + " " * 16 + "### " in text and "\n" + " " * 16 + "\n" + " " * 16 + "### " in text

def test_corpus_states_the_facts_that_the_questions_ask():
    world = {thing.name: thing for thing in mini_text.build_world(0)}
    text = " ".join(mini_text.pretrain_corpus(seed=0, n_docs=2000))
    stated = sum(f"The {name} is {thing.colour}." in text for name, thing in world.items())
    assert stated > 0.8 * len(world)
    contradicted = [name for name, thing in world.items()
                    for colour in mini_text.COLOURS if colour != thing.colour and f"The {name} is {colour}." in text]
    assert contradicted == []


@pytest.fixture(scope="module")
def language_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_text")
    commonsense = mini_text.write_mini_commonsense(root, seed=2, n_train=300, n_test=60)
    math = mini_text.write_mini_math(root, seed=2, n_train=300, n_test=60)
    return root, commonsense, math


def test_commonsense_training_file_is_llm_adapters_format(language_root):
    root, manifest, _ = language_root
    records = read_instruct_json(root / "commonsense_170k.json")
    assert len(records) == 300 == manifest["counts"]["commonsense_170k.json"]
    for record in records:
        assert record["input"] == ""
        assert record["output"] == f"the correct answer is {record['answer']}"
        assert re.fullmatch(r"true|false|answer[1-5]|solution[12]|option[12]|ending[1-4]", record["answer"])
        assert record["instruction"].startswith(("Please answer the following question", "Please choose the correct"))
    assert len({record["answer"][:-1] if record["answer"][-1].isdigit() else "bool" for record in records}) == 5


def test_commonsense_eval_sets_load_as_real_lm_eval_tasks(language_root):
    root, manifest, _ = language_root
    for name in ("mini_arc", "mini_boolq"):
        task = mc_task(name)
        docs = task.load(root / "eval" / name / "test.jsonl")
        assert len(docs) == 60 == manifest["counts"][f"eval/{name}/test.jsonl"]
        golds = [task.gold(doc) for doc in docs]
        assert len(set(golds)) == len(task.choices(docs[0]))  # every answer position occurs
    boolq = mc_task("mini_boolq").load(root / "eval" / "mini_boolq" / "test.jsonl")
    assert all(not doc["question"].endswith("?") and doc["question"].islower() for doc in boolq)  # BoolQ style


def test_no_test_question_is_asked_in_training(language_root):
    root, _, _ = language_root
    training = (root / "commonsense_170k.json").read_text()
    arc = mc_task("mini_arc").load(root / "eval" / "mini_arc" / "test.jsonl")
    boolq = mc_task("mini_boolq").load(root / "eval" / "mini_boolq" / "test.jsonl")
    assert not [doc["question"] for doc in arc if doc["question"] in training]
    asked = {re.search(r"question: (.*)\?", r["instruction"]).group(1) for r in read_instruct_json(root / "commonsense_170k.json")
             if r["answer"] in ("true", "false")}
    assert not asked & {doc["question"] for doc in boolq}


def test_training_texts_state_the_facts_that_arc_asks(language_root):
    """Fine-tuning can help lm-eval's choice scoring only through its texts: they state the right
    choices' facts and never a wrong choice's."""
    root, _, _ = language_root
    training = (root / "commonsense_170k.json").read_text()
    arc = mc_task("mini_arc").load(root / "eval" / "mini_arc" / "test.jsonl")
    golds = [doc["choices"]["text"][mc_task("mini_arc").gold(doc)] for doc in arc]
    assert sum(gold in training for gold in golds) > 0.8 * len(golds)
    wrong = [text for doc, gold in zip(arc, golds) for text in doc["choices"]["text"] if text != gold]
    assert not [text for text in wrong if text in training]


def test_boolq_passages_hold_the_evidence(language_root):
    root, _, _ = language_root
    world = {thing.name: thing for thing in mini_text.build_world(2)}
    for doc in mc_task("mini_boolq").load(root / "eval" / "mini_boolq" / "test.jsonl"):
        name = doc["question"].split()[2]
        assert name in doc["passage"] and name in world


def test_math_files_and_answers(language_root):
    root, _, manifest = language_root
    train = read_instruct_json(root / "math_10k.json")
    assert len(train) == 300
    for path in ("math_10k.json", "eval/mini_addsub/test.json", "eval/mini_multiarith/test.json"):
        for record in read_instruct_json(root / path):
            answer = int(record["answer"])
            assert 0 <= answer <= 2 * mini_text.MAX_NUMBER
            assert record["output"].endswith(f"The answer is {answer}")
            assert is_correct(extract_answer(record["output"], "number"), record["answer"], "number")
            assert all(int(n) <= 2 * mini_text.MAX_NUMBER for n in re.findall(r"\d+", record["instruction"]))
    test_questions = {r["instruction"] for p in ("addsub", "multiarith") for r in read_instruct_json(root / f"eval/mini_{p}/test.json")}
    assert not test_questions & {r["instruction"] for r in train}
    assert manifest["counts"] == {"math_10k.json": 300, "eval/mini_addsub/test.json": 60, "eval/mini_multiarith/test.json": 60}


def test_two_step_problems_need_two_operations(language_root):
    root, _, _ = language_root
    for record in read_instruct_json(root / "eval" / "mini_multiarith" / "test.json"):
        assert len(re.findall(r" [-+*] ", record["output"])) == 2
    for record in read_instruct_json(root / "eval" / "mini_addsub" / "test.json"):
        assert len(re.findall(r" [-+*] ", record["output"])) == 1


def test_writers_are_deterministic_and_report_checksums(language_root, tmp_path):
    root, commonsense, math = language_root
    for relative, digest in {**commonsense["files"], **math["files"]}.items():
        assert sha256_file(root / relative) == digest
    assert mini_text.write_mini_commonsense(tmp_path, seed=2, n_train=300, n_test=60) == commonsense
    assert mini_text.write_mini_math(tmp_path, seed=2, n_train=300, n_test=60) == math
    assert mini_text.write_mini_math(tmp_path / "other", seed=3, n_train=300, n_test=60)["files"] != math["files"]
    json.loads((root / "math_10k.json").read_text())  # plain JSON list, as LLM-Adapters ships it
