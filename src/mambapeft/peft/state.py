"""Save and load adapters: only the trainable tensors (plus the head), never the backbone.

``adapter.safetensors`` carries the method definition as JSON metadata, so an adapter file is
self-describing: ``load_adapter`` rebuilds nothing by itself; it checks that the model it is given
(backbone + ``apply_peft`` with the same members) has exactly the file's key set. A file that cannot
be read, is no mambapeft adapter or does not fit is an :class:`AdapterError` naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..io import write_bytes_atomic
from ..models.checkpoints import CheckpointError
from .core import PeftResult

SPEC_KEY = "mambapeft.method"


class AdapterError(CheckpointError):
    """An adapter file that cannot be read, is not a mambapeft adapter, or does not fit the model
    and method it is loaded for; the message names the file and what to do."""


def adapter_state_dict(result: PeftResult) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous() for name, p in result.trainable.items()}


def save_adapter(path: str | Path, result: PeftResult, method: dict) -> None:
    """Write atomically: a killed job never leaves a half-written adapter under the final name. The
    bytes are made in memory and written from Python, so a full disk is reported as such."""
    data = save(adapter_state_dict(result), metadata={SPEC_KEY: json.dumps(method, sort_keys=True)})
    write_bytes_atomic(path, data)


def read_adapter_method(path: str | Path) -> dict:
    """The method definition ``path`` was trained with (its metadata)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises several types for a file cut short or damaged
        raise _unreadable(path, err) from err
    if SPEC_KEY not in meta:
        raise AdapterError(f"{path} is not a mambapeft adapter (no {SPEC_KEY!r} metadata): give the "
                           "adapter.safetensors that a `mambapeft train` job writes")
    try:
        return json.loads(meta[SPEC_KEY])
    except ValueError as err:  # a damaged byte in the header's metadata
        raise _unreadable(path, err) from err


def read_adapter_members(path: str | Path, method_id: str) -> list[dict]:
    """The PEFT members ``path`` was trained with (as applied, with what prepare hooks measured),
    once its recorded method is ``method_id``: the members alone would rebuild whichever method
    the file holds, and the result would be labelled with the other's name."""
    recorded = read_adapter_method(path)
    if recorded.get("id") != method_id:
        raise AdapterError(f"{path} is an adapter of method {recorded.get('id')!r}, not of {method_id!r}: "
                           f"give the adapter that training of method {method_id!r} wrote")
    return recorded["peft"]


def _unreadable(path: str | Path, err: Exception) -> AdapterError:
    reason = " ".join(str(err).split())[:200]  # one line, whatever the library's message
    return AdapterError(f"{path} cannot be read as an adapter ({type(err).__name__}: {reason}); "
                        "re-run the training job that writes it")


def load_adapter(result: PeftResult, path: str | Path) -> None:
    """Copy the adapter's tensors into ``result``'s parameters; the key sets must match exactly."""
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a corrupt file
        raise _unreadable(path, err) from err
    expected = set(result.trainable)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterError(f"Adapter {path} does not fit this model+method: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}. Was it trained with another method or backbone?")
    with torch.no_grad():
        for name, p in result.trainable.items():
            if p.shape != tensors[name].shape:
                raise AdapterError(f"Adapter {path}: {name} has shape {tuple(tensors[name].shape)}, "
                                   f"the model expects {tuple(p.shape)}")
            p.copy_(tensors[name])
