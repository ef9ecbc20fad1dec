"""What the trainer and evaluation ask of a vision backbone (timm's interface), shared by Vim and ViT."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn


class ImageClassifier(nn.Module):
    """A backbone with a linear ``head`` on a pooled feature. Subclasses set ``config`` (a dataclass
    with ``embed_dim`` and ``num_classes``), ``pos_embed`` and ``cls_token``, and define
    ``forward_features``."""

    def reset_classifier(self, num_classes: int) -> None:
        """A new zero-initialised head (mmpretrain's VisionTransformerClsHead init, the VTAB recipe's)."""
        self.config = replace(self.config, num_classes=num_classes)
        self.head = nn.Linear(self.config.embed_dim, num_classes, device=self.pos_embed.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def classifier_names(self) -> tuple[str, ...]:
        return ("head",)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(images))
