"""`mambapeft data check`: summaries of good data and a DataError for each kind of bad input."""

import json
import shutil

import pytest

from mambapeft.data import mini_text
from mambapeft.data.check import check_dataset
from mambapeft.data.errors import DataError


def test_vtab_summary(vtab_root):
    summary = check_dataset("vtab", vtab_root, "count")
    assert summary["splits"] == {"train": 6, "val": 2, "test": 3}
    assert summary["lists"] == {"train800val200": 6, "train800": 4, "val200": 2, "test": 3}
    assert summary["num_classes"] == 4 and summary["task"] == "count"
    json.dumps(summary)


def test_vtab_works_without_the_optional_lists(vtab_root):
    (vtab_root / "count" / "train800.txt").unlink()
    (vtab_root / "count" / "val200.txt").unlink()
    assert check_dataset("vtab", vtab_root, "count")["splits"] == {"train": 6, "val": None, "test": 3}


def _append(path, line):
    path.write_text(path.read_text() + line + "\n")


def test_vtab_missing_image(vtab_root):
    (vtab_root / "count" / "images" / "test" / "000001.jpg").unlink()
    with pytest.raises(DataError, match=r"test.txt:2: image .*000001.jpg does not exist"):
        check_dataset("vtab", vtab_root, "count")


def test_vtab_label_out_of_range(vtab_root):
    _append(vtab_root / "count" / "train800val200.txt", "images/train800/000000.jpg 7")
    with pytest.raises(DataError, match=r"train800val200.txt:7: label 7 is outside \[0, 4\)"):
        check_dataset("vtab", vtab_root, "count")


def test_vtab_truncated_image(vtab_root):
    image = vtab_root / "count" / "images" / "val200" / "000001.jpg"
    image.write_bytes(image.read_bytes()[:300])
    with pytest.raises(DataError, match="000001.jpg: cannot decode image"):
        check_dataset("vtab", vtab_root, "count")


def test_vtab_malformed_line(vtab_root):
    _append(vtab_root / "count" / "test.txt", "images/test/000000.jpg,1")
    with pytest.raises(DataError, match="test.txt:4: malformed line"):
        check_dataset("vtab", vtab_root, "count")


def test_vtab_empty_split(vtab_root):
    (vtab_root / "count" / "test.txt").write_text("")
    with pytest.raises(DataError, match="test.txt: split is empty"):
        check_dataset("vtab", vtab_root, "count")


def test_vtab_image_in_train_and_test(vtab_root):
    _append(vtab_root / "count" / "test.txt", "images/train800/000003.jpg 3")
    with pytest.raises(DataError, match=r"train800val200.txt: 1 image\(s\) also listed in .*test.txt, e.g. images/train800/000003.jpg"):
        check_dataset("vtab", vtab_root, "count")


def test_vtab_needs_a_task_and_kinds_are_checked(vtab_root):
    with pytest.raises(DataError, match="needs a task"):
        check_dataset("vtab", vtab_root)
    with pytest.raises(DataError, match="unknown dataset kind 'images'"):
        check_dataset("images", vtab_root)


@pytest.fixture
def language_root(tmp_path):
    mini_text.write_mini_commonsense(tmp_path, seed=0, n_train=40, n_test=10)
    mini_text.write_mini_math(tmp_path, seed=0, n_train=40, n_test=10)
    return tmp_path


def test_commonsense_and_math_summaries(language_root):
    commonsense = check_dataset("commonsense", language_root)
    assert commonsense["splits"] == {"train": 40, "val": None, "test": 20}
    assert {name: entry["num_choices"] for name, entry in commonsense["tasks"].items()} == {"mini_arc": 4, "mini_boolq": 2}
    assert check_dataset("commonsense", language_root, "mini_boolq")["num_choices"] == 2
    math = check_dataset("math", language_root, "mini_multiarith")
    assert math["splits"] == {"train": 40, "val": None, "test": 10} and math["answer"] == "number"
    assert math["tasks"]["mini_multiarith"]["train_test_overlap"] == 0
    json.dumps(check_dataset("math", language_root))


def test_malformed_training_record(language_root):
    train = language_root / "commonsense_170k.json"
    records = json.loads(train.read_text())
    records[3] = {"output": "x"}
    train.write_text(json.dumps(records))
    with pytest.raises(DataError, match="commonsense_170k.json: record 3 has no non-empty string 'instruction'"):
        check_dataset("commonsense", language_root)


def test_malformed_and_empty_eval_files(language_root):
    boolq = language_root / "eval" / "mini_boolq" / "test.jsonl"
    boolq.write_text(boolq.read_text().replace("}\n", "\n", 1))
    with pytest.raises(DataError, match="mini_boolq/test.jsonl:1: not valid JSON"):
        check_dataset("commonsense", language_root)
    (language_root / "eval" / "mini_arc" / "test.jsonl").write_text("")
    with pytest.raises(DataError, match="test.jsonl: eval file for task 'mini_arc' is empty"):
        check_dataset("commonsense", language_root, "mini_arc")


def test_math_answer_must_be_a_number(language_root):
    test_file = language_root / "eval" / "mini_addsub" / "test.json"
    records = json.loads(test_file.read_text())
    records[2]["answer"] = "seven"
    test_file.write_text(json.dumps(records))
    with pytest.raises(DataError, match="test.json: record 2 has answer 'seven', not a number"):
        check_dataset("math", language_root)


def test_missing_eval_sets(language_root):
    shutil.rmtree(language_root / "eval")
    with pytest.raises(DataError, match="no math eval set found"):
        check_dataset("math", language_root)
    with pytest.raises(DataError, match="eval/boolq/validation.jsonl: eval file for task 'boolq' not found"):
        check_dataset("commonsense", language_root, "boolq")


def test_vtab_logs_its_decoding_progress(vtab_root, caplog):
    with caplog.at_level("INFO", logger="mambapeft.data.vtab"):
        check_dataset("vtab", vtab_root, "count")
    assert "checking count/test: 3/3 images (100%)" in caplog.text
