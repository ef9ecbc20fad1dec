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
MERGEABLE_KEY = "x-mergeable"  # a family's schema annotation: `mambapeft merge` can fold its members into the weights
METHOD_KEYS = {"label", "init", "peft", "train", "rank_by_backbone", "backbones"}
# A method fits the backbones of the families its `backbones:` names (a family is the backbone id's
# prefix: vim-s -> vim, vit-mini -> vit); without the key, its domain's default (None: every backbone).
DEFAULT_BACKBONE_FAMILIES = {"vision": ["vim"], "language": None}
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
    """One method entry (``label``, ``init``, ``peft`` members, ``train``, ``rank_by_backbone``, ``backbones``)."""
    if not isinstance(definition, dict):
        raise MethodError(f"{where}: method {method!r} must be a mapping with `peft:` (and `label:`, `init:`, `train:`)")
    unknown = sorted(set(definition) - METHOD_KEYS)
    if unknown:
        raise MethodError(f"{where}: method {method!r}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(METHOD_KEYS))}")
    families = definition.get("backbones", ["<default>"])
    if not (isinstance(families, list) and families and all(isinstance(f, str) for f in families)):
        raise MethodError(f"{where}: method {method!r}: `backbones` must be a list of backbone families "
                          f"(e.g. [vit]), got {families!r}")
    if definition.get("init", "pretrained") not in INITS:
        raise MethodError(f"{where}: method {method!r}: `init` must be one of {INITS}, got {definition['init']!r}")
    members = definition.get("peft", [])
    if not isinstance(members, list):
        raise MethodError(f"{where}: method {method!r}: `peft` must be a list of members")
    for i, member in enumerate(members):
        label = member.get("name") or member.get("family", "?") if isinstance(member, dict) else "?"
        check_member(member, f"{where}: method {method!r}, member {i} ({label})", schema_file)


def backbone_family(backbone: str) -> str:
    """The family of a backbone id, torch-free: its prefix (``vim-s`` -> vim, ``vit-mini`` -> vit)."""
    return backbone.split("-", 1)[0]


def fitting_families(definition: dict, domain: str) -> list[str] | None:
    """The backbone families a method applies to (None: every backbone of its domain)."""
    return definition.get("backbones", DEFAULT_BACKBONE_FAMILIES.get(domain))


def method_fits(definition: dict, domain: str, backbone: str) -> bool:
    families = fitting_families(definition, domain)
    return families is None or backbone_family(backbone) in families


def unmergeable_member(members: list[dict], schema_file: Path) -> tuple[int, str] | None:
    """(index, family) of the first member whose family cannot be folded into the weights, or None.
    A plugin family not in the committed schema is left to the merge job's own check."""
    schemas = _member_schemas(str(schema_file))
    for i, member in enumerate(members):
        family = member.get("family")
        if family in schemas and not schemas[family].get(MERGEABLE_KEY, False):
            return i, family
    return None


def mergeable_families(schema_file: Path) -> list[str]:
    return sorted(name for name, schema in _member_schemas(str(schema_file)).items() if schema.get(MERGEABLE_KEY))
