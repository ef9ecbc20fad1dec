"""What every generator of the stand-ins draws with: seeded random streams, random picks, and the
small pieces of English grammar (articles, capitals) their sentences need."""

import zlib

import numpy as np


def seeded_rng(seed: int, purpose: str) -> np.random.Generator:
    """The random stream of one purpose ("world", "corpus", ...): each product draws from its own, so
    the same seed writes byte-identical files and one product's draws never shift another's."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def others(rng: np.random.Generator, pool, exclude, k: int) -> list:
    """k distinct elements of `pool` other than `exclude`, in random order."""
    candidates = [item for item in pool if item != exclude]
    return [candidates[i] for i in rng.choice(len(candidates), size=k, replace=False)]


def a_or_an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def upper_first(text: str) -> str:
    """Capitalise a sentence's first letter only (str.capitalize would lower-case names inside it)."""
    return text[0].upper() + text[1:]
