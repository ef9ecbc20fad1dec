"""``bench train``'s record as a picture: the Vim rows' training throughput as bars, fastest first, the
image baselines (timm ViT-S + peft LoRA, eager and graphed) as lines across them. ``bench train`` draws
it beside its JSON and Markdown; ``mambapeft bench plot`` draws it from a record already written."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..io import atomic_path  # noqa: E402
from .common import BenchRecordError  # noqa: E402

PAPER, NEWER = "tab:blue", "tab:orange"  # the rows vision/paper.yaml publishes, and the others


def read_train_record(path: Path) -> dict:
    """The JSON ``bench train`` wrote at ``path``, or BenchRecordError naming the file and what is wrong."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BenchRecordError(f"{path} cannot be read as a bench train record ({type(err).__name__}: {err}); "
                               "pass the .json that `mambapeft bench train` wrote") from err
    if not isinstance(report, dict) or not isinstance(report.get("vision"), dict) or not vision_rows(report):
        raise BenchRecordError(f"{path} has no measured image rows (its 'vision' rows): pass the .json of a "
                               "`mambapeft bench train` run with vision methods")
    return report


def vision_rows(report: dict) -> list[tuple[str, float, bool]]:
    """(method, images a second, whether vision/paper.yaml publishes the row) of each measured image row,
    fastest first; a row that failed or was skipped (no throughput) is left out."""
    paper = set(report.get("projection", {}).get("paper_rows", []))
    rows = [(method, row["images_per_s"], method in paper) for method, row in report["vision"].items()
            if isinstance(row, dict) and "images_per_s" in row]
    return sorted(rows, key=lambda row: -row[1])


def image_baselines(report: dict) -> dict[str, float]:
    """The image baselines' throughput by name (timm ViT-S + peft LoRA, eager and graphed)."""
    return {name: row["images_per_s"] for name, row in report.get("baselines", {}).items()
            if isinstance(row, dict) and "images_per_s" in row}


def draw_throughput(report: dict, path: Path, backbone: str = "vim-s") -> None:
    """The record's image rows as horizontal bars of images a second (the paper's rows and the newer ones in
    two colours), each baseline a dashed line, written as a PNG at ``path`` (atomically)."""
    rows = vision_rows(report)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.19 * len(rows)))
    y = range(len(rows))
    ax.barh(y, [rate for _, rate, _ in rows], color=[PAPER if paper else NEWER for *_, paper in rows], height=0.7)
    ax.set_yticks(y, [method for method, *_ in rows], fontsize=7)
    ax.invert_yaxis()  # fastest on top
    for (name, rate), style in zip(image_baselines(report).items(), ("--", ":", "-.")):
        ax.axvline(rate, color="black", linestyle=style, linewidth=1, label=f"{name}: {rate:,.0f} img/s")
    handles, _ = ax.get_legend_handles_labels()
    groups = {paper for *_, paper in rows}  # a legend entry for each colour drawn
    handles += [Patch(color=PAPER, label="rows the paper publishes")] * (True in groups)
    handles += [Patch(color=NEWER, label="newer rows")] * (False in groups)
    ax.set_xlabel("training images a second (higher is faster)")
    graphs = ", steps as CUDA graphs" if report.get("cuda_graphs") else ""
    source = report.get("provenance", {}).get("source_sha256", "")[:16]
    ax.set_title(f"{backbone} training step, {report.get('device', '?')}{graphs}"
                 + (f"\nsource {source}" if source else ""), fontsize=9)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # right of the bars
    ax.grid(axis="x", alpha=0.3)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)
