"""Load and write backbone checkpoints in the official layouts.

One ``filter_<source>(state_dict) -> state_dict`` per format converts a file's tensors to our
names; a sentinel key picks the filter; the load is strict and an error lists missing,
unexpected and mis-shaped tensors by name. Every unreadable or ill-formed file is a one-line
``CheckpointError`` naming the file, what is wrong and what to do.

* Vim ``.pth`` (hustvl/Vim releases): ``{"model": {patch_embed.proj.*, cls_token, pos_embed,
  layers.{i}.mixer.*, layers.{i}.norm.weight, norm_f.weight, head.*}}``, possibly with hustvl/Vim's
  training entries beside ``model`` (``model_ema``, ``optimizer``, ``args``, ...); the ImageNet
  head is dropped.
* ``state-spaces/mamba-*`` and ``state-spaces/mamba2-*``: ``pytorch_model.bin`` + ``config.json``
  (mamba_ssm names; Mamba-2's config.json says ``ssm_cfg: {layer: Mamba2}``).
* ``state-spaces/mamba-*-hf`` and transformers' ``Mamba2ForCausalLM``: ``model.safetensors`` (or
  ``pytorch_model.bin``) + ``config.json`` with transformers' names (``backbone.embeddings.weight``;
  the mixers' names are mamba_ssm's) and config keys (``hidden_size``, ``model_type``).
* timm ``VisionTransformer`` (``timm/vit_*`` on the Hub): ``model.safetensors`` (or ``pytorch_model.bin``)
  holding the plain state dict with timm's names (``blocks.{i}.attn.qkv.*``); the ImageNet head is
  dropped. A missing file is looked up in the local Hugging Face cache, where timm keeps it.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..io import torch_save_atomic, write_bytes_atomic, write_text_atomic
from .lm import MambaLMConfig, MambaLMHeadModel, mixer_from_ssm_cfg
from .vim import VisionMamba
from .vit import VIT_VARIANTS, VisionTransformer


class CheckpointError(ValueError):
    """A checkpoint that does not fit; the message names the file and the tensors."""


# hustvl/Vim's training checkpoints pickle the run's argparse.Namespace under "args"; allowing
# that one class keeps the load weights-only (no arbitrary code from a downloaded file).
TRAINING_DICT_GLOBALS = [argparse.Namespace]
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format


def _read_file(path: Path) -> object:
    """What a weights file holds (torch.save or safetensors), or a one-line CheckpointError."""
    if path.is_dir():
        raise CheckpointError(f"Checkpoint {path} is a directory, not a file: point the backbone's path "
                              "(backbones.<id>.path in the config) at the checkpoint file.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist: put the official weights there (see README, "
                              "'Data and weights') or fix the backbone's path (backbones.<id>.path) in the config.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes): the download or copy did not finish; "
                              "download it again.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals(TRAINING_DICT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a bad file (EOFError, KeyError, ...)
        raise CheckpointError(f"Cannot read checkpoint {path}: {_why_unreadable(path, err)}.") from None


def _why_unreadable(path: Path, err: Exception) -> str:
    if isinstance(err, OSError):  # e.g. no permission: the file itself cannot be opened
        return f"{err.strerror or err}; check the file's permissions"
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if refused:
        return (f"it holds a {refused.group(1)} object, which a weights-only load refuses; "
                "save the state dict alone (torch.save(model.state_dict(), path))")
    with path.open("rb") as handle:
        is_archive = handle.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    if path.suffix == ".safetensors" or is_archive:
        return "the file is unreadable or truncated; download it again"
    return "it is not a file written by torch.save (or it is damaged); point the config at the weights file"


def _read_state_dict(path: Path, wrapper: str | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors by parameter name; ``wrapper`` is the key of a dict that wraps them."""
    loaded = _read_file(path)
    if wrapper is not None and isinstance(loaded, dict) and wrapper in loaded:
        loaded = loaded[wrapper]
    layout = "a dict of tensors by parameter name" + (f' (or {{"{wrapper}": that dict}})' if wrapper else "")
    if not isinstance(loaded, dict):
        raise CheckpointError(f"Checkpoint {path} holds a {type(loaded).__name__}, not {layout}: "
                              "it is not a model checkpoint; download the official weights again.")
    not_tensors = sorted(str(k) for k, v in loaded.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    if not_tensors:
        raise CheckpointError(f"Checkpoint {path} holds entries that are not named tensors "
                              f"({', '.join(not_tensors[:8])}), not {layout}: download the official weights again.")
    return loaded


# ------------------------------------------------------------------------------------------------
# filters
# ------------------------------------------------------------------------------------------------
def filter_vim_pth(state_dict: dict) -> dict:
    """Strip DDP's ``module.`` prefix, drop the ImageNet head."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}


def filter_mamba_ssm(state_dict: dict) -> dict:
    """mamba_ssm names are ours."""
    return dict(state_dict)


def filter_mamba_hf(state_dict: dict) -> dict:
    """transformers' MambaForCausalLM and Mamba2ForCausalLM -> mamba_ssm names (only the embedding
    is renamed)."""
    return {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
            for k, v in state_dict.items()}


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


def _described(dims: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in dims.items())


def refuse_other_variant(source: Path, found: dict, declared: dict, backbone: str | None = None) -> None:
    """Weights of another size would train fine and report results under the wrong backbone's name."""
    if any(found[name] != declared[name] for name in found):
        raise CheckpointError(f"{source} holds a model with {_described(found)} but "
                              f"{backbone or 'the model being loaded'} has {_described(declared)}: these are another "
                              "variant's weights; declare the backbone they belong to, or point "
                              f"backbones.{backbone or '<id>'}.path at the right weights.")


# ------------------------------------------------------------------------------------------------
# Vim
# ------------------------------------------------------------------------------------------------
def block_dimensions(state_dict: dict, blocks: str) -> dict:
    """embed_dim and depth as a vision state dict's tensors show them (those it has); ``blocks`` is
    the module list of its blocks (Vim ``layers``, ViT ``blocks``)."""
    dims = {}
    if "cls_token" in state_dict and state_dict["cls_token"].ndim:
        dims["embed_dim"] = state_dict["cls_token"].shape[-1]
    layers = {int(match.group(1)) for key in state_dict if (match := re.match(rf"{blocks}\.(\d+)\.", key))}
    if layers:
        dims["depth"] = max(layers) + 1
    return dims


def _load_backbone(model: nn.Module, state_dict: dict, source: Path, backbone: str | None, blocks: str) -> None:
    """A vision backbone's weights into ``model``, refused when they are another variant's (``blocks``:
    see :func:`block_dimensions`); the head keeps its own init."""
    refuse_other_variant(source, block_dimensions(state_dict, blocks), block_dimensions(model.state_dict(), blocks),
                         backbone)
    _strict_load(model, state_dict, source, ignore_missing=model.classifier_names())


def load_vim(model: VisionMamba, path: str | Path, backbone: str | None = None) -> None:
    """Load an official Vim ``.pth`` into ``model``'s backbone; the head keeps its own init.

    hustvl/Vim's training-dict form loads its ``model`` entry, as its ``--finetune`` does. ``backbone``
    (the declared id) names the variant in the error when the file holds another one.
    """
    path = Path(path)
    _load_backbone(model, filter_vim_pth(_read_state_dict(path, wrapper="model")), path, backbone, "layers")


def save_vim(model: VisionMamba, path: str | Path) -> None:
    """Write ``{"model": state_dict}``, the layout of hustvl/Vim's released checkpoints."""
    torch_save_atomic({"model": model.state_dict()}, path)


# ------------------------------------------------------------------------------------------------
# ViT (timm's VisionTransformer state dicts: the Hub's model.safetensors / pytorch_model.bin)
# ------------------------------------------------------------------------------------------------
TIMM_VIT_SENTINEL = "blocks.0.attn.qkv.weight"
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a Hub repository's weights, in the order read


def filter_timm_vit(state_dict: dict, source: Path) -> dict:
    """Strip DDP's ``module.``, drop the ImageNet head; a file without ``blocks.0.attn.qkv.weight``
    is not a timm ViT."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if TIMM_VIT_SENTINEL not in state_dict:
        raise CheckpointError(f"Checkpoint {source} has no {TIMM_VIT_SENTINEL}: it is not a timm VisionTransformer "
                              "state dict; point the backbone's path at timm's model.safetensors for that ViT.")
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}


def hub_cached_weights(hub_id: str) -> Path | None:
    """The weights file of ``hub_id`` in the local Hugging Face cache (where timm's ``pretrained=True``
    puts it); None when it is not there. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    for name in HUB_WEIGHT_FILES:
        cached = try_to_load_from_cache(hub_id, name)
        if isinstance(cached, str):
            return Path(cached)
    return None


def vit_weights_file(path: str | Path, backbone: str | None) -> Path:
    """``path`` when it exists, else the variant's file in the Hugging Face cache, else a one-line
    CheckpointError naming both places and how to fill either."""
    path = Path(path)
    hub_id = VIT_VARIANTS[backbone].hub_id if backbone in VIT_VARIANTS else None
    if path.exists():
        return path
    cached = hub_cached_weights(hub_id) if hub_id else None
    if cached is not None:
        return cached
    if hub_id is None:
        raise CheckpointError(f"ViT weights are missing at {path}: put them there or set backbones.<id>.path "
                              "in the config.")
    raise CheckpointError(f"Weights for {backbone} are neither at {path} nor in the Hugging Face cache ({hub_id}): "
                          f"download model.safetensors from https://huggingface.co/{hub_id} to {path}, or fill the "
                          f"cache with timm.create_model('{hub_id.removeprefix('timm/')}', pretrained=True), or set "
                          f"backbones.{backbone}.path in the config.")


def load_vit(model: VisionTransformer, path: str | Path, backbone: str | None = None) -> None:
    """Load timm's ViT weights (a file, or a Hub snapshot directory holding one) into ``model``;
    the head keeps its own init. ``backbone`` (the declared id) finds its Hub cache entry when the file is
    missing and names the variant in the error for another one's weights."""
    path = vit_weights_file(path, backbone)
    if path.is_dir():
        path = next((path / name for name in HUB_WEIGHT_FILES if (path / name).is_file()), path)
    _load_backbone(model, filter_timm_vit(_read_state_dict(path, wrapper="model"), path), path, backbone, "blocks")


# the official-weights loader of each vision backbone family (models.family_of)
VISION_LOADERS = {"vim": load_vim, "vit": load_vit}


def _write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` as a safetensors file (contiguous CPU copies, ``format: pt`` as the Hub's files)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes_atomic(path, save(tensors, metadata={"format": "pt"}))


def save_vit(model: VisionTransformer, path: str | Path) -> None:
    """Write the state dict as safetensors, the layout of timm's Hub files (``model.safetensors``)."""
    _write_safetensors(path, model.state_dict())


# ------------------------------------------------------------------------------------------------
# Mamba LM
# ------------------------------------------------------------------------------------------------
# Required sizes per layout: mamba_ssm's config.json, transformers' Mamba(2)Config json.
LM_CONFIG_SIZES = {"d_model": ("d_model", "n_layer", "vocab_size"),
                   "hidden_size": ("hidden_size", "num_hidden_layers", "vocab_size")}


def _json_float(value):
    """transformers >= 5 writes an infinite float as {"__float__": "Infinity"}."""
    return float(value["__float__"]) if isinstance(value, dict) and "__float__" in value else value


def _hf_mamba(data: dict, source) -> dict:
    """MambaLMConfig fields of transformers' MambaConfig (model_type ``mamba``) beyond the shared sizes."""
    return {"ssm_cfg": {"d_state": data.get("state_size", 16), "d_conv": data.get("conv_kernel", 4),
                        "expand": data.get("expand", 2), "dt_rank": data.get("time_step_rank", "auto"),
                        "conv_bias": data.get("use_conv_bias", True), "bias": data.get("use_bias", False)}}


def _hf_mamba2(data: dict, source) -> dict:
    """MambaLMConfig fields of transformers' Mamba2Config (model_type ``mamba2``) beyond the shared sizes;
    padding and tying as the state-spaces/mamba2-* releases and transformers' default (untied)."""
    expand, head_dim = data.get("expand", 2), data.get("head_dim", 64)
    if data.get("num_heads") is not None and data["num_heads"] * head_dim != expand * data["hidden_size"]:
        raise CheckpointError(f"{source}: num_heads {data['num_heads']} x head_dim {head_dim} != expand {expand} x "
                              f"hidden_size {data['hidden_size']}: Mamba-2 heads must tile the inner width; "
                              "download config.json again.")
    ssm_cfg = {"layer": "Mamba2", "d_state": data.get("state_size", 128), "d_conv": data.get("conv_kernel", 4),
               "expand": expand, "headdim": head_dim, "ngroups": data.get("n_groups", 1),
               "dt_min": data.get("time_step_min", 0.001), "dt_max": data.get("time_step_max", 0.1),
               "dt_init_floor": data.get("time_step_floor", 1e-4),
               "dt_limit": tuple(_json_float(v) for v in data.get("time_step_limit", (0.0, float("inf")))),
               "chunk_size": data.get("chunk_size", 256), "conv_bias": data.get("use_conv_bias", True),
               "bias": data.get("use_bias", False)}
    return {"ssm_cfg": ssm_cfg, "pad_vocab_size_multiple": 16, "tie_embeddings": data.get("tie_word_embeddings", False)}


# transformers' model_type -> the architecture-specific fields (a config without one is a MambaConfig)
HF_MODEL_TYPES = {"mamba": _hf_mamba, "mamba2": _hf_mamba2}


def lm_config_from_json(data: dict, source: Path | str = "config.json") -> MambaLMConfig:
    """mamba_ssm's config.json, or transformers' MambaConfig / Mamba2Config json (``hidden_size`` etc.)."""
    layout = next((key for key in LM_CONFIG_SIZES if key in data), None)
    if layout is None:
        raise CheckpointError(f"{source} has neither 'd_model' (state-spaces/mamba-* layout) nor 'hidden_size' "
                              "(the -hf layout): it is not a Mamba LM config; download config.json again.")
    for key in LM_CONFIG_SIZES[layout]:
        _require_positive_int(data, key, source)
    if layout == "d_model":
        known = MambaLMConfig.__dataclass_fields__
        fields = {k: v for k, v in data.items() if k in known}
    else:
        model_type = data.get("model_type", "mamba")
        if model_type not in HF_MODEL_TYPES:
            raise CheckpointError(f"{source}: model_type {model_type!r} is not a Mamba LM; "
                                  f"supported: {', '.join(HF_MODEL_TYPES)}.")
        fields = {"d_model": data["hidden_size"], "n_layer": data["num_hidden_layers"],
                  "vocab_size": data["vocab_size"], "residual_in_fp32": data.get("residual_in_fp32", True),
                  "norm_epsilon": data.get("layer_norm_epsilon", 1e-5),
                  "tie_embeddings": data.get("tie_word_embeddings", True), **HF_MODEL_TYPES[model_type](data, source)}
    try:  # an unknown mixer or setting, or sizes the mixer refuses (e.g. headdim): one line naming the file
        config = MambaLMConfig(**fields)
        mixer, settings = mixer_from_ssm_cfg(config.ssm_cfg)
        # one layer (0.2 s for Mamba-2.8b), its random draws not taken from the caller's generator: on the
        # meta device its init's elementwise ops would import torch._dynamo (1.3 s) in every evaluate job
        with torch.random.fork_rng(devices=[]):
            mixer(config.d_model, device="cpu", **settings)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}.") from None
    return config


def _require_positive_int(data: dict, key: str, source) -> None:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problem = "is missing" if key not in data else f"is {value!r}, not a positive integer"
        raise CheckpointError(f"{source}: '{key}' {problem}; download config.json again.")


def lm_dimensions(config: MambaLMConfig) -> dict:
    """The mixer and sizes that tell the published Mamba LMs apart."""
    return {"d_model": config.d_model, "n_layer": config.n_layer, "padded_vocab_size": config.padded_vocab_size,
            "ssm_cfg.layer": config.mixer_layer}


def read_lm_config(directory: str | Path) -> MambaLMConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Mamba LM directory holds config.json and the weights "
                              "(pytorch_model.bin or model.safetensors).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); download config.json again.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object of config keys; "
                              "download config.json again.")
    return lm_config_from_json(data, path)


def _read_lm_tensors(directory: Path) -> tuple[dict, Path]:
    present = [directory / name for name in HUB_WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise CheckpointError(f"{directory} holds neither model.safetensors nor pytorch_model.bin: download the "
                              "weights next to config.json.")
    return _read_state_dict(present[0]), present[0]


def _without_tied_head_copy(state_dict: dict, source: Path) -> dict:
    """A tied model's lm_head is its embedding: the file's copy is redundant if equal, a contradiction if not."""
    head, embedding = state_dict.get("lm_head.weight"), state_dict.get("backbone.embedding.weight")
    if head is None:
        return state_dict
    if embedding is not None and not torch.equal(head, embedding):
        raise CheckpointError(f"{source}: lm_head.weight differs from the embedding but config.json ties them "
                              "(tie_embeddings / tie_word_embeddings true); set it to false to keep the separate head.")
    return {k: v for k, v in state_dict.items() if k != "lm_head.weight"}


def load_lm(model: MambaLMHeadModel, directory: str | Path) -> None:
    """Load either published layout from a local directory into ``model``; an untied lm_head loads too."""
    state_dict, source = _read_lm_tensors(Path(directory))
    sentinel = next((k for k in LM_FILTERS if k in state_dict), None)
    if sentinel is None:
        raise CheckpointError(f"{source} has neither {' nor '.join(LM_FILTERS)}: not a Mamba LM checkpoint")
    state_dict = LM_FILTERS[sentinel](state_dict)
    tied = model.lm_head.weight is model.backbone.embedding.weight
    if tied:
        state_dict = _without_tied_head_copy(state_dict, source)
    _strict_load(model, state_dict, source, ignore_missing=("lm_head.",) if tied else ())


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


# ------------------------------------------------------------------------------------------------
# transformers' MambaForCausalLM layout (the inverse of _hf_mamba and filter_mamba_hf)
# ------------------------------------------------------------------------------------------------
HF_EMBEDDING, OUR_EMBEDDING = "backbone.embeddings.weight", "backbone.embedding.weight"


def hf_mamba_config(model: MambaLMHeadModel, eos_id: int) -> dict:
    """transformers' MambaConfig json of ``model``: its vocabulary is the padded one (the embedding's
    rows, as in state-spaces/mamba-*-hf), the mixer sizes are read off the first mixer."""
    config, mixer = model.config, model.backbone.layers[0].mixer
    if config.mixer_layer != "Mamba1":
        raise CheckpointError(f"ssm_cfg.layer {config.mixer_layer}: only Mamba-1 LMs have a transformers "
                              "MambaForCausalLM layout here; use the mamba_ssm layout")
    tied = model.lm_head.weight is model.backbone.embedding.weight
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": config.padded_vocab_size,
            "hidden_size": config.d_model, "num_hidden_layers": config.n_layer, "intermediate_size": mixer.d_inner,
            "state_size": mixer.d_state, "conv_kernel": mixer.d_conv, "expand": mixer.expand,
            "time_step_rank": mixer.dt_rank, "use_conv_bias": mixer.conv1d.bias is not None,
            "use_bias": mixer.in_proj.bias is not None, "hidden_act": "silu",
            "layer_norm_epsilon": config.norm_epsilon, "residual_in_fp32": config.residual_in_fp32,
            "tie_word_embeddings": tied, "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
            "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch."), "use_cache": True}


def save_lm_hf(model: MambaLMHeadModel, directory: str | Path, eos_id: int) -> None:
    """Write transformers' layout: config.json + model.safetensors (a tied head is not stored)."""
    directory = Path(directory)
    config = hf_mamba_config(model, eos_id)
    tensors = {(HF_EMBEDDING if k == OUR_EMBEDDING else k): v for k, v in model.state_dict().items()
               if not (config["tie_word_embeddings"] and k == "lm_head.weight")}
    _write_safetensors(directory / "model.safetensors", tensors)
    write_text_atomic(directory / "config.json", json.dumps(config, indent=2))


# mamba_ssm's MambaConfig fields (its from_pretrained is ``MambaConfig(**config.json)``: no other key may appear)
MAMBA_SSM_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                    "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")
MAMBA_SSM_NORM_EPSILON = 1e-5  # what mamba_ssm's create_block uses; its config has no key for it


def save_lm_mamba_ssm(model: MambaLMHeadModel, directory: str | Path) -> None:
    """Write the layout mamba_ssm's ``MambaLMHeadModel.from_pretrained`` reads: config.json with its
    MambaConfig fields only, and pytorch_model.bin."""
    config = model.describe()
    if config["norm_epsilon"] != MAMBA_SSM_NORM_EPSILON:
        raise CheckpointError(f"norm_epsilon {config['norm_epsilon']} cannot be expressed in mamba_ssm's config "
                              f"(its blocks use {MAMBA_SSM_NORM_EPSILON}); use the transformers layout")
    directory = Path(directory)
    torch_save_atomic(model.state_dict(), directory / "pytorch_model.bin")
    write_text_atomic(directory / "config.json", json.dumps({k: config[k] for k in MAMBA_SSM_FIELDS}, indent=2))
