"""The mini commonsense data: questions about the world of a seed, as LLM-Adapters training records
(`commonsense_170k.json`) and as the zero-shot eval sets `mini_arc` (ARC) and `mini_boolq` (BoolQ)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .helpers import a_or_an, others, pick, seeded_rng
from .world import CATEGORIES, COLOURS, PEOPLE, PLACES, SIZES, Thing, build_world, describe
from .writing import json_lines, json_list, write_all


@dataclass(frozen=True)
class Question:
    """A multiple-choice question: its text, the options and the index of the right one."""

    text: str
    options: list[str]
    gold: int


POOLS = {"colour": COLOURS, "place": PLACES, "size": SIZES, "category": tuple(CATEGORIES)}


def _fact(thing: Thing, attribute: str, value: str) -> str:
    """A sentence giving `value` as the thing's colour or place, in the corpus's words."""
    return {"colour": f"The {thing.name} is {value}.", "place": f"The {thing.name} is in the {value}."}[attribute]


def _statement_question(rng: np.random.Generator, thing: Thing) -> Question:
    """ARC style with sentences as choices, so what the model knows about the thing decides its score."""
    attribute = pick(rng, ("colour", "place"))
    asked = {"colour": f"What colour is the {thing.name}?", "place": f"Where is the {thing.name}?"}[attribute]
    text = pick(rng, (f"Which of these is true about the {thing.name}?", f"What do you know about the {thing.name}?", asked))
    right = getattr(thing, attribute)
    return _shuffled(rng, text, _fact(thing, attribute, right), [_fact(thing, attribute, v) for v in others(rng, POOLS[attribute], right, 3)])


def _shuffled(rng: np.random.Generator, text: str, right: str, wrong: list[str]) -> Question:
    options = [right, *wrong]
    order = [int(i) for i in rng.permutation(len(options))]
    return Question(text, [options[i] for i in order], order.index(0))


def _yes_no_fact(rng: np.random.Generator, thing: Thing) -> tuple[str, bool]:
    """A lower-case yes/no question about `thing` (BoolQ style, no '?') and its truth."""
    truth = bool(rng.random() < 0.5)
    attribute = pick(rng, tuple(POOLS))
    value = getattr(thing, attribute) if truth else others(rng, POOLS[attribute], getattr(thing, attribute), 1)[0]
    question = {
        "colour": f"is the {thing.name} {value}",
        "place": f"is the {thing.name} in the {value}",
        "size": f"is the {thing.name} {value}",
        "category": f"is the {thing.name} {a_or_an(value)}",
    }[attribute]
    return question, truth


def _story(rng: np.random.Generator, world: list[Thing], thing: Thing) -> str:
    """The context of a training record: all four facts about `thing`, sometimes some about another thing."""
    sentences = [describe(rng, thing, n_facts=4)]
    if rng.random() < 0.5:
        sentences.append(describe(rng, pick(rng, [t for t in world if t != thing])))
    return " ".join(sentences[i] for i in rng.permutation(len(sentences)))


# LLM-Adapters' instruction styles (see its dataset/<task>/test.json), one entry per source task.
def _adapters_boolq(rng, world, held_out) -> dict:
    question, truth = _yes_no_fact(rng, pick(rng, world))
    while question in held_out:  # a test question is never a training question
        question, truth = _yes_no_fact(rng, pick(rng, world))
    return _adapters_record(
        f"Please answer the following question with true or false, question: {question}?\n\nAnswer format: true/false",
        "true" if truth else "false",
    )


def _adapters_answers(rng, world, held_out) -> dict:
    """Social IQa style: a story, then what a person will do (Answer1..Answer3)."""
    thing = pick(rng, world)
    person = pick(rng, PEOPLE)
    q = _shuffled(rng, f"{_story(rng, world, thing)} {person} needs the {thing.name}. What will {person} do?",
                  f"go to the {thing.place}", [f"go to the {p}" for p in others(rng, PLACES, thing.place, 2)])
    listed = " ".join(f"Answer{i + 1}: {option}" for i, option in enumerate(q.options))
    return _adapters_record(
        f"Please choose the correct answer to the question: {q.text}\n\n{listed}\n\nAnswer format: answer1/answer2/answer3",
        f"answer{q.gold + 1}",
    )


def _adapters_solutions(rng, world, held_out) -> dict:
    """PIQA style: which of two actions reaches a goal (find a thing where it is)."""
    thing = pick(rng, world)
    person = pick(rng, PEOPLE)
    solutions = [f"Look in the {thing.place}.", f"Look in the {others(rng, PLACES, thing.place, 1)[0]}."]
    gold = int(rng.integers(2))
    if gold:
        solutions.reverse()
    return _adapters_record(
        f"Please choose the correct solution to the question: {_story(rng, world, thing)} {person} wants to find the {thing.name}.\n\n"
        f"Solution1: {solutions[0]}\n\nSolution2: {solutions[1]}\n\nAnswer format: solution1/solution2",
        f"solution{gold + 1}",
    )


def _adapters_blank(rng, world, held_out) -> dict:
    """WinoGrande style: which of two things fills the blank."""
    thing = pick(rng, world)
    other = pick(rng, [t for t in world if t.colour != thing.colour])
    options = [thing.name, other.name]
    gold = int(rng.integers(2))
    if gold:
        options.reverse()
    person = pick(rng, PEOPLE)
    return _adapters_record(
        f"Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"The {thing.name} is {thing.colour} and the {other.name} is {other.colour}, so {person} wants something {thing.colour} and takes the _.\n\n"
        f"Option1: {options[0]} Option2: {options[1]} Answer format: option1/option2",
        f"option{gold + 1}",
    )


def _adapters_endings(rng, world, held_out) -> dict:
    """HellaSwag style: the right continuation of a story."""
    thing = pick(rng, world)
    person = pick(rng, PEOPLE)
    places = [thing.place, *others(rng, PLACES, thing.place, 3)]
    order = [int(i) for i in rng.permutation(4)]
    listed = " ".join(f"Ending{i + 1}: takes the {thing.name} from the {places[j]}." for i, j in enumerate(order))
    return _adapters_record(
        f"Please choose the correct ending to complete the given sentence: Tidying up: {_story(rng, world, thing)} {person}\n\n"
        f"{listed}\n\nAnswer format: ending1/ending2/ending3/ending4",
        f"ending{order.index(0) + 1}",
    )


def _adapters_record(instruction: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


ADAPTERS_STYLES = (_adapters_boolq, _adapters_answers, _adapters_solutions, _adapters_blank, _adapters_endings)


def _arc_record(rng, world, index: int) -> dict:
    q = _statement_question(rng, pick(rng, world))
    labels = [chr(ord("A") + i) for i in range(len(q.options))]
    return {"id": f"mini_arc_{index:05d}", "question": q.text, "choices": {"text": q.options, "label": labels}, "answerKey": labels[q.gold]}


def _boolq_record(rng, world, index: int) -> dict:
    thing = pick(rng, world)
    question, truth = _yes_no_fact(rng, thing)
    neighbour = pick(rng, [t for t in world if t != thing])
    sentences = [describe(rng, thing, n_facts=4), describe(rng, neighbour)]  # the passage holds the evidence
    if rng.random() < 0.5:
        sentences.reverse()
    return {"idx": index, "passage": " ".join(sentences), "question": question, "label": int(truth)}


def write_mini_commonsense(root: str | Path, *, seed: int, n_train: int = 2000, n_test: int = 200) -> dict:
    """Write `commonsense_170k.json` and eval/{mini_arc,mini_boolq}/test.jsonl under `root`; return a manifest.

    The test sets are drawn first, so that training can avoid their questions.
    Manifest: {files: {relative path: sha256}, counts: {relative path: records}}.
    """
    root = Path(root)
    world = build_world(seed)
    rng = seeded_rng(seed, "commonsense")
    arc = [_arc_record(rng, world, i) for i in range(n_test)]
    boolq = [_boolq_record(rng, world, i) for i in range(n_test)]
    held_out = {record["question"] for record in boolq}
    styles = rng.choice(len(ADAPTERS_STYLES), size=n_train)
    train = [ADAPTERS_STYLES[style](rng, world, held_out) for style in styles]
    return write_all(root, {
        "commonsense_170k.json": (json_list(train), len(train)),
        "eval/mini_arc/test.jsonl": (json_lines(arc), len(arc)),
        "eval/mini_boolq/test.jsonl": (json_lines(boolq), len(boolq)),
    })
