# Shared logic, no rules: config validation, the run grid, and every input/params function.
# Kept cheap (no torch import): every cluster job parses this file again.
import json

from snakemake.utils import validate

from mambapeft import runspec


validate(config, schema="../schemas/config.schema.yaml")
runspec.validate_config(config)  # cross-references: methods, backbones and datasets exist

RESULTS = str(runspec.results_dir(config))
RESOURCES = str(runspec.resources_dir(config))
RUNS = runspec.grid(config)
RUN_DIR = f"{RESULTS}/runs/{{experiment}}/{{backbone}}/{{task}}/{{method}}/seed{{seed}}"


def _alternatives(values):
    return "|".join(sorted({str(v).replace(".", r"\.") for v in values}))


wildcard_constraints:
    experiment=_alternatives(config["experiments"]),
    backbone=_alternatives(config["backbones"]),
    dataset=_alternatives(config["data"]),
    method=_alternatives(r.method for r in RUNS),
    task=_alternatives(r.task for r in RUNS),
    seed=r"\d+",


def _run(wildcards):
    return runspec.Run(wildcards.experiment, wildcards.backbone, wildcards.task, wildcards.method,
                       int(wildcards.seed))


def run_spec(wildcards):
    """The fully resolved run (JSON): a Snakemake params value, so any change re-runs this run."""
    return json.dumps(runspec.resolve_run(config, _run(wildcards)), sort_keys=True)


def train_inputs(wildcards):
    spec = runspec.resolve_run(config, _run(wildcards))
    inputs = {"backbone": spec["backbone"]["manifest"], "data": spec["data"]["manifest"]}
    inputs.update({f"cache_{split}": path for split, path in spec["data"].get("cache", {}).items()})
    return inputs


def download_record(wildcards):
    """A dataset with a `download:` mapping is fetched by its own rule before it is checked."""
    if "download" not in config["data"][wildcards.dataset]:
        return []
    return f"{RESOURCES}/data/{wildcards.dataset}/download.json"


def cache_source(wildcards):
    return {"manifest": str(runspec.data_manifest(config, wildcards.dataset))}


def data_root(wildcards):
    return str(runspec.data_root(config, wildcards.dataset))


def dataset_spec(wildcards):
    return json.dumps(runspec.dataset_spec(config, wildcards.dataset), sort_keys=True)


def backbone_spec(wildcards):
    return json.dumps(config["backbones"][wildcards.backbone], sort_keys=True)


def experiment_metrics(wildcards):
    return [str(r.directory(RESULTS) / "metrics.json") for r in runspec.grid(config, wildcards.experiment)]


def train_resources(key, default):
    """A resource of an experiment's training jobs (config experiments/<id>/resources)."""
    return lambda wildcards: config["experiments"][wildcards.experiment].get("resources", {}).get(key, default)


def params_table_spec():
    return json.dumps(config.get("params_table", {}), sort_keys=True)


def final_outputs():
    outputs = []
    for experiment in config["experiments"]:
        outputs += [f"{RESULTS}/tables/{experiment}.md", f"{RESULTS}/tables/{experiment}.csv",
                    f"{RESULTS}/figures/{experiment}_params_vs_accuracy.png",
                    f"{RESULTS}/figures/{experiment}_per_task.png"]
    if config.get("params_table"):
        outputs.append(f"{RESULTS}/tables/params.md")
    return outputs
