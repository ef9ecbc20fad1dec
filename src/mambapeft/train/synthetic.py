"""Training on the synthetic recall tasks (``data/synthetic.py``): the model reads a sequence and
predicts the answer at its last position (the query); the loss is the cross-entropy there only,
as in the length study. Its evaluation, accuracy at each test length, is ``eval/synthetic.py``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.instruct import split_train_val
from ..data.synthetic import PAD, read_records, train_file
from .seeding import epoch_permutation


def pad_right(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) ids padded with PAD after each sequence's end, and the lengths (B,). A causal model's
    output at a sequence's last token never sees the padding after it."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), PAD, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s)
    return ids, lengths


def query_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, W) right-padded ids -> logits (B, V) at each sequence's last real position (the query)."""
    hidden = model.forward_hidden(ids)  # (B, W, D) of the real tokens (inserted tokens removed)
    last = hidden[torch.arange(ids.shape[0], device=ids.device), lengths.to(ids.device) - 1]  # (B, D)
    return model.lm_head(last)


def query_loss(model: nn.Module, sequences: list[list[int]], answers: list[int], device, autocast) -> torch.Tensor:
    """Mean cross-entropy of the answers at the query positions of ``sequences``."""
    ids, lengths = pad_right(sequences)
    with autocast():
        logits = query_logits(model, ids.to(device), lengths)
    return F.cross_entropy(logits.float(), torch.tensor(answers, device=device))


class SyntheticTask:
    """One training set of a synthetic data entry (the run's task) for one run."""

    def __init__(self, spec: dict, device: torch.device):
        self.spec, self.device, self.recipe = spec, device, spec["train"]
        records = read_records(train_file(spec["data"]["root"], spec["data"]["task"]))
        self.train, self.val = split_train_val(records, int(self.recipe["val_size"]), int(self.recipe["val_seed"]))
        self.n_train = len(self.train)
        self.batch_size = int(self.recipe["batch_size"])
        self.iters_per_epoch = math.ceil(self.n_train / self.batch_size)
        self.total_steps = int(self.recipe["epochs"]) * self.iters_per_epoch
        self.checkpoint_every = int(self.recipe.get("checkpoint_every", 1))  # optimizer steps

    @staticmethod
    def count_examples(spec: dict) -> tuple[int | None, str]:
        """(training sequences, where the number comes from), without reading them (dry runs)."""
        data, val = spec["data"], int(spec["train"]["val_size"])
        path = train_file(data["root"], data["task"])
        if path.is_file():
            with path.open() as lines:
                return sum(1 for _ in lines) - val, str(path)
        return int(data["n_train"]) - val, "config (synthetic data not written yet)"

    def _loss(self, model: nn.Module, records: list[dict], autocast) -> torch.Tensor:
        return query_loss(model, [r["tokens"] for r in records], [r["answer"] for r in records], self.device, autocast)

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
