"""The world of a seed: about forty things, each with a fixed category and a colour, size and place
drawn from the seed, the people of the stories, and the sentences that state a thing's facts."""

from dataclasses import dataclass

import numpy as np

from .helpers import a_or_an, pick, seeded_rng, upper_first

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


def build_world(seed: int) -> list[Thing]:
    """The things of the world of `seed`, with their colour, size and place."""
    rng = seeded_rng(seed, "world")
    return [
        Thing(name, category, str(rng.choice(COLOURS)), str(rng.choice(SIZES)), str(rng.choice(PLACES)))
        for category, names in CATEGORIES.items()
        for name in names
    ]


def pronoun(person: str) -> str:
    return PRONOUNS.get(person, "she")


def describe(rng: np.random.Generator, thing: Thing, n_facts: int | None = None) -> str:
    """Varied declarative sentences stating `n_facts` of a thing's 4 facts (default: 2 to 4 of them)."""
    n = thing.name
    facts = [
        pick(rng, (f"The {n} is {thing.colour}.", f"The {n} is {thing.colour} in colour.", f"It is a {thing.colour} {n}.")),
        pick(rng, (f"The {n} is {thing.size}.", f"It is a {thing.size} {n}.", f"The {thing.colour} {n} is {thing.size}.")),
        pick(rng, (f"The {n} is in the {thing.place}.", f"You can find the {n} in the {thing.place}.", f"In the {thing.place} there is the {thing.colour} {n}.")),
        pick(rng, (f"{upper_first(a_or_an(n))} is {a_or_an(thing.category)}.", f"The {n} is {a_or_an(thing.category)}.")),
    ]
    order = rng.permutation(len(facts))
    n_facts = n_facts if n_facts is not None else int(rng.integers(2, len(facts) + 1))
    return " ".join(facts[i] for i in order[:n_facts])
