"""Atomic file writes and checksums: a killed job never leaves a half-written result behind, and a
damaged file is recognised instead of being read as data.

Outputs are written to a temporary file in the destination directory, flushed to disk and moved
into place with ``os.replace``, so a file under its final name is always complete. A write that
fails (a full disk, a file-size limit) removes its temporary file and leaves the final name as it was.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

RECORD_CHECKSUM = "record_sha256"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(OSError):
    """A write failed for lack of space (disk, quota or file-size limit); the message names the file."""


class CorruptFileError(ValueError):
    """A saved state that cannot be read back as it was written; the message names the file."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``, on error delete it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        _flush_to_disk(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; results are ordinary shared files
        os.replace(temporary, final)
    except Exception as err:
        if no_space := _no_space_left(err):
            raise DiskFullError(f"{final}: cannot write it ({no_space.strerror}); nothing was written under that "
                                "name: free space on its filesystem (or raise the file-size limit) and re-run") from err
        raise
    finally:
        temporary.unlink(missing_ok=True)


def _flush_to_disk(path: Path) -> None:
    # Without it a machine that crashes right after the rename can keep the name with no data in it.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _no_space_left(err: BaseException) -> OSError | None:
    """The out-of-space OSError behind ``err``: libraries such as torch re-raise it as another type."""
    for cause in (err, err.__cause__, err.__context__):
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return cause
    return None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write UTF-8 ``text`` to ``path`` atomically; return its SHA-256."""
    write_bytes_atomic(path, text.encode("utf-8"))
    return sha256_file(path)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


# -- run records: JSON that carries the checksum of its own contents --------------------------------
def write_record_atomic(path: str | os.PathLike, record: dict) -> None:
    """Write a run record (``train.json``, ``metrics.json``) with ``record_sha256``, the checksum of
    the rest: a flipped digit in a number is still valid JSON, so only a checksum can reveal it."""
    write_json_atomic(path, {**record, RECORD_CHECKSUM: _record_digest(record)})


def record_checksum_mismatch(record: dict) -> bool:
    """Whether ``record`` carries a ``record_sha256`` that its contents do not match. Records
    written before records carried one pass (a single flipped bit cannot both remove the checksum
    and change a value)."""
    return RECORD_CHECKSUM in record and record[RECORD_CHECKSUM] != _record_digest(record)


def incomplete_or_altered(record: dict) -> str | None:
    """Why a record must not be read (None if it may): not complete, or not what its job wrote (record_sha256)."""
    if record.get("status") not in ("ok", "diverged"):
        return f"not a complete run record (status {record.get('status')!r})"
    if record_checksum_mismatch(record):
        return "its contents differ from what evaluation wrote (record_sha256)"
    return None


def is_percent(value) -> bool:
    """A score of the run contract: a finite number in [0, 100] (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0.0 <= value <= 100.0)


def read_job_record(path: Path, config: dict, artifact: tuple[Path, str], *, identity: Callable[[dict], dict],
                    job: str, rule: str, error: type[Exception]) -> dict:
    """The record a job wrote last (``train.json``, ``pretrain.json``), before the next job uses its
    outputs: present, valid JSON, untouched (record_sha256), written for ``config`` (compared as
    ``identity`` of each: the settings its result depends on, not the thread count it ran with), and,
    when its status is ok, with ``artifact`` (a file, the key of its recorded sha256) intact. Else
    ``error``, one line naming the file and the ``job`` (rule ``rule``) to re-run."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path} is missing: run the {job} job first (rule {rule})") from None
    except ValueError as err:  # not JSON, or not even UTF-8 (a damaged byte)
        raise error(f"{path} is not valid JSON ({err}); delete it and re-run the {job} job") from None
    if record_checksum_mismatch(record):
        raise error(f"{path} differs from what {job} wrote (record_sha256); delete it and re-run the {job} job")
    recorded = record.get("config")
    if not isinstance(recorded, dict) or identity(recorded) != identity(config):
        raise error(f"{path} was written for another configuration of this run; re-run its {job} job")
    file, checksum_key = artifact
    if record.get("status") == "ok" and (not file.is_file() or sha256_file(file) != record.get(checksum_key)):
        raise error(f"{file} is missing or differs from the one {job} wrote (sha256); delete {path.name} and "
                    f"re-run the {job} job")
    return record


def _record_digest(record: dict) -> str:
    body = {key: value for key, value in record.items() if key != RECORD_CHECKSUM}
    as_read_back = json.loads(json.dumps(body, default=str))  # what a reader of the file sees
    return hashlib.sha256(json.dumps(as_read_back, sort_keys=True).encode()).hexdigest()


# -- torch states: checkpoints whose contents are checked when they are loaded --------------------
def torch_save_atomic(obj, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        torch.save(obj, handle)  # through a Python file, so a failed write keeps its OSError (errno)


def torch_save_verifiable(state: dict, path: str | os.PathLike) -> None:
    """Save ``state`` with the checksum of its contents, for `torch_load_verified`."""
    torch_save_atomic({"state": state, "sha256": state_digest(state)}, path)


def torch_load_verified(path: str | os.PathLike, map_location) -> dict:
    """The state saved by `torch_save_verifiable`, or CorruptFileError when the file cannot be read
    or its contents differ from what was saved (torch does not check its zip's CRCs: a flipped bit
    in a tensor loads silently)."""
    import torch

    try:
        saved = torch.load(path, map_location=map_location, weights_only=False)
        intact = saved["sha256"] == state_digest(saved["state"])
    except Exception as err:  # a damaged zip or pickle raises almost any type; all mean the same here
        reason = " ".join(str(err).split())[:200]  # torch's messages run over several lines
        raise CorruptFileError(f"{path} cannot be read ({type(err).__name__}: {reason})") from err
    if not intact:
        raise CorruptFileError(f"{path} is corrupt: its contents differ from the checksum saved with them")
    return saved["state"]


def state_digest(state) -> str:
    """SHA-256 of a nested state (dicts, lists, tuples, tensors, NumPy arrays, plain values) as
    loaded in memory, independent of how it is serialised."""
    digest = hashlib.sha256()
    _update_digest(digest, state)
    return digest.hexdigest()


_PLAIN = (str, bytes, int, float, bool, type(None))


def _update_digest(digest, value) -> None:
    if isinstance(value, dict):
        digest.update(b"dict%d" % len(value))
        for key, item in value.items():
            _update_digest(digest, key)
            _update_digest(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(b"list%d" % len(value))
        for item in value:
            _update_digest(digest, item)
    elif hasattr(value, "detach"):  # a torch.Tensor of any dtype (bfloat16 has no NumPy twin) or device
        import torch

        digest.update(f"tensor{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif hasattr(value, "dtype"):  # a NumPy array or scalar (the NumPy random state)
        import numpy as np

        digest.update(f"ndarray{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).view(np.uint8))
    elif isinstance(value, _PLAIN):
        digest.update(f"{type(value).__name__}:{value!r}".encode())
    else:  # a repr with a memory address would differ after loading: every resume would start over
        raise TypeError(f"cannot checksum a {type(value).__name__} in a saved state")
