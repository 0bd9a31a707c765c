"""A loopback stand-in for the Hugging Face Hub, enough for ``create_repo`` + ``create_commit``.

The real ``huggingface_hub`` client talks HTTP to it; nothing is mocked.  It listens on
127.0.0.1 on a free port, in a daemon thread, and keeps repos and files in memory.

Routes (what huggingface_hub 2.4 calls for a push, plus a few read-backs):

* ``GET  /api/whoami-v2``                                    token owner
* ``POST /api/repos/create``                                 create (409 if it exists)
* ``GET  /api/models/{repo}[/revision/{rev}]``               repo info (sha, siblings)
* ``POST /api/validate-yaml``                                README front matter check
* ``POST /api/models/{repo}/preupload/{rev}``                upload mode per file
* ``POST /api/models/{repo}/commit/{rev}``                   NDJSON commit (base64 files, LFS refs, deletions)
* ``POST /{repo}.git/info/lfs/objects/batch``                LFS batch API, "basic" transfer
* ``PUT  /_lfs/{oid}`` / ``POST /{repo}.git/info/lfs/objects/verify``   LFS upload + verify
* ``GET  /{repo}/resolve/{rev}/{path}``                      raw file download

Files go inline in the commit ("regular") unless ``lfs_threshold`` is set: files of at least
that many bytes are then declared "lfs".  With ``hf_xet`` installed huggingface_hub would
upload LFS files through Xet, which this server does not speak: tests using ``lfs_threshold``
must switch Xet off (``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``; the
``HF_HUB_DISABLE_XET`` variable is only read when huggingface_hub is imported).

Faults: ``hub.fail(route, status=500, times=N)`` answers ``status`` to the next N requests of
``route`` (``times=None``: always; ``echo_auth=True`` puts the request's Authorization header in
the error text, like a leaky proxy would); ``hub.drop(route, times=N)`` reads the request and closes
the connection without answering.  Route names: whoami, create, info, validate, preupload,
commit, lfs_batch, lfs_upload, lfs_verify, resolve.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+?)"
_ROUTES: list[tuple[str, str, re.Pattern]] = [
    ("GET", "whoami", re.compile(r"^/api/whoami-v2$")),
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate", re.compile(r"^/api/validate-yaml$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")),
    ("GET", "info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("POST", "lfs_batch", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")),
    ("POST", "lfs_verify", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/verify$")),
    ("PUT", "lfs_upload", re.compile(r"^/_lfs/(?P<oid>[0-9a-f]{64})$")),
    ("GET", "resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]  # full tree after the commit


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs_paths: set[str] = field(default_factory=set)
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.commits[-1].oid if self.commits else "0" * 40


@dataclass
class _Fault:
    route: str
    kind: str  # "status" | "drop"
    status: int
    remaining: int | None  # None: forever
    echo_auth: bool = False  # put the Authorization header in the error text (a leaky proxy)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra  # more fields for the JSON body


class FakeHub:
    """In-memory Hub. Use as a context manager or call start()/stop()."""

    def __init__(self, *, token: str | None = "hf_fake_token", user: str = "tester",
                 lfs_threshold: int | None = None):
        self.token = token  # None: accept any request, authenticated or not
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, FakeRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, route, path)
        self.bodies: list[bytes] = []  # every request body, to check what went over the wire
        self.validated_cards: list[str] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:  # unblock handler threads idling on keep-alive connections
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- faults and inspection
    def fail(self, route: str = "commit", *, status: int = 500, times: int | None = None,
             echo_auth: bool = False) -> None:
        with self._lock:
            self._faults.append(_Fault(route, "status", status, times, echo_auth))

    def drop(self, route: str = "commit", *, times: int | None = None) -> None:
        with self._lock:
            self._faults.append(_Fault(route, "drop", 0, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def count(self, route: str) -> int:
        with self._lock:
            return sum(1 for _, r, _ in self.requests if r == route)

    def files(self, repo_id: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self.repos[repo_id].files)

    def _take_fault(self, route: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.route != route:
                    continue
                if fault.remaining is None:
                    return fault
                if fault.remaining > 0:
                    fault.remaining -= 1
                    return fault
        return None

    # -- request handling (called from handler threads)
    def _record(self, method: str, route: str, path: str, body: bytes) -> None:
        with self._lock:
            self.requests.append((method, route, path))
            self.bodies.append(body)

    def _check_auth(self, headers, *, required: bool = True) -> None:
        if self.token is None:
            return
        auth = headers.get("Authorization", "")
        if not auth:
            if required:
                raise _HTTPError(401, "Invalid username or password.")
            return
        if auth != f"Bearer {self.token}":
            raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> FakeRepo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _HTTPError(404, "Repository not found", error_code="RepoNotFound")
        return repo

    def dispatch(self, handler: "_Handler", method: str, route: str, match: re.Match, body: bytes):
        """Return (status, json-able payload or bytes, extra headers)."""
        params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        base = self.url
        if route == "whoami":
            self._check_auth(handler.headers)
            return 200, {"type": "user", "name": self.user, "auth": {"type": "access_token"}}, {}
        if route == "create":
            self._check_auth(handler.headers)
            payload = json.loads(body or b"{}")
            if payload.get("type") not in (None, "model"):
                raise _HTTPError(400, "the fake hub only hosts model repos")
            repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
            with self._lock:
                if repo_id in self.repos:
                    # huggingface_hub reads "url" from this 409 body when exist_ok=True.
                    raise _HTTPError(409, "You already created this model repo", url=f"{base}/{repo_id}")
                self.repos[repo_id] = FakeRepo(repo_id, private=payload.get("visibility") == "private")
            return 200, {"url": f"{base}/{repo_id}", "name": repo_id, "id": repo_id}, {}
        if route == "info":
            self._check_auth(handler.headers, required=False)
            with self._lock:
                repo = self._repo(params["repo"])
                return 200, {
                    "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.head, "private": repo.private,
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                }, {}
        if route == "validate":
            payload = json.loads(body or b"{}")
            content = payload.get("content", "")
            with self._lock:
                self.validated_cards.append(content)
            errors = _validate_front_matter(content)
            status = 400 if errors else 200
            return status, {"errors": [{"message": e} for e in errors], "warnings": []}, {}
        if route == "preupload":
            self._check_auth(handler.headers)
            payload = json.loads(body)
            with self._lock:
                repo = self._repo(params["repo"])
                answer = []
                for f in payload["files"]:
                    lfs = self.lfs_threshold is not None and f["size"] >= self.lfs_threshold
                    remote = repo.files.get(f["path"])
                    oid = None
                    if remote is not None:
                        oid = hashlib.sha256(remote).hexdigest() if f["path"] in repo.lfs_paths else git_blob_oid(remote)
                    answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                                   "shouldIgnore": False, "oid": oid})
            return 200, {"files": answer, "commitOid": repo.head}, {}
        if route == "commit":
            self._check_auth(handler.headers)
            return 200, self._commit(params["repo"], body), {}
        if route == "lfs_batch":
            self._check_auth(handler.headers)
            payload = json.loads(body)
            objects = []
            with self._lock:
                self._repo(params["repo"])
                for obj in payload["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in self.lfs_objects:
                        entry["authenticated"] = True
                        entry["actions"] = {
                            "upload": {"href": f"{base}/_lfs/{obj['oid']}"},
                            "verify": {"href": f"{base}/{params['repo']}.git/info/lfs/objects/verify"},
                        }
                    objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}
        if route == "lfs_upload":
            if hashlib.sha256(body).hexdigest() != params["oid"]:
                raise _HTTPError(400, "sha256 of the uploaded content does not match the oid")
            with self._lock:
                self.lfs_objects[params["oid"]] = body
            return 200, b"", {}
        if route == "lfs_verify":
            self._check_auth(handler.headers)
            payload = json.loads(body)
            with self._lock:
                data = self.lfs_objects.get(payload["oid"])
            if data is None or len(data) != payload["size"]:
                raise _HTTPError(404, "LFS object not found")
            return 200, {"success": True}, {}
        if route == "resolve":
            self._check_auth(handler.headers, required=False)
            with self._lock:
                repo = self._repo(params["repo"])
                if params["path"] not in repo.files:
                    raise _HTTPError(404, "Entry not found", error_code="EntryNotFound")
                return 200, repo.files[params["path"]], {"Content-Type": "application/octet-stream"}
        raise _HTTPError(404, f"no route {route}")  # pragma: no cover

    def _commit(self, repo_id: str, body: bytes) -> dict:
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with self._lock:
            repo = self._repo(repo_id)
            files = dict(repo.files)
            lfs_paths = set(repo.lfs_paths)
            for op in lines[1:]:
                key, value = op.get("key"), op.get("value", {})
                path = value.get("path")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _HTTPError(400, "unsupported encoding")
                    files[path] = base64.b64decode(value["content"])
                    lfs_paths.discard(path)
                elif key == "lfsFile":
                    data = self.lfs_objects.get(value["oid"])
                    if data is None:
                        raise _HTTPError(422, f"LFS object {value['oid']} was never uploaded")
                    files[path] = data
                    lfs_paths.add(path)
                elif key == "deletedFile":
                    files.pop(path, None)
                    lfs_paths.discard(path)
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [n for n in files if n.startswith(prefix)]:
                        files.pop(name)
                        lfs_paths.discard(name)
                else:
                    raise _HTTPError(400, f"unknown commit operation {key!r}")
            digest = hashlib.sha1(repo.head.encode())
            for name in sorted(files):
                digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
            digest.update(header.get("summary", "").encode())
            oid = digest.hexdigest()
            repo.files, repo.lfs_paths = files, lfs_paths
            repo.commits.append(Commit(oid, header.get("summary", ""), header.get("description", ""), dict(files)))
        return {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
                "hookOutput": "", "pullRequestUrl": None}


def _validate_front_matter(content: str) -> list[str]:
    """Roughly what the Hub checks: the front matter must be a YAML mapping."""
    if not content.startswith("---"):
        return []
    parts = content.split("\n---", 1)
    if len(parts) != 2:
        return ["front matter is not closed by ---"]
    try:
        meta = yaml.safe_load(parts[0][3:])
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    if meta is not None and not isinstance(meta, dict):
        return ["front matter must be a mapping"]
    errors = []
    for key in ("tags", "datasets"):
        if meta and key in meta and not isinstance(meta[key], (list, str)):
            errors.append(f"{key} must be a list of strings")
    return errors


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the bound subclass
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self):
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        return

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        if isinstance(payload, (bytes, bytearray)):
            data = bytes(payload)
            ctype = "application/octet-stream"
        else:
            data = json.dumps(payload).encode()
            ctype = "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        path = urlsplit(self.path).path
        body = self._read_body()
        for route_method, route, pattern in _ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                break
        else:
            self.hub._record(method, "unknown", path, body)
            self._send(404, {"error": f"fake hub has no route for {method} {path}"})
            return
        self.hub._record(method, route, path, body)
        fault = self.hub._take_fault(route)
        if fault is not None and fault.kind == "drop":
            self.close_connection = True  # no status line at all: the client sees a disconnect
            return
        if fault is not None:
            message = f"injected failure on {route}"
            if fault.echo_auth:
                message += f" (request had Authorization: {self.headers.get('Authorization')})"
            self._send(fault.status, {"error": message})
            return
        try:
            status, payload, headers = self.hub.dispatch(self, method, route, match, body)
        except _HTTPError as err:
            extra = {"X-Error-Code": err.error_code} if err.error_code else {}
            self._send(err.status, {"error": err.message, **err.extra}, extra)
            return
        except Exception as err:  # noqa: BLE001 - a bug in the fake must show up as a 500 with a reason
            self._send(500, {"error": f"fake hub crashed: {type(err).__name__}: {err}"})
            return
        self._send(status, payload, headers)

    def do_GET(self):  # noqa: N802
        self._handle("GET")

    def do_POST(self):  # noqa: N802
        self._handle("POST")

    def do_PUT(self):  # noqa: N802
        self._handle("PUT")
