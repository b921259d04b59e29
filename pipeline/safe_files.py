"""Opening files where someone else may have put a link first, and reading the small files options name.

The run directory and the output's directory are places other processes can write to.
A temporary file is therefore always created anew and exclusively (O_CREAT | O_EXCL |
O_NOFOLLOW): whatever is found at its name is removed (a link is removed, never
followed) and the creation tried again, and if something appears there again before it,
the creation fails instead of writing through it. A file that is kept (the lock) is opened without
following a link at its name.

A file an option names (--metadata, --kernel-config, --config) is read by `read_option_file`:
opened without waiting (a FIFO), refused unless it is a regular file, and sized before it is
read against a cap and the memory limit, so no option file can block or outgrow the limit.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from pipeline.errors import OptionError, RunDirError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def create_exclusive(path: Path, mode: str = "wb"):
    """A new, empty regular file at `path`, opened for writing (`mode` "wb" or "w")."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        except FileExistsError:  # something is there (a file, a link, a directory): remove it and try again
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except (IsADirectoryError, PermissionError) as e:
                raise RunDirError(f"{path}: cannot replace what is there ({e.strerror}); it is not a file of ours: "
                                  "remove it or choose another place") from None
            continue
        return os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {}))
    raise RunDirError(f"{path}: another process keeps creating this file; make sure nothing else writes "
                      "in this directory")


@contextlib.contextmanager
def removed_if_unfinished(tmp):
    """Around the writing and renaming of a temporary file: whatever stops it (an error, or the
    KeyboardInterrupt a SIGINT or SIGTERM raises in the main thread) removes the file, so an
    interrupted run leaves no `.partial` behind."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_whole(target, data, fsync: bool = False, suffix: str = ".partial", parents: bool = False) -> None:
    """`data` at `target`, whole or not at all: written to a temporary name beside it (`target` +
    `suffix`, created anew by create_exclusive, never through a link), then renamed over `target`;
    whatever stops it removes the temporary file (removed_if_unfinished). `data`: bytes, a
    memoryview or text, or a function that makes the temporary file at the path it is given (a
    hard link, a copy). `fsync`: the bytes reach the disk before the rename (run directory records).
    `parents`: the directories above `target` are made if they are missing (found by the creation
    failing, not asked first: a store's tens of thousands of small files are mostly in directories
    that exist, and a mkdir or stat for each cost more than the write)."""
    target = os.fspath(target)
    tmp = target + suffix
    with removed_if_unfinished(tmp):
        if callable(data):
            data(tmp)
        else:
            mode = "w" if isinstance(data, str) else "wb"
            try:
                f = create_exclusive(tmp, mode)
            except FileNotFoundError:
                if not parents:
                    raise
                make_directory(os.path.dirname(tmp))
                f = create_exclusive(tmp, mode)
            with f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        os.replace(tmp, target)


def make_directory(path: str) -> None:
    """The directory at `path` and any missing above it (os.makedirs with exist_ok), asking for the
    directory itself first: its parent is there for most of the tens of thousands of directories a
    store of many tensors gets, and makedirs' checks of the parents cost more than the mkdir."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)


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


def read_option_file(path: Path, option: str, kind: str, max_bytes: int, bytes_per_byte: int,
                     memory_limit: int | None = None) -> bytes:
    """The bytes of a small file named by an option (--metadata, --kernel-config, --config),
    sized before it is read: only a regular file (a FIFO or a device would block or never end),
    at most `max_bytes`, and only when parsing it (about `bytes_per_byte` times its size) fits in
    `memory_limit` beside what this process already holds. `kind` names what the file should be."""
    where = f"{option} {path}"
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        raise OptionError(f"{where}: no such file; give {kind}") from None
    except OSError as e:
        raise OptionError(f"{where}: cannot read ({e.strerror}); give {kind}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OptionError(f"{where}: is a directory; give {kind}" if stat.S_ISDIR(st.st_mode) else
                          f"{where}: is not a regular file (a FIFO, device or socket); give {kind}")
    with os.fdopen(fd, "rb") as f:
        refuse_too_big(path, option, kind, st.st_size, max_bytes, bytes_per_byte, memory_limit)
        try:
            data = f.read(st.st_size + 1)
        except OSError as e:
            raise OptionError(f"{where}: cannot read ({e.strerror})") from None
    if len(data) > st.st_size:
        raise OptionError(f"{where}: grew while it was read; give a file nothing else is writing")
    return data


def refuse_too_big(path: Path, option: str, kind: str, size: int, max_bytes: int, bytes_per_byte: int,
                   memory_limit: int | None) -> None:
    """Refuse an option file of `size` bytes past `max_bytes`, or whose parsing `memory_limit` cannot hold."""
    from pipeline.budget import HEADROOM, current_rss, suggested_limit
    from pipeline.config import format_size

    if size > max_bytes:
        raise OptionError(f"{option} {path}: {size:,} bytes, more than the {format_size(max_bytes)} read from "
                          f"such a file; give {kind}")
    if memory_limit is None:
        return
    rest = current_rss() + HEADROOM
    need = size * bytes_per_byte
    if rest <= memory_limit < rest + need:  # a limit below `rest` is the budget's to refuse, with its minimum
        raise OptionError(f"{option} {path}: reading its {format_size(size)} takes about {format_size(need)}, more "
                          f"than --memory-limit {format_size(memory_limit)} holds beside this process; give a "
                          f"smaller file or allow at least {suggested_limit(rest + need) // 2**20}MiB")
