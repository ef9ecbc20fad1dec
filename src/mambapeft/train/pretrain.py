"""Upstream pretraining of the mini backbones (offline stand-ins for the published weights), and of
the length study's base models (trained from scratch on the synthetic recall tasks, as the study's).

The mini Vim and the mini ViT learn an upstream image-classification task (shape kind x colour,
generated on the fly) and are written as an official Vim ``.pth`` or timm ``model.safetensors``; the mini Mamba LM learns next-token prediction
on a synthetic English corpus with a byte-level BPE tokenizer trained on it, and is written in the
``state-spaces/mamba-*`` layout. A ``pretrain.kind: synthetic`` LM learns the recall tasks of
``data/synthetic.py`` at short lengths (the answer at the query position, as fine-tuning does).
Fine-tuning then loads them through the same code as real weights.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.mini_text import pretrain_corpus
from ..data.mini_vision import upstream_images
from ..data.synthetic import MIN_LENGTH, VOCAB_SIZE, sample, seeded_rng, uniform_lengths
from ..data.tokenizer import build_tokenizer, load_tokenizer
from ..data.vtab import IMAGENET_MEAN, IMAGENET_STD
from ..io import sha256_file, write_json_atomic
from ..models import build_model, family_of
from ..models.checkpoints import save_lm, save_vim, save_vit
from ..runspec import ConfigError
from .seeding import epoch_permutation, seed_everything
from .synthetic import pad_right, query_logits, query_loss

log = logging.getLogger("mambapeft.pretrain")


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


def _optimise(model, batches, cfg: dict, describe: str) -> list[float]:
    """AdamW with warm-up + cosine over ``cfg['steps']``; ``batches(step)`` returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.05))
    losses, started = [], time.perf_counter()
    every = max(1, cfg["steps"] // 10)
    for step in range(cfg["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, cfg["steps"], cfg["lr"], cfg.get("warmup", 20))
        loss = batches(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % every == 0:
            log.info("%s step %d/%d  loss %.4f  %.1fs", describe, step + 1, cfg["steps"], np.mean(losses[-every:]),
                     time.perf_counter() - started)
    return losses


def _normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# how a pretrained mini vision backbone is written: in its family's official layout
IMAGE_BACKBONE_WRITERS = {"vim": save_vim, "vit": save_vit}


def pretrain_image_classifier(backbone: str, path: Path, cfg: dict) -> dict:
    """A mini Vim or ViT on the upstream shape-kind x colour task, written as its family's official file."""
    images, labels, num_classes = upstream_images(cfg["n_images"] + cfg["n_heldout"], image_size=cfg["image_size"],
                                                  seed=cfg["seed"])
    x, y = _normalise(images), torch.from_numpy(labels)
    x_train, y_train, x_held, y_held = x[cfg["n_heldout"]:], y[cfg["n_heldout"]:], x[:cfg["n_heldout"]], y[:cfg["n_heldout"]]
    model = build_model(backbone, num_classes=num_classes)
    generator = torch.Generator().manual_seed(cfg["seed"])

    def batch_loss(step: int) -> torch.Tensor:
        index = torch.randint(0, len(y_train), (cfg["batch_size"],), generator=generator)
        return F.cross_entropy(model(x_train[index]), y_train[index])

    model.train()
    losses = _optimise(model, batch_loss, cfg, f"pretrain {backbone}")
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_held).argmax(-1) == y_held).float().mean()) * 100
    log.info("%s upstream held-out accuracy %.1f%% (%d classes)", backbone, accuracy, num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    IMAGE_BACKBONE_WRITERS[family_of(backbone)](model, path)
    return {"upstream_task": "shape kind x colour", "num_classes": num_classes,
            "heldout_accuracy": accuracy, "final_loss": float(np.mean(losses[-20:]))}


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
    return torch.tensor(ids, dtype=torch.long)


def pretrain_lm(backbone: str, directory: Path, cfg: dict) -> dict:
    corpus = pretrain_corpus(seed=cfg["seed"], n_docs=cfg["n_docs"])
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer(corpus, vocab_size=cfg["vocab_size"], path=directory / "tokenizer.json")
    tokenizer = load_tokenizer(directory)
    stream = _token_stream(tokenizer, corpus)
    held = _token_stream(tokenizer, pretrain_corpus(seed=cfg["seed"] + 1, n_docs=200))
    model = build_model(backbone, vocab_size=tokenizer.vocab_size)
    generator = torch.Generator().manual_seed(cfg["seed"])
    length = cfg["seq_len"]

    def windows(tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        return torch.stack([tokens[s:s + length + 1] for s in starts.tolist()])

    def lm_loss(ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    def batch_loss(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(stream) - length - 1, (cfg["batch_size"],), generator=generator)
        return lm_loss(windows(stream, starts))

    model.train()
    losses = _optimise(model, batch_loss, cfg, f"pretrain {backbone}")
    model.eval()
    with torch.no_grad():
        starts = torch.arange(0, len(held) - length - 1, length)[:32]
        heldout = float(lm_loss(windows(held, starts)))
    log.info("%s held-out loss %.3f (perplexity %.1f), %d corpus tokens", backbone, heldout, np.exp(heldout), len(stream))
    save_lm(model, directory)
    return {"corpus_tokens": int(len(stream)), "vocab_size": tokenizer.vocab_size,
            "heldout_loss": heldout, "final_loss": float(np.mean(losses[-20:]))}


def _recall_sets(cfg: dict, purpose: str, n: int, low: int, high: int) -> list[dict]:
    """``n`` sequences of every generator of ``cfg['tasks']`` (lengths uniform in [low, high]), mixed."""
    return [record for name in cfg["tasks"]
            for record in sample(name, uniform_lengths(low, high), n, seeded_rng(cfg["seed"], purpose, name))]


@torch.no_grad()
def _recall_accuracy(model, records: list[dict]) -> float:
    ids, lengths = pad_right([r["tokens"] for r in records])
    predictions = query_logits(model, ids, lengths).argmax(-1)
    return 100.0 * float((predictions == torch.tensor([r["answer"] for r in records])).float().mean())


def pretrain_synthetic(backbone: str, directory: Path, cfg: dict) -> dict:
    """From scratch on the recall tasks ``cfg['tasks']`` at lengths in [min_length, max_length]:
    ``n_train`` sequences per task, ``epochs`` passes in batches of ``batch_size``, AdamW at ``lr``
    with a linear warm-up over ``warmup_fraction`` of the steps, then cosine (the study's recipe)."""
    model = build_model(backbone, vocab_size=VOCAB_SIZE)
    low, high = int(cfg.get("min_length", MIN_LENGTH)), int(cfg["max_length"])
    train = _recall_sets(cfg, "pretrain", int(cfg["n_train"]), low, high)
    batch = int(cfg["batch_size"])
    per_epoch = math.ceil(len(train) / batch)
    steps = int(cfg["epochs"]) * per_epoch
    schedule = {"steps": steps, "lr": cfg["lr"], "warmup": max(1, round(cfg.get("warmup_fraction", 0.05) * steps)),
                "weight_decay": cfg.get("weight_decay", 0.01)}

    def batch_loss(step: int) -> torch.Tensor:
        epoch, i = divmod(step, per_epoch)
        order = epoch_permutation(len(train), cfg["seed"], epoch)[i * batch:(i + 1) * batch].tolist()
        records = [train[j] for j in order]
        return query_loss(model, [r["tokens"] for r in records], [r["answer"] for r in records], "cpu",
                          contextlib.nullcontext)

    model.train()
    losses = _optimise(model, batch_loss, schedule, f"pretrain {backbone}")
    model.eval()
    heldout = {name: _recall_accuracy(model, _recall_sets({**cfg, "tasks": [name]}, "heldout",
                                                           int(cfg.get("n_heldout", 500)), high, high))
               for name in cfg["tasks"]}
    log.info("%s held-out accuracy at length %d: %s", backbone, high,
             ", ".join(f"{name} {acc:.1f}%" for name, acc in heldout.items()))
    save_lm(model, directory)
    return {"upstream_task": f"synthetic recall ({', '.join(cfg['tasks'])}), lengths {low}-{high}",
            "optimizer_steps": steps, "heldout_length": high, "heldout_accuracy": heldout,
            "final_loss": float(np.mean(losses[-20:]))}


# what a backbone learns upstream: its pretrain `kind` when given, else its family's task
PRETRAINERS = {"vim": pretrain_image_classifier, "vit": pretrain_image_classifier, "lm": pretrain_lm,
               "synthetic": pretrain_synthetic}


def pretrain_backbone(backbone: str, weights: Path, manifest: Path, cfg: dict, threads: int = 1) -> dict:
    """Pretrain the mini ``backbone``, write it at ``weights`` and its manifest last."""
    torch.set_num_threads(threads)
    seed_everything(cfg["seed"])
    started = time.perf_counter()
    kind = cfg.get("kind", family_of(backbone))
    if kind not in PRETRAINERS:
        raise ConfigError(f"backbones.{backbone}.pretrain.kind {kind!r} is unknown; valid: synthetic, or leave it "
                          "out for the backbone family's own upstream task")
    summary = PRETRAINERS[kind](backbone, weights, cfg)
    files = [weights] if weights.is_file() else sorted(p for p in weights.iterdir() if p.is_file())
    record = {"backbone": backbone, "source": "pretrain", "path": str(weights), "pretrain": cfg, **summary,
              "seconds": round(time.perf_counter() - started, 1),
              "checksums": {p.name: sha256_file(p) for p in files}}
    write_json_atomic(manifest, record)
    return record
