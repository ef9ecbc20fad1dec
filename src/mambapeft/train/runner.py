"""One run end to end: model + PEFT, resumable training loop, evaluation, ``metrics.json``.

Contract (DESIGN.md, run contract): ``metrics.json`` is written atomically and last; a run killed
at any moment leaves no ``metrics.json`` and resumes from ``checkpoint.pt`` when started again,
finishing with the same result as an uninterrupted run (exact on CPU).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import torch_save_atomic, write_json_atomic
from ..models.mamba import Mamba
from ..models.scan import resolve_backend
from ..peft import apply_peft, check_gradients, zero_initialised
from ..peft.state import adapter_state_dict, save_adapter
from ..runspec import ConfigError
from .optim import build_optimizer, describe_groups, param_groups, set_learning_rate
from .precision import store_frozen_linears_in_bf16
from .progress import Progress
from .provenance import provenance
from .schedules import build_schedule
from .seeding import rng_state, seed_everything, set_rng_state

log = logging.getLogger("mambapeft.train")

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
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


def make_task(spec: dict, device: torch.device):
    from .language import LanguageTask
    from .vision import VisionTask

    return (VisionTask if spec["domain"] == "vision" else LanguageTask)(spec, device)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime device 'cuda' was requested but no CUDA device is visible; set `device: auto`")
    return torch.device(requested)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def select_backend(model: torch.nn.Module, device: torch.device, runtime: dict) -> str:
    """Put one scan backend on every mixer; a CUDA run on the PyTorch scan fails unless allowed.
    Returns the name recorded in metrics.json: the backend's, "-fused" added where mixers run the
    fused mamba_inner kernel."""
    backend = resolve_backend(device, runtime["scan_backend"])
    if device.type == "cuda" and backend.name == "torch" and not runtime["allow_torch_fallback"]:
        raise RuntimeError("This CUDA run would use the slow PyTorch scan (mamba-ssm missing or backend forced). "
                           "Install the CUDA extras (`mambapeft setup-gpu`) or set `allow_torch_fallback: true`.")
    mixers = [module for module in model.modules() if isinstance(module, Mamba)]
    for mixer in mixers:
        mixer.backend = backend
    fused = sum(m.uses_fused_inner() for m in mixers)
    if backend.mamba_inner is not None:
        log.info("mixers on the fused mamba_inner kernel: %d of %d (the others: a method changes them "
                 "between in_proj and the output, or they are bidirectional)", fused, len(mixers))
    return f"{backend.name}-fused" if fused else backend.name


def place_model(model: torch.nn.Module, device: torch.device, runtime: dict) -> str:
    """Put ``model`` on ``device`` as training runs it there: on CUDA (bf16 autocast, which casts
    them anyway) frozen Linear weights stored in bf16; then :func:`select_backend`, whose recorded
    name it returns."""
    model.to(device)
    if device.type == "cuda":
        moved = store_frozen_linears_in_bf16(model)
        log.info("frozen Linear weights stored in bf16: %s parameters", f"{moved:,}")
    return select_backend(model, device, runtime)


class Trainer:
    def __init__(self, spec: dict):
        self.spec, self.recipe = spec, spec["train"]
        self.out = Path(spec["output_dir"])
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(spec["runtime"]["threads"])
        self.device = resolve_device(spec["runtime"]["device"])
        self.autocast = autocast_for(self.device)
        seed_everything(spec["run"]["seed"])
        self.task = make_task(spec, self.device)
        self.model = self.task.build_model()
        self.peft = apply_peft(self.model, spec["method"]["peft"], spec["method"]["id"])
        self.backend = place_model(self.model, self.device, spec["runtime"])
        self.groups = param_groups(self.model, self.peft, self.recipe["optimizer"])
        if not self.groups and self.task.total_steps:
            raise ConfigError(f"method {spec['method']['id']!r} trains no parameter; give it `train: {{epochs: 0}}` "
                             "(evaluation only) or PEFT members")
        self.optimizer = build_optimizer(self.groups, self.recipe["optimizer"]) if self.groups else None
        self.schedule = build_schedule(self.recipe, self.task.iters_per_epoch, self.task.total_steps)
        self.checkpoint_every = self._checkpoint_interval()

    def _checkpoint_interval(self) -> int:
        every = int(self.recipe.get("checkpoint_every", 1))
        return every * self.task.iters_per_epoch if self.spec["domain"] == "vision" else every

    # -- resumable state ---------------------------------------------------------------------
    def _save_checkpoint(self, state: LoopState) -> None:
        torch_save_atomic({"digest": spec_digest(self.spec), "state": state.__dict__,
                           "trainable": adapter_state_dict(self.peft),
                           "optimizer": self.optimizer.state_dict(),
                           "rng": rng_state()}, self.out / CHECKPOINT)

    def _resume(self) -> LoopState:
        path = self.out / CHECKPOINT
        if not path.is_file():
            return LoopState()
        saved = torch.load(path, map_location=self.device, weights_only=False)
        if saved["digest"] != spec_digest(self.spec):
            log.warning("%s was written for another configuration; starting this run from scratch", path)
            return LoopState()
        self._load_trainable(saved["trainable"])
        self.optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        state = LoopState(**saved["state"])
        log.info("resumed from %s at step %d/%d", path, state.step, self.task.total_steps)
        return state

    def _load_trainable(self, tensors: dict) -> None:
        with torch.no_grad():
            for name, p in self.peft.trainable.items():
                p.copy_(tensors[name].to(p.device))

    # -- loop --------------------------------------------------------------------------------
    def _step(self, state: LoopState, check: list[str] | None) -> float:
        """One optimizer step; ``check`` (when not None) lists zero-initialised tensors whose
        gradients must be non-zero (every trainable tensor must have a gradient)."""
        lr = self.schedule(state.step)
        set_learning_rate(self.optimizer, lr)
        self.model.train()
        loss, items = self.task.train_loss(self.model, state.step, self.autocast)
        if not torch.isfinite(loss):
            raise DivergedError(f"loss is {float(loss)} at step {state.step} (lr {lr:.3g})")
        if check is not None:
            check_gradients(self.peft, check)
        if self.recipe.get("grad_clip_norm"):
            torch.nn.utils.clip_grad_norm_(list(self.peft.trainable.values()), self.recipe["grad_clip_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def _maybe_validate(self, state: LoopState) -> None:
        every = self.recipe.get("eval_every")
        done = state.step == self.task.total_steps
        if self.recipe["select"] != "best_val_loss" or not (done or (every and state.step % every == 0)):
            return
        self.model.eval()
        val = self.task.validation_loss(self.model, self.autocast)
        log.info("step %d: validation loss %.4f", state.step, val)
        state.history.append({"step": state.step, "val_loss": val})
        if val is not None and val < state.best_val_loss:
            state.best_val_loss, state.best_step = val, state.step
            torch_save_atomic(adapter_state_dict(self.peft), self.out / BEST)

    def train(self) -> LoopState:
        state = self._resume()
        # gradient checks: all tensors on the first step of this process, zero-initialised ones
        # non-zero on the second step of a fresh run (the zero head blocks them on the first)
        zero_init = zero_initialised(self.peft) if state.step == 0 else []
        checks = [[], zero_init]
        # captured once, after the gradient checks: a replay runs no Python, so they run eagerly first
        graph_pending = (bool(self.spec["runtime"].get("cuda_graphs")) and self.device.type == "cuda"
                         and hasattr(self.task, "use_cuda_graph"))
        progress = Progress(self.task.total_steps, state.step, self.spec["run"], self.spec["runtime"].get("wandb"))
        while state.step < self.task.total_steps:
            if graph_pending and not checks:
                log.info("capturing the training forward/backward as a CUDA graph (runtime cuda_graphs)")
                self.task.use_cuda_graph(self.model)
                graph_pending = False
            started = time.perf_counter()
            loss = self._step(state, checks.pop(0) if checks else None)
            state.step += 1
            state.train_seconds += time.perf_counter() - started
            progress.update(state.step, loss, self.optimizer.param_groups[0]["lr"])
            state.history.append({"step": state.step, "loss": loss})
            self._maybe_validate(state)
            if state.step % self.checkpoint_every == 0 and state.step < self.task.total_steps:
                self._save_checkpoint(state)
        progress.close()
        if state.best_step is not None:
            self._load_trainable(torch.load(self.out / BEST, map_location=self.device))
        return state

    # -- result ------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            state = self.train()
        except DivergedError as err:
            record = {"status": "diverged", "reason": str(err), "config": self.spec, **provenance()}
            write_json_atomic(self.out / "metrics.json", record)
            log.error("run diverged: %s (recorded in metrics.json as status 'diverged')", err)
            return record
        self.model.eval()
        started = time.perf_counter()
        evaluation = self.task.evaluate(self.model, self.autocast, self.out)
        save_adapter(self.out / "adapter.safetensors", self.peft, self.spec["method"])
        record = self._record(state, evaluation, time.perf_counter() - started)
        write_json_atomic(self.out / "metrics.json", record)  # last: the run's completion marker
        for leftover in (CHECKPOINT, BEST):
            (self.out / leftover).unlink(missing_ok=True)
        return record

    def _record(self, state: LoopState, evaluation: dict, eval_seconds: float) -> dict:
        head = self.peft.count(exclude=()) - self.peft.count()
        stride = max(1, len(state.history) // HISTORY_POINTS)
        return {
            "status": "ok", **evaluation,
            "trainable_params": self.peft.count(), "head_params": head,
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "optimizer_steps": state.step, "train_examples": self.task.n_train,
            "best_step": state.best_step, "train_seconds": round(state.train_seconds, 3),
            "eval_seconds": round(eval_seconds, 3), "peak_mem_bytes": peak_memory(self.device),
            "device": device_name(self.device), "backend": self.backend,
            "param_groups": describe_groups(self.groups), "data": data_provenance(self.spec),
            "history": [h for i, h in enumerate(state.history) if "val_loss" in h or i % stride == 0],
            "config": self.spec, **provenance(),
        }


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def data_provenance(spec: dict) -> dict:
    manifest = Path(spec["data"]["manifest"])
    content = json.loads(manifest.read_text()) if manifest.is_file() else {}
    return {"source": spec["data"].get("source"), "root": spec["data"]["root"],
            "checksums": content.get("checksums", {}).get(spec["data"]["task"], content.get("checksums", {}))}


def run_training(spec: dict) -> dict:
    return Trainer(spec).run()
