"""``mambapeft train --dry-run``: the fully resolved run without touching data or weights.

The model is built on the meta device (shapes only) to list the optimizer's parameter groups; the
number of optimizer steps comes from the data when it is present, otherwise from the dataset's
documented size (VTAB-1k's train800val200 is always 1,000 images).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..models import build_model
from ..peft import apply_peft
from .optim import describe_groups, param_groups
from .schedules import build_schedule

VTAB_TRAIN_IMAGES = 1000  # train800val200


def _vision_examples(spec: dict) -> tuple[int, str]:
    data, split = spec["data"], spec["train"]["train_split"]
    listing = Path(data["root"]) / data["task"] / f"{split}.txt"
    if listing.is_file():
        return sum(1 for line in listing.read_text().splitlines() if line.strip()), str(listing)
    if data["source"] == "mini":
        return int(data["n_train"]) + int(data["n_val"]), "config (mini data not written yet)"
    return VTAB_TRAIN_IMAGES, "VTAB-1k train800val200 size (data not present)"


def _language_examples(spec: dict) -> tuple[int | None, str]:
    data, val = spec["data"], int(spec["train"]["val_size"])
    path = Path(data["root"]) / f"{data['task']}.json"
    if path.is_file():
        return len(json.loads(path.read_text())) - val, str(path)
    if data["source"] == "mini":
        return int(data["n_train"]) - val, "config (mini data not written yet)"
    if data.get("nominal_train_records"):
        return int(data["nominal_train_records"]) - val, "nominal size of the training file (data not present)"
    return None, "unknown until the training file is present"


def _model(spec: dict) -> torch.nn.Module:
    backbone = spec["backbone"]["id"]
    if spec["domain"] == "vision":
        from ..data.vtab import task_info

        return build_model(backbone, num_classes=int(task_info(spec["data"]["task"])["num_classes"]))
    return build_model(backbone)


def dry_run(spec: dict) -> dict:
    recipe = spec["train"]
    with torch.device("meta"):
        model = _model(spec)
        result = apply_peft(model, spec["method"]["peft"], spec["method"]["id"])
        groups = describe_groups(param_groups(model, result, recipe["optimizer"]))
    examples, source = (_vision_examples if spec["domain"] == "vision" else _language_examples)(spec)
    per_epoch = math.ceil(examples / recipe["batch_size"]) if examples else None
    total = per_epoch * recipe["epochs"] if per_epoch else None
    lr_at = {}
    if total:
        schedule = build_schedule(recipe, per_epoch, total)
        lr_at = {str(s): schedule(s) for s in sorted({0, 1, total // 10, total // 2, max(total - 1, 0)})}
    trainable = result.count()
    total_params = sum(p.numel() for p in model.parameters())
    return {"run": spec["run"], "config": spec,
            "parameters": {"trainable": trainable, "head": result.count(exclude=()) - trainable,
                           "total": total_params, "trainable_pct": 100.0 * trainable / total_params},
            "param_groups": groups, "train_examples": examples, "train_examples_source": source,
            "steps_per_epoch": per_epoch, "optimizer_steps": total, "lr_at_step": lr_at}
