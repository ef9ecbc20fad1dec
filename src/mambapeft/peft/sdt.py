"""Sparse Dimension Tuning (SDT; Galim et al., ICML 2025, "SDLoRA" in their code furiosa-ai/ssm-peft):
LoRA on out_proj plus updates of a selected sparse subset of the SSM's dimensions: entries of A_log
and, for the same channels, the columns of x_proj's B and C rows.

Selection, as the original's ``SdLoraParameter`` (select mode CHANNELS_PER_STATE_CHANNELS): a
warm-up trains the LoRA and a full additive delta on every A_log for ``warmup_iters`` steps of the
run; per mixer and scan direction, the channels whose delta has the largest sum of squares over
the states are tuned (all but ``channel_freeze`` of them), and in each tuned channel the states
with the largest squared delta (all but ``state_freeze``). Training then starts afresh, as the
original's second run from the same seed: the warm-up's updates are discarded and the chosen
entries get zero-initialised updates. B and C keep every state of a tuned channel (the original
freezes states only in A_log).

An update adds its values at its own flat indices (``index_add``) and writes nothing else, so
frozen entries stay bit-identical whatever the optimizer (weight decay included) does.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..models.mamba import Direction, Mamba
from .core import apply_peft
from .lora import LoraSpec, merge_lora, row_blocks
from .lora import apply as apply_lora
from .registry import ORDER_TENSORS, ParamGroup, PeftConfigError, SpecBase, WarmUpRun, register
from .targets import fold_parametrizations, layer_of, mamba1_mixers


@dataclass(frozen=True)
class SdtSpec(SpecBase):
    lora_targets: tuple[str, ...] = ("mixer.out_proj",)
    """Modules of the LoRA part (exact path, dotted suffix or ``re:``)."""
    lora_rank: int = 8
    """Rank of the LoRA part (the original's proj_lora_r)."""
    lora_scale: float = 1.0
    """Multiplier of the LoRA update (the original's lora_alpha = rank)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input (the original's 0.1)."""
    state_freeze: float = 0.75
    """Fraction of each tuned channel's A_log states left frozen (the original's num_freeze.state)."""
    channel_freeze: float = 0.99
    """Fraction of channels left frozen in A_log and in x_proj's B and C rows (num_freeze.channel)."""
    warmup_iters: int = 500
    """Training steps of the selection warm-up (the original's num_warmup_it 499 = 500 steps); at most the run's."""
    dims: tuple[tuple[int, ...], ...] | None = None
    """Measured by the warm-up, not set by hand: per mixer and direction (model order), the tuned
    A_log entries as flat indices channel * d_state + state. None: the first channels and states
    stand in (parameter counts, dry runs)."""

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.dims is not None:  # JSON gives nested lists; specs are hashable
            object.__setattr__(self, "dims", tuple(tuple(entries) for entries in self.dims))
        for name in ("state_freeze", "channel_freeze"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"sdt `{name}` must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_iters < 1:
            raise ValueError(f"sdt `warmup_iters` must be >= 1, got {self.warmup_iters}")


class SparseUpdate(nn.Module):
    """Parametrisation original -> original with ``values`` added at the flat positions ``index``
    (zero at creation); every other entry is the original's, bit for bit."""

    def __init__(self, index: list[int], like: torch.Tensor):
        super().__init__()
        # not persistent: the selection lives in the member's `dims`, so a state dict carries no copy of it
        self.register_buffer("index", torch.tensor(index, dtype=torch.long, device=like.device), persistent=False)
        self.values = nn.Parameter(torch.zeros(len(index), dtype=torch.float32, device=like.device))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.flatten().index_add(0, self.index, self.values.to(original.dtype)).view_as(original)


@dataclass(frozen=True)
class TunedDirection:
    """One scan direction of one mixer whose dimensions SDT tunes."""

    path: str
    mixer: Mamba
    direction: Direction

    @property
    def a_log_path(self) -> str:
        return f"{self.path}.{self.direction.A_log}"


def tuned_directions(model: nn.Module, layers: tuple[int, ...] | None) -> list[TunedDirection]:
    """Every (mixer, scan direction) in model order, within ``layers`` when given."""
    mamba1_mixers(model, "sdt")
    chosen = [TunedDirection(path, mixer, d) for path, mixer in model.named_modules() if isinstance(mixer, Mamba)
              if layers is None or layer_of(f"{path}.") in layers for d in mixer.directions]
    if not chosen:
        raise PeftConfigError(f"sdt: no Mamba mixer in layers {list(layers)}")
    return chosen


def tuned_sizes(tuned: TunedDirection, spec: SdtSpec) -> tuple[int, int]:
    """(channels, states per channel) tuned in one direction: what the freeze fractions leave
    (rounded as the original, Python's round)."""
    sizes = []
    for what, total, freeze in (("channel", tuned.mixer.d_inner, spec.channel_freeze),
                                ("state", tuned.mixer.d_state, spec.state_freeze)):
        kept = total - round(freeze * total)
        if kept < 1:
            raise PeftConfigError(f"sdt: {what}_freeze {freeze} leaves none of the {total} {what}s of "
                                  f"{tuned.a_log_path} to tune; lower it")
        sizes.append(kept)
    return sizes[0], sizes[1]


def select_dims(change: torch.Tensor, n_channels: int, n_states: int) -> list[int]:
    """The tuned A_log entries (flat indices) from a warm-up's change of A_log (D_inner, N): the
    channels of largest sum of squares, in each the states of largest square (ties: lower index)."""
    energy = change.double().square()
    channels = torch.sort(energy.sum(1), descending=True, stable=True).indices[:n_channels]
    states = torch.sort(energy[channels], dim=1, descending=True, stable=True).indices[:, :n_states]
    return sorted((channels[:, None] * change.shape[1] + states).flatten().tolist())


def _placeholder_dims(n_channels: int, n_states: int, d_state: int) -> list[int]:
    return [c * d_state + s for c in range(n_channels) for s in range(n_states)]


def _checked_dims(entries: tuple[int, ...], tuned: TunedDirection, n_channels: int, n_states: int) -> list[int]:
    d_state, size = tuned.mixer.d_state, tuned.mixer.d_inner * tuned.mixer.d_state
    per_channel: dict[int, int] = {}
    for i in entries:
        per_channel[i // d_state] = per_channel.get(i // d_state, 0) + 1
    if (len(set(entries)) != len(entries) or any(not 0 <= i < size for i in entries)
            or len(per_channel) != n_channels or set(per_channel.values()) != {n_states}):
        raise PeftConfigError(f"sdt: `dims` of {tuned.a_log_path} must be {n_channels} channels x {n_states} "
                              f"states of its ({tuned.mixer.d_inner}, {d_state}) A_log; were they measured "
                              "on another backbone or with other freeze fractions?")
    return list(entries)


def _b_c_columns(tuned: TunedDirection, channels: list[int]) -> list[int]:
    """Flat indices into x_proj's weight of the tuned channels' columns in its B and C rows."""
    blocks = row_blocks(tuned.mixer, tuned.direction.x_proj)
    rows = [r for part in ("B", "C") for r in range(*blocks[part])]
    return [r * tuned.mixer.d_inner + c for r in rows for c in channels]


def _add_update(owner: nn.Module, attr: str, index: list[int]) -> nn.Parameter:
    update = SparseUpdate(index, getattr(owner, attr))
    parametrize.register_parametrization(owner, attr, update)
    return update.values


def _lora_fields(spec: SdtSpec) -> dict:
    """The LoRA part as the fields of a ``lora`` member."""
    return {"targets": spec.lora_targets, "rank": spec.lora_rank, "scale": spec.lora_scale,
            "dropout": spec.lora_dropout, "layers": spec.layers, "lr_mult": spec.lr_mult,
            "weight_decay_mult": spec.weight_decay_mult}


def prepare(backbone: nn.Module, spec: SdtSpec, run: WarmUpRun) -> tuple[dict, dict]:
    """The warm-up on a copy of ``backbone``: LoRA plus a full delta on each tuned A_log, trained
    for the run's first steps; the tuned dimensions chosen by how much A_log changed."""
    directions = tuned_directions(backbone, spec.layers)
    steps = min(spec.warmup_iters, run.total_steps)
    if steps == 0:
        return {}, {"warmup_steps": 0}
    model = copy.deepcopy(backbone)
    warm = apply_peft(model, [
        {"family": "lora", **_lora_fields(spec)},
        {"family": "partial", "targets": [t.a_log_path for t in directions], "mode": "delta",
         "lr_mult": spec.lr_mult, "weight_decay_mult": 0.0},
    ], "sdt warm-up")
    run.warm_up(model, warm, steps)
    dims, channels = [], {}
    for tuned in directions:
        warmed = getattr(model.get_submodule(tuned.path), tuned.direction.A_log).detach().cpu()
        change = warmed - getattr(tuned.mixer, tuned.direction.A_log).detach().cpu()
        dims.append(select_dims(change, *tuned_sizes(tuned, spec)))
        channels[tuned.a_log_path] = sorted({i // tuned.mixer.d_state for i in dims[-1]})
    return {"dims": dims}, {"warmup_steps": steps, "tuned_channels": channels}


def merge_sdt(model: nn.Module) -> None:
    """Write every sparse update into its tensor, then fold the LoRA part."""
    fold_parametrizations(model, (SparseUpdate,))
    merge_lora(model)


# tensors by name (A_log, x_proj's weight) before any wrapper moves x_proj
@register("sdt", spec=SdtSpec, order=ORDER_TENSORS + 30, merge=merge_sdt, prepare=prepare)
def apply(model: nn.Module, spec: SdtSpec) -> list[ParamGroup]:
    directions = tuned_directions(model, spec.layers)
    if spec.dims is not None and len(spec.dims) != len(directions):
        raise PeftConfigError(f"sdt: `dims` lists {len(spec.dims)} mixer directions, the model has "
                              f"{len(directions)}; it was measured on another backbone")
    params = []
    for i, tuned in enumerate(directions):
        n_channels, n_states = tuned_sizes(tuned, spec)
        entries = (_placeholder_dims(n_channels, n_states, tuned.mixer.d_state) if spec.dims is None
                   else _checked_dims(spec.dims[i], tuned, n_channels, n_states))
        channels = sorted({e // tuned.mixer.d_state for e in entries})
        params.append(_add_update(tuned.mixer, tuned.direction.A_log, entries))
        params.append(_add_update(getattr(tuned.mixer, tuned.direction.x_proj), "weight",
                                  _b_c_columns(tuned, channels)))
    lora_groups = apply_lora(model, LoraSpec(**_lora_fields(spec)))
    for group in lora_groups:
        group.name = "sdt_lora"
    return lora_groups + [spec.group("sdt_dims", params)]
