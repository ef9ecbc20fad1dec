"""What the training tasks over in-memory records share (the synthetic recall tasks, Yelp polarity):
a validation split carved out of the records, batches in a seeded order per epoch, and the step and
validation losses from the task's own ``_loss(model, records, autocast)``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..data.instruct import split_train_val
from .seeding import epoch_permutation


class RecordTask:
    """Subclasses set ``spec``, ``device`` and ``recipe``, call :meth:`use_records` and define ``_loss``."""

    def use_records(self, records: list) -> None:
        self.train, self.val = split_train_val(records, int(self.recipe["val_size"]), int(self.recipe["val_seed"]))
        self.n_train = len(self.train)
        self.batch_size = int(self.recipe["batch_size"])
        self.iters_per_epoch = math.ceil(self.n_train / self.batch_size)
        self.total_steps = int(self.recipe["epochs"]) * self.iters_per_epoch
        self.checkpoint_every = int(self.recipe.get("checkpoint_every", 1))  # optimizer steps

    def _loss(self, model: nn.Module, records: list, autocast) -> torch.Tensor:
        raise NotImplementedError

    def train_loss(self, model: nn.Module, step: int, autocast) -> tuple[torch.Tensor, int]:
        epoch, i = divmod(step, self.iters_per_epoch)
        order = epoch_permutation(self.n_train, self.spec["run"]["seed"], epoch)
        batch = [self.train[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size].tolist()]
        loss = self._loss(model, batch, autocast)
        loss.backward()
        return loss.detach(), len(batch)

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, autocast) -> float | None:
        if not self.val:
            return None
        chunks = [self.val[i:i + self.batch_size] for i in range(0, len(self.val), self.batch_size)]
        return sum(float(self._loss(model, c, autocast)) * len(c) for c in chunks) / len(self.val)
