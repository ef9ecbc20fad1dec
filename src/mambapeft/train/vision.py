"""VTAB-1k-style image classification training: batches from the uint8 image cache, cross-entropy.
(Its evaluation, top-1 on the test split, is ``eval/classification.py``.)"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.image_set import ImageSet
from .graphs import capture_each
from .seeding import epoch_permutation


class GraphedForward:
    """The training forward and backward replayed as CUDA graphs (:mod:`.graphs`), one per batch shape
    given, captured once after the trainer's gradient checks and sharing one memory pool (a replay's
    logits and gradients are consumed before the next starts); a batch of another shape runs eagerly."""

    def __init__(self, model: nn.Module, batch_shapes: list[tuple[int, ...]], device: torch.device):
        self.model = model
        self.graphs = capture_each(model, _forward,
                                   {tuple(shape): (torch.zeros(shape, device=device),) for shape in batch_shapes})

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        graph = self.graphs.get(tuple(images.shape))
        return graph(images) if graph is not None else self.model(images)


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)


VTAB_TRAIN_IMAGES = 1000  # train800val200, the dry run's count when the data is not there yet


class VisionTask:
    """One VTAB task's training for one run: batches by step and their loss."""

    def __init__(self, spec: dict, device: torch.device):
        self.spec, self.device, self.recipe = spec, device, spec["train"]
        self.train_set = ImageSet(spec["data"]["cache"][self.recipe["train_split"]], device)
        self.batch_size = int(self.recipe["batch_size"])
        self.iters_per_epoch = math.ceil(len(self.train_set) / self.batch_size)  # no drop_last
        self.total_steps = int(self.recipe["epochs"]) * self.iters_per_epoch
        self.n_train = len(self.train_set)
        self.checkpoint_every = int(self.recipe.get("checkpoint_every", 1)) * self.iters_per_epoch  # epochs
        self.graphed: GraphedForward | None = None
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its data order on the device)

    @staticmethod
    def count_examples(spec: dict) -> tuple[int, str]:
        """(training images, where the number comes from), without loading them (dry runs)."""
        data, split = spec["data"], spec["train"]["train_split"]
        listing = Path(data["root"]) / data["task"] / f"{split}.txt"
        if listing.is_file():
            return sum(1 for line in listing.read_text().splitlines() if line.strip()), str(listing)
        if data["source"] == "mini":
            return int(data["n_train"]) + int(data["n_val"]), "config (mini data not written yet)"
        return VTAB_TRAIN_IMAGES, "VTAB-1k train800val200 size (data not present)"

    def use_cuda_graph(self, model: nn.Module) -> None:
        """Replay training steps' forward and backward as CUDA graphs from now on: full batches, and the
        epoch's last where the training set is not a multiple of the batch (VTAB-1k's 1,000 images in
        batches of 32 end each epoch on 8). That step, run eagerly, is host-bound: Vim-S LoRAp(X) on one
        H200 trained at 22.9-23.9 ms a step with it eager, 21.2-21.6 with it graphed
        (results/benchmarks/HISTORY.md)."""
        height, width = self.train_set.images.shape[1:3]
        sizes = dict.fromkeys((self.batch_size, self.n_train % self.batch_size or self.batch_size))  # one where it divides
        self.graphed = GraphedForward(model, [(size, 3, height, width) for size in sizes], self.device)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's data order on the device, copied there once an epoch: the copy waits for the device
        to finish what is queued, and each step's would stall every step (runner.py reads the losses late
        so that nothing else does)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_permutation(self.n_train, self.spec["run"]["seed"], epoch).to(self.device))
        return self._order[1]

    def train_loss(self, model: nn.Module, step: int, autocast) -> tuple[torch.Tensor, int]:
        epoch, i = divmod(step, self.iters_per_epoch)
        index = self._epoch_order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        images, labels = self.train_set.batch(index)
        with autocast():
            logits = (self.graphed or model)(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        return loss.detach(), len(index)

    def validation_loss(self, model: nn.Module, autocast) -> float | None:
        return None  # VTAB-1k trains on train800val200 and keeps the final epoch (no selection)
