"""The upstream corpus of the tiny Mamba LM: plain English about the world of a seed, small sums
told as stories, and prose and notes in the prompt formats' words and layout (no Q/A layout, no
prompt template)."""

import numpy as np

from .helpers import a_or_an, others, pick, seeded_rng, upper_first
from .math import one_step, two_step
from .world import CATEGORY_USES, COLOURS, MAX_NUMBER, PEOPLE, PLACES, SIZES, Thing, build_world, describe, pronoun

# --- sentences about things -------------------------------------------------------------------

def _category_sentence(rng: np.random.Generator, world: list[Thing]) -> str:
    thing = pick(rng, world)
    use = CATEGORY_USES[thing.category]
    return pick(rng, (
        f"{upper_first(a_or_an(thing.name))} is {a_or_an(thing.category)}. Every {thing.category} {use}.",
        f"The {thing.name} is {a_or_an(thing.category)}, so it {use}.",
        f"{upper_first(a_or_an(thing.category))} {use}. The {thing.name} is {a_or_an(thing.category)}.",
    ))


def _place_listing(rng: np.random.Generator, world: list[Thing]) -> str:
    place = pick(rng, PLACES)
    here = [thing.name for thing in world if thing.place == place]
    if not here:
        return f"There is nothing in the {place}."
    shown = [here[i] for i in rng.permutation(len(here))[:4]]
    listed = ", ".join(f"the {name}" for name in shown[:-1]) + (" and " if len(shown) > 1 else "") + f"the {shown[-1]}"
    return f"In the {place} there {'is' if len(shown) == 1 else 'are'} {listed}."


def _reported_speech(rng: np.random.Generator, world: list[Thing]) -> str:
    """Yes/no grounded in facts, told as a conversation in reported speech."""
    asker, answerer = others(rng, PEOPLE, None, 2)
    thing = pick(rng, world)
    attribute = pick(rng, ("colour", "place", "size"))
    true_value = getattr(thing, attribute)
    pool = {"colour": COLOURS, "place": PLACES, "size": SIZES}[attribute]
    asked = true_value if rng.random() < 0.5 else others(rng, pool, true_value, 1)[0]
    claim = {"colour": "is {}", "place": "is in the {}", "size": "is {}"}[attribute]
    said = "yes" if asked == true_value else "no"
    return f"{asker} asked if the {thing.name} {claim.format(asked)}. {answerer} said {said}, the {thing.name} {claim.format(true_value)}."


# --- arithmetic stories -----------------------------------------------------------------------

def _sum_fact(rng: np.random.Generator) -> str:
    """An arithmetic fact in words or in digits (the rationales of the math set use digits)."""
    a, b = (int(v) for v in rng.integers(0, MAX_NUMBER + 1, size=2))
    high, low = max(a, b), min(a, b)
    return pick(rng, (f"{a} plus {b} is {a + b}.", f"{high} minus {low} is {high - low}.",
                      f"{a} + {b} = {a + b}.", f"{high} - {low} = {high - low}."))


def _reported_count(rng: np.random.Generator) -> str:
    """A story, then someone asking how many there are and being told: prose, not a Q/A layout."""
    problem = pick(rng, (one_step, two_step))(rng)
    asker, answerer = others(rng, PEOPLE, None, 2)
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
    p, q = others(rng, PEOPLE, None, 2)
    thing = pick(rng, world)
    k = int(rng.integers(1, 5))
    sentences = (
        f"Below is a note that {p} wrote for {q}.",
        f"{p} gave {q} an instruction that describes a task, paired with an input that provides further context.",
        f"The instruction describes a task: {q} needs the {thing.name}.",
        f"{q} will write a response that appropriately completes the request.",
        f"Write a response, {p} said to {q}, and please complete the given sentence.",
        f"Please choose the correct answer, {p} said. {q} had to choose answer{k} or another answer.",
        f"{q} had to choose the correct solution to the problem, and solution{int(rng.integers(1, 3))} was the one.",
        f"The answer format on the sheet was {pick(rng, ('answer1/answer2/answer3', 'true/false', 'option1/option2', 'solution1/solution2', 'ending1/ending2/ending3/ending4'))}.",
        f"{p} likes to fill in the blank to complete a sentence, and {q} likes to pick the correct ending.",
        f"There were two options. Option1 was {a_or_an(thing.category)} and Option2 was not, so {q} took option1.",
        f"The story had four endings, and Ending{k} was the correct ending, so {q} wrote ending{k}.",
        f"Answer{k} on the sheet was wrong. The correct answer was another one.",
        f"{p} asked {q} a question: can we play now? {upper_first(pronoun(q))} said that is a good question.",
        f"Question {k} was about the {thing.name}, and {q} wrote the answer in the format {p} asked for.",
        f"{q} wants to find the {thing.name}. Look in the {thing.place}, {p} said, so {q} takes the {thing.name} from the {thing.place}.",
        f"{p} wondered what {q} will do. {upper_first(pronoun(q))} will go to the {thing.place}, where the {thing.name} is.",
        f"Tidying up: {p} puts the {thing.name} back in the {thing.place}.",
        f"It is true that the {thing.name} is {thing.colour}. It is false that the {thing.name} is {others(rng, COLOURS, thing.colour, 1)[0]}.",
        "On the sheet, the Instruction part describes a task and the Response part is for the answer.",
        f"Solution{k % 2 + 1} was the better way to do it, and Option{k % 2 + 1} was the better choice.",
        f"{p} read the following sentence with a blank, _, in it, and filled in something {thing.colour}.",
        f"How nice, {p} said, when {q} knew about the {thing.name}.",
        f"What {q} knows about the {thing.name} is that it is {thing.size}.",
        f"Which things are in the {thing.place}, {p} knows: the {thing.name} is one of them.",
        f"Where the {thing.name} is, {q} knows. It is in the {thing.place}.",
        f"It is true that the {thing.name} is in the {thing.place}, and it is false that it is in the {others(rng, PLACES, thing.place, 1)[0]}.",
    )
    order = rng.permutation(len(sentences))[:int(rng.integers(3, 6))]
    return pick(rng, (" ", "\n", "\n\n")).join(sentences[i] for i in order)


def _notes(rng: np.random.Generator, world: list[Thing]) -> str:
    """A note with headings and indented lines, the layout (not the words) of the prompt template."""
    person = pick(rng, PEOPLE)
    places = others(rng, PLACES, None, int(rng.integers(1, 3)))
    sections = []
    for place in places:
        here = [thing for thing in world if thing.place == place] or world
        lines = [describe(rng, pick(rng, here), n_facts=int(rng.integers(1, 3))) for _ in range(int(rng.integers(1, 3)))]
        sections.append(f"### {upper_first(place)}:{INDENT}" + INDENT.join(lines))
    return f"{person} wrote these notes about the house.  \n\n" + " " * 16 + (INDENT + INDENT).join(sections)


# --- the corpus -------------------------------------------------------------------------------

def pretrain_corpus(*, seed: int, n_docs: int) -> list[str]:
    """Plain-English documents about the world of `seed` (no Q/A layout, no prompt template)."""
    world = build_world(seed)
    rng = seeded_rng(seed, "corpus")
    makers = (
        lambda: " ".join(describe(rng, pick(rng, world)) for _ in range(int(rng.integers(1, 4)))),
        lambda: _category_sentence(rng, world) + " " + describe(rng, pick(rng, world)),
        lambda: _place_listing(rng, world) + " " + describe(rng, pick(rng, world)),
        lambda: _reported_speech(rng, world),
        lambda: one_step(rng).statement,
        lambda: two_step(rng).statement,
        lambda: " ".join(_sum_fact(rng) for _ in range(int(rng.integers(1, 4)))),
        lambda: _reported_count(rng),
        lambda: _task_talk(rng, world),
        lambda: _notes(rng, world),
    )
    weights = np.array([4, 2, 2, 2, 3, 2, 2, 2, 2, 1], dtype=float)
    kinds = rng.choice(len(makers), size=n_docs, p=weights / weights.sum())
    return [makers[kind]() for kind in kinds]
