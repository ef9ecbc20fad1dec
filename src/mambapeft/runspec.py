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
    _check_searches(config)
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
    check_methods_file(exp["domain"])
    methods = domain_file(exp["domain"], "methods")
    unknown = [m for m in exp["methods"] if m not in methods]
    if unknown:
        raise ConfigError(f"experiments/{exp_id}/methods: unknown method(s) {unknown}; valid ids in "
                          f"{DOMAINS[exp['domain']]}/methods.yaml: {', '.join(methods)}")
    for method in exp["methods"]:
        if not fitting_backbones(exp["domain"], method, exp["backbones"]):
            raise ConfigError(f"experiments/{exp_id}/methods: {_misfit(exp['domain'], method, exp['backbones'])}")
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
    if exp.get("merge"):
        _check_mergeable(exp_id, exp)


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


def dataset_spec(config: dict, dataset: str) -> dict:
    """What ``mambapeft data prepare`` needs: the entry, its root, and the tasks experiments use."""
    tasks = sorted({t for exp in config["experiments"].values() if exp["data"] == dataset for t in exp["tasks"]})
    return {**config["data"][dataset], "root": str(data_root(config, dataset)), "tasks": tasks}


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
    if config["data"][dataset]["kind"] in TOKEN_LAYOUTS:
        spec["data"]["tokens"] = str(text_tokens(config, dataset, run.backbone)[1])
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
