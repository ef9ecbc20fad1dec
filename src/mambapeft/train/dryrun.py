"""``mambapeft train --dry-run``: the fully resolved run without touching data or weights.

The model is built on the meta device (shapes only) to list the optimizer's parameter groups; the
number of optimizer steps comes from the data when it is present, otherwise from the dataset's
documented size (VTAB-1k's train800val200 is always 1,000 images).
"""
from __future__ import annotations

import math

from ..build import build_on_meta
from ..peft.groups import describe_groups
from .schedules import build_schedule
from .tasks import task_class


def dry_run(spec: dict) -> dict:
    recipe = spec["train"]
    built = build_on_meta(spec)
    examples, source = task_class(spec).count_examples(spec)
    per_epoch = math.ceil(examples / recipe["batch_size"]) if examples else None
    total = per_epoch * recipe["epochs"] if per_epoch else None
    lr_at = {}
    if total:
        schedule = build_schedule(recipe, per_epoch, total)
        lr_at = {str(s): schedule(s) for s in sorted({0, 1, total // 10, total // 2, max(total - 1, 0)})}
    return {"run": spec["run"], "config": spec, "parameters": built.counts(),
            "param_groups": describe_groups(built.groups), "train_examples": examples, "train_examples_source": source,
            "steps_per_epoch": per_epoch, "optimizer_steps": total, "lr_at_step": lr_at}
