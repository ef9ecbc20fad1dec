"""Figures from a results table (never from runs directly): the paper's params-vs-accuracy scatter
and per-task accuracy bars."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..io import atomic_path  # noqa: E402
from .readers import read_results_table  # noqa: E402

META_COLUMNS = {"backbone", "method", "label", "seeds", "mean", "mean_std", "trainable_params", "total_params",
                "diverged", "trainable_pct", "paper_mean", "paper_tasks", "delta_vs_paper", "natural", "specialized",
                "structured"}


PLOTTED_COLUMNS = {"backbone", "label", "mean", "trainable_params", "paper_mean"}  # what both figures read


def task_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in META_COLUMNS]


def save_figure(fig, path: Path) -> None:
    """Every figure of the reports: PNG at 150 dpi, written atomically; the figure is closed."""
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)


def shared_legend(fig, axes) -> None:
    """One legend right of the figure for the labelled artists of all ``axes``, each label once."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def scatter(table: pd.DataFrame, path: Path, title: str) -> None:
    """x: trainable parameters (symmetric log: 0 = head only), y: mean accuracy; one colour per
    backbone; hollow markers are the paper's numbers for the same method."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (backbone, rows) in enumerate(table.groupby("backbone", sort=False)):
        colour = colours[i % len(colours)]
        ok = rows[rows["mean"].notna()]
        ax.scatter(ok["trainable_params"], ok["mean"], color=colour, s=40, label=f"{backbone} (ours)", zorder=3)
        for _, row in ok.iterrows():
            ax.annotate(row["label"], (row["trainable_params"], row["mean"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7)
        paper = rows[rows["paper_mean"].notna()]
        if len(paper):
            ax.scatter(paper["trainable_params"], paper["paper_mean"], facecolors="none", edgecolors=colour, s=40,
                       label=f"{backbone} (paper)", zorder=2)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)
    ax.set_xlabel("trainable parameters (without head; 0 = head only)")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title(title or "Trainable parameters vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


def per_task(table: pd.DataFrame, path: Path, title: str) -> None:
    """Grouped bars: one group per task (and the mean), one bar per (backbone, method)."""
    columns = task_columns(table) + ["mean"]
    rows = table[table["mean"].notna()].reset_index(drop=True)
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(columns) + 2), 4.5))
    cmap = plt.get_cmap("tab20")
    for i, row in rows.iterrows():
        label = row["label"] if table["backbone"].nunique() == 1 else f"{row['backbone']}: {row['label']}"
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(columns))]
        ax.bar(xs, [row[c] for c in columns], width=width, color=cmap(i % 20), label=label)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, min(100, math.ceil(max(rows[columns].max().max(), 1) / 10) * 10 + 5))
    ax.set_title(title or "Accuracy per task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    save_figure(fig, path)


def write_figures(table_csv: Path, scatter_png: Path, per_task_png: Path, title: str = "") -> None:
    table = read_results_table(table_csv, PLOTTED_COLUMNS)
    scatter(table, scatter_png, f"{title}: trainable parameters vs mean accuracy" if title else "")
    per_task(table, per_task_png, f"{title}: accuracy per task" if title else "")
