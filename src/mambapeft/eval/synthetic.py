"""Accuracy of a model fine-tuned on a synthetic recall task (``data/synthetic.py``) at every test
length of its data entry: the prediction is the argmax at the query position (the last token),
read from the parallel forward. One line per scored sequence goes beside the run's metrics."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..data.synthetic import generator_of, read_records, test_file
from ..io import write_text_atomic

PREDICTIONS_FILE = "predictions.jsonl"


@torch.no_grad()
def length_accuracy(model: nn.Module, records: list[dict], batch_size: int, device,
                    autocast) -> tuple[float, list[int]]:
    """Accuracy (%) of the answers of equal-length ``records``, and the predictions."""
    predictions = []
    for start in range(0, len(records), batch_size):
        ids = torch.tensor([r["tokens"] for r in records[start:start + batch_size]], device=device)  # (B, L)
        with autocast():
            logits = model.lm_head(model.forward_hidden(ids)[:, -1])  # (B, V) at the query
        predictions += logits.argmax(-1).tolist()
    correct = sum(p == r["answer"] for p, r in zip(predictions, records))
    return 100.0 * correct / len(records), predictions


def evaluate_lengths(model: nn.Module, spec: dict, device: torch.device, autocast, run_dir: Path) -> dict:
    data = spec["data"]
    generator = generator_of(data["root"], data["task"])
    results, rows, batch_size = {}, [], int(spec["train"]["eval"]["batch_size"])
    for length in sorted(int(n) for n in data["test_lengths"]):
        records = read_records(test_file(data["root"], generator, length))
        accuracy, predictions = length_accuracy(model, records, batch_size, device, autocast)
        results[str(length)] = {"acc": accuracy, "n": len(records), "length": length, "report": "acc"}
        rows += [{"length": length, "index": i, "answer": r["answer"], "prediction": p}
                 for i, (r, p) in enumerate(zip(records, predictions))]
    write_text_atomic(Path(run_dir) / PREDICTIONS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    return {"metric": "acc", "value": sum(r["acc"] for r in results.values()) / len(results),
            "n_eval": sum(r["n"] for r in results.values()), "results": results,
            "generator": generator}
