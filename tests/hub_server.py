"""A small in-process server speaking the part of the Hugging Face Hub protocol the real client uses.

Test code only. Repos live in memory with git-like commits (sha1 ids), branches and tags; LFS
objects and regular file contents are stored by sha256. The server counts the bytes clients upload
and can inject faults (HTTP 500, dropped connections) on requests matching a method and a path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".png", ".jpg", ".jpeg", ".webp")
LFS_MIN_SIZE = 1 << 20


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    sha256: str
    size: int
    lfs: bool

    def oid(self, blobs: dict[str, bytes]) -> str:
        return git_blob_sha1(blobs[self.sha256]) if not self.lfs else self.lfs_pointer_sha1()

    def lfs_pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    def lfs_pointer_sha1(self) -> str:
        return git_blob_sha1(self.lfs_pointer())


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    files: dict[str, StoredFile]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    times: int  # -1: forever
    kind: str  # "500" or "drop"


class HubState:
    """Everything the server holds; tests read and seed it directly."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.uploaded_bytes = 0
        self.downloaded_bytes = 0
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: set[str] = set()
        self.faults: list[Fault] = []
        self._counter = 0

    # -- faults ------------------------------------------------------------------------------
    def fail(self, method: str, path_regex: str, times: int = 1, kind: str = "500") -> None:
        """Answer the next `times` matching requests with HTTP 500 (or drop them); -1 = forever."""
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path_regex), times, kind))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def take_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault.method in (method, "*") and fault.pattern.search(path) and fault.times != 0:
                    if fault.times > 0:
                        fault.times -= 1
                    return fault.kind
        return None

    # -- storage -----------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, StoredFile], title: str,
                   message: str = "") -> Commit:
        self._counter += 1
        listing = "\n".join(f"{p} {f.sha256}" for p, f in sorted(files.items()))
        sha = hashlib.sha1(f"{parent}\n{listing}\n{title}\n{self._counter}".encode()).hexdigest()
        commit = Commit(sha, parent, title, message, dict(files),
                        time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        repo.commits[sha] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        files = {".gitattributes": StoredFile(self.put_blob(gitattributes), len(gitattributes), False)}
        repo.branches["main"] = self.new_commit(repo, None, files, "initial commit").sha
        self.repos[repo_id] = repo
        return repo

    def seed(self, repo_id: str, files: dict[str, bytes], branch: str = "main", tag: str | None = None,
             title: str = "seed") -> str:
        """Commit `files` straight into a repo (any names, even unsafe ones); returns the commit sha."""
        with self.lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            parent = repo.branches.get(branch) or repo.branches["main"]
            tree = dict(repo.commits[parent].files)
            for path, data in files.items():
                lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
                tree[path] = StoredFile(self.put_blob(data), len(data), lfs)
            commit = self.new_commit(repo, parent, tree, title)
            repo.branches[branch] = commit.sha
            if tag:
                repo.tags[tag] = commit.sha
            return commit.sha

    def resolve(self, repo: Repo, rev: str) -> Commit | None:
        rev = unquote(rev)
        for prefix in ("refs/heads/", "refs/tags/"):
            if rev.startswith(prefix):
                rev = rev[len(prefix):]
        sha = repo.branches.get(rev) or repo.tags.get(rev) or (rev if rev in repo.commits else None)
        return repo.commits.get(sha) if sha else None


class _DropConnection(Exception):
    pass


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass made by `start_hub_server`

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json({"error": message}, status, headers)

    def _handle(self) -> None:
        state = self.state
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        with state.lock:
            state.requests.append((self.command, path))
            if self.headers.get("Authorization"):
                state.auth_headers.add(self.headers["Authorization"])
        fault = state.take_fault(self.command, path)
        if fault == "drop":
            raise _DropConnection()
        if fault == "500":
            return self._error(500, "injected server error")
        try:
            self._route(path, query, body)
        except _DropConnection:
            raise
        except KeyError as exc:
            self._error(404, f"not found: {exc}", "EntryNotFound")

    def _dispatch(self) -> None:
        try:
            self._handle()
        except _DropConnection:
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- routes ------------------------------------------------------------------------------
    def _repo(self, repo_id: str) -> Repo | None:
        return self.state.repos.get(unquote(repo_id))

    def _route(self, path: str, query: dict, body: bytes) -> None:
        st, m, cmd = self.state, None, self.command
        if path == "/api/repos/create" and cmd == "POST":
            data = json.loads(body or b"{}")
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            url = f"http://{self.headers['Host']}/{repo_id}"
            with st.lock:
                if repo_id in st.repos:
                    return self._json({"error": "You already created this model repo", "url": url}, 409)
                st.create_repo(repo_id, bool(data.get("private") or data.get("visibility") == "private"))
            return self._json({"url": url, "name": repo_id, "id": repo_id})
        if path == "/api/repos/delete" and cmd == "DELETE":
            data = json.loads(body or b"{}")
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            with st.lock:
                if st.repos.pop(repo_id, None) is None:
                    return self._error(404, "Repository not found", "RepoNotFound")
            return self._json({})
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if path.startswith("/lfs-upload/") and cmd == "PUT":
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "sha256 mismatch")
            with st.lock:
                st.uploaded_bytes += len(body)
                st.blobs[oid] = body
            return self._send(200)
        if path.startswith("/lfs-verify/") and cmd == "POST":
            oid = json.loads(body)["oid"]
            return self._json({}) if oid in st.blobs else self._error(404, "object not uploaded")
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m and cmd == "POST":
            return self._lfs_batch(json.loads(body))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(.*))?", path)
        if m:
            repo = self._repo(m[1])
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            return self._api(repo, m[2] or "", query, body)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and cmd in ("GET", "HEAD"):
            repo = self._repo(m[1])
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            return self._resolve(repo, m[2], unquote(m[3]))
        return self._error(404, f"no route for {cmd} {path}")

    def _api(self, repo: Repo, rest: str, query: dict, body: bytes) -> None:
        st, cmd = self.state, self.command
        if rest == "" or rest.startswith("revision/"):
            rev = rest[len("revision/"):] if rest else "main"
            commit = st.resolve(repo, rev)
            if commit is None:
                return self._error(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
            siblings = [{"rfilename": p, "size": f.size,
                         **({"lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134}} if f.lfs else {})}
                        for p, f in sorted(commit.files.items())]
            return self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.sha,
                               "private": repo.private, "siblings": siblings, "tags": [],
                               "lastModified": commit.date})
        if rest == "refs":
            def ref(kind, name, sha):
                return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
            return self._json({"branches": [ref("heads", n, s) for n, s in sorted(repo.branches.items())],
                               "tags": [ref("tags", n, s) for n, s in sorted(repo.tags.items())],
                               "converts": [], "pullRequests": []})
        m = re.fullmatch(r"(tree|commits|preupload|commit|tag|branch)/([^/]+)(?:/(.*))?", rest)
        if not m:
            return self._error(404, f"no route for {rest}")
        what, rev, sub = m[1], unquote(m[2]), m[3]
        if what == "tag" and cmd == "DELETE":
            with st.lock:
                repo.tags.pop(rev, None)
            return self._json({})
        if what == "branch":
            with st.lock:
                if cmd == "DELETE":
                    repo.branches.pop(rev, None)
                    return self._json({})
                if rev in repo.branches:
                    return self._error(409, f"Branch {rev} already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                commit = st.resolve(repo, start)
                if commit is None:
                    return self._error(404, f"Invalid rev id: {start}", "RevisionNotFound")
                repo.branches[rev] = commit.sha
            return self._json({})
        commit = st.resolve(repo, rev)
        if commit is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if what == "tree":
            prefix = (unquote(sub).rstrip("/") + "/") if sub else ""
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            entries, dirs = [], set()
            for p, f in sorted(commit.files.items()):
                if not p.startswith(prefix):
                    continue
                rel = p[len(prefix):]
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    dirs.add(prefix + "/".join(parts[:i]))
                if not recursive and len(parts) > 1:
                    continue
                entry = {"type": "file", "path": p, "size": f.size, "oid": f.oid(st.blobs)}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.lfs_pointer())}
                entries.append(entry)
            for d in sorted(dirs):
                if recursive or "/" not in d[len(prefix):]:
                    entries.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()})
            return self._json(entries)
        if what == "commits":
            out, sha = [], commit.sha
            while sha:
                c = repo.commits[sha]
                out.append({"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                            "authors": [{"user": "tester"}]})
                sha = c.parent
            return self._json(out)
        if what == "tag" and cmd == "POST":
            name = json.loads(body)["tag"]
            with st.lock:
                if name in repo.tags:
                    return self._error(409, f"Tag {name} already exists")
                repo.tags[name] = commit.sha
            return self._json({})
        if what == "preupload":
            files = json.loads(body)["files"]
            out = []
            for f in files:
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                existing = commit.files.get(f["path"])
                oid = None
                if existing is not None:
                    oid = existing.sha256 if existing.lfs else git_blob_sha1(st.blobs[existing.sha256])
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, **({"oid": oid} if oid else {})})
            return self._json({"files": out})
        if what == "commit":
            return self._commit(repo, rev, body)
        return self._error(404, f"no route for {rest}")

    def _lfs_batch(self, data: dict) -> None:
        host = f"http://{self.headers['Host']}"
        objects = []
        for obj in data["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.blobs:
                entry["actions"] = {"upload": {"href": f"{host}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{host}/lfs-verify/{obj['oid']}"}}
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects})

    def _commit(self, repo: Repo, rev: str, body: bytes) -> None:
        st = self.state
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        with st.lock:
            head = st.resolve(repo, rev)
            header = next(l["value"] for l in lines if l["key"] == "header")
            if header.get("parentCommit") and header["parentCommit"] != head.sha:
                return self._error(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(head.files)
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    st.uploaded_bytes += len(data)
                    tree[value["path"]] = StoredFile(st.put_blob(data), len(data), False)
                elif key == "lfsFile":
                    if value["oid"] not in st.blobs:
                        return self._error(422, f"LFS object {value['oid']} was never uploaded")
                    tree[value["path"]] = StoredFile(value["oid"], value["size"], True)
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
                elif key == "deletedFolder":
                    for p in [p for p in tree if p.startswith(value["path"].rstrip("/") + "/")]:
                        del tree[p]
            commit = st.new_commit(repo, head.sha, tree, header.get("summary", ""), header.get("description", ""))
            repo.branches[rev if rev in repo.branches else "main"] = commit.sha
        host = f"http://{self.headers['Host']}"
        self._json({"commitOid": commit.sha, "commitUrl": f"{host}/{repo.repo_id}/commit/{commit.sha}",
                    "pullRequestUrl": None, "success": True})

    def _resolve(self, repo: Repo, rev: str, filename: str) -> None:
        st = self.state
        commit = st.resolve(repo, rev)
        if commit is None:
            return self._error(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        f = commit.files.get(filename)
        if f is None:
            return self._error(404, f"Entry not found: {filename}", "EntryNotFound")
        data = st.blobs[f.sha256]
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = f.size
            headers["ETag"] = f'"{f.lfs_pointer_sha1()}"'
        else:
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
        status = 200
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m[1])
                end = int(m[2]) if m[2] else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start:end + 1], 206
        headers["Content-Length"] = len(data)
        if self.command == "GET":
            with st.lock:
                st.downloaded_bytes += len(data)
        self._send(status, data, headers, content_type="application/octet-stream")


class HubServer:
    """A running server: `endpoint` to point the client at, `state` to seed and inspect."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, repo_id: str, rev: str = "main") -> str:
        return f"{self.endpoint}/{repo_id}/resolve/{quote(rev, safe='')}"
