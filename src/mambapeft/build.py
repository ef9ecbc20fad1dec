"""The one path from a run spec to a trainable model: backbone -> PEFT -> (adapter) -> placement
-> optimizer groups. Training, evaluation, dry runs, parameter counts, benchmarks and the lm-eval
model all build through :func:`build_trainable`; the domain decides only how the backbone is made.
Evaluation and merging load a run's adapter once :func:`read_training_record` vouches for it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .data import yelp_polarity
from .data.vtab import task_info
from .io import read_job_record
from .models import build_model, family_of
from .models.checkpoints import VISION_LOADERS, build_lm_from_dir, read_lm_config
from .models.lm import MambaLMHeadModel
from .models.lm_classifier import MambaLMClassifier
from .peft import PeftResult, apply_peft
from .peft.groups import param_groups
from .peft.state import load_adapter, read_adapter_members
from .runspec import (ADAPTER, TRAIN_RECORD, ConfigError, deep_merge, domain_file, method_definition, training_spec,
                      without_execution)
from .runtime import PERMISSIVE, place_model

DOMAIN_OF_FAMILY = {"vim": "vision", "vit": "vision", "lm": "language"}
CLASSES_OF_KIND = {"yelp_polarity": yelp_polarity.NUM_CLASSES}  # language data classified by a head, not the LM


@dataclass
class Trainable:
    model: nn.Module
    peft: PeftResult
    groups: list[dict]
    """Optimizer groups (``peft/groups.py``), empty when nothing trains."""
    backend: str | None
    """The scan backend recorded in metrics.json; None for a model not placed (meta device)."""
    members: list[dict]
    """The method's PEFT members as applied: with what families' prepare hooks measured, if any."""

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
        VISION_LOADERS[family_of(spec["backbone"]["id"])](model, spec["backbone"]["path"], spec["backbone"]["id"])
    return model


def _language_backbone(spec: dict, weights: bool) -> nn.Module:
    model = _language_model(spec["backbone"], spec["method"]["init"], weights)
    num_classes = CLASSES_OF_KIND.get(spec["data"].get("kind"))
    return MambaLMClassifier(model, num_classes) if num_classes else model


def _language_model(backbone: dict, init: str, weights: bool) -> MambaLMHeadModel:
    if not weights:
        return build_model(backbone["id"])
    if init == "pretrained":
        return build_lm_from_dir(backbone["path"])
    return MambaLMHeadModel(read_lm_config(backbone["path"]))


BACKBONE_BUILDERS = {"vision": _vision_backbone, "language": _language_backbone}


def build_trainable(spec: dict, device: torch.device | None = None, *, weights: bool = True,
                    adapter: str | Path | None = None,
                    prepare: Callable[[nn.Module, list[dict]], list[dict]] | None = None) -> Trainable:
    """The run's backbone (with its checkpoint when ``weights``) and method, the trained tensors
    of ``adapter`` loaded when given, placed on ``device`` (not placed when None).

    With ``adapter``, the members are the adapter's own (as trained, with what prepare hooks
    measured), and its recorded method must be the spec's; ``prepare(backbone, members) -> members``
    (the trainer's) runs before they apply."""
    model = BACKBONE_BUILDERS[spec["domain"]](spec, weights)
    members = read_adapter_members(adapter, spec["method"]["id"]) if adapter is not None else spec["method"]["peft"]
    if prepare is not None:
        members = prepare(model, members)
    peft = apply_peft(model, members, spec["method"]["id"])
    if adapter is not None:
        load_adapter(peft, adapter)
    backend = place_model(model, device, spec["runtime"]) if device is not None else None
    return Trainable(model, peft, param_groups(model, peft, spec["train"]["optimizer"]), backend, members)


class TrainingRecordError(ConfigError):
    """The training job's outputs are missing, unreadable or from another configuration."""


def read_training_record(run_dir: Path, spec: dict) -> dict:
    """``train.json`` of this run's configuration, with its adapter intact (sha256 as recorded): what
    evaluation and merging check first, so that neither uses an adapter training did not finish,
    wrote for another configuration, or that was replaced since."""
    return read_job_record(run_dir / TRAIN_RECORD, training_spec(spec), (run_dir / ADAPTER, "adapter_sha256"),
                           identity=without_execution, job="training", rule="finetune", error=TrainingRecordError)


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
