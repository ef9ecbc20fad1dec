"""A stand-in for the Hugging Face Hub and a raw-file host on 127.0.0.1, for the download tests.

It answers what ``huggingface_hub.snapshot_download`` and ``datasets.load_dataset`` ask (read off
huggingface_hub 2.4 and datasets 5.2), for repositories held in memory:

- ``GET /api/{models,datasets}/<repo>/revision/<rev>``: repo info (``sha``, ``siblings``);
- ``GET /api/{models,datasets}/<repo>/tree/<rev>[/<folder>]``: the file listing (git-blob ``oid``
  and, for large files, ``lfs.oid`` = sha256, as the Hub marks LFS files);
- ``HEAD``/``GET /[datasets/]<repo>/resolve/<rev>/<file>``: the file with the headers
  ``huggingface_hub`` checks (``ETag``, ``X-Repo-Commit``, ``Content-Length``), ``Range`` honoured;
- ``GET /raw/<path>``: plain files (the raw-URL host).

Faults on request: ``cut[path] = n`` sends the first ``n`` bytes of the next GET of that file and
drops the connection (once); ``corrupt[path] = bytes`` serves other bytes than the listing describes.
Every request is recorded in ``requests`` as (method, path, its Authorization and Range headers).
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 1024  # files at least this large are listed as LFS files (sha256), as the Hub does for weights


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """Commits by hash ({path: bytes}) and named revisions (branch -> commit)."""
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        revision = self.refs.get(revision, revision)
        return revision if revision in self.commits else None


@dataclass
class FakeHub:
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)  # (models|datasets, repo id) -> Repo
    raw: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    corrupt: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    url: str = ""

    def add_commit(self, repo_id: str, files: dict[str, bytes], branch: str | None = "main",
                   kind: str = "models") -> str:
        """Add a commit holding ``files``; ``branch`` then points at it. Returns its 40-hex hash."""
        repo = self.repos.setdefault((kind, repo_id), Repo())
        commit = hashlib.sha1(json.dumps(sorted((p, git_blob_sha1(b)) for p, b in files.items())).encode()
                              + repo_id.encode() + str(len(repo.commits)).encode()).hexdigest()
        repo.commits[commit] = dict(files)
        if branch:
            repo.refs[branch] = commit
        return commit


def _entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
    if len(data) >= LFS_THRESHOLD:
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _folders(files: dict[str, bytes]) -> set[str]:
    return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}


def _listing(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
    prefix = f"{folder}/" if folder else ""
    entries = [_entry(p, b) for p, b in sorted(files.items()) if p.startswith(prefix)]
    entries += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0}
                for d in sorted(_folders(files)) if d.startswith(prefix)]
    if not recursive:
        entries = [e for e in entries if "/" not in e["path"][len(prefix):]]
    return entries


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, *args):  # quiet: pytest shows the assertions
        pass

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    def _route(self, head: bool):
        url = urlsplit(self.path)
        path, query = unquote(url.path), url.query
        self.hub.requests.append((self.command, path, {k: self.headers[k] for k in ("Authorization", "Range")
                                                       if k in self.headers}))
        if path.startswith("/raw/"):
            return self._file(path[len("/raw/"):], self.hub.raw.get(path[len("/raw/"):]), None, head)
        if path.startswith("/api/"):
            return self._api(path[len("/api/"):], query)
        kind, rest = ("datasets", path[len("/datasets/"):]) if path.startswith("/datasets/") else ("models", path[1:])
        parts = rest.split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, commit = self._repo_commit(kind, "/".join(parts[:2]), parts[3])
            if commit is None:
                return self._json({"error": "Revision Not Found"}, 404, {"X-Error-Code": "RevisionNotFound"})
            name = "/".join(parts[4:])
            return self._file(name, repo.commits[commit].get(name), commit, head)
        self._json({"error": "not found"}, 404)

    def _repo_commit(self, kind: str, repo_id: str, revision: str):
        repo = self.hub.repos.get((kind, repo_id))
        return (repo, repo.resolve(revision)) if repo else (None, None)

    def _api(self, path: str, query: str):
        kind, _, rest = path.partition("/")
        parts = rest.split("/")  # owner, name, action, revision, folder...
        repo_id = "/".join(parts[:2])
        action, revision = (parts[2], parts[3]) if len(parts) > 3 else ("revision", "main")
        repo, commit = self._repo_commit(kind, repo_id, revision)
        if repo is None:
            return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
        if commit is None:
            return self._json({"error": "Invalid rev id"}, 404, {"X-Error-Code": "RevisionNotFound"})
        files = repo.commits[commit]
        if action == "revision":
            return self._json({"id": repo_id, "sha": commit, "private": False, "disabled": False, "gated": False,
                               "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "cardData": {}})
        if action == "tree":
            return self._json(_listing(files, "/".join(parts[4:]), "recursive=true" in query.lower()))
        self._json({"error": "not found"}, 404)

    def _json(self, payload, status: int = 200, headers: dict | None = None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _file(self, name: str, data: bytes | None, commit: str | None, head: bool):
        if data is None:
            return self._json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound",
                                                                   **({"X-Repo-Commit": commit} if commit else {})})
        entry = _entry(name, data)
        served = self.hub.corrupt.get(name, data)
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        headers = {"Content-Length": str(len(served) - start), "Accept-Ranges": "bytes",
                   "ETag": f'"{entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]}"',
                   "Content-Type": "application/octet-stream"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(served) - 1}/{len(served)}"
        if commit:
            headers["X-Repo-Commit"] = commit
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        cut = self.hub.cut.pop(name, None)
        if cut is not None and cut > start:
            self.wfile.write(served[start:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the transfer breaks off mid-file
            return
        self.wfile.write(served[start:])


def serve(hub: FakeHub) -> ThreadingHTTPServer:
    """Start ``hub`` on a free port of 127.0.0.1 in a daemon thread; sets ``hub.url``."""
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    return server
