"""lm-evaluation-harness task definitions over local files, and the commonsense evaluation of a run.

Every commonsense task of ``language/tasks.yaml`` names the lm-eval task whose definition it uses
(``lm_eval_yaml``: prompt, choices, target, process_docs). For each, we write a small task YAML
that ``include``s lm-eval's own file and replaces only where the records come from: the run's
``<root>/eval/<task>/<split>.jsonl`` (Hugging Face records, read by the ``json`` dataset builder),
so evaluation needs no hub and a mini task is scored exactly as the real task it imitates. The
metric list is the table's (``metrics``): acc and acc_norm wherever they are defined. The tasks of
the ``lm_eval_suite`` family (perplexities, 5-shot gsm8k) are defined the same way, with their
few-shot split and count, and may keep lm-eval's own metric list (``lm_eval_metrics``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from ..data.errors import DataError
from ..data.language_tasks import commonsense_eval_file, language_task, language_tasks, task_splits
from ..io import write_text_atomic

SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def offline_datasets() -> None:
    """The json dataset builder is local: never let Hugging Face libraries ask the hub."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def eval_files(data_root: str | Path, entry: dict) -> dict[str, Path]:
    """{split: <root>/eval/<task>/<split>.jsonl} of the split a task scores and of its few-shot split."""
    return {split: commonsense_eval_file(Path(data_root).resolve(), dict(entry, split=split))
            for split in task_splits(entry)}


def task_definition(name: str, data_root: str | Path, cache_dir: str | Path, family: str = "commonsense") -> dict:
    """The YAML content of local task ``name`` (of a tasks.yaml ``family``): lm-eval's definition over
    ``<root>/eval/<name>/<split>.jsonl``. ``cache_dir`` holds the datasets library's Arrow copy (a
    scratch folder, not the user's home)."""
    entry = language_task(family, name)
    base = lm_eval_tasks_dir() / entry["lm_eval_yaml"]
    if not base.is_file():
        raise DataError(f"lm-eval has no task file {base} (language/tasks.yaml, task '{name}'); "
                        "install the lm-eval version pyproject.toml pins")
    files = eval_files(data_root, entry)
    for records in files.values():
        if not records.is_file():
            raise DataError(f"{records}: eval file of task '{name}' not found; it holds one {entry['format']} record per line")
    definition = {
        "include": str(base),
        "task": name,
        "tag": [],  # not a member of the real task's groups
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}, "cache_dir": str(cache_dir)},
        **dict.fromkeys(SPLIT_KEYS),
        # lm-eval evaluates the test split when a task has one, else validation: keep the real task's choice
        ("test_split" if entry["split"] == "test" else "validation_split"): entry["split"],
        "fewshot_split": entry.get("fewshot_split"),
        "num_fewshot": int(entry.get("num_fewshot", 0)),
    }
    if not entry.get("lm_eval_metrics", False):
        definition["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in entry["metrics"]]
    return definition


def write_task_definitions(names: list[str], data_root: str | Path, scratch: str | Path,
                           family: str = "commonsense") -> Path:
    """One ``<name>.yaml`` per task under ``<scratch>/tasks`` (lm-eval's ``--include_path``)."""
    out_dir = Path(scratch) / "tasks"
    for name in names:
        definition = task_definition(name, data_root, Path(scratch) / "datasets_cache", family)
        write_text_atomic(out_dir / f"{name}.yaml", yaml.safe_dump(definition, sort_keys=False))
    return out_dir


def available_tasks(data_root: str | Path, family: str = "commonsense") -> list[str]:
    """The tasks of a tasks.yaml ``family`` whose eval files all exist under ``data_root``."""
    return [name for name, entry in language_tasks(family).items()
            if all(path.is_file() for path in eval_files(data_root, entry).values())]


def run_local_tasks(model, names: list[str], data_root: str | Path, family: str = "commonsense", **evaluate_kwargs) -> dict:
    """lm-eval's ``simple_evaluate`` over the local definitions of ``names`` (a tasks.yaml ``family``),
    each with its own few-shot count; ``model`` is an lm-eval LM or a registered model's name."""
    offline_datasets()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="mambapeft-lm-eval-") as scratch:
        include = write_task_definitions(names, data_root, scratch, family)
        manager = TaskManager(include_path=str(include), include_defaults=False)
        return simple_evaluate(model=model, tasks=list(names), task_manager=manager, num_fewshot=None,
                               bootstrap_iters=0, log_samples=True, verbosity="WARNING", **evaluate_kwargs)


def evaluate_choice_tasks(lm, names: list[str], data_root: str | Path) -> tuple[dict, list[dict]]:
    """Run lm-eval zero-shot on ``names`` with the model adapter ``lm``.

    Returns ({task: {acc, acc_norm, n, report}} in percent, and one row per scored document
    (its target, log-likelihoods and correctness) for a reader to inspect.
    """
    out = run_local_tasks(lm, names, data_root)
    results, rows = {}, []
    for name in names:
        entry, scores = language_task("commonsense", name), out["results"][name]
        results[name] = {m: 100.0 * scores[f"{m},none"] for m in entry["metrics"]}
        results[name].update(n=int(out["n-samples"][name]["effective"]), report=entry["report"])
        rows += [_sample_row(name, sample, entry["metrics"]) for sample in out["samples"][name]]
    return results, rows


def _sample_row(task: str, sample: dict, metrics: list[str]) -> dict:
    return {"task": task, "doc_id": sample["doc_id"], "target": sample["target"],
            "loglikelihoods": [float(r[0]) for r in sample["filtered_resps"]],
            **{m: sample[m] for m in metrics}}

