"""Versions and git state recorded in every metrics.json."""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata

from ..runspec import repo_root

PACKAGES = ("mambapeft", "torch", "numpy", "mamba-ssm", "causal-conv1d", "tokenizers", "snakemake", "lm_eval")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo_root()), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


@lru_cache(maxsize=1)
def provenance() -> dict:
    import torch

    versions = {p: _version(p) for p in PACKAGES}
    versions.update(python=platform.python_version(), cuda=torch.version.cuda)
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"versions": versions, "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}}
