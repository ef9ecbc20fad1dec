"""The dt_init study's table and figures, from its runs' records only.

- table (``perplexity.json`` of every run): one row per initialisation, in config order: the
  perplexity's mean and sample standard deviation over the seeds, each seed's value, and the
  word-level perplexity's mean and deviation; a diverged seed shows as "diverged" and stays out
  of the mean;
- loss figure (``pretrain.json``): the training loss per initialisation, the mean over seeds as a
  line and the seeds' minimum-to-maximum as a band;
- dt figure (``pretrain.json``): the initial dt (softplus(dt_bias)) of every head, every layer and
  seed as points, and their geometric mean per head as a line.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import incomplete_or_altered, write_text_atomic
from .figures import save_figure
from .figures import plt  # pyplot on the file-only backend figures.py selects
from .markdown import frame_to_markdown
from .readers import RecordKind, read_record

# what the table and figures read of the study's records: init, seed, then per status the numbers
PERPLEXITY = RecordKind("perplexity record", "perplexity.json", ("status", "init", "seed"), incomplete_or_altered,
                        "re-run its perplexity job")
PRETRAIN = RecordKind("pretraining record", "pretrain.json", ("status", "init", "seed"), incomplete_or_altered,
                      "re-run its pretraining job")


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else math.nan
    return mean, float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def summary_frame(records: list[dict]) -> pd.DataFrame:
    """One row per init: seeds, perplexity mean/std, word perplexity mean/std, one column per seed."""
    rows = {}
    for record in records:
        ok = record["status"] == "ok"
        row = rows.setdefault(record["init"], {"init": record["init"], "ppl": {}, "word": {}})
        row["ppl"][record["seed"]] = record["perplexity"] if ok else None
        row["word"][record["seed"]] = record.get("word_perplexity") if ok else None
    table = []
    for row in rows.values():
        (ppl, ppl_std), (word, word_std) = _mean_std(list(row["ppl"].values())), _mean_std(list(row["word"].values()))
        table.append({"init": row["init"], "seeds": sum(v is not None for v in row["ppl"].values()),
                      "perplexity": ppl, "perplexity_std": ppl_std, "word_perplexity": word,
                      "word_perplexity_std": word_std,
                      **{f"seed{seed}": value for seed, value in row["ppl"].items()}})
    return pd.DataFrame(table)


def _mean_pm_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "diverged"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown_table(table: pd.DataFrame) -> str:
    seeds = [c for c in table.columns if c.startswith("seed") and c != "seeds"]
    shown = pd.DataFrame({"init": table["init"], "seeds": table["seeds"],
                          "perplexity (mean ± std)": [_mean_pm_std(m, s) for m, s in
                                                      zip(table["perplexity"], table["perplexity_std"])]})
    for seed in seeds:
        shown[f"seed {seed[4:]}"] = ["diverged" if v is None or v != v else f"{v:.2f}" for v in table[seed]]
    if table["word_perplexity"].notna().any():
        shown["word perplexity (mean ± std)"] = [_mean_pm_std(m, s) for m, s in
                                                 zip(table["word_perplexity"], table["word_perplexity_std"])]
    note = ("Token-level perplexity on the held-out text (strided windows, Hugging Face's perplexity guide), "
            "mean ± sample standard deviation over the seeds, and each seed's value; word-level perplexity = "
            "exp(summed token NLL / whitespace-separated words).")
    return f"# dt_init\n\n{note}\n\n{frame_to_markdown(shown)}"


def write_dt_init_table(perplexity_records: list[str], csv_path: Path, md_path: Path) -> pd.DataFrame:
    table = summary_frame([read_record(p, PERPLEXITY) for p in perplexity_records])
    write_text_atomic(csv_path, table.to_csv(index=False))
    write_text_atomic(md_path, markdown_table(table))
    return table


def _by_init(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["init"], []).append(record)
    return grouped


def loss_figure(records: list[dict], path: Path) -> None:
    """Mean training loss over seeds per init, with the seeds' min-max band (steps all seeds reached)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for init, runs in _by_init(records).items():
        curves = [{point["step"]: point["loss"] for point in run["history"]} for run in runs]
        steps = sorted(set.intersection(*(set(curve) for curve in curves)))
        losses = np.array([[curve[step] for step in steps] for curve in curves])  # (seeds, steps)
        line, = ax.plot(steps, losses.mean(0), label=f"{init} ({len(runs)} seeds)")
        ax.fill_between(steps, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title("dt_init: training loss (mean over seeds, min-max band)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def dt_figure(records: list[dict], path: Path) -> None:
    """Initial dt per head: every (seed, layer) as points, their geometric mean per head as a line
    (log scale: dt is spread in log space)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for init, runs in _by_init(records).items():
        dts = np.array([layer for run in runs for layer in run["initial_dt"]])  # (seeds * layers, heads)
        heads = np.arange(dts.shape[1])
        line, = ax.plot(heads, np.exp(np.log(dts).mean(0)), marker="o", label=init)
        ax.scatter(np.tile(heads, len(dts)), dts.ravel(), color=line.get_color(), s=12, alpha=0.35)
    ax.set_yscale("log")
    ax.set_xlabel("head")
    ax.set_ylabel("initial dt = softplus(dt_bias)")
    ax.set_title("dt_init: initial dt per head (points: every layer and seed; line: geometric mean)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left")
    save_figure(fig, path)


def write_dt_init_figures(pretrain_records: list[str], loss_png: Path, dt_png: Path) -> None:
    records = [read_record(p, PRETRAIN) for p in pretrain_records]
    loss_figure(records, loss_png)
    dt_figure(records, dt_png)
