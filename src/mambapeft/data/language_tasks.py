"""The language task table (language/tasks.yaml): commonsense multiple-choice, math and lm-eval suite tasks."""

import functools
from pathlib import Path


from mambapeft.data.errors import DataError
from mambapeft.data.files import read_yaml

TASKS_YAML = Path(__file__).resolve().parents[3] / "language" / "tasks.yaml"

_REQUIRED = {
    "commonsense": ("format", "lm_eval_yaml", "split", "num_choices", "metrics", "report"),
    "math": ("answer", "dir"),
    "lm_eval_suite": ("format", "lm_eval_yaml", "split", "metrics"),
}


@functools.cache
def _load_table() -> dict[str, dict[str, dict]]:
    table = read_yaml(TASKS_YAML)
    for family, required in _REQUIRED.items():
        for name, entry in table.get(family, {}).items():
            missing = [key for key in required if key not in entry]
            if missing:
                raise DataError(f"{TASKS_YAML}: {family} task '{name}' lacks {missing}; every {family} task needs {list(required)}")
    return table


def language_tasks(family: str) -> dict[str, dict]:
    """All tasks of one family ('commonsense', 'math' or 'lm_eval_suite'): {name: entry with `name` and `mini` filled in}."""
    if family not in _REQUIRED:
        raise DataError(f"unknown language task family '{family}'; use one of {', '.join(_REQUIRED)}")
    return {name: dict(entry, name=name, mini=bool(entry.get("mini", False))) for name, entry in _load_table().get(family, {}).items()}


def commonsense_eval_file(root: str | Path, entry: dict) -> Path:
    """A multiple-choice task's records under a commonsense data root: eval/<task>/<split>.jsonl."""
    return Path(root) / "eval" / entry["name"] / f"{entry['split']}.jsonl"


def task_splits(entry: dict) -> list[str]:
    """The split a task scores, then its few-shot split when it has one."""
    return [entry["split"], *([entry["fewshot_split"]] if entry.get("fewshot_split") else [])]


def math_eval_file(root: str | Path, entry: dict) -> Path:
    """A math task's LLM-Adapters test set under a math data root: eval/<dir>/test.json."""
    return Path(root) / "eval" / entry["dir"] / "test.json"


def language_task(family: str, name: str) -> dict:
    """One task's entry; an unknown name lists the known ones."""
    tasks = language_tasks(family)
    if name not in tasks:
        raise DataError(f"{TASKS_YAML}: unknown {family} task '{name}'; known tasks: {', '.join(tasks)}")
    return tasks[name]
