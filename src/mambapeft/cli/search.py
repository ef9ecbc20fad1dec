"""``mambapeft search ask|result|report``: the hybrid search's Optuna steps and its outputs.

A trial's runs are ordinary ``mambapeft train`` / ``evaluate`` jobs on the spec the pipeline builds
from the batch file (``search/plan.py``); these commands only talk to the study and write reports.
"""
from __future__ import annotations

from pathlib import Path

from .common import add_table_outputs, json_arg


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("search", help="the hybrid PEFT search: ask for a batch of trials, a step's result, "
                                             "its table and figure")
    commands = p.add_subparsers(dest="search_command", required=True)
    _add_ask(commands)
    _add_result(commands)
    _add_report(commands)


def _add_study_arguments(p) -> None:
    p.add_argument("--spec", required=True, help="the step's settings as JSON (search/plan.py study_spec)")
    p.add_argument("--scores", nargs="*", default=[], help="metrics.json of the trials to tell first (every task)")
    p.add_argument("--previous", nargs="*", default=[],
                   help="result.json of the previous step, if any (its winner: a tune step's start)")
    p.add_argument("--out", required=True, help="the JSON to write: batch<b>.json (ask) or result.json (result)")


def _add_ask(commands) -> None:
    p = commands.add_parser("ask", help="tell the scored trials, then ask for the next batch (batch<b>.json)",
                            description="Tells the given trials their mean score over the search's tasks, then "
                                        "writes the batch's trials: those the journal already holds for the batch, "
                                        "completed by new asks (so a resumed search repeats no trial).")
    _add_study_arguments(p)
    p.set_defaults(func=cmd_ask)


def _add_result(commands) -> None:
    p = commands.add_parser("result", help="tell the last batch, write the step's trials and winner (result.json)")
    _add_study_arguments(p)
    p.set_defaults(func=cmd_result)


def _open(args):
    """(spec, space, winner, study) after telling ``--scores``."""
    from ..report.hybrid_search import STEP_RESULT
    from ..report.readers import read_record
    from ..search.space import load_space
    from ..search.study import open_study, tell_scores

    spec = json_arg(args.spec)
    space = load_space(spec["space"])
    winner = read_record(args.previous[0], STEP_RESULT)["best"]["members"] if args.previous else []
    study = open_study(spec, winner)
    tell_scores(study, args.scores, spec["tasks"])
    return spec, space, winner, study


def cmd_ask(args) -> None:
    from ..io import write_json_atomic
    from ..search.study import ask_batch

    spec, space, winner, study = _open(args)
    trials = ask_batch(study, spec, space, winner)
    write_json_atomic(args.out, {"search": spec["search"], "step": spec["step"], "batch": spec["batch"],
                                 "score_on": spec["score_on"], "score_label": spec["score_label"], "trials": trials})


def cmd_result(args) -> None:
    from ..io import write_json_atomic
    from ..search.study import step_result

    spec, space, winner, study = _open(args)
    write_json_atomic(args.out, step_result(study, spec, space, winner))


def _add_report(commands) -> None:
    p = commands.add_parser("report", help="results/tables/hybrid_search.{csv,md} and the trial-history figure")
    p.add_argument("--results", nargs="+", required=True, help="result.json of every step of every search")
    p.add_argument("--final", nargs="*", default=[], help="metrics.json of the final runs")
    add_table_outputs(p)
    p.add_argument("--figure", required=True, help="output trial-history figure (PNG)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> None:
    from ..report.hybrid_search import write_search_report

    write_search_report(args.results, args.final, Path(args.csv), Path(args.md), Path(args.figure))
