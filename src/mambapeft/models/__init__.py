"""Backbone registry: every variant is an entry of VIM_VARIANTS, VIT_VARIANTS or LM_VARIANTS, and its id
one of runspec.BACKBONE_IDS (what the config check reads without importing torch)."""
from __future__ import annotations

import torch.nn as nn

from .lm import LM_VARIANTS, MambaLMHeadModel, build_lm
from .vim import VIM_VARIANTS, VisionMamba, build_vim
from .vit import VIT_VARIANTS, VisionTransformer, build_vit

FAMILIES = {"vim": (VIM_VARIANTS, build_vim), "vit": (VIT_VARIANTS, build_vit), "lm": (LM_VARIANTS, build_lm)}


def family_of(name: str) -> str:
    """'vim', 'vit' or 'lm' for a backbone id; an unknown id is an error listing the known ones."""
    for family, (variants, _) in FAMILIES.items():
        if name in variants:
            return family
    known = [n for variants, _ in FAMILIES.values() for n in variants]
    raise KeyError(f"Unknown backbone {name!r}; known: {', '.join(known)}")


def build_model(name: str, **overrides) -> nn.Module:
    """Randomly initialised backbone ``name`` (e.g. "vim-s", "mamba-130m") with config overrides."""
    return FAMILIES[family_of(name)][1](name, **overrides)


__all__ = ["build_model", "family_of", "VisionMamba", "VisionTransformer", "MambaLMHeadModel", "VIM_VARIANTS",
           "VIT_VARIANTS", "LM_VARIANTS"]
