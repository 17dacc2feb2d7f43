"""A small Hugging Face Hub-compatible HTTP server on loopback, for tests with the real client.

It implements what huggingface_hub 2.x calls for an LFS (non-Xet) upload and a download,
as read from its source (hf_api.py, _commit_api.py, lfs.py, file_download.py,
_snapshot_download.py) and checked against this server's request log:

    POST /api/repos/create                          {"name", "organization", "visibility"?}
    POST /api/validate-yaml                         README.md front matter (parsed with yaml.safe_load)
    POST /api/models/{repo}/branch/{branch}         {"startingPoint"?}
    POST /api/models/{repo}/preupload/{rev}         {"files": [{"path", "sample", "size"}]} -> uploadMode, oid
    POST /{repo}.git/info/lfs/objects/batch         LFS batch API: upload actions for objects not stored yet
    PUT  /lfs-objects/{oid}                         the object's bytes (sha256 and size checked)
    POST /lfs-verify                                {"oid", "size"}
    POST /api/models/{repo}/commit/{rev}            NDJSON: header, file (base64), lfsFile, deletedFile, deletedFolder
    GET  /api/models/{repo}[/revision/{rev}]        repo info with "sha" and "siblings"
    GET  /api/models/{repo}/tree/{rev}[/{path}]     ?recursive=true: files with size, oid and lfs {oid, size}
    POST /api/models/{repo}/paths-info/{rev}        form field paths
    HEAD/GET /{repo}/resolve/{rev}/{path}           X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size, Range

Every push is a commit whose SHA is the revision; branches point at commits. A token,
when set, is required for writes and for private repos, and a wrong one gets 401.
`misreport` names files whose tree listing reports another sha256 (storage gone bad).

A hostile or broken Hub, for the adversarial tests (tests/adversarial/test_hub.py): `seed`
takes any file name (traversal, absolute, control characters); `hidden` files are served
but never listed; `late` files are listed from the second listing on (a listing that
changes between calls); `unserved` files are listed but answer 404; `headers[path]`
overrides response headers of that file (ETag, X-Repo-Commit); `fake_sha` replaces the
commit id in repo info; `block(path_part)` holds each GET of a matching file until the
test releases it (`Block.reached` is set when one arrives, so a test waits on the
request itself, not on a clock).
`fail(path_part, what, times)` makes the next `times` requests whose path contains
`path_part` answer 500, 404 or 401, send a truncated body ("truncate": full
Content-Length, half the bytes, then the connection closes) or corrupted bytes of the
right length ("corrupt"). `log` records (method, path, status) of every request.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".npz", ".msgpack", ".h5", ".pt", ".pth")
LFS_MIN_SIZE = 10 * 2**20


def git_oid(data: bytes) -> str:
    """Git's blob id: sha1 of "blob {size}\\0" + content (what the Hub reports for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass(frozen=True)
class File:
    size: int
    sha256: str
    oid: str  # git blob id
    lfs: bool


@dataclasses.dataclass
class Repo:
    private: bool
    branches: dict[str, str]
    commits: dict[str, dict[str, File]]


@dataclasses.dataclass
class Block:
    path_part: str
    reached: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class Fault:
    path_part: str
    what: str | int
    times: int


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        super().__init__((host, port), Handler)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content, LFS and regular files alike
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int]] = []
        self.auth_seen: list[str | None] = []  # the Authorization header of each request
        self.misreport: set[str] = set()  # files whose listings claim another sha256 (storage gone bad)
        self.hidden: set[str] = set()  # served, never listed
        self.late: set[str] = set()  # listed from the second tree listing on
        self.unserved: set[str] = set()  # listed, answer 404
        self.headers: dict[str, dict[str, str]] = {}  # path -> response headers that replace the real ones
        self.fake_sha: str | None = None  # repo info answers this as the commit id
        self.blocks: list[Block] = []
        self.tree_calls = 0
        self.lock = threading.Lock()

    def block(self, path_part: str) -> Block:
        """Holds every GET of a file whose path contains `path_part` until `release` is set."""
        b = Block(path_part)
        with self.lock:
            self.blocks.append(b)
        return b

    def release_all(self) -> None:
        for b in self.blocks:
            b.release.set()

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client killed mid-response (signal tests): not an error here
        pass

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, path_part: str, what: str | int, times: int = 1) -> None:
        """The next `times` requests whose path contains `path_part` fail with `what` (500, 404, 401, "truncate", "corrupt")."""
        with self.lock:
            self.faults.append(Fault(path_part, what, times))

    def take_fault(self, method: str, path: str) -> str | int | None:
        with self.lock:
            for f in self.faults:
                body_fault = f.what in ("truncate", "corrupt")  # only a GET has a body to damage
                if f.times > 0 and f.path_part in path and (method == "GET" or not body_fault):
                    f.times -= 1
                    return f.what
        return None

    def requests(self, method: str | None = None, path_part: str = "") -> list[tuple[str, str, int]]:
        with self.lock:
            return [r for r in self.log if (method is None or r[0] == method) and path_part in r[1]]

    def commit_files(self, repo_id: str, rev: str) -> dict[str, File]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches.get(rev, rev)]

    def content(self, repo_id: str, rev: str, path: str) -> bytes:
        return self.blobs[self.commit_files(repo_id, rev)[path].sha256]

    def seed(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Commits `files` to main directly (test set-up without a client push); returns the commit SHA."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(False, {"main": _sha("init", repo_id)}, {_sha("init", repo_id): {}}))
            new = dict(repo.commits[repo.branches["main"]])
            for p, data in files.items():
                sha = hashlib.sha256(data).hexdigest()
                self.blobs[sha] = data
                new[p] = File(len(data), sha, git_oid(data), p.endswith(LFS_SUFFIXES) or b"\0" in data[:512])
            commit = _sha(repo.branches["main"], sorted((p, f.sha256) for p, f in new.items()), len(repo.commits))
            repo.commits[commit] = new
            repo.branches["main"] = commit
        return commit


def _sha(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, *args: Any) -> None:  # quiet: the test reads server.log instead
        pass

    # Plumbing.
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                if n == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(n)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None, ctype: str | None = None) -> None:
        if isinstance(body, dict | list):
            body, ctype = json.dumps(body).encode(), "application/json"
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.server.log.append((self.command, self.path, status))

    def _error(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, {"error": message}, headers)

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        body = self._body() if self.command in ("POST", "PUT") else b""
        auth = self.headers.get("Authorization")
        self.server.auth_seen.append(auth)
        fault = self.server.take_fault(self.command, path)
        if fault in (500, 404, 401):
            code = {404: "EntryNotFound", 401: None, 500: None}[fault]
            return self._error(fault, f"injected fault {fault}", code)
        token = self.server.token
        if token is not None and auth is not None and auth != f"Bearer {token}":
            return self._error(401, "Invalid credentials in Authorization header")
        presigned = path.startswith("/lfs-objects/")  # storage URLs carry their own grant, like S3's
        if token is not None and auth is None and self.command in ("POST", "PUT") and not presigned:
            return self._error(401, "You must be authenticated to write")
        for method, pattern, fn in ROUTES:
            m = re.fullmatch(pattern, path)
            if m and method == self.command.replace("HEAD", "GET"):
                return fn(self, body, fault, **{k: urllib.parse.unquote(v) for k, v in m.groupdict().items() if v is not None})
        self._error(404, f"no route for {self.command} {path}")

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo.private and self.server.token is not None and self.headers.get("Authorization") is None):
            self._error(404 if repo is None else 401, f"Repository Not Found for url: {self.path}", "RepoNotFound")
            return None
        return repo

    def _commit(self, repo: Repo, rev: str) -> str | None:
        sha = repo.branches.get(rev, rev)
        if sha not in repo.commits:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return None
        return sha

    # Write side.
    def create_repo(self, body: bytes, fault: Any) -> None:
        d = json.loads(body)
        repo_id = f"{d['organization']}/{d['name']}" if d.get("organization") else d["name"]
        with self.server.lock:
            if repo_id in self.server.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo_id}"})
            first = _sha("init", repo_id)
            self.server.repos[repo_id] = Repo(d.get("visibility") == "private", {"main": first}, {first: {}})
        self._send(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self, body: bytes, fault: Any) -> None:
        content = json.loads(body)["content"]
        m = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
            assert isinstance(meta, dict | None)
        except (yaml.YAMLError, AssertionError) as e:
            return self._send(400, {"errors": [{"message": f"invalid YAML front matter: {e}"}], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def create_branch(self, body: bytes, fault: Any, repo: str, branch: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        start = self._commit(r, (json.loads(body or b"{}") or {}).get("startingPoint") or "main")
        if start is None:
            return
        if branch in r.branches:
            return self._error(409, f"Reference already exists: {branch}")
        r.branches[branch] = start
        self._send(200, {})

    def preupload(self, body: bytes, fault: Any, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None or (sha := self._commit(r, rev)) is None:
            return
        files = r.commits[sha]
        out = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            binary = b"\0" in sample or not _utf8(sample)
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or binary
            have = files.get(f["path"])
            oid = None if have is None else (have.sha256 if have.lfs else have.oid)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": out, "commitOid": sha})

    def lfs_batch(self, body: bytes, fault: Any, repo: str) -> None:
        if self._repo(repo) is None:
            return
        d = json.loads(body)
        objects = []
        for o in d["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.server.blobs:
                entry["actions"] = {
                    "upload": {"href": f"{self.server.url}/lfs-objects/{o['oid']}", "expires_in": 3600},
                    "verify": {"href": f"{self.server.url}/lfs-verify", "header": {}},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, ctype="application/vnd.git-lfs+json")

    def lfs_put(self, body: bytes, fault: Any, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, f"sha256 mismatch for {oid}")
        self.server.blobs[oid] = body
        self._send(200)

    def lfs_verify(self, body: bytes, fault: Any) -> None:
        d = json.loads(body)
        blob = self.server.blobs.get(d["oid"])
        if blob is None or len(blob) != d["size"]:
            return self._error(404, f"object {d['oid']} not stored")
        self._send(200, {})

    def commit(self, body: bytes, fault: Any, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        if rev not in r.branches:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        with self.server.lock:
            parent = r.branches[rev]
            files = dict(r.commits[parent])
            for line in lines[1:]:
                key, v = line["key"], line["value"]
                if key == "file":
                    data = base64.b64decode(v["content"])
                    sha = hashlib.sha256(data).hexdigest()
                    self.server.blobs[sha] = data
                    files[v["path"]] = File(len(data), sha, git_oid(data), False)
                elif key == "lfsFile":
                    data = self.server.blobs.get(v["oid"])
                    if data is None:
                        return self._error(422, f"LFS object {v['oid']} of {v['path']} was not uploaded")
                    files[v["path"]] = File(len(data), v["oid"], git_oid(data), True)
                elif key == "deletedFile":
                    files.pop(v["path"], None)
                elif key == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(v["path"].rstrip("/") + "/")}
                else:
                    return self._error(400, f"unknown commit operation {key}")
            sha = _sha(parent, header, sorted((p, f.sha256) for p, f in files.items()), len(r.commits))
            r.commits[sha] = files
            r.branches[rev] = sha
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.server.url}/{repo}/commit/{sha}"})

    # Read side.
    def repo_info(self, body: bytes, fault: Any, repo: str, rev: str = "main") -> None:
        r = self._repo(repo)
        if r is None or (sha := self._commit(r, rev)) is None:
            return
        blobs = "blobs=true" in (urllib.parse.urlsplit(self.path).query or "")
        siblings = []
        for p, f in sorted(self._listed(r.commits[sha]).items()):
            s: dict[str, Any] = {"rfilename": p}
            if blobs:
                s.update(size=f.size, blobId=f.oid)
                if f.lfs:
                    s["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(s)
        sha = self.server.fake_sha or sha
        self._send(200, {"id": repo, "modelId": repo, "sha": sha, "private": r.private, "siblings": siblings, "tags": []})

    def _entries(self, files: dict[str, File], under: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        out, dirs = [], set()
        for p, f in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            if not recursive and "/" in rest:
                dirs.add(prefix + rest.split("/")[0])
                continue
            for i in range(rest.count("/")):
                dirs.add(prefix + "/".join(rest.split("/")[: i + 1]))
            out.append(self._file_entry(p, f))
        return [{"type": "directory", "path": d, "oid": _sha(d), "size": 0} for d in sorted(dirs)] + out

    def _file_entry(self, p: str, f: File) -> dict[str, Any]:
        sha = hashlib.sha256(f.sha256.encode()).hexdigest() if p in self.server.misreport else f.sha256
        e: dict[str, Any] = {"type": "file", "path": p, "size": f.size, "oid": f.oid}
        if f.lfs:
            e["lfs"] = {"oid": sha, "size": f.size, "pointerSize": 134}
        return e

    def _listed(self, files: dict[str, File]) -> dict[str, File]:
        """The files a listing shows: not the hidden ones, nor the late ones before the second listing."""
        late = self.server.late if self.server.tree_calls <= 1 else set()
        return {p: f for p, f in files.items() if p not in self.server.hidden and p not in late}

    def tree(self, body: bytes, fault: Any, repo: str, rev: str, under: str = "") -> None:
        r = self._repo(repo)
        if r is None or (sha := self._commit(r, rev)) is None:
            return
        with self.server.lock:
            self.server.tree_calls += 1
        recursive = "recursive=true" in (urllib.parse.urlsplit(self.path).query or "").lower()
        self._send(200, self._entries(self._listed(r.commits[sha]), under or "", recursive))

    def paths_info(self, body: bytes, fault: Any, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None or (sha := self._commit(r, rev)) is None:
            return
        paths = urllib.parse.parse_qs(body.decode()).get("paths", [])
        files = r.commits[sha]
        self._send(200, [self._file_entry(p, files[p]) for p in paths if p in files])

    def resolve(self, body: bytes, fault: Any, repo: str, rev: str, path: str) -> None:
        r = self._repo(repo)
        if r is None or (sha := self._commit(r, rev)) is None:
            return
        f = r.commits[sha].get(path)
        if f is None or path in self.server.unserved:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", commit=sha)
        data = self.server.blobs[f.sha256]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.sha256 if f.lfs else f.oid}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        headers.update(self.server.headers.get(path, {}))
        for b in list(self.server.blocks):
            if b.path_part in path and self.command == "GET":
                b.reached.set()
                b.release.wait()
        status, start = 200, 0
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m and self.command == "GET":
            start, end = int(m.group(1)), int(m.group(2) or len(data) - 1)
            data = data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{f.size}"
        if fault == "corrupt":
            data = bytes(b ^ 0xFF for b in data)
        if fault == "truncate" and self.command == "GET":  # promise everything, send half, hang up
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.server.log.append((self.command, self.path, -status))
            return
        self._send(status, data, headers, ctype="application/octet-stream")


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = (
    ("POST", r"/api/repos/create", Handler.create_repo),
    ("POST", r"/api/validate-yaml", Handler.validate_yaml),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", Handler.create_branch),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", Handler.preupload),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", Handler.lfs_batch),
    ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", Handler.lfs_put),
    ("POST", r"/lfs-verify", Handler.lfs_verify),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", Handler.commit),
    ("GET", rf"/api/models/{REPO}", Handler.repo_info),
    ("GET", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", Handler.repo_info),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<under>.*))?", Handler.tree),
    ("POST", rf"/api/models/{REPO}/paths-info/(?P<rev>[^/]+)", Handler.paths_info),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", Handler.resolve),
)


def serve(token: str | None = None) -> tuple[HubServer, threading.Thread]:
    """Starts a HubServer on 127.0.0.1 with an ephemeral port in a daemon thread."""
    server = HubServer(token=token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread
