"""Hybrid PEFT by importance (the "Adaptive Hybrid-PEFT Mamba" study's third pillar; its published
numbers were simulated, so there is nothing to match): LoRA on the most important layers, (IA)3 on
the middle ones, the rest frozen.

Importance of a layer: the L2 norm of the loss gradient over all of the layer's parameters,
averaged over the run's first ``importance_batches`` training batches, measured on the pretrained
backbone before training. The classification head trains on those batches with the run's optimizer
(a zero-initialised head would otherwise block every gradient); the backbone does not change and
everything the measurement trained is discarded.

Split of the layers ranked by importance (ties: lower index first):
  * ``thirds``: rank r of n goes to LoRA, (IA)3 or frozen by floor(3 r / n);
  * ``budget``: as many LoRA layers as (IA)3 layers, as many as ``budget`` trainable parameters
    afford, then (IA)3 on the next layers while the budget lasts (a budget equal to the thirds'
    count gives the thirds' split when n is a multiple of 3).
The count depends only on how many layers each tier gets (the blocks are alike), so ``params``
(the layer order standing in for the unmeasured ranking) gives the count the run trains.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .core import apply_peft
from .ia3 import SIDES, IA3Spec, merge_ia3
from .ia3 import apply as apply_ia3
from .lora import LoraSpec, merge_lora
from .lora import apply as apply_lora
from .registry import ORDER_WRAPPERS, ParamGroup, PeftConfigError, SpecBase, WarmUpRun, register
from .targets import find_modules, layer_of

SPLITS = ("thirds", "budget")


@dataclass(frozen=True)
class HybridImportanceSpec(SpecBase):
    lora_targets: tuple[str, ...] = ("mixer.in_proj",)
    """Modules of the LoRA layers (exact path, dotted suffix or ``re:``)."""
    lora_rank: int = 8
    """Rank of the LoRA layers' updates."""
    lora_scale: float = 1.0
    """Multiplier of the LoRA updates."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    ia3_targets: tuple[str, ...] = ("mixer.in_proj",)
    """Linear modules the (IA)3 layers scale."""
    ia3_side: str = "output"
    """(IA)3 scales the modules' ``output`` or ``input`` channels."""
    split: str = "thirds"
    """``thirds`` or ``budget`` (see the module docstring)."""
    budget: int | None = None
    """split budget: the most trainable parameters (without the head) the split may use."""
    importance_batches: int = 4
    """Training batches the importance is averaged over (at most the run's steps)."""
    importance: tuple[float, ...] | None = None
    """Measured before training, not set by hand: per candidate layer (ascending index), its mean
    gradient norm. None: the layer order stands in for the ranking (parameter counts, dry runs)."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("lora_targets", "ia3_targets", "importance"):  # YAML/JSON give lists
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.split not in SPLITS:
            raise ValueError(f"hybrid_importance `split` must be one of {SPLITS}, got {self.split!r}")
        if (self.budget is None) != (self.split == "thirds"):
            raise ValueError("hybrid_importance `budget` is required with split `budget` and only then")
        if self.ia3_side not in SIDES:
            raise ValueError(f"hybrid_importance `ia3_side` must be one of {SIDES}, got {self.ia3_side!r}")
        if self.lora_rank < 1 or self.importance_batches < 1:
            raise ValueError("hybrid_importance `lora_rank` and `importance_batches` must be >= 1")


@dataclass(frozen=True)
class Split:
    lora: tuple[int, ...]
    ia3: tuple[int, ...]
    frozen: tuple[int, ...]


def candidate_layers(model: nn.Module, spec: HybridImportanceSpec) -> list[int]:
    """Block indices the split chooses from: every block, or ``layers``."""
    blocks = sorted({layer_of(f"{name}.") for name, _ in model.named_modules()} - {None})
    chosen = [i for i in blocks if spec.layers is None or i in spec.layers]
    if not chosen:
        raise PeftConfigError(f"hybrid_importance: no block in layers {list(spec.layers)}; blocks: {blocks}")
    return chosen


def _ranked(layers: list[int], importance: tuple[float, ...] | None) -> list[int]:
    if importance is None:
        return list(layers)
    if len(importance) != len(layers):
        raise PeftConfigError(f"hybrid_importance: `importance` has {len(importance)} values for {len(layers)} "
                              "layers; it was measured on another backbone")
    return [layer for _, layer in sorted(zip(importance, layers), key=lambda pair: -pair[0])]  # stable


def _costs(model: nn.Module, spec: HybridImportanceSpec, layers: list[int]) -> tuple[dict, dict]:
    """Trainable parameters of LoRA and of (IA)3 on each layer."""
    def linears(targets, layer):
        return find_modules(model, list(targets), [layer], kinds=(nn.Linear,)).values()

    lora = {i: sum(spec.lora_rank * (m.in_features + m.out_features) for m in linears(spec.lora_targets, i))
            for i in layers}
    width = (lambda m: m.out_features) if spec.ia3_side == "output" else (lambda m: m.in_features)
    ia3 = {i: sum(width(m) for m in linears(spec.ia3_targets, i)) for i in layers}
    return lora, ia3


def _budget_tiers(ranked: list[int], lora: dict, ia3: dict, budget: int) -> tuple[list[int], list[int]]:
    def pair_cost(k):
        return sum(lora[i] for i in ranked[:k]) + sum(ia3[i] for i in ranked[k:2 * k])

    pairs = 0
    while 2 * (pairs + 1) <= len(ranked) and pair_cost(pairs + 1) <= budget:
        pairs += 1
    lora_layers, ia3_layers, spent = ranked[:pairs], ranked[pairs:2 * pairs], pair_cost(pairs)
    for layer in ranked[2 * pairs:]:
        if spent + ia3[layer] > budget:
            break
        ia3_layers.append(layer)
        spent += ia3[layer]
    if not ia3_layers:
        raise PeftConfigError(f"hybrid_importance: budget {budget:,} is less than (IA)3 on one layer "
                              f"({min(ia3.values()):,} parameters); raise it")
    return lora_layers, ia3_layers


def split_layers(model: nn.Module, spec: HybridImportanceSpec) -> Split:
    layers = candidate_layers(model, spec)
    ranked = _ranked(layers, spec.importance)
    if spec.split == "thirds":
        tiers = [3 * rank // len(ranked) for rank in range(len(ranked))]
        lora = [layer for layer, tier in zip(ranked, tiers) if tier == 0]
        ia3 = [layer for layer, tier in zip(ranked, tiers) if tier == 1]
    else:
        lora, ia3 = _budget_tiers(ranked, *_costs(model, spec, layers), spec.budget)
    frozen = [layer for layer in layers if layer not in lora and layer not in ia3]
    return Split(tuple(sorted(lora)), tuple(sorted(ia3)), tuple(frozen))


def prepare(backbone: nn.Module, spec: HybridImportanceSpec, run: WarmUpRun) -> tuple[dict, dict]:
    """Per-layer gradient norms over the run's first batches, on a copy of ``backbone``."""
    steps = min(spec.importance_batches, run.total_steps)
    if steps == 0:
        return {}, {"batches": 0}
    model = copy.deepcopy(backbone)
    layers = candidate_layers(model, spec)
    probe = apply_peft(model, [], "hybrid_importance probe")  # everything frozen but the head
    params = {i: [p for name, p in model.named_parameters() if layer_of(name) == i] for i in layers}
    for p in (p for ps in params.values() for p in ps):
        p.requires_grad_(True)  # for their gradients only: the optimizer holds the head alone
    totals = dict.fromkeys(layers, 0.0)

    def add_gradient_norms(step: int) -> None:
        for i, ps in params.items():
            totals[i] += float(torch.sqrt(sum(p.grad.float().square().sum() for p in ps if p.grad is not None)))

    run.warm_up(model, probe, steps, add_gradient_norms)
    importance = [totals[i] / steps for i in layers]
    split = split_layers(backbone, replace(spec, importance=tuple(importance)))
    return {"importance": importance}, {"batches": steps, "importance": dict(zip(map(str, layers), importance)),
                                        "lora_layers": list(split.lora), "ia3_layers": list(split.ia3),
                                        "frozen_layers": list(split.frozen)}


def merge_hybrid(model: nn.Module) -> None:
    merge_lora(model)
    merge_ia3(model)


@register("hybrid_importance", spec=HybridImportanceSpec, order=ORDER_WRAPPERS + 30, merge=merge_hybrid,
          prepare=prepare)
def apply(model: nn.Module, spec: HybridImportanceSpec) -> list[ParamGroup]:
    split = split_layers(model, spec)
    groups = []
    if split.lora:
        groups += apply_lora(model, LoraSpec(targets=spec.lora_targets, rank=spec.lora_rank, scale=spec.lora_scale,
                                             dropout=spec.lora_dropout, layers=split.lora, lr_mult=spec.lr_mult,
                                             weight_decay_mult=spec.weight_decay_mult))
    if split.ia3:
        groups += apply_ia3(model, IA3Spec(targets=spec.ia3_targets, side=spec.ia3_side, layers=split.ia3,
                                           lr_mult=spec.lr_mult))
    return groups
