"""What the benchmarks share: synchronised wall-clock timing, what surrounds one measured row
(memory released before or after it, a failure recorded as the row's error), and where a record's
numbers come from (:func:`provenance`)."""
from __future__ import annotations

import gc
import hashlib
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..runspec import repo_root

PACKAGE = Path(__file__).resolve().parents[1]
CODE_SUFFIXES = (".py", ".cu", ".cuh")  # the package's code: Python and the kernels NVRTC compiles
DOMAIN_FOLDERS = ("vision", "language")  # their YAML files define the methods and backbones a row runs


class BenchRecordError(ValueError):
    """A file that is not a ``bench train`` record with measured image rows (``mambapeft bench plot``); the
    message names it. Here, not beside the figure: the CLI catches it without importing matplotlib."""


def source_digest(package: Path = PACKAGE, root: Path | None = None) -> str:
    """sha256 over what a benchmark's numbers depend on in this repository: the package's code files
    and the YAML files of ``root``'s vision/ and language/ (default: :func:`~mambapeft.runspec.repo_root`),
    each as its path relative to its folder and its bytes. The same for the same files wherever they
    lie, so a record can be matched to a commit even where the checkout's .git is stale or absent
    (a copy sent to another machine): ``mambapeft bench source-digest`` at that commit prints it."""
    root = repo_root() if root is None else root
    files = [(f"package/{path.relative_to(package)}", path) for path in package.rglob("*") if path.suffix in CODE_SUFFIXES]
    files += [(f"{folder}/{path.relative_to(root / folder)}", path) for folder in DOMAIN_FOLDERS
              for path in (root / folder).rglob("*.yaml")]
    digest = hashlib.sha256()
    for name, path in sorted(files):
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    """git's output in the repository, or None where there is no git or no checkout."""
    try:
        done = subprocess.run(["git", "-C", str(repo_root()), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance() -> dict:
    """Where a benchmark record's numbers come from: when it started (UTC), :func:`source_digest`, and
    git's commit with whether the package's or the domain files differ from it (None, None outside a
    checkout: then the digest alone names the source)."""
    commit = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--", "src", *DOMAIN_FOLDERS)
    return {"started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "source_sha256": source_digest(), "git_commit": commit,
            "git_changed": None if commit is None or changed is None else bool(changed)}


def provenance_line(source: dict | None) -> list[str]:
    """The Markdown line of a record's :func:`provenance` (none for a record written before it)."""
    if not source:
        return []
    git = "not a git checkout" if source["git_commit"] is None else f"git {source['git_commit'][:10]}" + (
        ", files changed since" if source["git_changed"] else "")
    return [f"Started {source['started_utc']} UTC; source sha256 {source['source_sha256'][:16]} "
            f"(`mambapeft bench source-digest`; {git}).", ""]


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device``: CUDA runs asynchronously, a CPU call is done when it returns."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(call: Callable[[], object], repeats: int, device: torch.device | str) -> list[float]:
    """Seconds of each of ``repeats`` calls, the device synchronised before and after each."""
    return timed_queued_calls(call, repeats, device, runs=repeats)


def timed_queued_calls(call: Callable[[], object], calls: int, device: torch.device | str, runs: int = 4) -> list[float]:
    """Seconds a call, one value for each of ``runs`` runs of ``calls // runs`` calls queued back to back,
    the device synchronised around each run only: what a loop that never waits for the device between
    calls gets (the trainer's: it reads a step's loss once the next is queued, train/runner.py)."""
    per_run = max(1, calls // runs)
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(per_run):
            call()
        synchronize(device)
        times.append((time.perf_counter() - start) / per_run)
    return times


def release_memory() -> None:
    """Collect what earlier rows left behind and return CUDA's cached blocks, so rows do not share memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_row(err: Exception) -> dict:
    """The row of a measurement that failed: the others still run."""
    return {"error": f"{type(err).__name__}: {err}"}
