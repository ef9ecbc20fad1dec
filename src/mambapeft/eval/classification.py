"""Top-1 accuracy of an image classifier on a cached VTAB split (the ``test`` split by default)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from ..data.image_set import ImageSet
from ..models.cuda_graphs import InferenceGraph


@torch.no_grad()
def evaluate_top1(model: nn.Module, spec: dict, device: torch.device, autocast, run_dir: Path) -> dict:
    recipe = spec["train"]
    test = ImageSet(spec["data"]["cache"][recipe["eval_split"]], device)
    correct, batch = torch.zeros((), dtype=torch.long, device=device), int(recipe["eval_batch_size"])
    graphed = bool(spec["runtime"].get("cuda_graphs")) and device.type == "cuda" and len(test) >= batch
    forward = classifier_forward(model, (batch, 3, *test.images.shape[1:3]), device, graphed, autocast)
    for start in range(0, len(test), batch):
        images, labels = test.batch(torch.arange(start, min(start + batch, len(test)), device=device))
        correct += (forward(images).argmax(-1) == labels).sum()  # on the device: read once, not a wait a batch
    top1 = 100.0 * int(correct) / len(test)
    return {"metric": "top1", "value": top1, "n_eval": len(test),
            "results": {spec["data"]["task"]: {"top1": top1, "n": len(test)}}}


def classifier_forward(model: nn.Module, batch_shape: tuple[int, ...], device: torch.device, graphed: bool,
                       autocast) -> Callable[[torch.Tensor], torch.Tensor]:
    """The evaluation's forward, without gradients: images (B, 3, H, W) -> logits. With ``graphed``
    (runtime ``cuda_graphs`` on CUDA), batches of ``batch_shape`` replayed as a CUDA graph (the same
    logits: the same kernels on the same shapes; others eager), else the eager forward under ``autocast``."""
    if graphed:
        return InferenceGraph(model, batch_shape, device)

    @torch.no_grad()
    def eager(images: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model(images)
    return eager
