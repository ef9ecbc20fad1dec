"""One run's training: model + PEFT, the resumable training loop, ``adapter.safetensors`` and the
training record ``train.json`` (evaluation is its own job: ``eval/run.py``).

Contract (DESIGN.md, run contract): ``train.json`` is written atomically and last; a run killed
at any moment leaves no ``train.json`` and resumes from ``checkpoint.pt`` when started again,
finishing with the same result as an uninterrupted run (exact on CPU).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..build import build_trainable
from ..io import (CorruptFileError, record_checksum_mismatch, sha256_file, torch_load_verified, torch_save_verifiable,
                  write_record_atomic)
from ..peft import check_gradients, zero_initialised
from ..peft.core import prepare_members
from ..peft.groups import describe_groups, param_groups
from ..peft.state import adapter_state_dict, save_adapter
from ..runspec import ADAPTER, TRAIN_RECORD, ConfigError
from ..runtime import autocast_for, device_name, gpu_identity, peak_memory, place_model, resolve_device
from .checkpoint_writer import CheckpointWriter
from .micro_batch import choose_micro_batch
from .optim import build_optimizer, set_learning_rate
from .progress import Progress
from .provenance import provenance
from .schedules import build_schedule
from .seeding import rng_state, seed_everything, set_rng_state
from .tasks import task_class

log = logging.getLogger("mambapeft.train")

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
PREPARED = "prepared.json"  # what the families' prepare hooks measured (removed with the checkpoint)
HISTORY_POINTS = 200


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class LoopState:
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int | None = None
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    micro_batch: dict | None = None  # how it was chosen (micro_batch.py); a resumed run keeps its checkpoint's


@dataclass
class _Staged:
    """A loss copied to pinned host memory (:func:`_staged`) and the event marking the copy done."""
    host: torch.Tensor  # pinned
    copied: torch.cuda.Event


def _loss_value(loss: torch.Tensor | _Staged, step: int, lr: float) -> float:
    """The loss of step ``step`` (0-based) as a float (waiting for the device; for a :func:`_staged`
    loss, for its step only); DivergedError where it is not finite."""
    if isinstance(loss, _Staged):
        loss.copied.synchronize()
        loss = loss.host
    value = float(loss)
    if not math.isfinite(value):
        raise DivergedError(f"loss is {value} at step {step} (lr {lr:.3g})")
    return value


def _staged(loss: torch.Tensor) -> torch.Tensor | _Staged:
    """A CUDA ``loss`` copied to host memory by a copy queued now, right behind the step that computed
    it, with the event that marks the copy done. ``float(loss)`` later would queue its copy behind every
    step queued since and wait for them all, the device then idle until the host queues the next: a
    graphed Vim-S LoRAp(X) step on one H200 sat 2.4 ms a step idle so (results/benchmarks/HISTORY.md)."""
    if loss.device.type != "cuda":
        return loss
    host = torch.empty((), dtype=loss.dtype, pin_memory=True).copy_(loss, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(loss.device))
    return _Staged(host, copied)


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, spec: dict):
        self.spec, self.recipe = spec, spec["train"]
        self.out = Path(spec["output_dir"])
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(spec["runtime"]["threads"])
        self.device = resolve_device(spec["runtime"]["device"])
        self.autocast = autocast_for(self.device)
        seed_everything(spec["run"]["seed"])
        self.task = task_class(spec)(spec, self.device)
        self.schedule = build_schedule(self.recipe, self.task.iters_per_epoch, self.task.total_steps)
        self.prepared: dict = {}  # records of the families' prepare hooks (peft/registry.py WarmUpRun)
        built = build_trainable(spec, self.device, prepare=self._prepare)
        self.model, self.peft, self.backend, self.groups = built.model, built.peft, built.backend, built.groups
        self.members = built.members
        self.counts = built.counts()
        if not self.groups and self.task.total_steps:
            raise ConfigError(f"method {spec['method']['id']!r} trains no parameter; give it `train: {{epochs: 0}}` "
                             "(evaluation only) or PEFT members")
        self.optimizer = build_optimizer(self.groups, self.recipe["optimizer"]) if self.groups else None
        self.checkpoints = CheckpointWriter(self.device)

    # -- what PEFT families measure before training (their prepare hooks) ------------------
    @property
    def total_steps(self) -> int:
        return self.task.total_steps

    def _prepare(self, backbone: torch.nn.Module, members: list[dict]) -> list[dict]:
        """The members with what their families' prepare hooks measured, once per run: kept in
        prepared.json, so a resumed run continues with the same dimensions as its checkpoint."""
        path = self.out / PREPARED
        saved = _read_json(path)
        if saved.get("digest") != spec_digest(self.spec) or record_checksum_mismatch(saved):
            state = rng_state()  # the run starts as if nothing had been measured
            members, records = prepare_members(backbone, members, self.spec["method"]["id"], self)
            set_rng_state(state)
            saved = {"digest": spec_digest(self.spec), "members": members, "records": records}
            if records:
                write_record_atomic(path, saved)
        self.prepared = saved["records"]
        return saved["members"]

    def warm_up(self, model: torch.nn.Module, result, steps: int, after_backward=None) -> None:
        """WarmUpRun (peft/registry.py): the run's first ``steps`` steps on ``model``, training ``result``."""
        place_model(model, self.device, self.spec["runtime"])
        groups = param_groups(model, result, self.recipe["optimizer"])
        optimizer = build_optimizer(groups, self.recipe["optimizer"]) if groups else None
        self._fit_micro_batch(model, result, optimizer, graphs=False)
        for step in range(steps):
            _loss_value(self._train_step(model, result, optimizer, step, after_backward), step, self.schedule(step))
            model.zero_grad(set_to_none=True)  # also tensors a hook reads gradients of, outside the optimizer

    # -- resumable state ---------------------------------------------------------------------
    def _save_checkpoint(self, state: LoopState) -> None:
        if self.checkpoints.writing(state.step):  # the loop does not wait for the disk
            return
        # the trainable tensors as they are: the writer copies them to the host with the rest, in one copy
        # a dtype (adapter_state_dict copies one tensor at a time, each waiting: ~50 for Vim-S LoRAp(X))
        self.checkpoints.save({"digest": spec_digest(self.spec), "state": state.__dict__,
                               "trainable": {name: p.detach() for name, p in self.peft.trainable.items()},
                               "optimizer": self.optimizer.state_dict(),
                               "rng": rng_state()}, self.out / CHECKPOINT)  # written while the next steps run

    def _resume(self) -> LoopState:
        """The loop state of the last checkpoint, or a fresh one when there is none or it cannot be
        trusted: a run restarts from scratch rather than continue from a damaged state."""
        path = self.out / CHECKPOINT
        saved = trusted_checkpoint(path, spec_digest(self.spec), self._read_checkpoint, log)
        if saved is None:
            return LoopState()
        self._load_trainable(saved["trainable"])
        self.optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        state = LoopState(**saved["state"])
        log.info("resumed from %s at step %d/%d", path, state.step, self.task.total_steps)
        return state

    def _read_checkpoint(self, path: Path) -> dict:
        saved = torch_load_verified(path, map_location=self.device)
        if saved["state"]["best_step"] is not None:  # selection goes on from the saved best adapter: check it too
            torch_load_verified(self.out / BEST, map_location=self.device)
        return saved

    def _load_trainable(self, tensors: dict) -> None:
        with torch.no_grad():
            for name, p in self.peft.trainable.items():
                p.copy_(tensors[name].to(p.device))

    # -- micro-batch (tasks that accumulate micro-batches) -------------------------------------
    def _fit_micro_batch(self, model, peft, optimizer, graphs: bool) -> dict | None:
        """Sets the task's micro-batch for training ``model`` (its ``micro_batch_size``, resolved on
        CUDA by probing memory) and returns how it was chosen; None for tasks without micro-batches."""
        if not hasattr(self.task, "micro_batch_trial"):
            return None
        trainable_bytes = sum(p.numel() * p.element_size() for p in peft.trainable.values())
        adamw_state = 2 * trainable_bytes if optimizer is not None and not optimizer.state else 0  # created lazily

        def trial(size: int) -> None:
            model.train()
            try:
                self.task.micro_batch_trial(model, size, self.autocast)
            finally:
                model.zero_grad(set_to_none=True)

        graph_bytes = len(self.task.graph_widths()) * trainable_bytes if graphs else None  # static grads per graph
        rng = rng_state()  # the run draws as if nothing had been probed
        choice = choose_micro_batch(self.task.micro_batch_setting, self.task.batch_size, self.device, trial,
                                    adamw_state, graph_bytes)
        set_rng_state(rng)
        self.task.micro_batch = choice["micro_batch"]
        return choice

    def _use_micro_batch(self, state: LoopState, graphs: bool) -> None:
        if state.step >= self.task.total_steps:  # nothing to train (evaluation only, or done)
            return
        if state.micro_batch is None:
            state.micro_batch = self._fit_micro_batch(self.model, self.peft, self.optimizer, graphs)
        else:  # the resumed run sums its micro-batches in the same order as the run it continues
            self.task.micro_batch = state.micro_batch["micro_batch"]
            log.info("micro-batch %d, as the checkpoint's", self.task.micro_batch)

    # -- loop --------------------------------------------------------------------------------
    def _step(self, state: LoopState, check: list[str] | None) -> torch.Tensor:
        """One optimizer step; ``check`` (when not None) lists zero-initialised tensors whose
        gradients must be non-zero (every trainable tensor must have a gradient)."""
        checked = None if check is None else (lambda step: check_gradients(self.peft, check))
        return self._train_step(self.model, self.peft, self.optimizer, state.step, checked)

    def _train_step(self, model, peft, optimizer, step: int, after_backward=None) -> torch.Tensor:
        """Step ``step`` of the schedule on ``model``; ``after_backward(step)`` sees the gradients. Returns
        the loss as a tensor, unread: reading it waits for the device (:func:`_loss_value`)."""
        lr = self.schedule(step)
        if optimizer is not None:
            set_learning_rate(optimizer, lr)
        model.train()
        loss, _ = self.task.train_loss(model, step, self.autocast)
        if after_backward is not None:
            after_backward(step)
        if self.recipe.get("grad_clip_norm"):
            torch.nn.utils.clip_grad_norm_(list(peft.trainable.values()), self.recipe["grad_clip_norm"])
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _validation_due(self, state: LoopState) -> bool:
        every = self.recipe.get("eval_every")
        done = state.step == self.task.total_steps
        return self.recipe["select"] == "best_val_loss" and bool(done or (every and state.step % every == 0))

    def _checkpoint_due(self, state: LoopState) -> bool:
        return state.step % self.task.checkpoint_every == 0 and state.step < self.task.total_steps

    def _maybe_validate(self, state: LoopState) -> None:
        if not self._validation_due(state):
            return
        self.model.eval()
        val = self.task.validation_loss(self.model, self.autocast)
        log.info("step %d: validation loss %.4f", state.step, val)
        state.history.append({"step": state.step, "val_loss": val})
        if val is not None and val < state.best_val_loss:
            state.best_val_loss, state.best_step = val, state.step
            torch_save_verifiable(adapter_state_dict(self.peft), self.out / BEST)

    def train(self) -> LoopState:
        state = self._resume()
        # gradient checks: all tensors on the first step of this process, zero-initialised ones
        # non-zero on the second step of a fresh run (the zero head blocks them on the first)
        zero_init = zero_initialised(self.peft) if state.step == 0 else []
        checks = [[], zero_init]
        # captured once, after the gradient checks: a replay runs no Python, so they run eagerly first
        graph_pending = (bool(self.spec["runtime"].get("cuda_graphs")) and self.device.type == "cuda"
                         and hasattr(self.task, "use_cuda_graph"))
        self._use_micro_batch(state, graph_pending)
        progress = Progress(self.task.total_steps, state.step, self.spec["run"], self.spec["runtime"].get("wandb"))
        try:
            self._loop(state, checks, graph_pending, progress)
        finally:  # a checkpoint being written is on disk before the run goes on (or stops)
            self.checkpoints.wait()
        progress.close()
        if state.best_step is not None:
            self._load_trainable(torch_load_verified(self.out / BEST, map_location=self.device))
        return state

    def _loop(self, state: LoopState, checks: list, graph_pending: bool, progress: Progress) -> None:
        # a step's loss is copied to host memory right behind the step (_staged) and read (and checked
        # for divergence) once the next step is queued: reading it waits for that step only, the device
        # then still has the next to run. Read at once (a wait before the backward and one after the
        # optimizer), a graphed Vim-S LoRAp(X) step took 20.9 ms against 19.1 (batch 32, one H200).
        # Before a validation or checkpoint, the last step's is read first.
        unread = None  # (step, staged loss, learning rate)

        def read_loss() -> None:
            nonlocal unread
            if unread is not None:
                step, loss, lr = unread
                unread = None
                value = _loss_value(loss, step - 1, lr)
                progress.update(step, value, lr)
                state.history.append({"step": step, "loss": value})

        while state.step < self.task.total_steps:
            if graph_pending and not checks:
                log.info("capturing the training forward/backward as a CUDA graph (runtime cuda_graphs)")
                self.task.use_cuda_graph(self.model)
                graph_pending = False
            started = time.perf_counter()
            loss = self._step(state, checks.pop(0) if checks else None)
            state.step += 1
            read_loss()  # the step before this one's
            unread = (state.step, _staged(loss), self.optimizer.param_groups[0]["lr"])
            if self._validation_due(state) or self._checkpoint_due(state) or state.step == self.task.total_steps:
                read_loss()
            state.train_seconds += time.perf_counter() - started
            self._maybe_validate(state)
            if self._checkpoint_due(state):
                self._save_checkpoint(state)

    # -- result ------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            state = self.train()
        except DivergedError as err:
            record = {"status": "diverged", "reason": str(err), "config": self.spec, **provenance()}
            write_record_atomic(self.out / TRAIN_RECORD, record)
            log.error("run diverged: %s (recorded in %s as status 'diverged')", err, TRAIN_RECORD)
            return record
        save_adapter(self.out / ADAPTER, self.peft, {**self.spec["method"], "peft": self.members})
        record = self._record(state)
        write_record_atomic(self.out / TRAIN_RECORD, record)  # last: training's completion marker
        for leftover in (CHECKPOINT, BEST, PREPARED):
            (self.out / leftover).unlink(missing_ok=True)
        return record

    def _record(self, state: LoopState) -> dict:
        stride = max(1, len(state.history) // HISTORY_POINTS)
        return {
            "status": "ok", "trainable_params": self.counts["trainable"], "head_params": self.counts["head"],
            "total_params": self.counts["total"], "optimizer_steps": state.step, "train_examples": self.task.n_train,
            "best_step": state.best_step, "train_seconds": round(state.train_seconds, 3),
            "peak_mem_bytes": peak_memory(self.device), "device": device_name(self.device),
            "gpu": gpu_identity(self.device), "backend": self.backend,
            "param_groups": describe_groups(self.groups), "data": data_provenance(self.spec),
            "history": [h for i, h in enumerate(state.history) if "val_loss" in h or i % stride == 0],
            "adapter_sha256": sha256_file(self.out / ADAPTER), "config": self.spec, **provenance(),
            **({"prepared": self.prepared} if self.prepared else {}),
            **({"micro_batch": state.micro_batch} if state.micro_batch else {}),
        }


def trusted_checkpoint(path: Path, digest: str, read, logger: logging.Logger) -> dict | None:
    """The checkpoint at ``path`` as ``read(path)`` loads it, or None (``logger`` says why) when there
    is none, it is damaged (CorruptFileError) or it was written for a spec of another ``digest``."""
    if not path.is_file():
        return None
    try:
        saved = read(path)
    except CorruptFileError as err:
        logger.warning("%s; starting this run from scratch", err)
        return None
    if saved["digest"] != digest:
        logger.warning("%s was written for another configuration; starting this run from scratch", path)
        return None
    return saved


def _read_json(path: Path) -> dict:
    """``path``'s JSON object; {} when it is missing or damaged (then measured again)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def data_provenance(spec: dict) -> dict:
    manifest = Path(spec["data"]["manifest"])
    content = json.loads(manifest.read_text()) if manifest.is_file() else {}
    return {"source": spec["data"].get("source"), "root": spec["data"]["root"],
            "checksums": content.get("checksums", {}).get(spec["data"]["task"], content.get("checksums", {}))}


def run_training(spec: dict) -> dict:
    return Trainer(spec).run()
