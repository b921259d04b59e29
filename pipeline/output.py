"""The output files: where they are written while incomplete, and how they appear.

A conversion writes its GGUF (or every part of a split set) to a temporary file next to
the output, named after the run directory (`.NAME.<tag>.partial`): two conversions from
different run directories never share a temporary file, and a rerun of one finds and
replaces its own. The files appear at their final paths only when all are complete, and
only where nothing or a regular file was: a final path that changed since the conversion
started (another process wrote it) is not overwritten silently.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from pipeline import portable
from pipeline.errors import OptionError, RunDirError
from pipeline.gguf_file import split_paths


def run_tag(workdir: Path) -> str:
    return hashlib.sha256(str(workdir).encode()).hexdigest()[:8]


def final_paths(output: Path, parts: int) -> list[Path]:
    return split_paths(output, parts)


def temp_path(final: Path, workdir: Path) -> Path:
    return final.with_name(f".{final.name}.{run_tag(workdir)}.partial")


def identity(path: Path) -> list | None:
    """What a file at `path` is now (None: nothing there), to notice a change."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return [stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino]


def written_identity(path: Path) -> list | None:
    """What a finished output file is, recorded when it is renamed into place and compared on a
    rerun: size, mtime, ctime, inode and device. ctime changes on any write or rename, even one
    that restores size and mtime, and a different file has another inode; None when `path` is
    not a regular file."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


CAP_FOWNER = 3  # the capability that lets a process replace others' files in a sticky directory


def _may_override_owners() -> bool:
    """Whether this process may replace another user's file in a sticky directory (CAP_FOWNER:
    root, usually; read from /proc on Linux, else taken to come with uid 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_FOWNER & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _foreign_in_sticky_dir(path: Path, st: os.stat_result) -> int | None:
    """The owner's uid when `path` (described by `st`) is another user's file in a sticky
    directory (mode 1777, like /tmp) that is not ours either: only its owner may rename over it
    or delete it there, so the final rename would fail after all the work."""
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:  # Windows: no sticky directories
        return None
    try:
        parent = os.stat(path.parent)
    except OSError:
        return None
    euid = geteuid()
    if not parent.st_mode & stat.S_ISVTX or euid in (st.st_uid, parent.st_uid) or _may_override_owners():
        return None
    return st.st_uid


def check_output_side(finals: list[Path], workdir: Path) -> None:
    """Refuse, before any work, what would stop the finished GGUF from appearing: a temporary name
    (`.NAME.<tag>.partial`) taken by a directory, or a final or temporary name held by another
    user's file in a sticky directory. (What may be at a final name is check_output_path's.)"""
    for final in finals:
        temp = temp_path(final, workdir)
        for path, what in ((final, ""), (temp, f" (the temporary name the GGUF is written to before it is "
                                               f"renamed to {final.name})")):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise OptionError(f"-o: cannot look at {path} ({e.strerror}); choose another output path") from None
            if stat.S_ISDIR(st.st_mode):
                raise OptionError(f"-o: {path} is a directory{what}; remove it or choose another output path")
            owner = _foreign_in_sticky_dir(path, st)
            if owner is not None:
                raise OptionError(f"-o: {path}{what} belongs to another user (uid {owner}) in {path.parent}, a "
                                  "sticky directory where only its owner may replace it; choose another output path")


class OutputChanged(RunDirError):
    """Something else was written at an output path while the conversion ran."""


def publish(temps: list[Path], finals: list[Path], before: list[list | None]) -> None:
    """Rename every complete temporary file to its final path, refusing to replace anything but a
    regular file, or a file that changed since `before` was taken."""
    for final, seen in zip(finals, before):
        now = identity(final)
        kept = temps[finals.index(final)]
        where = f"{kept}" if len(temps) == 1 else \
            f"{kept} (and the other {len(temps) - 1} parts at their .partial names beside it)"
        if now is not None and not stat.S_ISREG(now[0]):
            raise OutputChanged(f"-o: {final} is now not a regular file; the finished GGUF stays at "
                                f"{where} (rename it yourself)")
        if now != seen:
            raise OutputChanged(f"-o: {final} was written by another process during this conversion; "
                                f"not replacing it: the finished GGUF stays at {where} "
                                "(rename it yourself, or rerun to replace theirs)")
    for temp, final in zip(temps, finals):
        os.replace(temp, final)
    dirs = {final.parent for final in finals}
    for d in dirs:  # make the renames durable
        portable.fsync_directory(d)


def remove_stale_temps(output: Path, workdir: Path) -> int:
    """Delete temporary output files an interrupted run of this run directory left (its own
    names only: `.NAME.<tag>.partial` and those of split parts `.NAME-0000k-of-0000n.gguf...`)."""
    tag = run_tag(workdir)
    n = 0
    for p in output.parent.glob(f".{output.stem}*.{tag}.partial"):
        name = p.name[1:-len(f".{tag}.partial")]
        if (name == output.name or (name.startswith(output.stem + "-") and name.endswith(".gguf"))) \
                and not (p.is_dir() and not p.is_symlink()):  # a directory there is not a file of ours
            p.unlink(missing_ok=True)
            n += 1
    return n
