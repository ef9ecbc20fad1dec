"""Fault injection for tests/faults: Python imports this module at the start of every process that
has this folder on PYTHONPATH (it is ``sitecustomize``). Each fault is off unless its environment
variable is set, so the process is otherwise the real `mambapeft` job:

MAMBAPEFT_FAULT_KILL_WRITE=<file name>:<n>
    SIGKILL the process during its n-th atomic write (``mambapeft.io.atomic_path``) of a file with
    that name, once half of the file's bytes are on disk.
MAMBAPEFT_FAULT_KILL_STEP=<n>
    SIGKILL the process right after its n-th optimizer step.
MAMBAPEFT_FAULT_FILE_SIZE_LIMIT=<bytes>
    RLIMIT_FSIZE: a write past that size fails with EFBIG, as on a full disk.
MAMBAPEFT_FAULT_HOLD_WRITE=<file name>:<folder>
    Before writing a file with that name, create <folder>/held and wait until <folder>/release
    exists: a Snakemake job that keeps its workflow's lock for as long as a test needs.

With any of them set, a checkpoint the training loop writes in the background
(``train/checkpoint_writer.py``) is on disk before the loop goes on, so that a fault falls at the step or
write its variable names and not where the disk's pace put the write: on a loaded CI machine a kill at
step 3 once came before epoch 1's checkpoint was on disk, and a write still running when the next
checkpoint falls due makes the loop skip that one. (A kill during a write is KILL_WRITE's; the
background writer's own behaviour is tests/test_checkpoint_writer.py's.)
"""
import contextlib
import itertools
import os
import resource
import signal
import time
from pathlib import Path

HOLD_TIMEOUT_S = 300  # a test that dies before releasing must not leave a job waiting forever


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_during_write(name: str, nth: int) -> None:
    import mambapeft.io

    real_atomic_path, writes = mambapeft.io.atomic_path, itertools.count(1)

    @contextlib.contextmanager
    def atomic_path(path):
        with real_atomic_path(path) as temporary:
            yield temporary
            if Path(path).name == name and next(writes) == nth:
                # The whole file went to the temporary path; keeping half of it leaves the disk as a
                # kill halfway through the write would.
                os.truncate(temporary, temporary.stat().st_size // 2)
                _kill_self()

    mambapeft.io.atomic_path = atomic_path  # before any module imports it by name


def _kill_after_step(nth: int) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = itertools.count(1)

    def kill_at_nth_step(optimizer, args, kwargs):
        if next(steps) == nth:
            _kill_self()

    register_optimizer_step_post_hook(kill_at_nth_step)


def _hold_write(name: str, folder: Path) -> None:
    import mambapeft.io

    real_atomic_path = mambapeft.io.atomic_path

    @contextlib.contextmanager
    def atomic_path(path):
        if Path(path).name == name:
            (folder / "held").touch()
            deadline = time.monotonic() + HOLD_TIMEOUT_S
            while not (folder / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        with real_atomic_path(path) as temporary:
            yield temporary

    mambapeft.io.atomic_path = atomic_path


def _checkpoints_on_disk_before_the_loop_goes_on() -> None:
    from mambapeft.train.checkpoint_writer import CheckpointWriter

    real_save = CheckpointWriter.save

    def save(self, state, path):
        real_save(self, state, path)
        self.wait()

    CheckpointWriter.save = save


def _install() -> None:
    if "MAMBAPEFT_FAULT_KILL_WRITE" in os.environ:
        name, nth = os.environ["MAMBAPEFT_FAULT_KILL_WRITE"].rsplit(":", 1)
        _kill_during_write(name, int(nth))
    if "MAMBAPEFT_FAULT_KILL_STEP" in os.environ:
        _kill_after_step(int(os.environ["MAMBAPEFT_FAULT_KILL_STEP"]))
    if "MAMBAPEFT_FAULT_FILE_SIZE_LIMIT" in os.environ:
        limit = int(os.environ["MAMBAPEFT_FAULT_FILE_SIZE_LIMIT"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if "MAMBAPEFT_FAULT_HOLD_WRITE" in os.environ:
        name, folder = os.environ["MAMBAPEFT_FAULT_HOLD_WRITE"].split(":", 1)
        _hold_write(name, Path(folder))
    if any(name.startswith("MAMBAPEFT_FAULT_") for name in os.environ):  # last: after the patches of mambapeft.io above
        _checkpoints_on_disk_before_the_loop_goes_on()


_install()
