"""``mambapeft bench``: speed benchmarks (scan, training steps, data loading), profiles and kernel checks."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import positive_int


def add_parsers(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="speed benchmarks").add_subparsers(dest="bench_command", required=True)
    _add_scan(bench)
    _add_scan_kernels(bench)
    _add_train(bench)
    _add_plot(bench)
    _add_generate(bench)
    _add_data(bench)
    _add_profile(bench)
    _add_equivalence(bench)
    _add_multi_gpu(bench)
    _add_source_digest(bench)


def _add_source_digest(bench) -> None:
    p = bench.add_parser("source-digest", help="the source digest a benchmark record names (bench train, bench "
                         "profile): match a record to a checkout", description="Prints the sha256 over the package's "
                         "code (.py, .cu, .cuh) and vision/ and language/'s YAML files, as benchmark records store it "
                         "under provenance.source_sha256 (the Markdown shows its first 16 digits). Run it at a "
                         "commit to tell whether a record was measured on that commit's source.")
    p.set_defaults(func=cmd_bench_source_digest)


def cmd_bench_source_digest(args) -> None:
    from ..bench.common import source_digest

    print(source_digest())


def _add_multi_gpu(bench) -> None:
    p = bench.add_parser("multi-gpu", help="the pipeline's wall time on 1 GPU vs k GPUs (each job on its own GPU)",
                         description="Runs the config's preparation once, then its whole grid twice, with "
                                     "`--resources gpu=1` and `gpu=k`, and writes multi_gpu_<device>.json: both wall "
                                     "times, the speed-up, and which GPU (index, UUID) each run's jobs held.")
    p.add_argument("--config", required=True, help="a config whose experiments ask for `resources: {gpus: 1}`")
    p.add_argument("--gpus", type=positive_int, default=2, help="GPUs of the second run")
    p.add_argument("--cores", type=positive_int, default=os.cpu_count(), help="snakemake -c")
    p.add_argument("--work-dir", default="results/multi_gpu", help="results of the timed runs")
    p.add_argument("--out", default="results/benchmarks", help="folder for multi_gpu_<device>.json")
    p.set_defaults(func=cmd_bench_multi_gpu)


def cmd_bench_multi_gpu(args) -> None:
    from ..bench.multi_gpu import bench_multi_gpu

    report = bench_multi_gpu(Path(args.config).resolve(), args.gpus, args.cores, Path(args.out), Path(args.work_dir))
    print(json.dumps({k: report[k] for k in ("preparation_s", "speedup")}))


def _add_scan(bench) -> None:
    p = bench.add_parser("scan", help="selective scan fwd+bwd: our PyTorch scan vs a naive per-step loop (and CUDA)")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per call")
    p.add_argument("--d-inner", type=positive_int, default=1536, help="channels (the mixer's d_inner)")
    p.add_argument("--length", type=positive_int, default=512, help="sequence length (time steps)")
    p.add_argument("--d-state", type=positive_int, default=16, help="state size N per channel")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed calls after one warm-up (the naive loop runs once)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the scans run (cuda adds the CUDA kernel, if built)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--no-naive", action="store_true", help="skip the (slow) naive loop")
    p.set_defaults(func=cmd_bench_scan)


def cmd_bench_scan(args) -> None:
    import torch

    from ..bench.scan import bench_scan

    if args.device == "cuda":
        _require_cuda("bench scan --device cuda")
    torch.set_num_threads(args.threads)
    result = bench_scan(args.batch, args.d_inner, args.length, args.d_state, args.repeats, args.device,
                        naive=not args.no_naive)
    print(json.dumps(result, indent=1))


def _add_scan_kernels(bench) -> None:
    p = bench.add_parser("scan-kernels", help="CUDA: our short-sequence scan kernels vs mamba-ssm's, forward and "
                                              "backward microseconds (bf16), and our conv backward "
                                              "vs causal-conv1d's")
    p.add_argument("--shapes", nargs="+", type=_shape, help="BATCH,CHANNELS,LENGTH each (default: Vim-S at 197 "
                                                            "and 256 steps, Mamba-1.4b at micro-batch 32, 8,1536,1024)")
    p.add_argument("--repeats", type=positive_int, default=50, help="calls captured in one CUDA graph and timed, "
                                                                    "after 5 warm-ups")
    p.add_argument("--states", nargs="+", type=positive_int, default=[16],
                   help="state counts N, each at every shape (default 16; additional-scan extends it to 16 + n)")
    p.add_argument("--out", help="folder for <device>.scan_kernels.json (else printed only)")
    p.set_defaults(func=cmd_bench_scan_kernels)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        batch, channels, length = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCH,CHANNELS,LENGTH (three integers)") from None
    return batch, channels, length


def cmd_bench_scan_kernels(args) -> None:
    from ..bench.scan import KERNEL_SHAPES, bench_scan_kernels

    try:
        report = bench_scan_kernels(tuple(args.shapes or KERNEL_SHAPES), args.repeats, tuple(args.states))
    except RuntimeError as error:
        raise SystemExit(f"error: {error}") from None
    text = json.dumps(report, indent=1)
    if args.out:
        path = Path(args.out) / f"{report['device'].replace(' ', '_')}.scan_kernels.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)


def _add_train(bench) -> None:
    p = bench.add_parser("train", help="GPU training-step throughput of every method and of the baselines")
    p.add_argument("--out", default="results/benchmarks", help="folder for <device>.json, <device>.md and <device>.png "
                   "(the image rows as bars: `bench plot`)")
    p.add_argument("--vision-backbone", default="vim-s", help="vim-* variant, batch 32 at 224x224 (training) and the "
                   "recipe's eval batch (evaluation forward)")
    p.add_argument("--language-backbones", nargs="+", default=["mamba-130m", "mamba-1.4b"],
                   help="mamba-* / mamba2-* variants, sequence 256 at the engine's micro-batch")
    p.add_argument("--vision-methods", nargs="+", help="default: every method of vision/methods.yaml")
    p.add_argument("--no-vision", action="store_true", help="language rows only (no Vim or timm rows)")
    p.add_argument("--language-methods", nargs="+", help="default: every method of language/methods.yaml")
    p.add_argument("--no-baselines", action="store_true", help="skip transformers+peft and timm+peft")
    p.add_argument("--cuda-graphs", action="store_true", help="training steps and Vim evaluation forwards as CUDA graphs "
                   "(runtime key cuda_graphs)")
    p.add_argument("--micro-batch", type=positive_int,
                   help="sequences of 256 tokens per language step, ours and transformers' (default 4, the paper "
                        "recipe's); memory only in training, so raise it to fill the GPU. Give other values their "
                        "own --out: the files are named by device")
    p.set_defaults(func=cmd_bench_train)


def cmd_bench_train(args) -> None:
    from ..bench.train import LANGUAGE_SHAPE, run_benchmarks

    report = run_benchmarks(Path(args.out), args.vision_backbone, tuple(args.language_backbones),
                            [] if args.no_vision else args.vision_methods, args.language_methods,
                            baselines=not args.no_baselines, cuda_graphs=args.cuda_graphs,
                            language_shape=(args.micro_batch or LANGUAGE_SHAPE[0], LANGUAGE_SHAPE[1]))
    print(json.dumps(report["projection"], indent=1))


def _add_plot(bench) -> None:
    p = bench.add_parser("plot", help="draw a bench train record's image rows as a bar chart (PNG)",
                         description="Reads the .json that `mambapeft bench train` wrote and draws its Vim rows' "
                         "training throughput as bars, fastest first (the rows vision/paper.yaml publishes and the "
                         "newer ones in two colours), with the timm baselines as lines: the picture `bench train` "
                         "writes beside its record, for a record written before it did. No GPU needed.")
    p.add_argument("record", type=Path, help="a bench train record, e.g. "
                   "results/benchmarks/train_mb32/NVIDIA_H200-cuda_graphs.json")
    p.add_argument("--out", type=Path, help="the PNG to write (default: the record's path with .png)")
    p.set_defaults(func=cmd_bench_plot)


def cmd_bench_plot(args) -> None:
    from ..bench.figure import draw_throughput, read_train_record

    out = args.out or args.record.with_suffix(".png")
    draw_throughput(read_train_record(args.record), out)
    print(out)


def _comma_list(kind: type):
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item]
    return parse


def _add_generate(bench) -> None:
    p = bench.add_parser("generate", help="GPU: greedy generation speed, ours (CUDA graph) vs mamba-ssm and transformers",
                         description="Greedy decoding of --new tokens after a --prompt-token prompt, bf16 on CUDA: "
                                     "tokens/s and per-token latency of ours (step mode, decode steps as CUDA "
                                     "graphs; bare and with adapters active), mamba-ssm's generate(cg=True) and "
                                     "transformers' generate, with the same weights. Writes generate_<device>.json "
                                     "and .md under --out.")
    p.add_argument("--backbones", type=_comma_list(str), default=["mamba-130m", "mamba-1.4b"],
                   help="comma-separated LM variants")
    p.add_argument("--batch", type=_comma_list(positive_int), default=[1, 64], help="comma-separated batch sizes")
    p.add_argument("--prompt", type=positive_int, default=128, help="prompt tokens")
    p.add_argument("--new", type=positive_int, default=256, help="generated tokens")
    p.add_argument("--methods", type=_comma_list(str), default=["affix", "additional_scan", "periodic"],
                   help="methods of language/methods.yaml whose adapters generate too (comma-separated; '' for none)")
    p.add_argument("--repeats", type=_comma_list(positive_int), default=[3, 1],
                   help="timed calls after one warm-up, per backbone in order (comma-separated; the last one for "
                        "the rest): fewer for mamba-1.4b keeps the default run within ~4 minutes on an H200")
    p.add_argument("--weights-root", default="resources/weights",
                   help="<root>/<backbone>/ with config.json + weights; random weights of the real sizes where absent")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: fp32, no graphs (tests)")
    p.add_argument("--no-baselines", action="store_true", help="ours only")
    p.add_argument("--out", default="results/benchmarks", help="folder for generate_<device>.json and .md")
    p.set_defaults(func=cmd_bench_generate)


def cmd_bench_generate(args) -> None:
    from ..bench.generate import run_generate_bench

    if args.device == "cuda":
        _require_cuda("bench generate --device cuda")
    report = run_generate_bench(Path(args.out), args.backbones, args.batch, args.prompt, args.new, args.methods,
                                args.repeats, Path(args.weights_root), args.device, baselines=not args.no_baselines)
    print(json.dumps({b: e["weights"] for b, e in report["backbones"].items()}))


def _add_data(bench) -> None:
    p = bench.add_parser("data", help="one epoch of VTAB data loading: decoding the files vs the uint8 cache")
    p.add_argument("--images", type=positive_int, default=800,
                   help="images in the temporary task (a VTAB train800val200 has 1000)")
    p.add_argument("--width", type=positive_int, default=500, help="source image width")
    p.add_argument("--height", type=positive_int, default=375, help="source image height")
    p.add_argument("--resolution", type=positive_int, default=224, help="square side of the resized images (pixels)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="epochs timed each way (their min and median are reported)")
    p.add_argument("--out", help="also write the JSON report here")
    p.set_defaults(func=cmd_bench_data)


def cmd_bench_data(args) -> None:
    from ..bench.data import bench_data
    from ..io import write_json_atomic

    report = bench_data(args.images, (args.width, args.height), args.resolution, repeats=args.repeats)
    if args.out:
        write_json_atomic(Path(args.out), report)
    print(json.dumps(report))


def _add_profile(bench) -> None:
    p = bench.add_parser("profile", help="GPU: where a training step's time goes, by kernel family (torch.profiler)")
    p.add_argument("--backbone", default="vim-s", help="vim-* (images at 224 px) or mamba-* (sequences of 256 tokens)")
    p.add_argument("--methods", nargs="+", default=["linear_probe", "lorap_x"],
                   help="methods of the domain's methods.yaml to profile, one step each (default linear_probe lorap_x)")
    p.add_argument("--batch", type=positive_int, help="images (default 32) or sequences (default 4) per step")
    p.add_argument("--steps", type=positive_int, default=5, help="profiled steps, after 3 untimed ones (default 5)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="profile the step as the graphed trainer runs it (runtime cuda_graphs: forward and backward "
                        "replayed from CUDA graphs), not eager")
    p.add_argument("--out", type=Path, help="also write <device>.<backbone>.profile.json and .md into this folder "
                                            "(<backbone>-cuda_graphs with --cuda-graphs)")
    p.set_defaults(func=cmd_bench_profile)


def cmd_bench_profile(args) -> None:
    from ..bench.common import provenance
    from ..bench.profile import markdown, profile_report, write_reports
    from ..build import domain_of

    _require_cuda("bench profile times GPU kernels")
    domain = domain_of(args.backbone)
    batch = args.batch or (32 if domain == "vision" else 4)
    reports, source = [], provenance()
    for method in args.methods:
        reports.append(profile_report(domain, method, args.backbone, batch, steps=args.steps,
                                      cuda_graphs=args.cuda_graphs))
        print(markdown(reports[-1:]), flush=True)
        if args.out:  # after every method: an interrupted run keeps what it profiled
            write_reports(reports, args.out, source)


def _require_cuda(what: str) -> None:
    """A user error (one line) when no CUDA device is visible: ``what`` needs one."""
    import torch

    from ..runspec import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError(f"{what}: no CUDA device is visible here (run it on a GPU machine)")


def _add_equivalence(bench) -> None:
    p = bench.add_parser("equivalence", help="GPU: relative errors CUDA kernels vs PyTorch scan, step vs parallel")
    p.set_defaults(func=cmd_bench_equivalence)


def cmd_bench_equivalence(args) -> None:
    from ..bench.equivalence import equivalence_report

    print(json.dumps(equivalence_report(), indent=1))
