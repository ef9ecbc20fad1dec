"""Registry of PEFT families: one spec dataclass and one ``apply`` per family id."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch.nn as nn


class PeftConfigError(ValueError):
    """A method definition that cannot work; the message names the method, member and key."""


@dataclass
class ParamGroup:
    """Parameters a family made trainable, with the optimiser multipliers it asks for.

    Families return ``params`` as a list; :func:`apply_peft` names them from the final model
    (wrappers added by later members change paths). ``weight_decay_mult=None`` means "use the trainer's default rule" (no decay for 1-D tensors,
    biases, norms and parameters marked ``_no_weight_decay``).
    """

    name: str
    params: dict[str, nn.Parameter] | list[nn.Parameter]
    lr_mult: float = 1.0
    weight_decay_mult: float | None = None


@dataclass(frozen=True)
class SpecBase:
    """Fields shared by the families that adapt modules or tensors of each block."""

    layers: tuple[int, ...] | None = None
    """Restrict to these block indices (default: all)."""
    lr_mult: float = 1.0
    """Learning-rate multiplier for this member's parameters."""
    weight_decay_mult: float | None = None
    """Weight-decay multiplier (None: the trainer's default rule)."""

    def __post_init__(self):
        for name in ("targets", "layers"):  # YAML gives lists; specs are frozen and hashable
            if isinstance(getattr(self, name, None), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class Family:
    name: str
    spec_cls: type
    apply: Callable[[nn.Module, object], list[ParamGroup]]


FAMILIES: dict[str, Family] = {}


def register(name: str, spec: type):
    """Decorator: ``@register("lora", spec=LoraSpec) def apply(model, spec) -> list[ParamGroup]``."""

    def wrap(apply_fn):
        if name in FAMILIES:
            raise ValueError(f"PEFT family {name!r} is registered twice")
        FAMILIES[name] = Family(name, spec, apply_fn)
        return apply_fn

    return wrap


def get_family(name: str) -> Family:
    _load_builtin_families()
    if name not in FAMILIES:
        raise PeftConfigError(f"Unknown PEFT family {name!r}; valid families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def build_spec(member: dict, where: str):
    """A family spec dataclass from one YAML member ``{family: ..., <fields>}``."""
    member = dict(member)
    family = get_family(member.pop("family", None) or _missing_family(where))
    member.pop("name", None)
    valid = {f.name for f in fields(family.spec_cls)}
    unknown = sorted(set(member) - valid)
    if unknown:
        raise PeftConfigError(f"{where}: unknown key(s) {unknown} for family {family.name!r}; "
                              f"valid keys: {', '.join(sorted(valid))}")
    try:
        return family, family.spec_cls(**member)
    except (TypeError, ValueError) as err:
        raise PeftConfigError(f"{where}: {err}") from err


def _missing_family(where: str):
    raise PeftConfigError(f"{where}: every member needs a `family:` key; valid families: "
                          f"{', '.join(sorted(FAMILIES))}")


def _load_builtin_families() -> None:
    """Import the family modules so their ``@register`` decorators run."""
    from . import adapters, full, ia3, lora, partial, prompts, scan  # noqa: F401
