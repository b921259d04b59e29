"""Checkpoints read where they live: `hf://ORG/NAME[@REV]`, `https://HOST/DIR/` and other fsspec URLs.

A remote checkpoint is never copied. Its small files (config, tokenizer, README, the shard index)
are fetched into a private temporary directory that stands in for the checkpoint directory for
the code that reads them, removed when the process ends; the weight files stay on the server as
`RemoteFile`s, whose safetensors headers and tensor bytes are read by byte range. Only
huggingface_hub (HfApi, HfFileSystem) and fsspec talk to servers here.

A file's identity is the resolved commit for hf:// (every read names that commit), otherwise its
ETag (or the version the filesystem reports) and size; an ETag goes with every read as If-Match,
so a file replaced on the server mid-run is refused rather than mixed in. A read is split into
requests of REQUEST_BYTES, at most IN_FLIGHT outstanding per reading task (their buffers are
reserved in the memory budget, `buffer_reserve`); a transient failure (timeout, 5xx, reset,
short read) is retried with backoff, then ends the run as resumable (exit 1). URLs are shown and
recorded without credentials (`redact`): a token lives only in the environment or the URL given.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import errno
import math
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import CheckpointError, ResumableFailure

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
HF_URL = re.compile(r"hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
                    r"(?:@(?P<rev>[A-Za-z0-9._/%-]+))?/?")
PINNED = re.compile(r"hf://(?P<repo>[^/@]+/[^/@]+)@(?P<rev>[0-9a-f]{40})(?=/|$)")  # what this module writes
# What a conversion reads besides the weights (pipeline/checkpoint.py, metadata.py, vocab.py)
SMALL_FILES = ("config.json", "generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
               "chat_template.jinja", "modules.json", "model.safetensors.index.json")
MAX_SMALL_FILE = 256 * 1024**2
REQUEST_BYTES = 4 * 1024**2   # one range request
IN_FLIGHT = 3                 # requests outstanding per reading task
RETRIES = 6                   # attempts of one request before the run stops (resumable)
RETRY_BASE = 0.5              # seconds before the first retry, doubled each time up to RETRY_CAP
RETRY_CAP = 8.0
CONNECT_TIMEOUT = 30.0        # seconds
READ_TIMEOUT = 60.0           # seconds without a byte from the server: a transient failure


def is_url(text) -> bool:
    return isinstance(text, str) and URL.match(text) is not None


def redact(url: str) -> str:
    """`url` without what may be a credential: the user and password part, the query and fragment
    (a signed URL's signature)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A weight file on a server: its credential-free URL and the identity it had when opened."""
    url: str
    size: int
    version: str   # the commit (hf://), the ETag, or another version token ("" when none)

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def identity(self) -> list:
        return [self.size, self.version]


# -- opening a source -------------------------------------------------------------------------------

@dataclasses.dataclass
class RemoteSource:
    url: str                 # the URL given, credential-free (for the log and the manifest)
    root: str                # credential-free URL of the checkpoint directory (hf://: pinned to the commit)
    staging: Path            # local directory holding the small files
    name: str                # the model's name (last part of the URL)
    revision: str | None     # hf://: the revision given (None: main), resolved again to see a change
    commit: str | None       # hf://: the commit it resolved to
    listing: dict[str, int] | None   # file name -> size, where the filesystem lists directories
    small: dict[str, RemoteFile] = dataclasses.field(default_factory=dict)   # staged files
    weights: dict[str, RemoteFile] = dataclasses.field(default_factory=dict)

    def has(self, name: str) -> bool:
        if name in self.weights or name in self.small:
            return True
        if self.listing is not None:
            return name in self.listing
        try:
            self.weight_file(name)
            return True
        except RemoteMissing:
            return False

    def safetensors_names(self) -> list[str]:
        return sorted(n for n in (self.listing or {}) if n.endswith(".safetensors") and "/" not in n)

    def weight_file(self, name: str) -> RemoteFile:
        """The RemoteFile `name` of the checkpoint (its size and version asked for once)."""
        if name not in self.weights:
            self.weights[name] = _stat(f"{self.root}/{name}", self)
        return self.weights[name]

    def original(self, path: Path) -> RemoteFile | Path:
        """The RemoteFile a staged small file was fetched from (a local path otherwise)."""
        try:
            return self.small[str(Path(path).relative_to(self.staging))]
        except (ValueError, KeyError):
            return path


_SOURCES: dict[Path, RemoteSource] = {}       # staging directory -> source (this process)
_FILESYSTEMS: dict[str, tuple] = {}           # credential-free root URL -> (filesystem, its path of the root)
_LOCK = threading.Lock()


def source_of(model_dir) -> RemoteSource | None:
    """The remote source whose small files are staged at `model_dir`, if it is one."""
    try:
        return _SOURCES.get(Path(model_dir).resolve())
    except (OSError, RuntimeError, TypeError):
        return None


def label(model_dir) -> str:
    """How to name a checkpoint to the user: its URL when remote."""
    src = source_of(model_dir)
    return src.url if src else str(model_dir)


def shown_paths(text: str) -> str:
    """`text` with every staging directory of this process replaced by its source's URL."""
    for staging, src in list(_SOURCES.items()):
        text = text.replace(str(staging), src.root)
    return text


def open_source(text: str, env=None) -> RemoteSource:
    """Resolve a URL, fetch its small files into a staging directory (removed at exit) and return
    the source; the weights are only named, not read. A refusal is one line (CheckpointError)."""
    env = os.environ if env is None else env
    shown = redact(text)
    if text.startswith("hf://"):
        src = _open_hf(text, shown, env)
    else:
        src = _open_fsspec(text, shown)
    try:
        for name in SMALL_FILES:
            if src.has(name):
                _stage(src, name)
        if not (src.staging / "config.json").is_file():
            raise CheckpointError(f"{src.url}: has no config.json; pass the URL of a Hugging Face checkpoint "
                                  "directory (config.json, *.safetensors, tokenizer)")
    except BaseException:
        shutil.rmtree(src.staging.parent, ignore_errors=True)
        _SOURCES.pop(src.staging, None)
        raise
    return src


def _new_staging(src_kwargs: dict) -> RemoteSource:
    # named as the model, like a local checkpoint's directory: general.* keys guessed from the
    # directory's name (basename, finetune, size label) come out the same as for a local copy
    parent = Path(tempfile.mkdtemp(prefix="bitnet-gguf-source-")).resolve()
    atexit.register(shutil.rmtree, parent, True)
    staging = parent / (src_kwargs["name"] if src_kwargs["name"] not in ("", ".", "..") else "model")
    staging.mkdir()
    src = RemoteSource(staging=staging, **src_kwargs)
    _SOURCES[staging] = src
    return src


def _endpoint(env) -> str | None:
    value = env.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _hf_fs(env):
    from huggingface_hub import HfFileSystem

    return HfFileSystem(endpoint=_endpoint(env))


def _open_hf(text: str, shown: str, env) -> RemoteSource:
    from huggingface_hub import HfApi

    m = HF_URL.fullmatch(text)
    if m is None or "--" in m["repo"] or ".." in m["repo"]:
        raise CheckpointError(f"{shown}: not a Hugging Face repository URL; write hf://ORG/NAME or "
                              "hf://ORG/NAME@REVISION")
    repo, rev = m["repo"], m["rev"]
    info = _call(lambda: HfApi(endpoint=_endpoint(env)).repo_info(repo, revision=rev), shown, hf_repo=repo)
    commit = info.sha
    if not commit:
        raise CheckpointError(f"{shown}: the Hub did not name the commit of revision {rev or 'main'}; pass "
                              "hf://ORG/NAME@COMMIT")
    fs = _hf_fs(env)
    root = f"hf://{repo}@{commit}"
    _FILESYSTEMS[root] = (fs, f"{repo}@{commit}")
    entries = _call(lambda: fs.ls(f"{repo}@{commit}", detail=True), shown, hf_repo=repo)
    listing = {e["name"].rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e.get("type") == "file"}
    return _new_staging(dict(url=shown, root=root, name=repo.split("/")[1], revision=rev, commit=commit,
                             listing=listing))


def _open_fsspec(text: str, shown: str) -> RemoteSource:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(text, **_fs_options(text))
    except (ImportError, ValueError) as e:
        scheme = urlsplit(text).scheme
        raise CheckpointError(f"{shown}: no filesystem for {scheme}:// is installed ({str(e).splitlines()[0][:80]}); "
                              "install the fsspec package that provides it (s3fs for s3://, gcsfs for gs://)") from None
    root = shown.rstrip("/")
    real = path.rstrip("/") if not _is_http(fs) else text.split("?")[0].rstrip("/")
    _FILESYSTEMS[root] = (fs, real)
    listing = None
    if not _is_http(fs):  # an HTTP server's directory pages are not a listing to trust
        entries = _call(lambda: fs.ls(real, detail=True), shown)
        listing = {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                   for e in entries if e.get("type") == "file"}
    name = root.rsplit("/", 1)[-1] or "model"
    return _new_staging(dict(url=shown, root=root, name=name, revision=None, commit=None, listing=listing))


def _fs_options(url: str) -> dict:
    if urlsplit(url).scheme not in ("http", "https"):
        return {}
    import aiohttp

    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                                               sock_read=READ_TIMEOUT)},
            "skip_instance_cache": True}


def _is_http(fs) -> bool:
    return type(fs).__name__ == "HTTPFileSystem"


def _stage(src: RemoteSource, name: str) -> None:
    file = src.weight_file(name)
    del src.weights[name]
    if file.size > MAX_SMALL_FILE:
        raise CheckpointError(f"{file.url}: {file.size} bytes, more than the {MAX_SMALL_FILE} a config or "
                              "tokenizer file may have; this is not a checkpoint this converter reads")
    buf = bytearray(file.size)
    read_into(file.url, 0, memoryview(buf), file.version)
    (src.staging / name).write_bytes(buf)
    src.small[name] = file


# -- the filesystem behind a URL --------------------------------------------------------------------

def _locate(url: str):
    """(filesystem, its path) for a credential-free URL: through the root this process opened, or,
    in another process (a dask worker), made from the URL and the environment."""
    for root, (fs, real) in list(_FILESYSTEMS.items()):
        if url == root or url.startswith(root + "/"):
            return fs, real + url[len(root):]
    with _LOCK:
        if url.startswith("hf://"):
            m = PINNED.match(url)
            root = m.group(0) if m else None
            if root:
                _FILESYSTEMS[root] = (_hf_fs(os.environ), root[len("hf://"):])
                return _locate(url)
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **_fs_options(url))
        real = url if _is_http(fs) else path
        _FILESYSTEMS[url.rsplit("/", 1)[0]] = (fs, real.rsplit("/", 1)[0])  # the other files beside it too
        return fs, real


def _stat(url: str, src: RemoteSource | None = None) -> RemoteFile:
    """A file's size and version, asked of its server now."""
    shown = src.url if src else url
    if src is not None and src.commit:  # hf://: the commit is the version; the listing has the size
        if src.listing is not None and url.rsplit("/", 1)[-1] in src.listing:
            return RemoteFile(url, src.listing[url.rsplit("/", 1)[-1]], src.commit)
    fs, path = _locate(url)
    info = _call(lambda: fs.info(path), url)
    size = info.get("size")
    if size is None:
        raise CheckpointError(f"{url}: the server does not say the file's size; serve it with a Content-Length "
                              f"(or use another URL for {shown})")
    version = str(next((info[k] for k in ("ETag", "etag", "md5", "LastModified", "Last-Modified", "mtime", "created")
                        if info.get(k) is not None), ""))
    if src is not None and src.commit:
        version = src.commit
    elif m := PINNED.match(url):  # a URL pinned to a commit
        version = m["rev"]
    return RemoteFile(url, int(size), version)


def fresh_identity(file: RemoteFile, src: RemoteSource | None = None) -> list | None:
    """[size, version] of the file as its server has it now (hf://: the commit the revision given
    resolves to now), or None when it is gone."""
    try:
        if src is not None and src.commit:
            from huggingface_hub import HfApi

            repo = src.root[len("hf://"):].split("@")[0]
            info = _call(lambda: HfApi(endpoint=_endpoint(os.environ)).repo_info(repo, revision=src.revision),
                         src.url, hf_repo=repo)
            return [file.size, info.sha]
        return _stat(file.url).identity()
    except CheckpointError:
        return None


def fingerprint_changes(model_dir, fingerprint: list) -> tuple[str, str] | None:
    """("changed" or "gone", URL) for the first remote file of a fingerprint record whose server
    holds another version now (or none), else None."""
    for name, *identity in fingerprint:
        if is_url(name):
            now = fresh_identity(RemoteFile(name, *identity), source_of(model_dir))
            if now != identity:
                return ("gone" if now is None else "changed"), name
    return None


# -- reading ----------------------------------------------------------------------------------------

class RemoteMissing(CheckpointError):
    """The server has no such file (404)."""


class SourceChanged(CheckpointError):
    """The server holds another version of a file than the one this run read (or none)."""


def _fetch_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="bitnet-gguf-fetch")


_POOL = _fetch_pool()


def end_fetching() -> None:
    """End the fetch threads at a conversion's end, interrupted or not, rather than at the
    interpreter's exit: a signal landing while the pool starts a thread leaves one the interpreter
    does not know to wake (scheduler.Scheduler.close says more). The next conversion in this process
    gets a new pool (its threads start when it is used)."""
    global _POOL
    pool, _POOL = _POOL, _fetch_pool()
    pool.shutdown(wait=False, cancel_futures=True)


def buffer_reserve(workers: int) -> int:
    """Memory the request buffers of `workers` reading tasks may hold at once (a response is read
    into one buffer and then copied: twice its size)."""
    return workers * IN_FLIGHT * REQUEST_BYTES * 2


class Prefetch:
    """Reads ahead of the tasks: the ranges they will ask for, in their order, at most `depth`
    fetched and not yet taken (the budget's second chunk per worker holds them). A task whose range
    is not here (or was passed over before its fetch started) reads it itself, so the order is a hint,
    never a condition."""

    def __init__(self, ranges: list[tuple[str, int, int, str]], depth: int):
        self.ranges, self.depth = ranges, max(1, depth)
        self.position = {(url, offset, n): i for i, (url, offset, n, _) in enumerate(ranges)}
        self.futures: dict[int, concurrent.futures.Future] = {}
        self.next = 0
        self.lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="bitnet-gguf-ahead")
        with self.lock:
            self._fill()

    def _fill(self) -> None:
        while len(self.futures) < self.depth and self.next < len(self.ranges):
            url, offset, n, version = self.ranges[self.next]
            self.futures[self.next] = self.pool.submit(self._read, url, offset, n, version)
            self.next += 1

    @staticmethod
    def _read(url: str, offset: int, n: int, version: str) -> bytearray:
        buf = bytearray(n)
        read_into(url, offset, buf, version, prefetched=False)
        return buf

    def take(self, url: str, offset: int, n: int) -> bytearray | None:
        i = self.position.get((url, offset, n))
        with self.lock:
            future = self.futures.pop(i, None) if i is not None else None
            if i is not None:  # ranges before this one were passed over: those not started yet are dropped
                # (their tasks read them themselves); one started or fetched waits for its task, which
                # comes soon (tasks racing on two workers), rather than being fetched twice
                for j in [j for j in self.futures if j < i]:
                    if self.futures[j].cancel():
                        del self.futures[j]
            self._fill()
        return future.result() if future is not None else None

    def close(self) -> None:
        with self.lock:
            for f in self.futures.values():
                f.cancel()
            self.futures.clear()
            self.next = len(self.ranges)
        self.pool.shutdown(wait=True)


_PREFETCH: list[Prefetch] = []
SPOOLS: list = []   # pipeline/spool.py's Spools running in this process: ranges already on local disk
_READING = [0]      # reads of this process in flight from the server (the spool's aside)


def busy() -> bool:
    """Whether a stage is fetching now: the spool sends no new request then (they come first)."""
    return _READING[0] > 0


def fetch_async(url: str, start: int, end: int, version: str = "") -> concurrent.futures.Future:
    """A future of bytes [start, end) of the file (one request, retried like every read)."""
    fs, path = _locate(url)
    return _POOL.submit(_fetch, fs, path, url, start, end, version)


@contextlib.contextmanager
def prefetching(ranges: list[tuple[str, int, int, str]], depth: int):
    """While the block runs, `read_into` serves these ranges (url, offset, bytes, version) from a
    read-ahead of `depth` buffers, so the transfer of the next chunks overlaps this one's compute."""
    if not ranges:
        yield
        return
    ahead = Prefetch(ranges, depth)
    _PREFETCH.append(ahead)
    try:
        yield
    finally:
        _PREFETCH.remove(ahead)
        ahead.close()


def read_into(url: str, offset: int, view, version: str = "", prefetched: bool = True) -> None:
    """Fill `view` (a writable byte buffer) with the file's bytes from `offset`, in requests of
    REQUEST_BYTES with IN_FLIGHT outstanding (or from the spool or the read-ahead, when it holds the
    range)."""
    view = memoryview(view).cast("B") if not isinstance(view, memoryview) else view.cast("B")
    n = len(view)
    if n == 0:
        return
    for ahead in (_PREFETCH if prefetched else ()):  # first: a read-ahead's own read takes from the spool
        data = ahead.take(url, offset, n)
        if data is not None:
            view[:] = data
            return
    if any(s.take(url, offset, view, version) for s in list(SPOOLS)):
        return
    with _LOCK:
        _READING[0] += 1
    try:
        _read_from_server(url, offset, view, version)
    finally:
        with _LOCK:
            _READING[0] -= 1


def _read_from_server(url: str, offset: int, view: memoryview, version: str) -> None:
    n = len(view)
    fs, path = _locate(url)
    parts = [(a, min(a + REQUEST_BYTES, n)) for a in range(0, n, REQUEST_BYTES)]
    if len(parts) == 1:
        view[:] = _fetch(fs, path, url, offset, offset + n, version)
        return
    pending: dict = {}
    it = iter(parts)
    try:
        for a, b in it:
            pending[_POOL.submit(_fetch, fs, path, url, offset + a, offset + b, version)] = (a, b)
            if len(pending) >= IN_FLIGHT:
                _drain(pending, view)
        while pending:
            _drain(pending, view)
    finally:
        for f in pending:
            f.cancel()


def _drain(pending: dict, view) -> None:
    done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
    for f in done:
        a, b = pending.pop(f)
        view[a:b] = f.result()


def _fetch(fs, path: str, url: str, start: int, end: int, version: str) -> bytes:
    """Bytes [start, end) of one file, retried with backoff on transient failures."""
    def once() -> bytes:
        data = _fetch_once(fs, path, start, end, version)
        if len(data) > end - start:  # the whole file, or more of it: retrying would fetch it again
            raise CheckpointError(f"{url}: the server ignores range requests (it sent {len(data)} bytes for "
                                  f"{end - start}); serve the checkpoint with a server that supports Range, or "
                                  "download it and convert the directory")
        if len(data) < end - start:
            raise ShortRead(f"{len(data)} of {end - start} bytes")
        return data
    return _retried(once, url, f"reading bytes {start}..{end}")


class ShortRead(ConnectionError):
    """A response with fewer bytes than the range asked for (a truncated body)."""


def _retried(fn, url: str, what: str, hf_repo: str | None = None):
    """`fn()`, retried RETRIES times with backoff on transient failures; a changed file, a refusal
    and the last failure are one line each."""
    wait, problem = RETRY_BASE, ""
    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - sorted into the user's, the server's and the network's
            kind = classify(e)
            if kind == "changed":
                raise SourceChanged(f"{url}: the server now holds another version of this file than the one this "
                                    "run started from; nothing was written; rerun the same command to start over "
                                    "from the new files") from None
            if kind != "transient":
                raise _user_error(e, url, hf_repo) from None
            problem = describe(e)
        if attempt < RETRIES:
            time.sleep(wait)
            wait = min(wait * 2, RETRY_CAP)
    raise ResumableFailure(f"{url}: {what} failed {RETRIES} times ({problem}); check the network or the server "
                           "and rerun the same command to continue where it stopped")


def _fetch_once(fs, path: str, start: int, end: int, version: str) -> bytes:
    if _is_http(fs):
        headers = {"If-Match": version} if version.startswith('"') else {}
        return fs.cat_file(path, start=start, end=end, headers=headers)
    if type(fs).__name__ == "HfFileSystem":  # exactly the range (no read-ahead): the file is pinned to a commit
        with fs.open(path, "rb", block_size=REQUEST_BYTES, cache_type="none") as f:
            f.seek(start)
            return f.read(end - start)
    return fs.cat_file(path, start=start, end=end)


# -- errors -------------------------------------------------------------------------------------------

def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code"):
        value = getattr(e, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(e, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def classify(e: BaseException) -> str:
    """"changed", "gated", "denied", "missing", "transient" or "other"."""
    import asyncio

    for err in _chain(e):
        name = type(err).__name__
        if name == "GatedRepoError":
            return "gated"
        if name in ("RepositoryNotFoundError", "BucketNotFoundError"):
            return "denied"
        if name in ("RevisionNotFoundError", "RemoteEntryNotFoundError", "EntryNotFoundError"):
            return "missing"
        status = _status(err)
        if status is not None:
            if status in (412, 416):
                return "changed"
            if status in (401, 403):
                return "denied"
            if status in (404, 410):
                return "missing"
            if status >= 500 or status in (408, 429):
                return "transient"
            return "other"
        if isinstance(err, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
            return "transient"
        if name in ("FSTimeoutError", "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError",
                    "ClientOSError", "ClientConnectorError", "TransferEncodingError", "ContentLengthError") \
                or any(c.__name__ in ("TransportError", "ClientError") for c in type(err).__mro__):
            return "transient"
        if isinstance(err, OSError) and err.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE,
                                                      errno.ETIMEDOUT):
            return "transient"
    if any(isinstance(err, FileNotFoundError) for err in _chain(e)):
        return "missing"
    return "other"


def describe(e: BaseException) -> str:
    """The failure in a few words, without URLs (they may carry credentials)."""
    status = next((s for s in map(_status, _chain(e)) if s is not None), None)
    if status is not None:
        return f"HTTP {status}"
    return f"short read: {e}" if isinstance(e, ShortRead) else type(e).__name__


def _user_error(e: BaseException, url: str, hf_repo: str | None = None) -> CheckpointError:
    kind = classify(e)
    if hf_repo is None and url.startswith("hf://"):
        hf_repo = url[len("hf://"):].split("@")[0].split("/", 2)
        hf_repo = "/".join(hf_repo[:2])
    login = ("; if it is private, log in with `hf auth login` (or set HF_TOKEN); if it is gated, accept its terms "
             f"on its Hub page (https://huggingface.co/{hf_repo}) with that account first") if hf_repo else \
        "; check the URL, and give credentials the way the filesystem takes them"
    if kind == "gated":
        return CheckpointError(f"{url}: the repository is gated: accept its terms on its Hub page "
                               f"(https://huggingface.co/{hf_repo}) and log in with `hf auth login` (or set HF_TOKEN)")
    if kind == "denied":
        return CheckpointError(f"{url}: access denied or no such repository ({describe(e)}){login}")
    if kind == "missing":
        return RemoteMissing(f"{url}: not found ({describe(e)}); check the URL, the revision and the file name"
                               + (login if hf_repo else ""))
    return CheckpointError(f"{url}: the server refused the request ({describe(e)}); check the URL")


def _call(fn, url: str, hf_repo: str | None = None):
    """`fn()` (a metadata request), retried like a read; a refusal is one line."""
    return _retried(fn, url, "asking the server about it", hf_repo)


def fetch_estimate(ckpt) -> dict | None:
    """Bytes a conversion of a remote checkpoint fetches: the small files and the safetensors
    headers and packed projections' weight_scale values (read again by every run), and the planned
    tensors' bytes: once for a packed projection
    or a float tensor kept as it is (read by the stage that uses the values), twice for the others
    (extract's pass for a latent projection's absmean, a group-scaled tensor's groups or a float
    tensor quantize rewrites, then the values): plan.fetched_once."""
    from pipeline.plan import fetched_once_names

    src = source_of(ckpt.model_dir)
    if src is None:
        return None
    first: dict = {}
    for s in ckpt.sources.values():
        first[s.file] = min(first.get(s.file, s.offset), s.offset)
    small = sum(f.size for f in src.small.values())
    headers = sum(first.values()) + ckpt.scale_bytes
    once, twice, unread = 0, 0, fetched_once_names(ckpt)
    for t in ckpt.plan.tensors:
        s = ckpt.sources[t.hf_name]
        nbytes = math.prod(s.shape) * s.np_dtype.itemsize
        if t.hf_name in unread:
            once += nbytes
        else:
            twice += nbytes
    return {"small_files": small, "headers": headers, "tensors": once + twice, "fetched_twice": twice,
            "total": small + headers + once + 2 * twice}
