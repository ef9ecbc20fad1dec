"""Fixture writers for the data tests; everything they write lands in the test's tmp_path."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _write_jpeg(path: Path, seed: int, size=(20, 14)) -> Path:
    """A random RGB JPEG of `size` (width, height); non-square, so resizing is a real test."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    return path


def _write_vtab_task(root: Path, task: str = "count") -> Path:
    """A minimal task dir in the NOAH layout: 4 train800, 2 val200, 3 test images, labels < 4 (count has 4 classes)."""
    task_dir = root / task
    lines = {}
    for split_index, (split, n) in enumerate({"train800": 4, "val200": 2, "test": 3}.items()):
        lines[split] = []
        for i in range(n):
            relative = f"images/{split}/{i:06d}.jpg"
            _write_jpeg(task_dir / relative, seed=100 * split_index + i)
            lines[split].append(f"{relative} {i % 4}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (task_dir / f"{split}.txt").write_text("".join(rows))
    return task_dir


@pytest.fixture
def write_jpeg():
    return _write_jpeg


@pytest.fixture
def write_vtab_task():
    return _write_vtab_task


@pytest.fixture
def vtab_root(tmp_path) -> Path:
    """A VTAB root holding one small valid task, `count` (6 classes)."""
    root = tmp_path / "vtab"
    _write_vtab_task(root)
    return root
