"""`mambapeft bench data`: both loading paths run on a real temporary task and are timed."""
import numpy as np

from mambapeft.bench.data import TASK, bench_data, epoch_from_cache, epoch_from_files, write_task
from mambapeft.data.vtab import build_image_cache, load_image_cache, preprocess_image, read_split


def test_report_times_both_paths():
    report = bench_data(n_images=8, size=(40, 30), resolution=16, repeats=2)
    assert report["images"] == 8 and report["resolution"] == 16
    assert report["epoch_from_files_s"]["median"] > 0 and report["epoch_from_cache_s"]["median"] > 0
    assert report["speedup_median"] > 0 and report["cache_build_s"] > 0


def test_both_paths_read_the_same_images(tmp_path):
    write_task(tmp_path, 4, (40, 30))
    build_image_cache(tmp_path, TASK, "train800val200", 16, tmp_path / "cache.npz")
    images, _ = load_image_cache(tmp_path / "cache.npz")
    decoded = [preprocess_image(tmp_path / TASK / path, 16) for path, _ in read_split(tmp_path, TASK, "train800val200")]
    assert (images == np.stack(decoded)).all()
    assert epoch_from_files(tmp_path, 16, 2, seed=0) > 0 and epoch_from_cache(tmp_path / "cache.npz", 2, seed=0) > 0
