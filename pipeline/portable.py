"""The few operating-system calls that differ between Linux, macOS and Windows, each chosen once
here at import (a call site never tries one call and falls back to another):

- `read_into(fd, view, offset)`: a positioned read into a buffer. `os.preadv` where there is
  one (Linux, BSD, recent macOS); elsewhere a seek and `readinto` on the descriptor (every OS;
  our descriptors are private to one call, so moving their offset is harmless).
- `copy_range(src_fd, dst_fd, nbytes, src_offset, dst_offset)`: an in-kernel copy
  (`os.copy_file_range`, Linux) where there is one, else a buffered copy. A filesystem that
  refuses the in-kernel copy (another device, an old kernel) gets the buffered copy too.
- `try_lock(file)` / `unlock(file)` / `lock_is_held(path)`: an exclusive lock on the run
  directory's lock file, released by the operating system when its holder dies (so a killed
  conversion never leaves a stale lock). `flock` where `fcntl` exists (Linux, macOS, BSD);
  filelock's `LockFileEx` on byte zero on Windows; POSIX record locks (`os.lockf`) on a POSIX
  system whose Python lacks `fcntl`. `lock_is_held` asks without taking the lock where the
  system can tell (/proc/locks on Linux, F_TEST of record locks); elsewhere it takes the lock
  for an instant, which `try_lock`'s short retry makes harmless to a conversion starting then.
- `fsync_directory(path)`: makes renames in a directory durable (POSIX); Windows has no
  directory descriptors and makes a rename durable itself (MoveFileEx with write-through is
  what os.replace uses), so it is nothing there.
"""
from __future__ import annotations

import errno
import io
import os
import sys
import time
from pathlib import Path

O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation on os.open descriptors
PROC_LOCKS = Path("/proc/locks")
LOCK_RETRY_SECONDS = 1.0  # how long try_lock waits out another process's momentary lock_is_held


def open_read(path) -> int:
    return os.open(path, os.O_RDONLY | O_BINARY)


# -- positioned reads ---------------------------------------------------------------------
def _read_into_preadv(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


def _read_into_seek(fd: int, view: memoryview, offset: int) -> int:
    os.lseek(fd, offset, os.SEEK_SET)
    with io.FileIO(fd, "rb", closefd=False) as f:
        return f.readinto(view) or 0


read_into = _read_into_preadv if hasattr(os, "preadv") else _read_into_seek


# -- copies between files -----------------------------------------------------------------
COPY_BUFFER = 1 << 24


def _copy_buffered(src_fd: int, dst_fd: int, nbytes: int, src_offset: int, dst_offset: int) -> int:
    """Copy through one buffer of at most COPY_BUFFER bytes; returns the bytes copied (fewer
    when the source ends early)."""
    buf = bytearray(min(nbytes, COPY_BUFFER))
    view = memoryview(buf)
    done = 0
    with io.FileIO(dst_fd, "wb", closefd=False) as dst:
        while done < nbytes:
            n = read_into(src_fd, view[:min(nbytes - done, len(buf))], src_offset + done)
            if n == 0:
                break
            os.lseek(dst_fd, dst_offset + done, os.SEEK_SET)
            written = 0
            while written < n:
                written += dst.write(view[written:n])
            done += n
    return done


def _copy_in_kernel(src_fd: int, dst_fd: int, nbytes: int, src_offset: int, dst_offset: int) -> int:
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
            if n == 0:
                return done
            done += n
    except OSError:  # these two files cannot be copied in the kernel: the rest through a buffer
        done += _copy_buffered(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
    return done


copy_range = _copy_in_kernel if hasattr(os, "copy_file_range") else _copy_buffered
"""Copy `nbytes` from `src_offset` of one descriptor to `dst_offset` of another; returns the
bytes copied (fewer when the source ends early). The destination's file offset is unspecified
afterwards: seek before writing through it again."""


# -- the run directory's lock -------------------------------------------------------------
def _proc_locks_holds(path: Path) -> bool | None:
    """Whether a process holds a lock on `path`, per /proc/locks (None: cannot tell)."""
    try:
        st = path.stat()
        text = PROC_LOCKS.read_text()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; blocked waiters start with "->"
        if len(fields) >= 6 and fields[1] != "->" and fields[5] == wanted:
            return True
    return False


try:
    import fcntl
except ImportError:
    fcntl = None

if fcntl is not None:  # Linux, macOS, BSD
    def _lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    def _held_by_trying(path: Path) -> bool:
        with open(path, "rb") as f:  # flock works on a descriptor opened read-only
            if not _lock(f.fileno()):
                return True
            _unlock(f.fileno())
        return False

    LOCK_KIND = "flock"
elif sys.platform == "win32":
    from filelock import lock_descriptor, unlock_descriptor

    def _lock(fd: int) -> bool:
        return lock_descriptor(fd, blocking=False)

    def _unlock(fd: int) -> None:
        unlock_descriptor(fd)

    def _held_by_trying(path: Path) -> bool:
        with open(path, "rb") as f:  # LockFileEx needs read or write access, not both
            if not _lock(f.fileno()):
                return True
            _unlock(f.fileno())
        return False

    LOCK_KIND = "LockFileEx"
else:  # a POSIX system whose Python has no fcntl module: record locks on the whole file
    def _lock(fd: int) -> bool:
        try:
            os.lockf(fd, os.F_TLOCK, 0)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def _unlock(fd: int) -> None:
        os.lockf(fd, os.F_ULOCK, 0)

    def _held_by_trying(path: Path) -> bool:
        # F_TEST asks without taking the lock. Asked from the process that holds the lock, it
        # would drop it (closing any descriptor of a file drops the process's record locks);
        # `status` asks from its own process.
        with open(path, "rb") as f:
            try:
                os.lockf(f.fileno(), os.F_TEST, 0)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    return True
                raise
        return False

    LOCK_KIND = "lockf"

if LOCK_KIND == "flock" and PROC_LOCKS.is_file():  # Linux: ask without taking the lock
    def lock_is_held(path: Path) -> bool:
        held = _proc_locks_holds(path)
        return _held_by_trying(path) if held is None else held
else:
    lock_is_held = _held_by_trying


def try_lock(f) -> bool:
    """Take the exclusive lock on open file `f` (opened for writing); False when another process
    holds it. A holder of a moment (another process's lock_is_held) is waited out."""
    deadline = time.monotonic() + LOCK_RETRY_SECONDS
    while not _lock(f.fileno()):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def unlock(f) -> None:
    _unlock(f.fileno())


# -- durable renames ----------------------------------------------------------------------
def _fsync_directory(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_directory_fsync(path) -> None:
    pass


fsync_directory = _no_directory_fsync if sys.platform == "win32" else _fsync_directory
