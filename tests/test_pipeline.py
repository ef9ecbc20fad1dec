"""The workflow as a user runs it: lint, the paper grid's job counts, and the tiny config end to end."""
import json
import re
import shlex

import pandas as pd
import yaml

from mambapeft import runspec
from workflow_helpers import REPO, TINY, job_counts, snakemake


def test_lint_is_clean(tmp_path):
    done = snakemake("--lint", "--configfile", str(TINY), cwd=tmp_path, timeout=300)
    assert "Congratulations" in done.stdout + done.stderr or not (done.stdout + done.stderr).strip()


def test_paper_grid_dry_run_job_counts(tmp_path):
    paper = REPO / "config" / "paper.yaml"
    done = snakemake("-n", "-p", "--configfile", str(paper), cwd=tmp_path, timeout=300)
    counts = job_counts(done.stdout)
    assert counts["finetune"] == 19 * 28 + (3 * 8 - 2) + 3 * 7  # vtab + commonsense (affix w/ proj at 130m only) + math
    assert counts["cache_images"] == 19 * 2  # train800val200 and test of every task, at 224
    assert counts["prepare_data"] == 3 and counts["prepare_backbone"] == 4 and counts["download_data"] == 1
    assert counts["table"] == 3 and counts["figures"] == 3 and counts["params_table"] == 1
    # a --configfile replaces the default mini config: nothing of it (ranks, epochs, lrs) leaks in
    command = next(line for line in done.stdout.splitlines()
                   if "mambapeft train" in line and "runs/vtab/vim-s/cifar/lorap_x/seed0" in line)
    spec = json.loads(shlex.split(command)[shlex.split(command).index("--spec") + 1])
    expected = runspec.resolve_run(runspec.load_config(paper), runspec.Run("vtab", "vim-s", "cifar", "lorap_x", 0))
    assert spec == json.loads(json.dumps(expected))
    assert spec["train"]["epochs"] == 100 and spec["method"]["peft"][0]["rank"] == 64


def test_tiny_tables_have_one_row_per_method_with_real_numbers(tiny_run):
    workdir, _ = tiny_run
    vtab = pd.read_csv(workdir / "results" / "tables" / "vtab.csv")
    assert list(vtab["method"]) == ["linear_probe", "additional_scan", "lorap_x"]  # methods.yaml order
    for column in ("digits", "position", "mean", "natural", "structured"):
        assert vtab[column].between(0, 100).all(), column
    assert (vtab["mean"] - (vtab["digits"] + vtab["position"]) / 2).abs().max() < 1e-9
    counts = dict(zip(vtab["method"], vtab["trainable_params"]))
    assert counts == {"linear_probe": 0, "lorap_x": 4 * (48 * 4 + 4 * 96), "additional_scan": 4 * 2 * (96 * 6 + 96 * 12)}  # n=6 new states per direction
    language = pd.read_csv(workdir / "results" / "tables" / "commonsense.csv")
    assert set(language["method"]) == {"zero_shot", "lorap_x"}
    assert language[["mini_arc", "mini_boolq"]].notna().all().all()
    markdown = (workdir / "results" / "tables" / "vtab.md").read_text()
    assert "| LoRAp(X) |" in markdown.replace("| vim-mini | LoRAp(X)", "| LoRAp(X)")
    assert re.search(r"\| backbone \| method \| trainable \| % params \| digits \| position \|", markdown)


def test_tiny_run_records_follow_the_contract(tiny_run):
    workdir, _ = tiny_run
    runs = sorted((workdir / "results" / "runs").rglob("metrics.json"))
    assert len(runs) == 6 + 2 + 2
    for path in runs:
        record = json.loads(path.read_text())
        assert record["status"] == "ok"
        for key in ("metric", "value", "n_eval", "trainable_params", "total_params", "train_seconds",
                    "peak_mem_bytes", "device", "backend", "data", "config", "versions", "git"):
            assert key in record, (path, key)
        assert record["backend"] == "torch" and record["device"] == "cpu"
        assert (path.parent / "adapter.safetensors").is_file() and (path.parent / "train.log").is_file()
        assert not (path.parent / "checkpoint.pt").exists()
    generations = next((workdir / "results" / "runs" / "math").rglob("generations.jsonl"))
    assert json.loads(generations.read_text().splitlines()[0]).keys() >= {"generation", "prediction", "label", "correct"}


def test_tiny_figures_and_params_table(tiny_run):
    workdir, _ = tiny_run
    for experiment in ("vtab", "commonsense", "math"):
        for kind in ("params_vs_accuracy", "per_task"):
            png = workdir / "results" / "figures" / f"{experiment}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    params = pd.read_csv(workdir / "results" / "tables" / "params.csv")
    assert dict(zip(params["method"] + "@" + params["backbone"], params["trainable"])) == {
        "lorap_x@vim-s": 1_769_472, "lora_in_proj@vim-s": 1_474_560, "lorap_x@mamba-130m": 3_538_944}


def test_second_run_has_nothing_to_do_and_a_change_reruns_only_its_method(tiny_run, tmp_path):
    workdir, _ = tiny_run
    assert "Nothing to be done" in snakemake("-n", "--configfile", str(TINY), cwd=workdir).stdout
    changed = yaml.safe_load(TINY.read_text())
    changed["experiments"]["vtab"]["method_overrides"]["lorap_x"]["lora"]["rank"] = 2
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump(changed))
    done = snakemake("-n", "--configfile", str(config), cwd=workdir)
    counts = job_counts(done.stdout)
    assert counts["finetune"] == 2  # lorap_x on digits and position, nothing else
    assert counts["table"] == 1 and counts["figures"] == 1
    assert set(re.findall(r"method=(\w+)", done.stdout)) <= {"lorap_x"}


def test_report_shows_tables_and_figures(tiny_run):
    workdir, _ = tiny_run
    snakemake("--report", "results/report.html", "--configfile", str(TINY), cwd=workdir, timeout=300)
    html = (workdir / "results" / "report.html").read_text(errors="replace")
    assert "vtab_params_vs_accuracy.png" in html and "params.md" in html
