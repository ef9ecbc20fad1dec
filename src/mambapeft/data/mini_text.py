"""Offline language stand-ins: one small synthetic world, told as plain text and asked about.

The world (a function of the seed) holds about forty things, each with a fixed category (an apple
is a fruit) and a colour, size and place drawn from the seed, plus people who own, buy and give
away countable items. Three products share it:

- `pretrain_corpus`: declarative English about the world and small sums told as stories, the
  upstream corpus of the tiny Mamba LM. It has no question/answer layout and no prompt template;
  yes/no appear only in reported speech ("Mia said yes, the apple is red."), which is what gives a
  pretrained model a chance on BoolQ-style questions zero-shot. Like web text, it also uses the
  prompt formats' words in prose ("Please choose the correct answer, Tom said.") and their layout
  (headings, indented lines) in notes, so that every prompt token has a trained embedding.
- `write_mini_commonsense`: `commonsense_170k.json` in the LLM-Adapters format (the instruction
  styles of its BoolQ, Social IQa, PIQA, WinoGrande and HellaSwag parts) and two zero-shot eval sets
  in the Hugging Face record formats of real lm-eval tasks: `mini_arc` (ARC) and `mini_boolq` (BoolQ).
  lm-eval scores the text of each choice, never the answer labels ("answer2") that the training
  outputs end with, so fine-tuning can only help through what its texts teach (train on inputs):
  like HellaSwag, PIQA and Social IQa contexts, every training context states a thing's colour,
  size, place and category in the corpus's own sentences. The corpus told the model these facts
  only partly (about four in five colours and half the places are its best guess after
  pretraining), and the ARC choices are such sentences ("The pear is in the barn."), so a model
  that learns the facts better scores better. No test question is asked in training: the ARC
  questions ("Where is the pear?") never appear there, and training BoolQ questions avoid the test's.
- `write_mini_math`: `math_10k.json` (LLM-Adapters format, a short rationale ending in the number)
  and the test sets `mini_addsub` (one step) and `mini_multiarith` (two steps), numbers 0-20.

Use the same seed for the corpus and the tasks: the questions are about the corpus's world.
Every random choice comes from a numpy Generator seeded by (seed, purpose), so the same seed
writes byte-identical files.
"""

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mambapeft.data.errors import DataError
from mambapeft.io import write_text_atomic

# --- the world --------------------------------------------------------------------------------

CATEGORIES = {
    "fruit": ("apple", "banana", "pear", "plum", "grape", "lemon", "cherry", "peach"),
    "animal": ("cat", "dog", "bird", "rabbit", "horse", "duck", "frog", "mouse"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "rake"),
    "toy": ("ball", "kite", "doll", "drum", "puzzle", "robot"),
    "vehicle": ("car", "bike", "boat", "bus", "truck", "train"),
    "piece of furniture": ("chair", "table", "bed", "lamp", "sofa", "shelf"),
}
# What every member of a category can do or is for, as a verb phrase.
CATEGORY_USES = {
    "fruit": "can be eaten",
    "animal": "is alive and can move",
    "tool": "helps you fix things",
    "toy": "is fun to play with",
    "vehicle": "can carry people",
    "piece of furniture": "belongs in a house",
}
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "pink")
SIZES = ("small", "big")
PLACES = ("kitchen", "garden", "garage", "bedroom", "park", "school", "barn", "shop")
PEOPLE = ("Tom", "Mia", "Sam", "Ana", "Ben", "Lily", "Max", "Emma", "Leo", "Zoe", "Jack", "Nina")
PRONOUNS = {"Tom": "he", "Sam": "he", "Ben": "he", "Max": "he", "Leo": "he", "Jack": "he"}  # others: she
ITEMS = {  # countable things for the arithmetic stories: singular -> plural
    "apple": "apples", "pencil": "pencils", "marble": "marbles", "book": "books", "cookie": "cookies",
    "shell": "shells", "stamp": "stamps", "card": "cards", "flower": "flowers", "egg": "eggs",
    "coin": "coins", "sticker": "stickers",
}
MAX_NUMBER = 20


@dataclass(frozen=True)
class Thing:
    name: str
    category: str
    colour: str
    size: str
    place: str


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def build_world(seed: int) -> list[Thing]:
    """The things of the world of `seed`, with their colour, size and place."""
    rng = _rng(seed, "world")
    return [
        Thing(name, category, str(rng.choice(COLOURS)), str(rng.choice(SIZES)), str(rng.choice(PLACES)))
        for category, names in CATEGORIES.items()
        for name in names
    ]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _upper_first(text: str) -> str:
    """Capitalise a sentence's first letter only (str.capitalize would lower-case names inside it)."""
    return text[0].upper() + text[1:]


def _pronoun(person: str) -> str:
    return PRONOUNS.get(person, "she")


def _others(rng: np.random.Generator, pool, exclude, k: int) -> list:
    """k distinct elements of `pool` other than `exclude`, in random order."""
    candidates = [item for item in pool if item != exclude]
    return [candidates[i] for i in rng.choice(len(candidates), size=k, replace=False)]


# --- sentences about things -------------------------------------------------------------------

def _describe(rng: np.random.Generator, thing: Thing, n_facts: int | None = None) -> str:
    """Varied declarative sentences stating `n_facts` of a thing's 4 facts (default: 2 to 4 of them)."""
    n = thing.name
    facts = [
        _pick(rng, (f"The {n} is {thing.colour}.", f"The {n} is {thing.colour} in colour.", f"It is a {thing.colour} {n}.")),
        _pick(rng, (f"The {n} is {thing.size}.", f"It is a {thing.size} {n}.", f"The {thing.colour} {n} is {thing.size}.")),
        _pick(rng, (f"The {n} is in the {thing.place}.", f"You can find the {n} in the {thing.place}.", f"In the {thing.place} there is the {thing.colour} {n}.")),
        _pick(rng, (f"{_upper_first(_a(n))} is {_a(thing.category)}.", f"The {n} is {_a(thing.category)}.")),
    ]
    order = rng.permutation(len(facts))
    n_facts = n_facts if n_facts is not None else int(rng.integers(2, len(facts) + 1))
    return " ".join(facts[i] for i in order[:n_facts])


def _category_sentence(rng: np.random.Generator, world: list[Thing]) -> str:
    thing = _pick(rng, world)
    use = CATEGORY_USES[thing.category]
    return _pick(rng, (
        f"{_upper_first(_a(thing.name))} is {_a(thing.category)}. Every {thing.category} {use}.",
        f"The {thing.name} is {_a(thing.category)}, so it {use}.",
        f"{_upper_first(_a(thing.category))} {use}. The {thing.name} is {_a(thing.category)}.",
    ))


def _place_listing(rng: np.random.Generator, world: list[Thing]) -> str:
    place = _pick(rng, PLACES)
    here = [thing.name for thing in world if thing.place == place]
    if not here:
        return f"There is nothing in the {place}."
    shown = [here[i] for i in rng.permutation(len(here))[:4]]
    listed = ", ".join(f"the {name}" for name in shown[:-1]) + (" and " if len(shown) > 1 else "") + f"the {shown[-1]}"
    return f"In the {place} there {'is' if len(shown) == 1 else 'are'} {listed}."


def _reported_speech(rng: np.random.Generator, world: list[Thing]) -> str:
    """Yes/no grounded in facts, told as a conversation in reported speech."""
    asker, answerer = _others(rng, PEOPLE, None, 2)
    thing = _pick(rng, world)
    attribute = _pick(rng, ("colour", "place", "size"))
    true_value = getattr(thing, attribute)
    pool = {"colour": COLOURS, "place": PLACES, "size": SIZES}[attribute]
    asked = true_value if rng.random() < 0.5 else _others(rng, pool, true_value, 1)[0]
    claim = {"colour": "is {}", "place": "is in the {}", "size": "is {}"}[attribute]
    said = "yes" if asked == true_value else "no"
    return f"{asker} asked if the {thing.name} {claim.format(asked)}. {answerer} said {said}, the {thing.name} {claim.format(true_value)}."


# --- arithmetic stories -----------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """A word problem: the story told as a question, its rationale and the answer."""

    question: str
    rationale: str
    answer: int
    statement: str  # the story told declaratively, with the result (for the corpus)


def _one_step(rng: np.random.Generator) -> Problem:
    person = _pick(rng, PEOPLE)
    other = _others(rng, PEOPLE, person, 1)[0]
    item = _pick(rng, list(ITEMS.values()))
    he = _pronoun(person)
    if rng.random() < 0.5:
        a, b = int(rng.integers(0, MAX_NUMBER + 1)), int(rng.integers(1, MAX_NUMBER + 1))
        gain = _pick(rng, (f"{he} buys {b} more {item}", f"{other} gives {person} {b} {item}", f"{he} finds {b} more {item}"))
        return Problem(
            question=f"{person} has {a} {item}. {_upper_first(gain)}. How many {item} does {person} have now?",
            rationale=f"{person} starts with {a} {item} and gets {b} more, so {a} + {b} = {a + b}.",
            answer=a + b,
            statement=f"{person} has {a} {item}. {_upper_first(gain)}. Now {person} has {a + b} {item}.",
        )
    a = int(rng.integers(1, MAX_NUMBER + 1))
    b = int(rng.integers(1, a + 1))
    loss = _pick(rng, (f"{he} gives {b} {item} to {other}", f"{he} loses {b} {item}", f"{he} uses {b} {item}"))
    return Problem(
        question=f"{person} has {a} {item}. {_upper_first(loss)}. How many {item} does {person} have left?",
        rationale=f"{person} starts with {a} {item} and {b} are gone, so {a} - {b} = {a - b}.",
        answer=a - b,
        statement=f"{person} has {a} {item}. {_upper_first(loss)}. Now {person} has {a - b} {item}.",
    )


def _two_step(rng: np.random.Generator) -> Problem:
    person = _pick(rng, PEOPLE)
    item = _pick(rng, list(ITEMS.values()))
    he = _pronoun(person)
    if rng.random() < 0.5:
        a, b = (int(v) for v in rng.integers(1, MAX_NUMBER + 1, size=2))
        c = int(rng.integers(1, a + b + 1))
        return Problem(
            question=f"{person} has {a} {item}. {_upper_first(he)} buys {b} more {item}. Then {he} gives away {c} {item}. How many {item} does {person} have now?",
            rationale=f"{person} has {a} + {b} = {a + b} {item} after buying. After giving away {c}, {a + b} - {c} = {a + b - c}.",
            answer=a + b - c,
            statement=f"{person} has {a} {item}. {_upper_first(he)} buys {b} more {item}. Then {he} gives away {c} {item}. Now {person} has {a + b - c} {item}.",
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


def _sum_fact(rng: np.random.Generator) -> str:
    """An arithmetic fact in words or in digits (the rationales of the math set use digits)."""
    a, b = (int(v) for v in rng.integers(0, MAX_NUMBER + 1, size=2))
    high, low = max(a, b), min(a, b)
    return _pick(rng, (f"{a} plus {b} is {a + b}.", f"{high} minus {low} is {high - low}.",
                       f"{a} + {b} = {a + b}.", f"{high} - {low} = {high - low}."))


def _reported_count(rng: np.random.Generator) -> str:
    """A story, then someone asking how many there are and being told: prose, not a Q/A layout."""
    problem = _pick(rng, (_one_step, _two_step))(rng)
    asker, answerer = _others(rng, PEOPLE, None, 2)
    story = problem.statement.rsplit(". ", 1)[0]  # without the closing "Now ... has N ..." sentence
    question = problem.question.rsplit(". ", 1)[1].rstrip("?")
    asked = question[0].lower() + question[1:]
    because = problem.rationale[0].lower() + problem.rationale[1:] if problem.rationale.startswith("The ") else problem.rationale
    return f"{story}. {asker} asked {asked}. {answerer} said it is {problem.answer}, because {because}"


# --- the words and layout of instructions ----------------------------------------------------
# The tokenizer keeps the prompt formats' strings as merges, as a web-text tokenizer would, and a
# web-text LM has met their words and layout in ordinary prose and notes. Without these documents
# their embeddings stay untrained (~14 nats per template token after pretraining), which a PEFT
# method, its embeddings frozen, cannot fix. They talk about tasks and answers but never pair a
# question with its answer, nor use the template's own header lines.
INDENT = "\n" + " " * 16  # line start of the Alpaca template's indented lines


def _task_talk(rng: np.random.Generator, world: list[Thing]) -> str:
    """Prose about people setting tasks and writing answers, in the instruction stems' words."""
    p, q = _others(rng, PEOPLE, None, 2)
    thing = _pick(rng, world)
    k = int(rng.integers(1, 5))
    sentences = (
        f"Below is a note that {p} wrote for {q}.",
        f"{p} gave {q} an instruction that describes a task, paired with an input that provides further context.",
        f"The instruction describes a task: {q} needs the {thing.name}.",
        f"{q} will write a response that appropriately completes the request.",
        f"Write a response, {p} said to {q}, and please complete the given sentence.",
        f"Please choose the correct answer, {p} said. {q} had to choose answer{k} or another answer.",
        f"{q} had to choose the correct solution to the problem, and solution{int(rng.integers(1, 3))} was the one.",
        f"The answer format on the sheet was {_pick(rng, ('answer1/answer2/answer3', 'true/false', 'option1/option2', 'solution1/solution2', 'ending1/ending2/ending3/ending4'))}.",
        f"{p} likes to fill in the blank to complete a sentence, and {q} likes to pick the correct ending.",
        f"There were two options. Option1 was {_a(thing.category)} and Option2 was not, so {q} took option1.",
        f"The story had four endings, and Ending{k} was the correct ending, so {q} wrote ending{k}.",
        f"Answer{k} on the sheet was wrong. The correct answer was another one.",
        f"{p} asked {q} a question: can we play now? {_upper_first(_pronoun(q))} said that is a good question.",
        f"Question {k} was about the {thing.name}, and {q} wrote the answer in the format {p} asked for.",
        f"{q} wants to find the {thing.name}. Look in the {thing.place}, {p} said, so {q} takes the {thing.name} from the {thing.place}.",
        f"{p} wondered what {q} will do. {_upper_first(_pronoun(q))} will go to the {thing.place}, where the {thing.name} is.",
        f"Tidying up: {p} puts the {thing.name} back in the {thing.place}.",
        f"It is true that the {thing.name} is {thing.colour}. It is false that the {thing.name} is {_others(rng, COLOURS, thing.colour, 1)[0]}.",
        "On the sheet, the Instruction part describes a task and the Response part is for the answer.",
        f"Solution{k % 2 + 1} was the better way to do it, and Option{k % 2 + 1} was the better choice.",
        f"{p} read the following sentence with a blank, _, in it, and filled in something {thing.colour}.",
        f"How nice, {p} said, when {q} knew about the {thing.name}.",
        f"What {q} knows about the {thing.name} is that it is {thing.size}.",
        f"Which things are in the {thing.place}, {p} knows: the {thing.name} is one of them.",
        f"Where the {thing.name} is, {q} knows. It is in the {thing.place}.",
        f"It is true that the {thing.name} is in the {thing.place}, and it is false that it is in the {_others(rng, PLACES, thing.place, 1)[0]}.",
    )
    order = rng.permutation(len(sentences))[:int(rng.integers(3, 6))]
    return _pick(rng, (" ", "\n", "\n\n")).join(sentences[i] for i in order)


def _notes(rng: np.random.Generator, world: list[Thing]) -> str:
    """A note with headings and indented lines, the layout (not the words) of the prompt template."""
    person = _pick(rng, PEOPLE)
    places = _others(rng, PLACES, None, int(rng.integers(1, 3)))
    sections = []
    for place in places:
        here = [thing for thing in world if thing.place == place] or world
        lines = [_describe(rng, _pick(rng, here), n_facts=int(rng.integers(1, 3))) for _ in range(int(rng.integers(1, 3)))]
        sections.append(f"### {_upper_first(place)}:{INDENT}" + INDENT.join(lines))
    return f"{person} wrote these notes about the house.  \n\n" + " " * 16 + (INDENT + INDENT).join(sections)


# --- upstream corpus --------------------------------------------------------------------------

def pretrain_corpus(*, seed: int, n_docs: int) -> list[str]:
    """Plain-English documents about the world of `seed` (no Q/A layout, no prompt template)."""
    world = build_world(seed)
    rng = _rng(seed, "corpus")
    makers = (
        lambda: " ".join(_describe(rng, _pick(rng, world)) for _ in range(int(rng.integers(1, 4)))),
        lambda: _category_sentence(rng, world) + " " + _describe(rng, _pick(rng, world)),
        lambda: _place_listing(rng, world) + " " + _describe(rng, _pick(rng, world)),
        lambda: _reported_speech(rng, world),
        lambda: _one_step(rng).statement,
        lambda: _two_step(rng).statement,
        lambda: " ".join(_sum_fact(rng) for _ in range(int(rng.integers(1, 4)))),
        lambda: _reported_count(rng),
        lambda: _task_talk(rng, world),
        lambda: _notes(rng, world),
    )
    weights = np.array([4, 2, 2, 2, 3, 2, 2, 2, 2, 1], dtype=float)
    kinds = rng.choice(len(makers), size=n_docs, p=weights / weights.sum())
    return [makers[kind]() for kind in kinds]


# --- commonsense: questions about the world ---------------------------------------------------

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
    attribute = _pick(rng, ("colour", "place"))
    asked = {"colour": f"What colour is the {thing.name}?", "place": f"Where is the {thing.name}?"}[attribute]
    text = _pick(rng, (f"Which of these is true about the {thing.name}?", f"What do you know about the {thing.name}?", asked))
    right = getattr(thing, attribute)
    return _shuffled(rng, text, _fact(thing, attribute, right), [_fact(thing, attribute, v) for v in _others(rng, POOLS[attribute], right, 3)])


def _shuffled(rng: np.random.Generator, text: str, right: str, wrong: list[str]) -> Question:
    options = [right, *wrong]
    order = [int(i) for i in rng.permutation(len(options))]
    return Question(text, [options[i] for i in order], order.index(0))


def _yes_no_fact(rng: np.random.Generator, thing: Thing) -> tuple[str, bool]:
    """A lower-case yes/no question about `thing` (BoolQ style, no '?') and its truth."""
    truth = bool(rng.random() < 0.5)
    attribute = _pick(rng, tuple(POOLS))
    value = getattr(thing, attribute) if truth else _others(rng, POOLS[attribute], getattr(thing, attribute), 1)[0]
    question = {
        "colour": f"is the {thing.name} {value}",
        "place": f"is the {thing.name} in the {value}",
        "size": f"is the {thing.name} {value}",
        "category": f"is the {thing.name} {_a(value)}",
    }[attribute]
    return question, truth


def _story(rng: np.random.Generator, world: list[Thing], thing: Thing) -> str:
    """The context of a training record: all four facts about `thing`, sometimes some about another thing."""
    sentences = [_describe(rng, thing, n_facts=4)]
    if rng.random() < 0.5:
        sentences.append(_describe(rng, _pick(rng, [t for t in world if t != thing])))
    return " ".join(sentences[i] for i in rng.permutation(len(sentences)))


# LLM-Adapters' instruction styles (see its dataset/<task>/test.json), one entry per source task.
def _adapters_boolq(rng, world, held_out) -> dict:
    question, truth = _yes_no_fact(rng, _pick(rng, world))
    while question in held_out:  # a test question is never a training question
        question, truth = _yes_no_fact(rng, _pick(rng, world))
    return _adapters_record(
        f"Please answer the following question with true or false, question: {question}?\n\nAnswer format: true/false",
        "true" if truth else "false",
    )


def _adapters_answers(rng, world, held_out) -> dict:
    """Social IQa style: a story, then what a person will do (Answer1..Answer3)."""
    thing = _pick(rng, world)
    person = _pick(rng, PEOPLE)
    q = _shuffled(rng, f"{_story(rng, world, thing)} {person} needs the {thing.name}. What will {person} do?",
                  f"go to the {thing.place}", [f"go to the {p}" for p in _others(rng, PLACES, thing.place, 2)])
    listed = " ".join(f"Answer{i + 1}: {option}" for i, option in enumerate(q.options))
    return _adapters_record(
        f"Please choose the correct answer to the question: {q.text}\n\n{listed}\n\nAnswer format: answer1/answer2/answer3",
        f"answer{q.gold + 1}",
    )


def _adapters_solutions(rng, world, held_out) -> dict:
    """PIQA style: which of two actions reaches a goal (find a thing where it is)."""
    thing = _pick(rng, world)
    person = _pick(rng, PEOPLE)
    solutions = [f"Look in the {thing.place}.", f"Look in the {_others(rng, PLACES, thing.place, 1)[0]}."]
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
    thing = _pick(rng, world)
    other = _pick(rng, [t for t in world if t.colour != thing.colour])
    options = [thing.name, other.name]
    gold = int(rng.integers(2))
    if gold:
        options.reverse()
    person = _pick(rng, PEOPLE)
    return _adapters_record(
        f"Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"The {thing.name} is {thing.colour} and the {other.name} is {other.colour}, so {person} wants something {thing.colour} and takes the _.\n\n"
        f"Option1: {options[0]} Option2: {options[1]} Answer format: option1/option2",
        f"option{gold + 1}",
    )


def _adapters_endings(rng, world, held_out) -> dict:
    """HellaSwag style: the right continuation of a story."""
    thing = _pick(rng, world)
    person = _pick(rng, PEOPLE)
    places = [thing.place, *_others(rng, PLACES, thing.place, 3)]
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
    q = _statement_question(rng, _pick(rng, world))
    labels = [chr(ord("A") + i) for i in range(len(q.options))]
    return {"id": f"mini_arc_{index:05d}", "question": q.text, "choices": {"text": q.options, "label": labels}, "answerKey": labels[q.gold]}


def _boolq_record(rng, world, index: int) -> dict:
    thing = _pick(rng, world)
    question, truth = _yes_no_fact(rng, thing)
    neighbour = _pick(rng, [t for t in world if t != thing])
    sentences = [_describe(rng, thing, n_facts=4), _describe(rng, neighbour)]  # the passage holds the evidence
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
    rng = _rng(seed, "commonsense")
    arc = [_arc_record(rng, world, i) for i in range(n_test)]
    boolq = [_boolq_record(rng, world, i) for i in range(n_test)]
    held_out = {record["question"] for record in boolq}
    styles = rng.choice(len(ADAPTERS_STYLES), size=n_train)
    train = [ADAPTERS_STYLES[style](rng, world, held_out) for style in styles]
    return _write_all(root, {
        "commonsense_170k.json": (_json_list(train), len(train)),
        "eval/mini_arc/test.jsonl": (_json_lines(arc), len(arc)),
        "eval/mini_boolq/test.jsonl": (_json_lines(boolq), len(boolq)),
    })


# --- math -------------------------------------------------------------------------------------

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
    rng = _rng(seed, "math")
    addsub = _distinct_problems(rng, _one_step, n_test, set())
    multiarith = _distinct_problems(rng, _two_step, n_test, set())
    held_out = {p.question for p in addsub + multiarith}
    n_one = n_train // 2
    train = _distinct_problems(rng, _one_step, n_one, held_out) + _distinct_problems(rng, _two_step, n_train - n_one, held_out)
    train = [train[i] for i in rng.permutation(len(train))]
    return _write_all(root, {
        "math_10k.json": (_json_list([_math_record(p) for p in train]), len(train)),
        "eval/mini_addsub/test.json": (_json_list([_math_record(p) for p in addsub]), len(addsub)),
        "eval/mini_multiarith/test.json": (_json_list([_math_record(p) for p in multiarith]), len(multiarith)),
    })


# --- writing ----------------------------------------------------------------------------------

def _json_list(records: list[dict]) -> str:
    return json.dumps(records, indent=4, ensure_ascii=False) + "\n"


def _json_lines(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _write_all(root: Path, files: dict[str, tuple[str, int]]) -> dict:
    checksums = {relative: write_text_atomic(root / relative, text) for relative, (text, _) in files.items()}
    return {"files": checksums, "counts": {relative: count for relative, (_, count) in files.items()}}
