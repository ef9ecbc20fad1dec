"""models/nvrtc.py: compiled kernels kept on disk, so that each process of a grid does not compile the
same variants again (NVRTC from the `nvidia-cuda-nvrtc` wheel for its version; the compiles counted)."""
from __future__ import annotations

import ctypes

import pytest

from mambapeft.models import nvrtc
from nvrtc_helpers import nvrtc_wheel_library

pytestmark = pytest.mark.skipif(nvrtc_wheel_library() is None,
                                reason="needs the nvidia-cuda-nvrtc wheel (test extras, Linux)")


@pytest.fixture
def compiles(monkeypatch):
    """The compiles made (options of each), each returning a stand-in cubin of its options."""
    made = []

    def compile_cubin(source, source_name, arch, options, library, headers=None):
        made.append(options)
        return b"\x7fELF" + " ".join(options).encode()

    monkeypatch.setattr(nvrtc, "compile_cubin", compile_cubin)
    return made


def _cubin(options):
    return nvrtc.cached_cubin("scan_short.cu", "90", options, ctypes.CDLL(str(nvrtc_wheel_library())))


def test_a_variant_compiled_once_is_read_back_not_compiled_again(tmp_path, monkeypatch, compiles):
    monkeypatch.setenv(nvrtc.CACHE_ENV, str(tmp_path))
    first = _cubin(["-DNSTATE=16"])
    assert _cubin(["-DNSTATE=16"]) == first and compiles == [["-DNSTATE=16"]]
    assert _cubin(["-DNSTATE=22"]) != first and len(compiles) == 2  # other options: another file
    assert sorted(p.name.split(".")[0] for p in tmp_path.iterdir()) == ["scan_short", "scan_short"]
    original = nvrtc.package_source
    monkeypatch.setattr(nvrtc, "package_source", lambda name: "// changed\n" + original(name))
    _cubin(["-DNSTATE=16"])  # the source changed: compiled again
    assert len(compiles) == 3


def test_a_damaged_cache_file_is_compiled_again_and_replaced(tmp_path, monkeypatch, compiles):
    monkeypatch.setenv(nvrtc.CACHE_ENV, str(tmp_path))
    good = _cubin(["-DNSTATE=16"])
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(b"half a fi")
    assert _cubin(["-DNSTATE=16"]) == good and len(compiles) == 2 and cached.read_bytes() == good


def test_off_or_unwritable_the_cache_compiles_in_each_process(tmp_path, monkeypatch, compiles):
    monkeypatch.setenv(nvrtc.CACHE_ENV, "off")
    _cubin(["-DNSTATE=16"])
    _cubin(["-DNSTATE=16"])
    assert len(compiles) == 2 and nvrtc.cache_folder() is None
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(nvrtc.CACHE_ENV, str(blocked / "kernels"))
    assert _cubin(["-DNSTATE=16"]).startswith(b"\x7fELF") and len(compiles) == 3


def test_the_default_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv(nvrtc.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert nvrtc.cache_folder() == tmp_path / "mambapeft" / "kernels"
