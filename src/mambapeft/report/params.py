"""Exact trainable-parameter counts of backbone x method, and the parameter table (ours vs paper).

Models are built on PyTorch's ``meta`` device: shapes only, no memory, no weights, so counting
Mamba-2.8b methods takes milliseconds.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..build import build_on_meta, domain_of, method_spec
from ..io import write_text_atomic
from ..runspec import ConfigError, domain_file, methods_for
from .markdown import frame_to_markdown

DEFAULT_NUM_CLASSES = 100  # CIFAR-100's head; the paper's table folds an average head into its counts


def count_params(backbone: str, method: str, num_classes: int | None = None) -> dict:
    """{"backbone", "method", "trainable", "head", "total", "trainable_pct"}; ``trainable`` is the
    PEFT parameters (added or unfrozen backbone tensors) without the classification head."""
    if num_classes is None:
        num_classes = DEFAULT_NUM_CLASSES
    elif num_classes < 1:
        raise ConfigError(f"num_classes is {num_classes}; a head has at least 1 class (default {DEFAULT_NUM_CLASSES})")
    _backbone_domain(backbone)  # an unknown backbone is one line, not the model registry's KeyError
    counts = build_on_meta(method_spec(backbone, method, num_classes=num_classes)).counts()
    return {"backbone": backbone, "method": method, **counts, "trainable_pct": round(counts["trainable_pct"], 4)}


def _backbone_domain(backbone: str) -> str:
    try:
        return domain_of(backbone)
    except KeyError as err:  # models.family_of: "Unknown backbone ...; known: ..."
        raise ConfigError(err.args[0]) from None


def _paper_entry(domain: str, backbone: str, method: str) -> dict:
    return domain_file(domain, "paper").get(backbone, {}).get(method, {})


def params_rows(selection: dict) -> list[dict]:
    """One row per (domain, backbone, method); ``selection``: {domain: {backbone: "all" | [methods]}},
    "all" being the methods that fit the backbone (vision/methods.yaml `backbones`)."""
    rows = []
    for domain, backbones in _checked_selection(selection).items():
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


def _checked_selection(selection) -> dict:
    """``selection`` if it is {domain: {backbone of that domain: "all" | [method ids]}} naming at least one
    backbone, else ConfigError saying which entry is wrong (a string other than "all" would be read
    letter by letter as method ids)."""
    shape = 'expected {"vision" | "language": {backbone: "all" or [method ids]}}'
    if not isinstance(selection, dict) or not selection:
        raise ConfigError(f"params-table spec is {selection!r}; {shape}")
    for domain, backbones in selection.items():
        if domain not in ("vision", "language") or not isinstance(backbones, dict) or not backbones:
            raise ConfigError(f"params-table spec: {domain!r}: {backbones!r}; {shape}")
        for backbone, methods in backbones.items():
            _check_backbone_methods(domain, backbone, methods)
    return selection


def _check_backbone_methods(domain: str, backbone: str, methods) -> None:
    where, actual = f"params-table spec: {domain}.{backbone}", _backbone_domain(backbone)
    if actual != domain:
        raise ConfigError(f"{where}: {backbone!r} is a {actual} backbone, not a {domain} one")
    if methods != "all" and not (isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods)):
        raise ConfigError(f'{where} is {methods!r}; expected "all" or a list of method ids')


def write_params_table(selection: dict, csv_path: Path, md_path: Path) -> pd.DataFrame:
    frame = pd.DataFrame(params_rows(selection))
    if frame.empty:  # "all" on a backbone no method fits
        raise ConfigError(f"params-table spec {selection} selects no method: nothing to count")
    shown = frame.assign(
        ours=[f"{t:,}" for t in frame["trainable"]],
        ours_pct=[f"{p:.2f}" for p in frame["trainable_pct"]],
        paper=[_paper_text(r) for r in frame.to_dict("records")])
    text = ("# Trainable parameters: ours vs the paper\n\n"
            "`ours` counts the PEFT parameters without the classification head. The paper's vision counts "
            "(thousands) include an averaged task head (~9K, the linear-probing row); its language "
            "counts are % of all parameters.\n\n"
            + frame_to_markdown(shown[["domain", "backbone", "label", "method", "ours", "ours_pct", "paper"]]))
    csv_path.parent.mkdir(parents=True, exist_ok=True)  # only now: every row counted, nothing half-written
    write_text_atomic(csv_path, frame.to_csv(index=False))
    write_text_atomic(md_path, text)
    return frame


def _paper_text(row: dict) -> str:
    if row["paper_params_k"] is not None and row["paper_params_k"] == row["paper_params_k"]:
        return f"{int(row['paper_params_k']):,}K"
    if row["paper_params_pct"] is not None and row["paper_params_pct"] == row["paper_params_pct"]:
        return f"{row['paper_params_pct']}%"
    return ""
