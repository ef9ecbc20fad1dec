"""Fixtures of tests/faults: one tiny vision run, and its result when nothing goes wrong."""
from pathlib import Path

import pytest

from run_helpers import run


@pytest.fixture(scope="module")
def tiny(tiny_vision) -> dict:
    """The tiny vision run (tests/conftest.py) shortened to 3 epochs of 2 steps (6 steps), with a
    checkpoint after epochs 1 and 2: each job costs mostly its start (importing torch)."""
    return {**tiny_vision, "train": {**tiny_vision["train"], "epochs": 3}}


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory) -> Path:
    """The run in ``tiny`` trained and evaluated without a fault: the result every rerun must match."""
    out = tmp_path_factory.mktemp("whole")
    run(tiny, out)
    return out
