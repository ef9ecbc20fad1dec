"""Tables from run records: group means, seeds, the paper's numbers beside ours."""
import pandas as pd
import pytest

from mambapeft.report.figures import write_figures
from mambapeft.report.tables import (RUN_RECORD, ResultsError, markdown_table, read_record, summary_frame,
                                     write_experiment_table)
from mambapeft.io import write_json_atomic


def record(method, task, value, seed=0, backbone="vim-s", label=None, trainable=1000):
    return {"status": "ok", "metric": "top1", "value": value, "results": {task: {"top1": value, "n": 10}},
            "trainable_params": trainable, "total_params": 10 * trainable,
            "config": {"domain": "vision", "run": {"experiment": "vtab", "backbone": backbone, "task": task,
                                                     "method": method, "seed": seed},
                       "method": {"id": method, "label": label or method}}}


def test_vision_table_group_means_seeds_and_paper_numbers(tmp_path):
    records = [record("lorap_x", "cifar", 70.0), record("lorap_x", "clevr_count", 50.0),
               record("lorap_x", "cifar", 80.0, seed=1), record("lorap_x", "clevr_count", 60.0, seed=1),
               record("linear_probe", "cifar", 40.0), record("linear_probe", "clevr_count", 20.0)]
    paths = []
    for i, r in enumerate(records):
        paths.append(tmp_path / f"{i}.json")
        write_json_atomic(paths[-1], r)
    table = write_experiment_table("vtab", [str(p) for p in paths], tmp_path / "t.csv", tmp_path / "t.md")
    row = table.set_index("method").loc["lorap_x"]
    assert row["cifar"] == 75.0 and row["clevr_count"] == 55.0 and row["mean"] == 65.0
    assert row["natural"] == 75.0 and row["structured"] == 55.0 and row["seeds"] == 2
    assert row["mean_std"] == pytest.approx(pd.Series([60.0, 70.0]).std())
    assert row["paper_mean"] == 71.52 and row["delta_vs_paper"] == pytest.approx(65.0 - 71.52)
    assert list(table["method"]) == ["linear_probe", "lorap_x"]  # methods.yaml order
    markdown = (tmp_path / "t.md").read_text()
    assert "| paper mean | Δ vs paper |" in markdown and "71.5" in markdown and "(2)" in markdown
    write_figures(tmp_path / "t.csv", tmp_path / "s.png", tmp_path / "p.png", "vtab")
    assert (tmp_path / "s.png").stat().st_size > 10_000 and (tmp_path / "p.png").stat().st_size > 10_000


def test_incomplete_record_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text('{"status": "running", "config": {}}')
    with pytest.raises(ResultsError, match="metrics.json: not a complete run record"):
        read_record(bad, RUN_RECORD)
    bad.write_text("{not json")
    with pytest.raises(ResultsError, match="cannot read run record"):
        read_record(bad, RUN_RECORD)


def test_missing_task_leaves_the_mean_empty():
    table, tasks = summary_frame([record("lorap_x", "cifar", 70.0), record("linear_probe", "cifar", 40.0),
                                  record("linear_probe", "dtd", 30.0)])
    assert tasks == ["cifar", "dtd"]
    assert pd.isna(table.set_index("method").loc["lorap_x", "mean"])  # never a mean over fewer tasks


def test_a_paper_mean_over_fewer_tasks_is_compared_over_those_tasks():
    """ProDiaL reports HellaSwag, WinoGrande, ARC-E and ARC-C only (language/paper.yaml `mean_over`)."""
    scores = {"boolq": 60.0, "hellaswag": 40.0, "winogrande": 50.0, "arc_easy": 50.0, "arc_challenge": 30.0}
    run = record("prodial", "commonsense_170k", 50.0, backbone="mamba-130m")
    run["config"]["domain"], run["metric"] = "language", "acc"
    run["results"] = {task: {"acc": value} for task, value in scores.items()}
    table, tasks = summary_frame([run])
    row = table.iloc[0]
    assert row["paper_mean"] == 44.06 and row["delta_vs_paper"] == pytest.approx(42.5 - 44.06)
    assert "44.1 (4 tasks)" in markdown_table("commonsense", table, tasks)
