# Shared logic, no rules: config validation, the run grid, and every input/params function.
# Kept cheap (no torch import): every cluster job parses this file again.
import json
import sys

from snakemake.utils import validate

from mambapeft import method_check, runspec
from mambapeft.search import plan as search_plan
from mambapeft.search import space as search_space


def _check_config(config):
    """The schema, then methods, backbones, datasets, tasks and recipe keys: one line naming the key."""
    try:
        runspec.validate_config(config)
    except runspec.ConfigError as err:
        sys.exit(f"Invalid configuration: {err}")  # the message is the fix; a stack trace would bury it


_check_config(config)
# fills in the schema's defaults; after the check above, whose one line names the key at fault
# (on a config that fails, Snakemake's message prints the whole schema and config)
validate(config, schema="../schemas/config.schema.yaml")

RESULTS = str(runspec.results_dir(config))
RESOURCES = str(runspec.resources_dir(config))
RUNS = runspec.grid(config)
RUN_DIR = f"{RESULTS}/runs/{{experiment}}/{{backbone}}/{{task}}/{{method}}/seed{{seed}}"

# How jobs share GPUs and log, never what they compute: rules give them as `resources` (with the thread
# count as `threads`), which no rerun trigger compares, and leave them out of their params spec
# (runspec.EXECUTION_KEYS), so changing one re-runs nothing.
GPU_SLOTS = config.get("gpu_slots", 1)
WANDB = json.dumps(runspec.wandb_settings(config), sort_keys=True)


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


def _job_spec(spec):
    """A job's spec as its params value: JSON, less the execution settings its command line gives."""
    return json.dumps(runspec.without_execution(spec), sort_keys=True)


def training_spec(wildcards):
    """What the training job reads (JSON), less the evaluation-only keys: a Snakemake params
    value, so a change re-trains exactly this run, and an evaluation change does not."""
    return _job_spec(runspec.training_spec(runspec.resolve_run(config, _run(wildcards))))


def eval_spec(wildcards):
    """The fully resolved run (JSON) for the evaluate job: any change re-evaluates this run."""
    return _job_spec(runspec.resolve_run(config, _run(wildcards)))


def _spec_inputs(spec):
    inputs = {"backbone": spec["backbone"]["manifest"], "data": spec["data"]["manifest"]}
    inputs.update({f"cache_{split}": path for split, path in spec["data"].get("cache", {}).items()})
    if "tokens" in spec["data"]:  # a text dataset tokenized once per backbone tokenizer (rule tokenize_text)
        inputs["tokens"] = spec["data"]["tokens"]
    return inputs


def train_inputs(wildcards):
    return _spec_inputs(runspec.training_spec(runspec.resolve_run(config, _run(wildcards))))


def eval_inputs(wildcards):
    spec = runspec.resolve_run(config, _run(wildcards))
    return {**_spec_inputs(spec), "train_record": f"{spec['output_dir']}/{runspec.TRAIN_RECORD}"}


def download_record(wildcards):
    """A dataset with a `download:` mapping is fetched by its own rule before it is checked, and so
    is a `hub_datasets` entry whose target holds (or lies in) the data root."""
    records = runspec.hub_downloads_for(config, runspec.data_root(config, wildcards.dataset))
    if "download" in config["data"][wildcards.dataset]:
        records.append(f"{RESOURCES}/data/{wildcards.dataset}/download.json")
    return records


def hub_dataset_spec(wildcards):
    return json.dumps(config["hub_datasets"][wildcards.hub_dataset], sort_keys=True)


def hub_dataset_records():
    """Every entry of the `hub_datasets` table: the default target fetches them all."""
    return [str(runspec.hub_dataset_record(config, name)) for name in config.get("hub_datasets", {})]


def hub_dataset_names():
    return _alternatives(config.get("hub_datasets", {})) or "(?!)"  # no entry: the download never matches


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


def prepare_spec(wildcards):
    return json.dumps(runspec.prepare_spec(config, wildcards.dataset), sort_keys=True)


def backbone_spec(wildcards):
    return json.dumps(runspec.backbone_entry(config, wildcards.backbone), sort_keys=True)


def experiment_metrics(wildcards):
    """Its runs' metrics.json, and the final runs of the searches on it (their row of its table)."""
    return ([str(r.directory(RESULTS) / "metrics.json") for r in runspec.grid(config, wildcards.experiment)]
            + search_plan.final_metrics(config, wildcards.experiment))


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


def vim_vs_vit_definitions():
    return [_domain_yaml("vision", name) for name in ("methods", "paper", "paper_plot")]


def vim_vs_vit_outputs():
    """The Vim-vs-ViT figure of every vision experiment with both a Vim and a ViT backbone."""
    outputs = []
    for experiment, exp in config["experiments"].items():
        families = {method_check.backbone_family(b) for b in exp["backbones"]}
        if exp["domain"] == "vision" and {"vim", "vit"} <= families:
            outputs.append(f"{RESULTS}/figures/{experiment}_vim_vs_vit.png")
    return outputs


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


def dt_init_corpus_downloads(wildcards):
    """The `hub_datasets` downloads of the corpus this tokenization reads (OpenWebText, WikiText-2)."""
    return runspec.hub_downloads_for(config, config[runspec.DT_INIT][f"{wildcards.split}_text"]["path"])


def dt_init_tokenize_spec(wildcards):
    return json.dumps(runspec.dt_init_tokenize_spec(config, wildcards.split), sort_keys=True)


def dt_init_tokens(split):
    tokens, meta = runspec.dt_init_token_cache(config, split)
    return {f"{split}_tokens": str(tokens), f"{split}_meta": str(meta)}


def dt_init_pretrain_spec(wildcards):
    """What the pretraining job reads, less the perplexity settings: changing those never re-trains."""
    return _job_spec(runspec.dt_init_training_spec(runspec.dt_init_spec(config, _init_run(wildcards))))


def dt_init_perplexity_spec(wildcards):
    return _job_spec(runspec.dt_init_spec(config, _init_run(wildcards)))


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


def length_study_definitions():
    """language/methods.yaml: the table's row order."""
    return [_domain_yaml("language", "methods")]


def length_study_outputs():
    """{csv, md, figure} of the study, or nothing when the config has none."""
    if not runspec.length_study_experiments(config):
        return {}
    return {"csv": f"{RESULTS}/tables/{LENGTH_STUDY}.csv", "md": f"{RESULTS}/tables/{LENGTH_STUDY}.md",
            "figure": f"{RESULTS}/figures/{LENGTH_STUDY}.png"}


def _in_default_target(study):
    """Whether a study with its own target (config `<study>.default_target`) is built by `snakemake -c all` too."""
    return bool(config.get(study, {}).get("default_target", False))


# The hybrid search (config `search`, search.smk). Per search and step, the checkpoint search_ask tells
# Optuna the previous batch's scores and asks for the next batch; each trial trains and evaluates on
# every search task with the ordinary train/evaluate commands, on a spec built from the batch file
# (read once the checkpoint has run); search_result tells the last batch and names the step's winner,
# which the next step starts from and the final runs (train800val200 -> test, all the experiment's
# tasks) retrain. A stage is `<step>/trial<n>` or `final`.
def _check_search_spaces(config):
    try:
        for name in search_plan.search_names(config):
            search_space.load_space(search_plan.settings(config, name)["space"])
    except runspec.ConfigError as err:
        sys.exit(f"Invalid configuration: {err}")


_check_search_spaces(config)
SEARCH_DIR = f"{RESULTS}/search/{{search}}"
SEARCH_NAMES = _alternatives(search_plan.search_names(config))


def search_study_spec(wildcards):
    """What an ask (a batch) or a step's result reads."""
    batch = int(wildcards.batch) if "batch" in wildcards.keys() else None
    return json.dumps(search_plan.study_spec(config, wildcards.search, wildcards.step, batch), sort_keys=True)


def _batch_metrics(search, step, batch):
    """metrics.json of every trial of a batch on every search task, once its checkpoint has run."""
    record = search_plan.read_json(checkpoints.search_ask.get(search=search, step=step, batch=batch).output.batch)
    tasks = search_plan.settings(config, search)["tasks"]
    return [str(search_plan.run_dir(config, search, search_plan.trial_stage(step, t["number"]), task) / runspec.METRICS)
            for t in record["trials"] for task in tasks]


def search_previous_result(wildcards):
    """The previous step's result.json (a tune step starts from its winner), or nothing."""
    previous = search_plan.previous_step(config, wildcards.search, wildcards.step)
    return [str(search_plan.result_file(config, wildcards.search, previous))] if previous else []


def search_scores(wildcards):
    """What an ask tells first (the previous batch's metrics), or a step's result (its last batch's)."""
    if "batch" in wildcards.keys():
        batch = int(wildcards.batch)
        return _batch_metrics(wildcards.search, wildcards.step, batch - 1) if batch else []
    last = len(search_plan.batch_sizes(config, wildcards.search)) - 1
    return _batch_metrics(wildcards.search, wildcards.step, last)


def search_study_inputs(wildcards):
    return {"scores": search_scores(wildcards), "previous": search_previous_result(wildcards)}


def _stage_checkpoint(wildcards):
    """The checkpoint job a stage's spec comes from: its batch's ask, or the last step's result."""
    kind, where = search_plan.stage_origin(config, wildcards.search, wildcards.stage)
    origin = checkpoints.search_ask if kind == "ask" else checkpoints.search_result
    return origin.get(search=wildcards.search, **where)


def _search_run(wildcards):
    """The stage's run spec, read from its checkpoint's output once that has run."""
    record = search_plan.read_json(_stage_checkpoint(wildcards).output[0])
    return search_plan.stage_spec(config, wildcards.search, wildcards.stage, record, wildcards.task)


def search_training_spec(wildcards):
    return _job_spec(runspec.training_spec(_search_run(wildcards)))


def search_eval_spec(wildcards):
    return _job_spec(_search_run(wildcards))


def search_train_inputs(wildcards):
    """Also the evaluation split's cache: the evaluate job's inputs stay known before the checkpoint
    has run, so a dry run lists the final runs' training and evaluation."""
    return {"source": _stage_checkpoint(wildcards).output[0], **_spec_inputs(_search_run(wildcards))}


def search_eval_inputs(wildcards):
    run_dir = search_plan.run_dir(config, wildcards.search, wildcards.stage, wildcards.task)
    return {"source": search_plan.stage_source(config, wildcards.search, wildcards.stage),
            "train_record": str(run_dir / runspec.TRAIN_RECORD)}


def search_resources(key, default):
    """A resource of a search's trial and final jobs: its experiment's (config experiments/<id>/resources)."""
    def lookup(wildcards):
        experiment = search_plan.settings(config, wildcards.search)["experiment"]
        return config["experiments"][experiment].get("resources", {}).get(key, default)

    return lookup


def search_results():
    """result.json of every step of every search, in step order."""
    return [str(search_plan.result_file(config, name, step)) for name in search_plan.search_names(config)
            for step in search_plan.settings(config, name)["steps"]]


def search_report_definitions():
    """vision/paper.yaml: the published numbers the search's table shows beside its own."""
    return [_domain_yaml("vision", "paper")]


def search_outputs():
    if not search_plan.search_names(config):
        return []
    return [f"{RESULTS}/tables/hybrid_search.csv", f"{RESULTS}/tables/hybrid_search.md",
            f"{RESULTS}/figures/hybrid_search_history.png"]


# The Orca-Math study's lm-eval suite (config `lm_eval_suite`, lm_eval_suite.smk): its task files
# (stand-ins or local copies), one evaluation per backbone of the study's experiment (its base export)
# and per merged run, both through lm-eval's `hf` model as the study evaluated them; each merged run is
# also scored as backbone + unmerged adapter through our lm-eval model on the crosscheck tasks, which
# must agree. Its table and figure replace the experiment's generic ones.
LM_EVAL_SUITE = config.get("lm_eval_suite", {})
SUITE_DIR = f"{RESULTS}/lm_eval/{{experiment}}/{{backbone}}"


def _check_suite(suite):
    """Its experiment merges its runs, and its tasks are suite tasks of language/tasks.yaml."""
    if not suite:
        return
    experiment = config["experiments"].get(suite["experiment"])
    if experiment is None or not experiment.get("merge"):
        sys.exit(f"Invalid configuration: lm_eval_suite/experiment {suite['experiment']!r} is not an experiment "
                 "with `merge: true`; the suite evaluates merged models")
    known = runspec.domain_file("language", "tasks")["lm_eval_suite"]
    unknown = [t for t in suite["tasks"] + suite.get("crosscheck_tasks", []) if t not in known]
    if unknown:
        sys.exit(f"Invalid configuration: lm_eval_suite tasks {unknown} are not in language/tasks.yaml "
                 f"lm_eval_suite ({', '.join(known)})")
    outside = sorted(set(suite.get("crosscheck_tasks", [])) - set(suite["tasks"]))
    if outside:
        sys.exit(f"Invalid configuration: lm_eval_suite/crosscheck_tasks {outside} must also be in lm_eval_suite/tasks")


_check_suite(LM_EVAL_SUITE)


def suite_experiment():
    return LM_EVAL_SUITE.get("experiment")


def suite_runs():
    """The fine-tuned runs the suite evaluates: the merged runs of its experiment."""
    return [run for run in runspec.merge_grid(config) if run.experiment == suite_experiment()]


def suite_data_manifest():
    return f"{LM_EVAL_SUITE['data']['root']}/manifest.json"


def suite_data_downloads():
    """The `hub_datasets` exports (family lm_eval_suite) the suite's local task files come from, if any."""
    return runspec.hub_downloads_for(config, LM_EVAL_SUITE["data"]["root"])


def _suite_task_entries(tasks):
    """The tasks' entries of language/tasks.yaml (lm_eval_suite), which the suite's data and evaluation
    jobs read: in their specs, so editing a suite task re-runs them and editing another task does not."""
    return runspec.task_entries("language", tasks, family="lm_eval_suite")


def suite_data_spec():
    data = LM_EVAL_SUITE["data"]
    tasks = list(dict.fromkeys(LM_EVAL_SUITE["tasks"] + LM_EVAL_SUITE.get("crosscheck_tasks", [])))
    return json.dumps({**data, "tasks": tasks, "task_entries": _suite_task_entries(tasks)}, sort_keys=True)


def _suite_job(backbone, model, run, hf_dir):
    """What an evaluation job of the suite reads: one model, lm-eval's `hf` on its transformers directory."""
    settings = {key: LM_EVAL_SUITE.get(key) for key in ("batch_size", "limit", "gen_kwargs")}
    model_args = {"pretrained": hf_dir, **LM_EVAL_SUITE.get("hf_model_args", {})}
    return {"backbone": backbone, "model": model, "run": run, "tasks": LM_EVAL_SUITE["tasks"],
            "task_entries": _suite_task_entries(LM_EVAL_SUITE["tasks"]),
            "data_root": LM_EVAL_SUITE["data"]["root"], "data_source": LM_EVAL_SUITE["data"]["source"],
            "device": config.get("device", "auto"), "lm_eval": {"model": "hf", "model_args": model_args}, **settings}


def suite_base_spec(wildcards):
    return json.dumps(_suite_job(wildcards.backbone, "base", None, base_hf_dir(wildcards.backbone)), sort_keys=True)


def suite_base_inputs(wildcards):
    return {"data": suite_data_manifest(),
            "base": str(runspec.base_export_directory(config, wildcards.backbone) / "merge.json")}


def suite_tuned_spec(wildcards):
    run = _run(wildcards)
    job = _suite_job(run.backbone, "fine-tuned", dict(vars(run)), merged_hf_dir(run))
    entry = config["backbones"][run.backbone]
    adapter = {"backbone": entry["path"], "tokenizer": entry.get("tokenizer", entry["path"]),
               "adapter": str(run.directory(RESULTS) / runspec.ADAPTER)}
    job["crosscheck"] = {"model": "mambapeft", "model_args": adapter, "tasks": LM_EVAL_SUITE.get("crosscheck_tasks", []),
                         "atol": LM_EVAL_SUITE.get("crosscheck_atol", 1.0e-4)}
    return json.dumps(job, sort_keys=True)


def suite_tuned_inputs(wildcards):
    run = _run(wildcards)
    return {"data": suite_data_manifest(), "merged": f"{merged_dir(run)}/merge.json",
            "backbone": str(runspec.backbone_manifest(config, run.backbone)),
            "train_record": str(run.directory(RESULTS) / runspec.TRAIN_RECORD)}


def suite_records():
    """The evaluation records the table reads: each backbone's base model, then each fine-tuned run."""
    runs = suite_runs()
    base = [f"{RESULTS}/lm_eval/{suite_experiment()}/{b}/base.json" for b in dict.fromkeys(r.backbone for r in runs)]
    return base + [f"{RESULTS}/lm_eval/{r.experiment}/{r.backbone}/{r.task}/{r.method}/seed{r.seed}.json" for r in runs]


def suite_readings():
    """The study's numbers (a path relative to the checkout, like the domain YAML files)."""
    return str(runspec.repo_root() / LM_EVAL_SUITE["readings"])


def suite_report_definitions():
    """language/tasks.yaml: the metrics of each task the table shows."""
    return [_domain_yaml("language", "tasks")]


def suite_resource(key, default):
    return LM_EVAL_SUITE.get("resources", {}).get(key, default)


def suite_outputs():
    """{csv, md, figure} of the suite, or nothing when the config has none."""
    if not LM_EVAL_SUITE:
        return {}
    name = suite_experiment()
    return {"csv": f"{RESULTS}/tables/{name}.csv", "md": f"{RESULTS}/tables/{name}.md",
            "figure": f"{RESULTS}/figures/{name}_delta.png"}


# Merged models (config experiments/<id>/merge, merge.smk): every run of such an experiment folded into
# its backbone's weights, and each of its backbones written as it is (the base model), in transformers'
# and mamba_ssm's layouts. Other rules find them through merged_hf_dir(run) and base_hf_dir(backbone).
MERGED_DIR = f"{RESULTS}/merged/{{experiment}}/{{backbone}}/{{task}}/{{method}}/seed{{seed}}"
BASE_EXPORT_DIR = f"{RESOURCES}/backbones/{{backbone}}/export"


def merged_dir(run):
    """A run's merged model directory (hf/, mamba_ssm/, merge.json written last)."""
    return str(runspec.merged_directory(config, run))


def merged_hf_dir(run):
    """The run's merged transformers MambaForCausalLM directory (AutoModelForCausalLM, lm_eval --model hf)."""
    return f"{merged_dir(run)}/hf"


def base_hf_dir(backbone):
    """The backbone itself as a transformers MambaForCausalLM directory (the base model beside the merged ones)."""
    return str(runspec.base_export_directory(config, backbone) / "hf")


def merge_spec(wildcards):
    """The run as its training job saw it: an evaluation-only change never merges again."""
    return training_spec(wildcards)


def merge_inputs(wildcards):
    spec = runspec.resolve_run(config, _run(wildcards))
    return {"backbone": spec["backbone"]["manifest"], "train_record": f"{spec['output_dir']}/{runspec.TRAIN_RECORD}"}


def export_backbone_spec(wildcards):
    entry = runspec.backbone_entry(config, wildcards.backbone)
    return json.dumps({**entry, "id": wildcards.backbone, "path": str(runspec.backbone_path(config, wildcards.backbone))},
                      sort_keys=True)


def export_backbone_inputs(wildcards):
    return {"backbone": str(runspec.backbone_manifest(config, wildcards.backbone))}


def tokenize_text_spec(wildcards):
    return json.dumps(runspec.text_tokenize_spec(config, wildcards.dataset, wildcards.backbone), sort_keys=True)


def tokenize_text_inputs(wildcards):
    return {"data": str(runspec.data_manifest(config, wildcards.dataset)),
            "backbone": str(runspec.backbone_manifest(config, wildcards.backbone))}


def merge_outputs():
    """merge.json of every run to merge, and of each of their backbones' base export."""
    runs = runspec.merge_grid(config)
    backbones = dict.fromkeys(run.backbone for run in runs)
    return ([f"{merged_dir(run)}/merge.json" for run in runs]
            + [str(runspec.base_export_directory(config, backbone) / "merge.json") for backbone in backbones])


def _has_generic_evaluation(experiment):
    """Orca-Math runs are evaluated by the lm-eval suite on their merged models, not by rule evaluate."""
    return config["data"][config["experiments"][experiment]["data"]]["kind"] not in runspec.SUITE_EVALUATED_KINDS


def final_outputs():
    outputs = hub_dataset_records() + search_outputs()
    if _in_default_target(runspec.DT_INIT):
        outputs += dt_init_outputs()
    if _in_default_target(LENGTH_STUDY):
        outputs += list(length_study_outputs().values())
    outputs += list(suite_outputs().values()) + merge_outputs() + vim_vs_vit_outputs()
    for experiment in config["experiments"]:
        if (experiment in runspec.length_study_experiments(config) or experiment == suite_experiment()
                or not _has_generic_evaluation(experiment)):
            continue  # the study's own table and figure show them
        outputs += [f"{RESULTS}/tables/{experiment}.md", f"{RESULTS}/tables/{experiment}.csv",
                    f"{RESULTS}/figures/{experiment}_params_vs_accuracy.png",
                    f"{RESULTS}/figures/{experiment}_per_task.png"]
    if config.get("params_table"):
        outputs.append(f"{RESULTS}/tables/params.md")
    return outputs
