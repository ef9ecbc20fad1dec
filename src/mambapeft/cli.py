"""``mambapeft``: the command line every Snakemake rule calls (and users can call directly).

Subcommands that rules call take a ``--spec`` JSON object computed by ``mambapeft.runspec`` from
the config, so a rule stays a one-line shell command and its params are Snakemake rerun triggers.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .runspec import ConfigError

EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type, ...]:
    """Exceptions that mean bad input (config, data, checkpoint, method): message, no traceback."""
    from .data.errors import DataError
    from .models.checkpoints import CheckpointError
    from .peft.registry import PeftConfigError
    from .report.tables import ResultsError
    from .setup_gpu import SetupError

    return ConfigError, DataError, CheckpointError, PeftConfigError, ResultsError, SetupError, FileNotFoundError


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--spec is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ConfigError("--spec must be a JSON object")
    return value


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def cmd_data_prepare(args) -> None:
    from .data.prepare import prepare_dataset

    prepare_dataset(_json_arg(args.spec), Path(args.manifest))


def cmd_data_download(args) -> None:
    from .data.download import fetch_vtab
    from .io import write_json_atomic

    spec = _json_arg(args.spec)
    if spec.get("kind") != "vtab" or "download" not in spec:
        raise ConfigError("data download fetches VTAB-1k: the spec must be a vtab data entry with a `download:` mapping")
    write_json_atomic(Path(args.out), fetch_vtab(spec["root"], spec["tasks"], spec["download"]))


def cmd_data_cache(args) -> None:
    from .data.vtab import build_image_cache

    summary = build_image_cache(args.root, args.task, args.split, args.resolution, args.out)
    print(json.dumps(summary))


def cmd_data_check(args) -> None:
    from .data.check import check_dataset

    print(json.dumps(check_dataset(args.kind, args.path, args.task), indent=1))


# ------------------------------------------------------------------------------------------------
# backbones
# ------------------------------------------------------------------------------------------------
def cmd_backbone_prepare(args) -> None:
    from .models.weights import prepare_backbone

    prepare_backbone(args.backbone, _json_arg(args.spec), Path(args.manifest))


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _spec_from_args(args) -> dict:
    if args.spec:
        return _json_arg(args.spec)
    from .runspec import Run, load_config, resolve_run

    needed = ("experiment", "backbone", "task", "method")
    missing = [f"--{n}" for n in needed if getattr(args, n) is None]
    if missing or not args.config:
        raise ConfigError(f"give --spec JSON, or --config with {' '.join(missing or needed)}")
    config = load_config(*args.config)
    return resolve_run(config, Run(args.experiment, args.backbone, args.task, args.method, args.seed))


def cmd_train(args) -> None:
    spec = _spec_from_args(args)
    if args.dry_run:
        from .train.dryrun import dry_run

        print(json.dumps(dry_run(spec), sort_keys=True))
        return
    from .train.runner import run_training

    record = run_training(spec)
    print(json.dumps({k: record.get(k) for k in ("status", "metric", "value", "trainable_params", "backend")}))


def cmd_params(args) -> None:
    from .report.params import count_params

    print(json.dumps(count_params(args.backbone, args.method, args.num_classes)))


# ------------------------------------------------------------------------------------------------
# tables and figures
# ------------------------------------------------------------------------------------------------
def cmd_tables(args) -> None:
    from .report.tables import write_experiment_table

    write_experiment_table(args.experiment, args.metrics, Path(args.csv), Path(args.md))


def cmd_params_table(args) -> None:
    from .report.params import write_params_table

    write_params_table(_json_arg(args.spec), Path(args.csv), Path(args.md))


def cmd_figures(args) -> None:
    from .report.figures import write_figures

    write_figures(Path(args.table), Path(args.scatter), Path(args.per_task), args.title)


def cmd_bench_scan(args) -> None:
    import torch

    from .bench.scan import bench_scan

    torch.set_num_threads(args.threads)
    result = bench_scan(args.batch, args.d_inner, args.length, args.d_state, args.repeats, args.device,
                        naive=not args.no_naive)
    print(json.dumps(result, indent=1))


def cmd_bench_train(args) -> None:
    from .bench.train import run_benchmarks

    report = run_benchmarks(Path(args.out), args.vision_backbone, tuple(args.language_backbones),
                            args.vision_methods, args.language_methods, baselines=not args.no_baselines,
                            cuda_graphs=args.cuda_graphs)
    print(json.dumps(report["projection"], indent=1))


def cmd_bench_data(args) -> None:
    from .bench.data import bench_data
    from .io import write_json_atomic

    report = bench_data(args.images, (args.width, args.height), args.resolution, repeats=args.repeats)
    if args.out:
        write_json_atomic(Path(args.out), report)
    print(json.dumps(report))


def cmd_bench_profile(args) -> None:
    from .bench.train import profile_method

    domain = "vision" if args.backbone.startswith("vim") else "language"
    for method in args.methods:
        print(profile_method(domain, method, args.backbone, args.batch or (32 if domain == "vision" else 4)))


def cmd_bench_equivalence(args) -> None:
    from .bench.equivalence import equivalence_report

    print(json.dumps(equivalence_report(), indent=1))


# ------------------------------------------------------------------------------------------------
def cmd_lm_eval(args) -> None:
    import tempfile

    from .data.errors import DataError
    from .eval import lm_eval_model  # noqa: F401  (registers the model "mambapeft" with lm-eval)
    from .eval.lm_eval_tasks import available_tasks, offline_datasets, write_task_definitions

    forwarded = list(args.forwarded)
    offline_datasets()
    with tempfile.TemporaryDirectory(prefix="mambapeft-lm-eval-") as scratch:
        if args.data_root:
            names = available_tasks(args.data_root)
            if not names:
                raise DataError(f"{args.data_root}: no commonsense eval file (eval/<task>/<split>.jsonl of a task "
                                "in language/tasks.yaml); point --data-root at a commonsense data root")
            forwarded += ["--include_path", str(write_task_definitions(names, args.data_root, scratch))]
            logging.getLogger("mambapeft").info("local lm-eval tasks over %s: %s", args.data_root, ", ".join(names))
        sys.argv = ["lm-eval", *forwarded]
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()


def cmd_setup_gpu(args) -> None:
    from .setup_gpu import check_kernels, setup_gpu

    print(json.dumps(check_kernels() if args.check else setup_gpu(args.wheels, dry_run=args.dry_run)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambapeft", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare, cache and check datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="write the offline stand-ins, or check real data, and write a manifest")
    p.add_argument("--spec", required=True, help="the dataset's config entry as JSON (see config/config.yaml `data:`)")
    p.add_argument("--manifest", required=True, help="manifest.json to write last (file list with sha256)")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("download", help="fetch VTAB-1k (RepAdapter's vtab-1k.zip) into the data root, unless present",
                        description="Extracts the configured tasks of the preprocessed VTAB-1k archive into the "
                                    "dataset's root: from a local copy (`download.archive`), a URL, or Google Drive "
                                    "(`gdrive_id`, needs gdown). Without network it stops with one message naming the "
                                    "missing tasks and where to put them.")
    p.add_argument("--spec", required=True, help="the dataset's config entry as JSON, with `download:` and `tasks`")
    p.add_argument("--out", required=True, help="record of what was done (JSON), written last")
    p.set_defaults(func=cmd_data_download)
    p = data.add_parser("cache", help="decode and resize one VTAB split once into a uint8 .npz cache")
    p.add_argument("--root", required=True, help="VTAB-1k root (holds <task>/train800val200.txt ...)")
    p.add_argument("--task", required=True)
    p.add_argument("--split", required=True, help="train800 | val200 | train800val200 | test")
    p.add_argument("--resolution", type=int, required=True, help="square side in pixels (224 for Vim)")
    p.add_argument("--out", required=True, help="output .npz")
    p.set_defaults(func=cmd_data_cache)
    p = data.add_parser("check", help="validate a dataset before spending GPU time; prints a JSON summary")
    p.add_argument("--kind", required=True, choices=("vtab", "commonsense", "math"))
    p.add_argument("path", help="vtab: the VTAB-1k root; commonsense/math: the data directory")
    p.add_argument("--task", help="vtab task (required for vtab)")
    p.set_defaults(func=cmd_data_check)

    backbone = sub.add_parser("backbone", help="pretrain a mini backbone or check official weights").add_subparsers(
        dest="backbone_command", required=True)
    p = backbone.add_parser("prepare", help="make the backbone checkpoint available and write its manifest")
    p.add_argument("--backbone", required=True, help="backbone id, e.g. vim-mini, vim-s, mamba-130m")
    p.add_argument("--spec", required=True, help="the backbone's config entry as JSON (config `backbones:`)")
    p.add_argument("--manifest", required=True, help="checkpoint.json to write last")
    p.set_defaults(func=cmd_backbone_prepare)

    p = sub.add_parser("train", help="fine-tune one run (experiment, backbone, task, method, seed) and evaluate it")
    p.add_argument("--spec", help="fully resolved run spec as JSON (what the Snakemake rule passes)")
    p.add_argument("--config", nargs="+", help="config file(s), merged left to right (instead of --spec)")
    p.add_argument("--experiment")
    p.add_argument("--backbone")
    p.add_argument("--task", help="VTAB task, or the training set for language (commonsense_170k, math_10k)")
    p.add_argument("--method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the resolved run configuration as JSON and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("params", help="trainable-parameter count of a backbone + method, as JSON")
    p.add_argument("--backbone", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--num-classes", type=int, default=None, help="vision head size (default: 100, CIFAR-100)")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("tables", help="one experiment's results table (.csv and .md) from metrics.json files")
    p.add_argument("--experiment", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("metrics", nargs="+", help="metrics.json files of the experiment's runs")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("params-table", help="trainable parameters of every backbone x method, ours vs the paper")
    p.add_argument("--spec", required=True, help='JSON {"vision": {backbone: [methods]}, "language": {...}}')
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    p.set_defaults(func=cmd_params_table)

    p = sub.add_parser("figures", help="params-vs-accuracy scatter and per-task bars from a results table")
    p.add_argument("--table", required=True, help="results/tables/<experiment>.csv")
    p.add_argument("--scatter", required=True, help="output PNG (params vs mean accuracy)")
    p.add_argument("--per-task", required=True, help="output PNG (per-task accuracy)")
    p.add_argument("--title", default="")
    p.set_defaults(func=cmd_figures)
    bench = sub.add_parser("bench", help="speed benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("scan", help="selective scan fwd+bwd: chunked PyTorch scan vs a naive per-step loop (and CUDA)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-inner", type=int, default=1536)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (the naive loop runs once)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-naive", action="store_true", help="skip the (slow) naive loop")
    p.set_defaults(func=cmd_bench_scan)
    p = bench.add_parser("train", help="GPU training-step throughput of every method and of the baselines")
    p.add_argument("--out", default="results/benchmarks", help="folder for <device>.json and <device>.md")
    p.add_argument("--vision-backbone", default="vim-s", help="vim-* variant, batch 32 at 224x224")
    p.add_argument("--language-backbones", nargs="+", default=["mamba-130m", "mamba-1.4b"],
                   help="mamba-* variants, sequence 256 at the engine's micro-batch")
    p.add_argument("--vision-methods", nargs="+", help="default: every method of vision/methods.yaml")
    p.add_argument("--language-methods", nargs="+", help="default: every method of language/methods.yaml")
    p.add_argument("--no-baselines", action="store_true", help="skip transformers+peft and timm+peft")
    p.add_argument("--cuda-graphs", action="store_true", help="training steps as CUDA graphs (runtime key cuda_graphs)")
    p.set_defaults(func=cmd_bench_train)
    p = sub.add_parser(
        "lm-eval", help="lm-evaluation-harness with the model 'mambapeft' (backbone + adapter) and local tasks",
        description="lm-eval's own command line (every argument after the ones below goes to it), with the "
                    "model 'mambapeft' registered: --model mambapeft --model_args backbone=DIR[,adapter=FILE]"
                    "[,tokenizer=DIR][,scan_backend=auto] --device cuda|cpu --tasks ... With --data-root, the "
                    "commonsense tasks found there (eval/<task>/<split>.jsonl) are defined as lm-eval tasks "
                    "over those files, so nothing is downloaded. lm-eval's own options: `lm-eval run -h`.")
    p.add_argument("--data-root", help="a commonsense data root whose eval files become lm-eval tasks")
    p.set_defaults(func=cmd_lm_eval)
    p = sub.add_parser("setup-gpu", help="install the CUDA extras (mamba-ssm, causal-conv1d) and check the kernels run",
                       description="pip-installs mamba-ssm and causal-conv1d (from PyPI, compiled against this torch; "
                                   "or from a folder of prebuilt wheels), then checks them: they import and, on a "
                                   "CUDA device, one selective scan agrees with the PyTorch scan.")
    p.add_argument("--wheels", help="install from this folder of wheels (no network) instead of PyPI")
    p.add_argument("--dry-run", action="store_true", help="print the pip command and stop")
    p.add_argument("--check", action="store_true", help="only check the installed kernels")
    p.set_defaults(func=cmd_setup_gpu)
    p = bench.add_parser("data", help="one epoch of VTAB data loading: decoding the files vs the uint8 cache")
    p.add_argument("--images", type=int, default=800, help="images in the temporary task (a VTAB train800val200 has 1000)")
    p.add_argument("--width", type=int, default=500, help="source image width")
    p.add_argument("--height", type=int, default=375, help="source image height")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="also write the JSON report here")
    p.set_defaults(func=cmd_bench_data)
    p = bench.add_parser("profile", help="GPU: where a training step's time goes (torch.profiler, top ops)")
    p.add_argument("--backbone", default="vim-s", help="vim-* (images at 224 px) or mamba-* (sequences of 256 tokens)")
    p.add_argument("--methods", nargs="+", default=["linear_probe", "lorap_x"])
    p.add_argument("--batch", type=int, help="images (default 32) or sequences (default 4) per step")
    p.set_defaults(func=cmd_bench_profile)
    p = bench.add_parser("equivalence", help="GPU: relative errors CUDA kernels vs PyTorch scan, step vs parallel")
    p.set_defaults(func=cmd_bench_equivalence)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, forwarded = parser.parse_known_args(argv)
    if forwarded and args.func is not cmd_lm_eval:  # only lm-eval passes arguments on
        parser.error(f"unrecognized arguments: {' '.join(forwarded)}")
    args.forwarded = forwarded
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except _user_errors() as err:
        print(f"mambapeft: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
