"""The hybrid search's table and figure, from its steps' result.json and the final runs' metrics.json.

Table: one row per step (the winner's methods and hyperparameters, its score on the split it was
searched on) and one per search for the final runs (the winner retrained, mean top-1 on the test
splits of all the experiment's tasks), beside the paper's Hybrid rows. Every row says which split
scored the search: a search scored on test (the original's protocol) is labelled so.
"""
from __future__ import annotations

import math
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..io import write_text_atomic  # noqa: E402
from ..runspec import domain_file  # noqa: E402
from .figures import save_figure  # noqa: E402
from .markdown import frame_to_markdown  # noqa: E402
from .readers import RecordKind, ResultsError, read_record  # noqa: E402
from .tables import RUN_RECORD  # noqa: E402

PAPER_ROWS = {"hybrid": "paper Hybrid (w/ proj)", "hybrid_noproj": "paper Hybrid (w/o proj)"}
PAPER_BACKBONE = "vim-s"


def _paper_means() -> dict[str, float]:
    paper = domain_file("vision", "paper").get(PAPER_BACKBONE, {})
    return {label: paper[method]["mean"] for method, label in PAPER_ROWS.items() if method in paper}


def _params_text(params: dict, members: list[str]) -> str:
    """The sampled sizes and multipliers of the members in use; a choose step's on/off choices are
    the `methods` column."""
    shown = {k: v for k, v in params.items()
             if not isinstance(v, bool) and ("." not in k or k.partition(".")[0] in members)}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "base sizes"


def _result_problem(result: dict) -> str | None:
    """Why a step's result.json must not reach the table (None if it may)."""
    trials = result["trials"]
    if not isinstance(trials, list) or not all(isinstance(t, dict) and "state" in t for t in trials):
        return "trials is not a list of trials with their state"
    if not isinstance(result["best"], dict) or any(k not in result["best"] for k in ("number", "score", "members")):
        return "best is not a trial with its number, score and members"
    return None


# what the table reads of a step's result (search/study.py: step_result writes it)
STEP_RESULT = RecordKind("search step result", "results/search/<name>/<step>/result.json",
                         ("search", "step", "score_label", "tasks", "best", "trials"), _result_problem,
                         "re-run its search_result job")


def step_rows(results: list[dict]) -> list[dict]:
    rows = []
    for result in results:
        states = [t["state"] for t in result["trials"]]
        best = result["best"]
        rows.append({"search": result["search"], "step": result["step"], "scored_on": result["score_label"],
                     "trials": len(states), "failed": states.count("FAIL"), "best_trial": best["number"],
                     "score": best["score"], "score_tasks": " ".join(result["tasks"]),
                     "methods": " + ".join(best["members"]) or "(head only)",
                     "hyperparameters": _params_text(best["params"], best["members"])})
    return rows


def final_rows(final_metrics: list[str], results: list[dict]) -> list[dict]:
    """Per search: the winner's final runs, mean top-1 on the test splits, vs the paper's rows."""
    last = {r["search"]: r for r in results}  # results are in step order: the last step wins
    by_search: dict[str, list[dict]] = {}
    for path in final_metrics:
        record = read_record(path, RUN_RECORD)
        by_search.setdefault(_searched_by(record, path, last), []).append(record)
    rows = []
    for name, records in by_search.items():
        values = [r["value"] for r in records if r["status"] == "ok"]
        score = mean(values) if len(values) == len(records) else math.nan
        rows.append({"search": name, "step": "final (test)", "scored_on": last[name]["score_label"],
                     "trials": None, "failed": None, "best_trial": last[name]["best"]["number"], "score": score,
                     "score_tasks": " ".join(r["config"]["run"]["task"] for r in records),
                     "methods": " + ".join(last[name]["best"]["members"]) or "(head only)",
                     "hyperparameters": f"those of {last[name]['step']}; "
                                        f"backbone {records[0]['config']['run']['backbone']}",
                     **_paper_means()})
    return rows


def _searched_by(record: dict, path: str, results: dict[str, dict]) -> str:
    """The search a final run belongs to, one of those whose result.json is given."""
    name = (record["config"].get("search") or {}).get("name")
    if name not in results:
        raise ResultsError(f"{path} is not a final run of the searches given ({', '.join(results)}): "
                           "pass the final runs' metrics.json with their searches' result.json")
    return name


def search_table(results: list[dict], final_metrics: list[str]) -> pd.DataFrame:
    return pd.DataFrame(step_rows(results) + final_rows(final_metrics, results))


def markdown(table: pd.DataFrame) -> str:
    shown = table.astype(object).where(table.notna(), "")
    for column in ("score", *PAPER_ROWS.values()):
        if column in shown:
            shown[column] = [f"{v:.2f}" if v != "" else "" for v in shown[column]]
    for column in ("trials", "failed", "best_trial"):
        shown[column] = [f"{int(v)}" if v != "" else "" for v in shown[column]]
    note = ("Each step's row: its best trial, scored by the mean top-1 (%) over `score_tasks` on the split in "
            "`scored_on`. The final row: that combination retrained on train800val200, mean top-1 (%) on the test "
            "splits of `score_tasks`; the paper's Hybrid rows are Vim-S means over the 19 VTAB-1k tasks. "
            "`scored_on` naming the TEST split marks the original's protocol (the search saw the test data).")
    return f"# Hybrid PEFT search\n\n{note}\n\n{frame_to_markdown(shown)}"


def history_figure(results: list[dict], path: Path) -> None:
    """Per step: every trial's score (failed trials at the bottom, as x) and the best so far."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, result in zip(axes[0], results):
        trials = result["trials"]
        done = [t for t in trials if t["state"] == "COMPLETE"]
        ax.scatter([t["number"] for t in done], [t["score"] for t in done], s=18, label="trial")
        best, running = [], math.nan  # nan until a trial completes
        for t in trials:
            if t["state"] == "COMPLETE" and not t["score"] <= running:
                running = t["score"]
            best.append(running)
        ax.step([t["number"] for t in trials], best, where="post", color="C3", label="best so far")
        failed = [t["number"] for t in trials if t["state"] == "FAIL"]
        if failed and done:
            ax.scatter(failed, [min(t["score"] for t in done)] * len(failed), marker="x", color="grey", label="failed")
        ax.set_title(f"{result['search']} {result['step']}\nscored on {result['score_label']}", fontsize=8)
        ax.set_xlabel("trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("mean top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_search_report(result_paths: list[str], final_metrics: list[str], csv_path: Path, md_path: Path,
                        figure_path: Path) -> pd.DataFrame:
    results = [read_record(p, STEP_RESULT) for p in result_paths]
    table = search_table(results, final_metrics)
    text = markdown(table)  # before writing anything: no partial outputs
    write_text_atomic(csv_path, table.to_csv(index=False))
    write_text_atomic(md_path, text)
    history_figure(results, figure_path)
    return table
