"""The hybrid search: its space, ask/tell through the file journal, resuming, the score_on label, and
a tiny search run by Snakemake end to end (tests/config/search.yaml)."""
import json
import os
import re

import optuna
import pytest
import yaml
from workflow_helpers import REPO, snakemake

from mambapeft import runspec
from mambapeft.cli import main as cli
from mambapeft.report.hybrid_search import markdown, search_table
from mambapeft.search import plan
from mambapeft.search.space import KEEP_ALL, _check_space, base_members, load_space, suggest, trial_members
from mambapeft.search.study import ask_batch, open_study, step_result, tell_scores

SEARCH_CONFIG = REPO / "tests" / "config" / "search.yaml"
# the original's step-1 choices (reference §4) by our member names, and its step-1 winner
ORIGINAL_STEP1 = ["lora_out", "lora_in", "lora_x", "lora_z", "lora_x_proj", "lora_d", "lora_b", "lora_c", "lora_dt",
                  "lora_embed", "affix", "prompt", "additional_scan", "a", "d", "conv1d", "cls_token", "pos_embed",
                  "bias"]
ORIGINAL_WINNER = ["lora_out", "lora_in", "lora_x", "lora_b", "lora_dt", "affix", "a", "cls_token"]


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _config(**search):
    overrides = {"search": {"s": {"experiment": "vtab", "tasks": ["digits"], "trials": 3, "batch": 2, **search}}}
    return runspec.load_config(SEARCH_CONFIG, overrides=overrides)


class _Given:
    """A trial answering with given values, else the first choice or the low end."""

    def __init__(self, values):
        self.values = values

    def suggest_categorical(self, name, choices):
        return self.values.get(name, choices[0])

    def suggest_float(self, name, low, high, log=False):
        return self.values.get(name, low)


def test_space_is_the_originals_two_steps():
    space = load_space("hybrid")
    assert space["steps"]["step1"]["members"] == ORIGINAL_STEP1
    every_on = trial_members(space, "step1", dict.fromkeys(ORIGINAL_STEP1, True), [])
    assert every_on == list(base_members(space).values())  # step 1 at method `all`'s fixed small sizes
    trial = _Given({"remove": "a", "lora_out.rank": 16, "lora_out.scale": 0.5, "affix.n_tokens": 3})
    params = suggest(trial, space, "step2", ["lora_out", "affix", "a"])
    members = {m["name"]: m for m in trial_members(space, "step2", params, ["lora_out", "affix", "a"])}
    assert set(members) == {"lora_out", "affix"}  # `a` removed
    assert (members["lora_out"]["rank"], members["lora_out"]["scale"], members["affix"]["n_tokens"]) == (16, 0.5, 3)
    fields = space["steps"]["step2"]["fields"]
    assert fields["lora_out"]["rank"] == [4, 8, 12, 16] and fields["lora_b"]["rank"] == [4, 8, 12]
    assert fields["a"]["weight_decay_mult"] == {"low": 0.1, "high": 100.0, "log": True}
    assert set(ORIGINAL_WINNER) <= set(fields)


def _tune_lora_out(fields):
    return {"kind": "tune", "fields": {"lora_out": fields}}


@pytest.mark.parametrize("bad, message", [
    ({"steps": {"step1": {"kind": "choose", "members": ["lora_q"]}}}, "not members of method"),
    ({"steps": {"step1": {"kind": "tune", "fields": {}}}}, "must be of kind choose"),
    ({"steps": {"step1": {"kind": "choose", "members": []}, "step2": _tune_lora_out({"rnak": [4]})}}, "rnak"),
    ({"steps": {"step1": {"kind": "choose", "members": []},
                "step2": _tune_lora_out({"scale": {"low": 1, "high": 0.1}})}}, "low < high"),
])
def test_a_bad_space_names_what_is_wrong(bad, message):
    with pytest.raises(runspec.ConfigError, match=message):
        _check_space("broken", {"members_of": "all", **bad})


@pytest.mark.parametrize("search, message", [
    ({"tasks": ["cifar"]}, "not tasks of experiments/vtab"),
    ({"steps": ["step2"]}, "first steps of space"),
    ({"space": "nope"}, "not a space of vision/search.yaml"),
    ({"score_on": "train"}, "score_on"),
])
def test_a_bad_search_config_is_one_line(search, message):
    with pytest.raises(runspec.ConfigError, match=message) as err:
        _config(**search)
    assert "Traceback" not in str(err.value)


def _study_spec(config, journal, step="step1", batch=None):
    return {**plan.study_spec(config, "s", step, batch), "journal": str(journal)}


def _scores(tmp_path, trials, tasks=("digits",), value=lambda n: 10.0 * n, status="ok", search="s", step="step1"):
    """metrics.json records of trials, as the evaluate job writes them (only what tell reads)."""
    paths = []
    for entry in trials:
        for task in tasks:
            path = tmp_path / f"t{entry['number']}_{task}.json"
            about = {"name": search, "step": step, "trial": entry["number"]}
            path.write_text(json.dumps({"status": status, "value": value(entry["number"]),
                                        "config": {"run": {"task": task}, "search": about}}))
            paths.append(str(path))
    return paths


def test_ask_tell_through_the_journal_and_resume(tmp_path):
    config, journal, space = _config(), tmp_path / "journal.log", load_space("hybrid")
    spec = _study_spec(config, journal, batch=0)
    first = ask_batch(open_study(spec, []), spec, space, [])
    assert [e["number"] for e in first] == [0, 1]
    # batch 1, in a new process: tell batch 0, ask the one trial left of the 3
    spec = _study_spec(config, journal, batch=1)
    study = open_study(spec, [])
    assert tell_scores(study, _scores(tmp_path, first), ["digits"]) == [0, 1]
    second = ask_batch(study, spec, space, [])
    assert [e["number"] for e in second] == [2]
    # interrupted after the ask: the batch asked for again is the same trial, nothing is told twice
    again = open_study(spec, [])
    assert tell_scores(again, _scores(tmp_path, first), ["digits"]) == []
    assert ask_batch(again, spec, space, []) == second
    assert len(again.trials) == 3
    assert [t.value for t in again.trials[:2]] == [0.0, 10.0]
    tell_scores(again, _scores(tmp_path, second, status="diverged"), ["digits"])
    result = step_result(again, _study_spec(config, journal), space, [])
    assert result["best"]["number"] == 1 and result["best"]["score"] == 10.0
    assert [t["state"] for t in result["trials"]] == ["COMPLETE", "COMPLETE", "FAIL"]


def test_a_study_refuses_other_settings_and_missing_scores(tmp_path):
    journal, space = tmp_path / "journal.log", load_space("hybrid")
    config = _config()
    spec = _study_spec(config, journal, batch=0)
    trials = ask_batch(open_study(spec, []), spec, space, [])
    with pytest.raises(runspec.ConfigError, match="other settings.*seed"):
        open_study(_study_spec(_config(seed=1), journal, batch=1), [])
    with pytest.raises(runspec.ConfigError, match="no metrics.json for task"):
        tell_scores(open_study(spec, []), _scores(tmp_path, trials), ["digits", "count"])


def _reading(monkeypatch, name, edit):
    """The search's plan reads vision/<name>.yaml as ``edit`` leaves it."""
    original = plan.domain_file

    def domain_file(domain, file):
        table = original(domain, file)
        if (domain, file) == ("vision", name):
            edit(table)
        return table

    monkeypatch.setattr(plan, "domain_file", domain_file)


@pytest.mark.parametrize("name, edit, changes", [
    ("search", lambda spaces: spaces["hybrid"]["steps"]["step2"]["fields"]["lora_out"].update(rank=[4, 8]), True),
    ("methods", lambda methods: methods["all"]["peft"][0].update(rank=2), True),  # the space's base members
    ("methods", lambda methods: methods["lorap_x"].update(label="renamed"), False),  # another method
])
def test_a_steps_spec_holds_its_space_and_a_study_refuses_another(tmp_path, monkeypatch, name, edit, changes):
    """vision/search.yaml and the base method of vision/methods.yaml are in the ask and result jobs'
    spec (their params): editing them re-runs those jobs, whose journal then refuses to continue."""
    config, journal, space = _config(), tmp_path / "journal.log", load_space("hybrid")
    spec = _study_spec(config, journal, batch=0)
    ask_batch(open_study(spec, []), spec, space, [])
    _reading(monkeypatch, name, edit)
    edited = _study_spec(config, journal, batch=0)
    assert (edited != spec) == changes
    if changes:
        with pytest.raises(runspec.ConfigError, match="other settings.*space_definition"):
            open_study(edited, [])


@pytest.mark.parametrize("record, problem", [
    (dict(search="OTHER"), "a run of search step OTHER.step1, not s.step1"),
    (dict(step="step2"), "a run of search step s.step2, not s.step1"),
    (dict(value=lambda n: 1e6), "value is 1000000.0, expected a percentage in [0, 100]"),
    (dict(tasks=("count",)), "trial 0 on task 'count': expected a trial number on one of"),
    (dict(status="running"), "not a complete run record"),
])
def test_a_foreign_or_invalid_score_is_never_told(tmp_path, record, problem):
    """The journal keeps what it is told: a record of another search or step, or no percentage, is refused."""
    journal, space = tmp_path / "journal.log", load_space("hybrid")
    spec = _study_spec(_config(), journal, batch=0)
    trials = ask_batch(open_study(spec, []), spec, space, [])
    study = open_study(spec, [])
    with pytest.raises(runspec.ConfigError, match=re.escape(problem)):
        tell_scores(study, _scores(tmp_path, trials, **record), ["digits"])
    assert [t.state.name for t in study.get_trials()] == ["RUNNING", "RUNNING"]


@pytest.mark.parametrize("content, problem", [
    ("", "cannot read trial record"), ("{}", "not a trial's metrics.json"), ("[1]", "not a trial's metrics.json")])
def test_an_unreadable_score_file_is_one_line(tmp_path, content, problem):
    journal = tmp_path / "journal.log"
    spec = _study_spec(_config(), journal, batch=0)
    bad = tmp_path / "metrics.json"
    bad.write_text(content)
    with pytest.raises(runspec.ConfigError, match=re.escape(f"{bad}: {problem}")):
        tell_scores(open_study(spec, []), [str(bad)], ["digits"])


def test_a_score_of_a_trial_never_asked_is_refused(tmp_path):
    journal, space = tmp_path / "journal.log", load_space("hybrid")
    spec = _study_spec(_config(), journal, batch=0)
    ask_batch(open_study(spec, []), spec, space, [])
    with pytest.raises(runspec.ConfigError, match="trial 7 is not a trial of study 's.step1'"):
        tell_scores(open_study(spec, []), _scores(tmp_path, [{"number": 7}]), ["digits"])


@pytest.mark.parametrize("content, problem", [("{}", "is not a search step result (it lacks"),
                                              ("", "cannot read search step result")])
def test_a_previous_step_result_that_is_not_one_is_one_line(tmp_path, capsys, content, problem):
    """`search ask --previous` reads the step before's winner from its result.json, checked as the report reads it."""
    previous = tmp_path / "result.json"
    previous.write_text(content)
    spec = _study_spec(_config(), tmp_path / "journal.log", step="step2", batch=0)
    code = cli(["search", "ask", "--spec", json.dumps(spec), "--previous", str(previous), "--out", str(tmp_path / "b.json")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and problem in error[-1] and str(previous) in error[-1]
    assert not (tmp_path / "b.json").exists()


def test_step2_starts_from_the_winner(tmp_path):
    config, journal, space = _config(), tmp_path / "journal.log", load_space("hybrid")
    spec = _study_spec(config, journal, step="step2", batch=0)
    trials = ask_batch(open_study(spec, ORIGINAL_WINNER), spec, space, ORIGINAL_WINNER)
    for entry in trials:
        assert entry["params"]["remove"] in [KEEP_ALL, *ORIGINAL_WINNER]
        assert set(entry["members"]) == set(ORIGINAL_WINNER) - {entry["params"]["remove"]}
        assert all(key.partition(".")[0] in ORIGINAL_WINNER for key in entry["params"] if "." in key)


def test_score_on_test_is_labelled_everywhere():
    config = _config(score_on="test")
    spec = plan.study_spec(config, "s", "step1", 0)
    assert "TEST split" in spec["score_label"] and "original's protocol" in spec["score_label"]
    entry = {"number": 0, "params": {}, "peft": []}
    trial = plan.trial_spec(config, "s", "step1", entry, "digits")
    assert (trial["train"]["train_split"], trial["train"]["eval_split"]) == ("train800val200", "test")
    assert trial["search"]["score_on"] == "test"
    result = {"search": "s", "step": "step1", "score_label": spec["score_label"], "tasks": ["digits"],
              "best": {"number": 0, "score": 50.0, "members": [], "params": {}, "peft": []},
              "trials": [{"number": 0, "state": "COMPLETE", "score": 50.0}]}
    final = plan.final_spec(config, "s", result, "digits")
    assert final["method"]["label"] == "Hybrid (searched on test)"
    assert (final["train"]["train_split"], final["train"]["eval_split"]) == ("train800val200", "test")
    assert "TEST split" in markdown(search_table([result], []))
    val = plan.trial_spec(_config(), "s", "step1", entry, "digits")
    assert (val["train"]["train_split"], val["train"]["eval_split"]) == ("train800", "val200")


def test_paper_search_plan():
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    search = paper["search"]["hybrid"]
    assert search["tasks"] == ["clevr_count", "dmlab", "oxford_iiit_pet", "patch_camelyon", "sun397"]
    assert search["trials"] == 100 and search.get("score_on", "val") == "val"
    assert set(search["tasks"]) <= set(paper["experiments"]["vtab"]["tasks"])


def _study_trials(journal, step):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=f"tiny.{step}", storage=storage).trials


def test_tiny_search_end_to_end_resumes_without_repeating(tmp_path):
    """Stopped in step 1's batch with one of its two trials run, then run to the end: that trial is
    not run again, the journal's study continues with the other, and the vtab table has the searched row."""
    search = tmp_path / "results" / "search" / "tiny"
    first = search / "step1" / "trial0" / "digits" / "metrics.json"
    snakemake(first.relative_to(tmp_path), "-c", "2", "--configfile", SEARCH_CONFIG, cwd=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert not (search / "step1" / "trial1").exists()
    snakemake("results/tables/hybrid_search.md", "results/tables/vtab.md", "-c", "2", "--configfile", SEARCH_CONFIG,
              cwd=tmp_path)
    assert first.stat().st_mtime_ns == stamp
    for step in ("step1", "step2"):
        trials = _study_trials(search / "journal.log", step)
        assert [t.number for t in trials] == [0, 1] and all(t.state.name == "COMPLETE" for t in trials)
    table = (tmp_path / "results" / "tables" / "hybrid_search.md").read_text()
    assert "final (test)" in table and "val200" in table and "72.05" in table
    assert "Hybrid (searched, val)" in (tmp_path / "results" / "tables" / "vtab.md").read_text()
    assert (tmp_path / "results" / "figures" / "hybrid_search_history.png").stat().st_size > 0
    assert os.path.exists(search / "final" / "digits" / "metrics.json")
