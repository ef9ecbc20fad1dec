"""A corpus tokenized once into a memory-mapped token array, the cached intermediate every
training run and perplexity evaluation of a study reads.

Two files: ``<name>.bin``, the token ids as raw little-endian ``uint16`` (``uint32`` for a
vocabulary over 65,536), and ``<name>.json``, written last, which describes them (dtype, count,
tokenizer and source, the array's sha256). Layouts:

- ``documents`` (training text): every document followed by the tokenizer's eos, concatenated;
- ``joined`` (held-out text): the texts joined with blank lines (``"\\n\\n".join``, as Hugging
  Face's perplexity guide does for WikiText-2) and tokenized as one string; the metadata also
  counts its whitespace-separated words, for word-level perplexity;
- ``labelled`` (classification text, :func:`tokenize_labelled`): each text's tokens, nothing between,
  split after split; a third file, ``<name>.labels.bin`` (:data:`LABELS_DTYPE`), holds each text's
  token count and class label, and the metadata each split's first text and number of texts.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..io import CorruptFileError, atomic_path, sha256_file, write_bytes_atomic, write_json_atomic
from .errors import DataError
from .text_corpus import iter_texts
from .tokenizer import load_tokenizer

log = logging.getLogger("mambapeft.data")

LAYOUTS = ("documents", "joined")
LABELS_DTYPE = np.dtype("<i8")  # a labelled cache's (token count, label) of each text


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _batch_encoder(tokenizer):
    """``texts -> [ids of each]``, as ``tokenizer.encode`` gives them, by the Rust tokenizer's threads."""
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(tokenizer.source))
    return lambda texts: [encoding.ids for encoding in fast.encode_batch(texts, add_special_tokens=False)]


def _documents(entry: dict, tokenizer, handle, digest, dtype) -> dict:
    """Encode batch by batch and append each batch to ``handle``."""
    encode = _batch_encoder(tokenizer)
    n_tokens = n_documents = 0
    for batch, texts in enumerate(iter_texts(entry)):
        ids = np.concatenate([np.asarray([*ids, tokenizer.eos_id], dtype=dtype) for ids in encode(texts)])
        block = ids.tobytes()
        handle.write(block)
        digest.update(block)
        n_tokens, n_documents = n_tokens + len(ids), n_documents + len(texts)
        if batch % 100 == 99:
            log.info("%d documents, %d tokens", n_documents, n_tokens)
    return {"n_tokens": n_tokens, "n_documents": n_documents}


def _joined(entry: dict, tokenizer, handle, digest, dtype) -> dict:
    texts = [text for batch in iter_texts(entry) for text in batch]
    joined = "\n\n".join(texts)
    block = np.asarray(tokenizer.encode(joined), dtype=dtype).tobytes()
    handle.write(block)
    digest.update(block)
    return {"n_tokens": len(block) // dtype.itemsize, "n_documents": len(texts), "n_words": len(joined.split()),
            "n_characters": len(joined)}


WRITERS = {"documents": _documents, "joined": _joined}


def tokenize_corpus(entry: dict, tokenizer_path: str | Path, layout: str, tokens: Path, meta: Path) -> dict:
    """Tokenize corpus ``entry`` (``data/text_corpus.py``) into ``tokens`` (.bin), then ``meta`` (.json)."""
    if layout not in LAYOUTS:
        raise DataError(f"token layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    tokenizer = load_tokenizer(tokenizer_path)
    digest = hashlib.sha256()
    with atomic_path(tokens) as temporary, open(temporary, "wb") as handle:
        counts = WRITERS[layout](entry, tokenizer, handle, digest, token_dtype(tokenizer.vocab_size))
    if counts["n_tokens"] < 2:
        raise DataError(f"{entry['path']}: {counts['n_tokens']} token(s) after tokenization; the corpus is empty")
    return _write_meta(meta, tokens, layout, counts, digest, tokenizer, entry)


def _write_meta(meta: Path, tokens: Path, layout: str, counts: dict, digest, tokenizer, source: dict) -> dict:
    record = {"tokens": Path(tokens).name, "dtype": token_dtype(tokenizer.vocab_size).str, "layout": layout, **counts,
              "sha256": digest.hexdigest(), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
              "tokenizer": str(tokenizer.source), "tokenizer_sha256": sha256_file(tokenizer.source), "source": source}
    write_json_atomic(meta, record)  # last: the cache is complete
    log.info("%s: %d tokens of %d documents (%s)", tokens, counts["n_tokens"], counts["n_documents"], layout)
    return record


def tokenize_labelled(splits: dict[str, Iterable[list[dict]]], tokenizer_path: str | Path, source: dict,
                      tokens: Path, labels: Path, meta: Path) -> dict:
    """Labelled texts (batches of ``{"text", "label"}`` per split, in order) into ``tokens`` (.bin),
    ``labels`` (.labels.bin), then ``meta`` (.json), which records ``source`` (what the texts were read from)."""
    tokenizer = load_tokenizer(tokenizer_path)
    encode, dtype = _batch_encoder(tokenizer), token_dtype(tokenizer.vocab_size)
    digest, index, per_split = hashlib.sha256(), [], {}
    with atomic_path(tokens) as temporary, open(temporary, "wb") as handle:
        for split, batches in splits.items():
            first = len(index)  # the JSON's keys are sorted: each split records where it starts
            for batch in batches:
                for row, ids in zip(batch, encode([row["text"] for row in batch])):
                    block = np.asarray(ids, dtype=dtype).tobytes()
                    handle.write(block)
                    digest.update(block)
                    index.append((len(ids), int(row["label"])))
            per_split[split] = [first, len(index) - first]
    array = np.asarray(index, dtype=LABELS_DTYPE).reshape(-1, 2)
    write_bytes_atomic(labels, array.tobytes())
    counts = {"n_tokens": int(array[:, 0].sum()), "n_documents": len(array), "splits": per_split,
              "labels": Path(labels).name, "labels_sha256": sha256_file(labels)}
    return _write_meta(meta, tokens, "labelled", counts, digest, tokenizer, source)


def read_token_meta(meta: str | Path) -> dict:
    path = Path(meta)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is missing: tokenize the corpus first (rule tokenize_dt_init, "
                        "tokenize_text or tokenize_labelled)") from None
    except ValueError as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}); delete it and its .bin and re-run the "
                               "tokenization") from None


def load_tokens(meta: str | Path) -> tuple[np.memmap, dict]:
    """The token array described by ``meta`` (memory-mapped, read-only) and its metadata; a
    CorruptFileError when the array's size is not the one recorded."""
    record = read_token_meta(meta)
    path = Path(meta).parent / record["tokens"]
    dtype = np.dtype(record["dtype"])
    size = path.stat().st_size if path.is_file() else None
    if size != record["n_tokens"] * dtype.itemsize:
        raise CorruptFileError(f"{path} holds {size} bytes, not the {record['n_tokens']} {dtype.name} tokens {meta} "
                               "records; delete both and re-run the tokenization")
    return np.memmap(path, dtype=dtype, mode="r"), record


def load_labelled(meta: str | Path, split: str, min_tokens: int = 0, max_tokens: int | None = None) -> list[dict]:
    """``{"tokens", "label"}`` of the texts of ``split`` in a labelled cache whose token count is in
    [max(min_tokens, 1), max_tokens], in cache order; the others never become Python lists."""
    tokens, record = load_tokens(meta)
    path = Path(meta).parent / record["labels"]
    size = path.stat().st_size if path.is_file() else None
    if size != record["n_documents"] * 2 * LABELS_DTYPE.itemsize:
        raise CorruptFileError(f"{path} holds {size} bytes, not the (token count, label) of the "
                               f"{record['n_documents']} texts {meta} records; delete the three files and re-run "
                               "the tokenization")
    index = np.fromfile(path, dtype=LABELS_DTYPE).reshape(-1, 2)
    ends = np.cumsum(index[:, 0])
    first, count = record["splits"][split]
    lengths = index[first:first + count, 0]
    upper = np.inf if max_tokens is None else max_tokens
    kept = first + np.flatnonzero((lengths >= max(min_tokens, 1)) & (lengths <= upper))
    return [{"tokens": tokens[ends[i] - index[i, 0]:ends[i]].tolist(), "label": int(index[i, 1])}
            for i in kept.tolist()]
