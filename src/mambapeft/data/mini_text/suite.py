"""Offline stand-ins of the lm-eval suite's tasks (language/tasks.yaml, family ``lm_eval_suite``):
records in each real dataset's Hugging Face format, about the world of a seed and its word problems,
written as ``eval/<task>/<split>.jsonl`` so the tasks' own lm-eval definitions read them unchanged.

They test the pipeline (every output type of the suite: multiple choice, rolling and last-word
log-likelihood, 5-shot generation), not a model: the numbers mean nothing beside the real tasks'."""

from pathlib import Path

import numpy as np

from mambapeft.data.errors import DataError
from mambapeft.data.language_tasks import task_splits

from .commonsense import _statement_question
from .helpers import others, pick, seeded_rng
from .math import one_step, two_step
from .world import PEOPLE, Thing, build_world, describe
from .writing import json_lines, write_all

LETTERS = "abcde"


def _choice_record(rng: np.random.Generator, world: list[Thing]):
    thing = pick(rng, world)
    return thing, _statement_question(rng, thing)


def _arc(rng, world, index: int) -> dict:
    _, q = _choice_record(rng, world)
    labels = [chr(ord("A") + i) for i in range(len(q.options))]
    return {"id": f"standin_{index:05d}", "question": q.text, "choices": {"text": q.options, "label": labels},
            "answerKey": labels[q.gold]}


def _openbookqa(rng, world, index: int) -> dict:
    record = _arc(rng, world, index)
    return {"id": record["id"], "question_stem": record.pop("question"), "choices": record["choices"],
            "answerKey": record["answerKey"]}


def _hellaswag(rng, world, index: int) -> dict:
    thing, q = _choice_record(rng, world)
    return {"ind": index, "activity_label": thing.category, "ctx_a": describe(rng, thing, n_facts=2),
            "ctx_b": "then", "ctx": "", "endings": q.options, "label": str(q.gold), "split": "val",
            "split_type": "indomain", "source_id": f"standin~{index}"}


def _winogrande(rng, world, index: int) -> dict:
    person, other = others(rng, PEOPLE, None, 2)
    thing = pick(rng, world)
    return {"sentence": f"{person} gave the {thing.name} to {other} because _ did not want it.",
            "option1": person, "option2": other, "answer": "1"}


def _cola(rng, world, index: int) -> dict:
    sentence = describe(rng, pick(rng, world), n_facts=1)
    acceptable = bool(rng.random() < 0.7)
    if not acceptable:  # CoLA's unacceptable sentences break word order
        words = sentence.split()
        sentence = " ".join(words[i] for i in rng.permutation(len(words)))
    return {"sentence": sentence, "label": int(acceptable), "idx": index}


def _mathqa(rng, world, index: int) -> dict:
    problem = one_step(rng)
    wrong = [int(v) for v in others(rng, range(problem.answer + 25), problem.answer, 4)]
    values = [problem.answer, *wrong]
    order = [int(i) for i in rng.permutation(5)]
    options = " , ".join(f"{LETTERS[k]} ) {values[i]}" for k, i in enumerate(order))
    return {"Problem": problem.question, "Rationale": f'"{problem.rationale}"', "options": options,
            "correct": LETTERS[order.index(0)], "annotated_formula": "", "linear_formula": "", "category": "general"}


def _wikitext(rng, world, index: int) -> dict:
    things = [pick(rng, world) for _ in range(4)]
    title = things[0].name.title()
    body = " ".join(describe(rng, thing) for thing in things)
    return {"page": f" = {title} = \n \n {body} \n"}


def _lambada(rng, world, index: int) -> dict:
    thing = pick(rng, world)  # the last word is stated earlier in the passage, as LAMBADA's is
    return {"text": f"{describe(rng, thing, n_facts=3)} Everyone knew where the {thing.name} was: in the {thing.place}",
            "domain": None}


def _gsm8k(rng, world, index: int) -> dict:
    problem = two_step(rng)
    return {"question": problem.question, "answer": f"{problem.rationale}\n#### {problem.answer}"}


# Real dataset record format -> writer; language/tasks.yaml names each suite task's format.
FORMATS = {"arc": _arc, "openbookqa": _openbookqa, "hellaswag": _hellaswag, "winogrande": _winogrande, "cola": _cola,
           "mathqa": _mathqa, "wikitext": _wikitext, "lambada": _lambada, "gsm8k": _gsm8k}


def write_mini_suite(root: str | Path, entries: list[dict], *, seed: int, n_test: int, n_fewshot: int = 5) -> dict:
    """Write ``eval/<task>/<split>.jsonl`` for every suite task entry (its test split, ``n_test``
    records, and its few-shot split, ``n_fewshot``); return the manifest of the files."""
    world = build_world(seed)
    files = {}
    for entry in entries:
        if entry["format"] not in FORMATS:
            raise DataError(f"language/tasks.yaml: suite task '{entry['name']}' has format {entry['format']!r}; "
                            f"the stand-in writer knows {', '.join(FORMATS)}")
        rng = seeded_rng(seed, f"suite/{entry['name']}")
        for split, n in dict(zip(task_splits(entry), (n_test, n_fewshot))).items():
            records = [FORMATS[entry["format"]](rng, world, i) for i in range(n)]
            files[f"eval/{entry['name']}/{split}.jsonl"] = (json_lines(records), n)
    return write_all(Path(root), files)
