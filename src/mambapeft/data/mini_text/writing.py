"""Writing a stand-in's files in the formats of the real data, with a manifest of their checksums."""

import json
from pathlib import Path

from mambapeft.io import write_text_atomic


def json_list(records: list[dict]) -> str:
    return json.dumps(records, indent=4, ensure_ascii=False) + "\n"


def json_lines(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_all(root: Path, files: dict[str, tuple[str, int]]) -> dict:
    """Write {relative path: (text, records)} under `root`; return {files: {path: sha256}, counts: {path: records}}."""
    checksums = {relative: write_text_atomic(root / relative, text) for relative, (text, _) in files.items()}
    return {"files": checksums, "counts": {relative: count for relative, (_, count) in files.items()}}
