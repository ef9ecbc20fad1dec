"""Orca-Math (microsoft/orca-math-word-problems-200k): its ``question`` / ``answer`` records read
through `datasets` from a local copy, the training text of the study that fine-tuned Mamba on it,
and an offline stand-in in the same format.

The local copy is the data root (config ``data.<id>.root``), in one of the layouts the Hub and
`datasets` write, found in this order:

- a ``save_to_disk`` directory (``dataset_dict.json`` or ``state.json`` at the root):
  ``load_from_disk``, split ``train`` of a DatasetDict;
- parquet files below the root (the Hub's ``data/train-00000-of-00001.parquet``);
- JSON lines files below the root (``*.jsonl`` / ``*.json``, one record per line).

The study's SFT script (DreamOnRain/Deep-Learning-Final-Project ``finetune/finetune.py``) trained
on ``question + answer``: the two strings joined with nothing between them and no template. The
tokenized cache (``data/token_cache.py``, layout ``documents``) ends each such text with eos.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import sha256_file
from .errors import DataError
from .mini_text.helpers import seeded_rng
from .mini_text.math import one_step, two_step
from .standin_text import write_parquet
from .text_corpus import open_corpus

FIELDS = ("question", "answer")  # joined in this order, with nothing between, into the training text
STANDIN_FILE = "data/train-00000-of-00001.parquet"  # the Hub repository's layout
ARROW_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at a dataset's root


def corpus_entry(root: str | Path) -> dict:
    """The local copy under ``root`` as a ``data/text_corpus.py`` entry whose text is question + answer."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no Orca-Math copy there; put microsoft/orca-math-word-problems-200k's "
                        "data/train-*.parquet (or a save_to_disk directory, or JSON lines) under it, or set the "
                        "data entry's `root`")
    if any((root / marker).is_file() for marker in ARROW_MARKERS):
        return {"path": str(root), "format": "arrow", "split": "train", "text_field": list(FIELDS)}
    for fmt, patterns in (("parquet", ("*.parquet",)), ("json", ("*.jsonl", "*.json"))):
        if any(next(root.rglob(pattern), None) for pattern in patterns):
            return {"path": str(root), "format": fmt, "text_field": list(FIELDS)}
    raise DataError(f"{root}: neither a save_to_disk directory nor parquet or JSON lines files; put the Hub "
                    f"dataset's data/train-*.parquet there")


def training_text(record: dict) -> str:
    """What the study trained on: the question, then the answer, with no separator or template."""
    return "".join(record[field] for field in FIELDS)


def _bad_field(record: dict) -> str | None:
    for field in FIELDS:
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            return f"{field!r} is {value!r}, not a non-empty string"
    return None


def check_orca_math(root: str | Path, task: str | None = None) -> dict:
    """Read every record of the copy under ``root``; a DataError names the first bad one."""
    entry = corpus_entry(root)
    n_records = n_characters = 0
    for batch in open_corpus(entry).iter(batch_size=1000):
        for offset, record in enumerate(dict(zip(batch, values)) for values in zip(*batch.values())):
            problem = _bad_field(record)
            if problem:
                raise DataError(f"{root}: record {n_records + offset} ({entry['format']} copy): {problem}; every "
                                "Orca-Math record needs a question and an answer (fix or drop it)")
            n_characters += len(training_text(record))
        n_records += len(next(iter(batch.values()), []))
    if n_records == 0:
        raise DataError(f"{root}: the Orca-Math copy holds no records")
    return {"kind": "orca_math", "task": task, "format": entry["format"],
            "splits": {"train": n_records, "val": None, "test": None}, "mean_characters": n_characters / n_records}


def _standin_record(rng: np.random.Generator) -> dict:
    """A word problem of the mini world with a worked answer, as Orca-Math's records read."""
    problem = (one_step if rng.random() < 0.5 else two_step)(rng)
    return {"question": problem.question, "answer": f"{problem.rationale} The answer is {problem.answer}."}


def write_mini_orca_math(root: str | Path, *, seed: int, n_train: int) -> dict:
    """The stand-in: ``n_train`` records in ``<root>/data/train-00000-of-00001.parquet``; returns its checksum."""
    rng = seeded_rng(seed, "orca_math")
    records = [_standin_record(rng) for _ in range(n_train)]
    path = Path(root) / STANDIN_FILE
    write_parquet(path, {field: [r[field] for r in records] for field in FIELDS})
    return {"files": {STANDIN_FILE: sha256_file(path)}, "counts": {STANDIN_FILE: len(records)}}
