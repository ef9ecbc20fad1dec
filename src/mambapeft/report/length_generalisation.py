"""The learnable-input length study's table and figure, from ``metrics.json`` files only.

Every run of the study is (base model, training set, method, seed) on synthetic data or Yelp
polarity and records its accuracy at each test length (``eval/synthetic.py``) or band of review
lengths (``eval/text_classification.py``: the length is the band's start). The table has one row per (base model,
training set, method, test length) with the mean and standard deviation over seeds; beside ours,
the study's own numbers (``language/length_generalisation.yaml``), which were read from a plot
and are labelled so wherever they appear. The figure plots accuracy against test length (log x),
one line per method with a band of +-1 std over seeds, a vertical line at the longest training
length, the generator's chance level, and one panel per (base model, training set).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..data import yelp_polarity  # noqa: E402
from ..data.synthetic import GENERATORS  # noqa: E402
from ..io import write_text_atomic  # noqa: E402
from ..runspec import domain_file  # noqa: E402
from .figures import save_figure, shared_legend  # noqa: E402
from .markdown import frame_to_markdown  # noqa: E402
from .readers import ResultsError, read_readings, read_record  # noqa: E402
from .tables import RUN_RECORD  # noqa: E402

OURS = "ours"
PLOT_READING = "study (approx., read from a plot)"
SETTING_LABELS = {"short_long": "short → long", "standard": "standard"}
PANEL = ["backbone", "task"]
PANEL_COLUMNS = [*PANEL, "generator", "setting", "train_max_length"]
COUNTS = ["train_max_length", "n_tokens", "period", "trainable_params", "length", "seeds", "diverged_seeds"]
CLASSES = {**{name: g.symbols for name, g in GENERATORS.items()}, "yelp_polarity": yelp_polarity.NUM_CLASSES}
STUDY_DATA_KINDS = ("synthetic", "yelp_polarity")  # what the study's runs train on (runspec: length_generalisation)


def _tokens_member(method: dict) -> dict:
    return next((m for m in method["peft"] if m["family"] == "input_tokens"), {})


def _training(data: dict, task: str) -> dict:
    """The generator (Yelp: the data kind), setting and longest training length of a run's data."""
    if data["kind"] == "yelp_polarity":
        return {"generator": data["kind"], "setting": "short_long", "train_max_length": int(data["train_max_tokens"])}
    train_set = data["train_sets"][task]
    longest = train_set.get("max_length") if train_set["setting"] == "short_long" else max(data["test_lengths"])
    return {"generator": train_set["generator"], "setting": train_set["setting"], "train_max_length": int(longest)}


def run_rows(record: dict) -> list[dict]:
    """One row per test length of a run record (no rows for a diverged run: its cell stays empty)."""
    config = record["config"]
    run = config["run"]
    tokens = _tokens_member(config["method"])
    base = {"source": OURS, "backbone": run["backbone"], "task": run["task"], **_training(config["data"], run["task"]),
            "method": run["method"],
            "label": config["method"]["label"], "n_tokens": tokens.get("n_tokens"), "period": tokens.get("period"),
            "trainable_params": record.get("trainable_params"), "seed": run["seed"], "status": record["status"]}
    if record["status"] != "ok":
        return [{**base, "length": math.nan, "accuracy": math.nan}]
    return [{**base, "length": int(r["length"]), "accuracy": float(r["acc"])} for r in record["results"].values()]


def summary_frame(records: list[dict]) -> pd.DataFrame:
    """Mean, std (over seeds) and seed count per (backbone, task, method, length), methods.yaml order;
    ``diverged_seeds`` counts the seeds of that (backbone, task, method) that diverged."""
    long = pd.DataFrame([row for record in records for row in run_rows(record)])
    keys = ["source", "backbone", "task", "generator", "setting", "train_max_length", "method", "label",
            "n_tokens", "period", "trainable_params"]
    diverged = long[long["status"] != "ok"].groupby(["backbone", "task", "method"]).size().rename("diverged_seeds")
    ok = long[long["status"] == "ok"]
    grouped = ok.groupby(keys + ["length"], dropna=False)["accuracy"]
    table = grouped.agg(mean="mean", std="std", seeds="count").reset_index()
    table = table.join(diverged, on=["backbone", "task", "method"])
    table["diverged_seeds"] = table["diverged_seeds"].fillna(0).astype(int)
    order = {m: i for i, m in enumerate(domain_file("language", "methods"))}
    table["method_order"] = table["method"].map(order)
    return table.sort_values(["backbone", "task", "method_order", "length"]).drop(columns="method_order")


def readings_frame(readings: list[dict], ours: pd.DataFrame) -> pd.DataFrame:
    """The study's readings as table rows, attached to every panel of ours they describe."""
    panels = ours[PANEL_COLUMNS].drop_duplicates()
    rows = []
    for reading in readings:
        matching = panels[(panels["backbone"] == reading["backbone"]) & (panels["generator"] == reading["generator"])
                          & (panels["setting"] == reading["setting"])]
        for _, panel in matching.iterrows():
            rows += [{**panel.to_dict(), "source": PLOT_READING, "method": reading["method"], "label": reading["label"],
                      "n_tokens": reading.get("n_tokens"), "period": reading.get("period"),
                      "length": int(length), "mean": float(value), "seeds": 0}
                     for length, value in reading["accuracy"].items()]
    return pd.DataFrame(rows, columns=[*PANEL_COLUMNS, "source", "method", "label", "n_tokens", "period", "length",
                                       "mean", "seeds"])


def _of_panel(readings: pd.DataFrame, panel: tuple) -> pd.DataFrame:
    return readings[(readings["backbone"] == panel[0]) & (readings["task"] == panel[1])]


def _cell(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return ""
    if seeds > 1:
        return f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.1f}"


def _section(ours: pd.DataFrame, readings: pd.DataFrame) -> str:
    first = ours.iloc[0]
    lengths = sorted({int(n) for n in ours["length"]} | {int(n) for n in readings["length"]})
    rows = []
    for (method, label), rows_of in ours.groupby(["method", "label"], sort=False):
        cells = {int(r["length"]): _cell(r["mean"], r["std"], int(r["seeds"])) for _, r in rows_of.iterrows()}
        seeds = int(rows_of["seeds"].max())
        diverged = int(rows_of["diverged_seeds"].max())
        rows.append({"method": label, "trainable": f"{int(rows_of['trainable_params'].iloc[0]):,}",
                     **{str(n): cells.get(n, "") for n in lengths},
                     "seeds": f"{seeds}" + (f" ({diverged} diverged)" if diverged else "")})
    for label, rows_of in readings.groupby("label", sort=False):
        values = dict(zip(rows_of["length"].astype(int), rows_of["mean"]))
        rows.append({"method": f"{label}: {PLOT_READING}", "trainable": "",
                     **{str(n): (f"≈{values[n]:g}" if n in values else "") for n in lengths}, "seeds": ""})
    return f"## {_panel_title(first)}\n\n{frame_to_markdown(pd.DataFrame(rows))}"


def _panel_title(row) -> str:
    name = row["task"] if row["task"] == row["generator"] else f"{row['task']} ({row['generator']})"
    trained = (f"trained at lengths up to {int(row['train_max_length'])}" if row["setting"] == "short_long"
               else "trained at the test lengths")
    if row["generator"] == "yelp_polarity":
        trained = f"trained on reviews of at most {int(row['train_max_length'])} tokens"
    return f"{name}, {SETTING_LABELS[row['setting']]} ({trained}), base {row['backbone']}"


def _diverged_note(records: list[dict]) -> str:
    runs = ["{backbone}/{task}/{method}/seed{seed}".format(**r["config"]["run"])
            for r in records if r["status"] != "ok"]
    return f" Diverged runs (left out of the means): {', '.join(runs)}." if runs else ""


def markdown(ours: pd.DataFrame, readings: pd.DataFrame, source: str, note_end: str = "") -> str:
    note = ("Accuracy (%) of the answer at the query position, per test length (tokens, query included): "
            "mean ± std over seeds; for Yelp polarity, of the review's label, per band of review lengths (the "
            "column is the band's start: reviews of at least that many tokens, below the next column's). "
            "`trainable` counts the tuned parameters (the classification head not included). Rows marked "
            f"\"{PLOT_READING}\" are the study's own numbers, approximate values read from its plot ({source}), "
            "not measured here." + note_end)
    sections = [_section(rows_of, _of_panel(readings, panel)) for panel, rows_of in ours.groupby(PANEL, sort=False)]
    return "# Length generalisation: prefix vs periodic tokens\n\n" + note + "\n\n" + "\n".join(sections)


# ------------------------------------------------------------------------------------------------
# figure
# ------------------------------------------------------------------------------------------------
def _panel(ax, ours: pd.DataFrame, readings: pd.DataFrame, colours: dict) -> None:
    for (method, label), rows in ours.groupby(["method", "label"], sort=False):
        rows = rows.sort_values("length")
        std = rows["std"].fillna(0.0)
        ax.plot(rows["length"], rows["mean"], marker="o", markersize=3, color=colours[method], label=label)
        ax.fill_between(rows["length"], rows["mean"] - std, rows["mean"] + std, color=colours[method], alpha=0.2)
    for label, rows in readings.groupby("label", sort=False):
        rows = rows.sort_values("length")
        ax.plot(rows["length"], rows["mean"], linestyle=":", marker="x", markersize=4,
                color=colours.get(rows["method"].iloc[0], "grey"), label=f"{label}: {PLOT_READING}")
    first = ours.iloc[0]
    ax.axvline(first["train_max_length"], color="black", linestyle="--", linewidth=1, label="longest training length")
    ax.axhline(100.0 / CLASSES[first["generator"]], color="grey", linewidth=0.8, label="chance")
    ax.set_xscale("log", base=2)
    ticks = sorted(set(ours["length"]) | set(readings["length"]))
    ax.set_xticks(ticks, [str(int(t)) for t in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set_ylim(0, 100)
    ax.set_xlabel("test length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(_panel_title(first), fontsize=8)
    ax.grid(alpha=0.3)


def figure(ours: pd.DataFrame, readings: pd.DataFrame, path: Path) -> None:
    panels = list(ours.groupby(PANEL, sort=False))
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.0 * rows), squeeze=False)
    palette = plt.get_cmap("tab10")
    colours = {m: palette(i % 10) for i, m in enumerate(dict.fromkeys(ours["method"]))}
    for ax, (panel, rows_of) in zip(axes.flat, panels):
        _panel(ax, rows_of, _of_panel(readings, panel), colours)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    shared_legend(fig, axes.flat)
    fig.suptitle("Accuracy vs test length: mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def write_length_generalisation(metrics: list[str], readings_yaml: Path, csv_path: Path, md_path: Path,
                                png_path: Path) -> pd.DataFrame:
    records = [_of_the_study(read_record(p, RUN_RECORD), p) for p in metrics]
    ours = summary_frame(records)
    source, readings = read_readings(readings_yaml)
    study = readings_frame(readings, ours)
    table = (pd.concat([ours, study], ignore_index=True) if len(study) else ours).astype({c: "Int64" for c in COUNTS})
    text = markdown(ours, study, source, _diverged_note(records))  # before writing anything: no partial outputs
    write_text_atomic(csv_path, table.to_csv(index=False))
    write_text_atomic(md_path, text)
    figure(ours, study, png_path)
    return table


def _of_the_study(record: dict, path: str) -> dict:
    """The record, if its run is one of the study's (trained on synthetic data or Yelp polarity)."""
    kind = record["config"].get("data", {}).get("kind")
    if kind not in STUDY_DATA_KINDS:
        raise ResultsError(f"{path} is a run on data of kind {kind!r}, not a run of the length study (data kinds "
                           f"{', '.join(STUDY_DATA_KINDS)}): pass only the study's metrics.json files")
    return record
