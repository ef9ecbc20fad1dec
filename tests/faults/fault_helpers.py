"""Fault injection: the helpers the tests in tests/faults share (their fixtures are in conftest.py).

Faults hit real `mambapeft` jobs (subprocesses, as Snakemake runs them) through hook/sitecustomize.py,
which each test switches on with environment variables (`faults`); files are damaged the ways
storage damages them: cut short, or one bit flipped.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mambapeft.runspec import ADAPTER
from run_helpers import metrics, train_process

HOOK = Path(__file__).parent / "hook"


@contextlib.contextmanager
def faults(**settings):
    """Processes started inside load the fault hook with ``settings``: kill_write="train.json:1" is
    MAMBAPEFT_FAULT_KILL_WRITE=train.json:1 (see hook/sitecustomize.py for each fault)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(HOOK), os.environ.get("PYTHONPATH")))))
        for name, value in settings.items():
            patch.setenv(f"MAMBAPEFT_FAULT_{name.upper()}", str(value))
        yield


# -- jobs ------------------------------------------------------------------------------------------
def mambapeft(*args) -> subprocess.CompletedProcess:
    """A `mambapeft` command in its own process (a SIGKILL or a file-size limit hits it, not pytest)."""
    return subprocess.run([sys.executable, "-m", "mambapeft.cli", "-q", *map(str, args)],
                          capture_output=True, text=True, timeout=600, check=False)


def train(spec: dict, out: Path) -> subprocess.CompletedProcess:
    """The training job of ``spec`` into ``out``, whatever becomes of it."""
    process = train_process(spec, out)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def evaluate(spec: dict, out: Path) -> subprocess.CompletedProcess:
    """The evaluation job of ``spec`` on the run in ``out``, whatever becomes of it."""
    return mambapeft("evaluate", "--spec", json.dumps({**spec, "output_dir": str(out)}))


def killed(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == -signal.SIGKILL, f"the hook did not kill the job:\n{done.stderr[-3000:]}"


def one_line_error(stderr: str, *needles: str) -> str:
    """The user error a job printed: one line (no traceback) naming ``needles``."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mambapeft: error: "), stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def refused(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    return one_line_error(done.stderr, *needles)


# -- results ---------------------------------------------------------------------------------------
def assert_same_result(out: Path, whole: Path) -> None:
    """The run in ``out`` ended exactly as the uninterrupted one: same adapter, history and scores."""
    ours, reference = metrics(out), metrics(whole)
    for key in ("value", "results", "history", "optimizer_steps"):
        assert ours[key] == reference[key], key
    assert (out / ADAPTER).read_bytes() == (whole / ADAPTER).read_bytes()


# -- damage ----------------------------------------------------------------------------------------
def cut_in_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ (1 << bit)]))


def flip_bit_in_largest_member(path: Path, containing: str) -> None:
    """Flip a bit in the middle of the largest zip member whose name contains ``containing`` (a torch
    checkpoint's tensors are "<name>/data/<n>", an image cache's images "images.npy"): data, not
    structure, so the file still opens, and torch or a memory map reads it without the zip's CRCs."""
    with zipfile.ZipFile(path) as archive:
        members = [info for info in archive.infolist() if containing in info.filename]
    member = max(members, key=lambda info: info.file_size)
    with open(path, "rb") as handle:
        handle.seek(member.header_offset + 26)  # local header: name and extra-field lengths
        name_length, extra_length = (int.from_bytes(handle.read(2), "little") for _ in range(2))
    flip_bit(path, member.header_offset + 30 + name_length + extra_length + member.file_size // 2)


def flip_bit_in_middle(path: Path) -> None:
    flip_bit(path, path.stat().st_size // 2)
