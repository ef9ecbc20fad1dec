"""Make a backbone checkpoint available: pretrain a mini one, or check official weights on disk.

Official weights are never downloaded at run time: without them the error says where to get
them and where to put them. The manifest (``checkpoint.json``) is written last.
"""
from __future__ import annotations

from pathlib import Path

from ..io import sha256_file, write_json_atomic
from . import build_model, family_of
from .checkpoints import CheckpointError, load_lm, load_vim, read_lm_config
from .lm import LM_VARIANTS, MambaLMHeadModel
from .vim import VIM_VARIANTS


def _where_to_get(backbone: str) -> str:
    if family_of(backbone) == "vim":
        name = VIM_VARIANTS[backbone].checkpoint
        repo = {"vim-t": "hustvl/Vim-tiny-midclstok", "vim-s": "hustvl/Vim-small-midclstok",
                "vim-b": "hustvl/Vim-base-midclstok"}.get(backbone, "hustvl/Vim")
        return f"download {name} from https://huggingface.co/{repo}"
    hub = LM_VARIANTS[backbone].hub_id
    return (f"download config.json and pytorch_model.bin from https://huggingface.co/{hub} "
            f"(or the -hf variant's config.json and model.safetensors) into one directory")


def check_official(backbone: str, path: Path) -> list[Path]:
    """Load the weights into a fresh model (strict) and return the files that hold them."""
    if not path.exists():
        raise CheckpointError(f"Weights for {backbone} are missing at {path}: {_where_to_get(backbone)} "
                              f"and put them there (or set backbones/{backbone}/path in the config).")
    if family_of(backbone) == "vim":
        load_vim(build_model(backbone, num_classes=1), path)
        return [path]
    load_lm(MambaLMHeadModel(read_lm_config(path)), path)
    return sorted(p for p in path.iterdir() if p.is_file())


def prepare_backbone(backbone: str, entry: dict, manifest: Path) -> dict:
    path = Path(entry["path"])
    if entry["source"] == "pretrain":
        from ..train.pretrain import pretrain_backbone

        return pretrain_backbone(backbone, path, manifest, entry["pretrain"], int(entry.get("threads", 1)))
    if entry["source"] != "official":
        raise CheckpointError(f"backbones/{backbone}/source must be 'pretrain' or 'official', got {entry['source']!r}")
    files = check_official(backbone, path)
    record = {"backbone": backbone, "source": "official", "path": str(path),
              "checksums": {p.name: sha256_file(p) for p in files}}
    write_json_atomic(manifest, record)
    return record
