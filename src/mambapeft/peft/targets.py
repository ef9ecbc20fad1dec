"""Resolve PEFT targets to modules or parameters: exact path, dotted suffix or anchored regex.

Never plain substrings: ``mixer.x_proj`` matches ``layers.3.mixer.x_proj`` but not
``layers.3.mixer.x_proj_b`` (the original code's ``'lora_d' in name`` also matched ``lora_dt``).
A regex is written ``re:<pattern>`` and must match the whole path.
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..models.mamba import Mamba, Mixer
from .registry import PeftConfigError


def matches(path: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return path == pattern or path.endswith("." + pattern)


def layer_of(path: str) -> int | None:
    """The block index in a path (``layers.3.mixer.in_proj`` -> 3, a ViT's ``blocks.3.attn.qkv`` -> 3),
    or None outside the blocks."""
    found = re.search(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.", path)
    return int(found.group(1)) if found else None


def _select(paths: Iterable[str], patterns: list[str], layers: list[int] | None, what: str) -> list[str]:
    paths = list(paths)
    chosen = [p for p in paths if any(matches(p, pat) for pat in patterns)
              and (layers is None or layer_of(p) in layers)]
    if not chosen:
        nearest = difflib.get_close_matches(patterns[0].removeprefix("re:"), paths, n=5, cutoff=0.3)
        raise PeftConfigError(f"No {what} matches targets {patterns}"
                              + (f" in layers {layers}" if layers is not None else "")
                              + f"; nearest names: {nearest or paths[:5]}")
    return chosen


def find_modules(model: nn.Module, patterns: list[str], layers: list[int] | None = None,
                 kinds: tuple[type, ...] = (nn.Module,)) -> dict[str, nn.Module]:
    """Modules whose path matches one of ``patterns`` and whose type is one of ``kinds``."""
    named = dict(model.named_modules())
    chosen = _select(named, patterns, layers, "module")
    wrong = [p for p in chosen if not isinstance(named[p], kinds)]
    if wrong:
        raise PeftConfigError(f"Targets {wrong} are {type(named[wrong[0]]).__name__}, "
                              f"expected one of {[k.__name__ for k in kinds]}")
    return {p: named[p] for p in chosen}


def find_parameters(model: nn.Module, patterns: list[str], layers: list[int] | None = None) -> list[str]:
    """Paths of direct parameters (``module.attr``) that match ``patterns``."""
    return _select((n for n, _ in model.named_parameters()), patterns, layers, "parameter")


def parent_and_attr(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, attr = parent_and_attr(model, path)
    setattr(parent, attr, new)


def fold_wrappers(model: nn.Module, kinds: tuple[type, ...],
                  fold: Callable[[nn.Module], nn.Module] = lambda wrapper: wrapper.folded()) -> None:
    """Replace every wrapper of ``kinds`` by its plain module ``fold(wrapper)`` (by default its
    ``folded()``), innermost first, so a wrapper folds a base that is already plain."""
    paths = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    for path in sorted(paths, key=lambda n: n.count("."), reverse=True):
        replace_module(model, path, fold(model.get_submodule(path)))


def fold_parametrizations(model: nn.Module, kinds: tuple[type, ...]) -> None:
    """Write every parametrised tensor whose chain holds one of ``kinds`` into the tensor itself
    and drop its parametrisation."""
    for module in list(model.modules()):
        for attr, chain in list(getattr(module, "parametrizations", {}).items()):
            if any(isinstance(p, kinds) for p in chain):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


@torch.no_grad()
def plain_linear(base: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain Linear shaped, placed and typed as ``base``, holding copies of ``weight`` and ``bias``
    (what a folded Linear wrapper becomes)."""
    merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=base.weight.device, dtype=base.weight.dtype)
    merged.weight.copy_(weight)
    if base.bias is not None:
        merged.bias.copy_(bias)
    return merged


def owning_mixer(model: nn.Module, path: str) -> Mixer:
    """The nearest ancestor of ``path`` that is a mixer (it knows d_inner, d_state, ...)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut])) if cut else model
        if isinstance(module, Mixer):
            return module
    raise PeftConfigError(f"{path} is not inside a Mamba mixer")


def mamba1_mixers(model: nn.Module, family: str) -> list[Mamba]:
    """Every mixer of ``model``, for a family built on Mamba-1 internals (its scan directions, the
    xz token space, a (D_inner, N) A): none, or another architecture's, is a PeftConfigError."""
    mixers = [m for m in model.modules() if isinstance(m, Mixer)]
    if not mixers:
        raise PeftConfigError(f"{family} needs a model with Mamba mixers")
    others = sorted({m.label for m in mixers if not isinstance(m, Mamba)})
    if others:
        raise PeftConfigError(f"{family} is defined for Mamba-1 mixers; this model's are {', '.join(others)}: "
                              f"choose a method without {family} (e.g. lora, ia3, partial, input_tokens)")
    return mixers
