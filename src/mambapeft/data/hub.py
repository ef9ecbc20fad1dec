"""Fetch pinned files: Hugging Face Hub repositories, raw file URLs and Hub dataset splits.

Three kinds of item, each with a ``target`` path under ``resources/``, a ``name`` in the record and
the same four methods: ``fetch()`` (download, or check what is in place; return its record),
``present()`` (a look without network), ``in_place()`` (the record of what is there, unverified) and
``by_hand()`` (one line: what to put where, from where):

- :class:`HubFiles`: files of one Hub repository at a pinned revision (``snapshot_download`` with
  ``allow_patterns``); the target is a directory, or one file when ``file`` names it (Vim's .pth).
  Every file is checked against the Hub's own listing of that commit: the sha256 of an LFS file
  (weights), the git blob id of any other (config.json, tokenizer.json).
- :class:`RawFile`: one file from a plain URL (a GitHub raw URL at a pinned commit), checked against
  a configured ``sha256`` or ``git_sha1`` (the blob id GitHub's tree lists).
- :class:`HubSplit`: one split of a Hub dataset through ``datasets.load_dataset(..., revision=)``,
  exported once as JSON lines (one record a line).

Nothing half-done can look like data: files are downloaded under a ``.partial`` name (a folder for
Hub files, a temporary name for an exported split) and renamed into place once complete and checked.
An interrupted download resumes. A Hub snapshot keeps the files it completed across runs
(``huggingface_hub``'s local-dir metadata), and a transfer that breaks off continues within the run
from what was written (HTTP ``Range``; huggingface_hub writes in 10 MB chunks). A raw file's
``.partial`` keeps every byte received, across runs too. A file that fails its checksum is deleted from the staging area, never from the target, and the
error names the file and both hashes; a target already in place is checked and never overwritten.

:func:`fetch_all` drives a list of items. With ``HF_HUB_OFFLINE=1``, or when the first network call
fails, nothing more is attempted: items in place are kept (recorded as unverified) and one
:class:`DataError` lists every missing target with what to put there and where it comes from.
``HF_TOKEN`` reaches the Hub through ``huggingface_hub`` (gated repositories); it is never written
to a record or a message.
"""
from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_path
from .errors import DataError

PRESEED = ("run `snakemake --until download_weights download_data download_hub_dataset` where the network is "
           "reachable")
RAW_ATTEMPTS = 5  # tries of a raw download that keeps breaking off, each resuming where the last stopped


class Unreachable(DataError):
    """No network, or the Hub is down: the caller lists what to place by hand instead."""


class ChecksumMismatch(DataError):
    """A file whose bytes are not the pinned ones; the message names it and both hashes."""


def offline_reason() -> str | None:
    """Why no download may be attempted at all: ``HF_HUB_OFFLINE`` (else ``TRANSFORMERS_OFFLINE``) is on."""
    from huggingface_hub import constants

    if not constants.is_offline_mode():
        return None
    variable = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    return f"{variable}={os.environ[variable]} is set"


def hub_url() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def file_digests(path: Path) -> dict:
    """sha256 and git blob id (sha1 of ``blob <size>\\0<bytes>``) of a file, in one read."""
    size = path.stat().st_size
    sha256, git_sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha256.update(block)
            git_sha1.update(block)
    return {"sha256": sha256.hexdigest(), "git_sha1": git_sha1.hexdigest(), "size": size}


def check_digest(path: Path, kind: str, expected: str, source: str, digests: dict | None = None) -> dict:
    """The file's digests, or a ChecksumMismatch naming the file and both hashes when ``kind`` differs."""
    digests = digests or file_digests(path)
    if digests[kind] != expected:
        raise ChecksumMismatch(f"{path}: {kind} {digests[kind]}, but {source} says {expected}")
    return digests


def _record(digests: dict) -> dict:
    """What a record keeps of a file's digests."""
    return {"sha256": digests["sha256"], "size": digests["size"]}


def fetch_all(items: list, what: str) -> dict:
    """Fetch every item (those in place are checked); return ``{name: record}`` or raise one
    DataError listing what to place where when the network cannot be used."""
    reason = offline_reason()
    records, by_hand = {}, []
    for item in items:
        if reason is None:
            try:
                records[item.name] = item.fetch()
                continue
            except Unreachable as err:
                reason = str(err)
        if item.present():
            records[item.name] = {**item.in_place(), "status": f"present, not verified ({reason})"}
        else:
            by_hand.append(f"  {item.by_hand()}")
    if by_hand:
        raise DataError(f"Cannot fetch {what}: {reason}. Put these in place by hand, or {PRESEED}:\n"
                        + "\n".join(by_hand))
    return records


# --- Hub repositories -----------------------------------------------------------------------------

@contextmanager
def _hub_errors(repo: str, revision: str, where: str):
    """Hub exceptions -> Unreachable (network, Hub down) or a DataError that names the config key."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        yield
    except (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as err:
        raise Unreachable(f"{hub_url()} is unreachable ({type(err).__name__}: {err})") from None
    except RevisionNotFoundError:
        raise DataError(f"{repo} has no revision {revision!r}: fix {where}.revision") from None
    except (GatedRepoError, RepositoryNotFoundError) as err:
        raise DataError(f"{hub_url()}/{repo} refused access ({err.response.status_code}): check {where}.repo; a gated "
                        "or private repository needs its terms accepted on the Hub and a token in HF_TOKEN") from None
    except HfHubHTTPError as err:
        if err.response.status_code >= 500:
            raise Unreachable(f"{hub_url()} answered {err.response.status_code}") from None
        raise DataError(f"{hub_url()}/{repo} at {revision}: {err}") from None


@dataclass(frozen=True)
class HubFiles:
    """Files of one Hub repository at a pinned revision, for one target path."""
    name: str
    repo: str
    revision: str
    patterns: tuple[str, ...]
    target: Path
    single_file: bool  # the target is the one file `file` names; otherwise a directory of the files
    where: str  # the config key, for messages
    staging_tag: str  # several jobs may fetch one target (a shared tokenizer): each stages apart
    repo_type: str = "model"

    @classmethod
    def from_entry(cls, name: str, entry: dict, target: str | Path, where: str, staging_tag: str) -> HubFiles:
        single = "file" in entry
        patterns = (entry["file"],) if single else tuple(entry.get("allow_patterns") or ())
        if not patterns:
            raise DataError(f"{where} names no files: give `file` (the target is that file) or `allow_patterns`")
        return cls(name, entry["repo"], str(entry.get("revision", "main")), patterns, Path(target), single, where,
                   staging_tag, entry.get("repo_type", "model"))

    @property
    def _web(self) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{hub_url()}/{prefix}{self.repo}/tree/{self.revision}"

    def by_hand(self) -> str:
        what = self.patterns[0] if self.single_file else f"{', '.join(self.patterns)} (into this directory)"
        return f"{self.target}  <-  {what}  from {self._web}"

    def _local_files(self) -> list[Path]:
        if self.single_file:
            return [self.target] if self.target.is_file() else []
        if not self.target.is_dir():
            return []
        return sorted(p for p in self.target.rglob("*") if p.is_file()
                      and any(fnmatch.fnmatch(p.relative_to(self.target).as_posix(), pat) for pat in self.patterns))

    def present(self) -> bool:
        """A quick look (no network): the file, or a directory with a match for every pattern."""
        if self.single_file:
            return self.target.is_file()
        names = [p.relative_to(self.target).as_posix() for p in self._local_files()]
        return all(any(fnmatch.fnmatch(n, pat) for n in names) for pat in self.patterns)

    def in_place(self) -> dict:
        base = self.target.parent if self.single_file else self.target
        return {**self._about(None), "files": {p.relative_to(base).as_posix(): _record(file_digests(p))
                                               for p in self._local_files()}}

    def _about(self, commit: str | None) -> dict:
        return {"repo": self.repo, "revision": self.revision, "commit": commit, "target": str(self.target)}

    def _listing(self) -> tuple[str, dict]:
        """The commit the pinned revision names and {path: (digest kind, expected)} of the chosen files."""
        from huggingface_hub import HfApi, RepoFile
        from huggingface_hub.utils import filter_repo_objects

        api = HfApi()
        with _hub_errors(self.repo, self.revision, self.where):
            commit = api.repo_info(self.repo, repo_type=self.repo_type, revision=self.revision).sha
            tree = [f for f in api.list_repo_tree(self.repo, recursive=True, revision=commit, repo_type=self.repo_type)
                    if isinstance(f, RepoFile)]
        expected = {f.path: ("sha256", f.lfs.sha256) if f.lfs else ("git_sha1", f.blob_id) for f in tree}
        chosen = list(filter_repo_objects(sorted(expected), allow_patterns=list(self.patterns)))
        if not chosen or (self.single_file and chosen != [self.patterns[0]]):
            raise DataError(f"{self.where}: {', '.join(self.patterns)} match(es) no file of {self.repo} at "
                            f"{self.revision} (commit {commit}); its files: {', '.join(sorted(expected))}")
        return commit, {path: expected[path] for path in chosen}

    def fetch(self) -> dict:
        commit, expected = self._listing()
        source = f"{self.repo} at {self.revision} (commit {commit})"
        if self.target.exists():
            files = self._verify_target(expected, source)
            return {**self._about(commit), "status": "present, verified", "files": files}
        staging = self.target.parent / f".{self.target.name}.{self.staging_tag}.partial"
        files = self._download(commit, expected, staging, source)
        if not self._place(staging):
            self._verify_target(expected, source)
        return {**self._about(commit), "status": "downloaded", "files": files}

    def _target_file(self, path: str) -> Path:
        return self.target if self.single_file else self.target / path

    def _verify_target(self, expected: dict, source: str) -> dict:
        """Check the files in place against the listing; a mismatch deletes nothing."""
        missing = [p for p in expected if not self._target_file(p).is_file()]
        if missing:
            raise DataError(f"{self.target} lacks {', '.join(missing)} of {source}: complete it, or move it away "
                            f"so that it is downloaded whole")
        records = {}
        for path, (kind, digest) in expected.items():
            try:
                records[path] = _record(check_digest(self._target_file(path), kind, digest, source))
            except ChecksumMismatch as err:
                raise ChecksumMismatch(f"{err}; nothing was changed: move the file away to fetch the pinned revision, "
                                       f"or pin the revision it comes from ({self.where}.revision)") from None
        return records

    def _download(self, commit: str, expected: dict, staging: Path, source: str) -> dict:
        from huggingface_hub import snapshot_download

        with _hub_errors(self.repo, self.revision, self.where):
            snapshot_download(self.repo, repo_type=self.repo_type, revision=commit, local_dir=staging,
                              allow_patterns=sorted(expected))
        records = {}
        for path, (kind, digest) in expected.items():
            try:
                records[path] = _record(check_digest(staging / path, kind, digest, source))
            except ChecksumMismatch as err:
                _forget_staged(staging, path)
                raise ChecksumMismatch(f"{err}. The download was deleted (the other files are kept); run again to "
                                       f"fetch it anew") from None
        return records

    def _place(self, staging: Path) -> bool:
        """Rename the checked files into place; False when another job placed the target meanwhile (a
        tokenizer several backbones share), which is then kept: the caller checks it."""
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata
        placed = False
        try:
            if not self.target.exists():
                os.rename(staging / self.patterns[0] if self.single_file else staging, self.target)
                placed = True
        except OSError as err:  # a directory onto a non-empty one fails: the other job was quicker
            if not self.target.exists():
                raise DataError(f"cannot move {staging} to {self.target}: {err}") from None
        shutil.rmtree(staging, ignore_errors=True)
        return placed


def _forget_staged(staging: Path, path: str) -> None:
    """Delete a staged file and huggingface_hub's note that it is complete, so that it is fetched anew."""
    (staging / path).unlink(missing_ok=True)
    (staging / ".cache" / "huggingface" / "download" / f"{path}.metadata").unlink(missing_ok=True)


# --- raw file URLs --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RawFile:
    """One file from a plain URL, checked against ``checksum`` = (``sha256`` | ``git_sha1``, hex) when given."""
    name: str
    url: str
    target: Path
    checksum: tuple[str, str] | None
    where: str

    def by_hand(self) -> str:
        return f"{self.target}  <-  {self.url}"

    def present(self) -> bool:
        return self.target.is_file()

    def in_place(self) -> dict:
        return {"url": self.url, "target": str(self.target), **_record(file_digests(self.target))}

    def fetch(self) -> dict:
        if self.present():
            digests = self._check(self.target, "nothing was changed: move it away to fetch the pinned file, or fix "
                                               f"{self.where}")
            return {"url": self.url, "target": str(self.target), "status": "present, verified" if self.checksum
                    else "present (no checksum configured)", **_record(digests)}
        partial = download_url(self.url, self.target.with_name(self.target.name + ".partial"))
        try:
            digests = self._check(partial, "the download was deleted; run again to fetch it anew")
        except ChecksumMismatch:
            partial.unlink()
            raise
        partial.replace(self.target)
        return {"url": self.url, "target": str(self.target), "status": "downloaded", **_record(digests)}

    def _check(self, path: Path, then: str) -> dict:
        digests = file_digests(path)
        if self.checksum:
            try:
                check_digest(path, *self.checksum, f"{self.where} (for {self.url})", digests)
            except ChecksumMismatch as err:
                raise ChecksumMismatch(f"{err}; {then}") from None
        return digests


def download_url(url: str, partial: Path) -> Path:
    """Download ``url`` into ``partial``, resuming what is there (HTTP Range); returns ``partial``.

    Raises Unreachable when the host cannot be reached and DataError when it refuses; bytes already
    received stay in ``partial`` for the next attempt."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    error = None
    for _ in range(RAW_ATTEMPTS):
        start = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                resumed = start and response.status == 206  # else the server sent the whole file again
                length = int(response.headers.get("Content-Length") or 0)
                with open(partial, "ab" if resumed else "wb") as out:
                    received = copy_with_progress(response, out, length, url)
            if received < length:  # http.client ends a body cut short without an error
                raise http.client.IncompleteRead(b"", length - received)
            return partial
        except urllib.error.HTTPError as err:
            if err.code == 416 and start:  # "range not satisfiable": what is there is not a prefix of it
                partial.unlink()
                continue
            raise DataError(f"{url} answered {err.code} {err.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            error = err
            if not partial.exists() or partial.stat().st_size == start:
                break  # no progress: the host is unreachable, not merely breaking off
    if partial.exists() and partial.stat().st_size == 0:
        partial.unlink()
    kept = f"; the {partial.stat().st_size} bytes received are kept in {partial}" if partial.exists() else ""
    reason = getattr(error, "reason", error)
    raise Unreachable(f"could not download {url} ({reason}){kept}")


def copy_with_progress(response, out, total: int, label: str, chunk: int = 1 << 20) -> int:
    """Copy the response body to ``out``, reporting every 5% of ``total``; return the bytes copied."""
    done, next_report = 0, 0.05
    while block := response.read(chunk):
        out.write(block)
        done += len(block)
        if total and done / total >= next_report:
            print(f"{label}: {done / 1e6:.0f} / {total / 1e6:.0f} MB", file=sys.stderr, flush=True)
            next_report += 0.05
    return done


# --- Hub dataset splits ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HubSplit:
    """One split of a Hub dataset (``path[:config]``), exported to ``target`` as JSON lines."""
    name: str
    dataset: str
    split: str
    revision: str
    target: Path
    cache_dir: Path
    where: str

    @property
    def _path_and_config(self) -> tuple[str, str | None]:
        path, _, config = self.dataset.partition(":")
        return path, config or None

    def by_hand(self) -> str:
        path, config = self._path_and_config
        return (f"{self.target}  <-  split {self.split!r} of {hub_url()}/datasets/{path}"
                f"{f' (config {config})' if config else ''} at {self.revision}, one JSON record a line")

    def present(self) -> bool:
        return self.target.is_file()

    def _about(self) -> dict:
        return {"dataset": self.dataset, "split": self.split, "revision": self.revision, "target": str(self.target)}

    def in_place(self) -> dict:
        return {**self._about(), **_record(file_digests(self.target))}

    def fetch(self) -> dict:
        if self.present():
            return {**self.in_place(), "status": "present"}
        from huggingface_hub import HfApi

        path, config = self._path_and_config
        with _hub_errors(path, self.revision, self.where):
            commit = HfApi().dataset_info(path, revision=self.revision).sha
            records = self._load(path, config, commit)
        with atomic_path(self.target) as temporary:
            with open(temporary, "w", encoding="utf-8") as out:
                for record in records:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
        return {**self._about(), "commit": commit, "records": len(records), "status": "downloaded",
                **_record(file_digests(self.target))}

    def _load(self, path: str, config: str | None, commit: str):
        import datasets

        try:
            return datasets.load_dataset(path, config, split=self.split, revision=commit, cache_dir=str(self.cache_dir))
        except (ValueError, datasets.exceptions.DatasetsError) as err:  # unknown config or split, no data files
            raise DataError(f"{self.dataset} split {self.split!r} at {self.revision}: {err} (language/tasks.yaml "
                            f"hf_dataset/split, {self.where})") from None
