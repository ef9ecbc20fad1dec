"""Pretraining a Mamba LM from scratch on a tokenized corpus: the training job of one dt_init run
(a dt initialisation and a seed; ``runspec.dt_init_spec``).

The model is the configured variant with ``ssm_cfg.dt_init`` set to the run's strategy, created
under the run's seed. Each step trains on ``batch_size`` windows of ``seq_len + 1`` tokens at
random offsets of the memory-mapped token array, drawn from a generator seeded by (seed, step):
every initialisation of a seed sees the same batches, and a resumed run the ones it would have.
AdamW (no decay on biases, norms, A_log, D, dt_bias), linear warm-up then cosine.

Contract as the fine-tuning runs': ``model/`` (config.json + pytorch_model.bin, the
state-spaces layout) and then ``pretrain.json``, written atomically and last; a killed run
resumes from ``checkpoint.pt``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.token_cache import load_tokens
from ..io import sha256_file, torch_load_verified, write_record_atomic
from ..models import build_model
from ..models.checkpoints import save_lm
from ..models.dt_init import check_dt_init
from ..models.lm import LM_VARIANTS, MambaLMHeadModel
from ..peft import apply_peft
from ..peft.groups import describe_groups, param_groups
from ..runspec import PRETRAIN_MODEL, PRETRAIN_RECORD, ConfigError
from ..runtime import autocast_for, device_name, gpu_identity, peak_memory, place_model, resolve_device
from .checkpoint_writer import CheckpointWriter
from .language import token_loss_sum
from .optim import build_optimizer, set_learning_rate
from .progress import Progress
from .provenance import provenance
from .runner import DivergedError, spec_digest, trusted_checkpoint
from .schedules import WarmupCosine

log = logging.getLogger("mambapeft.pretrain")

CHECKPOINT = "checkpoint.pt"
HISTORY_POINTS = 200  # loss curve points kept in pretrain.json (each the mean of its steps)


def known_init(dt_init: str) -> None:
    try:
        check_dt_init(dt_init)
    except ValueError as err:
        raise ConfigError(f"dt_init/inits: {err}") from None


def build_scratch_lm(model_cfg: dict, vocab_size: int, dt_init: str, seed: int) -> MambaLMHeadModel:
    """``model_cfg['variant']`` with the other keys as config overrides (``ssm_cfg`` merged into the
    variant's) and ``dt_init`` set, randomly initialised under ``seed``."""
    known_init(dt_init)
    if model_cfg["variant"] not in LM_VARIANTS:
        raise ConfigError(f"dt_init/model/variant: unknown LM variant {model_cfg['variant']!r}; known: "
                          f"{', '.join(LM_VARIANTS)}")
    overrides = {key: value for key, value in model_cfg.items() if key != "variant"}
    ssm_cfg = {**LM_VARIANTS[model_cfg["variant"]].config.get("ssm_cfg", {}), **overrides.pop("ssm_cfg", {}),
               "dt_init": dt_init}
    torch.manual_seed(seed)
    try:
        return build_model(model_cfg["variant"], **overrides, ssm_cfg=ssm_cfg, vocab_size=vocab_size)
    except (TypeError, ValueError) as err:  # a key the LM config or the mixer does not take, or a bad value
        raise ConfigError(f"dt_init/model: {err}") from None


def initial_dt(model: MambaLMHeadModel) -> list[list[float]]:
    """softplus(dt_bias) per layer and head: the dt a token with a zero dt projection gets."""
    return [F.softplus(layer.mixer.dt_bias.detach().float()).tolist() for layer in model.backbone.layers]


def window_batch(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """(batch_size, seq_len + 1) token ids at random offsets, a function of (seed, step)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator).tolist()
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))


def loss_curve(losses: list[float], points: int = HISTORY_POINTS) -> list[dict]:
    """[{step, loss}]: the mean loss of every ``len(losses) / points`` consecutive steps, at the
    last of them (the same steps for every run of the same length, so seeds can be averaged)."""
    every = max(1, len(losses) // points)
    return [{"step": end, "loss": float(np.mean(losses[end - every:end]))}
            for end in range(every, len(losses) + 1, every)]


@dataclass
class PretrainState:
    step: int = 0
    losses: list = field(default_factory=list)
    train_seconds: float = 0.0


class Pretrainer:
    def __init__(self, spec: dict):
        self.spec, self.recipe, self.seed = spec, spec["train"], spec["run"]["seed"]
        known_init(spec["dt_init"])  # before any work: a misspelt init fails at once
        self.out = Path(spec["output_dir"])
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(spec["runtime"]["threads"])
        self.device = resolve_device(spec["runtime"]["device"])
        self.autocast = autocast_for(self.device)
        self.tokens, self.token_meta = load_tokens(spec["tokens"]["train"])
        if len(self.tokens) <= self.recipe["seq_len"] + 1:
            raise ConfigError(f"dt_init/train/seq_len {self.recipe['seq_len']} needs more than the "
                              f"{len(self.tokens)} tokens of {spec['tokens']['train']}")
        self.model = build_scratch_lm(spec["model"], self.token_meta["vocab_size"], spec["dt_init"], self.seed)
        self.initial_dt = initial_dt(self.model)
        self.backend = place_model(self.model, self.device, spec["runtime"])
        optimizer_cfg = {"name": "adamw", **{k: self.recipe[k] for k in ("lr", "weight_decay", "betas", "eps")}}
        self.groups = param_groups(self.model, apply_peft(self.model, [{"family": "full"}], "full"), optimizer_cfg)
        self.optimizer = build_optimizer(self.groups, optimizer_cfg)
        # WarmupCosine with one step per "epoch": linear warm-up from 0, then a per-step cosine to min_lr
        self.schedule = WarmupCosine(self.recipe["lr"], 1, self.recipe["steps"], self.recipe["warmup_steps"], 0.0,
                                     self.recipe["min_lr"])
        self.checkpoints = CheckpointWriter(self.device)

    # -- resumable state ---------------------------------------------------------------------
    def _save_checkpoint(self, state: PretrainState) -> None:
        if self.checkpoints.writing(state.step):  # the loop does not wait for the disk
            return
        self.checkpoints.save({"digest": spec_digest(self.spec), "state": state.__dict__,
                               "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                              self.out / CHECKPOINT)  # written while the next steps run

    def _resume(self) -> PretrainState:
        """The last checkpoint's state, or a fresh one when there is none or it cannot be trusted."""
        path = self.out / CHECKPOINT
        saved = trusted_checkpoint(path, spec_digest(self.spec),
                                   lambda p: torch_load_verified(p, map_location=self.device), log)
        if saved is None:
            return PretrainState()
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        state = PretrainState(**saved["state"])
        log.info("resumed from %s at step %d/%d", path, state.step, self.recipe["steps"])
        return state

    # -- loop --------------------------------------------------------------------------------
    def _step(self, step: int) -> float:
        lr = self.schedule(step)
        set_learning_rate(self.optimizer, lr)
        ids = window_batch(self.tokens, self.recipe["seq_len"], self.recipe["batch_size"], self.seed, step)
        n_targets = ids[:, 1:].numel()
        # summed on the device in float64 (as Python's floats summed them: the same values), read once a
        # step for the divergence check, not once a micro-batch (each read waits for the GPU)
        summed = torch.zeros((), dtype=torch.float64, device=self.device)
        for rows in ids.split(self.recipe.get("micro_batch_size") or len(ids)):
            rows = rows.to(self.device, non_blocking=True)
            loss = token_loss_sum(self.model, rows, rows[:, 1:], self.autocast) / n_targets
            loss.backward()
            summed += loss.detach()
        total = float(summed)
        if not math.isfinite(total):
            raise DivergedError(f"loss is {total} at step {step} (lr {lr:.3g})")
        if self.recipe["grad_clip_norm"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe["grad_clip_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def train(self) -> PretrainState:
        self.state = state = self._resume()
        self.model.train()
        progress = Progress(self.recipe["steps"], state.step, self.spec["run"], self.spec["runtime"].get("wandb"))
        try:
            while state.step < self.recipe["steps"]:
                started = time.perf_counter()
                loss = self._step(state.step)
                state.step += 1
                state.train_seconds += time.perf_counter() - started
                state.losses.append(loss)
                progress.update(state.step, loss, self.optimizer.param_groups[0]["lr"])
                if state.step % self.recipe["checkpoint_every"] == 0 and state.step < self.recipe["steps"]:
                    self._save_checkpoint(state)
        finally:  # a checkpoint being written is on disk before the run goes on (or stops)
            self.checkpoints.wait()
        progress.close()
        return state

    # -- result ------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            state = self.train()
        except DivergedError as err:
            record = {"status": "diverged", "reason": str(err), **self._summary(self.state.losses),
                      "config": self.spec, **provenance()}
            write_record_atomic(self.out / PRETRAIN_RECORD, record)
            (self.out / CHECKPOINT).unlink(missing_ok=True)
            log.error("run diverged: %s (recorded in %s as status 'diverged')", err, PRETRAIN_RECORD)
            return record
        model_dir = self.out / PRETRAIN_MODEL
        save_lm(self.model, model_dir)
        record = {"status": "ok", **self._summary(state.losses), "optimizer_steps": state.step,
                  "train_tokens": state.step * self.recipe["batch_size"] * self.recipe["seq_len"],
                  "train_seconds": round(state.train_seconds, 3), "peak_mem_bytes": peak_memory(self.device),
                  "device": device_name(self.device), "gpu": gpu_identity(self.device), "backend": self.backend,
                  "param_groups": describe_groups(self.groups),
                  "model_sha256": sha256_file(model_dir / "pytorch_model.bin"), "config": self.spec, **provenance()}
        write_record_atomic(self.out / PRETRAIN_RECORD, record)  # last: the run's completion marker
        (self.out / CHECKPOINT).unlink(missing_ok=True)
        return record

    def _summary(self, losses: list[float]) -> dict:
        tail = losses[-max(1, len(losses) // 10):]
        return {"init": self.spec["dt_init"], "seed": self.seed,
                "total_params": sum(p.numel() for p in self.model.parameters()),
                "initial_dt": self.initial_dt, "final_loss": float(np.mean(tail)) if losses else None,
                "history": loss_curve(losses),
                "data": {key: self.token_meta[key] for key in ("sha256", "n_tokens", "tokenizer_sha256")}}


def run_pretraining(spec: dict) -> dict:
    return Pretrainer(spec).run()
