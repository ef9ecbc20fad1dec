# Shared logic, no rules: config validation, the run grid, and every input/params function.
# Kept cheap (no torch import): every cluster job parses this file again.
import json
import sys

from snakemake.utils import validate

from mambapeft import runspec


validate(config, schema="../schemas/config.schema.yaml")


def _check_references(config):
    """Methods, backbones and datasets exist, and every method member's keys are valid."""
    try:
        runspec.validate_config(config)
    except runspec.ConfigError as err:
        sys.exit(f"Invalid configuration: {err}")  # the message is the fix; a stack trace would bury it


_check_references(config)

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


def training_spec(wildcards):
    """What the training job reads (JSON), less the evaluation-only keys: a Snakemake params
    value, so a change re-trains exactly this run, and an evaluation change does not."""
    return json.dumps(runspec.training_spec(runspec.resolve_run(config, _run(wildcards))), sort_keys=True)


def eval_spec(wildcards):
    """The fully resolved run (JSON) for the evaluate job: any change re-evaluates this run."""
    return json.dumps(runspec.resolve_run(config, _run(wildcards)), sort_keys=True)


def _spec_inputs(spec):
    inputs = {"backbone": spec["backbone"]["manifest"], "data": spec["data"]["manifest"]}
    inputs.update({f"cache_{split}": path for split, path in spec["data"].get("cache", {}).items()})
    return inputs


def train_inputs(wildcards):
    return _spec_inputs(runspec.training_spec(runspec.resolve_run(config, _run(wildcards))))


def eval_inputs(wildcards):
    spec = runspec.resolve_run(config, _run(wildcards))
    return {**_spec_inputs(spec), "train_record": f"{spec['output_dir']}/{runspec.TRAIN_RECORD}"}


def download_record(wildcards):
    """A dataset with a `download:` mapping is fetched by its own rule before it is checked."""
    if "download" not in config["data"][wildcards.dataset]:
        return []
    return f"{RESOURCES}/data/{wildcards.dataset}/download.json"


def backbone_download_record(wildcards):
    """A backbone with a `download:` mapping is fetched from the Hub by its own job before it is checked."""
    if "download" not in config["backbones"][wildcards.backbone]:
        return []
    return f"{RESOURCES}/backbones/{wildcards.backbone}/download.json"


def backbone_download_spec(wildcards):
    """What the download reads, and only that: editing another key of the backbone fetches nothing again."""
    entry = config["backbones"][wildcards.backbone]
    return json.dumps({key: entry[key] for key in ("path", "tokenizer", "download") if key in entry}, sort_keys=True)


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
    """A resource of an experiment's training and evaluate jobs (config experiments/<id>/resources)."""
    return lambda wildcards: config["experiments"][wildcards.experiment].get("resources", {}).get(key, default)


def backbone_threads(wildcards):
    return int(config["backbones"][wildcards.backbone].get("threads", 1))


def params_table_spec():
    return json.dumps(config.get("params_table", {}), sort_keys=True)


def _domain_yaml(domain, name):
    return str(runspec.repo_root() / runspec.DOMAINS[domain] / f"{name}.yaml")


def table_definitions(wildcards):
    """The YAML files a table is made from besides the metrics; editing one rebuilds that table."""
    domain = config["experiments"][wildcards.experiment]["domain"]
    return [_domain_yaml(domain, "methods"), _domain_yaml(domain, "paper"), _domain_yaml(domain, "tasks")]


def params_table_definitions():
    domains = sorted(config.get("params_table", {}))
    return [_domain_yaml(d, name) for d in domains for name in ("methods", "paper")]


# The dt_init study (config `dt_init`): stand-in corpora when configured, each corpus tokenized once,
# one pretraining and one perplexity job per (init, seed), then its table and figures.
DT_INIT_RUNS = runspec.dt_init_grid(config)
DT_INIT_RUN_DIR = f"{RESULTS}/runs/{runspec.DT_INIT}/{{init}}/seed{{seed}}"
DT_INIT_TOKENS = f"{RESOURCES}/tokens/{runspec.DT_INIT}/{{split}}"
DT_INIT_INITS = _alternatives(r.init for r in DT_INIT_RUNS)


def _init_run(wildcards):
    return runspec.InitRun(wildcards.init, int(wildcards.seed))


def _dt_init_setting(key, default):
    return config.get(runspec.DT_INIT, {}).get(key, default)


def dt_init_standin_spec(wildcards):
    return json.dumps(config[runspec.DT_INIT]["standin"], sort_keys=True)


def dt_init_standin_manifest(wildcards):
    """The stand-in's manifest when the study writes one; real copies are checked by the tokenization."""
    manifest = runspec.dt_init_standin_manifest(config)
    return [str(manifest)] if manifest else []


def dt_init_tokenize_spec(wildcards):
    return json.dumps(runspec.dt_init_tokenize_spec(config, wildcards.split), sort_keys=True)


def dt_init_tokens(split):
    tokens, meta = runspec.dt_init_token_cache(config, split)
    return {f"{split}_tokens": str(tokens), f"{split}_meta": str(meta)}


def dt_init_pretrain_spec(wildcards):
    """What the pretraining job reads, less the perplexity settings: changing those never re-trains."""
    return json.dumps(runspec.dt_init_training_spec(runspec.dt_init_spec(config, _init_run(wildcards))), sort_keys=True)


def dt_init_perplexity_spec(wildcards):
    return json.dumps(runspec.dt_init_spec(config, _init_run(wildcards)), sort_keys=True)


def dt_init_records(name):
    """A record (pretrain.json or perplexity.json) of every run, in grid order."""
    return [str(run.directory(RESULTS) / name) for run in DT_INIT_RUNS]


def dt_init_resource(key, default):
    """A resource of the study's pretraining and perplexity jobs (config dt_init/resources)."""
    return _dt_init_setting("resources", {}).get(key, default)


def dt_init_threads():
    return int(_dt_init_setting("threads", config.get("threads", 1)))


def dt_init_outputs():
    if runspec.DT_INIT not in config:
        return []
    return [f"{RESULTS}/tables/{runspec.DT_INIT}.csv", f"{RESULTS}/tables/{runspec.DT_INIT}.md",
            f"{RESULTS}/figures/{runspec.DT_INIT}_loss.png", f"{RESULTS}/figures/{runspec.DT_INIT}_dt.png"]


# The length-generalisation study (config `length_generalisation`): its experiments are ordinary
# runs on synthetic data, collected into one table and one figure instead of the generic ones.
LENGTH_STUDY = "length_generalisation"


def length_study_metrics():
    return [str(r.directory(RESULTS) / "metrics.json") for e in runspec.length_study_experiments(config)
            for r in runspec.grid(config, e)]


def length_study_readings():
    return _domain_yaml("language", LENGTH_STUDY)


def length_study_outputs():
    """{csv, md, figure} of the study, or nothing when the config has none."""
    if not runspec.length_study_experiments(config):
        return {}
    return {"csv": f"{RESULTS}/tables/{LENGTH_STUDY}.csv", "md": f"{RESULTS}/tables/{LENGTH_STUDY}.md",
            "figure": f"{RESULTS}/figures/{LENGTH_STUDY}.png"}


def _length_study_in_default_target():
    return bool(config.get(LENGTH_STUDY, {}).get("default_target", False))


def final_outputs():
    outputs = dt_init_outputs()
    if _length_study_in_default_target():
        outputs += list(length_study_outputs().values())
    for experiment in config["experiments"]:
        if experiment in runspec.length_study_experiments(config):
            continue  # the study's own table and figure show them
        outputs += [f"{RESULTS}/tables/{experiment}.md", f"{RESULTS}/tables/{experiment}.csv",
                    f"{RESULTS}/figures/{experiment}_params_vs_accuracy.png",
                    f"{RESULTS}/figures/{experiment}_per_task.png"]
    if config.get("params_table"):
        outputs.append(f"{RESULTS}/tables/params.md")
    return outputs
