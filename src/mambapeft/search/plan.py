"""A search's plan from the config (torch- and optuna-free: ``common.smk`` imports it): its settings,
where its files go, its batches, and the run specs of its trials and final runs.

Files of search ``<name>`` under ``results/search/<name>/``:
``journal.log`` (the Optuna study, one per step), ``<step>/batch<b>.json`` (the trials asked for),
``<step>/trial<n>/<task>/`` (a trial's run on one task: train.json, metrics.json),
``<step>/result.json`` (the step's trials and winner), ``final/<task>/`` (the final runs).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..runspec import Run, domain_file, resolve_method_run, results_dir

# what score_on means: the trials' splits, and the label every output carries
SCORE_ON = {
    "val": {"train_split": "train800", "eval_split": "val200",
            "label": "val200 (trials trained on train800)", "row": "Hybrid (searched, val)"},
    "test": {"train_split": "train800val200", "eval_split": "test",
             "label": "TEST split (the original's protocol: trials trained on train800val200, scored on test)",
             "row": "Hybrid (searched on test)"},
}
DEFAULTS = {"space": "hybrid", "batch": 4, "seed": 0, "score_on": "val", "train": {}}  # as the config schema
FINAL = "final"


def search_names(config: dict) -> list[str]:
    return list(config.get("search", {}))


def settings(config: dict, name: str) -> dict:
    """The search's config entry with its defaults (the schema's; backbone: the experiment's first;
    steps: all of the space's)."""
    entry = {**DEFAULTS, **config["search"][name]}
    exp = config["experiments"][entry["experiment"]]
    entry.setdefault("backbone", exp["backbones"][0])
    if "steps" not in entry:  # read search.yaml only when the config leaves the steps out
        entry["steps"] = list(domain_file("vision", "search")[entry["space"]]["steps"])
    return entry


def search_dir(config: dict, name: str) -> Path:
    return results_dir(config) / "search" / name


def journal(config: dict, name: str) -> Path:
    return search_dir(config, name) / "journal.log"


def batch_file(config: dict, name: str, step: str, batch: int) -> Path:
    return search_dir(config, name) / step / f"batch{batch}.json"


def result_file(config: dict, name: str, step: str) -> Path:
    return search_dir(config, name) / step / "result.json"


def trial_stage(step: str, trial: int) -> str:
    return f"{step}/trial{trial}"


def parse_trial_stage(stage: str) -> tuple[str, int]:
    step, _, trial = stage.partition("/trial")
    return step, int(trial)


def run_dir(config: dict, name: str, stage: str, task: str) -> Path:
    """A trial's (stage ``<step>/trial<n>``) or the final (stage ``final``) run on one task."""
    return search_dir(config, name) / stage / task


def stage_origin(config: dict, name: str, stage: str) -> tuple[str, dict]:
    """Which job writes the file a stage's spec is read from: (``ask``, {step, batch}) for a trial,
    (``result``, {step}) of the last step for the final runs."""
    if stage == FINAL:
        return "result", {"step": settings(config, name)["steps"][-1]}
    step, trial = parse_trial_stage(stage)
    return "ask", {"step": step, "batch": batch_of(config, name, trial)}


def stage_source(config: dict, name: str, stage: str) -> Path:
    """The file a stage's spec is read from: a trial's batch file, or the last step's result (final)."""
    kind, where = stage_origin(config, name, stage)
    return batch_file(config, name, **where) if kind == "ask" else result_file(config, name, **where)


def batch_sizes(config: dict, name: str) -> list[int]:
    """Trials per batch of each step: ``batch`` at a time, the last batch takes what is left."""
    entry = settings(config, name)
    full, rest = divmod(entry["trials"], entry["batch"])
    return [entry["batch"]] * full + ([rest] if rest else [])


def batch_of(config: dict, name: str, trial: int) -> int:
    """Batch b holds trials b*batch ... (the ask hands out a step's trial numbers in order)."""
    return trial // settings(config, name)["batch"]


def previous_step(config: dict, name: str, step: str) -> str | None:
    steps = settings(config, name)["steps"]
    index = steps.index(step)
    return steps[index - 1] if index else None


def space_definition(space: str) -> dict:
    """A space as the ask and result jobs read it: its entry of vision/search.yaml, and its base
    method's members (vision/methods.yaml). In their spec, so that editing either re-runs them, and
    the journal (search/study.py) refuses to continue a study asked under another definition."""
    entry = domain_file("vision", "search")[space]
    return {**entry, "base_members": domain_file("vision", "methods")[entry["members_of"]]["peft"]}


def study_spec(config: dict, name: str, step: str, batch: int | None = None) -> dict:
    """What the ask (one batch) and result (the step's end) jobs read."""
    entry = settings(config, name)
    sizes = batch_sizes(config, name)
    spec = {"search": name, "journal": str(journal(config, name)), "space": entry["space"],
            "space_definition": space_definition(entry["space"]), "step": step,
            "step_index": entry["steps"].index(step), "seed": entry["seed"], "tasks": list(entry["tasks"]),
            "trials": entry["trials"], "batch_size": entry["batch"], "train": entry["train"],
            "score_on": entry["score_on"], "score_label": SCORE_ON[entry["score_on"]]["label"]}
    if batch is not None:
        spec.update(batch=batch, first_trial=batch * entry["batch"], size=sizes[batch])
    return spec


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def trial_entry(batch_record: dict, trial: int) -> dict:
    """One trial of a batch file: {number, params, peft}."""
    for entry in batch_record["trials"]:
        if entry["number"] == trial:
            return entry
    numbers = [e["number"] for e in batch_record["trials"]]
    raise KeyError(f"trial {trial} is not in batch {batch_record['batch']} (trials {numbers})")


def trial_spec(config: dict, name: str, step: str, entry: dict, task: str) -> dict:
    """A trial's run on one task: the trial's members on the search's backbone, trained with the
    experiment's recipe, the search's `train` overrides and the score_on splits."""
    settings_ = settings(config, name)
    splits = SCORE_ON[settings_["score_on"]]
    method = {"id": f"{name}.{step}.trial{entry['number']}", "label": f"{name} {step} trial {entry['number']}",
              "init": "pretrained", "peft": entry["peft"], "train": {}}
    overrides = {**settings_["train"], "train_split": splits["train_split"], "eval_split": splits["eval_split"]}
    return _search_spec(config, name, task, method, overrides, trial_stage(step, entry["number"]),
                        {"step": step, "trial": entry["number"], "score_on": settings_["score_on"]})


def final_spec(config: dict, name: str, result: dict, task: str) -> dict:
    """The last step's winner retrained on the experiment's recipe (train800val200 -> test)."""
    score_on = settings(config, name)["score_on"]
    method = {"id": f"search_{name}", "label": SCORE_ON[score_on]["row"], "init": "pretrained",
              "peft": result["best"]["peft"], "train": {}}
    return _search_spec(config, name, task, method, {}, FINAL,
                        {"step": FINAL, "from_step": result["step"], "from_trial": result["best"]["number"],
                         "score_on": score_on})


def stage_spec(config: dict, name: str, stage: str, source: dict, task: str) -> dict:
    """A stage's run on one task, from its source record (:func:`stage_source`)."""
    if stage == FINAL:
        return final_spec(config, name, source, task)
    step, trial = parse_trial_stage(stage)
    return trial_spec(config, name, step, trial_entry(source, trial), task)


def _search_spec(config: dict, name: str, task: str, method: dict, overrides: dict, stage: str, about: dict) -> dict:
    entry = settings(config, name)
    run = Run(entry["experiment"], entry["backbone"], task, method["id"], entry["seed"])
    spec = resolve_method_run(config, run, method, overrides)
    spec["output_dir"] = str(run_dir(config, name, stage, task))
    spec["search"] = {"name": name, **about}
    return spec


def final_metrics(config: dict, experiment: str | None = None) -> list[str]:
    """metrics.json of every final run (of the searches on ``experiment``, or of all)."""
    paths = []
    for name in search_names(config):
        entry = settings(config, name)
        if experiment in (None, entry["experiment"]):
            tasks = config["experiments"][entry["experiment"]]["tasks"]
            paths += [str(run_dir(config, name, FINAL, t) / "metrics.json") for t in tasks]
    return paths
