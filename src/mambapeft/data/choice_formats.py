"""Zero-shot multiple-choice tasks, formatted exactly as lm-evaluation-harness formats them.

For every commonsense task MambaPEFT evaluates, this module reproduces lm-eval's `doc_to_text`,
`doc_to_choice` and `doc_to_target` on the task's Hugging Face record format, and lm-eval's
zero-shot request construction: one (context, continuation) pair per choice, continuation =
target_delimiter (" ") + choice. The model scores each pair by the log-likelihood of the
continuation; acc takes the argmax, acc_norm the argmax of log-likelihood / len(choice) in
characters, where `choice` is the `choices(doc)` string (without the delimiter).

WinoGrande is lm-eval's one "multiple input" task ("partial evaluation"): the blank `_` of the
sentence is filled with each option and the text up to the blank becomes the context, while the
continuation is the rest of the sentence, shared by both choices:
    requests = [(sentence[:blank] + option, " " + sentence[blank + 1:].strip()) for each option]
so the model compares how well each filled-in prefix predicts the same ending. `choices(doc)`
returns the two contexts (what lm-eval's doc_to_choice returns), and the gold index comes from
`answer` ("1" or "2").

Eval files are JSONL: one Hugging Face dataset record per line (`<root>/eval/<task>/<split>.jsonl`).
Formats are shared: `mini_arc` uses the ARC format and `mini_boolq` the BoolQ format, so one
entry in language/tasks.yaml (`format:`) registers a new task.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mambapeft.data.errors import DataError, where
from mambapeft.data.language_tasks import language_task, language_tasks

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class McFormat:
    """One lm-eval task's formatting: the record fields it reads and its three doc_to_* functions."""

    fields: tuple[str, ...]
    """Record fields the format reads (checked when the file is loaded)."""
    contexts: Callable[[dict], list[str]]
    """The context of each request: one shared context, or one per choice (WinoGrande)."""
    choices: Callable[[dict], list[str]]
    """lm-eval's doc_to_choice."""
    continuations: Callable[[dict], list[str]]
    """Text scored after the delimiter: the choices, or WinoGrande's shared sentence ending."""
    gold: Callable[[dict], int]
    """Index of the correct choice."""
    process: Callable[[dict], dict] = lambda doc: doc
    """lm-eval's process_docs, applied once when the file is loaded."""


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: drop WikiHow artefacts such as '[title]' and '[header]'."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_process(doc: dict) -> dict:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return dict(
        doc,
        query=_hellaswag_clean(doc["activity_label"] + ": " + context),
        choices=[_hellaswag_clean(ending) for ending in doc["endings"]],
        gold=int(doc["label"]),
    )


def _winogrande_blank(doc: dict) -> int:
    return doc["sentence"].index("_")


def _winogrande_contexts(doc: dict) -> list[str]:
    blank = _winogrande_blank(doc)
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _winogrande_ending(doc: dict) -> str:
    return doc["sentence"][_winogrande_blank(doc) + 1:].strip()


def _single_input(fields, text, choices, gold, process=lambda doc: doc) -> McFormat:
    """A format whose choices are the continuations after one shared context (all tasks but WinoGrande)."""
    return McFormat(
        fields=fields,
        contexts=lambda doc: [text(doc)] * len(choices(doc)),
        choices=choices,
        continuations=choices,
        gold=gold,
        process=process,
    )


FORMATS: dict[str, McFormat] = {
    # super_glue/boolq/default.yaml
    "boolq": _single_input(
        ("passage", "question", "label"),
        text=lambda doc: f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
        choices=lambda doc: ["no", "yes"],
        gold=lambda doc: int(doc["label"]),
    ),
    # piqa/piqa.yaml
    "piqa": _single_input(
        ("goal", "sol1", "sol2", "label"),
        text=lambda doc: f"Question: {doc['goal']}\nAnswer:",
        choices=lambda doc: [doc["sol1"], doc["sol2"]],
        gold=lambda doc: int(doc["label"]),
    ),
    # siqa/siqa.yaml: labels are "1".."3"
    "social_iqa": _single_input(
        ("context", "question", "answerA", "answerB", "answerC", "label"),
        text=lambda doc: f"Q: {doc['context']} {doc['question']}\nA:",
        choices=lambda doc: [doc["answerA"], doc["answerB"], doc["answerC"]],
        gold=lambda doc: int(doc["label"]) - 1,
    ),
    # hellaswag/hellaswag.yaml + utils.process_docs
    "hellaswag": _single_input(
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        text=lambda doc: doc["query"],
        choices=lambda doc: doc["choices"],
        gold=lambda doc: doc["gold"],
        process=_hellaswag_process,
    ),
    # winogrande/default.yaml + preprocess_winogrande.py (partial evaluation, see module docstring)
    "winogrande": McFormat(
        fields=("sentence", "option1", "option2", "answer"),
        contexts=_winogrande_contexts,
        choices=_winogrande_contexts,
        continuations=lambda doc: [_winogrande_ending(doc)] * 2,
        gold=lambda doc: {"1": 0, "2": 1}[str(doc["answer"])],
    ),
    # arc/arc_easy.yaml (arc_challenge includes it)
    "arc": _single_input(
        ("question", "choices", "answerKey"),
        text=lambda doc: f"Question: {doc['question']}\nAnswer:",
        choices=lambda doc: doc["choices"]["text"],
        gold=lambda doc: doc["choices"]["label"].index(doc["answerKey"]),
    ),
    # openbookqa/openbookqa.yaml: the question stem alone is the context
    "openbookqa": _single_input(
        ("question_stem", "choices", "answerKey"),
        text=lambda doc: doc["question_stem"],
        choices=lambda doc: doc["choices"]["text"],
        gold=lambda doc: doc["choices"]["label"].index(doc["answerKey"].lstrip()),
    ),
}


@dataclass(frozen=True)
class McTask:
    """A zero-shot multiple-choice task: load its records, build lm-eval requests, give the gold index."""

    name: str
    format: McFormat
    split: str
    metrics: tuple[str, ...]
    report: str
    target_delimiter: str = TARGET_DELIMITER

    def load(self, path: str | Path) -> list[dict]:
        """Read a JSONL eval file, check each record has this format's fields and a valid gold index."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: eval file for task '{self.name}' not found; expected one JSON record per line ({self.split} split)")
        docs = [self._checked_doc(line, path, number) for number, line in enumerate(_read_lines(path), start=1) if line.strip()]
        if not docs:
            raise DataError(f"{path}: eval file for task '{self.name}' is empty; it must hold one JSON record per line")
        return docs

    def _checked_doc(self, line: str, path: Path, number: int) -> dict:
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where(path, number)}: not valid JSON ({error}); each line must be one record") from None
        missing = [field for field in self.format.fields if not isinstance(doc, dict) or field not in doc]
        if missing:
            raise DataError(f"{where(path, number)}: record lacks {missing}; task '{self.name}' needs {list(self.format.fields)}")
        try:
            doc = self.format.process(doc)
            gold, choices = self.format.gold(doc), self.format.choices(doc)
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise DataError(f"{where(path, number)}: record does not fit the '{self.name}' format ({error!r}); check its fields") from None
        if not 0 <= gold < len(choices):
            raise DataError(f"{where(path, number)}: gold index {gold} is outside the {len(choices)} choices; fix the record's label")
        return doc

    def choices(self, doc: dict) -> list[str]:
        """lm-eval's doc_to_choice (its lengths in characters normalise acc_norm)."""
        return self.format.choices(doc)

    def requests(self, doc: dict) -> list[tuple[str, str]]:
        """One (context, continuation) pair per choice, in choice order; the continuation starts with the delimiter."""
        return [
            (context, self.target_delimiter + continuation)
            for context, continuation in zip(self.format.contexts(doc), self.format.continuations(doc), strict=True)
        ]

    def gold(self, doc: dict) -> int:
        """Index of the correct choice."""
        return self.format.gold(doc)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); it must be JSON lines") from None


def mc_task(name: str) -> McTask:
    """The multiple-choice task `name` of language/tasks.yaml; unknown names list the known ones."""
    entry = language_task("commonsense", name)
    if entry["format"] not in FORMATS:
        raise DataError(f"language/tasks.yaml: task '{name}' has format '{entry['format']}'; use one of {', '.join(FORMATS)}")
    return McTask(
        name=name,
        format=FORMATS[entry["format"]],
        split=entry["split"],
        metrics=tuple(entry["metrics"]),
        report=entry["report"],
    )


def mc_task_names() -> list[str]:
    """Every multiple-choice task in language/tasks.yaml."""
    return list(language_tasks("commonsense"))
