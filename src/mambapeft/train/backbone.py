"""Make a backbone checkpoint available: pretrain a mini one, or check official weights on disk.

Official weights are never downloaded here: the rule ``download_weights`` (``mambapeft backbone
download``) runs first for a backbone with a ``download:`` entry; without one, the error says where
to get them and where to put them. The manifest (``checkpoint.json``) is written last.
"""
from __future__ import annotations

from pathlib import Path

from ..io import sha256_file, write_json_atomic
from ..models import build_model, family_of
from ..models.checkpoints import (VISION_LOADERS, CheckpointError, lm_dimensions, load_lm, read_lm_config,
                                  refuse_other_variant, vit_weights_file)
from ..models.lm import LM_VARIANTS, MambaLMConfig, MambaLMHeadModel
from ..models.vim import VIM_VARIANTS
from ..models.vit import VIT_VARIANTS
from ..runspec import ConfigError


def _where_to_get(backbone: str) -> str:
    if family_of(backbone) == "vit":
        return (f"download model.safetensors from https://huggingface.co/{VIT_VARIANTS[backbone].hub_id} "
                "(timm's pretrained=True keeps it in the Hugging Face cache, which is read too)")
    if family_of(backbone) == "vim":
        name = VIM_VARIANTS[backbone].checkpoint
        repo = {"vim-t": "hustvl/Vim-tiny-midclstok", "vim-s": "hustvl/Vim-small-midclstok",
                "vim-b": "hustvl/Vim-base-midclstok"}.get(backbone, "hustvl/Vim")
        return f"download {name} from https://huggingface.co/{repo}"
    hub = LM_VARIANTS[backbone].hub_id
    return (f"download config.json and pytorch_model.bin from https://huggingface.co/{hub} "
            f"(or the -hf variant's config.json and model.safetensors) into one directory")


def _refuse_wrong_kind_of_path(backbone: str, path: Path) -> None:
    """Vision weights are one file (Vim .pth, timm's model.safetensors); an LM's are a directory (config.json + weights)."""
    wants_file = family_of(backbone) in VISION_LOADERS
    if path.is_file() == wants_file:
        return
    if wants_file:
        name = VIM_VARIANTS[backbone].checkpoint if backbone in VIM_VARIANTS else "model.safetensors"
        wanted = "the weights file itself" + (f" ({name})" if name else "")
    else:
        wanted = "the directory that holds config.json and pytorch_model.bin (or model.safetensors)"
    raise CheckpointError(f"{path} is a {'directory' if wants_file else 'file'}, but {backbone} needs {wanted}: "
                          f"set backbones.{backbone}.path in the config to that.")


def check_official(backbone: str, path: Path) -> list[Path]:
    """Load the weights into a fresh model (strict) and return the files that hold them."""
    if family_of(backbone) == "vit":
        path = vit_weights_file(path, backbone)  # the file at path, else timm's copy in the Hugging Face cache
    if not path.exists():
        raise CheckpointError(f"Weights for {backbone} are missing at {path}: {_where_to_get(backbone)} "
                              f"and put them there (or set backbones.{backbone}.path in the config), or give "
                              f"backbones.{backbone}.download so that the pipeline fetches them.")
    _refuse_wrong_kind_of_path(backbone, path)
    if family_of(backbone) in VISION_LOADERS:
        VISION_LOADERS[family_of(backbone)](build_model(backbone, num_classes=1), path, backbone)
        return [path]
    config = read_lm_config(path)
    declared = MambaLMConfig(**LM_VARIANTS[backbone].config)
    refuse_other_variant(path / "config.json", lm_dimensions(config), lm_dimensions(declared), backbone)
    load_lm(MambaLMHeadModel(config), path)
    return sorted(p for p in path.iterdir() if p.is_file())


def _require_entry(backbone: str, entry: dict) -> None:
    """A spec written by hand (the CLI) may name an unknown backbone or lack a key."""
    try:
        family_of(backbone)
    except KeyError as err:
        raise ConfigError(err.args[0]) from None
    missing = [key for key in ("source", "path") if key not in entry]
    if missing:
        raise ConfigError(f"the spec of backbone {backbone} lacks {', '.join(missing)} (config backbones.{backbone})")


def prepare_backbone(backbone: str, entry: dict, manifest: Path) -> dict:
    _require_entry(backbone, entry)
    path = Path(entry["path"])
    if entry["source"] == "pretrain":
        from .pretrain import pretrain_backbone

        return pretrain_backbone(backbone, path, manifest, entry["pretrain"], int(entry.get("threads", 1)))
    if entry["source"] != "official":
        raise CheckpointError(f"backbones.{backbone}.source must be 'pretrain' or 'official', got {entry['source']!r}")
    files = check_official(backbone, path)
    record = {"backbone": backbone, "source": "official", "path": str(files[0] if len(files) == 1 else path),
              "checksums": {p.name: sha256_file(p) for p in files}}
    write_json_atomic(manifest, record)
    return record
