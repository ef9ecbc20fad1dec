"""`mambapeft data check`: validate a dataset on disk and summarise it, before any training starts.

What each kind expects at `path`:

- `vtab`: the VTAB-1k root, with `task` naming one task of vision/tasks.yaml. `train800val200.txt`
  and `test.txt` are required (MambaPEFT trains on the first and reports the second);
  `train800.txt` and `val200.txt` are checked when present. Every line is parsed, every image is
  fully decoded (so truncated files are caught) and no image may be listed in both a training
  split and the test split. splits: train = train800val200, val = val200, test = test.
- `commonsense`: a directory holding `commonsense_170k.json` (LLM-Adapters records) and
  `eval/<task>/<split>.jsonl` (Hugging Face records, one per line) for the multiple-choice tasks of
  language/tasks.yaml; `task` picks one, otherwise every task whose file exists is checked (at
  least one must). This is what `mini_text.write_mini_commonsense` writes; for the real data put
  LLM-Adapters' `ft-training_set/commonsense_170k.json` and the lm-eval splits there.
- `math`: a directory holding `math_10k.json` and `eval/<dir>/test.json` (LLM-Adapters test sets,
  `dir` from language/tasks.yaml); `task` as above. This is what `mini_text.write_mini_math`
  writes; for the real data copy LLM-Adapters' `dataset/<dir>/test.json` files there.

- `synthetic`: the directory `prepare_data` wrote for a `kind: synthetic` entry (the length
  study's recall tasks): `synthetic.json` indexes `train/<train set>.jsonl` and
  `test/<generator>/length_<L>.jsonl`. Every record is checked against its generator: its length
  is one the file allows, the query is last, COPY appears once and the answer is the token after
  it (`data/synthetic.py`); `task` picks one training set and its generator's test sets.

- `orca_math`: a local copy of microsoft/orca-math-word-problems-200k (the Hub's
  `data/train-*.parquet`, JSON lines, or a `save_to_disk` directory) read through `datasets`; every
  record must have a non-empty string `question` and `answer` (`data/orca_math.py`).

- `yelp_polarity`: a local copy of fancyzhx/yelp_polarity in the Hub's parquet layout
  (`plain_text/{train,test}-*.parquet`) read through `datasets`; every row needs a string `text`
  and a label 0 or 1 (`data/yelp_polarity.py`); the summary counts each split's labels.

For commonsense and math, the training file itself is accepted in place of the directory (its eval
sets are beside it).

For the language kinds the validation split is carved out of the training file at training time,
so `splits.val` is null. Math test questions that also appear verbatim among the training
instructions are counted per task in `train_test_overlap` rather than refused: LLM-Adapters'
math_10k knowingly contains AddSub/MultiArith/SingleEq questions (it says to report MAWPS instead).
"""

import math
from pathlib import Path

from mambapeft.data.choice_formats import mc_task
from mambapeft.data.errors import DataError
from mambapeft.data.instruct import read_instruct_json
from mambapeft.data.language_tasks import commonsense_eval_file, language_task, language_tasks, math_eval_file
from mambapeft.data.math_answers import extract_answer
from mambapeft.data.orca_math import check_orca_math
from mambapeft.data.synthetic import check_synthetic
from mambapeft.data.vtab import load_rgb, logged_progress, read_split, split_file, task_info
from mambapeft.data.yelp_polarity import check_yelp_polarity

KINDS = ("vtab", "commonsense", "math", "synthetic", "orca_math", "yelp_polarity")
TRAIN_FILES = {"commonsense": "commonsense_170k.json", "math": "math_10k.json"}


def check_dataset(kind: str, path: str | Path, task: str | None = None) -> dict:
    """Validate the dataset of `kind` at `path`; return a JSON-able summary or raise DataError."""
    checkers = {"vtab": _check_vtab, "commonsense": _check_commonsense, "math": _check_math,
                "synthetic": check_synthetic, "orca_math": check_orca_math,
                "yelp_polarity": check_yelp_polarity}
    if kind not in checkers:
        raise DataError(f"unknown dataset kind '{kind}'; use one of {', '.join(KINDS)}")
    path = _language_root(kind, Path(path)) if kind in TRAIN_FILES else Path(path)
    return checkers[kind](path, task)


# --- vision -----------------------------------------------------------------------------------

def _check_vtab(root: Path, task: str | None) -> dict:
    if task is None:
        raise DataError("checking a VTAB-1k dataset needs a task (e.g. --task cifar); see vision/tasks.yaml")
    info = task_info(task)
    present = [split for split in ("train800", "val200") if split_file(root, task, split).is_file()]
    lists = {split: read_split(root, task, split) for split in ("train800val200", *present, "test")}
    for split, samples in lists.items():
        _decode_all(root / task, samples, f"checking {task}/{split}")
    for split in ("train800val200", *present):
        _refuse_shared_images(root, task, split, lists[split], lists["test"])
    return {
        "kind": "vtab",
        "task": task,
        "splits": {"train": len(lists["train800val200"]), "val": len(lists["val200"]) if "val200" in lists else None, "test": len(lists["test"])},
        "lists": {split: len(samples) for split, samples in lists.items()},
        "num_classes": info["num_classes"],
        "classes_in_train": len({label for _, label in lists["train800val200"]}),
        "expected_test_size": info.get("test_size"),
    }


def _decode_all(task_dir: Path, samples: list[tuple[str, int]], description: str) -> None:
    """Fully decode every image (a header check would miss truncated JPEGs), logging progress as `data cache` does."""
    for relative, _ in logged_progress(samples, description):
        load_rgb(task_dir / relative)


def _refuse_shared_images(root: Path, task: str, split: str, train: list, test: list) -> None:
    task_dir = root / task
    test_images = {(task_dir / relative).resolve() for relative, _ in test}
    shared = sorted(relative for relative, _ in train if (task_dir / relative).resolve() in test_images)
    if shared:
        raise DataError(
            f"{split_file(root, task, split)}: {len(shared)} image(s) also listed in {split_file(root, task, 'test')}, "
            f"e.g. {shared[0]}; training images must not be test images, fix the split lists"
        )


# --- language ---------------------------------------------------------------------------------

def _language_root(kind: str, path: Path) -> Path:
    """The data directory; given its training file instead, the directory that holds it (eval/ is beside it)."""
    if path.is_file() and path.name == TRAIN_FILES[kind]:
        return path.parent
    if not path.is_dir():
        problem = "is a file" if path.is_file() else "does not exist"
        raise DataError(f"{path} {problem}; give the {kind} data directory that holds {TRAIN_FILES[kind]} and eval/")
    return path


def _train_records(kind: str, root: Path) -> list[dict]:
    return read_instruct_json(root / TRAIN_FILES[kind])


def _chosen_tasks(kind: str, root: Path, task: str | None, eval_file) -> dict[str, Path]:
    """{task: eval file} for the requested task, or for every task whose eval file exists."""
    names = [task] if task is not None else list(language_tasks(kind))
    files = {name: eval_file(root, language_task(kind, name)) for name in names}
    found = {name: path for name, path in files.items() if task is not None or path.is_file()}
    if not found:
        raise DataError(f"{root / 'eval'}: no {kind} eval set found; expected e.g. {next(iter(files.values()))}")
    return found


def _language_summary(kind: str, task: str | None, train: list, tasks: dict) -> dict:
    return {
        "kind": kind,
        "task": task,
        "splits": {"train": len(train), "val": None, "test": sum(entry["test"] for entry in tasks.values())},
        "tasks": tasks,
    }


def _check_commonsense(root: Path, task: str | None) -> dict:
    train = _train_records("commonsense", root)
    tasks = {}
    for name, path in _chosen_tasks("commonsense", root, task, commonsense_eval_file).items():
        mc = mc_task(name)
        docs = mc.load(path)
        tasks[name] = {"test": len(docs), "num_choices": max(len(mc.choices(doc)) for doc in docs), "file": str(path)}
    summary = _language_summary("commonsense", task, train, tasks)
    if task is not None:
        summary["num_choices"] = tasks[task]["num_choices"]
    return summary


def _check_math(root: Path, task: str | None) -> dict:
    train = _train_records("math", root)
    instructions = {record["instruction"].strip() for record in train}
    tasks = {}
    for name, path in _chosen_tasks("math", root, task, math_eval_file).items():
        kind = language_task("math", name)["answer"]
        records = read_instruct_json(path)
        for index, record in enumerate(records):
            _check_math_answer(path, index, record["answer"], kind)
        overlap = sum(record["instruction"].strip() in instructions for record in records)
        tasks[name] = {"test": len(records), "answer": kind, "file": str(path), "train_test_overlap": overlap}
    summary = _language_summary("math", task, train, tasks)
    if task is not None:
        summary["answer"] = tasks[task]["answer"]
    return summary


def _check_math_answer(path: Path, index: int, answer: str, kind: str) -> None:
    """The label must be what extraction can produce: one number, or one letter A-E."""
    parsed = extract_answer(answer, kind)
    valid = parsed != "" and parsed != math.inf and (kind != "letter" or answer.strip() == parsed)
    if not valid:
        raise DataError(f"{path}: record {index} has answer {answer!r}, not a {kind}; fix the record's 'answer'")
