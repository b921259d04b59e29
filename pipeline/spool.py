"""A remote checkpoint's float tensors fetched into the run directory (`spool/`) while the stages before
assemble run, so the link does not idle during pack and assemble's reads find them on disk.

The stages' own reads come first (`remote.busy`); each range is a file recorded with its xxh3 and removed
as assemble takes it; a failure stops the spool only (the reader fetches the range itself); a killed run's
files are taken up by the rerun. How and why: docs/notes/remote-sources.md, "The spool".
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import threading
import time
from pathlib import Path

from pipeline import remote
from pipeline.errors import RunDirError
from pipeline.safe_files import create_exclusive, open_no_link, write_whole

SPOOL_DIR = "spool"
INDEX = "index.json"
SPOOL_IN_FLIGHT = 2   # requests of remote.REQUEST_BYTES outstanding
YIELD_SECONDS = 0.005  # how often the spool looks whether the stages' own reads are done
CLOSE_WAIT = 2.0       # seconds close() waits for the request in flight


def buffer_reserve() -> int:
    """Memory the spool's requests hold at once (a response, then its copy)."""
    return SPOOL_IN_FLIGHT * remote.REQUEST_BYTES * 2


def spooled_ranges(ckpt, plan) -> list[tuple[str, int, int, str]]:
    """(URL, offset, bytes, version) that assemble will read from a remote checkpoint for the float
    tensors it passes through (as stages/pack.py indexes them and stores.remote_range reads them),
    in assemble's order; only tensors whose output bytes are at least their checkpoint bytes."""
    from pipeline.plan import SAME_BYTES, encoded_in_assemble, fetched_once_names
    from pipeline.families import TERNARY
    from pipeline.stores import row_ranges

    if remote.source_of(ckpt.model_dir) is None:
        return []
    unread = fetched_once_names(ckpt)
    by_name = {t.gguf_name: t for t in ckpt.plan.tensors}
    ranges = []
    for record in plan.tensors:
        t = by_name.get(record.name)
        if t is None or record.stack or t.hf_name not in unread or t.role == TERNARY or t.recipe.offset:
            continue
        src = ckpt.sources[t.hf_name]
        shape = tuple(record.shape)
        if not ((src.dtype, record.out_type) in SAME_BYTES or encoded_in_assemble(t.role, shape, record.out_type)):
            continue
        nbytes = src.np_dtype.itemsize * int(_prod(src.shape))
        if record.nbytes < nbytes:
            continue
        if len(shape) > 1:
            row_bytes = nbytes // src.shape[0]
            ranges += [(src.file.url, src.offset + r0 * row_bytes, (r1 - r0) * row_bytes, src.file.version)
                       for r0, r1 in row_ranges(shape[0], record.chunk_rows["pack"])]
        else:
            ranges.append((src.file.url, src.offset, nbytes, src.file.version))
    return ranges


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Spool:
    """The background fetch of `ranges` into `directory` (see the module's docstring)."""

    def __init__(self, directory: Path, ranges: list[tuple[str, int, int, str]]):
        self.directory = Path(directory)
        self.ranges = ranges
        self.index = {(url, offset, n, version): i for i, (url, offset, n, version) in enumerate(ranges)}
        self.state: dict[int, str] = {}     # "fetching", "done", "skipped" (read by its reader), "taken"
        self.digests: dict[int, str] = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.cursor = 0
        self.directory.mkdir(exist_ok=True)
        self._adopt()
        self.thread = threading.Thread(target=self._run, name="bitnet-gguf-spool", daemon=True)
        self.thread.start()

    def _path(self, i: int) -> Path:
        return self.directory / f"{i:06d}.bin"

    def _adopt(self) -> None:
        """Keep the files a killed run recorded for these same ranges; remove everything else."""
        keep = {}
        try:
            for entry in json.loads((self.directory / INDEX).read_text(encoding="utf-8")):
                i = self.index.get((entry["url"], entry["offset"], entry["n"], entry["version"]))
                if i is not None and entry["file"] == self._path(i).name and self._path(i).is_file() \
                        and self._path(i).stat().st_size == entry["n"]:
                    keep[i] = entry["xxh3"]
        except (OSError, ValueError, KeyError, TypeError):
            keep = {}
        kept = {self._path(i).name for i in keep} | {INDEX}
        for p in self.directory.iterdir():
            if p.name not in kept:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        for i, digest in keep.items():
            self.state[i], self.digests[i] = "done", digest
        self._save_index()

    def _save_index(self) -> None:
        """The recorded ranges, replaced whole; not fsynced: a kill leaves it in the page cache, and
        after a crash a lost record costs a fetch, a lost file's bytes fail their digest."""
        with self.cond:
            entries = [{"url": self.ranges[i][0], "offset": self.ranges[i][1], "n": self.ranges[i][2],
                        "version": self.ranges[i][3], "file": self._path(i).name, "xxh3": d}
                       for i, d in sorted(self.digests.items()) if self.state.get(i) == "done"]
        write_whole(self.directory / INDEX, json.dumps(entries), suffix=".tmp")

    def _next(self) -> int | None:
        with self.cond:
            while not self.stopping and self.cursor < len(self.ranges):
                i, self.cursor = self.cursor, self.cursor + 1
                if i not in self.state:
                    self.state[i] = "fetching"
                    return i
        return None

    def _run(self) -> None:
        while (i := self._next()) is not None:
            try:
                digest = self._fetch(i)
                with self.cond:
                    if digest is None:
                        self.state[i] = "skipped"
                    else:
                        self.state[i], self.digests[i] = "done", digest
                    self.cond.notify_all()
                if digest is not None:
                    self._save_index()
            except BaseException:  # noqa: BLE001 - the reader fetches the range itself and reports what fails
                with self.cond:
                    if self.state.get(i) == "fetching":
                        self.state[i] = "skipped"
                    self.stopping = True
                    self.cond.notify_all()
                return

    def _fetch(self, i: int) -> str | None:
        """Fetch range `i` into its file, in order, SPOOL_IN_FLIGHT requests outstanding; its digest
        (None when stopped before its end)."""
        import xxhash

        url, offset, n, version = self.ranges[i]
        final = self._path(i)
        tmp = final.with_name(final.name + ".partial")
        digest = xxhash.xxh3_64()
        pending = collections.deque()
        parts = iter(range(0, n, remote.REQUEST_BYTES))
        a = next(parts, None)
        f = create_exclusive(tmp)  # anew, never through a link planted at its name
        fd = f.fileno()
        try:
            while (a is not None or pending) and not self.stopping:
                if a is not None and len(pending) < SPOOL_IN_FLIGHT and not remote.busy():
                    pending.append((a, remote.fetch_async(url, offset + a, min(a + remote.REQUEST_BYTES, n) + offset,
                                                          version)))
                    a = next(parts, None)
                elif pending:
                    start, future = pending.popleft()
                    data = future.result()
                    os.pwrite(fd, data, start)
                    digest.update(data)
                else:  # a stage is fetching: its requests first
                    time.sleep(YIELD_SECONDS)
        finally:
            for _, future in pending:
                future.cancel()
            f.close()
        if self.stopping:
            tmp.unlink(missing_ok=True)
            return None
        os.replace(tmp, final)
        return digest.hexdigest()

    def take(self, url: str, offset: int, view, version: str) -> bool:
        """Fill `view` with range (url, offset, len(view)) from its file, if spooled (waiting for it
        while it is fetched), checked against its digest, and remove the file; False when the reader
        must fetch it (not spooled, not begun yet, failed, or damaged)."""
        import xxhash

        i = self.index.get((url, offset, len(view), version))
        if i is None:
            return False
        with self.cond:
            while self.state.get(i) == "fetching":
                self.cond.wait()
            state = self.state.get(i)
            if state != "done":
                if state is None:
                    self.state[i] = "skipped"
                return False
            self.state[i] = "taken"
        path = self._path(i)
        try:  # a regular file only: a link or a FIFO planted at its name is not read (fetched instead)
            with os.fdopen(open_no_link(path, os.O_RDONLY), "rb") as f:
                got = f.readinto(view)
            ok = got == len(view) and xxhash.xxh3_64_hexdigest(view) == self.digests[i]
        except (OSError, RunDirError):
            ok = False
        path.unlink(missing_ok=True)
        return ok

    def close(self) -> None:
        """Stop after the requests in flight (not waited for beyond CLOSE_WAIT: a failing server's
        retries must not hold up the run's end; what they bring is dropped)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(CLOSE_WAIT)


def start(run_dir: Path, ckpt, plan) -> Spool | None:
    """Start spooling assemble's float ranges of a remote checkpoint into the run directory (None
    when there are none: a local checkpoint, or no float tensor passed through)."""
    ranges = spooled_ranges(ckpt, plan)
    if not ranges:
        remove(run_dir)
        return None
    spool = Spool(Path(run_dir) / SPOOL_DIR, ranges)
    remote.SPOOLS.append(spool)  # remote.read_into asks it first
    return spool


def stop(spool: Spool | None, run_dir: Path, finished: bool) -> None:
    """Stop the spool; its directory goes when the conversion is `finished` (else a rerun takes
    up what it recorded)."""
    if spool is not None:
        spool.close()
        remote.SPOOLS.remove(spool)
    if finished:
        remove(run_dir)


def remove(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / SPOOL_DIR, ignore_errors=True)
