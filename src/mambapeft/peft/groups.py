"""Optimizer parameter groups from what the PEFT families declared (never from name substrings).

Default decay rule (mmengine's DefaultOptimWrapperConstructor as the paper configured it): no
weight decay for biases, 1-D tensors (norms, D, ...) and tensors the model marks
``_no_weight_decay`` or lists in ``no_weight_decay()`` (A_log, cls_token, pos_embed). A family that
gives ``weight_decay_mult`` overrides the rule for its tensors (the v2 deltas: x10 / x100).
"""
from __future__ import annotations

import torch.nn as nn

from .core import PeftResult


def _decays_by_default(model: nn.Module, name: str, p: nn.Parameter) -> bool:
    no_decay_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return (p.ndim >= 2 and not name.endswith(".bias") and not getattr(p, "_no_weight_decay", False)
            and name not in no_decay_names)


def param_groups(model: nn.Module, result: PeftResult, optimizer_cfg: dict) -> list[dict]:
    """torch optimizer groups with ``lr_mult``/``wd_mult`` recorded beside lr and weight_decay."""
    base_lr, base_wd = optimizer_cfg["lr"], optimizer_cfg["weight_decay"]
    groups: dict[tuple, dict] = {}
    for group in result.groups:
        for name, p in group.params.items():
            wd_mult = group.weight_decay_mult
            if wd_mult is None:
                wd_mult = 1.0 if _decays_by_default(model, name, p) else 0.0
            key = (group.name, group.lr_mult, wd_mult)
            entry = groups.setdefault(key, {"params": [], "names": [], "group": group.name,
                                            "lr_mult": group.lr_mult, "wd_mult": wd_mult,
                                            "lr": base_lr * group.lr_mult, "weight_decay": base_wd * wd_mult})
            entry["params"].append(p)
            entry["names"].append(name)
    return list(groups.values())


def describe_groups(groups: list[dict]) -> list[dict]:
    """JSON summary for dry runs and metrics.json."""
    return [{"group": g["group"], "lr_mult": g["lr_mult"], "weight_decay_mult": g["wd_mult"],
             "lr": g["lr"], "weight_decay": g["weight_decay"], "tensors": len(g["params"]),
             "elements": sum(p.numel() for p in g["params"])} for g in groups]
