"""One epoch of VTAB data loading: decoding the image files vs reading the uint8 cache.

A temporary VTAB-layout task of JPEGs at a natural-image size (VTAB's natural tasks are mostly
around 500x375) is written, cached with the pipeline's own ``build_image_cache``, then one
training epoch's batches (32 images, shuffled, normalised float tensors as the trainer feeds the
model) are produced both ways: decode + bicubic resize per image from the files, and
:class:`~mambapeft.data.image_set.ImageSet` over the cache (its load included).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.vtab import build_image_cache, preprocess_image, read_split
from ..data.image_set import ImageSet, Normalise

TASK = "cifar"  # any task of vision/tasks.yaml; only its class count (100) matters here


def write_task(root: Path, n_images: int, size: tuple[int, int], seed: int = 0) -> None:
    """``n_images`` JPEGs (gradient plus noise, so they compress like photos) and train800val200.txt."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    lines = []
    for i in range(n_images):
        pixels = np.clip(ramp * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 25, (height, width, 3)), 0, 255)
        relative = f"images/{i:06d}.jpg"
        (root / TASK / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(root / TASK / relative, quality=90)
        lines.append(f"{relative} {i % 100}\n")
    (root / TASK / "train800val200.txt").write_text("".join(lines))


def epoch_from_files(root: Path, resolution: int, batch: int, seed: int) -> float:
    samples = read_split(root, TASK, "train800val200")
    order = np.random.default_rng(seed).permutation(len(samples))
    normalise = Normalise(torch.device("cpu"))
    started = time.perf_counter()
    for start in range(0, len(order), batch):
        chunk = [samples[i] for i in order[start:start + batch]]
        images = np.stack([preprocess_image(root / TASK / path, resolution) for path, _ in chunk])
        normalise(torch.from_numpy(images))
    return time.perf_counter() - started


def epoch_from_cache(cache: Path, batch: int, seed: int) -> float:
    started = time.perf_counter()
    images = ImageSet(str(cache), torch.device("cpu"))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(images)))
    for start in range(0, len(order), batch):
        images.batch(order[start:start + batch])
    return time.perf_counter() - started


def bench_data(n_images: int = 800, size: tuple[int, int] = (500, 375), resolution: int = 224, batch: int = 32,
               repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="mambapeft-bench-data-") as scratch:
        root = Path(scratch)
        write_task(root, n_images, size)
        started = time.perf_counter()
        build_image_cache(root, TASK, "train800val200", resolution, root / "cache.npz")
        cache_build = time.perf_counter() - started
        files = [epoch_from_files(root, resolution, batch, seed) for seed in range(repeats)]
        cached = [epoch_from_cache(root / "cache.npz", batch, seed) for seed in range(repeats)]
    return {
        "images": n_images, "source_size": list(size), "resolution": resolution, "batch": batch,
        "threads": torch.get_num_threads(), "cache_build_s": round(cache_build, 3),
        "epoch_from_files_s": {"min": round(min(files), 3), "median": round(statistics.median(files), 3)},
        "epoch_from_cache_s": {"min": round(min(cached), 4), "median": round(statistics.median(cached), 4)},
        "speedup_median": round(statistics.median(files) / statistics.median(cached), 1),
    }
