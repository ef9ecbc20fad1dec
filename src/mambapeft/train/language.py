"""Instruction fine-tuning of a Mamba LM (LLM-Adapters format) and its evaluations: zero-shot
multiple choice (commonsense) or greedy generation with answer extraction (math)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.instruct import read_instruct_json, split_train_val, tokenize_example
from ..data.language_tasks import language_task, math_eval_file
from ..data.tokenizer import load_tokenizer
from ..eval.generate import evaluate_math_task
from ..io import write_text_atomic
from ..models.checkpoints import build_lm_from_dir, read_lm_config
from ..models.lm import MambaLMHeadModel
from .seeding import epoch_permutation

LOSS_CHUNK = 8192  # tokens per lm_head call: never materialise fp32 logits for the whole batch


def _pad_right(sequences: list[list[int]], pad_id: int, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids padded on the right to a multiple of ``multiple`` (the original collator's), and lengths."""
    width = max(len(s) for s in sequences)
    width += (-width) % multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in sequences])


def token_loss_sum(model: MambaLMHeadModel, ids: torch.Tensor, lengths: torch.Tensor, autocast) -> torch.Tensor:
    """Summed next-token cross-entropy over the real tokens of a right-padded batch (train on inputs)."""
    with autocast():
        hidden = model.forward_hidden(ids[:, :-1])  # (B, L-1, D): position t predicts token t+1
    valid = torch.arange(ids.shape[1] - 1, device=ids.device)[None] < (lengths.to(ids.device) - 1)[:, None]
    hidden, targets = hidden[valid], ids[:, 1:][valid]  # (T, D), (T,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(LOSS_CHUNK), targets.split(LOSS_CHUNK)):
        with autocast():
            logits = model.lm_head(h)
        total = total + F.cross_entropy(logits.float(), t, reduction="sum")
    return total


class LanguageTask:
    """One training set (commonsense_170k, math_10k or a mini stand-in) and its evaluation tasks."""

    def __init__(self, spec: dict, device: torch.device):
        self.spec, self.device, self.recipe = spec, device, spec["train"]
        data = spec["data"]
        self.kind, self.root = data["kind"], Path(data["root"])
        backbone = spec["backbone"]
        self.tokenizer = load_tokenizer(backbone.get("tokenizer") or backbone["path"])
        records = read_instruct_json(self.root / f"{data['task']}.json")
        train, val = split_train_val(records, int(self.recipe["val_size"]), int(self.recipe["val_seed"]))
        cutoff = int(self.recipe["cutoff_len"])
        self.train = [tokenize_example(self.tokenizer, r, cutoff)["input_ids"] for r in train]
        self.val = [tokenize_example(self.tokenizer, r, cutoff)["input_ids"] for r in val]
        self.batch_size, self.micro_batch = int(self.recipe["batch_size"]), int(self.recipe["micro_batch_size"])
        self.n_train = len(self.train)
        self.iters_per_epoch = math.ceil(self.n_train / self.batch_size)
        self.total_steps = int(self.recipe["epochs"]) * self.iters_per_epoch
        self.metric = "acc"

    def build_model(self) -> nn.Module:
        path = self.spec["backbone"]["path"]
        if self.spec["method"]["init"] == "pretrained":
            return build_lm_from_dir(path)
        return MambaLMHeadModel(read_lm_config(path))

    def _loss_over(self, model, sequences: list[list[int]], autocast, backward: bool) -> float:
        """Mean per-token loss of ``sequences``, accumulated micro-batch by micro-batch; normalised
        by the batch's total token count, so the micro-batch size does not change the gradient."""
        n_tokens = sum(len(s) - 1 for s in sequences)
        total = 0.0
        for start in range(0, len(sequences), self.micro_batch):
            ids, lengths = _pad_right(sequences[start:start + self.micro_batch], self.tokenizer.pad_id)
            loss = token_loss_sum(model, ids.to(self.device), lengths, autocast) / n_tokens
            if backward:
                loss.backward()
            total += float(loss.detach())
        return total

    def train_loss(self, model, step: int, autocast) -> tuple[torch.Tensor, int]:
        epoch, i = divmod(step, self.iters_per_epoch)
        order = epoch_permutation(self.n_train, self.spec["run"]["seed"], epoch)
        batch = [self.train[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size].tolist()]
        loss = self._loss_over(model, batch, autocast, backward=True)
        return torch.tensor(loss), sum(len(s) for s in batch)

    @torch.no_grad()
    def validation_loss(self, model, autocast) -> float | None:
        if not self.val:
            return None
        return self._loss_over(model, self.val, autocast, backward=False)

    @torch.no_grad()
    def evaluate(self, model, autocast, run_dir: Path) -> dict:
        """Commonsense: lm-evaluation-harness over the local task files, with this model wrapped
        as lm-eval's ``mambapeft`` model; math: greedy generation and answer extraction."""
        if self.kind == "commonsense":
            results, rows = self._evaluate_choice(model, autocast)
        else:
            results, rows = self._evaluate_math(model, autocast)
        # one line per scored example, so a reader can inspect the failures
        write_text_atomic(run_dir / ("lm_eval_samples.jsonl" if self.kind == "commonsense" else "generations.jsonl"),
                          "".join(json.dumps(r) + "\n" for r in rows))
        headline = sum(r[r["report"]] for r in results.values()) / len(results)
        return {"metric": "acc", "value": headline, "n_eval": sum(r["n"] for r in results.values()),
                "results": results}

    def _evaluate_choice(self, model, autocast) -> tuple[dict, list[dict]]:
        from ..eval.lm_eval_model import MambaPeftLM
        from ..eval.lm_eval_tasks import evaluate_choice_tasks

        lm = MambaPeftLM.wrap(model, self.tokenizer, device=self.device, autocast=autocast,
                              batch_size=int(self.recipe["eval"]["batch_size"]))
        return evaluate_choice_tasks(lm, list(self.spec["data"]["eval_tasks"]), self.root)

    def _evaluate_math(self, model, autocast) -> tuple[dict, list[dict]]:
        results, rows = {}, []
        for name in self.spec["data"]["eval_tasks"]:
            info = language_task("math", name)
            records = read_instruct_json(math_eval_file(self.root, info))
            scores, task_rows = evaluate_math_task(
                model, self.tokenizer, records, info["answer"], max_new_tokens=int(self.recipe["eval"]["max_new_tokens"]),
                device=self.device, autocast=autocast, batch_size=int(self.recipe["eval"]["batch_size"]))
            results[name] = {**scores, "report": "acc"}
            rows += [{"task": name, **r} for r in task_rows]
        return results, rows
