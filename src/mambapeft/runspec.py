"""Experiment grid and fully resolved run configurations (torch-free: the Snakefile imports it).

A run is (experiment, backbone, task, method, seed). :func:`resolve_run` merges, in order:
the domain recipe (``vision/recipe.yaml`` or ``language/recipe.yaml``), the experiment's ``train``
overrides in the config, and the method's own ``train`` overrides; it attaches the method's PEFT
members (with the config's ``method_overrides``), the data and backbone locations, and the
runtime settings. The result is one JSON-able dict: what ``metrics.json`` records as ``config``
and what a change of which makes Snakemake re-run exactly the affected runs.
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


def _schema_path() -> Path:
    return repo_root() / "workflow" / "schemas" / "config.schema.yaml"


def _fill_schema_defaults(config: dict) -> None:
    """The schema's defaults, filled in as the workflow's own validation does, so that a run resolved
    here (``train --dry-run``) is the run a pipeline job gets."""
    from snakemake.utils import validate

    validate(config, str(_schema_path()), set_default=True)


def validate_config(config: dict) -> None:
    import jsonschema

    schema = _read_yaml(str(_schema_path()))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in errors[:10]]
        raise ConfigError("Invalid config (see config/config.yaml for every key's meaning):\n" + "\n".join(lines))
    for exp_id, exp in config["experiments"].items():
        _check_experiment(config, exp_id, exp)
    _check_length_study(config)
    if DT_INIT in config:
        _check_dt_init(config[DT_INIT])


def check_methods_file(domain: str) -> None:
    """Every entry of ``<domain>/methods.yaml`` against the PEFT families' schema (torch-free)."""
    where = f"{DOMAINS[domain]}/methods.yaml"
    try:
        for method, definition in domain_file(domain, "methods").items():
            method_check.check_method(method, definition, where, _peft_schema_path())
    except method_check.MethodError as err:
        raise ConfigError(str(err)) from None


def _check_overrides(exp_id: str, exp: dict) -> None:
    """Each overridden method's members, resolved for every backbone, against the schema."""
    for method, overrides in exp.get("method_overrides", {}).items():
        where = f"experiments/{exp_id}/method_overrides/{method}"
        for backbone in exp["backbones"]:
            members = method_definition(exp["domain"], method, backbone, overrides)["peft"]
            try:
                for i, member in enumerate(members):
                    method_check.check_member(member, f"{where} (member {i})", _peft_schema_path())
            except method_check.MethodError as err:
                raise ConfigError(str(err)) from None


def _check_length_study(config: dict) -> None:
    """The length-generalisation study collects experiments on synthetic data."""
    for exp_id in length_study_experiments(config):
        exp = config["experiments"].get(exp_id)
        if exp is None:
            raise ConfigError(f"length_generalisation/experiments: {exp_id!r} is not an experiment of this config")
        if config["data"][exp["data"]]["kind"] != "synthetic":
            raise ConfigError(f"length_generalisation/experiments: {exp_id!r} trains on data/{exp['data']}, "
                              "not on a data entry of kind synthetic")


def length_study_experiments(config: dict) -> list[str]:
    """Experiments of the length-generalisation study: its own table and figure, not the generic ones."""
    return list(config.get("length_generalisation", {}).get("experiments", []))


def _peft_schema_path() -> Path:
    return repo_root() / "workflow" / "schemas" / "peft_members.schema.json"


def _check_experiment(config: dict, exp_id: str, exp: dict) -> None:
    check_methods_file(exp["domain"])
    methods = domain_file(exp["domain"], "methods")
    unknown = [m for m in exp["methods"] if m not in methods]
    if unknown:
        raise ConfigError(f"experiments/{exp_id}/methods: unknown method(s) {unknown}; valid ids in "
                          f"{DOMAINS[exp['domain']]}/methods.yaml: {', '.join(methods)}")
    for backbone in exp["backbones"]:
        if backbone not in config["backbones"]:
            raise ConfigError(f"experiments/{exp_id}/backbones: {backbone!r} has no entry under `backbones:`")
    if exp["data"] not in config["data"]:
        raise ConfigError(f"experiments/{exp_id}/data: {exp['data']!r} has no entry under `data:`")
    declared = config["data"][exp["data"]].get("train_sets")
    undeclared = [t for t in exp["tasks"] if declared is not None and t not in declared]
    if undeclared:
        raise ConfigError(f"experiments/{exp_id}/tasks: {undeclared} are not training sets of data/{exp['data']}; "
                          f"declared under its train_sets: {', '.join(declared)}")
    for method in exp.get("method_overrides", {}):
        if method not in exp["methods"]:
            raise ConfigError(f"experiments/{exp_id}/method_overrides: {method!r} is not in this experiment's methods")
    _check_overrides(exp_id, exp)


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


def _excluded(run: Run, rules: list[dict]) -> bool:
    return any(all(getattr(run, key) == value for key, value in rule.items()) for rule in rules)


def grid(config: dict, experiment: str | None = None) -> list[Run]:
    """Every run of one experiment (or of all), minus the experiment's ``exclude`` cells."""
    experiments = config["experiments"] if experiment is None else {experiment: config["experiments"][experiment]}
    runs = []
    for e, exp in experiments.items():
        cells = (Run(e, b, t, m, int(s)) for b in exp["backbones"] for t in exp["tasks"]
                 for m in exp["methods"] for s in exp["seeds"])
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


def backbone_manifest(config: dict, backbone: str) -> Path:
    """Written once the backbone checkpoint exists (pretrained here, or official weights checked)."""
    return resources_dir(config) / "backbones" / backbone / "checkpoint.json"


def backbone_path(config: dict, backbone: str) -> Path:
    return Path(config["backbones"][backbone]["path"])


def dataset_spec(config: dict, dataset: str) -> dict:
    """What ``mambapeft data prepare`` needs: the entry, its root, and the tasks experiments use."""
    tasks = sorted({t for exp in config["experiments"].values() if exp["data"] == dataset for t in exp["tasks"]})
    return {**config["data"][dataset], "root": str(data_root(config, dataset)), "tasks": tasks}


def image_cache(config: dict, dataset: str, task: str, split: str, resolution: int) -> Path:
    """Decoded, resized images of one split (uint8), built once per task and resolution."""
    return resources_dir(config) / "cache" / dataset / task / f"{split}_{resolution}.npz"


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------
def method_definition(domain: str, method: str, backbone: str, overrides: dict | None) -> dict:
    """The method's YAML entry with per-backbone ranks and the config's overrides applied:
    ``{member name: {field: value}}`` resizes members, ``{train: {...}}`` overrides the method's recipe."""
    methods = domain_file(domain, "methods")
    if method not in methods:
        raise ConfigError(f"Unknown method {method!r}; valid ids in {DOMAINS[domain]}/methods.yaml: "
                          f"{', '.join(methods)}")
    definition = methods[method]
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
    domain = exp["domain"]
    method = method_definition(domain, run.method, run.backbone, exp.get("method_overrides", {}).get(run.method))
    train = deep_merge(deep_merge(domain_file(domain, "recipe"), exp.get("train", {})), method.pop("train"))
    dataset = exp["data"]
    spec = {
        "run": {"experiment": run.experiment, "backbone": run.backbone, "task": run.task,
                "method": run.method, "seed": run.seed},
        "domain": domain,
        "backbone": {"id": run.backbone, **config["backbones"][run.backbone],
                     "path": str(backbone_path(config, run.backbone)),
                     "manifest": str(backbone_manifest(config, run.backbone))},
        "data": {"dataset": dataset, **config["data"][dataset], "root": str(data_root(config, dataset)),
                 "manifest": str(data_manifest(config, dataset)), "task": run.task,
                 "eval_tasks": list(exp.get("eval_tasks", [run.task]))},
        "method": method,
        "train": train,
        "runtime": {"device": config.get("device", "auto"), "scan_backend": config.get("scan_backend", "auto"),
                    "allow_torch_fallback": bool(config.get("allow_torch_fallback", False)),
                    "cuda_graphs": bool(config.get("cuda_graphs", False)),
                    "threads": int(config.get("threads", 1)), "wandb": config.get("wandb", {"mode": "disabled"})},
        "output_dir": str(run.directory(results_dir(config))),
    }
    if domain == "vision":
        resolution = image_size(config, run.backbone)
        spec["data"]["cache"] = {split: str(image_cache(config, dataset, run.task, split, resolution))
                                 for split in (train["train_split"], train["eval_split"])}
    return spec


# Keys only evaluation reads: the training job's spec goes without them, so that changing an eval
# task or an eval batch size re-runs the evaluate jobs and never a training job.
EVAL_ONLY_KEYS = (("train", "eval_split"), ("train", "eval_batch_size"), ("train", "eval"), ("data", "eval_tasks"))


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
        "runtime": {"device": config.get("device", "auto"), "scan_backend": config.get("scan_backend", "auto"),
                    "allow_torch_fallback": bool(config.get("allow_torch_fallback", False)),
                    "threads": int(study.get("threads", config.get("threads", 1))),
                    "wandb": config.get("wandb", {"mode": "disabled"})},
        "output_dir": str(run.directory(results_dir(config))),
    }


def dt_init_training_spec(spec: dict) -> dict:
    """The spec less what only the perplexity job reads: changing the evaluation never re-trains."""
    trimmed = copy.deepcopy(spec)
    trimmed.pop("perplexity")
    trimmed["tokens"].pop("test")
    return trimmed
