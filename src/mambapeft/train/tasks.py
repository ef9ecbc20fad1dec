"""The training task of each run: what turns a run spec's data into batches and a loss.

Keyed by domain, except for data kinds whose training differs from their domain's (the synthetic
recall tasks are language-domain runs on token sequences without a tokenizer): such a kind has
its own entry, which wins over the domain's. Domain ids and data kinds are disjoint.
"""
from __future__ import annotations

from .language import LanguageTask
from .orca_math import OrcaMathTask
from .synthetic import SyntheticTask
from .text_classification import TextClassificationTask
from .vision import VisionTask

TASKS = {"vision": VisionTask, "language": LanguageTask, "synthetic": SyntheticTask,
         "yelp_polarity": TextClassificationTask, "orca_math": OrcaMathTask}


def task_class(spec: dict) -> type:
    """The task of a run spec: its data kind's entry when there is one, else its domain's."""
    kind = spec["data"].get("kind")
    return TASKS[kind if kind in TASKS else spec["domain"]]
