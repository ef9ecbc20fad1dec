"""Vision Mamba (Vim), bidirectional "v2" mixer, middle class token (hustvl/Vim ``VisionMamba``
as instantiated by MambaPEFT: rms_norm, residual_in_fp32, fused_add_norm=False, if_devide_out,
use_middle_cls_token, absolute position embedding)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .image_classifier import ImageClassifier
from .init import init_mamba_weights
from .mamba import Block, DropPath, Mamba, RMSNorm, read_as_written


@dataclass
class VimConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-5
    num_classes: int = 1000
    residual_in_fp32: bool = True

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass(frozen=True)
class VimVariant:
    """A registry entry: architecture arguments plus what is known about the published weights."""

    config: dict
    backbone_params: int | None = None  # without the classification head
    checkpoint: str | None = None  # file name of the official weights (hustvl/Vim releases)


VIM_VARIANTS: dict[str, VimVariant] = {
    "vim-t": VimVariant(dict(embed_dim=192), 6_955_008, "vim_t_midclstok_76p1acc.pth"),
    "vim-s": VimVariant(dict(embed_dim=384), 25_411_584, "vim_s_midclstok_80p5acc.pth"),
    "vim-b": VimVariant(dict(embed_dim=768), 96_829_440, "vim_b_midclstok_81p9acc.pth"),
    # The offline mini experiment: same architecture, CPU-sized.
    "vim-mini": VimVariant(dict(img_size=32, patch_size=8, embed_dim=48, depth=4, d_state=8,
                                drop_path_rate=0.05)),
}


class PatchEmbed(nn.Module):
    """Non-overlapping patches: (B, C, H, W) -> (B, M, D) through ``proj`` (Conv2d, as in Vim).

    On a GPU the same map runs as one GEMM over the cut-out patches (:func:`patch_projection`) wherever
    reading ``proj``'s parameters stands for calling it: cuDNN runs this 3-channel, stride-p conv with a
    kernel that does not use the tensor cores (0.21 ms a Vim-S step of 32 images on one H200,
    results/benchmarks/HISTORY.md).
    The CPU keeps the conv (its results unchanged)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and cuts_patches(self.proj, x):
            return patch_projection(x, self.proj.weight, self.proj.bias)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, M, D)


def cuts_patches(conv: nn.Module, images: torch.Tensor) -> bool:
    """Whether ``conv`` on ``images`` is :func:`patch_projection` with its weight and bias: a Conv2d
    whose parameters stand for its call (no hooks or wrappers: ``read_as_written``), stride = kernel,
    no padding, dilation or groups, and the image a whole number of patches."""
    if not read_as_written(conv, nn.Conv2d):
        return False
    p, q = conv.kernel_size
    return (conv.stride == (p, q) and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and images.shape[-2] % p == 0 and images.shape[-1] % q == 0)


def patch_projection(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A conv over non-overlapping patches as a GEMM: images (B, C, H, W), weight (D, C, p, q) ->
    (B, (H/p) (W/q), D), the patches in the conv output's row-major order."""
    b, c, h, w = images.shape
    p, q = weight.shape[-2:]
    patches = images.reshape(b, c, h // p, p, w // q, q).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, q)
    return F.linear(patches.reshape(b, (h // p) * (w // q), c * p * q), weight.reshape(weight.shape[0], -1), bias)


class VisionMamba(ImageClassifier):
    """Vim backbone + linear head.

    Extension point: ``prompt`` (default None) is a module ``(tokens, cls_index) -> (tokens,
    cls_index)`` applied after the position embedding (prompt-tuning inserts tokens there).
    """

    def __init__(self, config: VimConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, d))
        # Vim: layer i drops the incoming previous-layer output with rate inter_dpr[i]
        dpr = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]  # linspace
        inter_dpr = [0.0] + dpr
        self.layers = nn.ModuleList(
            Block(d, Mamba(d, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                           bidirectional=True, divide_out=True, layer_idx=i),
                  norm_eps=config.norm_eps, drop_path=inter_dpr[i],
                  residual_in_fp32=config.residual_in_fp32)
            for i in range(config.depth))
        self.drop_path = DropPath(config.drop_path_rate)
        self.norm_f = RMSNorm(d, eps=config.norm_eps)
        self.head = nn.Linear(d, config.num_classes)
        self.prompt: nn.Module | None = None
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(partial(init_mamba_weights, n_layer=self.config.depth))
        self.reset_classifier(self.config.num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) normalised -> class-token feature (B, D)."""
        x = self.patch_embed(images)  # (B, M, D)
        cls_index = x.shape[1] // 2  # the middle token (98 of 197 for 224/16)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :cls_index], cls, x[:, cls_index:]], dim=1)  # (B, M+1, D)
        x = x + self.pos_embed
        if self.prompt is not None:
            x, cls_index = self.prompt(x, cls_index)
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        # the class token's only: the residual add and the norm are per token, and DropPath's mask per
        # image (the same draws for (B, D) as for (B, L, D)); over all tokens, in fp32, they were ~40
        # kernels and 0.15 ms of a Vim-S training step at batch 32 (one H200)
        residual = residual[:, cls_index] + self.drop_path(hidden[:, cls_index])
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def describe(self) -> dict:
        return {"family": "vim", **asdict(self.config)}


def build_vim(name: str, **overrides) -> VisionMamba:
    if name not in VIM_VARIANTS:
        raise KeyError(f"Unknown Vim variant {name!r}; known: {', '.join(VIM_VARIANTS)}")
    return VisionMamba(VimConfig(**{**VIM_VARIANTS[name].config, **overrides}))
