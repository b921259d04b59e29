"""Overlap of transfer and compute for a remote source, at a small scale: one synthetic checkpoint
converted from its directory, then from tests/remote_server.py throttled to RATE MiB/s over all
connections; prints both times, the bytes fetched, the bare transfer time of those bytes and the
ratio (remote time / bare transfer time), and checks that both outputs are the same bytes.

    python -m tests.bench_remote [--rate 20] [--workdir build/bench-remote]
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.remote_server import CheckpointServer  # noqa: E402
from tests.synthetic import write_checkpoint  # noqa: E402

MiB = 1024**2


def timed_convert(model, out: Path, limit: str) -> tuple[float, str]:
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out), "--no-progress",
                        "--memory-limit", limit], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    stages = ", ".join(line.split(": done in ")[0] + " " + line.split(": done in ")[1]
                       for line in r.stderr.splitlines() if ": done in " in line)
    return time.monotonic() - started, stages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=20.0, help="MiB/s of the throttled server")
    ap.add_argument("--limit", default="1GiB", help="--memory-limit of both conversions")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench-remote")
    args = ap.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    model = write_checkpoint(args.workdir / "model", "1bitllm", hidden_size=1024, intermediate_size=2048,
                             num_layers=4, num_heads=8, vocab_size=32768, dtype="bf16")
    size = sum(p.stat().st_size for p in model.iterdir())
    local, local_stages = timed_convert(model, args.workdir / "local.gguf", args.limit)
    server = CheckpointServer(model)
    server.throttle = int(args.rate * MiB)
    try:
        remote, remote_stages = timed_convert(server.dir_url, args.workdir / "remote.gguf", args.limit)
        fetched = sum(e["sent"] for e in server.log)
    finally:
        server.close()
    bare = fetched / server.throttle
    same = filecmp.cmp(args.workdir / "local.gguf", args.workdir / "remote.gguf", shallow=False)
    print(f"checkpoint {size / MiB:.0f} MiB; local {local:.1f} s; remote at {args.rate:g} MiB/s {remote:.1f} s; "
          f"fetched {fetched / MiB:.0f} MiB, bare transfer {bare:.1f} s, ratio {remote / bare:.2f}; "
          f"same bytes: {same}\nstages, local: {local_stages}\nstages, remote: {remote_stages}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
