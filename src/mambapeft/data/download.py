"""Fetch what the config's ``download:`` mappings name: VTAB-1k, the language data, backbone weights.

VTAB-1k (``fetch_vtab``): RepAdapter's preprocessed archive ``vtab-1k.zip``, the one MambaPEFT uses.
Where the archive comes from (the config's ``download:`` mapping of a vtab dataset; all optional):
``archive`` a local copy of the zip (used when the file exists: the offline way), ``url`` any
http(s) or file URL, ``gdrive_id`` the Google-Drive id (fetched with the ``gdown`` package),
``sha256`` the archive's checksum to verify. The zip holds a top-level ``vtab-1k/`` folder; its
task folders are moved to ``<root>/<task>/`` (the original README's "move the tasks up one level").
Nothing half-done can look like data: the archive is written under a ``.partial`` name and renamed
when complete; tasks are extracted into a scratch folder inside ``root`` and each task folder is
renamed into place only once the whole archive has been read. Every failure is one
:class:`DataError` naming what was tried, why it failed, the missing tasks and where to put them.

Commonsense and math data (``fetch_language``): ``files`` (LLM-Adapters' training files and math
test sets, from raw URLs at a pinned commit, checked against ``sha256`` or ``git_sha1``) and, for
commonsense, ``eval_sets`` (task -> Hub dataset revision; the dataset and split are the task's
``hf_dataset`` and ``split`` in language/tasks.yaml, the layout the one ``data check`` reads).

Hub datasets (``fetch_hub_dataset``, the config's ``hub_datasets`` table: one entry per dataset):
either the files of a Hub dataset repository as published (``repo``, ``revision``,
``allow_patterns`` or ``file``; e.g. parquet shards) placed at ``target`` in the repository's own
layout, which ``datasets`` then reads in place; or, with ``family``, the splits of that family's
tasks of language/tasks.yaml (``revisions``: task -> revision; the split scored and the few-shot
split) exported to ``<target>/eval/<task>/<split>.jsonl``, the layout lm-eval's local tasks read.

Backbone weights (``fetch_weights``): ``backbones.<id>.download`` names a Hub repository, its pinned
revision and the files (``allow_patterns``, or ``file`` when the backbone's path is that one file),
and optionally the same for the tokenizer, saved at ``backbones.<id>.tokenizer``.

How each item is fetched, checked, placed and resumed, and the offline message: :mod:`.hub`.
"""
from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from ..io import sha256_file
from ..runspec import ConfigError, check_hub_dataset
from .errors import DataError
from .hub import HubFiles, HubSplit, RawFile, download_url, fetch_all, offline_reason
from .language_tasks import TASKS_YAML, commonsense_eval_file, language_task, task_splits

ARCHIVE_TOP = "vtab-1k"
REQUIRED_SPLITS = ("train800val200.txt", "test.txt")


def missing_tasks(root: Path, tasks: list[str]) -> list[str]:
    """Tasks whose required split lists are absent (a quick look; `data check` reads every image)."""
    return [t for t in tasks if not all((root / t / name).is_file() for name in REQUIRED_SPLITS)]


def fetch_vtab(root: str | Path, tasks: list[str], source: dict) -> dict:
    """Make every task of ``tasks`` present under ``root``; return what was done (JSON-able)."""
    root = Path(root)
    missing = missing_tasks(root, tasks)
    if not missing:
        return {"status": "already present", "tasks": tasks}
    try:
        archive = _obtain_archive(root, source)
        if source.get("sha256") and sha256_file(archive) != source["sha256"]:
            raise DataError(f"{archive} has sha256 {sha256_file(archive)}, not the configured {source['sha256']}; "
                            "delete it so that it is fetched again, or fix `download.sha256`")
        _extract_tasks(archive, root, missing)
    except DataError as err:
        raise DataError(_where_to_put(root, missing, source, reason=str(err))) from None
    still = missing_tasks(root, tasks)
    if still:
        raise DataError(_where_to_put(root, still, source, reason=f"the archive {archive} lacks these tasks"))
    return {"status": "extracted", "tasks": tasks, "archive": str(archive), "sha256": sha256_file(archive)}


def _where_to_put(root: Path, missing: list[str], source: dict, reason: str) -> str:
    target = source.get("archive") or str(root / "vtab-1k.zip")
    return (f"VTAB-1k is incomplete under {root}: {reason}.\n"
            f"  missing tasks: {', '.join(missing)}\n"
            f"  put each task at {root}/<task>/ (train800val200.txt, test.txt and its images), or put "
            f"RepAdapter's vtab-1k.zip at {target} and run again")


def _obtain_archive(root: Path, source: dict) -> Path:
    local = Path(source["archive"]) if source.get("archive") else None
    if local is not None and local.is_file():
        return local
    target = local or root / ".download" / "vtab-1k.zip"
    if (source.get("url") or source.get("gdrive_id")) and (reason := offline_reason()):
        raise DataError(f"no download attempted: {reason}")
    if source.get("url"):
        return _fetch_url(source["url"], target)
    if source.get("gdrive_id"):
        return _fetch_gdrive(source["gdrive_id"], target)
    raise DataError("no archive to extract: `download` names no existing `archive`, no `url` and no `gdrive_id`")


def _fetch_url(url: str, target: Path) -> Path:
    return download_url(url, target.with_name(target.name + ".partial")).replace(target)


def _fetch_gdrive(file_id: str, target: Path) -> Path:
    try:
        import gdown
    except ImportError:
        raise DataError(f"the Google-Drive file {file_id} needs the gdown package (`pip install gdown`)") from None
    partial = target.with_name(target.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = gdown.download(id=file_id, output=str(partial), quiet=False)
    except Exception as err:  # gdown raises its own and requests' exception types
        result, reason = None, err
    else:
        reason = "gdown returned nothing"
    if result is None or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise DataError(f"could not download Google-Drive file {file_id} ({reason})")
    partial.replace(target)
    return target


def _extract_tasks(archive: Path, root: Path, tasks: list[str]) -> None:
    """Extract ``tasks`` from the archive (top folder ``vtab-1k/`` or none) and move them into place."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as scratch:
        try:
            with zipfile.ZipFile(archive) as zf:
                members = [m for m in zf.namelist() if _task_of(m) in tasks]
                for member in members:
                    zf.extract(member, scratch)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise DataError(f"{archive} is not a readable zip ({err}); delete it and download it again") from None
        for task in tasks:
            extracted = Path(scratch) / ARCHIVE_TOP / task
            extracted = extracted if extracted.is_dir() else Path(scratch) / task
            if extracted.is_dir():
                shutil.rmtree(root / task, ignore_errors=True)  # an incomplete earlier copy
                extracted.replace(root / task)


def _task_of(member: str) -> str | None:
    parts = Path(member).parts
    if parts and parts[0] == ARCHIVE_TOP:
        parts = parts[1:]
    return parts[0] if len(parts) > 1 else None


def fetch_language(spec: dict) -> dict:
    """Make the commonsense or math data of ``spec`` (a data entry with ``root``) present under its root."""
    root, source, kind = Path(spec["root"]), spec["download"], spec["kind"]
    where = f"the {kind} data entry's download"
    items = [RawFile(name, _file_url(source, file, f"{where}.files.{name}"), root / name, _checksum(file),
                     f"{where}.files.{name}") for name, file in source.get("files", {}).items()]
    if source.get("eval_sets") and kind != "commonsense":
        raise ConfigError(f"{where}.eval_sets: only commonsense evaluation sets come from Hub datasets; "
                          f"list the {kind} test sets under `files`")
    items += [split for task, revision in source.get("eval_sets", {}).items()
              for split in _task_splits(root, "commonsense", task, str(revision), f"{where}.eval_sets.{task}")]
    if not items:
        raise ConfigError(f"{where} names nothing to fetch: give `files` and/or `eval_sets`")
    return {"kind": kind, "root": str(root), "files": fetch_all(items, f"the {kind} data under {root}")}


def _file_url(source: dict, file: dict, where: str) -> str:
    if file.get("url"):
        return file["url"]
    if not source.get("base_url") or not file.get("path"):
        raise ConfigError(f"{where}: give `url`, or `path` under the download's `base_url`")
    return f"{source['base_url'].rstrip('/')}/{file['path'].lstrip('/')}"


def _checksum(file: dict) -> tuple[str, str] | None:
    kind = next((k for k in ("sha256", "git_sha1") if file.get(k)), None)
    return (kind, file[kind]) if kind else None


def _task_splits(root: Path, family: str, task: str, revision: str, where: str) -> list[HubSplit]:
    """The split a task of ``family`` scores, and its few-shot split when it has one, as Hub splits
    exported to ``<root>/eval/<task>/<split>.jsonl``."""
    entry = language_task(family, task)
    if not entry.get("hf_dataset"):
        raise ConfigError(f"{where}: {TASKS_YAML} gives {family} task {task!r} no hf_dataset to fetch it from")
    return [HubSplit(f"eval/{task}" + ("" if split == entry["split"] else f"/{split}"), entry["hf_dataset"], split,
                     revision, commonsense_eval_file(root, dict(entry, split=split)), root / ".download" / "datasets",
                     where) for split in task_splits(entry)]


def fetch_hub_dataset(name: str, entry: dict) -> dict:
    """Make the ``hub_datasets`` entry ``name`` present at its target (see the module's docstring)."""
    check_hub_dataset(name, entry)
    where, target = f"hub_datasets.{name}", Path(entry["target"])
    if "family" in entry:
        items = [split for task, revision in entry["revisions"].items()
                 for split in _task_splits(target, entry["family"], task, str(revision), f"{where}.revisions.{task}")]
    else:
        items = [HubFiles.from_entry(name, {**entry, "repo_type": "dataset"}, target, where, name)]
    return {"name": name, "target": str(target), "files": fetch_all(items, f"the Hub dataset {name}")}


def fetch_weights(backbone: str, entry: dict) -> dict:
    """Make the official weights (and tokenizer) of ``backbone`` present at its configured paths."""
    where, download = f"backbones.{backbone}.download", entry["download"]
    items = [HubFiles.from_entry("weights", download, entry["path"], where, backbone)]
    if "tokenizer" in download:
        if not entry.get("tokenizer"):
            raise ConfigError(f"{where}.tokenizer needs backbones.{backbone}.tokenizer: the path to save it at")
        items.append(HubFiles.from_entry("tokenizer", download["tokenizer"], entry["tokenizer"], f"{where}.tokenizer",
                                         backbone))
    return {"backbone": backbone, "files": fetch_all(items, f"the weights of {backbone}")}
