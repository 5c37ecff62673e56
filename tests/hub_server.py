"""A Hugging Face Hub on loopback for the download tests.

It serves model repos held in memory under the routes the real ``huggingface_hub`` client
calls: the model info API (``/api/models/{repo}/revision/{rev}``, with LFS sha256 and size per
file), the tree API (``/api/models/{repo}/tree/{rev}``) and ``/{repo}/resolve/{rev}/{file}``
with the headers the client reads (``X-Repo-Commit``, ``ETag``/``X-Linked-Etag``,
``X-Linked-Size``, ``Content-Length``) and byte ranges for resumed downloads. Faults can be
injected per file: a connection dropped mid-file, corrupted bytes, an error status.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".bin", ".safetensors", ".model")  # stored in LFS, as in the official repos


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)  # file -> bytes sent, then hang up
    corrupt: dict[str, int] = field(default_factory=dict)  # file -> GETs served with a bad byte
    fail: dict[str, int] = field(default_factory=dict)  # file -> HTTP status for every GET

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Serve ``files`` as ``repo_id`` at a fixed commit; returns the commit hash."""
        self.repos[repo_id] = dict(files)
        self.commits[repo_id] = hashlib.sha1(repo_id.encode()).hexdigest()
        return self.commits[repo_id]

    def add_dir(self, repo_id: str, directory: Path, extra: dict[str, bytes] | None = None) -> str:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        return self.add_repo(repo_id, {**files, **(extra or {})})

    def gets(self, name: str) -> list[Request]:
        """The GET requests for file ``name`` (any repo), in order."""
        return [r for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + name)]

    def requested_files(self) -> set[str]:
        return {r.path.rsplit("/", 1)[1] for r in self.requests if "/resolve/" in r.path}

    # --- what the routes answer ---------------------------------------------------------

    def file_meta(self, name: str, data: bytes) -> dict:
        meta = {"size": len(data), "oid": git_blob_id(data)}
        if name.endswith(LFS_SUFFIXES):
            meta["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                           "pointerSize": 134}
        return meta

    def model_info(self, repo_id: str) -> dict:
        siblings = []
        for name, data in self.repos[repo_id].items():
            meta = self.file_meta(name, data)
            s = {"rfilename": name, "size": meta["size"], "blobId": meta["oid"]}
            if "lfs" in meta:
                s["lfs"] = {"sha256": meta["lfs"]["oid"], "size": meta["lfs"]["size"],
                            "pointerSize": 134}
            siblings.append(s)
        return {"id": repo_id, "modelId": repo_id, "sha": self.commits[repo_id],
                "private": False, "siblings": siblings}

    def tree(self, repo_id: str) -> list[dict]:
        return [{"type": "file", "path": name, **self.file_meta(name, data)}
                for name, data in self.repos[repo_id].items()]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the subclass made per server

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._route(body=False)

    def do_GET(self):
        self._route(body=True)

    def _route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append(Request(self.command, path, self.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, rev = f"{parts[2]}/{parts[3]}", parts[5]
            if self._check_repo(repo_id, rev):
                data = (self.hub.model_info(repo_id) if parts[4] == "revision"
                        else self.hub.tree(repo_id))
                self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            if self._check_repo(repo_id, rev):
                self._serve_file(repo_id, name, body)
            return
        self._send(404, b"not found", {})

    def _check_repo(self, repo_id: str, rev: str) -> bool:
        if repo_id not in self.hub.repos:
            self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            return False
        if rev not in ("main", self.hub.commits[repo_id]):
            self._send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
            return False
        return True

    def _serve_file(self, repo_id: str, name: str, body: bool) -> None:
        commit = self.hub.commits[repo_id]
        data = self.hub.repos[repo_id].get(name)
        if data is None:
            self._send(404, b'{"error": "Entry not found"}',
                       {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            return
        meta = self.hub.file_meta(name, data)
        etag = meta["lfs"]["oid"] if "lfs" in meta else meta["oid"]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if "lfs" in meta:
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
        if not body:
            self._send(200, b"", headers | {"Content-Length": str(len(data))}, head=True)
            return
        if name in self.hub.fail:
            self._send(self.hub.fail[name], b"server error", {})
            return
        if self.hub.corrupt.get(name):
            self.hub.corrupt[name] -= 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # same size, wrong bytes
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start, status = int(rng[6:-1]), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        part = data[start:]
        cut = self.hub.drop_after.pop(name, None)
        if cut is not None:  # promise the whole body, send some of it, hang up
            self.send_response(status)
            for k, v in (headers | {"Content-Length": str(len(part))}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(part[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self._send(status, part, headers)

    def _send(self, status: int, data: bytes, headers: dict, head: bool = False) -> None:
        self.send_response(status)
        if not head:
            headers = headers | {"Content-Length": str(len(data))}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)


def isolate_hf(monkeypatch, tmp_path: Path) -> Path:
    """A private HF cache and home for one test: no token, offline mode off, telemetry and
    xet off, small read blocks (so a dropped connection on a small shard resumes mid-file).
    Returns the cache directory."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for var in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    return tmp_path / "hub"


@contextlib.contextmanager
def serving(hub: FakeHub):
    """Serve ``hub`` on a free loopback port in a thread; yields its base URL."""
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
