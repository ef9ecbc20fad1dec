"""Progress output: a tqdm bar on a terminal, plain log lines otherwise (Snakemake logs), and
optional Weights & Biases logging (never required; ``mode: disabled`` makes no network call)."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("mambapeft.train")
LOG_LINES = 20  # plain-text progress lines per run


class Progress:
    def __init__(self, total: int, start: int, run: dict, wandb_cfg: dict | None = None):
        self.total, self.start, self.started = total, start, time.perf_counter()
        self.every = max(1, total // LOG_LINES)
        self.bar = None
        if sys.stderr.isatty() and total > start:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"{run['method']}/{run['task']}", unit="step")
        self.wandb = _start_wandb(run, wandb_cfg)

    def update(self, step: int, loss: float, lr: float) -> None:
        rate = (step - self.start) / max(time.perf_counter() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif step % self.every == 0 or step == self.total:
            eta = (self.total - step) / max(rate, 1e-9)
            log.info("step %d/%d  loss %.4f  lr %.3e  %.2f steps/s  eta %.0fs", step, self.total, loss, lr, rate, eta)
        if self.wandb is not None:
            self.wandb.log({"train/loss": loss, "train/lr": lr, "train/steps_per_s": rate}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run: dict, cfg: dict | None):
    """A wandb run when ``wandb.mode`` is online/offline (WANDB_MODE in the environment wins)."""
    import os

    mode = os.environ.get("WANDB_MODE") or (cfg or {}).get("mode", "disabled")
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb logging requested (mode %s) but wandb is not installed: `pip install mambapeft[wandb]`", mode)
        return None
    name = "/".join(str(run[k]) for k in ("experiment", "backbone", "task", "method", "seed"))
    return wandb.init(mode=mode, project=(cfg or {}).get("project", "mambapeft"), name=name, config=run,
                      group=f"{run['experiment']}/{run['backbone']}", reinit=True)
