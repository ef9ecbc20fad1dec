"""Hugging Face ``peft`` tuners as a family: the library's own LoRA, BEFT (bias tuning), (IA)^3 and
the rest, injected into any backbone with ``peft.inject_adapter_in_model``. The ViT rows of the
vision table use it, so the Transformer side of the comparison runs the reference implementations
rather than ours.

Targets resolve as every family's do (exact path, dotted suffix, ``re:``; ``layers``) and reach
peft as full module paths; the trainable tensors are read off peft's tuner layers structurally
(their ``adapter_layer_names``), never by matching parameter names.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch.nn as nn

from .registry import ORDER_WRAPPERS, ParamGroup, PeftConfigError, SpecBase, register
from .targets import find_modules, fold_wrappers, matches

ADAPTER_NAME = "default"  # one peft adapter per model: a second hf_peft member is refused
# spec field -> the tuner config field it sets, where that tuner has one
CONFIG_FIELDS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "feedforward": "feedforward_modules"}


@dataclass(frozen=True)
class HfPeftSpec(SpecBase):
    tuner: str = "lora"
    """HF peft method, by its PeftType name in lower case (``lora``, ``beft``, ``ia3``, ``loha``, ...)."""
    targets: tuple[str, ...] = ()
    """Modules the tuner wraps (exact path, dotted suffix or ``re:``)."""
    rank: int | None = None
    """The tuner's rank ``r`` (LoRA and its relatives); None: the tuner's default."""
    alpha: float | None = None
    """LoRA's ``lora_alpha`` (the update is scaled by alpha / rank); None: the tuner's default."""
    dropout: float | None = None
    """LoRA's ``lora_dropout``; None: the tuner's default."""
    feedforward: tuple[str, ...] = ()
    """(IA)^3's ``feedforward_modules`` among the targets (scaled at their input, the others at their output)."""

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.feedforward, list):
            object.__setattr__(self, "feedforward", tuple(self.feedforward))
        if not self.targets:
            raise ValueError("hf_peft needs at least one entry in `targets`")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"hf_peft `rank` must be >= 1, got {self.rank}")


def tuner_config(spec: HfPeftSpec, target_paths: list[str]):
    """peft's config object of ``spec.tuner`` for exactly ``target_paths``; a spec field the tuner
    has no counterpart for is an error naming both."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(spec.tuner.upper())]
    except (ValueError, KeyError):
        raise PeftConfigError(f"hf_peft: unknown tuner {spec.tuner!r}; HF peft's: "
                              f"{', '.join(sorted(t.lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING))}") from None
    accepted = {f.name for f in fields(config_cls)}
    options = {"target_modules": target_paths}
    for name, key in CONFIG_FIELDS.items():
        value = getattr(spec, name)
        if value in (None, ()):
            continue
        if key not in accepted:
            raise PeftConfigError(f"hf_peft: tuner {spec.tuner!r} has no {key!r}: drop `{name}` from the member")
        options[key] = [p for p in target_paths if any(matches(p, f) for f in value)] \
            if name == "feedforward" else value
    return config_cls(**options)


def tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {path: m for path, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def adapter_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The tensors a tuner layer holds for the adapter (LoRA's A and B, BEFT's bias, ...)."""
    params = []
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr)
        if ADAPTER_NAME in container:
            entry = container[ADAPTER_NAME]
            params += [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
    return params


def _merged_base(layer: nn.Module) -> nn.Module:
    layer.merge(adapter_names=[ADAPTER_NAME])
    return layer.get_base_layer()


def merge_hf_peft(model: nn.Module) -> None:
    """Fold each tuner layer into its base module and put the base back (peft's merge_and_unload)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    fold_wrappers(model, (BaseTunerLayer,), fold=_merged_base)


@register("hf_peft", spec=HfPeftSpec, order=ORDER_WRAPPERS + 30, merge=merge_hf_peft)
def apply(model: nn.Module, spec: HfPeftSpec) -> list[ParamGroup]:
    from peft import inject_adapter_in_model

    if tuner_layers(model):
        raise PeftConfigError("hf_peft: the model already holds a peft adapter; one hf_peft member per method")
    targets = list(find_modules(model, list(spec.targets), spec.layers))
    inject_adapter_in_model(tuner_config(spec, targets), model, adapter_name=ADAPTER_NAME)
    params = [p for layer in tuner_layers(model).values() for p in adapter_parameters(layer)]
    return [spec.group(spec.tuner, params)]
