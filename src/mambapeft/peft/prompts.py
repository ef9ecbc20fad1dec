"""Learnable-token families.

* ``affix`` (MambaPEFT Affix-tuning): per-layer tokens in in_proj-output (xz) space, prepended at
  t=0 of each scan (``per_direction``: separate tokens for Vim's forward and flipped backward scan,
  the original's ``inner_dual_prefix``; otherwise shared, ``inner_single_prefix``). They pass through
  conv1d and the SSM and are sliced off before out_proj.
* ``prompt`` (Vim prompt-tuning, shallow VPT): tokens inserted in the token sequence after the
  position embedding (prefix, suffix, or half before / half after), the class-token index shifted.
* ``input_tokens`` (language ``prefix`` and ``periodic`` tuning): learnable embeddings placed
  before the input (prefix) or re-inserted every ``period`` real tokens (periodic). They are never
  predicted; generation re-inserts them at the same positions.

With ``projection`` the tokens come from a reparametrising MLP (Embedding -> Linear -> Tanh ->
Linear), which trains better but adds many parameters (the paper's "w/ proj" rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.lm import MixerModel
from ..models.vim import VisionMamba
from .registry import ORDER_INPUTS, ORDER_MIXER, ParamGroup, PeftConfigError, SpecBase, register
from .targets import mamba1_mixers

PLACEMENTS = ("prefix", "suffix", "prefix_suffix")


def _check_tokens(n_tokens: int, hidden: int | None):
    if n_tokens < 1:
        raise ValueError(f"`n_tokens` must be >= 1, got {n_tokens}")
    if hidden is not None and hidden < 1:
        raise ValueError(f"`hidden` must be >= 1, got {hidden}")


def _before_the_blocks(spec: SpecBase, family: str) -> None:
    if spec.layers is not None:
        raise ValueError(f"{family} tokens enter the input sequence before the first block; `layers` does not apply")


class TokenEncoder(nn.Module):
    """``n_tokens`` vectors of ``width``: an Embedding (N(0, 1) init, as HF peft's PrefixEncoder),
    or with ``projection`` Embedding(n, in_width) -> Linear(in_width, hidden) -> Tanh -> Linear(hidden, width)."""

    def __init__(self, n_tokens: int, width: int, projection: bool = False, in_width: int | None = None,
                 hidden: int | None = None, device=None):
        super().__init__()
        self.projection = projection
        if projection:
            in_width = in_width or width
            hidden = hidden or in_width
            self.embedding = nn.Embedding(n_tokens, in_width, device=device)
            self.transform = nn.Sequential(nn.Linear(in_width, hidden, device=device), nn.Tanh(),
                                           nn.Linear(hidden, width, device=device))
        else:
            self.embedding = nn.Embedding(n_tokens, width, device=device)

    def forward(self) -> torch.Tensor:
        """-> (n_tokens, width)."""
        tokens = self.embedding.weight
        return self.transform(tokens) if self.projection else tokens


# ------------------------------------------------------------------------------------------------
# affix
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AffixSpec(SpecBase):
    n_tokens: int = 1
    """Tokens per layer and scan direction (the original's ``num_virtual_tokens``)."""
    projection: bool = False
    """Generate the tokens of all layers from one MLP (the paper's "w/ proj")."""
    hidden: int | None = None
    """Hidden width of the projection MLP (default: the token width, 2*d_inner)."""
    per_direction: bool = True
    """Separate tokens for each scan direction of a bidirectional (Vim) mixer."""

    def __post_init__(self):
        super().__post_init__()
        _check_tokens(self.n_tokens, self.hidden)


class AffixTokens(TokenEncoder):
    """All layers' affix tokens, computed once per model forward: (n, layers, directions, 2*d_inner)."""

    def __init__(self, spec: AffixSpec, n_layers: int, n_dirs: int, width: int, device=None):
        super().__init__(spec.n_tokens, n_layers * n_dirs * width, spec.projection, in_width=width,
                         hidden=spec.hidden, device=device)
        self.shape = (spec.n_tokens, n_layers, n_dirs, width)
        self._cached: torch.Tensor | None = None

    def clear_cache(self, *_):
        self._cached = None

    def tokens(self) -> torch.Tensor:
        if self._cached is None:  # cleared by a forward pre-hook on the first mixer
            self._cached = super().forward().view(self.shape)
        return self._cached


class AffixView(nn.Module):
    """One mixer direction's slice of the shared :class:`AffixTokens` -> (n, 2*d_inner)."""

    def __init__(self, source: AffixTokens, layer: int, direction: int):
        super().__init__()
        self._source = (source,)  # a tuple, so the shared parameters are not registered twice
        self.layer, self.direction = layer, direction

    def forward(self) -> torch.Tensor:
        return self._source[0].tokens()[:, self.layer, self.direction]


@register("affix", spec=AffixSpec, order=ORDER_MIXER + 10, identity_at_init=False)
def apply_affix(model: nn.Module, spec: AffixSpec) -> list[ParamGroup]:
    all_mixers = mamba1_mixers(model, "affix")
    mixers = [m for i, m in enumerate(all_mixers) if spec.layers is None or i in spec.layers]
    if not mixers:  # only `layers` can leave none
        raise PeftConfigError(f"affix `layers` {list(spec.layers)} select none of the model's {len(all_mixers)} mixers")
    n_dirs = len(mixers[0].directions) if spec.per_direction else 1
    source = AffixTokens(spec, len(mixers), n_dirs, 2 * mixers[0].d_inner, device=next(mixers[0].parameters()).device)
    model.affix_tokens = source
    # new tokens for every forward pass: the first mixer runs first whatever entry point is used
    mixers[0].register_forward_pre_hook(source.clear_cache)
    for layer, mixer in enumerate(mixers):
        for k, direction in enumerate(mixer.directions):
            mixer.affixes[direction.key] = AffixView(source, layer, k if spec.per_direction else 0)
    return [spec.group("affix", list(source.parameters()))]


# ------------------------------------------------------------------------------------------------
# prompt (vision)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSpec(SpecBase):
    n_tokens: int = 2
    """Number of prompt tokens."""
    placement: str = "prefix"
    """``prefix``, ``suffix`` or ``prefix_suffix`` (first half before, second half after)."""
    projection: bool = False
    """Generate the tokens with an MLP (Embedding -> Linear -> Tanh -> Linear)."""
    hidden: int | None = None
    """Hidden width of the projection (default: embed dim)."""

    def __post_init__(self):
        super().__post_init__()
        _before_the_blocks(self, "prompt")
        _check_tokens(self.n_tokens, self.hidden)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"prompt `placement` must be one of {PLACEMENTS}, got {self.placement!r}")


class PromptTokens(TokenEncoder):
    """Vim extension point ``prompt``: (tokens (B, L, D), cls_index) -> (tokens', cls_index')."""

    def __init__(self, spec: PromptSpec, width: int, device=None):
        super().__init__(spec.n_tokens, width, spec.projection, hidden=spec.hidden, device=device)
        self.placement = spec.placement

    def forward(self, x: torch.Tensor, cls_index: int):
        tokens = super().forward().unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)  # (B, n, D)
        if self.placement == "prefix":
            front, back = tokens, tokens[:, :0]
        elif self.placement == "suffix":
            front, back = tokens[:, :0], tokens
        else:
            front, back = tokens.tensor_split(2, dim=1)
        return torch.cat([front, x, back], dim=1), cls_index + front.shape[1]


@register("prompt", spec=PromptSpec, order=ORDER_INPUTS, identity_at_init=False)
def apply_prompt(model: nn.Module, spec: PromptSpec) -> list[ParamGroup]:
    if not isinstance(model, VisionMamba):
        raise PeftConfigError("prompt tokens are defined for Vim; for language models use `input_tokens`")
    model.prompt = PromptTokens(spec, model.config.embed_dim, device=model.cls_token.device)
    return [spec.group("prompt", list(model.prompt.parameters()))]


# ------------------------------------------------------------------------------------------------
# input tokens (language prefix / periodic)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputTokensSpec(SpecBase):
    n_tokens: int = 10
    """Number of learnable tokens per insertion."""
    period: int | None = None
    """Re-insert the same tokens before every ``period`` real tokens (None: prefix only)."""

    def __post_init__(self):
        super().__post_init__()
        _before_the_blocks(self, "input_tokens")
        _check_tokens(self.n_tokens, None)
        if self.period is not None and self.period < 1:
            raise ValueError(f"input_tokens `period` must be >= 1, got {self.period}")


class InputTokens(nn.Module):
    """Language extension point ``backbone.input_tokens`` (see :class:`MixerModel`)."""

    def __init__(self, spec: InputTokensSpec, embedding: nn.Embedding, generator: torch.Generator | None = None):
        super().__init__()
        # start from real vocabulary embeddings: the usual prompt-tuning initialisation
        rows = torch.randint(0, embedding.num_embeddings, (spec.n_tokens,), generator=generator).to(embedding.weight.device)
        self.tokens = nn.Parameter(embedding.weight.detach()[rows].clone().float())
        self.period = spec.period

    def tokens_before(self, position: int) -> torch.Tensor | None:
        """Tokens (n, D) to feed before the real token at ``position``, or None."""
        if position == 0 or (self.period is not None and position % self.period == 0):
            return self.tokens
        return None

    def layout(self, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Positions of the real tokens and of the inserted tokens in the expanded sequence, built
        on ``device`` with no host sync (a CUDA graph capture allows neither copies nor syncs)."""
        n = self.tokens.shape[0]
        real = torch.arange(length, device=device)
        chunk = real // self.period if self.period is not None else torch.zeros_like(real)
        real_pos = real + n * (chunk + 1)
        n_insertions = (length - 1) // self.period + 1 if self.period is not None and length else 1
        starts = torch.arange(n_insertions, device=device) * ((self.period or 0) + n)
        token_pos = (starts[:, None] + torch.arange(n, device=device)[None]).flatten()
        return real_pos, token_pos, length + n * n_insertions

    def expand(self, hidden: torch.Tensor):
        """hidden (B, L, D) -> (B, L', D) with the tokens inserted, and the real-token indices (L,)."""
        real_pos, token_pos, total = self.layout(hidden.shape[1], hidden.device)
        out = hidden.new_zeros(hidden.shape[0], total, hidden.shape[2])
        out[:, real_pos] = hidden
        repeats = token_pos.numel() // self.tokens.shape[0]
        out[:, token_pos] = self.tokens.to(hidden.dtype).repeat(repeats, 1)
        return out, real_pos


@register("input_tokens", spec=InputTokensSpec, order=ORDER_INPUTS + 10, identity_at_init=False)
def apply_input_tokens(model: nn.Module, spec: InputTokensSpec) -> list[ParamGroup]:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, MixerModel):
        raise PeftConfigError("input_tokens (prefix/periodic) are defined for Mamba language models")
    backbone.input_tokens = InputTokens(spec, backbone.embedding)
    return [spec.group("input_tokens", list(backbone.input_tokens.parameters()))]
