"""Offline VTAB stand-ins: layout, line format, determinism, and the upstream set."""

import numpy as np
import pytest

from mambapeft.data import mini_vision, vtab
from mambapeft.data.errors import DataError
from mambapeft.io import sha256_file

SMALL = dict(image_size=16, n_train=12, n_val=4, n_test=10)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_vtab")
    return root, mini_vision.write_mini_vtab(root, seed=3, **SMALL)


def test_every_task_is_written_in_the_noah_layout(written):
    root, manifest = written
    assert set(manifest) == {"digits", "count", "position", "orientation"}
    for task, entry in manifest.items():
        assert entry["splits"] == {"train800": 12, "val200": 4, "test": 10, "train800val200": 16}
        assert entry["num_classes"] == vtab.task_info(task)["num_classes"]
        lines = {split: (root / task / f"{split}.txt").read_text().splitlines() for split in vtab.SPLITS}
        assert lines["train800val200"] == lines["train800"] + lines["val200"]
        assert lines["train800"][0].startswith("images/train800/000000.jpg ")
        assert lines["test"][-1].startswith("images/test/000009.jpg ")
        for split in vtab.SPLITS:  # read_split validates format, labels and image presence
            samples = vtab.read_split(root, task, split)
            assert len(samples) == entry["splits"][split]
        assert entry["sha256"] == {f"{s}.txt": sha256_file(root / task / f"{s}.txt") for s in vtab.SPLITS}
        image = vtab.load_rgb(root / task / "images" / "test" / "000000.jpg")
        assert image.size == (16, 16)


def test_labels_cover_every_class_evenly():
    root_labels = mini_vision._balanced_labels(np.random.default_rng(0), 20, 8)
    assert np.bincount(root_labels).tolist() == [3, 3, 3, 3, 2, 2, 2, 2]


def test_same_seed_writes_identical_files_and_other_seeds_differ(tmp_path, written):
    _, manifest = written
    again = mini_vision.write_mini_vtab(tmp_path / "a", seed=3, **SMALL)
    assert again == manifest
    same = (tmp_path / "a" / "count" / "images" / "test" / "000004.jpg").read_bytes()
    assert same == (written[0] / "count" / "images" / "test" / "000004.jpg").read_bytes()
    other = mini_vision.write_mini_vtab(tmp_path / "b", seed=4, tasks=("count",), **SMALL)
    assert other["count"]["sha256"] != manifest["count"]["sha256"]


def test_a_task_does_not_depend_on_the_others_written(tmp_path, written):
    alone = mini_vision.write_mini_vtab(tmp_path, seed=3, tasks=("orientation",), **SMALL)
    assert alone["orientation"] == written[1]["orientation"]


def test_unknown_task_and_too_many_digits_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="unknown mini vision task.*digits, count"):
        mini_vision.write_mini_vtab(tmp_path, tasks=("cifar",))
    with pytest.raises(DataError, match="digits.*lower n_train"):
        mini_vision.write_mini_vtab(tmp_path, tasks=("digits",), n_train=1000, n_val=500, n_test=500)


def test_digits_are_the_scikit_learn_images():
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    images = mini_vision._digit_images(rng, np.array([0]), 8)
    grey = images[0, :, :, 0].astype(float)
    assert np.array_equal(images[0, :, :, 0], images[0, :, :, 1])  # grey as RGB
    distances = np.abs(load_digits().images * (255 / 16) - grey).mean(axis=(1, 2))
    assert distances.min() < 2.0  # an 8x8 resize of an 8x8 image is (nearly) the original


def test_upstream_images_are_deterministic_and_balanced():
    images, labels, num_classes = mini_vision.upstream_images(48, image_size=16, seed=5)
    assert images.shape == (48, 16, 16, 3) and images.dtype == np.uint8
    assert num_classes == 24 and np.bincount(labels, minlength=24).tolist() == [2] * 24
    again, labels_again, _ = mini_vision.upstream_images(48, image_size=16, seed=5)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, mini_vision.upstream_images(48, image_size=16, seed=6)[0])
