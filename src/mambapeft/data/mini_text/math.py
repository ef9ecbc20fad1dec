"""Arithmetic word problems about the people of the world, numbers 0-20, and the mini math data
written from them. The corpus tells the same stories as statements."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mambapeft.data.errors import DataError

from .helpers import others, pick, seeded_rng, upper_first
from .world import ITEMS, MAX_NUMBER, PEOPLE, pronoun
from .writing import json_list, write_all


@dataclass(frozen=True)
class Problem:
    """A word problem: the story told as a question, its rationale and the answer."""

    question: str
    rationale: str
    answer: int
    statement: str  # the story told declaratively, with the result (for the corpus)


def one_step(rng: np.random.Generator) -> Problem:
    person = pick(rng, PEOPLE)
    other = others(rng, PEOPLE, person, 1)[0]
    item = pick(rng, list(ITEMS.values()))
    he = pronoun(person)
    if rng.random() < 0.5:
        a, b = int(rng.integers(0, MAX_NUMBER + 1)), int(rng.integers(1, MAX_NUMBER + 1))
        gain = pick(rng, (f"{he} buys {b} more {item}", f"{other} gives {person} {b} {item}", f"{he} finds {b} more {item}"))
        return Problem(
            question=f"{person} has {a} {item}. {upper_first(gain)}. How many {item} does {person} have now?",
            rationale=f"{person} starts with {a} {item} and gets {b} more, so {a} + {b} = {a + b}.",
            answer=a + b,
            statement=f"{person} has {a} {item}. {upper_first(gain)}. Now {person} has {a + b} {item}.",
        )
    a = int(rng.integers(1, MAX_NUMBER + 1))
    b = int(rng.integers(1, a + 1))
    loss = pick(rng, (f"{he} gives {b} {item} to {other}", f"{he} loses {b} {item}", f"{he} uses {b} {item}"))
    return Problem(
        question=f"{person} has {a} {item}. {upper_first(loss)}. How many {item} does {person} have left?",
        rationale=f"{person} starts with {a} {item} and {b} are gone, so {a} - {b} = {a - b}.",
        answer=a - b,
        statement=f"{person} has {a} {item}. {upper_first(loss)}. Now {person} has {a - b} {item}.",
    )


def two_step(rng: np.random.Generator) -> Problem:
    person = pick(rng, PEOPLE)
    item = pick(rng, list(ITEMS.values()))
    he = pronoun(person)
    if rng.random() < 0.5:
        a, b = (int(v) for v in rng.integers(1, MAX_NUMBER + 1, size=2))
        c = int(rng.integers(1, a + b + 1))
        return Problem(
            question=f"{person} has {a} {item}. {upper_first(he)} buys {b} more {item}. Then {he} gives away {c} {item}. How many {item} does {person} have now?",
            rationale=f"{person} has {a} + {b} = {a + b} {item} after buying. After giving away {c}, {a + b} - {c} = {a + b - c}.",
            answer=a + b - c,
            statement=f"{person} has {a} {item}. {upper_first(he)} buys {b} more {item}. Then {he} gives away {c} {item}. Now {person} has {a + b - c} {item}.",
        )
    groups = int(rng.integers(2, 6))
    each = int(rng.integers(1, MAX_NUMBER // groups + 1))
    extra = int(rng.integers(0, MAX_NUMBER + 1))
    return Problem(
        question=f"{person} has {groups} bags with {each} {item} in each bag and {extra} more {item} on the table. How many {item} does {person} have in all?",
        rationale=f"The bags hold {groups} * {each} = {groups * each} {item}. With the {extra} on the table, {groups * each} + {extra} = {groups * each + extra}.",
        answer=groups * each + extra,
        statement=f"{person} has {groups} bags with {each} {item} in each bag and {extra} more {item} on the table. So {person} has {groups * each + extra} {item} in all.",
    )


def _math_record(problem: Problem) -> dict:
    return {
        "instruction": problem.question,
        "input": "",
        "output": f"{problem.rationale} The answer is {problem.answer}",
        "answer": str(problem.answer),
    }


def _distinct_problems(rng: np.random.Generator, make, n: int, exclude: set[str]) -> list[Problem]:
    """n problems with questions not in `exclude` (nor repeated), so test and train never share one."""
    problems, seen = [], set(exclude)
    for _ in range(100 * n + 1000):
        if len(problems) == n:
            return problems
        problem = make(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    raise DataError(f"could not draw {n} distinct word problems of this kind; lower n_train or n_test")


def write_mini_math(root: str | Path, *, seed: int, n_train: int = 2000, n_test: int = 200) -> dict:
    """Write `math_10k.json` and eval/{mini_addsub,mini_multiarith}/test.json under `root`; return a manifest.

    Training mixes one-step and two-step problems; no test question appears in training.
    Manifest: {files: {relative path: sha256}, counts: {relative path: records}}.
    """
    root = Path(root)
    rng = seeded_rng(seed, "math")
    addsub = _distinct_problems(rng, one_step, n_test, set())
    multiarith = _distinct_problems(rng, two_step, n_test, set())
    held_out = {p.question for p in addsub + multiarith}
    n_one = n_train // 2
    train = _distinct_problems(rng, one_step, n_one, held_out) + _distinct_problems(rng, two_step, n_train - n_one, held_out)
    train = [train[i] for i in rng.permutation(len(train))]
    return write_all(root, {
        "math_10k.json": (json_list([_math_record(p) for p in train]), len(train)),
        "eval/mini_addsub/test.json": (json_list([_math_record(p) for p in addsub]), len(addsub)),
        "eval/mini_multiarith/test.json": (json_list([_math_record(p) for p in multiarith]), len(multiarith)),
    })
