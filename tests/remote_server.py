"""A threaded HTTP server for the remote-source tests: a checkpoint directory served over HTTP.

It speaks what the clients expect of a plain file server (HEAD, GET with one `Range`, ETag,
If-Match -> 412) and, for hf://, the few Hub endpoints huggingface_hub's HfApi and HfFileSystem
call (revision info, tree listing, `resolve/REV/FILE`), with HF_ENDPOINT pointed at it. Faults
are injected per request into weight reads (.safetensors GETs past the header): 500s,
connection resets, truncated bodies, a slow first byte; `throttle` caps the bytes per second;
`etags` changes a file's version without changing its bytes; `token` requires a bearer token.
Every request is logged (method, path, range, bytes sent, when it began and ended) for the tests to
count and order.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

HF_REPO = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<what>revision|tree)/(?P<rev>[^/?]+)(?P<rest>/[^?]*)?)?")
HF_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")


class CheckpointServer:
    """Serves the files of `root` at http://127.0.0.1:PORT/files/<root's name>/ and as Hub repository `repo`."""

    def __init__(self, root: Path, repo: str = "org/model", commit: str = "a" * 40):
        self.root = Path(root)
        self.prefix = f"/files/{self.root.name}/"
        self.repo, self.commit = repo, commit
        self.etags: dict[str, str] = {}   # file name -> ETag override (a new version with the same bytes)
        self.faults: list[str] = []      # consumed one per weight read: "500", "reset", "truncate", "slow"
        self.slow_seconds = 0.0
        self.throttle = 0                # bytes per second over all connections (0: as fast as it goes)
        self.link_free = 0.0             # when the throttled link is free for the next piece
        self.token: str | None = None    # when set, a request without "Bearer <token>" (or Basic user:<token>) gets 401
        self.change_after = 0            # > 0: after this many weight reads, every file gets a new ETag
        self.gated = False               # hf: every request answers 403 GatedRepo
        self.ranges = True               # False: a Range header is ignored (the whole file, status 200)
        self.log: list[dict] = []
        self.weight_reads = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a client that gave up on a slow answer
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def dir_url(self) -> str:
        """The checkpoint as a plain directory over HTTP (named as the local one, like general.name)."""
        return self.url + self.prefix

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def file(self, name: str) -> Path | None:
        p = self.root / name
        return p if p.is_file() and self.root in p.resolve().parents else None

    def etag(self, name: str, size: int) -> str:
        if name in self.etags:
            return self.etags[name]
        st = (self.root / name).stat()
        return '"' + hashlib.sha256(f"{name}:{size}:{st.st_mtime_ns}".encode()).hexdigest()[:16] + '"'

    def sent(self, suffix: str = ".safetensors") -> int:
        """Bytes of response bodies sent for files ending with `suffix`."""
        with self.lock:
            return sum(e["sent"] for e in self.log if e["path"].endswith(suffix))

    def weight_gets(self) -> int:
        with self.lock:
            return sum(1 for e in self.log if e["method"] == "GET" and e["path"].endswith(".safetensors"))


def _handler(server: CheckpointServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._serve(head=True)

        def do_GET(self):
            self._serve(head=False)

        def _json(self, obj, status=200, headers=None):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self._record("GET", self.path, None, len(body))

        def _error(self, status, code=None):
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record(self.command, self.path, None, 0, status)

        def _record(self, method, path, rng, sent, status=200):
            with server.lock:  # begun/ended: monotonic times of the request's first line and its last byte
                server.log.append({"method": method, "path": urlsplit(path).path, "range": rng, "sent": sent,
                                   "status": status, "auth": self.headers.get("Authorization"),
                                   "begun": getattr(self, "begun", None), "ended": time.monotonic()})

        def parse_request(self):
            self.begun = time.monotonic()
            return super().parse_request()

        def _serve(self, head: bool):
            path = urlsplit(self.path).path
            basic = "Basic " + base64.b64encode(f"user:{server.token}".encode()).decode()
            if server.token is not None and self.headers.get("Authorization") not in (f"Bearer {server.token}", basic):
                return self._error(401, "RepoNotFound" if not path.startswith(server.prefix) else None)
            if server.gated and not path.startswith(server.prefix):
                return self._error(403, "GatedRepo")
            m = HF_REPO.fullmatch(path)
            if m:
                return self._hub_api(m)
            m = HF_RESOLVE.fullmatch(path)
            if m:
                if m["repo"] != server.repo:
                    return self._error(404, "RepoNotFound")
                if m["rev"] not in ("main", server.commit):
                    return self._error(404, "RevisionNotFound")
                return self._file(unquote(m["file"]), head, {"X-Repo-Commit": server.commit})
            if path.startswith(server.prefix):
                return self._file(unquote(path[len(server.prefix):]), head, {})
            return self._error(404)

        def _hub_api(self, m):
            if m["repo"] != server.repo:
                return self._error(404, "RepoNotFound")
            if unquote(m["rev"] or "main") not in ("main", server.commit):
                return self._error(404, "RevisionNotFound")
            files = sorted(p for p in server.root.iterdir() if p.is_file())
            if m["what"] in ("revision", None):
                return self._json({"id": server.repo, "sha": server.commit, "private": False,
                                   "siblings": [{"rfilename": p.name} for p in files]})
            rest = (m["rest"] or "").strip("/")
            if rest:
                return self._json([])
            return self._json([{"type": "file", "path": p.name, "size": p.stat().st_size,
                                "oid": hashlib.sha1(p.name.encode()).hexdigest()} for p in files])

        def _file(self, name: str, head: bool, extra: dict):
            p = server.file(name)
            if p is None:
                return self._error(404, "EntryNotFound")
            size = p.stat().st_size
            etag = server.etag(name, size)
            if_match = self.headers.get("If-Match")
            if if_match and if_match != etag:
                return self._error(412)
            start, end, status = 0, size, 200
            rng = self.headers.get("Range") if server.ranges else None
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
                if not m:
                    return self._error(416)
                start = int(m[1])
                end = min(size, int(m[2]) + 1) if m[2] else size
                if start >= size:
                    return self._error(416)
                status = 206
            fault = None
            weight_read = not head and name.endswith(".safetensors") and start >= 8 and rng
            if weight_read:
                with server.lock:
                    fault = server.faults.pop(0) if server.faults else None
                    server.weight_reads += 1
                    if server.change_after and server.weight_reads > server.change_after:
                        server.etags = {p.name: '"changed"' for p in server.root.iterdir()}
            if fault == "500":
                return self._error(500)
            if fault == "slow":
                time.sleep(server.slow_seconds)
            self.send_response(status)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                self._record("HEAD", self.path, rng, 0)
                return
            f = open(p, "rb")  # the range only, a piece at a time: a bench checkpoint is larger than memory
            f.seek(start)
            with f:
                self._body(f, end - start, fault, rng)

        def _body(self, f, n: int, fault: str | None, rng):
            if fault == "reset":  # half the body, then a TCP reset (linger 0, the socket's last reference closed)
                self.wfile.write(f.read(n // 2))
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()
                self.connection.close()
                self.close_connection = True
                self._record("GET", self.path, rng, n // 2, 599)
                return
            if fault == "truncate":  # half the body, then the connection closed cleanly
                n = n // 2
                self.close_connection = True
            sent = 0
            step = 64 * 1024
            for a in range(0, n, step):
                piece = f.read(min(step, n - a))
                if server.throttle:  # one link for all connections: each piece waits for its slot on it
                    with server.lock:
                        slot = max(time.monotonic(), server.link_free)
                        server.link_free = slot + len(piece) / server.throttle
                    time.sleep(max(0.0, slot - time.monotonic()))
                self.wfile.write(piece)
                sent += len(piece)
            self._record("GET", self.path, rng, sent)
            if fault == "truncate":
                self.connection.shutdown(socket.SHUT_RDWR)

        def finish(self):
            try:
                super().finish()
            except OSError:  # the connection a fault closed
                pass

    return Handler
