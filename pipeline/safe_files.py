"""Opening files where someone else may have put a link first.

The run directory and the output's directory are places other processes can write to.
A temporary file is therefore always created anew and exclusively (O_CREAT | O_EXCL |
O_NOFOLLOW): whatever was at its name is removed first (a link is removed, never
followed), and if something appears there again before the creation, the creation
fails instead of writing through it. A file that is kept (the lock) is opened without
following a link at its name.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from pipeline.errors import RunDirError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def create_exclusive(path: Path, mode: str = "wb"):
    """A new, empty regular file at `path`, opened for writing (`mode` "wb" or "w")."""
    path = Path(path)
    for _ in range(3):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except (IsADirectoryError, PermissionError) as e:
            raise RunDirError(f"{path}: cannot replace what is there ({e.strerror}); it is not a file of ours: "
                              "remove it or choose another place") from None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        except FileExistsError:
            continue  # someone put something there again: remove it and try once more
        return os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {}))
    raise RunDirError(f"{path}: another process keeps creating this file; make sure nothing else writes "
                      "in this directory")


def open_no_link(path: Path, flags: int) -> int:
    """A descriptor of the regular file at `path` (created if `flags` has O_CREAT); a link, a
    directory or a special file at that name is refused, never opened through."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise RunDirError(f"{path}: is a symbolic link; this is not a file of ours: remove it or "
                              "choose another --workdir") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirError(f"{path}: is not a regular file; this is not a file of ours: remove it or "
                          "choose another --workdir")
    return fd
