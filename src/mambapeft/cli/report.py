"""``mambapeft tables``, ``params-table``, ``figures`` and ``figure-vim-vs-vit``: the results tables and figures."""
from __future__ import annotations

from pathlib import Path

from .common import add_table_outputs, json_arg


def add_parsers(subparsers) -> None:
    _add_tables(subparsers)
    _add_params_table(subparsers)
    _add_figures(subparsers)
    _add_vim_vs_vit(subparsers)


def _add_tables(subparsers) -> None:
    p = subparsers.add_parser("tables", help="one experiment's results table (.csv and .md) from metrics.json files")
    p.add_argument("--experiment", required=True, help="the experiment's id in the config (the table's heading)")
    add_table_outputs(p)
    p.add_argument("metrics", nargs="+", help="metrics.json files of the experiment's runs")
    p.set_defaults(func=cmd_tables)


def cmd_tables(args) -> None:
    from ..report.tables import write_experiment_table

    write_experiment_table(args.experiment, args.metrics, Path(args.csv), Path(args.md))


def _add_params_table(subparsers) -> None:
    p = subparsers.add_parser("params-table", help="trainable parameters of every backbone x method, ours vs the paper")
    p.add_argument("--spec", required=True, help='JSON {"vision": {backbone: [methods]}, "language": {...}}')
    add_table_outputs(p)
    p.set_defaults(func=cmd_params_table)


def cmd_params_table(args) -> None:
    from ..report.params import write_params_table

    write_params_table(json_arg(args.spec), Path(args.csv), Path(args.md))


def _add_figures(subparsers) -> None:
    p = subparsers.add_parser("figures", help="params-vs-accuracy scatter and per-task bars from a results table")
    p.add_argument("--table", required=True, help="results/tables/<experiment>.csv")
    p.add_argument("--scatter", required=True, help="output PNG (params vs mean accuracy)")
    p.add_argument("--per-task", required=True, help="output PNG (per-task accuracy)")
    p.add_argument("--title", default="", help="title of both figures (default: each its own)")
    p.set_defaults(func=cmd_figures)


def cmd_figures(args) -> None:
    from ..report.figures import write_figures

    write_figures(Path(args.table), Path(args.scatter), Path(args.per_task), args.title)


def _add_vim_vs_vit(subparsers) -> None:
    p = subparsers.add_parser("figure-vim-vs-vit", help="gain over linear probing vs trainable %% of the Vim and ViT "
                                                        "rows of a vision results table, beside the paper's")
    p.add_argument("--table", required=True, help="results/tables/<experiment>.csv")
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=cmd_vim_vs_vit)


def cmd_vim_vs_vit(args) -> None:
    from ..report.vim_vs_vit import write_vim_vs_vit

    write_vim_vs_vit(Path(args.table), Path(args.out))
