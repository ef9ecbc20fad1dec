"""Weight initialisation shared by both backbones (mamba_ssm's ``_init_weights``)."""
from __future__ import annotations

import math

import torch.nn as nn

from .mamba import Mixer


def init_mamba_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02) -> None:
    """Apply to every submodule (``model.apply(partial(init_mamba_weights, n_layer=...))``).

    Linear biases start at zero unless marked ``_no_reinit`` (dt_proj's inverse-softplus bias),
    embeddings are N(0, 0.02), and each residual branch's output projection is scaled by
    1/sqrt(n_layer) so the residual stream's variance does not grow with depth (GPT-2 scheme).
    """
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    elif isinstance(module, Mixer):
        nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
        module.out_proj.weight.data /= math.sqrt(n_layer)
