"""What several subcommands share: the ``--spec`` JSON argument and the options that select one run."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..runspec import ConfigError

GPU_LOCK_DIR = Path(".snakemake") / "gpu-locks"  # Snakemake's working directory: shared by one pipeline's jobs


def json_arg(text: str, option: str = "--spec") -> dict:
    """The JSON object given as ``option``; a ConfigError (a user error, no traceback) if it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option} is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object")
    return value


def require_spec_keys(spec: dict, keys, computed_by: str) -> None:
    """A ConfigError naming the ``keys`` a job's ``--spec`` lacks and the function that computes it."""
    missing = [key for key in keys if key not in spec]
    if missing:
        raise ConfigError(f"--spec lacks {', '.join(missing)}: pass the spec the rule computes ({computed_by})")


def positive_int(text: str) -> int:
    """argparse type of a count or size: an integer >= 1, else a usage error naming the option."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_table_outputs(parser) -> None:
    """``--csv`` / ``--md``: the files a table command writes, the same table in both formats."""
    parser.add_argument("--csv", required=True, help="output table (CSV)")
    parser.add_argument("--md", required=True, help="output table (Markdown)")


def add_run_arguments(parser) -> None:
    """The options naming one run, read by `spec_from_args`: a resolved --spec, or configs and the run's coordinates."""
    parser.add_argument("--spec", help="fully resolved run spec as JSON (what the Snakemake rule passes)")
    parser.add_argument("--config", nargs="+", help="config file(s), merged left to right (instead of --spec)")
    parser.add_argument("--experiment", help="the experiment's id under `experiments:` in the config (with --config)")
    parser.add_argument("--backbone", help="a backbone id of that experiment (with --config)")
    parser.add_argument("--task", help="VTAB task, or the training set for language (commonsense_170k, math_10k)")
    parser.add_argument("--method", help="a method id of vision/methods.yaml or language/methods.yaml (with --config)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (with --config; default 0)")


def spec_from_args(args) -> dict:
    """The resolved run spec: --spec as given, else resolved from --config and the run's coordinates."""
    if args.spec:
        return json_arg(args.spec)
    from ..runspec import Run, load_config, resolve_run

    needed = ("experiment", "backbone", "task", "method")
    missing = [f"--{n}" for n in needed if getattr(args, n) is None]
    if missing or not args.config:
        raise ConfigError(f"give --spec JSON, or --config with {' '.join(missing or needed)}")
    config = load_config(*args.config)
    return resolve_run(config, Run(args.experiment, args.backbone, args.task, args.method, args.seed))


def add_execution_arguments(parser) -> None:
    """``--threads`` / ``--wandb``: how the job runs and logs (runspec.EXECUTION_KEYS), given apart from
    --spec because the workflow keeps them out of its params: changing them re-runs no job."""
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: the spec's; config `threads`)")
    parser.add_argument("--wandb", help="wandb settings as a JSON object {mode, project} (default: the spec's; "
                                        "config `wandb`)")


def with_execution(spec: dict, args) -> dict:
    """``spec`` with the job's --threads and --wandb in its runtime, where the job and its records read them."""
    if args.threads is not None:
        spec["runtime"]["threads"] = args.threads
    if args.wandb is not None:
        spec["runtime"]["wandb"] = json_arg(args.wandb, "--wandb")
    if "threads" not in spec["runtime"]:
        raise ConfigError("give --threads: the workflow's --spec leaves the execution settings out "
                          "(runspec.EXECUTION_KEYS)")
    return spec


def add_gpu_arguments(parser) -> None:
    """``--gpus`` / ``--gpu-slots``: the GPUs this job claims before CUDA starts (see `claim_gpus_for`)."""
    parser.add_argument("--gpus", type=int, default=0,
                        help="claim this many GPUs for the job (0: use CUDA_VISIBLE_DEVICES as it is); on a "
                             "box with several GPUs each job gets its own, later jobs wait for a free one")
    parser.add_argument("--gpu-slots", type=int, default=1, help="jobs that may share one GPU (config `gpu_slots`)")


def claim_gpus_for(args, device: str = "auto"):
    """Claim ``args.gpus`` GPUs (lock files under .snakemake/gpu-locks, or $MAMBAPEFT_GPU_LOCK_DIR)
    and narrow CUDA_VISIBLE_DEVICES to them, for the rest of this process. A job that will not
    run on CUDA (``device: cpu``, or ``auto`` where no GPU is visible) claims nothing."""
    from ..gpus import claim_gpus, visible_gpus

    if args.gpus == 0 or device == "cpu" or (device == "auto" and not visible_gpus()[0]):
        return None
    lock_dir = os.environ.get("MAMBAPEFT_GPU_LOCK_DIR") or GPU_LOCK_DIR
    return claim_gpus(args.gpus, lock_dir, slots_per_gpu=args.gpu_slots)
