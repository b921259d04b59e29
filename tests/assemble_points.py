"""Run the CLI under an audit hook that kills it, or measures the disk, at chosen moments of --low-disk's assemble.

    python -m tests.assemble_points KIND N SIGNAL WATCH_DIR REPORT -- convert ...

The hook counts the events KIND names and, at the N-th, kills the process (SIGKILL, or SIGTERM
raised in the thread making the call: the call is not made) or, with SIGNAL 0, writes the bytes
the files under WATCH_DIR hold to REPORT (the peak so far) at each of them and carries on.
KIND: "rmtree" (removing a code chunk directory), "read" (os.open of a pack.zarr chunk for reading,
as assemble reads them, once the first tensor is recorded: assemble's threads read the next chunks
while the current ones are written, so the first codes may be read before the float tensors before
them are recorded), "record" (a manifest write once the temporary output is made: the first is
the first tensor's record), "publish" (the rename of the temporary output into place), "done" (the
manifest write after that rename, which says assemble is done), "measure" (every removal of a code
chunk directory and the rename into place). The hook reads its arguments at run time only, so the
command can be forked from tests/cli_server.py's server (tests/conftest.py run_cli) like any other.
"""
from __future__ import annotations

import os
import signal
import sys

from tests.peak_rss import file_bytes


def install(kind: str, n: int, sig: int, watch: str, report: str) -> None:
    seen = [0, 0]

    def matches(event, args):
        if kind == "record" and event == "open":  # a manifest write once the temporary output exists
            path = str(args[0])
            if os.path.dirname(path) == watch and path.endswith(".partial"):
                seen[1] = 1
            return seen[1] == 1 and path.endswith("manifest.json.tmp")
        if kind in ("rmtree", "measure") and event == "shutil.rmtree":
            return str(args[0]).endswith("/c") and (".zarr/" in str(args[0]))
        if kind in ("publish", "measure", "done") and event == "os.rename":  # the output's temporary name
            published = os.path.dirname(str(args[0])) == watch and str(args[0]).endswith(".partial")
            seen[1] = seen[1] or (published and kind == "done")
            return published and kind != "done"
        if kind == "done" and event == "open":  # the manifest written after the rename into place
            return seen[1] == 1 and str(args[0]).endswith("manifest.json.tmp")
        if kind == "read" and event == "os.rename" and str(args[0]).endswith("manifest.json.tmp"):
            # a manifest saved once the temporary output exists: a record
            seen[1] = seen[1] or any(f.endswith(".partial") for f in os.listdir(watch))
            return False
        if kind == "read" and seen[1] and event == "open" and args[1] is None and isinstance(args[2], int):
            path = str(args[0])
            return "/pack.zarr/" in path and "/c/" in path and (args[2] & 3) == os.O_RDONLY
        return False

    def hook(event, args):
        if not matches(event, args):
            return
        seen[0] += 1
        if sig == 0:
            seen[1] = max(seen[1], file_bytes([watch]))
            with open(report, "w") as f:
                f.write(str(seen[1]))
            return
        if seen[0] == n:
            if sig == signal.SIGKILL:
                os.kill(os.getpid(), signal.SIGKILL)
            signal.raise_signal(sig)

    sys.addaudithook(hook)


def main() -> int:
    kind, n, sig, watch, report = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    argv = sys.argv[sys.argv.index("--") + 1:]
    install(kind, n, sig, watch, report)
    from pipeline.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
