"""Synthetic recall tasks of the learnable-input (prefix vs periodic tokens) length study.

Two generators, each a sequence whose last token is a query and whose answer is the token that
followed the first copy marker:

- ``induction_heads`` (Zoology's ``induction_head``, induction length 1, one trigger): random
  symbols with the trigger ``COPY`` ("=>" in Zoology) once, followed by a value; the trigger again
  at the end asks for that value. Zoology's ``vocab_size`` 16 counts its trigger and its unused noop
  token, so it draws from 14 symbols.
- ``needle`` (periodic_tuning's Needle): ``[random...] COPY needle [random...] PASTE``, 16 symbols.

Both use one vocabulary (:data:`VOCAB_SIZE` = 16 symbols + COPY, PASTE, PAD), so one base model
can be pretrained on both. A sequence's length counts every input token, the query included;
the answer is not part of the input.

On disk (``prepare_data`` writes it, ``data check --kind synthetic`` validates it)::

    <root>/synthetic.json                         index: vocabulary, generators, every file's lengths and size
    <root>/train/<train set>.jsonl                one {"tokens": [...], "answer": a} per line
    <root>/test/<generator>/length_<L>.jsonl      the same, every sequence of length L

A data entry names its training sets (``train_sets``: generator and setting) and the test lengths.
Setting ``short_long`` trains at lengths drawn uniformly from [min_length, max_length] (the study
trains at <= 256 and tests up to 4096); ``standard`` trains at the test lengths themselves. Every
file draws from its own seeded stream, so the same seed writes byte-identical files and adding a
training set or a length changes no other file.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import write_json_atomic, write_text_atomic
from .errors import DataError, where

SYMBOLS = 16
COPY, PASTE, PAD = 16, 17, 18
VOCAB_SIZE = 19
INDEX = "synthetic.json"
SETTINGS = ("short_long", "standard")
MIN_LENGTH = 3  # marker, value and query


@dataclass(frozen=True)
class Generator:
    """One task: how many symbols it draws from and the token that asks for the answer."""

    symbols: int
    query: int

    def example(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, int]:
        """(tokens (length,), answer): random symbols, COPY and the answer at a uniform position
        (the answer before the query), the query last."""
        tokens = rng.integers(0, self.symbols, length)
        marker = int(rng.integers(0, length - 2))
        tokens[marker] = COPY
        tokens[length - 1] = self.query
        return tokens, int(tokens[marker + 1])


GENERATORS: dict[str, Generator] = {
    "induction_heads": Generator(symbols=14, query=COPY),
    "needle": Generator(symbols=SYMBOLS, query=PASTE),
}


def generator(name: str) -> Generator:
    if name not in GENERATORS:
        raise DataError(f"unknown synthetic generator {name!r}; valid: {', '.join(GENERATORS)}")
    return GENERATORS[name]


def answer_of(tokens) -> int:
    """The answer of any sequence of either task: the token after the first COPY."""
    return int(tokens[list(tokens).index(COPY) + 1])


def seeded_rng(seed: int, *purpose: str) -> np.random.Generator:
    """The stream of one file (or one pretraining set): independent of every other file's."""
    return np.random.default_rng([seed, *(zlib.crc32(p.encode()) for p in purpose)])


def sample(name: str, lengths: Callable[[np.random.Generator], int], n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` records of generator ``name``, each of length ``lengths(rng)``."""
    task = generator(name)
    records = []
    for _ in range(n):
        tokens, answer = task.example(rng, lengths(rng))
        records.append({"tokens": tokens.tolist(), "answer": answer})
    return records


def uniform_lengths(low: int, high: int) -> Callable[[np.random.Generator], int]:
    if not MIN_LENGTH <= low <= high:
        raise DataError(f"synthetic lengths [{low}, {high}]: need {MIN_LENGTH} <= min_length <= max_length")
    return lambda rng: int(rng.integers(low, high + 1))


def choice_lengths(values: list[int]) -> Callable[[np.random.Generator], int]:
    if not values or min(values) < MIN_LENGTH:
        raise DataError(f"synthetic lengths {values}: need at least one length, each >= {MIN_LENGTH}")
    return lambda rng: int(values[int(rng.integers(len(values)))])


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def train_file(root: str | Path, train_set: str) -> Path:
    return Path(root) / "train" / f"{train_set}.jsonl"


def test_file(root: str | Path, generator_name: str, length: int) -> Path:
    return Path(root) / "test" / generator_name / f"length_{length}.jsonl"


def train_lengths(definition: dict, test_lengths: list[int]) -> dict:
    """The length rule of a training set: ``{"range": [lo, hi]}`` (short_long) or ``{"choices": [...]}`` (standard)."""
    if definition["setting"] == "standard":
        return {"choices": sorted(test_lengths)}
    return {"range": [int(definition.get("min_length", MIN_LENGTH)), int(definition["max_length"])]}


def _length_rule(lengths: dict) -> Callable[[np.random.Generator], int]:
    return uniform_lengths(*lengths["range"]) if "range" in lengths else choice_lengths(lengths["choices"])


def _train_definition(entry: dict, name: str) -> dict:
    train_sets = entry["train_sets"]
    if name not in train_sets:
        raise DataError(f"task {name!r} is not a training set of this synthetic data entry; "
                        f"declare it under data/<id>/train_sets (declared: {', '.join(train_sets) or 'none'})")
    definition = train_sets[name]
    generator(definition.get("generator"))
    if definition.get("setting") not in SETTINGS:
        raise DataError(f"train_sets/{name}/setting must be one of {SETTINGS}, got {definition.get('setting')!r}")
    if definition["setting"] == "short_long" and "max_length" not in definition:
        raise DataError(f"train_sets/{name}: setting short_long needs max_length (the longest training sequence)")
    return definition


def _lines(records: list[dict]) -> str:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def write_synthetic(root: str | Path, entry: dict, tasks: list[str]) -> dict:
    """Write the training sets ``tasks`` (ids of ``entry['train_sets']``) and the test sets of
    their generators at every ``entry['test_lengths']``, then the index; return the checksums."""
    missing = [key for key in ("n_train", "n_test", "test_lengths", "train_sets") if key not in entry]
    if missing:
        raise DataError(f"a data entry of kind synthetic needs {', '.join(missing)} "
                        "(see config/config.yaml `data: synthetic`)")
    root, seed = Path(root), int(entry.get("seed", 0))
    test_lengths = sorted(int(n) for n in entry["test_lengths"])
    index: dict = {"vocab": {"symbols": SYMBOLS, "copy": COPY, "paste": PASTE, "pad": PAD, "size": VOCAB_SIZE},
                   "seed": seed, "train": {}, "test": {}}
    checksums = {}
    for name in tasks:
        definition = _train_definition(entry, name)
        lengths = train_lengths(definition, test_lengths)
        records = sample(definition["generator"], _length_rule(lengths), int(entry["n_train"]),
                         seeded_rng(seed, "train", name))
        relative = train_file(root, name).relative_to(root).as_posix()
        checksums[relative] = write_text_atomic(root / relative, _lines(records))
        index["train"][name] = {"generator": definition["generator"], "setting": definition["setting"],
                                "lengths": lengths, "n": len(records), "file": relative}
    for name in sorted({index["train"][t]["generator"] for t in tasks}):
        index["test"][name] = {}
        for length in test_lengths:
            records = sample(name, choice_lengths([length]), int(entry["n_test"]),
                             seeded_rng(seed, "test", name, str(length)))
            relative = test_file(root, name, length).relative_to(root).as_posix()
            checksums[relative] = write_text_atomic(root / relative, _lines(records))
            index["test"][name][str(length)] = {"n": len(records), "file": relative}
    write_json_atomic(root / INDEX, index)
    return checksums


# ------------------------------------------------------------------------------------------------
# reading and checking
# ------------------------------------------------------------------------------------------------
def read_index(root: str | Path) -> dict:
    path = Path(root) / INDEX
    if not path.is_file():
        raise DataError(f"{path} is missing: write the synthetic data with `mambapeft data prepare` "
                        "(rule prepare_data) for a data entry of kind synthetic")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}); delete the data directory and prepare it again") from None


def generator_of(root: str | Path, train_set: str) -> str:
    """The generator of training set ``train_set`` (whose test sets evaluate it), from the index."""
    index = read_index(root)
    if train_set not in index["train"]:
        raise DataError(f"{Path(root) / INDEX} lists no training set {train_set!r}; prepare the data again "
                        "(rule prepare_data) with it among the experiment's tasks")
    return index["train"][train_set]["generator"]


def read_records(path: str | Path) -> list[dict]:
    """Every {"tokens", "answer"} record of one file, each checked for shape and vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing: prepare the synthetic data again (rule prepare_data)")
    records = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{where(path, line_number)}: not a JSON record ({err}); prepare the data again") from None
        _check_shape(record, path, line_number)
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no records; prepare the synthetic data again")
    return records


def _check_shape(record, path: Path, line_number: int) -> None:
    tokens = record.get("tokens") if isinstance(record, dict) else None
    if (not isinstance(tokens, list) or len(tokens) < MIN_LENGTH or not isinstance(record.get("answer"), int)
            or not all(isinstance(t, int) and 0 <= t < VOCAB_SIZE for t in tokens)):
        raise DataError(f"{where(path, line_number)}: a record is {{\"tokens\": [>= {MIN_LENGTH} ids in "
                        f"0..{VOCAB_SIZE - 1}], \"answer\": id}}; prepare the synthetic data again")


def _length_allowed(lengths: dict, length: int) -> bool:
    if "range" in lengths:
        return lengths["range"][0] <= length <= lengths["range"][1]
    return length in lengths["choices"]


def check_records(records: list[dict], generator_name: str, lengths: dict, path: Path) -> None:
    """Each record is a sequence of its generator, of an allowed length, with the right answer."""
    task = generator(generator_name)
    for line_number, record in enumerate(records, start=1):
        tokens = record["tokens"]
        body = tokens[:-1]
        problem = None
        if not _length_allowed(lengths, len(tokens)):
            problem = f"length {len(tokens)} is outside the file's lengths {lengths}"
        elif tokens[-1] != task.query:
            problem = f"the last token is {tokens[-1]}, not the query {task.query}"
        elif body.count(COPY) != 1 or body[-1] == COPY:
            problem = "COPY must appear exactly once before the query, followed by a symbol"
        elif max(t for t in body if t != COPY) >= task.symbols:
            problem = f"every other token must be one of the generator's symbols 0..{task.symbols - 1}"
        elif record["answer"] != answer_of(tokens):
            problem = f"answer {record['answer']} is not the token after COPY ({answer_of(tokens)})"
        if problem:
            raise DataError(f"{where(path, line_number)}: {problem}; prepare the synthetic data again")


def check_synthetic(root: str | Path, task: str | None = None) -> dict:
    """Validate every file the index lists (or training set ``task`` and its generator's test sets)."""
    root = Path(root)
    index = read_index(root)
    if task is not None and task not in index["train"]:
        raise DataError(f"{root / INDEX} lists no training set {task!r}; listed: {', '.join(index['train'])}")
    chosen = {name: info for name, info in index["train"].items() if task is None or name == task}
    summary = {"kind": "synthetic", "task": task, "train_sets": {}, "test": {}}
    for name, info in chosen.items():
        records = read_records(root / info["file"])
        check_records(records, info["generator"], info["lengths"], root / info["file"])
        summary["train_sets"][name] = {"generator": info["generator"], "setting": info["setting"],
                                       "records": len(records), "lengths": info["lengths"]}
    for name in sorted({info["generator"] for info in chosen.values()}):
        summary["test"][name] = {}
        for length, info in index["test"][name].items():
            records = read_records(root / info["file"])
            check_records(records, name, {"choices": [int(length)]}, root / info["file"])
            summary["test"][name][length] = len(records)
    summary["splits"] = {"train": sum(s["records"] for s in summary["train_sets"].values()), "val": None,
                         "test": sum(n for lengths in summary["test"].values() for n in lengths.values())}
    return summary
