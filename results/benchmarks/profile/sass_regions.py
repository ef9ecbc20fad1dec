"""Instructions a full 16-step tile of the short scan's backward (or forward) issues, by region, from the sm_90
SASS of a variant compiled on the CPU: no GPU needed (the counts of the README's and the commits' "SASS" figures).

    pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm   # (the nvidia-cuda-nvrtc wheel compiles)
    PYTHONPATH=src python3 results/benchmarks/profile/sass_regions.py [--kernel bwd|fwd] [--states 16] \
        [--source FILE] [--layout vim-s|arguments] [-- -D...]

``--layout vim-s`` (the default) compiles in the sizes and strides the fused mixer passes at Vim-S's
shape (KNOWN_BACKWARD_ARGS or KNOWN_FORWARD_ARGS, as training runs the kernel: scan_short's function
called on meta tensors laid out as the fused function lays them out, its arguments captured);
``arguments``: the variant that reads them as arguments (past a variant's first MAX_LAYOUTS layouts, and
every kernel before ed88cb9).

Markers (``pmevent``, which SASS keeps as PMTRIG) go in a copy of the source at the kernel's regions of a
tile (the backward's: its reads, its shared-memory puts and per-(step, channel) work, each chunk's walk,
the chunk's sums over warps and the stores; the forward's: its puts and per-(step, channel) work, the next
tile's reads, the walk and the stores); the partial last tile's walk is left out, so each region's
instructions run once a full tile (the backward's chunk regions: twice). Static counts: they show what a
change removes, not what it costs in time.
"""
import argparse, collections, ctypes, dataclasses, os, pathlib, re, shutil, subprocess, sys

import torch

from mambapeft.models import nvrtc, scan_short

@dataclasses.dataclass(frozen=True)
class Kernel:
    function: str  # its name in the cubin
    set_up: str  # what runs before the first marker
    # (the source line a marker goes before, or after where it opens a loop's body, the region it opens,
    # after); the regions are numbered from 1 in this order
    marks: tuple[tuple[str, str, bool], ...]


KERNELS = {
    "bwd": Kernel("scan_bwd", "set-up, the first pass (without kept states)", (
        ("        fetch(u_in, u, u_sc, left, t0, length);\n", "reads into registers", False),
        ("        __syncthreads();  // the last tile's gradients are stored\n", "puts, per-(step, channel) work", False),
        ("        for (int first = TILE - CHUNK; first >= 0; first -= CHUNK) {  // the tile's chunks, from the last\n",
         "the chunks' walks", True),
        ("            // the chunk's dB and dC: the block's warps' sums, one global atomic per (state, step)\n",
         "the chunks' sums over warps", False),
        ("        store_gradients(du, ddelta, dz, out_z, du_sc", "stores", False))),
    "fwd": Kernel("scan_fwd", "set-up, the first tile's reads", (
        ("        __syncthreads();  // the last tile's output is stored\n", "puts, per-(step, channel) work", False),
        ("        fetch(u_next, u, u_sc, left, t0 + TILE, length);  // the next tile's, read while this one is computed\n",
         "the next tile's reads", False),
        ("        if (t0 + TILE <= length) walk(Flag<true>());\n", "the walk", False),
        ("        if (HAS_Z) store_outputs(out_z, out_z_sc", "stores", False))),
}


def marked(source: str, kernel: str = "bwd") -> str:
    source = source.replace("else walk(Flag<false>());", "")
    for n, (text, _, after) in enumerate(KERNELS[kernel].marks, 1):
        if source.count(text) != 1:
            sys.exit(f"sass_regions: the source no longer has {text.strip()!r}: update KERNELS")
        marker = f'asm volatile("pmevent {n};");\n'
        source = source.replace(text, text + "            " + marker if after else "        " + marker + text)
    return source


def vim_s_layout(states: int, batch: int = 32, channels: int = 768, length: int = 197, rank: int = 24,
                 kernel: str = "bwd") -> str:
    """KNOWN_BACKWARD_ARGS (or KNOWN_FORWARD_ARGS) of the first direction's kernel as Vim-S's fused mixer calls
    it in training: u, delta, dy channel-major ((channels, batch, length) storage), z and dz halves of xz and
    its gradient (likewise), B and C views of x_proj's token-major output (its rows padded to 16 bytes, as
    scan._aligned_projection pads them), checkpoints kept by the forward."""
    meta = dict(device="meta", dtype=torch.bfloat16)

    def channel_major(rows):
        return torch.empty(rows, batch, length, **meta).transpose(0, 1)

    width = rank + 2 * states
    x_dbl = torch.empty(batch * length, width + -width % 8, **meta)[:, :width]
    B, C = (x_dbl[:, i:i + states].unflatten(0, (batch, -1)).transpose(1, 2) for i in (rank, rank + states))
    u, delta, dout = channel_major(channels), channel_major(channels), channel_major(channels)
    z, dz = channel_major(2 * channels)[:, channels:], channel_major(2 * channels)[:, channels:]
    A = torch.empty(channels, states, device="meta")
    D, bias = torch.empty(channels, device="meta"), torch.empty(channels, device="meta")
    captured = []
    run, scan_short._run = scan_short._run, lambda name, *args: captured.append(args[-1])
    try:
        if kernel == "fwd":
            scan_short.forward(u, delta, A, B, C, D, z, bias, True, keep_states=True)
        else:
            scan_short.backward(u, delta, A, B, C, D, z, bias, dout, dz, True, states=scan_short.checkpoints(u, states))
    finally:
        scan_short._run = run
    names, macro = scan_short.KNOWN[KERNELS[kernel].function]
    return f"-D{macro}={scan_short.known_args(names, tuple(captured[0]))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=tuple(KERNELS), default="bwd", help="the backward's tile or the forward's")
    parser.add_argument("--states", type=int, default=16)
    parser.add_argument("--source", type=pathlib.Path, help="a scan_short.cu to count (default: the package's)")
    parser.add_argument("--layout", choices=("vim-s", "arguments"), default="vim-s",
                        help="the layout compiled in (Vim-S's, as training runs it), or read as arguments")
    parser.add_argument("defines", nargs="*", help="extra compiler options (after --), e.g. -DSOME_MACRO=1")
    args = parser.parse_args()
    wheels = pathlib.Path(sys.prefix).glob("lib/python*/site-packages/nvidia/cu*")
    found = {path.name: path for wheel in wheels for path in (*wheel.glob("bin/cuobjdump"), *wheel.glob("lib/libnvrtc.so*"))}
    cuobjdump = shutil.which("cuobjdump") or found.get("cuobjdump")
    library = next((path for name, path in found.items() if name.startswith("libnvrtc.so")), None)
    if cuobjdump is None or library is None:
        sys.exit("sass_regions: needs cuobjdump, nvdisasm and NVRTC: "
                 "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm nvidia-cuda-nvrtc")
    source = args.source.read_text() if args.source else nvrtc.package_source(scan_short.SOURCE)
    options = scan_short.macros(torch.bfloat16, torch.bfloat16, True, True, True, True, False, False, args.states,
                                False, True) + args.defines
    if args.layout == "vim-s":
        options.append(vim_s_layout(args.states, kernel=args.kernel))
    cubin = nvrtc.compile_cubin(marked(source, args.kernel), scan_short.SOURCE, "90", options, ctypes.CDLL(str(library)))
    kernel = KERNELS[args.kernel]
    function = kernel.function
    path = pathlib.Path("/tmp/sass_regions.cubin")
    path.write_bytes(cubin)
    env = {**os.environ, "PATH": f"{pathlib.Path(cuobjdump).parent}:{os.environ.get('PATH', '')}"}  # its nvdisasm
    done = subprocess.run([str(cuobjdump), "-sass", "-fun", function, str(path)], capture_output=True, text=True, env=env)
    if function not in done.stdout:
        sys.exit(f"sass_regions: cuobjdump: {done.stderr.strip()}")
    sass = done.stdout
    resources = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
    region, counts = 0, collections.defaultdict(collections.Counter)
    for line in sass.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*)", line)
        if not match:
            continue
        opcode = match.group(2).split(".")[0]
        if opcode == "PMTRIG":
            region = int(match.group(3).strip(), 16).bit_length() - 1
            continue
        counts[region][opcode] += 1
    names = {0: kernel.set_up, **{n: region for n, (_, region, _) in enumerate(kernel.marks, 1)}}
    for n in sorted(counts):
        top = " ".join(f"{op}:{k}" for op, k in counts[n].most_common(8))
        print(f"{names[n]:46s} {sum(counts[n].values()):6d}  {top}")
    print("a full tile:", sum(sum(counts[n].values()) for n in counts if n), "instructions")
    lines = resources.splitlines()
    header = f" Function {function}:"
    usage = lines[lines.index(header) + 1].strip() if header in lines else "?"
    print("the compile with markers (its stack can differ from the unmarked one's by a few bytes):", usage)


if __name__ == "__main__":
    main()
