"""``mambapeft backbone``: fetch official weights, pretrain a mini backbone or check official weights."""
from __future__ import annotations

from pathlib import Path

from .common import add_gpu_arguments, claim_gpus_for, json_arg, positive_int


def add_parsers(subparsers) -> None:
    backbone = subparsers.add_parser(
        "backbone", help="fetch official weights, pretrain a mini backbone or check official weights",
    ).add_subparsers(dest="backbone_command", required=True)
    _add_download(backbone)
    _add_prepare(backbone)


def _add_download(backbone) -> None:
    p = backbone.add_parser("download", help="fetch official weights (and tokenizer) from the Hugging Face Hub",
                            description="Downloads the files `backbones.<id>.download` names (repository, pinned "
                                        "revision, allow_patterns or file; optionally `tokenizer:`) to the backbone's "
                                        "path, checks each against the Hub's listing of that commit and records its "
                                        "sha256. Files already in place are checked, never replaced. HF_TOKEN is used "
                                        "for gated repositories. Offline (HF_HUB_OFFLINE=1) or without network it "
                                        "stops with one message naming what to put where.")
    p.add_argument("--backbone", required=True, help="backbone id, e.g. vim-s, mamba-130m")
    p.add_argument("--spec", required=True, help="the backbone's config entry as JSON, with `download:`")
    p.add_argument("--out", required=True, help="download.json to write last (repository, commit, file checksums)")
    p.set_defaults(func=cmd_backbone_download)


def cmd_backbone_download(args) -> None:
    from ..data.download import fetch_weights
    from ..io import write_json_atomic
    from ..runspec import ConfigError

    spec = json_arg(args.spec)
    if "download" not in spec or "path" not in spec:
        raise ConfigError(f"backbone download needs the entry's `path` and a `download:` mapping "
                          f"(config backbones.{args.backbone})")
    write_json_atomic(Path(args.out), fetch_weights(args.backbone, spec))


def _add_prepare(backbone) -> None:
    p = backbone.add_parser("prepare", help="make the backbone checkpoint available and write its manifest")
    p.add_argument("--backbone", required=True, help="backbone id, e.g. vim-mini, vim-s, mamba-130m")
    p.add_argument("--spec", required=True, help="the backbone's config entry as JSON (config `backbones:`)")
    p.add_argument("--manifest", required=True, help="checkpoint.json to write last")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads of a pretraining (default: the spec's `threads`, "
                                               "else 1); the workflow gives it here, out of the spec it tracks")
    add_gpu_arguments(p)
    p.set_defaults(func=cmd_backbone_prepare)


def cmd_backbone_prepare(args) -> None:
    claim_gpus_for(args)
    from ..train.backbone import prepare_backbone

    entry = json_arg(args.spec)
    if args.threads is not None:
        entry["threads"] = args.threads
    prepare_backbone(args.backbone, entry, Path(args.manifest))
