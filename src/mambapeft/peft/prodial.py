"""ProDiaL (Ham et al., CVPR 2025; SeokilHam/ProDiaL): projector fine-tuning by a diagonal-centric
linear transformation, W' = s * W D_b + B A, on Mamba's in_proj and/or out_proj.

  * D_b (in, in) is block-diagonal with square blocks of ``block_size`` (the original sets the
    number of blocks, r_b1 for in_proj and r_b2 for out_proj; its defaults r_b1 768 / r_b2 1536 on
    Mamba-130m are blocks of size 1 on both projections, a learnable diagonal);
  * s (out,) scales each output row of W D_b (the original's ``diag(s) @ W``);
  * B A is a LoRA of ``rank`` 16 with dropout 0.1 and scale 0.5 (the original uses peft's
    ``LoraConfig(r=16)``: lora_alpha 8 / r 16), the "off-diagonal" part.

Deviation, on purpose: the original builds each block as ``R (1 - I) + I - relu(diag(R))`` with R
initialised to zero; relu has a zero gradient at zero, so the diagonal never leaves 1 (with its
default 1x1 blocks D_b stays the identity throughout training). Here every block is ``I + R``
(R zero-initialised): the same D_b at init, and its diagonal trains.
At init s = 1, R = 0 and B = 0, so W' = W. The scaled weight is built from W directly
(:meth:`ProdialLinear.folds_weight_of`), so W stays fp32 under bf16 storage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.mamba import plain, unhooked
from .lora import LoraSpec, LowRankUpdate, columns_of, update_on_columns, updated_columns
from .registry import ORDER_WRAPPERS, ParamGroup, PeftConfigError, SpecBase, register
from .targets import find_modules, fold_wrappers, plain_linear, replace_module

try:  # s W D_b at 1x1 blocks as one node of two Triton kernels (CUDA; None without Triton)
    from ..models.scaled_weight_triton import MAX_ELEMENTS as _SCALED_MAX_ELEMENTS
    from ..models.scaled_weight_triton import diagonally_scaled as _diagonally_scaled
except ImportError:  # pragma: no cover - depends on the machine
    _diagonally_scaled, _SCALED_MAX_ELEMENTS = None, 0


@dataclass(frozen=True)
class ProdialSpec(SpecBase):
    targets: tuple[str, ...] = ("mixer.in_proj", "mixer.out_proj")
    """Linear modules to adapt (Both-Proj: in_proj and out_proj); exact path, dotted suffix or ``re:<regex>``."""
    block_size: int = 1
    """Side of D_b's square blocks; must divide each target's input width (1: a learnable diagonal)."""
    rank: int = 16
    """Rank of the off-diagonal low-rank update B A (the original's ``off_diagonal_rank``)."""
    scale: float = 0.5
    """Multiplier of B A (the original's peft LoRA: lora_alpha 8 / r 16)."""
    dropout: float = 0.1
    """Dropout on the input of B A (the original's ``dropout_rate``)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.targets:
            raise ValueError("prodial needs at least one entry in `targets`")
        if self.block_size < 1:
            raise ValueError(f"prodial `block_size` must be >= 1, got {self.block_size}")
        if self.rank < 1:
            raise ValueError(f"prodial `rank` must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"prodial `dropout` must be in [0, 1), got {self.dropout}")

    def low_rank(self) -> LoraSpec:
        """The B A part as an activation-style LoRA."""
        return LoraSpec(targets=self.targets, rank=self.rank, scale=self.scale, dropout=self.dropout)


class ProdialLinear(nn.Module):
    """``x @ (s * W D_b)^T + bias + s_lora * B A dropout(x)``; wraps ``base`` (kept as ``self.base``)."""

    def __init__(self, base: nn.Linear, spec: ProdialSpec):
        super().__init__()
        self.base = base
        device = base.weight.device
        n_blocks, size = base.in_features // spec.block_size, spec.block_size
        self.blocks = nn.Parameter(torch.zeros(n_blocks, size, size, device=device))  # R: D_b = I + blockdiag(R)
        self.row_scale = nn.Parameter(torch.ones(base.out_features, device=device))  # s
        self.low_rank = LowRankUpdate(base.in_features, (0, base.out_features), spec.low_rank(), base.weight)

    def scaled_weight(self) -> torch.Tensor:
        """s * W D_b: (out, in), computed block by block (D_b is never materialised); with 1x1 blocks on
        a CUDA device, W frozen, one node of two Triton kernels (``models/scaled_weight_triton.py``; a
        graphed Vim-S ProDiaL step on one H200: 22.32 ms with the einsum's chain, 20.93 with the node)."""
        out_features, n_blocks, size = self.base.out_features, *self.blocks.shape[:2]
        if self._scales_in_one_node():
            return _diagonally_scaled(self.base.weight, self.blocks.view(-1), self.row_scale)
        weight = self.base.weight.view(out_features, n_blocks, size)  # (out, blocks, size)
        blocks = self.blocks.to(weight.dtype)
        if size == 1:  # D_b a diagonal: W's columns scaled (the einsum's 1x1 products without its batched GEMM)
            weight = weight + weight * blocks.view(1, n_blocks, 1)
        else:
            weight = weight + torch.einsum("obi,bij->obj", weight, blocks)
        return self.row_scale.to(weight.dtype)[:, None] * weight.reshape(out_features, -1)

    def _scales_in_one_node(self) -> bool:
        """Whether :meth:`scaled_weight` may be the Triton node: 1x1 blocks, W frozen, contiguous fp32 on a
        CUDA device (as are the scales: parameters of the same module)."""
        weight = self.base.weight
        fp32 = all(t.dtype == torch.float32 for t in (weight, self.blocks, self.row_scale))
        return (_diagonally_scaled is not None and self.blocks.shape[1] == 1 and weight.is_cuda and fp32
                and not weight.requires_grad and weight.is_contiguous() and weight.numel() < _SCALED_MAX_ELEMENTS)

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight s * W D_b + s_lora * B A (equals the forward when dropout is inactive)."""
        return self.scaled_weight() + self.low_rank.block_delta(self.base.weight)

    @property
    def bias(self):
        return self.base.bias

    def folds_weight_of(self) -> list[nn.Linear]:
        """W is read directly (models/precision.py keeps it fp32)."""
        return [self.base]

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """A plain Linear with :attr:`weight` and the base's bias (``mambapeft merge``)."""
        return plain_linear(self.base, self.weight, self.base.bias)

    def _called_as_written(self) -> bool:
        """Nothing hooked on this module, its base or its update, and both plain: a call computes what
        :meth:`forward` says."""
        parts = (self, self.base, self.low_rank, *self.low_rank.children())
        return plain(self, ProdialLinear) and plain(self.base, nn.Linear) and all(map(unhooked, parts))

    def channel_major(self, x: torch.Tensor) -> torch.Tensor | None:
        """This module on x (..., in) as (out, N), N = x.numel() // in, for models/mamba.py's
        ``linear_channel_major`` (in_proj): s W D_b's GEMM accumulating onto B A's update in place
        (``lora.updated_columns``), in place of the token-major output, the add and a transposed copy.
        None where anything on it is hooked or wrapped (then it is called)."""
        if not self._called_as_written():
            return None
        return updated_columns(x, self.scaled_weight(), self.base.bias, [self.low_rank])

    def from_channel_major(self, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor | None:
        """This module on (y * scale)'s transpose, y (B, in, L) channel-major, as (B, L, out), for
        models/mamba.py's ``call_channel_major`` (out_proj): one node on y's columns computing s W D_b's
        gradient with B A's (``lora.update_on_columns``), in place of the scaled copy of y, PyTorch's dropout
        on its transposed view (its mask kept) and the update's add. None where anything on it is hooked
        or wrapped, the bias trains, or the dropout cannot be drawn from a seed on y (the CPU): then it is
        called."""
        columns = columns_of(y)
        bias = self.base.bias
        if (not self._called_as_written() or not self.low_rank.reads_as_weights(columns)
                or (bias is not None and bias.requires_grad)):
            return None
        return update_on_columns(y, columns, self.scaled_weight(), bias, self.low_rank, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        return F.linear(x, self.scaled_weight(), self.base.bias) + self.low_rank(x)


def merge_prodial(model: nn.Module) -> None:
    fold_wrappers(model, (ProdialLinear,))


@register("prodial", spec=ProdialSpec, order=ORDER_WRAPPERS, merge=merge_prodial)
def apply(model: nn.Module, spec: ProdialSpec) -> list[ParamGroup]:
    params = []
    for path, target in find_modules(model, list(spec.targets), spec.layers, kinds=(nn.Linear,)).items():
        if type(target) is not nn.Linear:
            raise PeftConfigError(f"prodial target {path} is already wrapped ({type(target).__name__}); "
                                  "ProDiaL rescales the pretrained weight, so combine it with methods on other modules")
        if target.in_features % spec.block_size:
            raise PeftConfigError(f"prodial `block_size` {spec.block_size} does not divide the input width "
                                  f"{target.in_features} of {path}; choose a divisor")
        wrapper = ProdialLinear(target, spec)
        replace_module(model, path, wrapper)
        params += [wrapper.blocks, wrapper.row_scale, *wrapper.low_rank.parameters()]
    return [spec.group("prodial", params)]
