"""Damaged files (cut short, one bit flipped): each is detected by its checksum or its format and
either rebuilt or refused with one line naming it; never read as data.

- image cache .npz: refused (its content checksum), rebuilt when deleted;
- checkpoint.pt: the run restarts from scratch with a warning, and ends as if undamaged;
- adapter.safetensors, train.json: evaluation refuses them (sha256 in train.json, record_sha256);
- metrics.json: the table refuses it (record_sha256, then the keys, types and ranges it reads).
"""
import json
import math
import re
import shutil

import pytest

from fault_helpers import (assert_same_result, cut_in_half, faults, flip_bit, flip_bit_in_largest_member,
                           flip_bit_in_middle, killed, one_line_error, refused, train)
from mambapeft.cli import main
from mambapeft.data.errors import DataError
from mambapeft.data.vtab import build_image_cache, load_image_cache
from mambapeft.io import write_record_atomic
from mambapeft.runspec import ADAPTER, METRICS, TRAIN_RECORD
from run_helpers import run
from workflow_helpers import REMOVED, set_nested


def flip_bit_in_tensor(path):
    flip_bit_in_largest_member(path, "/data/")


def flip_bit_in_images(path):
    flip_bit_in_largest_member(path, "images")


# -- image cache -----------------------------------------------------------------------------------
@pytest.fixture
def cache_copy(tiny, tmp_path):
    """A copy of the run's training cache (the original is shared by the module's runs)."""
    copy = tmp_path / "cache" / "train800val200_32.npz"
    copy.parent.mkdir()
    shutil.copy(tiny["data"]["cache"]["train800val200"], copy)
    return copy


@pytest.mark.parametrize("damage", [cut_in_half, flip_bit_in_images])
@pytest.mark.parametrize("mmap", [False, True])
def test_damaged_image_cache_is_refused(cache_copy, damage, mmap):
    damage(cache_copy)
    with pytest.raises(DataError, match=f"{cache_copy.name}: image cache is corrupt .*delete it and rebuild it"):
        load_image_cache(cache_copy, mmap=mmap)  # a memory map skips the zip's CRCs: only the checksum sees the bit


def test_training_refuses_a_damaged_cache_until_it_is_rebuilt(tiny, cache_copy, tmp_path):
    flip_bit_in_images(cache_copy)
    spec = {**tiny, "data": {**tiny["data"], "cache": {**tiny["data"]["cache"], "train800val200": str(cache_copy)}}}
    refused(train(spec, tmp_path / "run"), str(cache_copy), "image cache is corrupt", "rebuild it")
    assert not (tmp_path / "run" / TRAIN_RECORD).exists()
    cache_copy.unlink()  # what the message says to do; the pipeline's cache_images rule then rebuilds it
    build_image_cache(tiny["data"]["root"], "digits", "train800val200", 32, cache_copy)
    original = load_image_cache(tiny["data"]["cache"]["train800val200"])
    for rebuilt, expected in zip(load_image_cache(cache_copy), original):
        assert (rebuilt == expected).all()


# -- checkpoint ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", [cut_in_half, flip_bit_in_tensor])
def test_damaged_checkpoint_restarts_the_run_from_scratch(tiny, whole, tmp_path, damage):
    with faults(kill_step=5):  # after epoch 2's checkpoint
        killed(train(tiny, tmp_path))
    damage(tmp_path / "checkpoint.pt")
    log = run(tiny, tmp_path)
    assert "checkpoint.pt" in log and "starting this run from scratch" in log
    assert "Traceback" not in log
    assert_same_result(tmp_path, whole)  # from scratch, not from a damaged state


# -- adapter and training record -------------------------------------------------------------------
@pytest.fixture
def trained(whole, tmp_path):
    """A copy of the finished run, as if trained there, without its metrics.json: evaluation is still to do."""
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    (out / METRICS).unlink()
    record = json.loads((out / TRAIN_RECORD).read_text())
    write_record_atomic(out / TRAIN_RECORD, {**record, "config": {**record["config"], "output_dir": str(out)}})
    return out


@pytest.mark.parametrize("damage", [cut_in_half, flip_bit_in_middle])
def test_damaged_adapter_is_refused_by_evaluation(tiny, trained, capsys, damage):
    damage(trained / ADAPTER)
    assert main(["-q", "evaluate", "--spec", json.dumps({**tiny, "output_dir": str(trained)})]) == 2
    one_line_error(capsys.readouterr().err, ADAPTER, "differs from the one training wrote", "re-run the training job")
    assert not (trained / METRICS).exists()


def test_flipped_digit_in_train_json_is_refused_by_evaluation(tiny, trained, capsys):
    flip_digit(trained / TRAIN_RECORD, "trainable_params")
    assert main(["-q", "evaluate", "--spec", json.dumps({**tiny, "output_dir": str(trained)})]) == 2
    one_line_error(capsys.readouterr().err, TRAIN_RECORD, "record_sha256", "re-run the training job")
    assert not (trained / METRICS).exists()


def flip_digit(path, key: str) -> None:
    """Flip the lowest bit of the units digit of the number under ``key`` in a JSON file (4 <-> 5,
    6 <-> 7, ...): still valid JSON, another value."""
    text = path.read_text()
    start = text.index(f'"{key}": ') + len(f'"{key}": ')
    units = re.match(r"-?\d+", text[start:]).end() - 1
    flip_bit(path, len(text[:start + units].encode()))


# -- metrics.json and the table --------------------------------------------------------------------
@pytest.fixture
def metrics_copy(whole, tmp_path):
    copy = tmp_path / "run" / METRICS
    copy.parent.mkdir()
    shutil.copy(whole / METRICS, copy)
    return copy


def table(metrics_file, tmp_path) -> int:
    return main(["-q", "tables", "--experiment", "vtab", "--csv", str(tmp_path / "vtab.csv"),
                 "--md", str(tmp_path / "vtab.md"), str(metrics_file)])


def test_intact_metrics_make_a_table(metrics_copy, tmp_path):
    assert table(metrics_copy, tmp_path) == 0
    assert "| digits |" in (tmp_path / "vtab.md").read_text()


@pytest.mark.parametrize("damage, problem", [
    (cut_in_half, "cannot read run record"),
    (lambda path: flip_digit(path, "value"), "differ from what evaluation wrote (record_sha256)"),
])
def test_damaged_metrics_never_reach_a_table(metrics_copy, tmp_path, capsys, damage, problem):
    damage(metrics_copy)
    assert table(metrics_copy, tmp_path) == 2
    one_line_error(capsys.readouterr().err, str(metrics_copy), problem, "re-run")
    assert not (tmp_path / "vtab.csv").exists() and not (tmp_path / "vtab.md").exists()


@pytest.mark.parametrize("key, value, problem", [
    ("status", "running", "not a complete run record (status 'running')"),
    ("value", 187.5, "value is 187.5, expected a percentage in [0, 100]"),
    ("value", "87.5", "value is '87.5', expected a percentage"),
    ("results", REMOVED, "results is missing"),
    ("results.digits.top1", math.nan, "results.digits.top1 is nan, expected a percentage"),
    ("trainable_params", -1, "trainable_params is -1, expected an integer >= 0"),
    ("total_params", 10, "trainable_params 36864 exceeds total_params 10"),
    ("config.run.seed", "0", "config.run.seed is '0', expected an integer >= 0"),
    ("config.domain", REMOVED, "config.domain is missing"),
])
def test_invalid_metrics_never_reach_a_table(metrics_copy, tmp_path, capsys, key, value, problem):
    """Records that pass their checksum (a writer's bug, a hand edit) but break the run contract."""
    record = json.loads(metrics_copy.read_text())
    set_nested(record, key, value, separator=".")
    write_record_atomic(metrics_copy, record)
    assert table(metrics_copy, tmp_path) == 2
    one_line_error(capsys.readouterr().err, str(metrics_copy), problem)
    assert not (tmp_path / "vtab.csv").exists()
