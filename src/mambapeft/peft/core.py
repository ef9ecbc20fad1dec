"""``apply_peft``: the single entry point that turns a method definition into a trainable model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .registry import ParamGroup, PeftConfigError, WarmUpRun, build_spec


@dataclass
class PeftResult:
    """What a method made trainable, grouped with the optimiser multipliers each family asked for."""

    groups: list[ParamGroup] = field(default_factory=list)

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for g in self.groups for name, p in g.params.items()}

    def count(self, exclude: tuple[str, ...] = ("head",)) -> int:
        """Number of trainable elements, by default without the classification head."""
        return sum(p.numel() for g in self.groups if g.name not in exclude for p in g.params.values())


def parse_members(members: list[dict], method: str):
    """(family, spec) pairs from a method's YAML members; errors name the method and member."""
    if not isinstance(members, list):
        raise PeftConfigError(f"method {method!r}: `peft` must be a list of members, got {type(members).__name__}")
    return [build_spec(m, f"method {method!r}, member {i} ({_member_label(m)})") for i, m in enumerate(members)]


def _member_label(member) -> str:
    if not isinstance(member, dict):
        raise PeftConfigError(f"a PEFT member must be a mapping {{family: ..., <fields>}}, got {member!r}")
    return member.get("name") or member.get("family", "?")


def apply_peft(model: nn.Module, members: list[dict], method: str = "method") -> PeftResult:
    """Apply every member of a method to ``model`` and freeze everything else.

    The classification head (``model.classifier_names()``) always trains. Two members that claim
    the same parameter are an error. The result lists exactly the parameters that require grad.
    """
    specs = sorted(parse_members(members, method), key=lambda fs: fs[0].order)  # stable: YAML order within a stage
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    for family, spec in specs:
        groups.extend(_named_after_member(family.apply(model, spec), spec.name))
    groups.extend(ParamGroup("head", list(model.get_submodule(n).parameters())) for n in model.classifier_names())
    result = PeftResult(_name_groups(model, groups, method))
    for p in result.trainable.values():
        p.requires_grad_(True)
    return result


def prepare_members(backbone: nn.Module, members: list[dict], method: str, run: WarmUpRun) -> tuple[list[dict], dict]:
    """The members with what their families' ``prepare`` hooks measured on ``backbone`` (the
    pretrained model before any PEFT) added as fields, and the hooks' records by member name.
    Members of families without a hook are returned as they are; no hook, no work."""
    prepared, records = [], {}
    for member, (family, spec) in zip(members, parse_members(members, method)):
        if family.prepare is None:
            prepared.append(member)
            continue
        fields, record = family.prepare(backbone, spec, run)
        prepared.append({**member, **fields})
        records[spec.name or family.name] = record
    return prepared, records


def _named_after_member(groups: list[ParamGroup], member: str | None) -> list[ParamGroup]:
    """A named member's groups carry its name (``lora_x``, or ``lora_x.<group>`` when it has
    several), so metrics.json and conflict messages tell two members of one family apart."""
    if member is not None:
        for g in groups:
            g.name = member if len(groups) == 1 else f"{member}.{g.name}"
    return groups


def _name_groups(model: nn.Module, groups: list[ParamGroup], method: str) -> list[ParamGroup]:
    """Name every parameter by its final path; a parameter claimed by two members is an error."""
    names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, str] = {}
    for g in groups:
        for p in g.params:
            if id(p) in owner:
                raise PeftConfigError(f"method {method!r}: parameter {names[id(p)]} is claimed by both "
                                      f"{owner[id(p)]!r} and {g.name!r}; combine methods on disjoint targets")
            owner[id(p)] = g.name
        g.params = {names[id(p)]: p for p in g.params}
    return groups


def zero_initialised(result: PeftResult) -> list[str]:
    """Trainable tensors that are exactly zero now (adapter up-projections, deltas, a fresh head)."""
    return [n for n, p in result.trainable.items() if not torch.any(p.detach() != 0)]


def check_gradients(result: PeftResult, zero_init: list[str] = ()) -> None:
    """After a backward: every trainable tensor must have a gradient, and every tensor in
    ``zero_init`` (it started at zero) a non-zero one; otherwise a kernel or wrapper skipped the
    adapter. Check ``zero_init`` from the second step on: a zero-initialised classification head
    blocks every upstream gradient in the very first step."""
    for name, p in result.trainable.items():
        if p.grad is None:
            raise RuntimeError(f"Trainable tensor {name} received no gradient: it is not on the autograd "
                               "path (an adapter skipped by the forward or a fused kernel). Stopping.")
    for name in zero_init:
        if not torch.any(result.trainable[name].grad != 0):
            raise RuntimeError(f"Zero-initialised tensor {name} received an all-zero gradient: its adapter "
                               "does not reach the loss. Stopping.")
