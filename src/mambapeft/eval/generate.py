"""Math evaluation: greedy generation with the recurrent step mode, LLM-Adapters answer extraction."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from ..data.instruct import generate_prompt
from ..data.math_answers import extract_answer, is_correct


@torch.no_grad()
def greedy_generations(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                       device: torch.device, autocast: Callable) -> list[str]:
    """Decoded continuations. Prompts of equal token length are batched together, so no padding
    ever enters the recurrent state and a prompt's output does not depend on its batch."""
    encoded = [tokenizer.encode(p) for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    outputs = [""] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            with autocast():
                generated = model.generate(ids, max_new_tokens, stop_ids=(tokenizer.eos_id,))
            for i, row in zip(chunk, generated.tolist()):
                outputs[i] = tokenizer.decode([t for t in row if t != tokenizer.eos_id])
    return outputs


def evaluate_math_task(model, tokenizer, records: list[dict], kind: str, **kwargs) -> tuple[dict, list[dict]]:
    """Accuracy (percent) and one inspection row per example (prompt, generation, prediction, label)."""
    prompts = [generate_prompt(r["instruction"], r.get("input")) for r in records]
    generations = greedy_generations(model, tokenizer, prompts, **kwargs)
    rows = []
    for record, text in zip(records, generations):
        prediction = extract_answer(text, kind)
        rows.append({"instruction": record["instruction"], "generation": text, "prediction": prediction,
                     "label": record["answer"], "correct": is_correct(prediction, record["answer"], kind)})
    accuracy = 100.0 * sum(r["correct"] for r in rows) / len(rows)
    return {"acc": accuracy, "n": len(rows)}, rows
