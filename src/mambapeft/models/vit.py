"""Vision Transformer (the Transformer side of MambaPEFT's comparison): timm's ``VisionTransformer``
as ``vit_small_patch16_224`` instantiates it (pre-norm blocks, fused ``qkv`` with bias, GELU MLP of
ratio 4, LayerNorm eps 1e-6, class token first, learned position embedding over the class token and
the patches, final norm, head on the class token), with timm's parameter names, so that timm's
published state dicts load without renaming (``models/checkpoints.py``, ``load_vit``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .image_classifier import ImageClassifier
from .mamba import DropPath
from .vim import PatchEmbed


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1  # timm's default is 0; 0.1 as the Vim backbone for the same VTAB recipe
    norm_eps: float = 1e-6
    num_classes: int = 1000

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ViTVariant:
    """A registry entry: architecture arguments plus what is known about the published weights."""

    config: dict
    backbone_params: int | None = None  # without the classification head
    hub_id: str | None = None  # the Hugging Face Hub repository timm loads the weights from


VIT_VARIANTS: dict[str, ViTVariant] = {
    # timm `vit_small_patch16_224.augreg_in1k`: ImageNet-1k only, as Vim-S
    "vit-s": ViTVariant(dict(embed_dim=384, depth=12, num_heads=6), 21_665_664,
                        "timm/vit_small_patch16_224.augreg_in1k"),
    # The offline mini experiment: same architecture, CPU-sized (as vim-mini: 32 px, patches of 8).
    "vit-mini": ViTVariant(dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                drop_path_rate=0.05)),
}


class Attention(nn.Module):
    """Multi-head self-attention with timm's fused ``qkv`` and output ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D/H)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, D/H)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D)."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(ImageClassifier):
    """ViT backbone + linear head."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, d))
        dpr = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]  # timm's linspace
        self.blocks = nn.ModuleList(Block(d, config.num_heads, config.mlp_ratio, config.norm_eps, dpr[i])
                                    for i in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.head = nn.Linear(d, config.num_classes)
        self._init_weights()

    def _init_weights(self):
        """As timm's default init: truncated normal 0.02 for the position embedding and Linear weights, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.reset_classifier(self.config.num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) normalised -> class-token feature (B, D)."""
        x = self.patch_embed(images)  # (B, M, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, M+1, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def describe(self) -> dict:
        return {"family": "vit", **asdict(self.config)}


def build_vit(name: str, **overrides) -> VisionTransformer:
    if name not in VIT_VARIANTS:
        raise KeyError(f"Unknown ViT variant {name!r}; known: {', '.join(VIT_VARIANTS)}")
    return VisionTransformer(ViTConfig(**{**VIT_VARIANTS[name].config, **overrides}))
