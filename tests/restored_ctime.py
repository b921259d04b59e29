"""Run the converter's CLI as on a filesystem whose rollback restores a file's ctime too.

`python -m tests.restored_ctime DIR ARGS...` is `python -m pipeline ARGS...`, except that every
stat of a file under DIR reports its mtime as its ctime. Rolling a snapshot back brings the old
inode with its old times, ctime included; an unprivileged test cannot set a ctime, but with
this view an in-place rewrite whose mtime is put back with os.utime keeps size, mtime, ctime
and inode as the converter fingerprints them, as such a rollback does.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_EXTRA = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize",
          "st_blocks", "st_rdev")


def _restored(st: os.stat_result) -> os.stat_result:
    fields = [*st, *(getattr(st, n) for n in _EXTRA)]
    fields[9], fields[12], fields[15] = int(st.st_mtime), st.st_mtime, st.st_mtime_ns
    return os.stat_result(fields[:os.stat_result.n_fields])


def freeze_ctime_under(root: Path) -> None:
    root = str(Path(root).resolve())
    real_stat, real_fstat = os.stat, os.fstat

    def inside(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root + os.sep)
        except (TypeError, ValueError):
            return False

    def stat(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        return _restored(st) if not isinstance(path, int) and inside(path) else st

    def fstat(fd):
        st = real_fstat(fd)
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return st
        return _restored(st) if inside(where) else st

    os.stat, os.fstat = stat, fstat


if __name__ == "__main__":
    freeze_ctime_under(Path(sys.argv.pop(1)))
    from pipeline.cli import main

    sys.argv[0] = "bitnet-gguf"
    sys.exit(main())
