"""Exact trainable-parameter counts of backbone x method, and the parameter table (ours vs paper).

Models are built on PyTorch's ``meta`` device: shapes only, no memory, no weights, so counting
Mamba-2.8b methods takes milliseconds.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..build import build_on_meta, method_spec
from ..io import write_text_atomic
from ..runspec import domain_file, methods_for
from .markdown import frame_to_markdown

DEFAULT_NUM_CLASSES = 100  # CIFAR-100's head; the paper's table folds an average head into its counts


def count_params(backbone: str, method: str, num_classes: int | None = None) -> dict:
    """{"backbone", "method", "trainable", "head", "total", "trainable_pct"}; ``trainable`` is the
    PEFT parameters (added or unfrozen backbone tensors) without the classification head."""
    counts = build_on_meta(method_spec(backbone, method, num_classes=num_classes or DEFAULT_NUM_CLASSES)).counts()
    return {"backbone": backbone, "method": method, **counts, "trainable_pct": round(counts["trainable_pct"], 4)}


def _paper_entry(domain: str, backbone: str, method: str) -> dict:
    return domain_file(domain, "paper").get(backbone, {}).get(method, {})


def params_rows(selection: dict) -> list[dict]:
    """One row per (domain, backbone, method); ``selection``: {domain: {backbone: "all" | [methods]}},
    "all" being the methods that fit the backbone (vision/methods.yaml `backbones`)."""
    rows = []
    for domain, backbones in selection.items():
        methods_yaml = domain_file(domain, "methods")
        for backbone, methods in backbones.items():
            for method in (list(methods_for(domain, backbone)) if methods == "all" else methods):
                counted = count_params(backbone, method)
                paper = _paper_entry(domain, backbone, method)
                rows.append({"domain": domain, "backbone": backbone, "method": method,
                             "label": methods_yaml[method].get("label", method),
                             "trainable": counted["trainable"], "total": counted["total"],
                             "trainable_pct": counted["trainable_pct"],
                             "paper_params_k": paper.get("params_k"), "paper_params_pct": paper.get("params_pct")})
    return rows


def write_params_table(selection: dict, csv_path: Path, md_path: Path) -> pd.DataFrame:
    frame = pd.DataFrame(params_rows(selection))
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(csv_path, frame.to_csv(index=False))
    shown = frame.assign(
        ours=[f"{t:,}" for t in frame["trainable"]],
        ours_pct=[f"{p:.2f}" for p in frame["trainable_pct"]],
        paper=[_paper_text(r) for r in frame.to_dict("records")])
    text = ("# Trainable parameters: ours vs the paper\n\n"
            "`ours` counts the PEFT parameters without the classification head. The paper's vision counts "
            "(thousands) include an averaged task head (~9K, the linear-probing row); its language "
            "counts are % of all parameters.\n\n"
            + frame_to_markdown(shown[["domain", "backbone", "label", "method", "ours", "ours_pct", "paper"]]))
    write_text_atomic(md_path, text)
    return frame


def _paper_text(row: dict) -> str:
    if row["paper_params_k"] is not None and row["paper_params_k"] == row["paper_params_k"]:
        return f"{int(row['paper_params_k']):,}K"
    if row["paper_params_pct"] is not None and row["paper_params_pct"] == row["paper_params_pct"]:
        return f"{row['paper_params_pct']}%"
    return ""
