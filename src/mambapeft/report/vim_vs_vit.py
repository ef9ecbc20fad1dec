"""The paper's headline comparison as one figure: gain over linear probing vs trainable % for the Vim
and the ViT rows of a results table, beside the paper's own table rows (vision/paper.yaml) and the
numbers read from its scatter plot (vision/paper_plot.yaml, labelled so).

Gain over linear probing puts both backbones on one axis: each row's mean accuracy minus its own
backbone's head-only row, so a backbone's better or worse features cancel out.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..method_check import backbone_family  # noqa: E402
from ..runspec import domain_file  # noqa: E402
from .figures import save_figure  # noqa: E402
from .readers import ResultsError, read_results_table  # noqa: E402

MARKERS = {"vim": "o", "vit": "s"}
PAPER_BACKBONES = ("vim-s", "vit-s")  # the paper's table rows shown for reference
PLOT_LABEL = "read from the paper's plot"


def gains(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of a results table with ``gain`` (mean minus the backbone's head-only row) and
    ``trainable_pct``; a backbone without a head-only (linear probing) row is left out."""
    frames = []
    for _, rows in table[table["mean"].notna()].groupby("backbone", sort=False):
        probe = rows[rows["trainable_params"] == 0]
        if len(probe):
            frames.append(rows.assign(gain=rows["mean"] - probe["mean"].iloc[0]))
    return pd.concat(frames) if frames else table.iloc[:0].assign(gain=[])


def _is_full(definition: dict) -> bool:
    return definition.get("init", "pretrained") == "pretrained" and \
        [m.get("family") for m in definition.get("peft", [])] == ["full"]


def paper_gains(paper: dict, methods: dict) -> pd.DataFrame:
    """The paper's table rows as gains over its linear-probing row (the method that trains the head
    only), trainable % of its full fine-tuning count, both without the paper's ~9K averaged head
    (the linear-probing count); training from scratch is no PEFT point and is left out."""
    rows = []
    for backbone in PAPER_BACKBONES:
        entries = {m: e for m, e in paper.get(backbone, {}).items() if "params_k" in e and "mean" in e}
        probe = next((e for m, e in entries.items() if m in methods and not methods[m].get("peft")), None)
        full = next((e for m, e in entries.items() if m in methods and _is_full(methods[m])), None)
        if probe is None or full is None:
            continue
        for method, e in entries.items():
            if e is probe or methods.get(method, {}).get("init") == "scratch":
                continue
            rows.append({"backbone": backbone, "label": e.get("label", methods.get(method, {}).get("label", method)),
                         "gain": e["mean"] - probe["mean"],
                         "trainable_pct": 100.0 * (e["params_k"] - probe["params_k"]) / full["params_k"]})
    return pd.DataFrame(rows)


def _gain_panel(ax, ours: pd.DataFrame, paper: pd.DataFrame) -> None:
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (backbone, rows) in enumerate(ours.groupby("backbone", sort=False)):
        marker = MARKERS.get(backbone_family(backbone), "^")
        ax.scatter(rows["trainable_pct"], rows["gain"], marker=marker, color=colours[i], s=45, zorder=3,
                   label=f"{backbone} (ours)")
        for _, row in rows.iterrows():
            ax.annotate(row["label"], (row["trainable_pct"], row["gain"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7)
    for backbone, rows in paper.groupby("backbone", sort=False) if len(paper) else ():
        family = backbone_family(backbone)
        ax.scatter(rows["trainable_pct"], rows["gain"], marker=MARKERS.get(family, "^"), facecolors="none",
                   edgecolors="grey", s=45, zorder=2, label=f"{backbone} (paper's table)")
        for _, row in rows.iterrows() if family == "vit" else ():  # the few ViT-S rows; Vim-S's 28 would bury the plot
            ax.annotate(row["label"], (row["trainable_pct"], row["gain"]), textcoords="offset points",
                        xytext=(4, -8), fontsize=6, color="grey")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(left=0)
    ax.set_xlabel("trainable parameters (% of the model, without head; 0 = linear probing)")
    ax.set_ylabel("gain over linear probing (accuracy points)")
    ax.set_title("Gain over linear probing vs trainable %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _plot_read_panel(ax, plot_read: dict) -> None:
    """What the paper's scatter shows, by eye: a point, or a bar where it shows a spread."""
    names = list(plot_read["accuracy"])
    for y, name in enumerate(names):
        low, high = plot_read["accuracy"][name]
        ax.plot([low, high], [y, y], color="grey", linewidth=5, marker="o", markersize=6)
        ax.annotate(f"≈{low:g}" + (f"–{high:g}" if high != low else ""), (high, y), textcoords="offset points",
                    xytext=(8, -3), fontsize=8)
    values = [v for pair in plot_read["accuracy"].values() for v in pair]
    ax.set_xlim(min(values) - 5, max(values) + 8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlabel("mean accuracy (%)")
    ax.set_title(f"Accuracy {PLOT_LABEL}\n(≈; task set not stated)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def write_vim_vs_vit(table_csv: Path, out_png: Path) -> None:
    ours = gains(_vim_and_vit_rows(table_csv))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    _gain_panel(left, ours, paper_gains(domain_file("vision", "paper"), domain_file("vision", "methods")))
    _plot_read_panel(right, domain_file("vision", "paper_plot"))
    save_figure(fig, out_png)


def _vim_and_vit_rows(table_csv: Path) -> pd.DataFrame:
    """The Vim and ViT rows of a results table; a table without any (a language table) would draw
    the paper's points only, as if ours were missing."""
    table = read_results_table(table_csv, {"backbone", "label", "mean", "trainable_params", "trainable_pct"})
    rows = table[table["backbone"].astype(str).map(backbone_family).isin(MARKERS)]
    if rows.empty:
        backbones = ", ".join(map(str, table["backbone"].unique()))
        raise ResultsError(f"{table_csv} has no Vim or ViT rows (backbones: {backbones}); expected a vision results "
                           "table, results/tables/<vision experiment>.csv")
    return rows
