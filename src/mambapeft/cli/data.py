"""``mambapeft data``: prepare, download, cache and check datasets."""
from __future__ import annotations

import json
from pathlib import Path

from ..runspec import ConfigError
from .common import json_arg, positive_int


def add_parsers(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare, cache and check datasets").add_subparsers(
        dest="data_command", required=True)
    _add_prepare(data)
    _add_download(data)
    _add_download_hub(data)
    _add_cache(data)
    _add_check(data)
    _add_tokenize(data)


def _add_prepare(data) -> None:
    p = data.add_parser("prepare", help="write the offline stand-ins, or check real data, and write a manifest")
    p.add_argument("--spec", required=True, help="the dataset's config entry as JSON (see config/config.yaml `data:`)")
    p.add_argument("--manifest", required=True, help="manifest.json to write last (file list with sha256)")
    p.set_defaults(func=cmd_data_prepare)


def cmd_data_prepare(args) -> None:
    from ..data.prepare import prepare_dataset

    prepare_dataset(json_arg(args.spec), Path(args.manifest))


def _add_download(data) -> None:
    p = data.add_parser("download", help="fetch a dataset its `download:` mapping names into the data root, "
                                         "unless present",
                        description="vtab: extracts the configured tasks of RepAdapter's vtab-1k.zip into the root: "
                                    "from a local copy (`download.archive`), a URL, or Google Drive (`gdrive_id`, needs "
                                    "gdown). commonsense/math: LLM-Adapters' files from raw URLs at a pinned commit "
                                    "(`download.files`, sha256/git_sha1-checked) and the commonsense evaluation splits "
                                    "from the Hugging Face Hub (`download.eval_sets`: task -> revision), exported to "
                                    "eval/<task>/<split>.jsonl. Without network (or with HF_HUB_OFFLINE=1) it stops "
                                    "with one message naming what is missing and where to put it.")
    p.add_argument("--spec", required=True, help="the dataset's config entry as JSON, with `download:` and `root`")
    p.add_argument("--out", required=True, help="record of what was done (JSON, file checksums), written last")
    p.set_defaults(func=cmd_data_download)


def cmd_data_download(args) -> None:
    from ..data.download import fetch_language, fetch_vtab
    from ..io import write_json_atomic

    spec = json_arg(args.spec)
    if "download" not in spec:
        raise ConfigError("data download needs a data entry with a `download:` mapping (config `data:`)")
    if spec.get("kind") == "vtab":
        record = fetch_vtab(spec["root"], spec["tasks"], spec["download"])
    else:
        record = fetch_language(spec)
    write_json_atomic(Path(args.out), record)


def _add_download_hub(data) -> None:
    p = data.add_parser("download-hub", help="fetch one Hub dataset of the config's `hub_datasets` table, unless present",
                        description="Either the files of a Hub dataset repository at a pinned revision (`repo`, "
                                    "`revision`, `allow_patterns` or `file`), placed at `target` as published (e.g. "
                                    "parquet shards, read in place with `datasets`), or, with `family`, the splits of "
                                    "that family's tasks of language/tasks.yaml (`revisions`: task -> revision) "
                                    "exported to <target>/eval/<task>/<split>.jsonl. Files in place are checked "
                                    "against the Hub's listing, never replaced; without network (or with "
                                    "HF_HUB_OFFLINE=1) it stops with one message naming what to put where.")
    p.add_argument("--name", required=True, help="the entry's name in `hub_datasets`")
    p.add_argument("--spec", required=True, help="the entry as JSON (target, repo/revision/allow_patterns or family)")
    p.add_argument("--out", required=True, help="record of what was done (JSON, commit and file checksums), written last")
    p.set_defaults(func=cmd_data_download_hub)


def cmd_data_download_hub(args) -> None:
    from ..data.download import fetch_hub_dataset
    from ..io import write_json_atomic

    write_json_atomic(Path(args.out), fetch_hub_dataset(args.name, json_arg(args.spec)))


def _add_cache(data) -> None:
    p = data.add_parser("cache", help="decode and resize one VTAB split once into a uint8 .npz cache")
    p.add_argument("--root", required=True, help="VTAB-1k root (holds <task>/train800val200.txt ...)")
    p.add_argument("--task", required=True, help="VTAB task of vision/tasks.yaml, e.g. cifar")
    p.add_argument("--split", required=True, help="train800 | val200 | train800val200 | test")
    p.add_argument("--resolution", type=positive_int, required=True, help="square side in pixels (224 for Vim)")
    p.add_argument("--out", required=True, help="output .npz")
    p.set_defaults(func=cmd_data_cache)


def cmd_data_cache(args) -> None:
    from ..data.vtab import build_image_cache

    summary = build_image_cache(args.root, args.task, args.split, args.resolution, args.out)
    print(json.dumps(summary))


def _add_check(data) -> None:
    p = data.add_parser("check", help="validate a dataset before spending GPU time; prints a JSON summary")
    p.add_argument("--kind", required=True, choices=("vtab", "commonsense", "math", "synthetic", "orca_math",
                                                         "yelp_polarity"),
                   help="what kind of dataset `path` holds (data/check.py describes each layout)")
    p.add_argument("path", help="vtab: the VTAB-1k root; commonsense/math/synthetic: the data directory; "
                                "orca_math: the local copy (data/train-*.parquet, JSON lines or save_to_disk); "
                                "yelp_polarity: the local copy (plain_text/{train,test}-*.parquet)")
    p.add_argument("--task", help="vtab task (required for vtab); synthetic: one training set")
    p.set_defaults(func=cmd_data_check)


def cmd_data_check(args) -> None:
    from ..data.check import check_dataset

    print(json.dumps(check_dataset(args.kind, args.path, args.task), indent=1))


def _add_tokenize(data) -> None:
    p = data.add_parser("tokenize", help="tokenize a text dataset once into a memory-mapped token array "
                                         "(orca_math: question + answer, each followed by eos; yelp_polarity: "
                                         "the reviews of both splits, with their labels in --labels)")
    p.add_argument("--spec", required=True, help='JSON {"kind": "orca_math" or "yelp_polarity", "root": ..., '
                                                 '"tokenizer": ..., "layout": ...}')
    p.add_argument("--tokens", required=True, help="token array to write (.bin)")
    p.add_argument("--labels", help="yelp_polarity: the (token count, label) array to write (.labels.bin)")
    p.add_argument("--meta", required=True, help="its description (.json), written last")
    p.set_defaults(func=cmd_data_tokenize)


def cmd_data_tokenize(args) -> None:
    from ..data.orca_math import corpus_entry
    from ..data.token_cache import tokenize_corpus
    from ..data.yelp_polarity import tokenize_yelp

    spec = json_arg(args.spec)
    if spec.get("kind") == "orca_math":
        record = tokenize_corpus(corpus_entry(spec["root"]), spec["tokenizer"], spec["layout"], Path(args.tokens),
                                 Path(args.meta))
    elif spec.get("kind") == "yelp_polarity" and args.labels:
        record = tokenize_yelp(spec["root"], spec["tokenizer"], Path(args.tokens), Path(args.labels), Path(args.meta))
    else:
        raise ConfigError(f"data tokenize reads data of kind orca_math, or yelp_polarity with --labels; got kind "
                          f"{spec.get('kind')!r}{'' if args.labels else ' and no --labels'}")
    print(json.dumps({k: record[k] for k in ("n_tokens", "n_documents")}))
