"""Text corpora read through the `datasets` library from local copies, never from the Hub.

A corpus entry (config ``dt_init.train_text`` / ``test_text``) names its copy and the copy's format:

- ``arrow``: a directory written by ``save_to_disk`` (``load_from_disk``; a ``DatasetDict`` gives
  ``split``), memory-mapped, not copied;
- ``parquet``, ``text``, ``json``: a file, a directory (every file of that extension in it, sorted)
  or a glob, streamed by ``load_dataset(<format>, data_files=..., streaming=True)``: read in place,
  with no Arrow copy in the Hugging Face cache (OpenWebText would double its size on disk).

``text_field`` is the column holding the text (``text`` for OpenWebText and WikiText), or a list of
columns whose strings are joined, in order and with nothing between them, into each text
(Orca-Math's ``[question, answer]``).
"""
from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError

FILE_FORMATS = {"parquet": ".parquet", "text": ".txt", "json": ".json"}  # directory contents by format
FORMATS = ("arrow", *FILE_FORMATS)


def data_files(entry: dict) -> list[str]:
    """The files of a parquet/text/json entry: the path itself, a directory's files of the format's
    extension (``.json`` also ``.jsonl``), or a glob's matches; DataError when there are none."""
    path, fmt = Path(entry["path"]), entry["format"]
    if path.is_file():
        return [str(path)]
    suffixes = (FILE_FORMATS[fmt], ".jsonl") if fmt == "json" else (FILE_FORMATS[fmt],)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    else:
        files = sorted(glob.glob(str(path), recursive=True))
    if not files:
        raise DataError(f"{path}: no {fmt} files there; put the local copy of this corpus there (a file, a directory "
                        f"of *{' or *'.join(suffixes)} files or a glob) or set its `path` in the config")
    return files


def open_corpus(entry: dict):
    """The corpus as a `datasets` Dataset (arrow) or IterableDataset (files) with ``text_field``.
    Neither path asks the Hub anything: ``load_from_disk`` reads a directory, and the packaged
    builders (parquet, text, json) read the ``data_files`` they are given."""
    import datasets

    fmt = entry["format"]
    if fmt not in FORMATS:
        raise DataError(f"corpus format {fmt!r} is not supported; valid: {', '.join(FORMATS)}")
    if fmt == "arrow":
        corpus = _from_disk(Path(entry["path"]), entry.get("split"))
    else:
        corpus = datasets.load_dataset(fmt, data_files=data_files(entry), split="train", streaming=True)
    missing = [field for field in _text_fields(entry) if field not in (corpus.column_names or [field])]
    if missing:
        raise DataError(f"{entry['path']}: no column {missing[0]!r} (columns: {', '.join(corpus.column_names)}); "
                        "set the corpus's `text_field`")
    return corpus


def _text_fields(entry: dict) -> list[str]:
    field = entry.get("text_field", "text")
    return [field] if isinstance(field, str) else list(field)


def _from_disk(path: Path, split: str | None):
    import datasets

    if not path.is_dir():
        raise DataError(f"{path}: not found; save the corpus there with `datasets` (load_dataset(...).save_to_disk("
                        f"'{path}')) on a machine with network, or set its `path` in the config")
    corpus = datasets.load_from_disk(str(path))
    if isinstance(corpus, datasets.DatasetDict):
        if split not in corpus:
            raise DataError(f"{path} holds the splits {', '.join(corpus)}; set the corpus's `split` to one of them")
        corpus = corpus[split]
    return corpus


def iter_texts(entry: dict, batch_size: int = 1000) -> Iterator[list[str]]:
    """The corpus's texts in batches of ``batch_size``, in order."""
    fields = _text_fields(entry)
    for batch in open_corpus(entry).iter(batch_size=batch_size):
        yield ["".join(parts) for parts in zip(*(batch[field] for field in fields))]
