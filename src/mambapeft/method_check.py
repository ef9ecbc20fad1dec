"""Method definitions checked without torch: every ``methods.yaml`` member and every config
``method_overrides`` entry against the generated schema of the PEFT families
(``workflow/schemas/peft_members.schema.json``, see ``mambapeft.peft.schema``).

The workflow runs this when it parses the config, so a misspelt key fails ``snakemake -n`` with
one line naming the file, the method and the key, instead of failing a training job hours later.
Families installed as plugins (entry-point group ``mambapeft.peft_families``) are not in the
committed schema; their members are checked by their spec class when a job builds the method.
"""
from __future__ import annotations

import importlib.metadata
import json
from functools import lru_cache
from pathlib import Path

import jsonschema

ENTRY_POINT_GROUP = "mambapeft.peft_families"  # where installed packages name their family modules
METHOD_KEYS = {"label", "init", "peft", "train", "rank_by_backbone"}
INITS = ("pretrained", "scratch")


class MethodError(ValueError):
    """A method definition that cannot work; the message names the file, method and key."""


@lru_cache(maxsize=None)
def _member_schemas(schema_file: str) -> dict:
    return json.loads(Path(schema_file).read_text())["$defs"]


def plugin_families() -> set[str]:
    return {entry.name for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def check_member(member, where: str, schema_file: Path) -> None:
    """One ``{family: ..., <fields>}`` member; ``where`` names the file, method and member."""
    if not isinstance(member, dict):
        raise MethodError(f"{where}: a member must be a mapping {{family: ..., <fields>}}, got {member!r}")
    schemas, family = _member_schemas(str(schema_file)), member.get("family")
    if family in plugin_families() and family not in schemas:
        return
    if family not in schemas:
        what = f"unknown PEFT family {family!r}" if family else "every member needs a `family:` key"
        raise MethodError(f"{where}: {what}; valid families: {', '.join(sorted(set(schemas) | plugin_families()))}")
    properties = schemas[family]["properties"]
    unknown = sorted(set(member) - set(properties))
    if unknown:
        raise MethodError(f"{where}: unknown key(s) {unknown} for family {family!r}; "
                          f"valid keys: {', '.join(sorted(properties))}")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schemas[family]).iter_errors(member))
    if error is not None:
        key = "/".join(map(str, error.absolute_path)) or family
        raise MethodError(f"{where}: `{key}`: {error.message}")


def check_method(method: str, definition, where: str, schema_file: Path) -> None:
    """One method entry (``label``, ``init``, ``peft`` members, ``train``, ``rank_by_backbone``)."""
    if not isinstance(definition, dict):
        raise MethodError(f"{where}: method {method!r} must be a mapping with `peft:` (and `label:`, `init:`, `train:`)")
    unknown = sorted(set(definition) - METHOD_KEYS)
    if unknown:
        raise MethodError(f"{where}: method {method!r}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(METHOD_KEYS))}")
    if definition.get("init", "pretrained") not in INITS:
        raise MethodError(f"{where}: method {method!r}: `init` must be one of {INITS}, got {definition['init']!r}")
    members = definition.get("peft", [])
    if not isinstance(members, list):
        raise MethodError(f"{where}: method {method!r}: `peft` must be a list of members")
    for i, member in enumerate(members):
        label = member.get("name") or member.get("family", "?") if isinstance(member, dict) else "?"
        check_member(member, f"{where}: method {method!r}, member {i} ({label})", schema_file)
