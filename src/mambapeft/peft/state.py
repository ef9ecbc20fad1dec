"""Save and load adapters: only the trainable tensors (plus the head), never the backbone.

``adapter.safetensors`` carries the method definition as JSON metadata, so an adapter file is
self-describing: ``load_adapter`` rebuilds nothing by itself; it checks that the model it is given
(backbone + ``apply_peft`` with the same members) has exactly the file's key set.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..io import write_bytes_atomic
from .core import PeftResult

SPEC_KEY = "mambapeft.method"


def adapter_state_dict(result: PeftResult) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous() for name, p in result.trainable.items()}


def save_adapter(path: str | Path, result: PeftResult, method: dict) -> None:
    """Write atomically: a killed job never leaves a half-written adapter under the final name. The
    bytes are made in memory and written from Python, so a full disk is reported as such."""
    data = save(adapter_state_dict(result), metadata={SPEC_KEY: json.dumps(method, sort_keys=True)})
    write_bytes_atomic(path, data)


def read_adapter_method(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if SPEC_KEY not in meta:
        raise ValueError(f"{path} is not a mambapeft adapter (no {SPEC_KEY!r} metadata)")
    return json.loads(meta[SPEC_KEY])


def load_adapter(result: PeftResult, path: str | Path) -> None:
    """Copy the adapter's tensors into ``result``'s parameters; the key sets must match exactly."""
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a corrupt file
        raise ValueError(f"Cannot read adapter {path}: {err}. Re-run the training that wrote it.") from err
    expected = set(result.trainable)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"Adapter {path} does not fit this model+method: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}. Was it trained with another method or backbone?")
    with torch.no_grad():
        for name, p in result.trainable.items():
            if p.shape != tensors[name].shape:
                raise ValueError(f"Adapter {path}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(tensors[name])
