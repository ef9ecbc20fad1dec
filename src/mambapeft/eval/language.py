"""Evaluations of a fine-tuned Mamba LM: zero-shot multiple choice through lm-evaluation-harness
(commonsense) or greedy generation with answer extraction (math). Each writes one line per scored
example beside the run's metrics, so a reader can inspect the failures."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..data.instruct import read_instruct_json
from ..data.language_tasks import language_task, math_eval_file
from ..data.tokenizer import backbone_tokenizer_path, load_tokenizer
from ..io import write_text_atomic
from .generate import evaluate_math_task

SAMPLES_FILE = {"commonsense": "lm_eval_samples.jsonl", "math": "generations.jsonl"}


@torch.no_grad()
def evaluate_language(model: nn.Module, spec: dict, device: torch.device, autocast, run_dir: Path) -> dict:
    kind = spec["data"]["kind"]
    tokenizer = load_tokenizer(backbone_tokenizer_path(spec["backbone"]))
    evaluate = _evaluate_choice if kind == "commonsense" else _evaluate_math
    results, rows = evaluate(model, tokenizer, spec, device, autocast)
    write_text_atomic(Path(run_dir) / SAMPLES_FILE[kind], "".join(json.dumps(r) + "\n" for r in rows))
    headline = sum(r[r["report"]] for r in results.values()) / len(results)
    return {"metric": "acc", "value": headline, "n_eval": sum(r["n"] for r in results.values()),
            "results": results}


def _evaluate_choice(model, tokenizer, spec, device, autocast) -> tuple[dict, list[dict]]:
    from .lm_eval_model import MambaPeftLM
    from .lm_eval_tasks import evaluate_choice_tasks

    lm = MambaPeftLM.wrap(model, tokenizer, device=device, autocast=autocast,
                          batch_size=int(spec["train"]["eval"]["batch_size"]))
    return evaluate_choice_tasks(lm, list(spec["data"]["eval_tasks"]), Path(spec["data"]["root"]))


def _evaluate_math(model, tokenizer, spec, device, autocast) -> tuple[dict, list[dict]]:
    results, rows, settings = {}, [], spec["train"]["eval"]
    for name in spec["data"]["eval_tasks"]:
        info = language_task("math", name)
        records = read_instruct_json(math_eval_file(Path(spec["data"]["root"]), info))
        scores, task_rows = evaluate_math_task(
            model, tokenizer, records, info["answer"], max_new_tokens=int(settings["max_new_tokens"]),
            device=device, autocast=autocast, batch_size=int(settings["batch_size"]))
        results[name] = {**scores, "report": "acc"}
        rows += [{"task": name, **r} for r in task_rows]
    return results, rows
