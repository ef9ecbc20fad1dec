"""The workflow as a user runs it: lint, the paper grid's job counts, and the tiny config end to end."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

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
    # the length study: 2 recall tasks x 3 base models x 2 settings x (9 methods x 3 seeds + zero-shot once)
    length_study = 2 * 3 * 2 * (9 * 3 + 1)
    # vtab: the paper's 28 Vim rows + 10 DoRA twins (lorap_x_dora too) + state_offset, 3 ProDiaL, sdt,
    # hybrid_importance; 5 ViT-S rows.
    # commonsense: 18 methods x 3 backbones, affix w/ proj at 130m only. Then math, the length study with
    # its Yelp runs (4 methods x 3 seeds) and Orca-Math (one LoRA per backbone).
    vtab = 19 * (28 + 10 + 6) + 19 * 5
    assert counts["finetune"] == vtab + (3 * 18 - 2) + 3 * 7 + length_study + 4 * 3 + 3
    assert counts["evaluate"] == counts["finetune"] - 3  # one evaluation job per run; Orca-Math's: the lm-eval suite
    assert counts["merge"] == counts["export_backbone"] == counts["tokenize_text"] == 3  # Orca-Math, per backbone
    assert counts["tokenize_labelled"] == 1  # Yelp, once for its one backbone's tokenizer
    assert counts["cache_images"] == 19 * 2  # train800val200 and test of every task, at 224
    assert counts["prepare_data"] == 3 + 1 + 1 + 1 and counts["prepare_backbone"] == 5 + 3  # + synthetic, Orca-Math, Yelp
    assert counts["download_hub_dataset"] == 5  # Yelp, Orca-Math, WikiText-2, OpenWebText, the lm-eval suite
    assert counts["lm_eval_suite_base"] == counts["lm_eval_suite_tuned"] == 3  # Orca-Math: base and merged, per backbone
    assert counts["search_train"] == counts["search_evaluate"] == 19 and counts["search_result"] == 2  # the final
    # combination on every VTAB task; one result per step (the trials appear as the checkpoints ask for them)
    assert counts["download_data"] == 3 and counts["download_weights"] == 5  # every dataset and official backbone
    jobs = [(rule, re.search(r"wildcards: \w+=(\S+)", body).group(1))
            for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)*)", done.stdout, re.M)
            if rule.startswith(("download_", "prepare_"))]
    fetched = {name: i for i, (rule, name) in enumerate(jobs) if rule.startswith("download_")}
    users = [(i, name) for i, (rule, name) in enumerate(jobs) if rule.startswith("prepare_") and name in fetched]
    assert users and all(i > fetched[name] for i, name in users)  # downloads are listed before their users
    assert counts["table"] == 3 and counts["figures"] == 3 and counts["params_table"] == 1
    assert counts["vim_vs_vit_figure"] == 1  # vtab has Vim-S and ViT-S rows
    assert counts["length_generalisation_report"] == 1  # the length study is in the paper's default target
    assert counts["pretrain_dt_init"] == 9 and counts["dt_init_table"] == 1  # so is the dt_init study
    # a --configfile replaces the default mini config: nothing of it (ranks, epochs, lrs) leaks in
    command = next(line for line in done.stdout.splitlines()
                   if "mambapeft train" in line and "runs/vtab/vim-s/cifar/lorap_x/seed0" in line)
    spec = json.loads(shlex.split(command)[shlex.split(command).index("--spec") + 1])
    expected = runspec.resolve_run(runspec.load_config(paper), runspec.Run("vtab", "vim-s", "cifar", "lorap_x", 0))
    # the training job sees no eval settings, and gets the execution settings on its command line, not in its params
    assert spec == json.loads(json.dumps(runspec.without_execution(runspec.training_spec(expected))))
    assert spec["train"]["epochs"] == 100 and spec["method"]["peft"][0]["rank"] == 64


def test_tiny_tables_have_one_row_per_method_with_real_numbers(tiny_run):
    workdir = tiny_run
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
    workdir = tiny_run
    runs = sorted((workdir / "results" / "runs").rglob("metrics.json"))
    assert len(runs) == 6 + 2 + 2
    for path in runs:
        record = json.loads(path.read_text())
        assert record["status"] == "ok"
        for key in ("metric", "value", "n_eval", "trainable_params", "total_params", "train_seconds",
                    "peak_mem_bytes", "device", "backend", "data", "config", "versions", "git"):
            assert key in record, (path, key)
        assert record["backend"] == "torch" and record["device"] == "cpu" and record["gpu"] is None
        assert record["evaluation"]["device"] == "cpu"
        for name in ("adapter.safetensors", "train.json", "train.log", "eval.log"):
            assert (path.parent / name).is_file(), (path, name)
        assert not (path.parent / "checkpoint.pt").exists()
    generations = next((workdir / "results" / "runs" / "math").rglob("generations.jsonl"))
    assert json.loads(generations.read_text().splitlines()[0]).keys() >= {"generation", "prediction", "label", "correct"}


def test_tiny_figures_and_params_table(tiny_run):
    workdir = tiny_run
    for experiment in ("vtab", "commonsense", "math"):
        for kind in ("params_vs_accuracy", "per_task"):
            png = workdir / "results" / "figures" / f"{experiment}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    params = pd.read_csv(workdir / "results" / "tables" / "params.csv")
    assert dict(zip(params["method"] + "@" + params["backbone"], params["trainable"])) == {
        "lorap_x@vim-s": 1_769_472, "lora_in_proj@vim-s": 1_474_560, "lorap_x@mamba-130m": 3_538_944}


def test_second_run_has_nothing_to_do_and_a_change_reruns_only_its_method(tiny_run, tmp_path):
    workdir = tiny_run
    assert "Nothing to be done" in snakemake("-n", "--configfile", str(TINY), cwd=workdir).stdout
    changed = yaml.safe_load(TINY.read_text())
    changed["experiments"]["vtab"]["method_overrides"]["lorap_x"]["lora"]["rank"] = 2
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump(changed))
    done = snakemake("-n", "--configfile", str(config), cwd=workdir)
    counts = job_counts(done.stdout)
    assert counts["finetune"] == 2 and counts["evaluate"] == 2  # lorap_x on digits and position, nothing else
    assert counts["table"] == 1 and counts["figures"] == 1
    assert set(re.findall(r"method=(\w+)", done.stdout)) <= {"lorap_x"}


EXECUTION_CHANGES = ("gpu_slots=2", "threads=2", "wandb={mode: offline}")


def test_gpu_slots_threads_and_wandb_re_run_nothing_and_a_recipe_change_still_does(tiny_run, tmp_path):
    """How jobs share a GPU, how many threads they use and where they log are resources and command-line
    flags, not params: changing them leaves nothing to do. The same run with a recipe change re-runs its
    experiment's training (with -c 2, so that the new thread count reaches the command lines)."""
    workdir = tiny_run
    done = snakemake("-n", "-c", "2", "--configfile", str(TINY), "--config", *EXECUTION_CHANGES, cwd=workdir)
    assert "Nothing to be done" in done.stdout, done.stdout[-3000:]
    changed = yaml.safe_load(TINY.read_text())
    changed["experiments"]["vtab"]["train"]["epochs"] = 3
    config = tmp_path / "longer.yaml"
    config.write_text(yaml.safe_dump(changed))
    done = snakemake("-n", "-p", "-c", "2", "--configfile", str(config), "--config", *EXECUTION_CHANGES, cwd=workdir)
    counts = job_counts(done.stdout)
    assert counts["finetune"] == counts["evaluate"] == 6  # vtab's three methods on its two tasks, nothing else
    assert set(re.findall(r"experiment=(\w+)", done.stdout)) == {"vtab"}
    command = next(line for line in done.stdout.splitlines() if "mambapeft train" in line)
    assert "--gpu-slots 2 --threads 2 --wandb '{\"mode\": \"offline\", \"project\": \"mambapeft\"}'" in command


def test_an_evaluation_with_another_thread_count_accepts_the_training_and_both_records_show_theirs(tiny_run,
                                                                                                   tmp_path):
    """The evaluate job gets the run's spec less the execution settings and its own --threads and --wandb:
    a training record written with other ones is the same run's, and each record shows what its job used."""
    spec = runspec.resolve_run(runspec.load_config(TINY), runspec.Run("vtab", "vim-mini", "digits", "lorap_x", 0))
    run_dir = tmp_path / spec["output_dir"]  # a copy of the run, beside the tiny run's data and backbone
    shutil.copytree(tiny_run / spec["output_dir"], run_dir)
    (run_dir / "metrics.json").unlink()
    (tmp_path / "resources").symlink_to(tiny_run / "resources")
    done = subprocess.run([sys.executable, "-m", "mambapeft.cli", "-q", "evaluate", "--threads", "2",
                           "--wandb", '{"mode": "offline"}', "--spec", json.dumps(runspec.without_execution(spec))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads((run_dir / "train.json").read_text())["config"]["runtime"]
    evaluated = json.loads((run_dir / "metrics.json").read_text())["config"]["runtime"]
    assert (trained["threads"], trained["wandb"]) == (1, {"mode": "disabled", "project": "mambapeft"})
    assert (evaluated["threads"], evaluated["wandb"]) == (2, {"mode": "offline"})


def test_a_new_eval_task_re_evaluates_and_never_re_trains(tiny_run, tmp_path):
    workdir = tiny_run
    changed = yaml.safe_load(TINY.read_text())
    changed["experiments"]["math"]["eval_tasks"] = ["mini_addsub", "mini_multiarith"]
    config = tmp_path / "more_eval.yaml"
    config.write_text(yaml.safe_dump(changed))
    counts = job_counts(snakemake("-n", "--configfile", str(config), cwd=workdir).stdout)
    assert "finetune" not in counts
    assert counts["evaluate"] == 2 and counts["table"] == 1  # zero_shot and affix_noproj on math


def _replace_text(path, text: str) -> None:
    """path's text replaced at once (a file beside it renamed over it): a test reading it meanwhile in
    another worker sees the old text or the new, never a part."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)


def test_editing_the_paper_numbers_rebuilds_only_what_shows_them(tiny_run):
    """vision/paper.yaml is an input of the vtab table (and of the parameter table, which shows
    the paper's counts): editing it schedules those and the figures drawn from the table. (A mere
    touch schedules nothing: Snakemake 9 compares the inputs' checksums.)"""
    workdir = tiny_run
    paper = REPO / "vision" / "paper.yaml"
    text, stat = paper.read_text(), paper.stat()
    try:  # the checkout's own file (the job counts need its path): the same data, a comment more
        _replace_text(paper, text + "# edited by tests/test_pipeline.py\n")
        done = snakemake("-n", "--configfile", str(TINY), cwd=workdir)
    finally:
        _replace_text(paper, text)
        os.utime(paper, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert job_counts(done.stdout) == {"table": 1, "figures": 1, "params_table": 1, "all": 1, "total": 4}
    assert set(re.findall(r"experiment=(\w+)", done.stdout)) == {"vtab"}


def test_a_misspelt_member_key_fails_the_dry_run_naming_file_method_and_key(tmp_path):
    root = tmp_path / "checkout"
    for folder in ("vision", "language", "workflow/schemas"):
        shutil.copytree(REPO / folder, root / folder)
    methods = root / "vision" / "methods.yaml"
    methods.write_text(methods.read_text().replace("part: x, rank: 64", "part: x, rnak: 64", 1))
    done = snakemake("-n", "--configfile", str(TINY), cwd=tmp_path, check=False, env={"MAMBAPEFT_ROOT": str(root)})
    assert done.returncode != 0
    line = next(line for line in (done.stdout + done.stderr).splitlines() if "rnak" in line)
    assert "vision/methods.yaml" in line and "'lorap_x'" in line and "unknown key(s) ['rnak']" in line


def test_report_shows_tables_and_figures(tiny_run):
    workdir = tiny_run
    snakemake("--report", "results/report.html", "--configfile", str(TINY), cwd=workdir, timeout=300)
    html = (workdir / "results" / "report.html").read_text(errors="replace")
    assert "vtab_params_vs_accuracy.png" in html and "params.md" in html
