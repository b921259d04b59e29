"""Run the CLI and interrupt it just before its k-th write to the run directory or the output.

A "write" is any change to a name directly in the run directory (the directory itself, the
lock, manifest.json, plan.json, metadata.json, the checksum and reference records, a store
made, renamed aside or deleted) or to the output's names (the temporary `.NAME.<tag>.partial`,
the rename into place), seen through Python's audit hooks (`open` for writing, mkdir, rename,
replace, remove, rmdir, rmtree) before it happens. Writes inside a store (chunks, digests)
are left to the chunk kill points of tests/kill_points.py: there are thousands of them.

    python -m tests.write_points convert MODEL -o OUT --workdir WORK ...

Environment: BITNET_GGUF_WATCH (the run directory), BITNET_GGUF_WATCH_OUTPUT (the output),
BITNET_GGUF_WRITES_LOG (a file: one line per write, appended), BITNET_GGUF_KILL_AT_WRITE (k,
1-based; 0 or absent: no kill) and BITNET_GGUF_KILL_SIGNAL (a signal number). A kill aimed at
write k lands after write k-1 and before write k: SIGKILL at once; SIGTERM and SIGINT run
the CLI's own handlers (in the main thread; a write of another thread may still be made). BITNET_GGUF_PAUSE_AT_WRITE (k) with
BITNET_GGUF_PAUSE_FILE (a path P) holds the process before write k instead: it creates
P.paused and waits for P.go (so a test can run another command in exactly that window).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

WATCH_ENV, OUTPUT_ENV, LOG_ENV = "BITNET_GGUF_WATCH", "BITNET_GGUF_WATCH_OUTPUT", "BITNET_GGUF_WRITES_LOG"
KILL_AT_ENV, SIGNAL_ENV = "BITNET_GGUF_KILL_AT_WRITE", "BITNET_GGUF_KILL_SIGNAL"
PAUSE_AT_ENV, PAUSE_FILE_ENV = "BITNET_GGUF_PAUSE_AT_WRITE", "BITNET_GGUF_PAUSE_FILE"
ENVIRONMENT = (WATCH_ENV, OUTPUT_ENV, LOG_ENV, KILL_AT_ENV, SIGNAL_ENV, PAUSE_AT_ENV, PAUSE_FILE_ENV)  # read by main() only
PAUSE_LIMIT = 600.0  # seconds a paused run waits for its go before it gives up (exit 3)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# audit event -> positions of its path arguments and of its dir_fd (a path relative to a
# descriptor is inside a tree being walked, never a name of the run directory itself)
EVENTS = {"os.mkdir": ((0,), 2), "os.rename": ((0, 1), 2), "os.remove": ((0,), 1), "os.rmdir": ((0,), 1),
          "shutil.rmtree": ((0,), 1), "os.link": ((0, 1), 2), "os.truncate": ((0,), None)}


def _text(path) -> str | None:
    if isinstance(path, int):
        return None  # a descriptor: opened (and counted) before
    return os.path.abspath(os.fsdecode(os.fspath(path)))


class Watcher:
    def __init__(self, workdir: str, output: str, log_path: str | None, kill_at: int, sig: int,
                 pause_at: int = 0, pause_file: str = ""):
        self.workdir, self.output = os.path.abspath(workdir), os.path.abspath(output)
        self.log = open(log_path, "a", encoding="utf-8") if log_path else None
        self.kill_at, self.signal, self.count, self.fired = kill_at, sig, 0, False
        self.pause_at, self.pause_file = pause_at, pause_file
        self.lock = threading.Lock()

    def ours(self, path: str | None) -> bool:
        if path is None:
            return False
        parent, name = os.path.split(path)
        if path == self.workdir or parent == self.workdir:
            return True
        out_dir, out_name = os.path.split(self.output)
        return parent == out_dir and (name == out_name or name.startswith(f".{out_name}."))

    def writes(self, event: str, args) -> list[str]:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \
                isinstance(flags, int) and flags & WRITE_FLAGS
            return [p for p in [_text(path)] if writing and self.ours(p)]
        spec = EVENTS.get(event)
        if spec is None:
            return []
        positions, dir_fd = spec
        if dir_fd is not None and len(args) > dir_fd and args[dir_fd] not in (None, -1):
            return []
        paths = [p for p in (_text(args[i]) for i in positions) if self.ours(p)]
        # a call that changes nothing is no write: zarr tries to make a store's directory before
        # every array it creates, and a temporary file is removed before it is created
        if event == "os.mkdir" and all(os.path.lexists(p) for p in paths):
            return []
        if event in ("os.remove", "os.rmdir", "shutil.rmtree") and not any(os.path.lexists(p) for p in paths):
            return []
        return paths

    def __call__(self, event: str, args) -> None:
        if self.fired or (event != "open" and event not in EVENTS):
            return
        paths = self.writes(event, args)
        if not paths:
            return
        with self.lock:
            self.count += 1
            n = self.count
            if self.log:
                names = " ".join(os.path.relpath(p, os.path.dirname(self.workdir)) for p in paths)
                self.log.write(f"{n} {event} {names} {threading.current_thread().name}\n")
                self.log.flush()
            if n == self.pause_at:
                self.pause()
            if n != self.kill_at:
                return
            self.fired = True
        if self.signal == signal.SIGKILL:
            os.kill(os.getpid(), signal.SIGKILL)
        # in the main thread its handler raises here and the write is not made; in another thread
        # (zarr's) the main thread takes it at once, as with a real signal, and this write goes on
        signal.raise_signal(self.signal)


    def pause(self) -> None:
        with open(self.pause_file + ".paused", "w"):
            pass
        deadline = time.monotonic() + PAUSE_LIMIT
        while not os.path.exists(self.pause_file + ".go"):
            if time.monotonic() > deadline:
                os._exit(3)
            time.sleep(0.01)


def main(argv: list[str]) -> int:
    watcher = Watcher(os.environ[WATCH_ENV], os.environ[OUTPUT_ENV], os.environ.get(LOG_ENV),
                      int(os.environ.get(KILL_AT_ENV, "0") or 0), int(os.environ.get(SIGNAL_ENV, "9")),
                      int(os.environ.get(PAUSE_AT_ENV, "0") or 0), os.environ.get(PAUSE_FILE_ENV, ""))
    sys.addaudithook(watcher)
    from pipeline.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
