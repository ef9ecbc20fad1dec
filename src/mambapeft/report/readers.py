"""How the reports read their input files (JSON records, results tables, the studies' readings): a
file that is missing, a directory, damaged or of the wrong kind is one ResultsError line naming the
file, what is wrong and what was expected, with advice that fits the cause (the command line shows
it without a traceback)."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml


class ResultsError(ValueError):
    """An input of a report that cannot be used; the message names the file."""


@dataclass(frozen=True)
class RecordKind:
    """A kind of JSON record the reports read: how to recognise one, why one must not be read, and
    which job writes a good one again."""
    name: str  # "run record"
    file: str  # its usual file name, "metrics.json"
    keys: tuple[str, ...]  # top-level keys every record of the kind has: one lacking them is another file
    problem: Callable[[dict], str | None]  # why a record of the kind must not be read (None: it may)
    fix: str  # what writes a good one again: "re-run its evaluate job"
    outdated: Callable[[Path, dict], str | None] = lambda path, record: None  # why newer outputs beside it supersede it


def read_record(path: str | Path, kind: RecordKind) -> dict:
    """The record in ``path`` if it is a readable ``kind`` record, else ResultsError naming the file."""
    path = Path(path)
    record = _read_json(path, kind)
    other = _other_kind(record, kind)
    if other:  # a valid file, just not this kind: nothing to delete
        raise ResultsError(f"{path} is not a {kind.name} ({other}); expected a {kind.file}: pass the right file")
    problem = kind.problem(record)
    if problem:  # damaged or half-written output: a new one must replace it
        raise ResultsError(f"{path}: {problem}; delete it and {kind.fix}")
    outdated = kind.outdated(path, record)
    if outdated:
        raise ResultsError(f"{path}: {outdated}; {kind.fix}")
    return record


def _other_kind(record, kind: RecordKind) -> str | None:
    """What shows that a JSON value is not a ``kind`` record (None: it is one)."""
    if not isinstance(record, dict):
        return f"it holds a JSON {type(record).__name__}"
    lacking = [key for key in kind.keys if key not in record]
    return f"it lacks {', '.join(lacking)}" if lacking else None


def _read_json(path: Path, kind: RecordKind):
    _require_file(path, f"a {kind.name}, {kind.file}")
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise ResultsError(f"{path}: cannot read {kind.name} ({err.strerror})") from err
    except ValueError as err:  # not JSON, or not even UTF-8 (a damaged byte)
        raise ResultsError(f"{path}: cannot read {kind.name} (not valid JSON: {err}); if a job wrote it, "
                           f"delete it and {kind.fix}") from err


def _require_file(path: Path, expected: str) -> None:
    if path.is_dir():
        raise ResultsError(f"{path} is a directory; expected {expected}")
    if not path.exists():
        raise ResultsError(f"{path}: no such file; expected {expected}")


def read_results_table(path: str | Path, columns: set[str]) -> pd.DataFrame:
    """A results table (``mambapeft tables``' CSV) with at least ``columns``."""
    path = Path(path)
    expected = "a results table (results/tables/<experiment>.csv, written by `mambapeft tables`)"
    _require_file(path, expected)
    try:
        table = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: not a CSV table ({str(err).strip()}); expected {expected}") from err
    missing = sorted(columns - set(table.columns))
    if missing:
        raise ResultsError(f"{path} lacks column(s) {', '.join(missing)}; expected {expected}")
    return table


def read_readings(path: str | Path) -> tuple[str, list[dict]]:
    """(source, readings) of a study's numbers file (``language/*.yaml``: ``source`` and a list ``readings``)."""
    path = Path(path)
    expected = "a readings file: a mapping with `source` and a list `readings`"
    _require_file(path, expected)
    try:
        definitions = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); expected {expected}") from err
    if not isinstance(definitions, dict) or not isinstance(definitions.get("readings"), list):
        raise ResultsError(f"{path} is not a readings file (no list `readings`); expected {expected}")
    return definitions.get("source", ""), definitions["readings"]
