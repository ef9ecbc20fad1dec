"""Our short scan's kernels against variants of them, in one process on one GPU: each variant's
forward and backward at Vim-S's shape as the fused mixer function calls them (bf16 u, delta, z and
dout channel-major; B and C token-major views of x_proj's output; kept checkpoints), the first direction
and the second (reverse, adding to the first's output and z gradient), graph-timed (50 calls a CUDA
graph, ``bench.scan._mean_us``), variants alternated over rounds; and each variant's errors against the
float64 PyTorch scan. The README's and the commits' "graph-timed against the kernel before" figures.

    PYTHONPATH=src python3 results/benchmarks/profile/scan_ab.py --states 16 22 \\
        --variant OLD=@old_scan_short.cu --variant C=-DSOME_MACRO=1 [--wants dA dD ddelta_bias]

A variant is NAME=@FILE (that file compiled in place of the package's scan_short.cu; e.g. `git show
REV:src/mambapeft/models/scan_short.cu > old.cu`) or NAME=-DX=1,-DY=0 (extra compiler options); "base"
is the package's kernels as they are. ``--wants``: the sums over channels and steps the backward
computes (scan_short.SUMS, all by default; ``--wants`` alone: none, as a LoRA's training runs it).
"""
import argparse
import statistics

import torch

from mambapeft.bench.scan import _mean_us
from mambapeft.models import nvrtc, scan_short
from mambapeft.models.scan import selective_scan_torch

GRADIENTS = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias")


class Variants:
    """Switches the kernels scan_short compiles: extra options, or another source file (named by a
    macro of its own, so that nvrtc.load_kernels' cache keeps each variant apart)."""

    def __init__(self, specs: list[str]):
        self.options: dict[str, list[str]] = {"base": []}
        self.sources: dict[str, str] = {}
        for spec in specs:
            name, value = spec.split("=", 1)
            if value.startswith("@"):
                flag = f"-DAB_SOURCE_{name}=1"
                self.sources[flag] = open(value[1:]).read()
                self.options[name] = [flag]
            else:
                self.options[name] = value.split(",")
        self.current: list[str] = []
        macros, package_source = scan_short.macros, nvrtc.package_source
        scan_short.macros = lambda *args, **kwargs: macros(*args, **kwargs) + self.current
        nvrtc.package_source = lambda name: next(
            (self.sources[f] for f in self.current if f in self.sources and name == scan_short.SOURCE),
            None) or package_source(name)

    def use(self, name: str) -> None:
        self.current = self.options[name]


def inputs(batch: int, channels: int, length: int, states: int, generator: torch.Generator):
    def sequence(scale=1.0, shift=0.0):
        t = torch.randn(channels, batch, length, generator=generator) * scale + shift
        return t.bfloat16().cuda().transpose(0, 1)

    u, delta, z, dout = sequence(), sequence(0.5, -1.0), sequence(), sequence()
    A = (-1 - 15 * torch.rand(channels, states, generator=generator)).cuda()
    x_dbl = torch.randn(batch, length, 24 + 2 * states, generator=generator).bfloat16().cuda()
    B, C = x_dbl[..., 24:24 + states].transpose(1, 2), x_dbl[..., 24 + states:].transpose(1, 2)
    D = torch.randn(channels, generator=generator).cuda()
    bias = (0.5 * torch.randn(channels, generator=generator)).cuda()
    return u, delta, A, B, C, D, z, bias, dout


def timed_calls(x, reverse: bool, wants: tuple[str, ...]):
    """(forward, backward) as the fused function calls them for one direction."""
    u, delta, A, B, C, D, z, bias, dout = x
    into, dz = (torch.zeros_like(u) if reverse else None), torch.zeros_like(u)
    _, _, states = scan_short.forward(u, delta, A, B, C, D, z, bias, True, reverse, True, None, into)
    return (lambda: scan_short.forward(u, delta, A, B, C, D, z, bias, True, reverse, True, None, into),
            lambda: scan_short.backward(u, delta, A, B, C, D, z, bias, dout, dz, True, reverse, states, None,
                                        add_dz=reverse, wants=wants))


def ours(x, reverse: bool, wants: tuple[str, ...]) -> dict:
    u, delta, A, B, C, D, z, bias, dout = x
    out, out_z, states = scan_short.forward(u, delta, A, B, C, D, z, bias, True, reverse, True)
    du, ddelta, dA, dB, dC, dD, dbias, dz, _, _ = scan_short.backward(u, delta, A, B, C, D, z, bias, dout, None,
                                                                      True, reverse, states, wants=wants)
    return dict(du=du, ddelta=ddelta, dA=dA, dB=dB, dC=dC, dD=dD, dz=dz, dbias=dbias, out_z=out_z)


def reference(x, reverse: bool) -> dict:
    """The float64 PyTorch scan (reverse: on the sequences flipped along time, flipped back)."""
    u, delta, A, B, C, D, z, bias, dout = x
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
    leaves = [t.detach().double().requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    u_, delta_, A_, B_, C_, D_, z_, bias_ = leaves
    out = flip(selective_scan_torch(flip(u_), flip(delta_), A_, flip(B_), flip(C_), D_, flip(z_), bias_, True))
    out.backward(dout.double())
    order = (u_, delta_, A_, B_, C_, D_, z_, bias_)
    return {**{name: t.grad for name, t in zip(GRADIENTS, order)}, "out_z": out.detach()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", type=int, nargs="+", default=[16])
    parser.add_argument("--variant", action="append", default=[], help="NAME=@FILE.cu or NAME=-DX=1,-DY=0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wants", nargs="*", choices=scan_short.SUMS, default=scan_short.SUMS,
                        help="the sums the backward computes (default all; none: as a LoRA's training)")
    args = parser.parse_args()
    variants = Variants(args.variant)
    for states in args.states:
        x = inputs(32, 768, 197, states, torch.Generator().manual_seed(0))
        for reverse in (False, True):
            expected = reference(x, reverse)
            for name in variants.options:
                variants.use(name)
                got = ours(x, reverse, tuple(args.wants))
                errors = " ".join(f"{k}={float((got[k].double() - v).abs().max() / v.abs().max()):.2e}"
                                  for k, v in expected.items() if got[k] is not None)
                print(f"errors states={states} reverse={int(reverse)} {name}: {errors}", flush=True)
        times: dict[tuple, list[float]] = {}
        for _ in range(args.rounds):
            for name in variants.options:
                variants.use(name)
                for reverse in (False, True):
                    forward, backward = timed_calls(x, reverse, tuple(args.wants))
                    times.setdefault((name, reverse, "forward"), []).append(_mean_us(forward, 50))
                    times.setdefault((name, reverse, "backward"), []).append(_mean_us(backward, 50))
        for (name, reverse, which), runs in times.items():
            print(f"us states={states} {name} reverse={int(reverse)} {which}: median {statistics.median(runs):.1f} "
                  f"(runs {' '.join(f'{t:.1f}' for t in runs)})", flush=True)


if __name__ == "__main__":
    main()
