"""Top-1 accuracy of an image classifier on a cached VTAB split (the ``test`` split by default)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..data.image_set import ImageSet
from ..models.cuda_graphs import InferenceGraph


@torch.no_grad()
def evaluate_top1(model: nn.Module, spec: dict, device: torch.device, autocast, run_dir: Path) -> dict:
    recipe = spec["train"]
    test = ImageSet(spec["data"]["cache"][recipe["eval_split"]], device)
    correct, batch = 0, int(recipe["eval_batch_size"])
    forward = _graphed_or_eager(model, spec, device, test, batch, autocast)
    for start in range(0, len(test), batch):
        images, labels = test.batch(torch.arange(start, min(start + batch, len(test)), device=device))
        correct += int((forward(images).argmax(-1) == labels).sum())
    top1 = 100.0 * correct / len(test)
    return {"metric": "top1", "value": top1, "n_eval": len(test),
            "results": {spec["data"]["task"]: {"top1": top1, "n": len(test)}}}


def _graphed_or_eager(model: nn.Module, spec: dict, device: torch.device, test: ImageSet, batch: int, autocast):
    """Full batches replayed as a CUDA graph where the run sets ``cuda_graphs`` (the same logits:
    the same kernels on the same shapes), else the model's eager forward under ``autocast``."""
    if spec["runtime"].get("cuda_graphs") and device.type == "cuda" and len(test) >= batch:
        height, width = test.images.shape[1:3]
        return InferenceGraph(model, (batch, 3, height, width), device)

    def eager(images: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model(images)
    return eager
