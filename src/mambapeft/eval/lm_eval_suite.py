"""The lm-eval suite of the Orca-Math study: one model (base or fine-tuned) scored by
lm-evaluation-harness on local copies of its tasks, and the check that two ways of loading the
fine-tuned model score alike.

A model is named as lm-eval names it: ``hf`` with ``pretrained=<transformers directory>`` (a
merged model, as the study evaluated its published ones) or ``mambapeft`` with
``backbone=<directory>[,adapter=<adapter.safetensors>][,tokenizer=<directory>]`` (our model
adapter, which reads either checkpoint layout and applies an unmerged adapter). The tasks are the
``lm_eval_suite`` family of language/tasks.yaml (:mod:`.lm_eval_tasks` defines them over the files).
"""
from __future__ import annotations

from pathlib import Path

from ..data.language_tasks import language_task
from .lm_eval_tasks import run_local_tasks

FAMILY = "lm_eval_suite"
LM_EVAL_MODELS = ("hf", "mambapeft")


def is_percent(metric: str) -> bool:
    """Accuracies and exact matches are reported in percent; perplexities as they are."""
    return "perplexity" not in metric


def _result_key(metric: str) -> str:
    return metric if "," in metric else f"{metric},none"


def evaluate_suite(model: str, model_args: dict, tasks: list[str], data_root: str | Path, *, device: str,
                   batch_size: int, limit: int | None = None, gen_kwargs: str | None = None) -> dict:
    """Scores of lm-eval model ``model`` on ``tasks``: {"scores": {task: {metric: value, "n": docs}},
    "samples": {task: [per-document log-likelihoods or generations]}}. ``gen_kwargs`` (lm-eval's
    "key=value,..." string) overrides the generation settings of generating tasks (e.g. max_gen_toks)."""
    if model not in LM_EVAL_MODELS:
        raise ValueError(f"lm-eval model {model!r} is not one of {LM_EVAL_MODELS}")
    if model == "mambapeft":
        from . import lm_eval_model  # noqa: F401  (registers the model "mambapeft" with lm-eval)
    out = run_local_tasks(model, tasks, data_root, FAMILY, model_args=model_args, device=device,
                          batch_size=batch_size, limit=limit, gen_kwargs=gen_kwargs)
    scores, samples = {}, {}
    for name in tasks:
        results = out["results"][name]
        scores[name] = {m: (100.0 if is_percent(m) else 1.0) * float(results[_result_key(m)])
                        for m in language_task(FAMILY, name)["metrics"]}
        scores[name]["n"] = int(out["n-samples"][name]["effective"])
        samples[name] = [_sample_values(s) for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
    return {"scores": scores, "samples": samples}


def _sample_values(sample: dict) -> list:
    """What the model answered for one document: log-likelihoods (float) or generated text (str)."""
    values = []
    for response in sample["resps"]:
        first = response[0]
        values.append(float(first[0]) if isinstance(first, (tuple, list)) else first)
    return values


def agreement(reference: dict, other: dict, *, atol: float) -> dict:
    """How closely two evaluations of the same weights agree on the tasks both scored: the largest
    log-likelihood difference, whether every generation and every metric is the same, and whether
    that is within ``atol`` (nats per scored continuation)."""
    tasks = sorted(set(reference["scores"]) & set(other["scores"]))
    if not tasks:
        raise ValueError("the two evaluations share no task; score at least one task both ways")
    largest, same_text, metric_gaps = 0.0, True, {}
    for name in tasks:
        for ours, theirs in zip(reference["samples"][name], other["samples"][name], strict=True):
            for a, b in zip(ours, theirs, strict=True):
                if isinstance(a, str):
                    same_text &= a == b
                else:
                    largest = max(largest, abs(a - b))
        metric_gaps[name] = {m: abs(v - other["scores"][name][m]) for m, v in reference["scores"][name].items() if m != "n"}
    return {"tasks": tasks, "atol": atol, "max_loglikelihood_difference": largest, "same_generations": same_text,
            "metric_differences": metric_gaps, "agree": largest <= atol and same_text}
