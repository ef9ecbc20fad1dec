"""A corpus tokenized once into a memory-mapped token array, the cached intermediate every
training run and perplexity evaluation of a study reads.

Two files: ``<name>.bin``, the token ids as raw little-endian ``uint16`` (``uint32`` for a
vocabulary over 65,536), and ``<name>.json``, written last, which describes them (dtype, count,
tokenizer and source, the array's sha256). Layouts:

- ``documents`` (training text): every document followed by the tokenizer's eos, concatenated;
- ``joined`` (held-out text): the texts joined with blank lines (``"\\n\\n".join``, as Hugging
  Face's perplexity guide does for WikiText-2) and tokenized as one string; the metadata also
  counts its whitespace-separated words, for word-level perplexity.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from ..io import CorruptFileError, atomic_path, sha256_file, write_json_atomic
from .errors import DataError
from .text_corpus import iter_texts
from .tokenizer import load_tokenizer

log = logging.getLogger("mambapeft.data")

LAYOUTS = ("documents", "joined")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _documents(entry: dict, tokenizer, handle, digest, dtype) -> dict:
    """Encode batch by batch (the Rust tokenizer's threads) and append each batch to ``handle``."""
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(tokenizer.source))
    n_tokens = n_documents = 0
    for batch, texts in enumerate(iter_texts(entry)):
        ids = np.concatenate([np.asarray([*encoding.ids, tokenizer.eos_id], dtype=dtype)
                              for encoding in fast.encode_batch(texts, add_special_tokens=False)])
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
    dtype = token_dtype(tokenizer.vocab_size)
    digest = hashlib.sha256()
    with atomic_path(tokens) as temporary, open(temporary, "wb") as handle:
        counts = WRITERS[layout](entry, tokenizer, handle, digest, dtype)
    if counts["n_tokens"] < 2:
        raise DataError(f"{entry['path']}: {counts['n_tokens']} token(s) after tokenization; the corpus is empty")
    record = {"tokens": Path(tokens).name, "dtype": dtype.str, "layout": layout, **counts,
              "sha256": digest.hexdigest(), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
              "tokenizer": str(tokenizer.source), "tokenizer_sha256": sha256_file(tokenizer.source), "source": entry}
    write_json_atomic(meta, record)  # last: the cache is complete
    log.info("%s: %d tokens of %d documents (%s)", tokens, counts["n_tokens"], counts["n_documents"], layout)
    return record


def read_token_meta(meta: str | Path) -> dict:
    path = Path(meta)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is missing: tokenize the corpus first (rule tokenize_dt_init)") from None
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
