"""``mambapeft setup-gpu``: install the CUDA extras (mamba-ssm, causal-conv1d) and prove they run.

From PyPI, mamba-ssm and causal-conv1d compile against the installed torch, so pip must not build
them in an isolated environment (their documented ``--no-build-isolation``). On a machine without
network, ``--wheels DIR`` installs prebuilt wheels from a folder instead (without resolving their
dependencies, which an offline machine cannot fetch). Either way the command
ends with a check: the kernels import and, on a CUDA device, agree with the PyTorch scan.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# the pyproject's `cuda` extra
PACKAGES = ("mamba-ssm>=2.2", "causal-conv1d>=1.4")


class SetupError(RuntimeError):
    """The CUDA extras could not be installed or do not work; the message says what to do."""


def install_command(wheels: str | Path | None, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    command = [sys.executable, "-m", "pip", "install"]
    if wheels is None:
        return [*command, "--no-build-isolation", *packages]
    if not Path(wheels).is_dir():
        raise SetupError(f"--wheels {wheels}: no such folder; give the folder holding the mamba-ssm and "
                         "causal-conv1d wheels built for this torch and Python")
    # --no-deps: a prebuilt wheel's build-time pins (mamba-ssm 2.3 names tilelang) are not in the
    # folder; what the kernels really need at run time is proven by the check that follows
    return [*command, "--no-index", "--no-deps", "--find-links", str(Path(wheels).resolve()), *packages]


def check_kernels() -> dict:
    """Import the kernels; on a CUDA device, compare one selective scan with the PyTorch scan."""
    import torch

    from .models.scan import installed_kernels

    installed = installed_kernels()
    if not installed["mamba_ssm"]:
        raise SetupError(f"mamba-ssm does not import ({installed['errors'].get('mamba_ssm')}); "
                         "run `mambapeft setup-gpu` (add --wheels DIR offline)")
    conv = "causal-conv1d kernels" if installed["causal_conv1d"] else "PyTorch conv1d (causal-conv1d not installed: slower)"
    report = {"mamba_ssm": True, "conv": conv, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        from .models.scan import selective_scan_cuda, selective_scan_torch

        generator = torch.Generator().manual_seed(0)
        b, d, n, length = 2, 64, 16, 128
        u, delta = torch.randn(b, d, length, generator=generator), torch.rand(b, d, length, generator=generator)
        a, bb, c = -torch.rand(d, n, generator=generator), torch.randn(b, n, length, generator=generator), torch.randn(b, n, length, generator=generator)
        cuda = selective_scan_cuda(*(t.cuda() for t in (u, delta, a, bb, c))).cpu()
        reference = selective_scan_torch(u, delta, a, bb, c)
        report["max_abs_diff_vs_torch_scan"] = float((cuda - reference).abs().max())
        if report["max_abs_diff_vs_torch_scan"] > 1e-3:
            raise SetupError(f"the CUDA scan disagrees with the PyTorch scan ({report['max_abs_diff_vs_torch_scan']:.2e}); "
                             "the wheels were likely built for another torch or CUDA")
        report["short_scan"] = _check_short_scan(u, delta, a, bb, c, reference) if installed["nvrtc"] else (
            "NVRTC not found (PyTorch's CUDA wheels ship it): mamba-ssm's scan at every length")
        report["conv_backward"] = _check_conv_backward(generator) if installed["nvrtc"] else (
            "NVRTC not found: causal-conv1d's conv backward")
    return report


def _check_short_scan(u, delta, a, b, c, reference) -> str:
    """Compile our short-sequence scan (NVRTC) and compare its output with the PyTorch scan's."""
    from .models import scan_short

    out, _, _ = scan_short.forward(*(t.cuda() for t in (u, delta, a, b, c)), None, None, None, False)
    difference = float((out.cpu() - reference).abs().max())
    if difference > 1e-3:
        raise SetupError(f"our short-sequence scan disagrees with the PyTorch scan ({difference:.2e}); "
                         f"set {scan_short.ENV}=0 to run mamba-ssm's, and report it")
    return f"compiled; max abs diff vs the PyTorch scan {difference:.1e}"


def _check_conv_backward(generator) -> str:
    """Compile our conv backward (NVRTC) and compare its gradients with PyTorch's conv under autograd."""
    import torch

    from .models import conv_bwd
    from .models.scan import causal_conv1d_torch

    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((2, 64, 40), (64, 4), (64,)))
    dout = torch.randn(x.shape, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    causal_conv1d_torch(*leaves).backward(dout)
    ours = conv_bwd.backward(*(t.cuda() for t in (x, weight, bias, dout)), None, True)
    difference = max(float((got.cpu() - leaf.grad).abs().max()) for got, leaf in zip(ours, leaves))
    if difference > 1e-3:
        raise SetupError(f"our conv backward disagrees with PyTorch's ({difference:.2e}); "
                         f"set {conv_bwd.ENV}=0 to run causal-conv1d's, and report it")
    return f"compiled; max abs diff vs PyTorch's gradients {difference:.1e}"


def setup_gpu(wheels: str | Path | None, dry_run: bool = False) -> dict:
    command = install_command(wheels)
    print("+ " + " ".join(command), file=sys.stderr)
    if dry_run:
        return {"command": command}
    if subprocess.run(command).returncode != 0:
        raise SetupError("pip could not install the CUDA extras (its output above says why); from PyPI they compile "
                         "against the installed torch and need nvcc, or use --wheels DIR with prebuilt wheels")
    # a fresh interpreter: this one imported the scan module before the kernels existed
    check = subprocess.run([sys.executable, "-m", "mambapeft.cli", "-q", "setup-gpu", "--check"])
    if check.returncode != 0:
        raise SetupError("the CUDA extras installed but their check failed (see above)")
    return {"command": command, "checked": True}
