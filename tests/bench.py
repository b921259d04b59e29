"""Benchmark: peak memory (whole process tree) and wall time of a conversion,
side by side with llama.cpp's own converter on the same checkpoint.

    make bench                                  # bitnet_b1_58-large and -3B shapes
    python -m tests.bench --shapes large --memory-limit 2GiB

Checkpoints are synthetic (random weights, real shapes) and generated once under
build/bench/. Results are appended to docs/benchmarks.md with the command, the
machine and the figures.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import format_size, parse_size  # noqa: E402
from tests.synthetic import write_bitnet_checkpoint  # noqa: E402
from tests.peak_rss import run_measuring_peak  # noqa: E402

# the real models' shapes (FORMATS.md): hidden, intermediate, layers, heads, vocab
SHAPES = {
    "large": dict(hidden_size=1536, intermediate_size=4096, num_layers=24, num_heads=16, vocab_size=32002),
    "3B": dict(hidden_size=3200, intermediate_size=8640, num_layers=26, num_heads=32, vocab_size=32002),
}
RESULTS = ROOT / "docs" / "benchmarks.md"


def checkpoint(shape: str, workdir: Path) -> Path:
    path = workdir / f"bitnet-{shape}-f32"
    if not (path / "config.json").is_file():
        print(f"generating the {shape} checkpoint in {path} ...", flush=True)
        write_bitnet_checkpoint(path, dtype="f32", **SHAPES[shape])
    return path


def machine() -> str:
    return (f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{format_size(psutil.virtual_memory().total)} RAM, Python {platform.python_version()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["large", "3B"], choices=sorted(SHAPES))
    ap.add_argument("--memory-limit", nargs="+", default=["4GiB", "1GiB"], help="limits to run ours under")
    ap.add_argument("--type", default="tq2_0")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench")
    ap.add_argument("--reference-python", default=str(ROOT / "build" / "llama.cpp-convert" / "venv" / "bin" / "python"),
                    help="Python with torch and transformers for llama.cpp's converter (make reference-converter)")
    ap.add_argument("--reference-converter", type=Path,
                    default=ROOT / "build" / "llama.cpp-convert" / "src" / "convert_hf_to_gguf.py")
    ap.add_argument("--no-reference", action="store_true", help="skip llama.cpp's converter")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    rows = []
    for shape in args.shapes:
        model = checkpoint(shape, args.workdir)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        for limit in args.memory_limit:
            out = args.workdir / f"{shape}-{limit}.gguf"
            for p in (out, out.with_name(out.name + ".work")):
                subprocess.run(["rm", "-rf", str(p)], check=True)
            cmd = [sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out), "--type", args.type,
                   "--memory-limit", limit, "--no-progress"]
            r = run_measuring_peak(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, interval=0.05)
            rows.append((shape, size, f"bitnet-gguf --memory-limit {limit}", r, parse_size(limit)))
            print(f"{shape}: ours under {limit}: exit {r['exit']}, peak {format_size(r['peak'])}, {r['seconds']:.0f} s",
                  flush=True)
            if r["exit"]:
                print(r["stderr"], flush=True)
            for p in (out, out.with_name(out.name + ".work")):  # keep the disk free for the next run
                subprocess.run(["rm", "-rf", str(p)], check=True)
        if not args.no_reference and args.reference_converter.is_file():
            out = args.workdir / f"{shape}-llamacpp.gguf"
            cmd = [args.reference_python, str(args.reference_converter), str(model), "--outtype", args.type,
                   "--outfile", str(out)]
            r = run_measuring_peak(cmd, interval=0.05)
            rows.append((shape, size, "llama.cpp convert_hf_to_gguf.py", r, None))
            print(f"{shape}: llama.cpp: exit {r['exit']}, peak {format_size(r['peak'])}, {r['seconds']:.0f} s", flush=True)
            if r["exit"]:
                print(r["stderr"], flush=True)
            out.unlink(missing_ok=True)

    command = "python -m tests.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [f"\n## {datetime.date.today().isoformat()}: {args.type.upper()}\n",
             f"Command: `{command.strip()}`  ", f"Machine: {machine()}\n",
             "| checkpoint | safetensors | converter | exit | peak RSS (process tree) | limit | wall time |",
             "|---|---|---|---|---|---|---|"]
    for shape, size, who, r, limit in rows:
        lines.append(f"| {shape} f32 | {format_size(size)} | {who} | {r['exit']} | {format_size(r['peak'])} | "
                     f"{format_size(limit) if limit else '-'} | {r['seconds']:.0f} s |")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmarks\n\nPeak RSS is the sum over the converter's whole process tree, "
                           "sampled every 50 ms with psutil (file pages of read() calls are not counted; mmap'd "
                           "pages a process touches are).\n")
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["exit"] == 0 for *_, r, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
