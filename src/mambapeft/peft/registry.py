"""Registry of PEFT families: one spec dataclass, one ``apply`` and one apply order per family id.

A family is one module that calls :func:`register`; nothing else needs editing. Families are
found by importing every module of this package and every module that an installed distribution
names under the entry-point group ``mambapeft.peft_families`` (a family in a package of its own).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Protocol

import torch.nn as nn

from ..method_check import ENTRY_POINT_GROUP


class PeftConfigError(ValueError):
    """A method definition that cannot work; the message names the method, member and key."""


@dataclass
class ParamGroup:
    """Parameters a family made trainable, with the optimiser multipliers it asks for.

    Families return ``params`` as a list; :func:`apply_peft` names them from the final model
    (wrappers added by later members change paths) and renames the group after the member's
    ``name`` when it has one. ``weight_decay_mult=None`` means "use the trainer's default rule"
    (no decay for 1-D tensors, biases, norms and parameters marked ``_no_weight_decay``).
    """

    name: str
    params: dict[str, nn.Parameter] | list[nn.Parameter]
    lr_mult: float = 1.0
    weight_decay_mult: float | None = None


@dataclass(frozen=True)
class SpecBase:
    """Fields every family's spec has (each family's spec derives from this class)."""

    name: str | None = None
    """Member name: its parameter group's name and its key in `method_overrides` (default: the family id)."""
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

    def group(self, default_name: str, params) -> ParamGroup:
        """This member's parameters as one optimiser group with its multipliers."""
        return ParamGroup(default_name, params, self.lr_mult, self.weight_decay_mult)


# Apply order: members of a method are applied in ascending ``order`` whatever their YAML order.
# Families that address existing tensors by name run before the ones that wrap modules (which
# change the tensors' paths), and those before the ones that add tokens or scan states.
ORDER_TENSORS = 100   # full, partial: existing parameters by name
ORDER_WRAPPERS = 200  # lora, parallel adapters, ia3: wrap Linear/Conv modules
ORDER_MIXER = 300     # additional scan states, affix tokens: mixer extension points
ORDER_INPUTS = 400    # prompt / input tokens: the model's input sequence


@dataclass(frozen=True)
class Family:
    name: str
    spec_cls: type
    apply: Callable[[nn.Module, object], list[ParamGroup]]
    order: int
    identity_at_init: bool
    """Applying the family leaves the model's outputs unchanged until it trains (zero-initialised
    updates); token and scan-state families change them from the start."""
    module: str
    merge: Callable[[nn.Module], None] | None = None
    """Folds every module or parametrisation the family inserted into the backbone's own weights,
    in place (``mambapeft merge``); None when the family changes the computation itself (tokens,
    scan states, nonlinear adapters) and cannot be folded."""
    prepare: Callable[[nn.Module, object, WarmUpRun], tuple[dict, dict]] | None = None
    """Measures on the run's data what the member needs before it is applied (the trainer calls
    it, see :class:`WarmUpRun`); None for families fully defined by their YAML fields."""


class WarmUpRun(Protocol):
    """What a family's ``prepare(backbone, spec, run) -> (fields, record)`` may use of its training
    job. The hook gets the pretrained backbone before any PEFT and must leave it unchanged (it works
    on a copy); ``fields`` are added to the member (the adapter's method then rebuilds exactly
    what trained), ``record`` goes to ``train.json`` under ``prepared``. The trainer runs the hooks
    once per run and restores its RNG state afterwards."""

    total_steps: int
    """Optimizer steps of the run."""

    def warm_up(self, model: nn.Module, result, steps: int,
                after_backward: Callable[[int], None] | None = None) -> None:
        """Train ``result``'s tensors of ``model`` (placed on the run's device here) for the run's
        first ``steps`` steps: the same batches, optimizer and learning-rate schedule;
        ``after_backward(step)`` sees each step's gradients before the optimizer step."""


FAMILIES: dict[str, Family] = {}


def register(name: str, spec: type, order: int, identity_at_init: bool = True,
             merge: Callable[[nn.Module], None] | None = None, prepare: Callable | None = None):
    """Decorator: ``@register("lora", spec=LoraSpec, order=ORDER_WRAPPERS) def apply(model, spec)
    -> list[ParamGroup]``. ``spec`` must derive from :class:`SpecBase`; ``order`` is one of the
    ``ORDER_*`` stages (plus an offset within it); ``merge`` makes the family mergeable
    (:attr:`Family.merge`); ``prepare`` measures before the family applies (:class:`WarmUpRun`)."""
    if not (isinstance(spec, type) and issubclass(spec, SpecBase)):
        raise TypeError(f"PEFT family {name!r}: its spec {spec!r} must be a dataclass deriving from SpecBase")

    def wrap(apply_fn):
        if name in FAMILIES and FAMILIES[name].module != apply_fn.__module__:
            raise ValueError(f"PEFT family {name!r} is registered twice ({FAMILIES[name].module} and "
                             f"{apply_fn.__module__}); rename one")
        FAMILIES[name] = Family(name, spec, apply_fn, int(order), identity_at_init, apply_fn.__module__, merge,
                                prepare)
        return apply_fn

    return wrap


def discover_families() -> dict[str, Family]:
    """Import every family module (this package's and the entry points'); returns the registry."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{info.name}")
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry.load()  # importing the module runs its @register
    return FAMILIES


def get_family(name: str | None, where: str = "") -> Family:
    discover_families()
    if name not in FAMILIES:
        what = f"unknown PEFT family {name!r}" if name else "every member needs a `family:` key"
        raise PeftConfigError(f"{where + ': ' if where else ''}{what}; valid families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def build_spec(member: dict, where: str):
    """A family spec dataclass from one YAML member ``{family: ..., <fields>}``."""
    member = dict(member)
    family = get_family(member.pop("family", None), where)
    valid = {f.name for f in fields(family.spec_cls)}
    unknown = sorted(set(member) - valid)
    if unknown:
        raise PeftConfigError(f"{where}: unknown key(s) {unknown} for family {family.name!r}; "
                              f"valid keys: {', '.join(sorted(valid))}")
    try:
        return family, family.spec_cls(**member)
    except (TypeError, ValueError) as err:
        raise PeftConfigError(f"{where}: {err}") from err
