"""Offline stand-ins for the dt_init study's corpora, in the Hub's on-disk formats, read through the
same `datasets` code as the real copies.

Under ``root``:

- ``openwebtext/train-00000-of-00001.parquet``: one document per row in column ``text``, as the
  parquet files of the Hub's OpenWebText; the documents are the mini LM corpus's
  (``data/mini_text``: plain English about one synthetic world);
- ``wikitext-2-raw-v1/test-00000-of-00001.parquet``: held-out documents of the same world as
  WikiText-2 raw's rows (``text``): article headings `` = Title = ``, one paragraph per row,
  empty rows around headings, punctuation split off by spaces as in WikiText;
- ``tokenizer.json``: a byte-level BPE in GPT-NeoX's format trained on the training documents
  (the stand-in for GPT-NeoX-20B's tokenizer);
- ``manifest.json`` (last): the files' sha256.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ..io import atomic_path, sha256_file, write_json_atomic
from .mini_text import pretrain_corpus
from .tokenizer import build_tokenizer

TRAIN_FILE = "openwebtext/train-00000-of-00001.parquet"
TEST_FILE = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
TOKENIZER_FILE = "tokenizer.json"
PARAGRAPHS_PER_ARTICLE = 8


def _wikitext_style(paragraph: str) -> str:
    """WikiText's spacing: punctuation is a token of its own (" , " and " . ")."""
    return " " + re.sub(r"\s*([.,:;!?])", r" \1", paragraph.replace("\n", " ")).strip() + " \n"


def wikitext_rows(paragraphs: list[str]) -> list[str]:
    """WikiText-2 raw's rows: per article an empty row, the heading, an empty row, its paragraphs."""
    rows: list[str] = []
    for start in range(0, len(paragraphs), PARAGRAPHS_PER_ARTICLE):
        rows += ["", f" = Notes {start // PARAGRAPHS_PER_ARTICLE + 1} = \n", ""]
        rows += [_wikitext_style(p) for p in paragraphs[start:start + PARAGRAPHS_PER_ARTICLE]]
    return rows


def write_parquet(path: Path, columns: dict[str, list[str]]) -> None:
    """One parquet file of string ``columns``, as the Hub's datasets store them."""
    with atomic_path(path) as temporary:
        pd.DataFrame(columns).to_parquet(temporary, index=False)


def write_standin(root: str | Path, manifest: str | Path, seed: int, n_train_docs: int, n_test_docs: int,
                  vocab_size: int) -> dict:
    """Write the stand-in corpora and tokenizer under ``root``, then ``manifest``."""
    root = Path(root)
    documents = pretrain_corpus(seed=seed, n_docs=n_train_docs + n_test_docs)  # one world, disjoint documents
    train, test = documents[:n_train_docs], documents[n_train_docs:]
    write_parquet(root / TRAIN_FILE, {"text": train})
    write_parquet(root / TEST_FILE, {"text": wikitext_rows(test)})
    build_tokenizer(train, vocab_size=vocab_size, path=root / TOKENIZER_FILE)
    record = {"source": "mini", "seed": seed, "n_train_docs": n_train_docs, "n_test_docs": n_test_docs,
              "vocab_size": vocab_size,
              "checksums": {name: sha256_file(root / name) for name in (TRAIN_FILE, TEST_FILE, TOKENIZER_FILE)}}
    write_json_atomic(manifest, record)
    return record
