"""VTAB-1k-style image classification: data from the uint8 image caches, cross-entropy, top-1."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.vtab import IMAGENET_MEAN, IMAGENET_STD, load_image_cache, task_info
from ..models import build_model
from ..models.checkpoints import load_vim
from .graphs import capture
from .seeding import epoch_permutation


class Normalise:
    """uint8 images (B, H, W, 3) -> float32 (B, 3, H, W) with ImageNet mean/std, as the original."""

    def __init__(self, device: torch.device):
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.permute(0, 3, 1, 2).float() * self._scale - self._shift


class ImageSet:
    """A cached split on the training device: images (N, H, W, 3) uint8, labels (N,)."""

    def __init__(self, path: str, device: torch.device):
        images, labels = load_image_cache(path)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self._normalise = Normalise(device)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """index (B,) -> normalised images (B, 3, H, W) float32 and labels (B,)."""
        return self._normalise(self.images[index]), self.labels[index]


class GraphedForward:
    """The training forward and backward of full batches replayed as one CUDA graph
    (:mod:`.graphs`), captured once for the full batch shape after the trainer's gradient checks;
    a batch of another shape (an epoch's last) runs eagerly."""

    def __init__(self, model: nn.Module, batch_shape: tuple[int, ...], device: torch.device):
        self.model, self.batch_shape = model, tuple(batch_shape)
        self.graphed = capture(model, lambda m, images: m(images), (torch.zeros(self.batch_shape, device=device),))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.graphed(images) if tuple(images.shape) == self.batch_shape else self.model(images)


class VisionTask:
    """One VTAB task for one run: model construction, batches by step, loss, test accuracy."""

    metric = "top1"

    def __init__(self, spec: dict, device: torch.device):
        self.spec, self.device, self.recipe = spec, device, spec["train"]
        self.num_classes = int(task_info(spec["data"]["task"])["num_classes"])
        self.train_set = ImageSet(spec["data"]["cache"][self.recipe["train_split"]], device)
        self.batch_size = int(self.recipe["batch_size"])
        self.iters_per_epoch = math.ceil(len(self.train_set) / self.batch_size)  # no drop_last
        self.total_steps = int(self.recipe["epochs"]) * self.iters_per_epoch
        self.n_train = len(self.train_set)
        self.graphed: GraphedForward | None = None

    def use_cuda_graph(self, model: nn.Module) -> None:
        """Replay full-batch training steps' forward and backward as a CUDA graph from now on."""
        height, width = self.train_set.images.shape[1:3]
        self.graphed = GraphedForward(model, (self.batch_size, 3, height, width), self.device)

    def build_model(self) -> nn.Module:
        backbone = self.spec["backbone"]
        overrides = {} if self.recipe.get("drop_path", True) else {"drop_path_rate": 0.0}
        model = build_model(backbone["id"], num_classes=self.num_classes, **overrides)
        if self.spec["method"]["init"] == "pretrained":
            load_vim(model, backbone["path"])
        return model

    def train_loss(self, model: nn.Module, step: int, autocast) -> tuple[torch.Tensor, int]:
        epoch, i = divmod(step, self.iters_per_epoch)
        order = epoch_permutation(self.n_train, self.spec["run"]["seed"], epoch)
        index = order[i * self.batch_size:(i + 1) * self.batch_size].to(self.device)
        images, labels = self.train_set.batch(index)
        with autocast():
            logits = (self.graphed or model)(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        return loss.detach(), len(index)

    def validation_loss(self, model: nn.Module, autocast) -> float | None:
        return None  # VTAB-1k trains on train800val200 and keeps the final epoch (no selection)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, run_dir) -> dict:
        test = ImageSet(self.spec["data"]["cache"][self.recipe["eval_split"]], self.device)
        correct = 0
        batch = int(self.recipe["eval_batch_size"])
        for start in range(0, len(test), batch):
            images, labels = test.batch(torch.arange(start, min(start + batch, len(test)), device=self.device))
            with autocast():
                correct += int((model(images).argmax(-1) == labels).sum())
        top1 = 100.0 * correct / len(test)
        task = self.spec["data"]["task"]
        return {"metric": self.metric, "value": top1, "n_eval": len(test),
                "results": {task: {"top1": top1, "n": len(test)}}}
