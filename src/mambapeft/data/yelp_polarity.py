"""Yelp polarity reviews: the text-classification setting of the learnable-input length study.

The data is a local copy of the Hugging Face dataset ``fancyzhx/yelp_polarity`` (formerly
``yelp_polarity``) in its published parquet layout, read in place with ``datasets``::

    <root>/plain_text/train-00000-of-00001.parquet    560,000 reviews: text (str), label (0 negative, 1 positive)
    <root>/plain_text/test-00000-of-00001.parquet     38,000 reviews

Any number of shards per split is accepted (``<split>-*.parquet``). The study trains on the
reviews of at most ``train_max_tokens`` tokens and tests on those of at least the first of
``test_lengths`` (128 and 512 with the GPT-NeoX tokenizer: "short -> long"); the lengths are counted
with the run's backbone tokenizer, so the split is made at training and evaluation time
(:func:`tokenized_reviews`).

``source: mini`` writes an offline stand-in in the same layout (:func:`write_standin`): reviews
built from sentiment and filler words, short and long, deterministic by seed. Each ends with a word
of its label (a closing verdict, its last token), so that a mini model learns the task in a few dozen CPU steps:
the stand-in tests the pipeline, not the study's claim.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..io import sha256_file, write_bytes_atomic
from .errors import DataError
from .tokenizer import TextTokenizer

HUB_DATASET = "fancyzhx/yelp_polarity"
CONFIG = "plain_text"
SPLITS = ("train", "test")
LABELS = ("negative", "positive")  # label ids 0 and 1 (the Hub's class names "1" and "2": star ratings)
NUM_CLASSES = len(LABELS)


def split_pattern(root: str | Path, split: str) -> Path:
    return Path(root) / CONFIG / f"{split}-*.parquet"


def split_files(root: str | Path, split: str) -> list[Path]:
    pattern = split_pattern(root, split)
    files = sorted(pattern.parent.glob(pattern.name))
    if not files:
        raise DataError(f"{pattern}: no file; put the parquet files of the Hub dataset {HUB_DATASET} "
                        f"({CONFIG}/{split}-*.parquet) under {root} (rule download_hub_dataset fetches them)")
    return files


def read_split(root: str | Path, split: str):
    """The rows of ``split`` ({"text", "label"}), streamed from the parquet files by ``datasets``."""
    import datasets

    files = [str(p) for p in split_files(root, split)]
    rows = datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=True)
    for index, row in enumerate(rows):
        if row.get("label") not in range(NUM_CLASSES) or not isinstance(row.get("text"), str):
            raise DataError(f"{files[0]} (split {split}, row {index}): expected a text string and a label in "
                            f"0..{NUM_CLASSES - 1}, got keys {sorted(row)}; is it {HUB_DATASET}?")
        yield row


def tokenized_reviews(root: str | Path, split: str, tokenizer: TextTokenizer, min_tokens: int = 0,
                      max_tokens: int | None = None) -> list[dict]:
    """``{"tokens", "label"}`` of the reviews of ``split`` whose token count is in [min_tokens, max_tokens]."""
    kept = []
    for row in read_split(root, split):
        tokens = tokenizer.encode(row["text"])
        if len(tokens) >= max(min_tokens, 1) and (max_tokens is None or len(tokens) <= max_tokens):
            kept.append({"tokens": tokens, "label": int(row["label"])})
    if not kept:
        raise DataError(f"{split_pattern(root, split)}: no review of {min_tokens}..{max_tokens or 'any'} tokens "
                        f"({tokenizer.source}); check train_max_tokens / test_lengths of the data entry")
    return kept


def check_yelp_polarity(root: str | Path, task: str | None = None) -> dict:
    """``data check --kind yelp_polarity``: every row of both splits read; counts per label."""
    summary = {"dataset": HUB_DATASET, "root": str(root)}
    for split in SPLITS:
        counts = np.zeros(NUM_CLASSES, dtype=int)
        characters = []
        for row in read_split(root, split):
            counts[row["label"]] += 1
            characters.append(len(row["text"]))
        summary[split] = {"n": int(counts.sum()), **{LABELS[i]: int(c) for i, c in enumerate(counts)},
                          "median_characters": int(np.median(characters)),
                          "files": [str(p) for p in split_files(root, split)]}
    return summary


# --- the offline stand-in -------------------------------------------------------------------------

WORDS = {
    0: ["awful", "rude", "cold", "bland", "dirty", "slow", "terrible", "overpriced", "stale", "worst"],
    1: ["great", "friendly", "fresh", "delicious", "clean", "quick", "amazing", "tasty", "lovely", "best"],
}
FILLER = ["the", "food", "service", "we", "ordered", "table", "and", "was", "our", "waiter", "place", "it",
          "dinner", "menu", "came", "with", "a", "to", "of", "they", "night", "drinks", "back", "again"]
SENTIMENT_SHARE = 0.25  # a review's words that carry its label; the rest are filler
STANDIN_WORDS = {"short": (6, 24), "long": (80, 160)}  # words per review: half short, half long


def standin_review(rng: np.random.Generator, label: int, words: int) -> str:
    """``words`` filler words with sentiment words of ``label`` scattered among them and last."""
    text = rng.choice(FILLER, size=words).tolist()
    marked = rng.choice(words - 1, size=int(SENTIMENT_SHARE * words), replace=False)
    for position in [*marked.tolist(), words - 1]:
        text[position] = str(rng.choice(WORDS[label]))
    return " ".join(text).capitalize()


def standin_rows(seed: int, split: str, n: int) -> list[dict]:
    """Half short and half long reviews (:data:`STANDIN_WORDS`), random labels, in a seeded random order."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    rows = []
    for i in range(n):
        low, high = STANDIN_WORDS["short" if i % 2 == 0 else "long"]
        label = int(rng.integers(0, NUM_CLASSES))
        rows.append({"label": label, "text": standin_review(rng, label, int(rng.integers(low, high + 1)))})
    return [rows[i] for i in rng.permutation(n).tolist()]


def write_standin(root: str | Path, entry: dict) -> dict:
    """The stand-in in the published layout: ``n_train`` and ``n_test`` reviews; returns the checksums."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seed = int(entry.get("seed", 0))
    checksums = {}
    for split, n in (("train", int(entry["n_train"])), ("test", int(entry["n_test"]))):
        rows = standin_rows(seed, split, n)
        table = pa.table({"text": [r["text"] for r in rows], "label": pa.array([r["label"] for r in rows], pa.int64())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        relative = f"{CONFIG}/{split}-00000-of-00001.parquet"
        write_bytes_atomic(Path(root) / relative, buffer.getvalue())
        checksums[relative] = sha256_file(Path(root) / relative)
    return checksums
