"""What the CPU tests of our Triton kernels share: CPU tensors go through a Triton kernel only in
Triton's interpreter, which conftest.py switches on (TRITON_INTERPRET=1) where there is no CUDA device."""
from __future__ import annotations

import os

import pytest


def skip_unless_interpreted() -> None:
    """Skip the calling test where Triton is missing (it has wheels for Linux only) or compiles its kernels
    for a GPU: on a CUDA machine conftest.py leaves the interpreter off, and a compiled kernel cannot read
    the test's CPU tensors (there the GPU tests, ``-m gpu``, run these kernels on the device)."""
    pytest.importorskip("triton", reason="Triton has wheels for Linux only")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs Triton kernels on CPU tensors, in Triton's interpreter: TRITON_INTERPRET=1 (conftest.py "
                    "sets it where there is no CUDA device)")
