"""VTAB-1k layout: task table, split parsing and its errors, preprocessing, image caches."""

import zipfile

import numpy as np
import pytest
from PIL import Image

from mambapeft.data import vtab
from mambapeft.data.errors import DataError
from mambapeft.io import sha256_file

REFERENCE_CLASSES = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}


def test_task_table_matches_the_reference():
    tasks = vtab.all_tasks()
    real = {name: info for name, info in tasks.items() if not info["mini"]}
    assert {name: info["num_classes"] for name, info in real.items()} == REFERENCE_CLASSES
    groups = [info["group"] for info in real.values()]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    mini = {name: (info["group"], info["num_classes"]) for name, info in tasks.items() if info["mini"]}
    assert mini == {"digits": ("natural", 10), "count": ("structured", 4), "position": ("structured", 4), "orientation": ("structured", 4)}


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(DataError, match="unknown vision task 'cifar10'.*cifar, caltech101"):
        vtab.task_info("cifar10")


def test_read_split_returns_relative_paths_and_labels(vtab_root):
    samples = vtab.read_split(vtab_root, "count", "train800val200")
    assert samples[0] == ("images/train800/000000.jpg", 0)
    assert len(samples) == 6 and [label for _, label in samples] == [0, 1, 2, 3, 0, 1]


def _replace_line(root, split, number, text):
    path = root / "count" / f"{split}.txt"
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ("images/train800/000001.jpg", "malformed line"),
        ("images/train800/000001.jpg three", "label 'three' is not an integer"),
        ("images/train800/000001.jpg 6", r"label 6 is outside \[0, 4\)"),
        ("images/train800/000001.jpg -1", r"label -1 is outside \[0, 4\)"),
        ("images/train800/missing.jpg 1", "image .*missing.jpg does not exist"),
    ],
)
def test_read_split_names_file_and_line_of_a_bad_line(vtab_root, line, message):
    path = _replace_line(vtab_root, "train800", 2, line)
    with pytest.raises(DataError, match=f"{path}:2: {message}"):
        vtab.read_split(vtab_root, "count", "train800")


def test_read_split_refuses_an_empty_or_missing_list(vtab_root):
    (vtab_root / "count" / "val200.txt").write_text("\n")
    with pytest.raises(DataError, match="val200.txt: split is empty"):
        vtab.read_split(vtab_root, "count", "val200")
    with pytest.raises(DataError, match="test.txt: split list not found.*vtab-1k.zip"):
        vtab.read_split(vtab_root / "elsewhere", "count", "test")
    with pytest.raises(DataError, match="unknown VTAB-1k split 'train'"):
        vtab.read_split(vtab_root, "count", "train")


def test_explicit_num_classes_overrides_the_table(vtab_root):
    with pytest.raises(DataError, match=r"outside \[0, 2\)"):
        vtab.read_split(vtab_root, "count", "train800", num_classes=2)


def test_preprocess_image_is_pil_rgb_bicubic_resize(tmp_path, write_jpeg):
    path = write_jpeg(tmp_path / "a.jpg", seed=1, size=(40, 25))
    expected = np.asarray(Image.open(path).convert("RGB").resize((16, 16), Image.BICUBIC))
    out = vtab.preprocess_image(path, 16)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, expected)


def test_preprocess_image_forces_three_channels(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 200, np.uint8)).save(path)
    assert vtab.preprocess_image(path, 4).shape == (4, 4, 3)


def test_truncated_or_garbage_images_raise_data_error(tmp_path, write_jpeg):
    path = write_jpeg(tmp_path / "t.jpg", seed=2, size=(64, 64))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match="t.jpg: cannot decode image"):
        vtab.preprocess_image(path, 8)
    garbage = tmp_path / "g.jpg"
    garbage.write_bytes(b"not an image")
    with pytest.raises(DataError, match="g.jpg: cannot decode image"):
        vtab.preprocess_image(garbage, 8)


def test_image_cache_round_trip(vtab_root, tmp_path):
    out = tmp_path / "cache" / "count_test_12.npz"
    summary = vtab.build_image_cache(vtab_root, "count", "test", 12, out)
    assert summary["n"] == 3 and summary["num_classes"] == 4
    assert summary["sha256"] == sha256_file(vtab_root / "count" / "test.txt")
    images, labels = vtab.load_image_cache(out)
    assert images.shape == (3, 12, 12, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2]
    for image, (relative, _) in zip(images, vtab.read_split(vtab_root, "count", "test")):
        np.testing.assert_array_equal(image, vtab.preprocess_image(vtab_root / "count" / relative, 12))
    with np.load(out) as archive:  # a plain .npz with metadata
        assert (str(archive["task"]), str(archive["split"]), int(archive["resolution"])) == ("count", "test", 12)
    mapped, _ = vtab.load_image_cache(out, mmap=True)
    np.testing.assert_array_equal(np.asarray(mapped), images)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


def test_failed_cache_build_leaves_no_file(vtab_root, tmp_path):
    (vtab_root / "count" / "images" / "test" / "000002.jpg").write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "cache" / "c.npz"
    with pytest.raises(DataError, match="000002.jpg: cannot decode image"):
        vtab.build_image_cache(vtab_root, "count", "test", 8, out)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_missing_or_corrupt_cache_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="image cache not found"):
        vtab.load_image_cache(tmp_path / "none.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="bad.npz: image cache is corrupt"):
        vtab.load_image_cache(bad)
    with zipfile.ZipFile(tmp_path / "partial.npz", "w") as archive:
        archive.writestr("labels.npy", b"")
    with pytest.raises(DataError, match="partial.npz: image cache is corrupt"):
        vtab.load_image_cache(tmp_path / "partial.npz")
