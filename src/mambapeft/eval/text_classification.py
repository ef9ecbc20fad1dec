"""Accuracy of a Mamba LM classifier (``models/lm_classifier.py``) on Yelp polarity's long test
reviews, the learnable-input study's "short -> long" setting: every test review of at least the
first of ``test_lengths`` tokens, overall and per length band (band ``L`` holds the reviews of
``L`` up to the next of ``test_lengths`` tokens; the last band is open), read from the dataset's
token cache (rule tokenize_labelled). One line per review goes beside the run's metrics."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..data.tokenizer import backbone_tokenizer_path, load_tokenizer
from ..data.yelp_polarity import cached_reviews
from ..io import write_text_atomic

PREDICTIONS_FILE = "predictions.jsonl"


def length_band(length: int, bands: list[int]) -> int:
    """The largest band start at most ``length`` (``bands`` sorted; ``length`` >= the first)."""
    return max(b for b in bands if b <= length)


def _accuracy(rows: list[dict]) -> float:
    """% of ``rows`` whose prediction is their label."""
    return 100.0 * sum(r["label"] == r["prediction"] for r in rows) / len(rows)


@torch.no_grad()
def predict(model: nn.Module, records: list[dict], batch_size: int, pad_id: int, autocast) -> list[int]:
    """Predicted labels of ``records``, batched by similar lengths (less padding), in input order."""
    order = sorted(range(len(records)), key=lambda i: len(records[i]["tokens"]))
    predictions = [0] * len(records)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        with autocast():
            logits = model.classify([records[i]["tokens"] for i in chunk], pad_id)
        for i, label in zip(chunk, logits.argmax(-1).tolist()):
            predictions[i] = label
    return predictions


def evaluate_long_reviews(model: nn.Module, spec: dict, device: torch.device, autocast, run_dir: Path) -> dict:
    data = spec["data"]
    tokenizer = load_tokenizer(backbone_tokenizer_path(spec["backbone"]))
    bands = sorted(int(n) for n in data["test_lengths"])
    records = cached_reviews(data["tokens"], data["root"], "test", tokenizer, min_tokens=bands[0])
    predictions = predict(model, records, int(spec["train"]["eval"]["batch_size"]), tokenizer.pad_id, autocast)
    rows = [{"index": i, "length": len(r["tokens"]), "band": length_band(len(r["tokens"]), bands),
             "label": r["label"], "prediction": p} for i, (r, p) in enumerate(zip(records, predictions))]
    results = {}
    for band in bands:
        scored = [r for r in rows if r["band"] == band]
        if scored:
            results[str(band)] = {"acc": _accuracy(scored), "n": len(scored), "length": band, "report": "acc"}
    write_text_atomic(Path(run_dir) / PREDICTIONS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    return {"metric": "acc", "value": _accuracy(rows), "n_eval": len(rows), "results": results}
