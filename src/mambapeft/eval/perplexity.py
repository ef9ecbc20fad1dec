"""Perplexity on held-out text with strided windows, as Hugging Face's guide "Perplexity of
fixed-length models" computes it, and the perplexity job of one dt_init run.

The guide's loop: for ``begin`` in 0, stride, 2 stride, ...: the window is tokens
[begin, min(begin + window, n)); its labels are the tokens past the previous window's end, and the
causal shift drops the window's first token; the loop stops at the window that reaches the end. So
with stride <= window - 1 every token but the first is scored exactly once, with at least
``window - stride`` tokens of context (the first window's tokens with what precedes them).

Token-level perplexity = exp(sum of the scored tokens' negative log-likelihoods / their number).
(The guide weights each window's mean loss by its label count less one; the sum over tokens is
exact.) Word-level perplexity, for WikiText-2 as lm-evaluation-harness reports it, is exp(the
same sum / the number of whitespace-separated words of the text).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.token_cache import load_tokens
from ..io import read_job_record, write_record_atomic
from ..models.checkpoints import build_lm_from_dir
from ..runspec import (PERPLEXITY_RECORD, PRETRAIN_MODEL, PRETRAIN_RECORD, ConfigError, dt_init_training_spec,
                       without_execution)
from ..runtime import autocast_for, device_name, gpu_identity, place_model, resolve_device

log = logging.getLogger("mambapeft.eval")


def strided_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) of every window of the guide's loop: [begin, end) scores its last ``scored`` tokens."""
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append((begin, end, min(end - previous_end, end - begin - 1)))
        previous_end = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def strided_nll(model, tokens: np.ndarray, window: int, stride: int, batch_size: int, device: torch.device,
                autocast) -> tuple[float, int]:
    """(sum of the scored tokens' negative log-likelihoods, number scored) over ``tokens`` (n,)."""
    if len(tokens) < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens, the held-out text has {len(tokens)}")
    windows = strided_windows(len(tokens), window, stride)
    total, scored = 0.0, 0
    for length in sorted({end - begin for begin, end, _ in windows}):  # one batch shape per window length
        same = [w for w in windows if w[1] - w[0] == length]
        for start in range(0, len(same), batch_size):
            batch = same[start:start + batch_size]
            ids = torch.from_numpy(np.stack([tokens[b:e] for b, e, _ in batch]).astype(np.int64)).to(device)
            with autocast():
                hidden = model.forward_hidden(ids[:, :-1])  # (B, length - 1, D): position t predicts t + 1
            for row, (_, _, n) in enumerate(batch):
                logits = model.lm_head(hidden[row, -n:]).float()  # (n, V): the window's scored tokens
                total += float(F.cross_entropy(logits, ids[row, -n:], reduction="sum"))
                scored += n
    return total, scored


def perplexities(nll_sum: float, n_scored: int, n_words: int | None) -> dict:
    """Token-level (and, given the text's word count, word-level) perplexity of a summed NLL."""
    result = {"perplexity": math.exp(nll_sum / n_scored), "nll_per_token": nll_sum / n_scored}
    if n_words:
        result["word_perplexity"] = math.exp(nll_sum / n_words)
    return result


class PretrainRecordError(ConfigError):
    """The pretraining job's outputs are missing, unreadable or from another configuration."""


def read_pretrain_record(run_dir: Path, spec: dict) -> dict:
    """``pretrain.json`` of this run's configuration, with its model file intact (sha256 as recorded)."""
    return read_job_record(run_dir / PRETRAIN_RECORD, dt_init_training_spec(spec),
                           (run_dir / PRETRAIN_MODEL / "pytorch_model.bin", "model_sha256"),
                           identity=without_execution, job="pretraining", rule="pretrain_dt_init",
                           error=PretrainRecordError)


def evaluate_perplexity(spec: dict) -> dict:
    """The perplexity job: ``perplexity.json`` (last) beside the run's pretraining record."""
    run_dir = Path(spec["output_dir"])
    pretrained = read_pretrain_record(run_dir, spec)
    record = {key: pretrained[key] for key in ("status", "init", "seed", "total_params", "final_loss")}
    if pretrained["status"] != "ok":
        record["reason"] = pretrained.get("reason")
    else:
        record.update(_evaluate(spec, run_dir))
    write_record_atomic(run_dir / PERPLEXITY_RECORD, {**record, "config": spec})  # last: the completion marker
    return record


def _evaluate(spec: dict, run_dir: Path) -> dict:
    torch.set_num_threads(spec["runtime"]["threads"])
    device = resolve_device(spec["runtime"]["device"])
    model = build_lm_from_dir(run_dir / PRETRAIN_MODEL).requires_grad_(False).eval()
    backend = place_model(model, device, spec["runtime"])
    tokens, meta = load_tokens(spec["tokens"]["test"])
    settings = spec["perplexity"]
    started = time.perf_counter()
    nll_sum, n_scored = strided_nll(model, tokens, settings["window"], settings["stride"], settings["batch_size"],
                                    device, autocast_for(device))
    result = perplexities(nll_sum, n_scored, meta.get("n_words"))
    seconds = time.perf_counter() - started
    log.info("perplexity %.3f (word-level %s) over %d tokens (%.1f s)", result["perplexity"],
             result.get("word_perplexity"), n_scored, seconds)
    return {**result, "metric": "perplexity", "value": result["perplexity"], "nll_sum": nll_sum,
            "n_scored_tokens": n_scored, "n_words": meta.get("n_words"), "eval_seconds": round(seconds, 3),
            "device": device_name(device), "gpu": gpu_identity(device), "backend": backend,
            "data": {key: meta[key] for key in ("sha256", "n_tokens", "tokenizer_sha256")}}
