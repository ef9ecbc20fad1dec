"""``mambapeft length-generalisation``: the learnable-input length study's table and figure."""
from __future__ import annotations

from pathlib import Path

from .common import add_table_outputs


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("length-generalisation",
                              help="accuracy vs test length (prefix vs periodic tokens): table (.csv, .md) and figure")
    p.add_argument("--readings", required=True,
                   help="the study's own numbers, read from its plot (language/length_generalisation.yaml)")
    add_table_outputs(p)
    p.add_argument("--figure", required=True, help="output PNG")
    p.add_argument("metrics", nargs="+", help="metrics.json files of the study's runs")
    p.set_defaults(func=cmd_length_generalisation)


def cmd_length_generalisation(args) -> None:
    from ..report.length_generalisation import write_length_generalisation

    write_length_generalisation(args.metrics, Path(args.readings), Path(args.csv), Path(args.md), Path(args.figure))
