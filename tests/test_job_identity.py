"""What of <domain>/tasks.yaml the jobs' specs (their Snakemake params) hold: each run the entries of
its own tasks, each data preparation only the fields it reads. Editing one task's entry re-runs the
jobs that read it, and neither a new task nor a display name re-runs a run."""
import pytest

from mambapeft import runspec
from workflow_helpers import TINY


@pytest.fixture(scope="module")
def config():
    return runspec.load_config(TINY)


def _reading(monkeypatch, domain, edit):
    """runspec reads <domain>/tasks.yaml as ``edit`` leaves it."""
    original = runspec.domain_file

    def domain_file(domain_, name):
        table = original(domain_, name)
        if (domain_, name) == (domain, "tasks"):
            edit(table)
        return table

    monkeypatch.setattr(runspec, "domain_file", domain_file)


def _specs(config) -> dict:
    """Each tiny run's training and evaluate spec, and each dataset's preparation spec."""
    runs = {run: runspec.resolve_run(config, run) for run in runspec.grid(config)}
    return {**{("train", run): runspec.training_spec(spec) for run, spec in runs.items()},
            **{("evaluate", run): spec for run, spec in runs.items()},
            **{("prepare", dataset): runspec.prepare_spec(config, dataset) for dataset in config["data"]}}


def _changed_jobs(config, monkeypatch, domain, edit) -> set:
    """(job, run's task or dataset) of every spec that ``edit`` of <domain>/tasks.yaml changes."""
    before = _specs(config)
    _reading(monkeypatch, domain, edit)
    after = _specs(config)
    return {(job, getattr(what, "task", what)) for (job, what), spec in after.items() if spec != before[(job, what)]}


def _rename_and_add(tasks):
    tasks["digits"]["display"] = "Digits, renamed"
    tasks["new_task"] = {"display": "New", "group": "natural", "num_classes": 3}


def _more_position_classes(tasks):
    tasks["position"]["num_classes"] += 1


def _boolq_metrics(tasks):
    tasks["commonsense"]["mini_boolq"]["metrics"] = ["acc"]


def _addsub_answer(tasks):
    tasks["math"]["mini_addsub"]["answer"] = "letter"


@pytest.mark.parametrize("domain, edit, changed", [
    ("vision", _rename_and_add, set()),  # the tables show the display name; they read the whole file
    # the head's size: that task's runs, and the data (its stand-ins are drawn, real labels checked, with it)
    ("vision", _more_position_classes, {("train", "position"), ("evaluate", "position"), ("prepare", "vtab")}),
    ("language", _boolq_metrics, {("evaluate", "commonsense_170k")}),  # what the evaluation computes
    ("language", _addsub_answer, {("evaluate", "math_10k"), ("prepare", "math")}),  # and what the data check reads
])
def test_a_task_entry_reaches_the_jobs_that_read_it(config, monkeypatch, domain, edit, changed):
    assert _changed_jobs(config, monkeypatch, domain, edit) == changed

