"""Top-1 accuracy of an image classifier on a cached VTAB split (the ``test`` split by default)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..data.image_set import ImageSet


@torch.no_grad()
def evaluate_top1(model: nn.Module, spec: dict, device: torch.device, autocast, run_dir: Path) -> dict:
    recipe = spec["train"]
    test = ImageSet(spec["data"]["cache"][recipe["eval_split"]], device)
    correct, batch = 0, int(recipe["eval_batch_size"])
    for start in range(0, len(test), batch):
        images, labels = test.batch(torch.arange(start, min(start + batch, len(test)), device=device))
        with autocast():
            correct += int((model(images).argmax(-1) == labels).sum())
    top1 = 100.0 * correct / len(test)
    return {"metric": "top1", "value": top1, "n_eval": len(test),
            "results": {spec["data"]["task"]: {"top1": top1, "n": len(test)}}}
