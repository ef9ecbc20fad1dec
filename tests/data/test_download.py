"""VTAB-1k download: extraction of RepAdapter's archive layout from a local copy or a URL, and one
clear message whenever the data cannot be had (no network, bad checksum, corrupt archive)."""
import hashlib
import json
import subprocess
import sys
import zipfile

import pytest

from mambapeft.data.check import check_dataset
from mambapeft.data.download import fetch_vtab
from mambapeft.data.errors import DataError

TASKS = ["cifar", "dtd"]


@pytest.fixture
def archive(tmp_path, write_vtab_task):
    """vtab-1k.zip as RepAdapter ships it: a top-level vtab-1k/ folder with one folder per task."""
    staging = tmp_path / "staging" / "vtab-1k"
    for task in TASKS:
        write_vtab_task(staging, task)
    path = tmp_path / "vtab-1k.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(staging.rglob("*")):
            zf.write(file, file.relative_to(staging.parent))
    return path


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_extracts_tasks_one_level_up_from_a_local_archive(archive, tmp_path):
    root = tmp_path / "data"
    record = fetch_vtab(root, TASKS, {"archive": str(archive), "sha256": _sha256(archive)})
    assert record["status"] == "extracted" and record["sha256"] == _sha256(archive)
    for task in TASKS:
        assert check_dataset("vtab", root, task)["splits"]["test"] == 3  # complete and readable
    assert not list(root.glob(".extract-*"))  # no scratch left behind
    assert fetch_vtab(root, TASKS, {"archive": str(archive)})["status"] == "already present"


def test_downloads_from_a_url(archive, tmp_path):
    root = tmp_path / "data"
    record = fetch_vtab(root, TASKS, {"url": archive.as_uri()})
    assert (root / ".download" / "vtab-1k.zip").is_file() and record["status"] == "extracted"
    assert all((root / task / "test.txt").is_file() for task in TASKS)


def test_no_network_names_the_missing_tasks_and_where_to_put_them(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(DataError) as error:
        fetch_vtab(root, TASKS, {"url": "http://127.0.0.1:9/vtab-1k.zip", "archive": str(tmp_path / "vtab-1k.zip")})
    message = str(error.value)
    assert "could not download http://127.0.0.1:9/vtab-1k.zip" in message
    assert "missing tasks: cifar, dtd" in message
    assert f"{root}/<task>/" in message and str(tmp_path / "vtab-1k.zip") in message
    assert not (tmp_path / "vtab-1k.zip").exists() and not (tmp_path / "vtab-1k.zip.partial").exists()


def test_checksum_mismatch_is_refused(archive, tmp_path):
    with pytest.raises(DataError, match="has sha256 .* not the configured"):
        fetch_vtab(tmp_path / "data", TASKS, {"archive": str(archive), "sha256": "0" * 64})
    assert not (tmp_path / "data" / "cifar").exists()


def test_corrupt_archive_leaves_no_task_folder(archive, tmp_path):
    archive.write_bytes(archive.read_bytes()[: len(archive.read_bytes()) // 2])  # truncated download
    root = tmp_path / "data"
    with pytest.raises(DataError, match="not a readable zip"):
        fetch_vtab(root, TASKS, {"archive": str(archive)})
    assert sorted(p.name for p in root.iterdir()) == []


def test_an_archive_without_a_task_says_which(archive, tmp_path):
    with pytest.raises(DataError, match="lacks these tasks.*\n  missing tasks: svhn"):
        fetch_vtab(tmp_path / "data", [*TASKS, "svhn"], {"archive": str(archive)})


def test_command_line_exit_code_and_message(tmp_path):
    spec = {"kind": "vtab", "root": str(tmp_path / "data"), "tasks": TASKS,
            "download": {"url": "http://127.0.0.1:9/vtab-1k.zip"}}
    done = subprocess.run([sys.executable, "-m", "mambapeft.cli", "data", "download", "--spec", json.dumps(spec),
                           "--out", str(tmp_path / "download.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "missing tasks: cifar, dtd" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "download.json").exists()
