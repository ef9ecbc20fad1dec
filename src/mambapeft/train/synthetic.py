"""Training on the synthetic recall tasks (``data/synthetic.py``): the model reads a sequence and
predicts the answer at its last position (the query); the loss is the cross-entropy there only,
as in the length study. Its evaluation, accuracy at each test length, is ``eval/synthetic.py``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.synthetic import PAD, read_records, train_file
from .records import RecordTask


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


class SyntheticTask(RecordTask):
    """One training set of a synthetic data entry (the run's task) for one run."""

    def __init__(self, spec: dict, device: torch.device):
        self.spec, self.device, self.recipe = spec, device, spec["train"]
        self.use_records(read_records(train_file(spec["data"]["root"], spec["data"]["task"])))

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
