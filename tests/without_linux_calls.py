"""Run the converter's CLI as on a system without Linux's calls (macOS, Windows):
`python -m tests.without_linux_calls ARGS...` is `python -m pipeline ARGS...` with os.preadv,
os.pread and os.copy_file_range gone, `import fcntl` failing and /proc/locks
absent, all before the pipeline is imported (it chooses its calls at import).
`python -m tests.without_linux_calls --choices` prints which calls pipeline.portable chose."""
from __future__ import annotations

import builtins
import importlib.abc
import io
import os
import sys

HIDDEN_CALLS = ("preadv", "pread", "copy_file_range")
HIDDEN_PATHS = ("/proc/locks",)


class _NoFcntl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fcntl":
            raise ModuleNotFoundError("No module named 'fcntl'", name="fcntl")
        return None


def _hiding(call):
    def wrapped(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path) in HIDDEN_PATHS:
            raise FileNotFoundError(2, "No such file or directory", os.fsdecode(path))
        return call(path, *args, **kwargs)
    return wrapped


def hide() -> None:
    """Hide the calls, once per process (tests/conftest.py's fork servers for these commands call it
    before they import the pipeline, and their children run this module again)."""
    if getattr(builtins.open, "hides_linux_calls", False):
        return
    for name in HIDDEN_CALLS:
        if hasattr(os, name):
            delattr(os, name)
    sys.modules.pop("fcntl", None)
    sys.meta_path.insert(0, _NoFcntl())
    os.stat = _hiding(os.stat)
    os.open = _hiding(os.open)
    builtins.open = io.open = _hiding(io.open)
    builtins.open.hides_linux_calls = True


if __name__ == "__main__":
    hide()
    if sys.argv[1:] == ["--choices"]:
        from pipeline import portable
        print(portable.read_into.__name__, portable.copy_range.__name__, portable.LOCK_KIND,
              portable.lock_is_held.__name__)
        sys.exit(0)
    from pipeline.cli import main
    sys.argv[0] = "bitnet-gguf"
    sys.exit(main())
