"""``mambapeft``: the command line every Snakemake rule calls (and users can call directly).

Subcommands that rules call take a ``--spec`` JSON object computed by ``mambapeft.runspec`` from
the config, so a rule stays a one-line shell command and its params are Snakemake rerun triggers.

Each module of this package declares its subcommands (``add_parsers``) beside their handlers:
``data``, ``backbone``, ``run`` (train, params), ``merge`` (adapters folded into the weights),
``report`` (tables, params-table, figures), ``search`` (the hybrid PEFT search),
``dt_init`` (the dt_bias initialisation study), ``length_study`` (the prefix vs periodic
tokens length study), ``lm_eval_suite`` (the Orca-Math study's lm-eval suite), ``bench`` and ``tools`` (lm-eval, setup-gpu);
``common`` holds what they share. Every parser is a `CommandParser`: a subcommand's --help opens with its
one-line help, it accepts -q too, and an unknown option is reported with its usage.
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
DESCRIPTION = ("The command line every Snakemake rule calls (and users can call directly). "
               "`mambapeft COMMAND -h` describes each command.")
QUIET_HELP = "only warnings and errors on stderr (before or after the command)"


def _description(help_text: str | None) -> str | None:
    """A command's one-line ``help`` as the sentence its own --help opens with."""
    if not help_text:
        return None
    text = help_text.replace("%%", "%")  # help is a %-format template, a description is not
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


class _Commands(argparse._SubParsersAction):
    """Subcommands whose --help opens with their one-line help (unless they have a description), that
    accept -q after the command too, and that name themselves as ``command_parser`` (for usage errors)."""

    def add_parser(self, name, **kwargs):
        kwargs.setdefault("description", _description(kwargs.get("help")))
        parser = super().add_parser(name, **kwargs)
        parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
        parser.set_defaults(command_parser=parser)
        return parser


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose subparsers (and theirs) are `_Commands`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Commands)


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
    parser = CommandParser(prog="mambapeft", description=DESCRIPTION)
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    parser.set_defaults(forwards_unknown_args=False)  # a subcommand that passes arguments on (lm-eval) sets it
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMAND_MODULES:
        module.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, forwarded = parser.parse_known_args(argv)
    if forwarded and not args.forwards_unknown_args:
        args.command_parser.error(f"unrecognized arguments: {' '.join(forwarded)}")  # with the command's usage
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
