"""The one path from a run spec to a trainable model: backbone -> PEFT -> (adapter) -> placement
-> optimizer groups. Training, evaluation, dry runs, parameter counts, benchmarks and the lm-eval
model all build through :func:`build_trainable`; the domain decides only how the backbone is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .data.vtab import task_info
from .models import build_model, family_of
from .models.checkpoints import build_lm_from_dir, load_vim, read_lm_config
from .models.lm import MambaLMHeadModel
from .peft import PeftResult, apply_peft
from .peft.groups import param_groups
from .peft.state import load_adapter
from .runspec import deep_merge, domain_file, method_definition
from .runtime import PERMISSIVE, place_model

DOMAIN_OF_FAMILY = {"vim": "vision", "lm": "language"}


@dataclass
class Trainable:
    model: nn.Module
    peft: PeftResult
    groups: list[dict]
    """Optimizer groups (``peft/groups.py``), empty when nothing trains."""
    backend: str | None
    """The scan backend recorded in metrics.json; None for a model not placed (meta device)."""

    def counts(self) -> dict:
        """Parameter counts: ``trainable`` (PEFT parameters without the head), ``head``, ``total``."""
        trainable, total = self.peft.count(), sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "head": self.peft.count(exclude=()) - trainable, "total": total,
                "trainable_pct": 100.0 * trainable / total}


def domain_of(backbone: str) -> str:
    return DOMAIN_OF_FAMILY[family_of(backbone)]


def _vision_backbone(spec: dict, weights: bool) -> nn.Module:
    data = spec["data"]
    num_classes = data.get("num_classes") or int(task_info(data["task"])["num_classes"])
    overrides = {} if spec["train"].get("drop_path", True) else {"drop_path_rate": 0.0}
    model = build_model(spec["backbone"]["id"], num_classes=num_classes, **overrides)
    if weights and spec["method"]["init"] == "pretrained":
        load_vim(model, spec["backbone"]["path"])
    return model


def _language_backbone(spec: dict, weights: bool) -> nn.Module:
    backbone = spec["backbone"]
    if not weights:
        return build_model(backbone["id"])
    if spec["method"]["init"] == "pretrained":
        return build_lm_from_dir(backbone["path"])
    return MambaLMHeadModel(read_lm_config(backbone["path"]))


BACKBONE_BUILDERS = {"vision": _vision_backbone, "language": _language_backbone}


def build_trainable(spec: dict, device: torch.device | None = None, *, weights: bool = True,
                    adapter: str | Path | None = None) -> Trainable:
    """The run's backbone (with its checkpoint when ``weights``) and method, the trained tensors
    of ``adapter`` loaded when given, placed on ``device`` (not placed when None)."""
    model = BACKBONE_BUILDERS[spec["domain"]](spec, weights)
    peft = apply_peft(model, spec["method"]["peft"], spec["method"]["id"])
    if adapter is not None:
        load_adapter(peft, adapter)
    backend = place_model(model, device, spec["runtime"]) if device is not None else None
    return Trainable(model, peft, param_groups(model, peft, spec["train"]["optimizer"]), backend)


def build_on_meta(spec: dict) -> Trainable:
    """Shapes only (PyTorch's meta device): no memory, no weights; counts of Mamba-2.8b in milliseconds."""
    with torch.device("meta"):
        return build_trainable(spec, weights=False)


def bare_spec(domain: str, backbone: str | None, method: dict, *, num_classes: int | None = None,
              path: str | None = None) -> dict:
    """A run spec without an experiment config (parameter counts, benchmarks, lm-eval): the
    method definition (``runspec.method_definition`` or an adapter's), the domain's recipe, random
    weights or those at ``path``, and the permissive runtime (kernels when present)."""
    method = {"init": "pretrained", **method}
    train = deep_merge(domain_file(domain, "recipe"), method.pop("train", {}))
    return {"domain": domain, "backbone": {"id": backbone, "path": path}, "data": {"num_classes": num_classes},
            "method": method, "train": train, "runtime": dict(PERMISSIVE)}


def method_spec(backbone: str, method: str, *, num_classes: int | None = None) -> dict:
    """:func:`bare_spec` of a method of ``<domain>/methods.yaml`` on a registered backbone variant."""
    domain = domain_of(backbone)
    return bare_spec(domain, backbone, method_definition(domain, method, backbone, None), num_classes=num_classes)
