"""The lm-eval suite table and figure of the Orca-Math study (results/tables/<experiment>.{csv,md},
results/figures/<experiment>_delta.png), from the suite's evaluation records only.

One row per backbone x fine-tuned run x task x metric: the base model's score, the fine-tuned
model's, the change, and the study's numbers beside ours where it reports them (its base values
from lm-eval's result files; its fine-tuned values approximate, read from a poster plot, and
labelled so). The figure shows the change from fine-tuning per task, one bar per backbone.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt
import pandas as pd

from ..data.language_tasks import language_task
from ..eval.lm_eval_suite import FAMILY, is_percent
from ..io import write_text_atomic
from .figures import save_figure, shared_legend
from .markdown import frame_to_markdown
from .readers import RecordKind, ResultsError, read_readings, read_record

BASE, FINE_TUNED = "base", "fine-tuned"
PLOT_READING = "read from the study's poster plot"
COLUMNS = ["backbone", "method", "seed", "task", "metric", "n", "base", "fine_tuned", "change", "study_base",
           "study_fine_tuned"]


def suite_record_problem(record: dict) -> str | None:
    """Why an evaluation record of the suite must not be read (None if it may)."""
    if record["status"] != "ok":
        return f"not a complete lm-eval suite record (status {record['status']!r})"
    if record["model"] not in (BASE, FINE_TUNED):
        return f"model is {record['model']!r}, expected {BASE!r} or {FINE_TUNED!r}"
    unscored = [task for task in record["tasks"] if task not in record["scores"]]
    if unscored:
        return f"no scores for task(s) {', '.join(unscored)}"
    return None


# what the table reads of every record (cli/lm_eval_suite.py: cmd_evaluate writes them)
SUITE_RECORD = RecordKind("lm-eval suite record", "base.json or <task>/<method>/seed<n>.json",
                          ("status", "backbone", "model", "run", "tasks", "lm_eval_model", "scores"),
                          suite_record_problem, "re-run its lm-eval suite job")


def suite_frame(records: list[dict], readings: list[dict]) -> pd.DataFrame:
    """The table's rows: every fine-tuned record beside its backbone's base record."""
    bases = {r["backbone"]: r for r in records if r["model"] == BASE}
    study = {(r["backbone"], r["task"], r["metric"]): r for r in readings}
    rows = []
    for tuned in (r for r in records if r["model"] == FINE_TUNED):
        base = bases.get(tuned["backbone"])
        if base is None:
            raise ResultsError(f"no base-model record for backbone {tuned['backbone']}: pass its base.json too")
        for task in tuned["tasks"]:  # the config's order; each task's metrics in tasks.yaml's
            scores = tuned["scores"][task]
            for metric in language_task(FAMILY, task)["metrics"]:
                value = scores[metric]
                before = base["scores"].get(task, {}).get(metric, math.nan)
                reading = study.get((tuned["backbone"], task, metric), {})
                rows.append({"backbone": tuned["backbone"], "method": tuned["run"]["method"], "seed": tuned["run"]["seed"],
                             "task": task, "metric": metric, "n": scores["n"], "base": before, "fine_tuned": value,
                             "change": value - before, "study_base": reading.get("base", math.nan),
                             "study_fine_tuned": reading.get("fine_tuned", math.nan)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _number(value: float, metric: str) -> str:
    if pd.isna(value):
        return ""
    return f"{value:.4g}" if not is_percent(metric) else f"{value:.2f}"


def _markdown_rows(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "backbone": table["backbone"], "run": table["method"] + " seed" + table["seed"].astype(str),
        "task": table["task"], "metric": table["metric"], "n": table["n"],
        "base → fine-tuned (ours)": [f"{_number(b, m)} → {_number(f, m)}"
                                     for b, f, m in zip(table["base"], table["fine_tuned"], table["metric"])],
        "change": [("+" if c > 0 else "") + _number(c, m) for c, m in zip(table["change"], table["metric"])],
        "study: base → fine-tuned": [f"{_number(b, m)} → ≈{_number(f, m)}" if not pd.isna(b) else ""
                                     for b, f, m in zip(table["study_base"], table["study_fine_tuned"], table["metric"])],
    })


def _agreement_lines(records: list[dict]) -> list[str]:
    lines = []
    for record in (r for r in records if r.get("crosscheck")):
        check, run = record["crosscheck"], record["run"]
        verdict = "agree" if check["agree"] else "DISAGREE"
        lines.append(f"- {record['backbone']} {run['method']} seed{run['seed']}: lm-eval `hf` on the merged model and "
                     f"`mambapeft` (backbone + unmerged adapter) {verdict} on {', '.join(check['tasks'])}: largest "
                     f"log-likelihood difference {check['max_loglikelihood_difference']:.2g} (tolerance {check['atol']:g}), "
                     f"generations {'identical' if check['same_generations'] else 'different'}.")
    return lines


def markdown(table: pd.DataFrame, records: list[dict], source: str, title: str) -> str:
    models = sorted({f"{r['model']}: lm-eval `{r['lm_eval_model']}`" for r in records})
    data = sorted({r.get("data_source", "") for r in records} - {""})
    note = ("lm-evaluation-harness scores (acc, acc_norm, exact match in %; perplexities as they are) of the base "
            f"and the fine-tuned (merged) model of each backbone ({'; '.join(models)}). The study's numbers: {source}; "
            f"its fine-tuned values, marked ≈, are approximate, {PLOT_READING}, not measured here.")
    if "mini" in data:
        note += (" **Mini run: offline stand-in records in each task's format, scored by the real task definitions; "
                 f"tasks evaluated: {', '.join(dict.fromkeys(table['task']))} (a subset of the suite; "
                 "config/paper.yaml lists all eleven). The numbers test the pipeline, not a model.**")
    agreement = _agreement_lines(records)
    parts = [f"# {title}: lm-eval suite, base → fine-tuned", note, frame_to_markdown(_markdown_rows(table))]
    if agreement:
        parts += ["Merged model vs adapter model (the same weights, two loaders):", "\n".join(agreement)]
    return "\n\n".join(parts) + "\n"


def delta_figure(table: pd.DataFrame, path: Path, title: str) -> None:
    """Change from fine-tuning per task and metric, one bar per backbone (and run); perplexities
    as relative change in % on their own panel, since they are not percentages."""
    table = table.assign(label=table["task"] + "\n" + table["metric"].str.replace(",", "\n"),
                         series=table["backbone"] + " " + table["method"] + " seed" + table["seed"].astype(str),
                         plotted=[100.0 * c / b if not is_percent(m) else c
                                  for c, b, m in zip(table["change"], table["base"], table["metric"])])
    panels = [("change (points)", table[table["metric"].map(is_percent)]),
              ("perplexity change (% of base)", table[~table["metric"].map(is_percent)])]
    panels = [(label, rows) for label, rows in panels if len(rows)]
    widths = [max(2, rows["label"].nunique()) for _, rows in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(0.9 * sum(widths) + 2, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    series = list(dict.fromkeys(table["series"]))
    for ax, (label, rows) in zip(axes[0], panels):
        labels = list(dict.fromkeys(rows["label"]))
        width = 0.8 / len(series)
        offset = {name: (i - (len(series) - 1) / 2) * width for i, name in enumerate(series)}
        for name in series:
            values = rows[rows["series"] == name].set_index("label")["plotted"].reindex(labels)
            ax.bar([x + offset[name] for x in range(len(labels))], values, width, label=name)
        study = rows.dropna(subset=["study_base"]).drop_duplicates(["backbone", "label"])
        for j, (_, row) in enumerate(study.iterrows()):  # on the first bar of the same backbone
            ax.scatter(labels.index(row["label"]) + offset[row["series"]], row["study_fine_tuned"] - row["study_base"],
                       marker="x", color="black", zorder=3, label=f"the study (fine-tuned ≈, {PLOT_READING})" if j == 0 else None)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    shared_legend(fig, axes[0])
    fig.suptitle(f"{title}: change from fine-tuning (fine-tuned − base)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def write_suite_report(record_paths: list[str], readings_yaml: Path, csv_path: Path, md_path: Path, png_path: Path,
                       title: str) -> pd.DataFrame:
    records = [read_record(p, SUITE_RECORD) for p in record_paths]
    source, readings = read_readings(readings_yaml)
    table = suite_frame(records, readings)
    if table.empty:
        raise ResultsError("no fine-tuned model among the records: the table compares base and fine-tuned models")
    text = markdown(table, records, source, title)  # before writing anything: no partial outputs
    write_text_atomic(csv_path, table.to_csv(index=False))
    write_text_atomic(md_path, text)
    delta_figure(table, png_path, title)
    return table
