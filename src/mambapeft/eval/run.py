"""One run's evaluation job: the trained adapter on its backbone, evaluated on the run's eval
split or tasks, and ``metrics.json`` written atomically and last (the run contract's record:
the training record ``train.json`` plus the evaluation).

It is its own job so that adding an evaluation task or a metric re-runs evaluation only.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..build import build_trainable, read_training_record
from ..io import write_record_atomic
from ..runspec import ADAPTER, METRICS
from ..runtime import autocast_for, device_name, gpu_identity, resolve_device
from .classification import evaluate_top1
from .language import evaluate_language
from .synthetic import evaluate_lengths
from .text_classification import evaluate_long_reviews

log = logging.getLogger("mambapeft.eval")

# by domain, except for data kinds evaluated otherwise than their domain (synthetic recall tasks:
# accuracy per test length), whose entry wins; domain ids and data kinds are disjoint
EVALUATORS = {"vision": evaluate_top1, "language": evaluate_language, "synthetic": evaluate_lengths,
              "yelp_polarity": evaluate_long_reviews}


def evaluator_for(spec: dict):
    """The evaluation of a run spec: its data kind's entry when there is one, else its domain's."""
    kind = spec["data"].get("kind")
    return EVALUATORS[kind if kind in EVALUATORS else spec["domain"]]


def evaluate_run(spec: dict) -> dict:
    run_dir = Path(spec["output_dir"])
    record = {**read_training_record(run_dir, spec), "config": spec}
    if record["status"] == "ok":
        record.update(_evaluate(spec, run_dir))
    write_record_atomic(run_dir / METRICS, record)  # last: the run's completion marker
    return record


def _evaluate(spec: dict, run_dir: Path) -> dict:
    torch.set_num_threads(spec["runtime"]["threads"])
    device = resolve_device(spec["runtime"]["device"])
    trained = build_trainable(spec, device, adapter=run_dir / ADAPTER)
    trained.model.eval()
    started = time.perf_counter()
    evaluation = evaluator_for(spec)(trained.model, spec, device, autocast_for(device), run_dir)
    seconds = time.perf_counter() - started
    log.info("%s = %.2f on %d examples (%.1f s)", evaluation["metric"], evaluation["value"], evaluation["n_eval"], seconds)
    return {**evaluation, "eval_seconds": round(seconds, 3),
            "evaluation": {"device": device_name(device), "gpu": gpu_identity(device), "backend": trained.backend}}
