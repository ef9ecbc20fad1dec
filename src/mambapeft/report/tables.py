"""Experiment tables from ``metrics.json`` files only (never from checkpoints or logs).

One row per (backbone, method): trainable parameters, one column per task (vision: the VTAB task;
language: each evaluation task), the mean over tasks, vision group means, and the paper's number
beside ours when the paper reports that backbone and method. Several seeds are averaged and their
count and standard deviation of the mean are shown. A run that diverged shows as "diverged".
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ..io import incomplete_or_altered, is_percent, write_text_atomic
from ..runspec import TRAIN_RECORD, domain_file
from .markdown import frame_to_markdown
from .readers import RecordKind, ResultsError, read_record

GROUPS = ("natural", "specialized", "structured")


def record_problem(record) -> str | None:
    """Why a run record must not reach a table (None if it may): not complete, not what evaluation
    wrote (record_sha256), or a key of the run contract that the table uses missing, of the wrong
    type or out of range."""
    altered = incomplete_or_altered(record)
    if altered:
        return altered
    if record["status"] == "diverged":
        return _first_field_problem(record, EVERY_RECORD)
    return _first_field_problem(record, EVERY_RECORD + COMPLETED_RECORD) or _scores_problem(record)


def _is_text(value) -> bool:
    return isinstance(value, str) and value != ""


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# (dotted key, test, what it must be): what the table reads of every record, then of completed ones
EVERY_RECORD = (
    ("config.domain", lambda v: v in ("vision", "language"), "'vision' or 'language'"),
    ("config.run.backbone", _is_text, "a backbone id"),
    ("config.run.task", _is_text, "a task id"),
    ("config.run.method", _is_text, "a method id"),
    ("config.run.seed", _is_count, "an integer >= 0"),
    ("config.method.label", _is_text, "a method label"),
)
COMPLETED_RECORD = (
    ("metric", _is_text, "a metric name"),
    ("value", is_percent, "a percentage in [0, 100]"),
    ("trainable_params", _is_count, "an integer >= 0"),
    ("total_params", lambda v: _is_count(v) and v > 0, "an integer > 0"),
    ("results", lambda v: isinstance(v, dict) and len(v) > 0 and all(isinstance(r, dict) for r in v.values()),
     "a mapping of evaluation task to scores"),
)
_MISSING = object()


def _first_field_problem(record: dict, checks) -> str | None:
    for key, test, expected in checks:
        value = record
        for part in key.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            return f"{key} is missing"
        if not test(value):
            return f"{key} is {value!r}, expected {expected}"
    return None


def _scores_problem(record: dict) -> str | None:
    """Each evaluation task's reported score (the one the table shows) is a percentage, and the
    trainable parameters are part of the model."""
    for task, scores in record["results"].items():
        key = scores.get("report", record["metric"])
        if not is_percent(scores.get(key)):
            return f"results.{task}.{key} is {scores.get(key)!r}, expected a percentage in [0, 100]"
    if record["trainable_params"] > record["total_params"]:
        return f"trainable_params {record['trainable_params']} exceeds total_params {record['total_params']}"
    return None


def stale_evaluation(path: Path, record: dict) -> str | None:
    """Why a run record evaluated another adapter than the one training last wrote beside it (None if
    it did not): the run was trained again after its evaluation, so its scores are of the old adapter."""
    training = path.parent / TRAIN_RECORD
    if "adapter_sha256" not in record or not training.is_file():
        return None
    try:
        training_record = json.loads(training.read_text())
    except (OSError, ValueError):  # damaged since: the evaluate job refuses it and says what to re-run
        return f"{TRAIN_RECORD} beside it is unreadable, so the adapter it evaluated cannot be matched"
    # a diverged re-training records no adapter: the evaluated one is gone just the same
    trained = training_record.get("adapter_sha256") if isinstance(training_record, dict) else None
    if trained != record["adapter_sha256"]:
        return (f"evaluated an adapter (sha256 {str(record['adapter_sha256'])[:12]}) other than the one "
                f"{TRAIN_RECORD} beside it records ({str(trained)[:12]}): the run was trained again")
    return None


RUN_RECORD = RecordKind("run record", "metrics.json", ("status", "config"), record_problem, "re-run its evaluate job",
                        stale_evaluation)


def task_scores(record: dict) -> dict[str, float]:
    """Per-task value of a run: its VTAB task, or every evaluation task's reported metric."""
    if record["status"] != "ok":
        return {}
    results = record["results"]
    return {task: r[r.get("report", record["metric"])] for task, r in results.items()}


def long_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for record in records:
        run = record["config"]["run"]
        base = {"domain": record["config"]["domain"], "backbone": run["backbone"], "method": run["method"],
                "seed": run["seed"], "label": record["config"]["method"]["label"], "status": record["status"],
                "trainable_params": record.get("trainable_params"), "total_params": record.get("total_params")}
        scores = task_scores(record) or {run["task"]: math.nan}
        rows += [{**base, "task": task, "value": value} for task, value in scores.items()]
    return pd.DataFrame(rows)


def _vision_groups(tasks: list[str]) -> dict[str, list[str]]:
    from ..data.vtab import task_info

    groups: dict[str, list[str]] = {}
    for task in tasks:
        groups.setdefault(task_info(task)["group"], []).append(task)
    return groups


def summary_frame(records: list[dict]) -> tuple[pd.DataFrame, list[str]]:
    """Wide table, one row per (backbone, method) in methods.yaml order, and the task columns."""
    long = long_frame(records)
    domain = long["domain"].iloc[0]
    order = list(domain_file(domain, "methods"))
    tasks = list(dict.fromkeys(long["task"]))
    per_seed = long.pivot_table(index=["backbone", "method", "seed"], columns="task", values="value",
                                aggfunc="first", dropna=False).reindex(columns=tasks)
    # dropna=False keeps a diverged run's NaN, but also crosses the index levels: keep the runs that exist
    # (each backbone has its own methods: the Vim rows on Vim, the ViT rows on ViT)
    ran = pd.MultiIndex.from_frame(long[["backbone", "method", "seed"]].drop_duplicates())
    per_seed = per_seed[per_seed.index.isin(ran)]
    per_seed["mean"] = per_seed[tasks].mean(axis=1, skipna=False)
    grouped = per_seed.groupby(level=["backbone", "method"], dropna=False)
    table = grouped.mean()
    table["seeds"] = grouped.size()
    table["mean_std"] = grouped["mean"].std(ddof=1) if len(per_seed) > len(table) else math.nan
    meta = long.groupby(["backbone", "method"]).agg(label=("label", "first"), trainable_params=("trainable_params", "max"),
                                                    total_params=("total_params", "max"),
                                                    diverged=("status", lambda s: (s == "diverged").any()))
    table = table.join(meta).reset_index()
    if domain == "vision":
        for group, members in _vision_groups(tasks).items():
            table[group] = table[members].mean(axis=1, skipna=False)
    table["trainable_pct"] = 100.0 * table["trainable_params"] / table["total_params"]
    _add_paper(table, domain)
    table["method_order"] = table["method"].map({m: i for i, m in enumerate(order)})
    return table.sort_values(["backbone", "method_order"]).drop(columns="method_order").reset_index(drop=True), tasks


def _add_paper(table: pd.DataFrame, domain: str) -> None:
    """The paper's mean beside ours. An entry with ``mean_over`` (a paper that reports fewer tasks, e.g.
    ProDiaL's four) is compared with our mean over those tasks only (empty where we lack one)."""
    paper = domain_file(domain, "paper")
    entries = [paper.get(b, {}).get(m, {}) for b, m in zip(table["backbone"], table["method"])]
    table["paper_mean"] = [e.get("mean", math.nan) for e in entries]
    table["paper_tasks"] = [len(e["mean_over"]) if "mean_over" in e else math.nan for e in entries]
    ours = [row["mean"] if "mean_over" not in e else _mean_over(row, e["mean_over"])
            for e, (_, row) in zip(entries, table.iterrows())]
    table["delta_vs_paper"] = pd.Series(ours, index=table.index, dtype=float) - table["paper_mean"]


def _mean_over(row: pd.Series, tasks: list[str]) -> float:
    return row[tasks].mean(skipna=False) if all(t in row.index for t in tasks) else math.nan


def _fmt(value, digits: int = 1) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(experiment: str, table: pd.DataFrame, tasks: list[str]) -> str:
    domain_groups = [g for g in GROUPS if g in table.columns]
    shown = pd.DataFrame({"backbone": table["backbone"], "method": table["label"],
                          "trainable": [f"{int(v):,}" if v == v else "" for v in table["trainable_params"]],
                          "% params": [_fmt(v, 2) for v in table["trainable_pct"]]})
    for column in [*tasks, *domain_groups, "mean"]:
        shown[column] = ["diverged" if d else _fmt(v) for v, d in zip(table[column], table["diverged"])]
    if table["seeds"].max() > 1:
        shown["± (seeds)"] = [f"{_fmt(s, 2)} ({n})" for s, n in zip(table["mean_std"], table["seeds"])]
    if table["paper_mean"].notna().any():
        shown["paper mean"] = [_fmt(v) + (f" ({int(n)} tasks)" if n == n else "")
                               for v, n in zip(table["paper_mean"], table["paper_tasks"])]
        shown["Δ vs paper"] = [_fmt(v) if v == v else "" for v in table["delta_vs_paper"]]
    note = ("Accuracy in % on the test split(s); `trainable` excludes the classification head; mean over the tasks shown"
            " (a paper mean marked \"(n tasks)\" covers fewer tasks: its Δ uses our mean over those).")
    return f"# {experiment}\n\n{note}\n\n{frame_to_markdown(shown)}"


def write_experiment_table(experiment: str, metrics: list[str], csv_path: Path, md_path: Path) -> pd.DataFrame:
    records = [_of_experiment(read_record(p, RUN_RECORD), p, experiment) for p in metrics]
    table, tasks = summary_frame(records)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(csv_path, table.to_csv(index=False))
    write_text_atomic(md_path, markdown_table(experiment, table, tasks))
    return table


def _of_experiment(record: dict, path: str, experiment: str) -> dict:
    """The record, if it is a run of ``experiment``: the table is written under that heading."""
    ran = record["config"]["run"].get("experiment")
    if ran != experiment:
        raise ResultsError(f"{path} is a run of experiment {ran!r}, not {experiment!r}: pass only that experiment's "
                           "metrics.json files")
    return record
