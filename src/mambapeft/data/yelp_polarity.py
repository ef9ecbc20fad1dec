"""Yelp polarity reviews: the text-classification setting of the learnable-input length study.

The data is a local copy of the Hugging Face dataset ``fancyzhx/yelp_polarity`` (formerly
``yelp_polarity``) in its published parquet layout, read in place with ``datasets``::

    <root>/plain_text/train-00000-of-00001.parquet    560,000 reviews: text (str), label (0 negative, 1 positive)
    <root>/plain_text/test-00000-of-00001.parquet     38,000 reviews

Any number of shards per split is accepted (``<split>-*.parquet``). The study trains on the
reviews of at most ``train_max_tokens`` tokens and tests on those of at least the first of
``test_lengths`` (128 and 512 with the GPT-NeoX tokenizer: "short -> long"); the lengths are counted
with the run's backbone tokenizer. Both splits are tokenized once per dataset and tokenizer into a
labelled token cache (:func:`tokenize_yelp`, ``data/token_cache.py``; rule tokenize_labelled), which
records the sha256 of the parquet files and of the tokenizer; training and evaluation take the reviews
of their lengths from it (:func:`cached_reviews`), after checking both.

``source: mini`` writes an offline stand-in in the same layout (:func:`write_standin`): reviews
built from sentiment and filler words, short and long, deterministic by seed. Each ends with a word
of its label (a closing verdict, its last token), so that a mini model learns the task in a few dozen CPU steps:
the stand-in tests the pipeline, not the study's claim.
"""
from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np

from ..io import sha256_file, write_bytes_atomic
from .errors import DataError
from .token_cache import load_labelled, read_token_meta, tokenize_labelled
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


def source_files(root: str | Path) -> dict[str, str]:
    """sha256 of every parquet file of both splits, by path under ``root``: what a token cache was built from."""
    return {str(p.relative_to(root)): sha256_file(p) for split in SPLITS for p in split_files(root, split)}


def _batches(root: str | Path, split: str, size: int = 1000):
    """The rows of ``split`` in lists of ``size`` (the tokenizer encodes a list on several threads)."""
    rows = read_split(root, split)
    while batch := list(itertools.islice(rows, size)):
        yield batch


def tokenize_yelp(root: str | Path, tokenizer_path: str | Path, tokens: Path, labels: Path, meta: Path) -> dict:
    """Every review of both splits, tokenized once into a labelled token cache (``mambapeft data tokenize``)."""
    source = {"dataset": HUB_DATASET, "root": str(root), "files": source_files(root)}
    return tokenize_labelled({split: _batches(root, split) for split in SPLITS}, tokenizer_path, source,
                             tokens, labels, meta)


def cached_reviews(meta: str | Path, root: str | Path, split: str, tokenizer: TextTokenizer, min_tokens: int = 0,
                   max_tokens: int | None = None) -> list[dict]:
    """``{"tokens", "label"}`` of the reviews of ``split`` whose token count is in [min_tokens, max_tokens],
    from the token cache ``meta``, once it is shown to hold ``root``'s files tokenized by ``tokenizer``."""
    record = read_token_meta(meta)
    rebuild = f"delete {meta} and re-run its tokenization (rule tokenize_labelled: `mambapeft data tokenize`)"
    if record.get("tokenizer_sha256") != sha256_file(tokenizer.source):
        raise DataError(f"{meta} was tokenized with {record.get('tokenizer')}, not with this run's tokenizer "
                        f"{tokenizer.source}; {rebuild}")
    if record.get("source", {}).get("files") != source_files(root):
        raise DataError(f"{meta} was tokenized from other files than the parquet files now under {root}; {rebuild}")
    kept = load_labelled(meta, split, min_tokens, max_tokens)
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
