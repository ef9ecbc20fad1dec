"""Instruction fine-tuning of a Mamba LM on an LLM-Adapters-format training file (commonsense_170k,
math_10k or a mini stand-in). Its evaluations are ``eval/language.py``."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.instruct import read_instruct_json, split_train_val, tokenize_example
from ..data.tokenizer import backbone_tokenizer_path, load_tokenizer
from ..models.lm import MambaLMHeadModel
from ..models.mamba import plain
from .graphs import capture_each
from .micro_batch import AUTO, micro_batch_setting
from .seeding import epoch_permutation

try:  # our Triton cross-entropy on the logits' own dtype (cross_entropy_triton.py), for CUDA tensors
    from .cross_entropy_triton import token_cross_entropy_sum as _triton_cross_entropy_sum
except ImportError:  # pragma: no cover - a machine without Triton (the PyTorch loss then)
    _triton_cross_entropy_sum = None

LOSS_CHUNK = 256  # positions per lm_head call: fp32 logits of a whole batch are never materialised


IGNORE = -100  # target of padding positions (cross_entropy's ignore_index)
GRAPH_WIDTH_STEP = 64  # with cuda_graphs, full micro-batches are padded to a multiple of this (one graph each)


def _pad_right(sequences: list[list[int]], pad_id: int, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) ids padded on the right to a multiple of ``multiple`` (the original collator's 8), and lengths."""
    width = max(len(s) for s in sequences)
    width += (-width) % multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in sequences])


def next_token_targets(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, W) right-padded ids -> (B, W-1) targets: token t+1 for position t, IGNORE past each end."""
    positions = torch.arange(ids.shape[1] - 1, device=ids.device)
    past_end = positions[None] >= (lengths.to(ids.device) - 1)[:, None]
    return ids[:, 1:].masked_fill(past_end, IGNORE)


def token_loss_sum(model: MambaLMHeadModel, ids: torch.Tensor, targets: torch.Tensor, autocast) -> torch.Tensor:
    """Summed next-token cross-entropy (train on inputs) of (B, W) ids against (B, W-1) targets.

    Static shapes and no host sync (padding is ignored, not removed), so a CUDA graph can hold it.
    """
    with autocast():
        hidden = model.forward_hidden(ids[:, :-1]).flatten(0, 1)  # (B * (W-1), D): position t predicts t+1
        head = _loss_head(model.lm_head, hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(LOSS_CHUNK), targets.flatten().split(LOSS_CHUNK)):
        # recomputed in the backward: a chunk's logits are freed before the next chunk instead of
        # living until the backward
        total = total + checkpoint(_chunk_loss, head, h, t, autocast, use_reentrant=False,
                                   preserve_rng_state=False)  # nothing random in it; RNG state reads break graph capture
    return total


def _loss_head(lm_head: nn.Module, device: torch.device) -> nn.Module | torch.Tensor:
    """What every loss chunk applies: a frozen, plain, bias-free Linear's weight, cast to the autocast
    dtype here once per loss, or else the head module itself (called, so nothing on it is skipped,
    and a trained weight's gradient is summed over the chunks in fp32, not in the cast's dtype).
    Left to autocast, which caches no cast of a frozen weight, the (tied, fp32) LM head was cast
    again in each chunk's forward and recompute: 64 copies of a 50k x D matrix per step of
    mamba-1.4b at micro-batch 32."""
    if not (plain(lm_head, nn.Linear) and lm_head.bias is None and not lm_head.weight.requires_grad):
        return lm_head
    weight = lm_head.weight
    if torch.is_autocast_enabled(device.type):
        weight = weight.to(torch.get_autocast_dtype(device.type))
    return weight


def _chunk_loss(head: nn.Module | torch.Tensor, h: torch.Tensor, targets: torch.Tensor, autocast) -> torch.Tensor:
    with autocast():
        logits = F.linear(h, head) if isinstance(head, torch.Tensor) else head(h)  # (n, vocab)
    if logits.is_cuda and _triton_cross_entropy_sum is not None:  # the same fp32 loss, no fp32 copy of the logits
        return _triton_cross_entropy_sum(logits, targets, IGNORE)
    return F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=IGNORE)


class GraphedLoss:
    """:func:`token_loss_sum` of full micro-batches and its backward replayed as CUDA graphs
    (:mod:`.graphs`), one per padded width (``widths``), captured after the trainer's gradient
    checks. The captures share one memory pool: a replay's loss and gradients are consumed
    before the next replay starts."""

    def __init__(self, model: nn.Module, micro_batch: int, widths: list[int], device: torch.device):
        self.micro_batch, self.widths = micro_batch, sorted(widths)
        self.graphs = capture_each(model, _loss_sum_in_graph, {
            width: (torch.zeros(micro_batch, width, dtype=torch.long, device=device),
                    torch.full((micro_batch, width - 1), IGNORE, dtype=torch.long, device=device))
            for width in self.widths})

    def fits(self, n_sequences: int, longest: int) -> bool:
        return n_sequences == self.micro_batch and longest <= self.widths[-1]

    def __call__(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.graphs[ids.shape[1]](ids, targets)


def _loss_sum_in_graph(model, ids, targets):
    return token_loss_sum(model, ids, targets, contextlib.nullcontext)  # capture() runs it under autocast


class LanguageTask:
    """One training set (commonsense_170k, math_10k or a mini stand-in) for one run."""

    def __init__(self, spec: dict, device: torch.device):
        self.spec, self.device, self.recipe = spec, device, spec["train"]
        data = spec["data"]
        self.root = Path(data["root"])
        self.tokenizer = load_tokenizer(backbone_tokenizer_path(spec["backbone"]))
        self.train, self.val = self.examples()
        self.batch_size = int(self.recipe["batch_size"])
        self.micro_batch_setting = micro_batch_setting(self.recipe)
        # None until the trainer resolves `auto` on the built model (train/micro_batch.py)
        self.micro_batch: int | None = None if self.micro_batch_setting == AUTO else self.micro_batch_setting
        self.n_train = len(self.train)
        self.iters_per_epoch = math.ceil(self.n_train / self.batch_size)
        self.total_steps = int(self.recipe["epochs"]) * self.iters_per_epoch
        self.checkpoint_every = int(self.recipe.get("checkpoint_every", 1))  # optimizer steps
        self.graphed: GraphedLoss | None = None

    def examples(self) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of the training and validation examples: LLM-Adapters records in the Alpaca template."""
        records = read_instruct_json(self.root / f"{self.spec['data']['task']}.json")
        train, val = split_train_val(records, int(self.recipe["val_size"]), int(self.recipe["val_seed"]))
        cutoff = int(self.recipe["cutoff_len"])
        return ([tokenize_example(self.tokenizer, r, cutoff)["input_ids"] for r in train],
                [tokenize_example(self.tokenizer, r, cutoff)["input_ids"] for r in val])

    @staticmethod
    def count_examples(spec: dict) -> tuple[int | None, str]:
        """(training records, where the number comes from), without tokenizing them (dry runs)."""
        data, val = spec["data"], int(spec["train"]["val_size"])
        path = Path(data["root"]) / f"{data['task']}.json"
        if path.is_file():
            return len(json.loads(path.read_text())) - val, str(path)
        if data["source"] == "mini":
            return int(data["n_train"]) - val, "config (mini data not written yet)"
        if data.get("nominal_train_records"):
            return int(data["nominal_train_records"]) - val, "nominal size of the training file (data not present)"
        return None, "unknown until the training file is present"

    def graph_widths(self) -> list[int]:
        """The padded widths of the CUDA graphs: steps of GRAPH_WIDTH_STEP up to the cutoff's."""
        cutoff = int(self.recipe["cutoff_len"])
        top = cutoff + (-cutoff) % GRAPH_WIDTH_STEP
        return list(range(GRAPH_WIDTH_STEP, top + 1, GRAPH_WIDTH_STEP))

    def use_cuda_graph(self, model: nn.Module) -> None:
        """Replay full micro-batches' forward and backward as CUDA graphs from now on, one per
        width of :meth:`graph_widths` (each micro-batch is padded up to one)."""
        self.graphed = GraphedLoss(model, self.micro_batch, self.graph_widths(), self.device)

    def micro_batch_trial(self, model: nn.Module, micro_batch: int, autocast) -> None:
        """One training forward and backward of ``micro_batch`` sequences at the widest padded
        width any micro-batch can have (the cutoff's graph width): what ``auto`` measures."""
        ids = torch.zeros(micro_batch, self.graph_widths()[-1], dtype=torch.long, device=self.device)
        token_loss_sum(model, ids, ids[:, 1:], autocast).backward()

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Without a host sync on CUDA (pinned memory, asynchronous copy): the GPU keeps its queue."""
        return tensor.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else tensor

    def _loss_over(self, model, sequences: list[list[int]], autocast, backward: bool) -> torch.Tensor:
        """Mean per-token loss of ``sequences``, accumulated micro-batch by micro-batch; normalised
        by the batch's total token count, so the micro-batch size does not change the gradient. On the
        device, unread (reading it waits for the device: the trainer reads a step's once the next is queued)."""
        n_tokens = sum(len(s) - 1 for s in sequences)
        total = torch.zeros((), device=self.device)
        for start in range(0, len(sequences), self.micro_batch):
            chunk = sequences[start:start + self.micro_batch]
            graphed = backward and self.graphed is not None and self.graphed.fits(len(chunk), max(map(len, chunk)))
            ids, lengths = _pad_right(chunk, self.tokenizer.pad_id, GRAPH_WIDTH_STEP if graphed else 8)
            ids, targets = (self._to_device(t) for t in (ids, next_token_targets(ids, lengths)))
            loss = (self.graphed(ids, targets) if graphed else token_loss_sum(model, ids, targets, autocast)) / n_tokens
            if backward:
                loss.backward()
            total += loss.detach()
        return total

    def train_loss(self, model, step: int, autocast) -> tuple[torch.Tensor, int]:
        epoch, i = divmod(step, self.iters_per_epoch)
        order = epoch_permutation(self.n_train, self.spec["run"]["seed"], epoch)
        batch = [self.train[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size].tolist()]
        return self._loss_over(model, batch, autocast, backward=True), sum(len(s) for s in batch)

    @torch.no_grad()
    def validation_loss(self, model, autocast) -> float | None:
        if not self.val:
            return None
        return float(self._loss_over(model, self.val, autocast, backward=False))
