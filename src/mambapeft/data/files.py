"""Small file helpers shared by the data modules: checksums, atomic writes, task-table YAML.

Outputs are written to a temporary file in the destination directory and moved into place with
`os.replace`, so a run killed midway never leaves a half-written file that looks finished.
"""

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from mambapeft.data.errors import DataError


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it onto `path`, on error delete it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        # mkstemp creates the file private (0600); outputs are ordinary shared results.
        os.chmod(temporary, 0o644)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write UTF-8 `text` to `path` atomically; return its SHA-256."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return sha256_file(path)


def read_yaml(path: Path):
    """Parse a YAML file shipped with the repository (task tables), as DataError when missing or invalid."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; it ships with the repository, restore it from git") from None
    except yaml.YAMLError as error:
        raise DataError(f"{path}: not valid YAML ({error}); fix the syntax") from None
