"""The hybrid search's spaces (``vision/search.yaml``): which Optuna parameters a step samples,
and the PEFT members a trial's parameters stand for (torch- and optuna-free: a trial object is
anything with Optuna's ``suggest_categorical`` / ``suggest_float``).

Parameter names: step kind ``choose`` samples ``<member>`` (true/false); kind ``tune`` samples
``remove`` (a member of the previous winner, or ``none``) and ``<member>.<field>``.
"""
from __future__ import annotations

import copy

from .. import method_check
from ..runspec import ConfigError, _peft_schema_path, domain_file
from .plan import FINAL

SPACE_FILE = "vision/search.yaml"
STEP_KINDS = ("choose", "tune")
KEEP_ALL = "none"  # the `remove` choice that drops no member


def load_space(space_id: str) -> dict:
    """One space of vision/search.yaml, checked: its base method, members and fields exist."""
    spaces = domain_file("vision", "search")
    if space_id not in spaces:
        raise ConfigError(f"{SPACE_FILE}: no space {space_id!r}; spaces: {', '.join(spaces) or 'none'}")
    space = spaces[space_id]
    _check_space(space_id, space)
    return space


def base_members(space: dict) -> dict[str, dict]:
    """The base method's members by name, at the sizes step 1 uses."""
    members = domain_file("vision", "methods")[space["members_of"]]["peft"]
    return dict(zip(member_names(members), members))


def _check_space(space_id: str, space: dict) -> None:
    where = f"{SPACE_FILE}/{space_id}"
    methods = domain_file("vision", "methods")
    if space.get("members_of") not in methods:
        raise ConfigError(f"{where}/members_of: {space.get('members_of')!r} is not a method of vision/methods.yaml")
    members = base_members(space)
    for step_id, step in space.get("steps", {}).items():
        if step_id == FINAL:
            raise ConfigError(f"{where}/steps: {FINAL!r} names the final runs' directory; rename that step")
        if step.get("kind") not in STEP_KINDS:
            raise ConfigError(f"{where}/steps/{step_id}/kind: {step.get('kind')!r}; valid: {', '.join(STEP_KINDS)}")
        named = step.get("members", []) if step["kind"] == "choose" else step.get("fields", {})
        unknown = [m for m in named if m not in members]
        if unknown:
            raise ConfigError(f"{where}/steps/{step_id}: {unknown} are not members of method "
                              f"{space['members_of']!r}; its members: {', '.join(members)}")
        for member, fields in step.get("fields", {}).items():
            _check_fields(f"{where}/steps/{step_id}/fields/{member}", members[member], fields)
    if not space.get("steps"):
        raise ConfigError(f"{where}/steps: a space needs at least one step")
    first = next(iter(space["steps"]))
    if space["steps"][first]["kind"] != "choose":
        raise ConfigError(f"{where}/steps/{first}: the first step must be of kind choose "
                          "(a tune step starts from the previous step's winner)")


def _check_fields(where: str, member: dict, fields: dict) -> None:
    """Each field is a list or a {low, high, log} range and a valid field of the member's family."""
    for field, values in fields.items():
        ranged = isinstance(values, dict) and {"low", "high"} <= set(values) <= {"low", "high", "log"}
        if not (ranged or (isinstance(values, list) and values)):
            raise ConfigError(f"{where}/{field}: give a non-empty list of values or {{low, high, log}}, got {values!r}")
        if ranged and not 0 < values["low"] < values["high"]:
            raise ConfigError(f"{where}/{field}: need 0 < low < high, got {values['low']} and {values['high']}")
        sample = values["low"] if ranged else values[0]
        try:
            method_check.check_member({**member, field: sample}, where, _peft_schema_path())
        except method_check.MethodError as err:
            raise ConfigError(str(err)) from None


def suggest(trial, space: dict, step_id: str, winner: list[str]) -> dict:
    """Sample one trial's parameters for a step; ``winner``: the previous step's members (kind tune)."""
    step = space["steps"][step_id]
    if step["kind"] == "choose":
        return {m: trial.suggest_categorical(m, [True, False]) for m in step["members"]}
    params = {}
    if step.get("remove_one"):
        params["remove"] = trial.suggest_categorical("remove", [KEEP_ALL, *winner])
    for member in winner:
        for field, values in step.get("fields", {}).get(member, {}).items():
            name = f"{member}.{field}"
            params[name] = (trial.suggest_categorical(name, list(values)) if isinstance(values, list) else
                            trial.suggest_float(name, values["low"], values["high"], log=values.get("log", False)))
    return params


def trial_members(space: dict, step_id: str, params: dict, winner: list[str]) -> list[dict]:
    """The PEFT members a trial's parameters stand for, in the base method's order."""
    members = base_members(space)
    if space["steps"][step_id]["kind"] == "choose":
        return [copy.deepcopy(m) for name, m in members.items() if params.get(name)]
    kept = [name for name in members if name in winner and name != params.get("remove")]
    chosen = []
    for name in kept:
        member = copy.deepcopy(members[name])
        member.update({key.partition(".")[2]: value for key, value in params.items()
                       if key.partition(".")[0] == name and "." in key})
        chosen.append(member)
    return chosen


def member_names(members: list[dict]) -> list[str]:
    return [m.get("name", m["family"]) for m in members]
