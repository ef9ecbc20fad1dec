"""The optimizer (AdamW) over the parameter groups of ``peft/groups.py``, and its learning rate per step."""
from __future__ import annotations

import torch


def build_optimizer(groups: list[dict], optimizer_cfg: dict) -> torch.optim.Optimizer:
    if optimizer_cfg["name"] != "adamw":
        raise ValueError(f"train/optimizer/name: only 'adamw' is implemented, got {optimizer_cfg['name']!r}")
    torch_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    return torch.optim.AdamW(torch_groups, lr=optimizer_cfg["lr"], betas=tuple(optimizer_cfg["betas"]),
                             eps=optimizer_cfg["eps"], weight_decay=optimizer_cfg["weight_decay"])


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
