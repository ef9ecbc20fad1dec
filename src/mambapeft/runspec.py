"""Experiment grid and fully resolved run configurations (torch-free: the Snakefile imports it).

A run is (experiment, backbone, task, method, seed). :func:`resolve_run` merges, in order:
the domain recipe (``vision/recipe.yaml`` or ``language/recipe.yaml``), the experiment's ``train``
overrides in the config, and the method's own ``train`` overrides; it attaches the method's PEFT
members (with the config's ``method_overrides``), the data and backbone locations, the entries
of ``<domain>/tasks.yaml`` the run reads, and the runtime settings. The result is one JSON-able
dict: what ``metrics.json`` records as ``config`` and what a change of which (except in the
execution settings, :data:`EXECUTION_KEYS`) makes Snakemake re-run exactly the affected runs.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from . import method_check

DOMAINS = {"vision": "vision", "language": "language"}
# The model registry's backbone ids by domain (models/vim.py and models/vit.py: vision; models/lm.py:
# language), torch-free for the checks the Snakefile runs; tests/test_config_checks.py keeps them equal.
BACKBONE_IDS = {
    "vision": ("vim-t", "vim-s", "vim-b", "vim-mini", "vit-s", "vit-mini"),
    "language": ("mamba-130m", "mamba-370m", "mamba-790m", "mamba-1.4b", "mamba-2.8b", "mamba-mini", "mamba_16",
                 "mamba_128", "mamba_256", "mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b",
                 "mamba2-dt-study", "mamba2-mini"),
}
# The data kinds each domain's experiments train on, and the sources each kind comes from (config
# data/<id>: mini = offline stand-ins, generated = the synthetic recall tasks, the others real copies).
DOMAIN_DATA_KINDS = {"vision": ("vtab",),
                     "language": ("commonsense", "math", "synthetic", "yelp_polarity", "orca_math")}
DATA_SOURCES = {"vtab": ("mini", "vtab-1k"), "commonsense": ("mini", "llm-adapters"), "math": ("mini", "llm-adapters"),
                "synthetic": ("generated",), "yelp_polarity": ("mini", "hub"), "orca_math": ("mini", "hub")}
# Language data whose runs are scored on `eval_tasks`, tasks of the family of language/tasks.yaml named
# as the kind (eval/language.py); other runs are tested on their own task's test data.
EVAL_TASK_KINDS = ("commonsense", "math")


class ConfigError(ValueError):
    """A config that cannot be run; the message names the key and how to fix it."""


def repo_root() -> Path:
    """The checkout holding vision/, language/ and workflow/ (env MAMBAPEFT_ROOT overrides)."""
    if os.environ.get("MAMBAPEFT_ROOT"):
        return Path(os.environ["MAMBAPEFT_ROOT"]).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "vision").is_dir() and (parent / "language").is_dir():
            return parent
    raise ConfigError("Cannot find the repository (vision/ and language/ folders); set MAMBAPEFT_ROOT.")


@lru_cache(maxsize=None)
def _read_yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def domain_file(domain: str, name: str) -> dict:
    """``vision/<name>.yaml`` or ``language/<name>.yaml`` as a fresh dict."""
    if domain not in DOMAINS:
        raise ConfigError(f"Unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    return copy.deepcopy(_read_yaml(str(repo_root() / DOMAINS[domain] / f"{name}.yaml")))


def deep_merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; lists and scalars in ``override`` replace those in ``base``."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(*paths: str | Path, overrides: dict | None = None) -> dict:
    """Merge config files (later wins) and validate them against the workflow schema."""
    config: dict = {}
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"Config file {path} does not exist")
        config = deep_merge(config, _read_yaml(str(Path(path).resolve())))
    config = deep_merge(config, overrides or {})
    validate_config(config)
    _fill_schema_defaults(config)
    return config


SCHEMA_FILE = "workflow/schemas/config.schema.yaml"  # types and documents every config key


def _schema_path() -> Path:
    return repo_root() / SCHEMA_FILE


def _fill_schema_defaults(config: dict) -> None:
    """The schema's defaults, filled in as the workflow's own validation does, so that a run resolved
    here (``train --dry-run``) is the run a pipeline job gets."""
    from snakemake.utils import validate

    validate(config, str(_schema_path()), set_default=True)


def validate_config(config: dict) -> None:
    """The config against the schema, then everything it refers to (data sources, backbones, tasks,
    methods, recipes, registries): the first problem found is a ConfigError of one line naming its key."""
    _check_schema(config)
    for dataset, entry in config["data"].items():
        _check_data_source(dataset, entry)
    for name, entry in config.get("hub_datasets", {}).items():
        check_hub_dataset(name, entry)
    for exp_id, exp in config["experiments"].items():
        _check_experiment(config, exp_id, exp)
    _check_length_study(config)
    _check_searches(config)
    if DT_INIT in config:
        _check_dt_init(config[DT_INIT])
    _check_params_table(config.get("params_table", {}))


def _check_schema(config: dict) -> None:
    """The first schema violation (in key order), one line; the schema is where keys are documented."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(_read_yaml(str(_schema_path())))
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError(f"{_schema_error_line(errors[0])} ({SCHEMA_FILE} documents every key)")


def _schema_error_line(error) -> str:
    where = "/".join(map(str, error.absolute_path)) or "top level"
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = list(error.schema.get("properties", {}))  # the schema's own message lists no valid keys
        return _unknown_keys_line(where, [key for key in error.instance if key not in known], known)
    if error.validator in ("oneOf", "anyOf"):  # the schema's own message names none of the alternatives
        return f"{where}: {_alternatives_line(error.instance, error.validator_value, _fits_none(error))}"
    return f"{where}: {error.message}"


def _fits_none(error) -> bool:
    """A oneOf or anyOf error for a value no alternative takes (else oneOf's for one several take)."""
    return "is not valid under any of the given schemas" in error.message


def _alternatives_line(value, alternatives: list[dict], fits_none: bool) -> str:
    """What a value of a oneOf or anyOf may be: one of some keys of a mapping (alternatives that each
    require keys), or one of the alternatives' values."""
    if all(set(alternative) == {"required"} for alternative in alternatives):
        keys = " or ".join(f"`{key}`" for alternative in alternatives for key in alternative["required"])
        return f"give {'one' if fits_none else 'only one'} of {keys}"
    shown = "this entry" if isinstance(value, dict) else repr(value)
    return f"{shown} must be {' or '.join(map(_schema_described, alternatives))}"


# a JSON type as a value of it is named
_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "object": "a mapping", "array": "a list"}


def _schema_described(schema: dict) -> str:
    """One alternative of a oneOf or anyOf, as the values it takes: 'auto', an integer >= 1, a list of
    strings, a mapping with `file`."""
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(map(repr, schema["enum"]))
    kind = schema.get("type")
    if kind == "array" and isinstance(schema.get("items"), dict) and schema["items"].get("type") in _TYPE_NAMES:
        return f"a list of {schema['items']['type']}s"
    named = _TYPE_NAMES.get(kind, f"as {schema}")
    bounds = [f">= {schema['minimum']}"] if "minimum" in schema else []
    bounds += [f"<= {schema['maximum']}"] if "maximum" in schema else []
    return " ".join([named, *bounds])


def _unknown_keys_line(where: str, unknown: list, known) -> str:
    return f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(known)}"


def _check_data_source(dataset: str, entry: dict) -> None:
    sources = DATA_SOURCES[entry["kind"]]
    if entry["source"] not in sources:
        raise ConfigError(f"data/{dataset}/source: {entry['source']!r} is not a source of {entry['kind']} data; "
                          f"pick from {', '.join(sources)}")


def check_hub_dataset(name: str, entry: dict) -> None:
    """A `hub_datasets` entry names what to fetch: files of a Hub dataset repository (`repo`, with
    `allow_patterns` or `file`), or the splits of a task family (`family`, with `revisions` naming its
    tasks of language/tasks.yaml). Checked when the config is read and again by the download job."""
    where = f"hub_datasets/{name}"
    if ("repo" in entry) == ("family" in entry):
        raise ConfigError(f"{where}: give one of `repo` (a Hub dataset's files) or `family` (the splits of its tasks)")
    if "family" in entry:
        tasks = domain_file("language", "tasks")[entry["family"]]
        revisions = entry.get("revisions", {})
        unknown = [t for t in revisions if t not in tasks]
        if unknown or not revisions:
            raise ConfigError(f"{where}/revisions: {unknown or 'none'} given; name {entry['family']} tasks of "
                              f"language/tasks.yaml (task -> Hub dataset revision): {', '.join(tasks)}")
    elif ("allow_patterns" in entry) == ("file" in entry):
        raise ConfigError(f"{where}: give one of `allow_patterns` (files of {entry['repo']} fetched into the target "
                          "directory) or `file` (the one file, saved as the target)")


def check_methods_file(domain: str) -> None:
    """Every entry of ``<domain>/methods.yaml`` against the PEFT families' schema (torch-free)."""
    where = f"{DOMAINS[domain]}/methods.yaml"
    try:
        for method, definition in domain_file(domain, "methods").items():
            method_check.check_method(method, definition, where, _peft_schema_path())
    except method_check.MethodError as err:
        raise ConfigError(str(err)) from None


def _check_overrides(exp_id: str, exp: dict) -> None:
    """Each overridden method's members, resolved for every backbone it fits, against the schema."""
    for method, overrides in exp.get("method_overrides", {}).items():
        where = f"experiments/{exp_id}/method_overrides/{method}"
        for backbone in fitting_backbones(exp["domain"], method, exp["backbones"]):
            members = method_definition(exp["domain"], method, backbone, overrides)["peft"]
            try:
                for i, member in enumerate(members):
                    method_check.check_member(member, f"{where} (member {i})", _peft_schema_path())
            except method_check.MethodError as err:
                raise ConfigError(str(err)) from None


LENGTH_STUDY_KINDS = ("synthetic", "yelp_polarity")  # data whose runs report accuracy per test length


def _check_length_study(config: dict) -> None:
    """The length-generalisation study collects experiments on synthetic data and Yelp polarity."""
    for exp_id in length_study_experiments(config):
        exp = config["experiments"].get(exp_id)
        if exp is None:
            raise ConfigError(f"length_generalisation/experiments: {exp_id!r} is not an experiment of this config")
        if config["data"][exp["data"]]["kind"] not in LENGTH_STUDY_KINDS:
            raise ConfigError(f"length_generalisation/experiments: {exp_id!r} trains on data/{exp['data']}, "
                              f"not on a data entry of kind {' or '.join(LENGTH_STUDY_KINDS)}")


def _check_searches(config: dict) -> None:
    """A hybrid search (config `search`) runs on a vision experiment's backbone and tasks, over the
    steps of a space of vision/search.yaml taken in order (src/mambapeft/search/)."""
    spaces = domain_file("vision", "search")
    for name, search in config.get("search", {}).items():
        where = f"search/{name}"
        exp = config["experiments"].get(search["experiment"])
        if exp is None or exp["domain"] != "vision":
            raise ConfigError(f"{where}/experiment: {search['experiment']!r} is not a vision experiment of this config")
        _check_recipe_overrides(f"{where}/train", search.get("train", {}), exp["domain"])
        outside = [t for t in search["tasks"] if t not in exp["tasks"]]
        if outside:
            raise ConfigError(f"{where}/tasks: {outside} are not tasks of experiments/{search['experiment']}; "
                              f"the search trains on its experiment's data: pick from {', '.join(exp['tasks'])}")
        if search.get("backbone", exp["backbones"][0]) not in exp["backbones"]:
            raise ConfigError(f"{where}/backbone: {search['backbone']!r} is not a backbone of "
                              f"experiments/{search['experiment']}: pick from {', '.join(exp['backbones'])}")
        space = search.get("space", "hybrid")
        if space not in spaces:
            raise ConfigError(f"{where}/space: {space!r} is not a space of vision/search.yaml: {', '.join(spaces)}")
        order = list(spaces[space].get("steps", {}))
        steps = search.get("steps", order)
        if steps != order[:len(steps)]:
            raise ConfigError(f"{where}/steps: {steps} must be the first steps of space {space!r} in order: {order}")


def length_study_experiments(config: dict) -> list[str]:
    """Experiments of the length-generalisation study: its own table and figure, not the generic ones."""
    return list(config.get("length_generalisation", {}).get("experiments", []))


def _peft_schema_path() -> Path:
    return repo_root() / "workflow" / "schemas" / "peft_members.schema.json"


def _check_experiment(config: dict, exp_id: str, exp: dict) -> None:
    """What the experiment refers to (backbones, data, tasks) before its methods, which are checked
    against those: a problem is reported at its own key, not as a method or search that does not fit."""
    where = f"experiments/{exp_id}"
    _check_backbones(config, where, exp)
    _check_data(config, where, exp)
    _check_tasks(config, where, exp)
    _check_methods(where, exp)
    _check_exclude(where, exp)
    _check_recipe_overrides(f"{where}/train", exp.get("train", {}), exp["domain"])
    for method, overrides in exp.get("method_overrides", {}).items():
        if method not in exp["methods"]:
            raise ConfigError(f"{where}/method_overrides: {method!r} is not in this experiment's methods")
        _check_recipe_overrides(f"{where}/method_overrides/{method}/train", (overrides or {}).get("train", {}),
                                exp["domain"])
    _check_overrides(exp_id, exp)
    if exp.get("merge"):
        _check_mergeable(exp_id, exp)


def _check_backbones(config: dict, where: str, exp: dict) -> None:
    for backbone in exp["backbones"]:
        if backbone not in config["backbones"]:
            raise ConfigError(f"{where}/backbones: {backbone!r} has no entry under `backbones:` "
                              f"(declared: {', '.join(config['backbones'])})")
        _check_registered(f"{where}/backbones", backbone, exp["domain"])


def _check_registered(where: str, backbone: str, domain: str) -> None:
    """A backbone id the jobs can build: a ``domain`` variant of the model registry."""
    if backbone not in BACKBONE_IDS[domain]:
        raise ConfigError(f"{where}: {backbone!r} is not a {domain} backbone of the model registry "
                          f"(src/mambapeft/models/); known: {', '.join(BACKBONE_IDS[domain])}")


def _check_data(config: dict, where: str, exp: dict) -> None:
    if exp["data"] not in config["data"]:
        raise ConfigError(f"{where}/data: {exp['data']!r} has no entry under `data:` "
                          f"(declared: {', '.join(config['data'])})")
    kind, kinds = config["data"][exp["data"]]["kind"], DOMAIN_DATA_KINDS[exp["domain"]]
    if kind not in kinds:
        raise ConfigError(f"{where}/data: data/{exp['data']} is of kind {kind}; a {exp['domain']} experiment "
                          f"trains on data of kind {' or '.join(kinds)}")


def _check_tasks(config: dict, where: str, exp: dict) -> None:
    """Vision tasks, and the tasks language runs are scored on, are tasks of <domain>/tasks.yaml that
    the data holds; synthetic training sets are declared by the data."""
    dataset = exp["data"]
    entry = config["data"][dataset]
    if exp["domain"] == "vision":
        _check_listed_tasks(f"{where}/tasks", exp["tasks"], dataset, entry)
    declared = entry.get("train_sets")
    undeclared = [t for t in exp["tasks"] if declared is not None and t not in declared]
    if undeclared:
        raise ConfigError(f"{where}/tasks: {undeclared} are not training sets of data/{dataset}; "
                          f"declared under its train_sets: {', '.join(declared)}")
    if entry["kind"] in EVAL_TASK_KINDS:  # without eval_tasks, a run is scored on its training task (resolve_run)
        _check_listed_tasks(f"{where}/eval_tasks", exp.get("eval_tasks", exp["tasks"]), dataset, entry)
    elif "eval_tasks" in exp:
        raise ConfigError(f"{where}/eval_tasks: runs on {entry['kind']} data are tested on their own task, only "
                          f"{' and '.join(EVAL_TASK_KINDS)} runs on eval_tasks; remove the key")


def _check_listed_tasks(where: str, tasks: list[str], dataset: str, entry: dict) -> None:
    """Tasks of <domain>/tasks.yaml for the data's kind; the mini ones exist only as the offline
    stand-ins (source mini), the others only as real data."""
    mini = entry["source"] == "mini"
    if entry["kind"] == "vtab":
        table, listing = domain_file("vision", "tasks"), "vision/tasks.yaml"
    else:
        table, listing = domain_file("language", "tasks")[entry["kind"]], f"language/tasks.yaml {entry['kind']}"
    held = [name for name, task in table.items() if bool(task.get("mini")) == mini]
    unknown = [t for t in tasks if t not in held]
    if unknown:
        raise ConfigError(f"{where}: {unknown} are not tasks of {listing} that data/{dataset} (source "
                          f"{entry['source']}) holds; pick from {', '.join(held)}")


def _check_methods(where: str, exp: dict) -> None:
    check_methods_file(exp["domain"])
    methods = domain_file(exp["domain"], "methods")
    unknown = [m for m in exp["methods"] if m not in methods]
    if unknown:
        raise ConfigError(f"{where}/methods: unknown method(s) {unknown}; valid ids in "
                          f"{DOMAINS[exp['domain']]}/methods.yaml: {', '.join(methods)}")
    for method in exp["methods"]:
        if not fitting_backbones(exp["domain"], method, exp["backbones"]):
            raise ConfigError(f"{where}/methods: {_misfit(exp['domain'], method, exp['backbones'])}")


def _check_exclude(where: str, exp: dict) -> None:
    """An excluded cell names values of this experiment: one that names none would exclude nothing."""
    for i, cell in enumerate(exp.get("exclude", [])):
        for key, value in cell.items():
            values = exp[f"{key}s"]  # the experiment's list of each key of a cell: backbones, tasks, methods, seeds
            if value not in values:
                raise ConfigError(f"{where}/exclude/{i}/{key}: {value!r} is not one of this experiment's {key}s: "
                                  f"{', '.join(map(str, values))}")


def _check_recipe_overrides(where: str, overrides: dict, domain: str) -> None:
    """Recipe overrides name keys of the domain's recipe, nested as there: a misspelt key would reach
    the job and be ignored, a value of the wrong type fail it."""
    _check_recipe_keys(where, overrides, domain_file(domain, "recipe"), f"{DOMAINS[domain]}/recipe.yaml")


def _check_recipe_keys(where: str, overrides: dict, recipe: dict, recipe_file: str) -> None:
    unknown = [key for key in overrides if key not in recipe]
    if unknown:
        raise ConfigError(f"{_unknown_keys_line(where, unknown, recipe)} ({recipe_file})")
    for key, value in overrides.items():
        default = recipe[key]
        if isinstance(default, dict) and isinstance(value, dict):
            _check_recipe_keys(f"{where}/{key}", value, default, recipe_file)
        elif _value_kind(default) not in (None, _value_kind(value)):
            raise ConfigError(f"{where}/{key}: {value!r} must be {_value_kind(default)}, as in {recipe_file} "
                              f"({key}: {default!r})")


def _value_kind(value) -> str | None:
    """What an override of a recipe value must be; None for a string, which is not checked here
    (micro_batch_size is `auto` or a number: the schema checks it)."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return None


def _check_params_table(selection: dict) -> None:
    """Each counted backbone is a registry variant of its domain, and each listed method fits it."""
    for domain, backbones in selection.items():
        for backbone, methods in backbones.items():
            _check_registered(f"params_table/{domain}", backbone, domain)
            fitting = methods_for(domain, backbone)
            misfits = [] if methods == "all" else [m for m in methods if m not in fitting]
            if misfits:
                raise ConfigError(f"params_table/{domain}/{backbone}: {misfits} are not methods of "
                                  f"{DOMAINS[domain]}/methods.yaml for {backbone}; pick from all, {', '.join(fitting)}")


def _check_mergeable(exp_id: str, exp: dict) -> None:
    """``merge: true`` folds every run's method into the weights: each must be made of mergeable families."""
    where = f"experiments/{exp_id}/merge"
    if exp["domain"] != "language":
        raise ConfigError(f"{where}: only language experiments are merged (exported as language models); "
                          "set merge: false")
    for method in exp["methods"]:
        overrides = exp.get("method_overrides", {}).get(method)
        members = method_definition(exp["domain"], method, exp["backbones"][0], overrides)["peft"]
        found = method_check.unmergeable_member(members, _peft_schema_path())
        if found:
            index, family = found
            raise ConfigError(
                f"{where}: method {method!r} cannot be merged into the weights: its member {index} is family "
                f"{family!r}, which changes the computation rather than the weights (mergeable families: "
                f"{', '.join(method_check.mergeable_families(_peft_schema_path()))}); drop the method from this "
                "experiment or set merge: false")


# ------------------------------------------------------------------------------------------------
# grid
# ------------------------------------------------------------------------------------------------
# a run directory's files: the training job writes the adapter, then its record; the evaluate job
# writes metrics.json, the only file tables read
ADAPTER, TRAIN_RECORD, METRICS = "adapter.safetensors", "train.json", "metrics.json"


@dataclass(frozen=True)
class Run:
    experiment: str
    backbone: str
    task: str
    method: str
    seed: int

    def directory(self, results_dir: str | Path) -> Path:
        return (Path(results_dir) / "runs" / self.experiment / self.backbone / self.task / self.method
                / f"seed{self.seed}")


def merged_directory(config: dict, run: Run) -> Path:
    """Where ``mambapeft merge`` writes a run's merged model: hf/, mamba_ssm/, then merge.json."""
    return results_dir(config) / "merged" / run.directory("").relative_to("runs")


def base_export_directory(config: dict, backbone: str) -> Path:
    """The backbone itself in the merged models' layouts (hf/, mamba_ssm/, merge.json): the base model."""
    return resources_dir(config) / "backbones" / backbone / "export"


def merge_grid(config: dict) -> list[Run]:
    """The runs of experiments with ``merge: true``: one merge job each."""
    return [run for run in grid(config) if config["experiments"][run.experiment].get("merge")]


def _excluded(run: Run, rules: list[dict]) -> bool:
    return any(all(getattr(run, key) == value for key, value in rule.items()) for rule in rules)


def grid(config: dict, experiment: str | None = None) -> list[Run]:
    """Every run of one experiment (or of all): each method on the backbones it fits (a Vim method
    on the Vim backbones, a ViT method on the ViT ones), minus the experiment's ``exclude`` cells."""
    experiments = config["experiments"] if experiment is None else {experiment: config["experiments"][experiment]}
    runs = []
    for e, exp in experiments.items():
        fits = {m: fitting_backbones(exp["domain"], m, exp["backbones"]) for m in exp["methods"]}
        cells = (Run(e, b, t, m, int(s)) for b in exp["backbones"] for t in exp["tasks"]
                 for m in exp["methods"] if b in fits[m] for s in exp["seeds"])
        runs += [r for r in cells if not _excluded(r, exp.get("exclude", []))]
    return runs


# ------------------------------------------------------------------------------------------------
# locations of cached intermediates
# ------------------------------------------------------------------------------------------------
def resources_dir(config: dict) -> Path:
    return Path(config.get("resources_dir", "resources"))


def results_dir(config: dict) -> Path:
    return Path(config.get("results_dir", "results"))


def data_manifest(config: dict, dataset: str) -> Path:
    """Written by the data rule once the dataset is present and valid (generated or checked)."""
    return resources_dir(config) / "data" / dataset / "manifest.json"


def data_root(config: dict, dataset: str) -> Path:
    entry = config["data"][dataset]
    return Path(entry["root"]) if entry.get("root") else resources_dir(config) / "data" / dataset


def hub_dataset_record(config: dict, name: str) -> Path:
    """Written last by the download of the ``hub_datasets`` entry ``name``."""
    return resources_dir(config) / "downloads" / f"{name}.json"


def hub_downloads_for(config: dict, path: str | Path) -> list[str]:
    """The download records of the ``hub_datasets`` entries whose target is ``path``, lies inside it
    or holds it: a job that reads ``path`` waits for them."""
    reading = Path(os.path.abspath(path))
    records = []
    for name, entry in config.get("hub_datasets", {}).items():
        target = Path(os.path.abspath(entry["target"]))
        if target == reading or target in reading.parents or reading in target.parents:
            records.append(str(hub_dataset_record(config, name)))
    return records


def backbone_manifest(config: dict, backbone: str) -> Path:
    """Written once the backbone checkpoint exists (pretrained here, or official weights checked)."""
    return resources_dir(config) / "backbones" / backbone / "checkpoint.json"


def backbone_path(config: dict, backbone: str) -> Path:
    return Path(config["backbones"][backbone]["path"])


def backbone_entry(config: dict, backbone: str) -> dict:
    """The backbone's config entry less ``threads``, the CPUs of its own pretraining job, which its
    command line gives: a new thread count re-runs nothing (as :data:`EXECUTION_KEYS`)."""
    return {key: value for key, value in config["backbones"][backbone].items() if key != "threads"}


def dataset_spec(config: dict, dataset: str) -> dict:
    """What ``mambapeft data download`` needs (and ``prepare``, see :func:`prepare_spec`): the entry,
    its root, and the tasks experiments use."""
    tasks = sorted({t for exp in config["experiments"].values() if exp["data"] == dataset for t in exp["tasks"]})
    return {**config["data"][dataset], "root": str(data_root(config, dataset)), "tasks": tasks}


def task_entries(domain: str, names, family: str | None = None) -> dict:
    """``{name: entry}`` of ``<domain>/tasks.yaml`` (of its ``family`` section, for language): the entries
    a job reads, carried in its spec so that editing one task's entry re-runs only the jobs that read it."""
    table = domain_file(domain, "tasks")
    entries = table[family] if family else table
    return {name: entries[name] for name in names}


# What preparing a dataset reads of <domain>/tasks.yaml, by data kind: the class counts the stand-ins
# are drawn with and real labels are checked against (the image caches check them again), and what
# locates and parses a real language dataset's eval files. Only these fields go into its spec: its
# manifest is an input of every run of the dataset, so editing a field that only evaluation or the
# tables read (a display name, a metric, the test size the check reports) must not re-run them all.
PREPARED_TASK_FIELDS = {"vtab": ("num_classes",), "commonsense": ("format", "split"), "math": ("answer", "dir")}


def prepare_spec(config: dict, dataset: str) -> dict:
    """:func:`dataset_spec` with the fields of its tasks' entries that ``mambapeft data prepare`` reads:
    the experiments' tasks (vtab), or every task of the kind's family (the check of real language
    data reads each task whose eval file is present)."""
    spec = dataset_spec(config, dataset)
    fields = PREPARED_TASK_FIELDS.get(spec["kind"])
    if fields is None:
        return spec
    entries = (task_entries("vision", spec["tasks"]) if spec["kind"] == "vtab"
               else domain_file("language", "tasks")[spec["kind"]])
    return {**spec, "task_entries": {name: {key: entry[key] for key in fields if key in entry}
                                     for name, entry in entries.items()}}


# data kinds whose runs read a token cache, by its layout (data/token_cache.py): orca_math's training
# texts each followed by eos (rule tokenize_text), yelp_polarity's reviews with their labels (rule tokenize_labelled)
TOKEN_LAYOUTS = {"orca_math": "documents", "yelp_polarity": "labelled"}
SUITE_EVALUATED_KINDS = ("orca_math",)  # runs scored by the lm-eval suite on their merged models, not rule evaluate


def text_tokens(config: dict, dataset: str, backbone: str) -> tuple[Path, Path]:
    """A text dataset tokenized once with a backbone's tokenizer (data/token_cache.py): (.bin, .json written
    last); a labelled cache is ``<backbone>.labelled.{bin,json}``, with :func:`text_labels` beside."""
    folder = resources_dir(config) / "tokens" / dataset
    stem = f"{backbone}.labelled" if TOKEN_LAYOUTS[config["data"][dataset]["kind"]] == "labelled" else backbone
    return folder / f"{stem}.bin", folder / f"{stem}.json"  # not with_suffix: ids like mamba-1.4b have dots


def text_labels(config: dict, dataset: str, backbone: str) -> Path:
    """The (token count, label) of each text of a labelled cache."""
    return resources_dir(config) / "tokens" / dataset / f"{backbone}.labels.bin"


def text_tokenize_spec(config: dict, dataset: str, backbone: str) -> dict:
    """What the tokenization of ``dataset`` with ``backbone``'s tokenizer reads (``mambapeft data tokenize``)."""
    entry, kind = config["backbones"][backbone], config["data"][dataset]["kind"]
    return {"kind": kind, "root": str(data_root(config, dataset)),
            "tokenizer": entry.get("tokenizer") or entry["path"], "layout": TOKEN_LAYOUTS[kind]}


def image_cache(config: dict, dataset: str, task: str, split: str, resolution: int) -> Path:
    """Decoded, resized images of one split (uint8), built once per task and resolution."""
    return resources_dir(config) / "cache" / dataset / task / f"{split}_{resolution}.npz"


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------
def fitting_backbones(domain: str, method: str, backbones: list[str]) -> list[str]:
    """Those of ``backbones`` that ``method`` applies to (its ``backbones:`` families in methods.yaml)."""
    definition = domain_file(domain, "methods")[method]
    return [b for b in backbones if method_check.method_fits(definition, domain, b)]


def methods_for(domain: str, backbone: str) -> dict[str, dict]:
    """The entries of ``<domain>/methods.yaml`` that apply to ``backbone``, in file order."""
    return {m: d for m, d in domain_file(domain, "methods").items() if method_check.method_fits(d, domain, backbone)}


def _misfit(domain: str, method: str, backbones: list[str]) -> str:
    """One line: ``method`` applies to none of ``backbones``, and what does."""
    families = method_check.fitting_families(domain_file(domain, "methods")[method], domain)
    fitting = sorted(methods_for(domain, backbones[0]))
    return (f"method {method!r} is for {'/'.join(families)} backbones ({DOMAINS[domain]}/methods.yaml `backbones`), "
            f"not {', '.join(backbones)}; methods for {backbones[0]}: {', '.join(fitting) or 'none'}")


def method_definition(domain: str, method: str, backbone: str, overrides: dict | None) -> dict:
    """The method's YAML entry with per-backbone ranks and the config's overrides applied:
    ``{member name: {field: value}}`` resizes members, ``{train: {...}}`` overrides the method's recipe."""
    methods = domain_file(domain, "methods")
    if method not in methods:
        raise ConfigError(f"Unknown method {method!r}; valid ids in {DOMAINS[domain]}/methods.yaml: "
                          f"{', '.join(methods)}")
    definition = methods[method]
    if not method_check.method_fits(definition, domain, backbone):
        raise ConfigError(_misfit(domain, method, [backbone]))
    members = definition.get("peft", [])
    rank = definition.get("rank_by_backbone", {}).get(backbone)
    for member in members:
        if rank is not None and member["family"] == "lora":
            member["rank"] = rank
    overrides = dict(overrides or {})
    train = deep_merge(definition.get("train", {}), overrides.pop("train", {}))
    for key, fields in overrides.items():
        chosen = [m for m in members if m.get("name", m["family"]) == key]
        if not chosen:
            names = [m.get("name", m["family"]) for m in members]
            raise ConfigError(f"method_overrides/{method}/{key}: no member named {key!r}; members: {names}")
        for member in chosen:
            member.update(fields)
    return {"id": method, "label": definition.get("label", method), "init": definition.get("init", "pretrained"),
            "peft": members, "train": train}


def resolve_run(config: dict, run: Run) -> dict:
    """Everything a training job needs, as one JSON-able dict (see module docstring)."""
    if run.experiment not in config["experiments"]:
        raise ConfigError(f"Unknown experiment {run.experiment!r}; configured: {', '.join(config['experiments'])}")
    exp = config["experiments"][run.experiment]
    method = method_definition(exp["domain"], run.method, run.backbone, exp.get("method_overrides", {}).get(run.method))
    return resolve_method_run(config, run, method)


def resolve_method_run(config: dict, run: Run, method: dict, train_overrides: dict | None = None) -> dict:
    """:func:`resolve_run` for a method given as a definition (``method_definition``'s shape) rather
    than an id of methods.yaml: the hybrid search's trials. ``train_overrides`` go between the
    experiment's and the method's recipe keys."""
    exp = config["experiments"][run.experiment]
    domain = exp["domain"]
    method = copy.deepcopy(method)
    recipe = deep_merge(deep_merge(domain_file(domain, "recipe"), exp.get("train", {})), train_overrides or {})
    train = deep_merge(recipe, method.pop("train"))
    dataset = exp["data"]
    spec = {
        "run": {"experiment": run.experiment, "backbone": run.backbone, "task": run.task,
                "method": run.method, "seed": run.seed},
        "domain": domain,
        "backbone": {"id": run.backbone, **backbone_entry(config, run.backbone),
                     "path": str(backbone_path(config, run.backbone)),
                     "manifest": str(backbone_manifest(config, run.backbone))},
        "data": {"dataset": dataset, **config["data"][dataset], "root": str(data_root(config, dataset)),
                 "manifest": str(data_manifest(config, dataset)), "task": run.task,
                 "eval_tasks": list(exp.get("eval_tasks", [run.task]))},
        "method": method,
        "train": train,
        "runtime": {**runtime_settings(config, config.get("threads", 1)),
                    "cuda_graphs": bool(config.get("cuda_graphs", False))},
        "output_dir": str(run.directory(results_dir(config))),
    }
    kind = config["data"][dataset]["kind"]
    if kind in TOKEN_LAYOUTS:
        spec["data"]["tokens"] = str(text_tokens(config, dataset, run.backbone)[1])
    if kind in EVAL_TASK_KINDS:
        spec["data"]["task_entries"] = task_entries("language", spec["data"]["eval_tasks"], family=kind)
    if domain == "vision":
        resolution = image_size(config, run.backbone)
        # the head's size, read from here (build.py), so that a task's class count re-runs that task's runs only
        spec["data"]["num_classes"] = int(task_entries("vision", [run.task])[run.task]["num_classes"])
        spec["data"]["cache"] = {split: str(image_cache(config, dataset, run.task, split, resolution))
                                 for split in (train["train_split"], train["eval_split"])}
    return spec


# Keys only evaluation reads: the training job's spec goes without them, so that changing an eval
# task or an eval batch size re-runs the evaluate jobs and never a training job.
EVAL_ONLY_KEYS = (("train", "eval_split"), ("train", "eval_batch_size"), ("train", "eval"), ("data", "eval_tasks"),
                  ("data", "task_entries"))

# Runtime settings of how a job runs and logs, never of what it computes. The workflow gives them on
# the job's command line (`--threads`, `--wandb`), not in its params spec: Snakemake re-runs a job
# whose params change, and a new thread count or wandb mode must re-run nothing. The job puts them
# back into its spec, so that its records (`config` of train.json) show them.
EXECUTION_KEYS = ("threads", "wandb")


def without_execution(spec: dict) -> dict:
    """``spec`` less :data:`EXECUTION_KEYS`: what the job's result depends on, so what identifies it."""
    return {**spec, "runtime": {key: value for key, value in spec["runtime"].items() if key not in EXECUTION_KEYS}}


def wandb_settings(config: dict) -> dict:
    return config.get("wandb", {"mode": "disabled"})


def runtime_settings(config: dict, threads: int) -> dict:
    """A job's ``runtime``: where it runs and on which scan kernels, and (:data:`EXECUTION_KEYS`) its
    thread count and wandb logging."""
    return {"device": config.get("device", "auto"), "scan_backend": config.get("scan_backend", "auto"),
            "allow_torch_fallback": bool(config.get("allow_torch_fallback", False)), "threads": int(threads),
            "wandb": wandb_settings(config)}


def training_spec(spec: dict) -> dict:
    """The run spec less what only evaluation reads (:data:`EVAL_ONLY_KEYS`, the eval split's cache)."""
    trimmed = copy.deepcopy(spec)
    for section, key in EVAL_ONLY_KEYS:
        trimmed[section].pop(key, None)
    if "cache" in trimmed["data"]:
        trimmed["data"]["cache"] = {trimmed["train"]["train_split"]: spec["data"]["cache"][spec["train"]["train_split"]]}
    return trimmed


def image_size(config: dict, backbone: str) -> int:
    """Input resolution of a vision backbone (config key ``image_size``, default 224 as Vim)."""
    return int(config["backbones"][backbone].get("image_size", 224))


# ------------------------------------------------------------------------------------------------
# the dt_init study: Mamba-2 LMs pretrained from scratch per dt initialisation and seed (config `dt_init`)
# ------------------------------------------------------------------------------------------------
DT_INIT = "dt_init"
# the registry of models/dt_init.py (DT_INITS), torch-free as BACKBONE_IDS and kept equal to it by the same test
DT_INIT_STRATEGIES = ("uniform", "linear_decay", "linear_decay_reverse")
# a run directory's files: the pretraining job writes model/ then its record; the perplexity job its record
PRETRAIN_MODEL, PRETRAIN_RECORD, PERPLEXITY_RECORD = "model", "pretrain.json", "perplexity.json"
# how each corpus is tokenized (data/token_cache.py): training documents eos-separated, held-out text joined
TEXT_LAYOUTS = {"train": "documents", "test": "joined"}


@dataclass(frozen=True)
class InitRun:
    """One cell of the dt_init grid: a dt initialisation (models/dt_init.py) and a seed."""

    init: str
    seed: int

    def directory(self, results_dir: str | Path) -> Path:
        return Path(results_dir) / "runs" / DT_INIT / self.init / f"seed{self.seed}"


def dt_init_grid(config: dict) -> list[InitRun]:
    """Every (init, seed) of the study; empty when the config has no `dt_init`."""
    study = config.get(DT_INIT)
    return [InitRun(init, int(seed)) for init in study["inits"] for seed in study["seeds"]] if study else []


def _check_dt_init(study: dict) -> None:
    unknown = [name for name in study["inits"] if name not in DT_INIT_STRATEGIES]
    if unknown:
        raise ConfigError(f"dt_init/inits: {unknown} are not dt initialisations of src/mambapeft/models/dt_init.py; "
                          f"valid: {', '.join(DT_INIT_STRATEGIES)}")
    _check_registered("dt_init/model/variant", study["model"]["variant"], "language")
    train, perplexity = study.get("train", {}), study.get("perplexity", {})
    if perplexity.get("stride", 0) > perplexity.get("window", 0):
        raise ConfigError(f"dt_init/perplexity: stride {perplexity['stride']} exceeds window {perplexity['window']}; "
                          "tokens between windows would never be scored: use a stride <= window")
    micro = train.get("micro_batch_size")
    if micro and train.get("batch_size", micro) % micro:
        raise ConfigError(f"dt_init/train: batch_size {train['batch_size']} is not a multiple of micro_batch_size "
                          f"{micro}; pick a divisor")


def dt_init_token_cache(config: dict, split: str) -> tuple[Path, Path]:
    """The tokenized ``train`` or ``test`` corpus: (token array .bin, its metadata .json, written last)."""
    base = resources_dir(config) / "tokens" / DT_INIT / split
    return base.with_suffix(".bin"), base.with_suffix(".json")


def dt_init_standin_manifest(config: dict) -> Path | None:
    """Written last by the stand-in rule, beside the offline corpora and tokenizer it writes (config
    `dt_init/standin`); None when the study reads real copies."""
    return resources_dir(config) / "data" / DT_INIT / "manifest.json" if config[DT_INIT].get("standin") else None


def dt_init_tokenize_spec(config: dict, split: str) -> dict:
    study = config[DT_INIT]
    return {"corpus": study[f"{split}_text"], "tokenizer": study["tokenizer"], "layout": TEXT_LAYOUTS[split]}


def dt_init_spec(config: dict, run: InitRun) -> dict:
    """Everything the pretraining and perplexity jobs of ``run`` read, as one JSON-able dict."""
    study = config[DT_INIT]
    return {
        "run": {"experiment": DT_INIT, "backbone": study["model"]["variant"], "task": "pretrain",
                "method": run.init, "seed": run.seed},
        "model": study["model"],
        "dt_init": run.init,
        "tokens": {split: str(dt_init_token_cache(config, split)[1]) for split in TEXT_LAYOUTS},
        "train": study["train"],
        "perplexity": study["perplexity"],
        "runtime": runtime_settings(config, study.get("threads", config.get("threads", 1))),
        "output_dir": str(run.directory(results_dir(config))),
    }


def dt_init_training_spec(spec: dict) -> dict:
    """The spec less what only the perplexity job reads: changing the evaluation never re-trains."""
    trimmed = copy.deepcopy(spec)
    trimmed.pop("perplexity")
    trimmed["tokens"].pop("test")
    return trimmed
