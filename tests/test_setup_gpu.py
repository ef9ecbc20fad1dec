"""`mambapeft setup-gpu`: the pip command for PyPI and for a wheel folder, and the kernel check."""
import importlib.util
import json
import subprocess
import sys

import pytest

from mambapeft.setup_gpu import PACKAGES, SetupError, check_kernels, install_command


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mambapeft.cli", "setup-gpu", *args], capture_output=True, text=True,
                          timeout=120)


def test_pypi_install_builds_against_the_installed_torch():
    command = install_command(None)
    assert command[:4] == [sys.executable, "-m", "pip", "install"]
    assert "--no-build-isolation" in command and command[-2:] == list(PACKAGES)


def test_wheel_folder_install_never_reaches_an_index(tmp_path):
    done = _cli("--dry-run", "--wheels", str(tmp_path))
    assert done.returncode == 0, done.stderr
    command = json.loads(done.stdout)["command"]
    assert command[command.index("--find-links") + 1] == str(tmp_path.resolve()) and "--no-index" in command
    assert "--no-deps" in command  # an offline folder cannot satisfy the wheels' pins; the check proves the imports


def test_missing_wheel_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SetupError, match="no such folder"):
        install_command(tmp_path / "absent")
    done = _cli("--wheels", str(tmp_path / "absent"))
    assert done.returncode == 2 and "no such folder" in done.stderr and "Traceback" not in done.stderr


def test_check_reports_the_kernels_or_says_how_to_install_them():
    if importlib.util.find_spec("mamba_ssm") is None:
        with pytest.raises(SetupError, match="run `mambapeft setup-gpu`"):
            check_kernels()
    else:  # a GPU machine with the extras: the CUDA scan must agree with the PyTorch scan
        report = check_kernels()
        assert report["mamba_ssm"] and (not report["cuda"] or report["max_abs_diff_vs_torch_scan"] < 1e-3)
