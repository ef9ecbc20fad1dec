"""``mambapeft``: the command line every Snakemake rule calls (and users can call directly).

Subcommands that rules call take a ``--spec`` JSON object computed by ``mambapeft.runspec`` from
the config, so a rule stays a one-line shell command and its params are Snakemake rerun triggers.

Each module of this package declares its subcommands (``add_parsers``) beside their handlers:
``data``, ``backbone``, ``run`` (train, params), ``merge`` (adapters folded into the weights),
``report`` (tables, params-table, figures), ``search`` (the hybrid PEFT search),
``dt_init`` (the dt_bias initialisation study), ``length_study`` (the prefix vs periodic
tokens length study), ``lm_eval_suite`` (the Orca-Math study's lm-eval suite), ``bench`` and ``tools`` (lm-eval, setup-gpu);
``common`` holds what they share.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..gpus import default_allocator_settings
from ..runspec import ConfigError
from . import backbone, bench, data, dt_init, length_study, lm_eval_suite, merge, report, run, search, tools

EXIT_USER_ERROR = 2
SUBCOMMAND_MODULES = (data, backbone, run, merge, report, search, dt_init, length_study, lm_eval_suite, bench, tools)  # in the order `mambapeft --help` lists them


def _user_errors() -> tuple[type, ...]:
    """Exceptions that mean bad input (config, data, checkpoint, method): message, no traceback."""
    from ..bench.common import BenchRecordError
    from ..data.errors import DataError
    from ..gpus import GpuAllocationError
    from ..io import CorruptFileError, DiskFullError
    from ..models.checkpoints import CheckpointError
    from ..peft.registry import PeftConfigError
    from ..report.tables import ResultsError
    from ..setup_gpu import SetupError

    return (ConfigError, DataError, CheckpointError, PeftConfigError, ResultsError, SetupError, GpuAllocationError,
            FileNotFoundError, CorruptFileError, DiskFullError, BenchRecordError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambapeft", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.set_defaults(forwards_unknown_args=False)  # a subcommand that passes arguments on (lm-eval) sets it
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMAND_MODULES:
        module.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, forwarded = parser.parse_known_args(argv)
    if forwarded and not args.forwards_unknown_args:
        parser.error(f"unrecognized arguments: {' '.join(forwarded)}")
    args.forwarded = forwarded
    default_allocator_settings()  # before anything initialises CUDA
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except _user_errors() as err:
        print(f"mambapeft: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
