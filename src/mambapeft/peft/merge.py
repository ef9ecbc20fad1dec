"""Fold a trained method into the backbone's own weights (``mambapeft merge``): afterwards the
model has exactly the backbone's modules and parameter names, so it can be saved in the
published layouts and loaded by tools that know nothing of PEFT (transformers, mamba_ssm).

Each family says how it folds (``register(..., merge=...)``); a family without a ``merge`` changes
the computation itself (input or affix tokens, extra scan states, nonlinear adapters) and makes
its method unmergeable, an error that names the method and the member.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .core import parse_members
from .registry import FAMILIES, PeftConfigError, discover_families


def mergeable_families() -> list[str]:
    return sorted(name for name, family in discover_families().items() if family.merge is not None)


def check_mergeable(members: list[dict], method: str) -> None:
    """PeftConfigError naming the first member of ``method`` whose family cannot be folded."""
    for i, (family, spec) in enumerate(parse_members(members, method)):
        if family.merge is None:
            raise PeftConfigError(
                f"method {method!r} cannot be merged into the weights: member {i} ({spec.name or family.name}) is "
                f"family {family.name!r}, which changes the computation rather than the weights; mergeable "
                f"families: {', '.join(mergeable_families())}")


@torch.no_grad()
def merge_method(model: nn.Module, members: list[dict], method: str) -> None:
    """Fold every member of ``method`` (applied to ``model``) into the weights, in place.

    A head tied to the embedding is untied first, so that folding an embedding update leaves the
    head as the adapter model computed it; it is tied again when the two stay equal.
    """
    check_mergeable(members, method)
    head, embedding = getattr(model, "lm_head", None), _embedding_weight(model)
    tied = head is not None and head.weight is embedding
    if tied:
        head.weight = nn.Parameter(embedding.detach().clone(), requires_grad=False)
    for name in dict.fromkeys(m["family"] for m in members):  # each family folds all its members at once
        FAMILIES[name].merge(model)
    if tied and torch.equal(head.weight, _embedding_weight(model)):
        head.weight = model.backbone.embedding.weight
    elif tied:
        model.config.tie_embeddings = False


def _embedding_weight(model: nn.Module) -> torch.Tensor | None:
    embedding = getattr(getattr(model, "backbone", None), "embedding", None)
    return None if embedding is None else embedding.weight
