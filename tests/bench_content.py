"""What the checkpoint content digests cost: the same conversions with and without them.

    python -m tests.bench_content --base /tmp/base-tree --workdir /tmp/bench-content [--repeats 3]
        [--checkpoints mid-packed mid-bf16-master llama3-8b-packed]

`--base` is a checkout of the converter without the digests (for instance `git archive <commit> |
tar -x -C /tmp/base-tree`); this tree is the one with them. Each checkpoint (synthetic, generated
once under --workdir) is converted by both in turn, `--repeats` times, in fresh run directories;
printed per run: wall seconds, CPU seconds of the process tree (user + system, steadier than the
wall time on a shared machine), and each stage's seconds from the manifest; medians at the end.
First, the added work alone (`added_work`), in CPU seconds; `--repeats 0` measures only that.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.synthetic import write_checkpoint  # noqa: E402

from tests.bench import CHECKPOINTS as BENCH_CHECKPOINTS  # noqa: E402

MID = dict(hidden_size=2048, intermediate_size=5632, num_layers=8, num_heads=16, num_kv_heads=4, vocab_size=32000)
CHECKPOINTS = {"mid-packed": ("llama3-1.58", MID), "mid-bf16-master": ("1bitllm", dict(MID, dtype="bf16")),
               "llama3-8b-packed": BENCH_CHECKPOINTS["llama3-8b-packed"]}  # the 8B bench's (tests/bench.py)
DEFAULT = ["mid-packed", "mid-bf16-master"]


def one_run(tree: Path, model: Path, work: Path, limit: str) -> dict:
    out = work.with_suffix(".gguf")
    shutil.rmtree(work, ignore_errors=True)
    out.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out), "--workdir", str(work),
                    "--memory-limit", limit, "--no-progress"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stages = json.loads((work / "manifest.json").read_text())["stages"]
    shutil.rmtree(work)
    out.unlink()
    return {"wall": wall, "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            **{s: stages[s]["seconds"] for s in ("extract", "quantize", "pack", "assemble")}}


def added_work(model: Path) -> dict:
    """CPU seconds of what the digests add, done alone (steady where whole conversions are not on a
    shared machine): extract's read of the packed projections (before, it read only the float
    tensors), and two xxh3 passes over every tensor byte (extract's, and the later stages'
    check; their reads themselves were there before)."""
    import xxhash
    import numpy as np

    from pipeline.safetensors_io import read_header
    from pipeline.stores import CONTENT_BLOCK

    piece = 24 * 2**20  # extract's chunks under --memory-limit 1GiB
    read_cpu = hash_cpu = 0.0
    n_bytes = packed_bytes = 0
    for f in sorted(model.glob("*.safetensors")):
        for t in read_header(f).values():
            nbytes = int(np.prod(t.shape, dtype=np.int64)) * t.np_dtype.itemsize
            for a in range(0, nbytes, piece):
                c0 = time.process_time()
                buf = np.frombuffer(pread(f, t.offset + a, min(piece, nbytes - a)), dtype=np.uint8)
                c1 = time.process_time()
                for b in range(0, len(buf), CONTENT_BLOCK):
                    xxhash.xxh3_64_hexdigest(buf[b:b + CONTENT_BLOCK])
                c2 = time.process_time()
                hash_cpu += c2 - c1
                n_bytes += len(buf)
                if t.dtype == "U8":
                    read_cpu += c1 - c0
                    packed_bytes += len(buf)
    return {"bytes": n_bytes, "packed": packed_bytes, "read_cpu": read_cpu, "hash_cpu": hash_cpu,
            "added_cpu": read_cpu + 2 * hash_cpu}


def pread(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), n, offset)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-limit", default="1GiB")
    ap.add_argument("--no-warm", dest="warm", action="store_false", help="skip the first, unmeasured conversion")
    ap.add_argument("--checkpoints", nargs="+", default=DEFAULT, choices=list(CHECKPOINTS))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    for name in args.checkpoints:
        model = args.workdir / name
        if not (model / "config.json").is_file():
            family, shape = CHECKPOINTS[name]
            write_checkpoint(model, family, **shape)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        w = added_work(model)
        print(f"{name}: added work alone: extract reads {w['packed'] / 2**30:.2f} GiB of packed bytes in "
              f"{w['read_cpu']:.2f} s CPU; xxh3 of all {w['bytes'] / 2**30:.2f} GiB in {w['hash_cpu']:.2f} s CPU, "
              f"twice: {w['added_cpu']:.2f} s CPU in all", flush=True)
        if not args.repeats:
            continue
        results = {"without": [], "with": []}
        if args.warm:
            one_run(ROOT, model, args.workdir / "warm", args.memory_limit)  # the page cache holds the checkpoint
        for _ in range(args.repeats):
            for label, tree in (("without", args.base), ("with", ROOT)):
                r = one_run(tree, model, args.workdir / f"run-{label}", args.memory_limit)
                results[label].append(r)
                print(f"{name} ({size / 2**30:.2f} GiB) {label:7s} wall {r['wall']:6.2f} s  cpu {r['cpu']:6.2f} s  "
                      + "  ".join(f"{s} {r[s]:.2f}" for s in ("extract", "quantize", "pack", "assemble")), flush=True)
        for key in ("wall", "cpu", "extract", "quantize", "assemble"):
            a = statistics.median(r[key] for r in results["without"])
            b = statistics.median(r[key] for r in results["with"])
            print(f"{name}: median {key}: without {a:.2f} s, with {b:.2f} s ({(b - a) / a * 100:+.1f}%)", flush=True)
    print(f"load average at the end: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
