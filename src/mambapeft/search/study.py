"""The Optuna side of the hybrid search: one study per step in a file journal, trials asked for in
batches and their scores told back.

The journal (``JournalStorage`` on a ``JournalFileBackend``, file-locked) is the search's memory:
a batch asked for again (a job that was interrupted, a pipeline run again) gets the trials the
journal already holds for it, so a resumed search continues the same study and never repeats a
trial; trials from any machine that sees the file land in one study.
"""
from __future__ import annotations

import logging
import warnings
from statistics import mean

import numpy as np
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ..io import incomplete_or_altered, is_percent
from ..runspec import ConfigError
from .plan import read_json
from .space import member_names, suggest, trial_members

log = logging.getLogger(__name__)
BATCH_ATTR, SETTINGS_ATTR = "batch", "settings"


def _fingerprint(spec: dict, winner: list[str]) -> dict:
    """What the study's trials depend on besides their own parameters: a study holding trials made
    under other settings must not continue under these."""
    keys = ("space", "space_definition", "tasks", "score_on", "seed", "train", "batch_size")
    return {key: spec[key] for key in keys} | {"winner": winner}


def open_study(spec: dict, winner: list[str]) -> optuna.Study:
    """The step's study in the search's journal, created on first use. The TPE sampler is seeded per
    (seed, step, batch): each ask is its own process, and one seed for all would repeat its draws."""
    spec_batch = spec.get("batch", 0)
    seed = int(np.random.SeedSequence([spec["seed"], spec["step_index"], spec_batch]).generate_state(1)[0])
    storage = JournalStorage(JournalFileBackend(spec["journal"]))
    with warnings.catch_warnings():  # constant_liar (parallel trials see the running ones) is "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study = optuna.create_study(study_name=f"{spec['search']}.{spec['step']}", storage=storage, direction="maximize",
                                sampler=sampler, load_if_exists=True)
    fingerprint = _fingerprint(spec, winner)
    recorded = study.user_attrs.get(SETTINGS_ATTR)
    if recorded is None:
        study.set_user_attr(SETTINGS_ATTR, fingerprint)
    elif recorded != fingerprint:
        changed = sorted(k for k in fingerprint if recorded.get(k) != fingerprint[k])
        raise ConfigError(f"{spec['journal']}: study {study.study_name!r} was run with other settings "
                          f"({', '.join(changed)} differ); restore them, or delete the search's directory "
                          "to start over")
    return study


def tell_scores(study: optuna.Study, metrics_paths: list[str], tasks: list[str]) -> list[int]:
    """Tell each trial of ``metrics_paths`` (its runs on every task) its mean top-1 over the tasks;
    a diverged run fails its trial. Trials already told are left as they are. Returns those told."""
    runs: dict[int, dict[str, dict]] = {}
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    for path in metrics_paths:
        record = _trial_record(path, study.study_name, tasks)
        number = record["config"]["search"]["trial"]
        if number not in states:
            raise ConfigError(f"{path}: trial {number} is not a trial of study {study.study_name!r} (its trials: "
                              f"{sorted(states)}); pass only the metrics.json of this step's asked trials")
        runs.setdefault(number, {})[record["config"]["run"]["task"]] = record
    told = []
    for number, by_task in sorted(runs.items()):
        missing = sorted(set(tasks) - set(by_task))
        if missing:
            raise ConfigError(f"trial {number} has no metrics.json for task(s) {missing}; run its jobs first")
        if states.get(number) != TrialState.RUNNING:
            continue
        if any(by_task[t]["status"] != "ok" for t in tasks):
            study.tell(number, state=TrialState.FAIL)
        else:
            study.tell(number, mean(by_task[t]["value"] for t in tasks))
        told.append(number)
    return told


def _trial_record(path: str, study_name: str, tasks: list[str]) -> dict:
    """A trial's metrics.json that may be told to the study ``study_name`` (``<search>.<step>``): a
    score told is in the journal for good, so a record of another search or step, damaged, or with
    a value that is no percentage is ConfigError naming the file (the checks of io.py that the
    tables' run contract starts from)."""
    try:
        record = read_json(path)
    except (OSError, ValueError) as err:  # missing, a directory, not JSON
        raise ConfigError(f"{path}: cannot read trial record ({err}); expected a trial's metrics.json") from None
    problem = _trial_record_problem(record, study_name, tasks)
    if problem:
        raise ConfigError(f"{path}: {problem}; not told (the journal keeps what it is told)")
    return record


def _trial_record_problem(record, study_name: str, tasks: list[str]) -> str | None:
    config = record.get("config") if isinstance(record, dict) else None
    search, run = (config.get("search"), config.get("run")) if isinstance(config, dict) else (None, None)
    if not isinstance(search, dict) or not isinstance(run, dict):
        return "not a trial's metrics.json (no config.search and config.run)"
    if f"{search.get('name')}.{search.get('step')}" != study_name:
        return f"a run of search step {search.get('name')}.{search.get('step')}, not {study_name}"
    if not isinstance(search.get("trial"), int) or run.get("task") not in tasks:
        return f"trial {search.get('trial')!r} on task {run.get('task')!r}: expected a trial number on one of {tasks}"
    altered = incomplete_or_altered(record)
    if altered:
        return altered
    if record["status"] == "ok" and not is_percent(record.get("value")):
        return f"value is {record.get('value')!r}, expected a percentage in [0, 100]"
    return None


def ask_batch(study: optuna.Study, spec: dict, space: dict, winner: list[str]) -> list[dict]:
    """The batch's trials ({number, params, peft}): those the journal holds for it, completed by new
    asks up to the batch size."""
    held = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(BATCH_ATTR) == spec["batch"]]
    for _ in range(spec["size"] - len(held)):
        trial = study.ask()
        trial.set_user_attr(BATCH_ATTR, spec["batch"])
        suggest(trial, space, spec["step"], winner)
    trials = sorted((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(BATCH_ATTR) == spec["batch"]),
                    key=lambda t: t.number)
    expected = list(range(spec["first_trial"], spec["first_trial"] + spec["size"]))
    if [t.number for t in trials] != expected:
        raise ConfigError(f"{spec['journal']}: batch {spec['batch']} of {study.study_name!r} holds trials "
                          f"{[t.number for t in trials]}, expected {expected}; delete the search's directory "
                          "to start over")
    log.info("batch %d: %d trial(s) held, %d asked", spec["batch"], len(held), len(trials) - len(held))
    return [_entry(t, space, spec["step"], winner) for t in trials]


def _entry(trial, space: dict, step: str, winner: list[str]) -> dict:
    peft = trial_members(space, step, trial.params, winner)
    return {"number": trial.number, "params": dict(trial.params), "members": member_names(peft), "peft": peft}


def step_result(study: optuna.Study, spec: dict, space: dict, winner: list[str]) -> dict:
    """Every trial of the step (number, state, score, members, params) and its best one."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ConfigError(f"{study.study_name}: no trial completed (all failed or unscored); see the trials' train.log")
    best = max(complete, key=lambda t: (t.value, -t.number))
    return {"search": spec["search"], "step": spec["step"], "score_on": spec["score_on"],
            "score_label": spec["score_label"], "tasks": spec["tasks"], "winner_in": winner,
            "best": {**_entry(best, space, spec["step"], winner), "score": best.value},
            "trials": [{**_entry(t, space, spec["step"], winner), "state": t.state.name, "score": t.value}
                       for t in sorted(trials, key=lambda t: t.number)]}
