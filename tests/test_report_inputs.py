"""The report commands given wrong inputs: a stale, foreign, empty or malformed file, or a bad option,
is one line naming the file (or option) and what was expected, exit 2, and nothing is written."""
import json

import pytest

from mambapeft.cli import main
from mambapeft.io import write_json_atomic
from mambapeft.report.params import count_params
from mambapeft.runspec import ConfigError, repo_root

SUITE_READINGS = repo_root() / "language" / "orca_math_lm_eval.yaml"


def run_record(method="lorap_x", task="cifar", value=70.0, experiment="vtab", backbone="vim-s", **extra):
    """A metrics.json as evaluate writes it (what the reports read of it)."""
    return {"status": "ok", "metric": "top1", "value": value, "results": {task: {"top1": value, "n": 10}},
            "trainable_params": 1000, "total_params": 10_000,
            "config": {"domain": "vision", "run": {"experiment": experiment, "backbone": backbone, "task": task,
                                                     "method": method, "seed": 0},
                       "method": {"id": method, "label": method}}, **extra}


def user_error(capsys, argv, *needles) -> str:
    """Runs the command line, which must fail with one line (no traceback) naming ``needles``."""
    assert main(["-q", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mambapeft: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tables(tmp_path, experiment, *metrics):
    return ["tables", "--experiment", experiment, "--csv", str(tmp_path / "t.csv"), "--md", str(tmp_path / "t.md"),
            *map(str, metrics)]


def test_a_metrics_json_older_than_its_training_never_reaches_a_table(tmp_path, capsys):
    run = tmp_path / "run"
    write_json_atomic(run / "metrics.json", run_record(adapter_sha256="a" * 64))
    write_json_atomic(run / "train.json", {"status": "ok", "adapter_sha256": "b" * 64})  # trained again since
    user_error(capsys, tables(tmp_path, "vtab", run / "metrics.json"), str(run / "metrics.json"),
               "the run was trained again", "re-run its evaluate job")
    assert not (tmp_path / "t.csv").exists()
    write_json_atomic(run / "train.json", {"status": "ok", "adapter_sha256": "a" * 64})
    assert main(["-q", *tables(tmp_path, "vtab", run / "metrics.json")]) == 0


def test_a_run_of_another_experiment_is_refused(tmp_path, capsys):
    write_json_atomic(tmp_path / "m.json", run_record(experiment="commonsense"))
    user_error(capsys, tables(tmp_path, "vtab", tmp_path / "m.json"), "m.json is a run of experiment 'commonsense', "
               "not 'vtab'")


@pytest.mark.parametrize("make, problem", [
    (lambda p: None, "no such file; expected a run record"),
    (lambda p: p.mkdir(), "is a directory; expected a run record"),
    (lambda p: p.write_text("{}"), "is not a run record (it lacks status, config); expected a metrics.json: pass the "
                                   "right file"),
    (lambda p: p.write_text("[]"), "is not a run record (it holds a JSON list)"),
    (lambda p: p.write_text(""), "cannot read run record (not valid JSON"),
])
def test_the_advice_fits_why_a_record_cannot_be_read(tmp_path, capsys, make, problem):
    """Only a damaged record is to be deleted and re-made; a missing or wrong file is to be passed right."""
    path = tmp_path / "metrics.json"
    make(path)
    line = user_error(capsys, tables(tmp_path, "vtab", path), str(path), problem)
    assert ("delete it" in line) == ("not valid JSON" in problem)


@pytest.mark.parametrize("num_classes", [0, -5])
def test_params_refuses_a_head_without_classes(capsys, num_classes):
    """The command line refuses it as a usage error; the function (its other callers) in one line too."""
    with pytest.raises(SystemExit) as usage_error:
        main(["-q", "params", "--backbone", "vim-mini", "--method", "lorap_x", "--num-classes", str(num_classes)])
    assert usage_error.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument --num-classes: must be a positive integer, got {num_classes}" in error
    with pytest.raises(ConfigError, match=f"num_classes is {num_classes}; a head has at least 1 class"):
        count_params("vim-mini", "lorap_x", num_classes)


def test_params_counts_the_head_asked_for_and_names_an_unknown_backbone(capsys):
    assert main(["-q", "params", "--backbone", "vim-mini", "--method", "lorap_x", "--num-classes", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["head"] == 49  # 48 features + bias: one class, not the default 100
    user_error(capsys, ["params", "--backbone", "nosuch", "--method", "lorap_x"], "Unknown backbone 'nosuch'")


@pytest.mark.parametrize("spec, needle", [
    ({"vision": {"vim-mini": "al"}}, "vision.vim-mini is 'al'; expected \"all\" or a list of method ids"),
    ({"vision": {"vim-mini": "d"}}, "vision.vim-mini is 'd'"),  # read letter by letter, it tabled method d
    ({"language": {"vim-mini": "all"}}, "'vim-mini' is a vision backbone, not a language one"),
    ({}, "params-table spec is {}"),
    ({"vision": {}}, "params-table spec: 'vision': {}"),
])
def test_params_table_spec_is_checked_before_anything_is_written(tmp_path, capsys, spec, needle):
    csv, md = tmp_path / "p.csv", tmp_path / "p.md"
    user_error(capsys, ["params-table", "--spec", json.dumps(spec), "--csv", str(csv), "--md", str(md)], needle)
    assert not csv.exists() and not md.exists()


def test_vim_vs_vit_refuses_a_table_without_vim_or_vit_rows(tmp_path, capsys):
    table = tmp_path / "commonsense.csv"
    table.write_text("backbone,method,label,mean,trainable_params,trainable_pct\n"
                     "mamba-mini,lorap_x,LoRAp(X),50.0,10,1.0\n")
    user_error(capsys, ["figure-vim-vs-vit", "--table", str(table), "--out", str(tmp_path / "v.png")],
               str(table), "has no Vim or ViT rows (backbones: mamba-mini)")
    assert not (tmp_path / "v.png").exists()


@pytest.mark.parametrize("name, content, problem", [
    ("empty.csv", "", "not a CSV table"),
    ("t.md", "# vtab\n\nnote\n\n| lorap_x | 36,864 | 1,000 |\n", "not a CSV table"),  # the markdown table
    ("other.csv", "a,b\n1,2\n", "lacks column(s) backbone, label, mean"),
])
def test_figures_name_a_table_they_cannot_draw(tmp_path, capsys, name, content, problem):
    table = tmp_path / name
    table.write_text(content)
    user_error(capsys, ["figures", "--table", str(table), "--scatter", str(tmp_path / "s.png"),
                        "--per-task", str(tmp_path / "p.png")], str(table), problem, "expected a results table")


@pytest.mark.parametrize("content, problem", [
    ("{}", "is not a search step result (it lacks search, step"), ("", "cannot read search step result")])
def test_search_report_names_a_file_that_is_no_step_result(tmp_path, capsys, content, problem):
    result = tmp_path / "result.json"
    result.write_text(content)
    user_error(capsys, ["search", "report", "--results", str(result), "--csv", str(tmp_path / "h.csv"),
                        "--md", str(tmp_path / "h.md"), "--figure", str(tmp_path / "h.png")], str(result), problem)


def test_length_study_refuses_a_run_of_another_study(tmp_path, capsys):
    record = run_record()
    record["config"]["data"] = {"kind": "vtab"}
    write_json_atomic(tmp_path / "m.json", record)
    readings = repo_root() / "language" / "length_generalisation.yaml"
    user_error(capsys, ["length-generalisation", "--readings", str(readings),
                        "--csv", str(tmp_path / "l.csv"), "--md", str(tmp_path / "l.md"),
                        "--figure", str(tmp_path / "l.png"), str(tmp_path / "m.json")],
               "is a run on data of kind 'vtab', not a run of the length study")


def suite_record(model, **changes):
    run = {"experiment": "orca_math", "backbone": "mamba-130m", "task": "orca_math", "method": "lora_orca", "seed": 0}
    record = {"status": "ok", "backbone": "mamba-130m", "model": model, "run": run if model == "fine-tuned" else None,
              "tasks": ["mathqa"], "data_source": "mini", "lm_eval_model": "hf",
              "scores": {"mathqa": {"acc": 20.0, "acc_norm": 21.0, "n": 10}}}
    return {**record, **changes}


def suite_report(tmp_path, readings, *records):
    return ["lm-eval-suite", "report", "--readings", str(readings), "--title", "orca_math", "--csv",
            str(tmp_path / "s.csv"), "--md", str(tmp_path / "s.md"), "--figure", str(tmp_path / "s.png"),
            *map(str, records)]


def test_suite_report_checks_every_record_before_writing(tmp_path, capsys):
    """A record without lm_eval_model was found only after the CSV was written."""
    base, tuned = tmp_path / "base.json", tmp_path / "tuned.json"
    write_json_atomic(base, suite_record("base"))
    record = suite_record("fine-tuned")
    del record["lm_eval_model"]
    write_json_atomic(tuned, record)
    user_error(capsys, suite_report(tmp_path, SUITE_READINGS, base, tuned), str(tuned),
               "is not a lm-eval suite record (it lacks lm_eval_model)")
    assert not any(tmp_path.glob("s.*"))
    write_json_atomic(tmp_path / "metrics.json", run_record())
    user_error(capsys, suite_report(tmp_path, SUITE_READINGS, base, tmp_path / "metrics.json"), "pass the right file")


@pytest.mark.parametrize("content, problem", [
    ("a: [\n", "not valid YAML"), ("- 1\n", "is not a readings file"),
    ("experiments: {}\n", "is not a readings file (no list `readings`)")])
def test_readings_that_are_no_readings_file_are_named(tmp_path, capsys, content, problem):
    base, tuned = tmp_path / "base.json", tmp_path / "tuned.json"
    write_json_atomic(base, suite_record("base"))
    write_json_atomic(tuned, suite_record("fine-tuned"))
    readings = tmp_path / "readings.yaml"
    readings.write_text(content)
    user_error(capsys, suite_report(tmp_path, readings, base, tuned), str(readings), problem)
    assert not any(tmp_path.glob("s.*"))
