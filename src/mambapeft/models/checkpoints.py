"""Load and write backbone checkpoints in the official layouts.

One ``filter_<source>(state_dict) -> state_dict`` per format converts a file's tensors to our
names; a sentinel key picks the filter; the load is strict and an error lists missing,
unexpected and mis-shaped tensors by name.

* Vim ``.pth`` (hustvl/Vim releases): ``{"model": {patch_embed.proj.*, cls_token, pos_embed,
  layers.{i}.mixer.*, layers.{i}.norm.weight, norm_f.weight, head.*}}``; the ImageNet head is dropped.
* ``state-spaces/mamba-*``: ``pytorch_model.bin`` + ``config.json`` (mamba_ssm names).
* ``state-spaces/mamba-*-hf``: ``model.safetensors`` (or ``pytorch_model.bin``) + ``config.json``
  with transformers' names (``backbone.embeddings.weight``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..io import torch_save_atomic, write_text_atomic
from .lm import MambaLMConfig, MambaLMHeadModel
from .vim import VisionMamba


class CheckpointError(ValueError):
    """A checkpoint that does not fit; the message names the file and the tensors."""


def _torch_load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Put the official weights there "
                              "(see README, 'Data and weights') or fix `weights_root` in the config.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"Cannot read checkpoint {path}: {err}") from err


# ------------------------------------------------------------------------------------------------
# filters
# ------------------------------------------------------------------------------------------------
def filter_vim_pth(state_dict: dict) -> dict:
    """Unwrap ``model``, strip DDP's ``module.`` prefix, drop the ImageNet head."""
    state_dict = state_dict.get("model", state_dict)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}


def filter_mamba_ssm(state_dict: dict) -> dict:
    """mamba_ssm names are ours; the tied ``lm_head.weight`` copy is redundant."""
    return {k: v for k, v in state_dict.items() if k != "lm_head.weight"}


def filter_mamba_hf(state_dict: dict) -> dict:
    """transformers' MambaForCausalLM -> mamba_ssm names (only the embedding is renamed)."""
    renamed = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
               for k, v in state_dict.items()}
    return filter_mamba_ssm(renamed)


LM_FILTERS = {"backbone.embeddings.weight": filter_mamba_hf, "backbone.embedding.weight": filter_mamba_ssm}


def _strict_load(model: nn.Module, state_dict: dict, source: Path, ignore_missing: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict and not k.startswith(ignore_missing))
    unexpected = sorted(k for k in state_dict if k not in own)
    shapes = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state_dict.items() if k in own and own[k].shape != v.shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"Checkpoint {source} does not match the model: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}, mis-shaped {shapes[:8]}. "
                              "Is it the right variant (e.g. vim-s vs vim-b, mamba-130m vs -370m)?")
    model.load_state_dict(state_dict, strict=False)


# ------------------------------------------------------------------------------------------------
# Vim
# ------------------------------------------------------------------------------------------------
def load_vim(model: VisionMamba, path: str | Path) -> None:
    """Load an official Vim ``.pth`` into ``model``'s backbone; the head keeps its own init."""
    path = Path(path)
    _strict_load(model, filter_vim_pth(_torch_load(path)), path, ignore_missing=model.classifier_names())


def save_vim(model: VisionMamba, path: str | Path) -> None:
    """Write ``{"model": state_dict}``, the layout of hustvl/Vim's released checkpoints."""
    torch_save_atomic({"model": model.state_dict()}, path)


# ------------------------------------------------------------------------------------------------
# Mamba LM
# ------------------------------------------------------------------------------------------------
def lm_config_from_json(data: dict) -> MambaLMConfig:
    """mamba_ssm's config.json, or transformers' MambaConfig json (``hidden_size`` etc.)."""
    if "d_model" in data:
        known = MambaLMConfig.__dataclass_fields__
        return MambaLMConfig(**{k: v for k, v in data.items() if k in known})
    ssm_cfg = {"d_state": data.get("state_size", 16), "d_conv": data.get("conv_kernel", 4),
               "expand": data.get("expand", 2), "dt_rank": data.get("time_step_rank", "auto"),
               "conv_bias": data.get("use_conv_bias", True), "bias": data.get("use_bias", False)}
    return MambaLMConfig(d_model=data["hidden_size"], n_layer=data["num_hidden_layers"],
                         vocab_size=data["vocab_size"], ssm_cfg=ssm_cfg,
                         residual_in_fp32=data.get("residual_in_fp32", True),
                         norm_epsilon=data.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=data.get("tie_word_embeddings", True))


def read_lm_config(directory: str | Path) -> MambaLMConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Mamba LM directory holds config.json and the weights "
                              "(pytorch_model.bin or model.safetensors).")
    return lm_config_from_json(json.loads(path.read_text()))


def _read_lm_tensors(directory: Path) -> tuple[dict, Path]:
    safetensors_path, bin_path = directory / "model.safetensors", directory / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_path)), safetensors_path
    return _torch_load(bin_path), bin_path


def load_lm(model: MambaLMHeadModel, directory: str | Path) -> None:
    """Load either published layout from a local directory into ``model``."""
    state_dict, source = _read_lm_tensors(Path(directory))
    sentinel = next((k for k in LM_FILTERS if k in state_dict), None)
    if sentinel is None:
        raise CheckpointError(f"{source} has neither {' nor '.join(LM_FILTERS)}: not a Mamba LM checkpoint")
    _strict_load(model, LM_FILTERS[sentinel](state_dict), source, ignore_missing=("lm_head.",))


def build_lm_from_dir(directory: str | Path) -> MambaLMHeadModel:
    """Config, construct, filter, strict load (mamba_ssm's ``from_pretrained`` order)."""
    model = MambaLMHeadModel(read_lm_config(directory))
    load_lm(model, directory)
    return model


def save_lm(model: MambaLMHeadModel, directory: str | Path) -> None:
    """Write the ``state-spaces/mamba-*`` layout: config.json + pytorch_model.bin."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in model.describe().items() if k != "family"}
    write_text_atomic(directory / "config.json", json.dumps(config, indent=2))
    torch_save_atomic(model.state_dict(), directory / "pytorch_model.bin")
