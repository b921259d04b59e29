"""Benchmark: peak memory (whole process tree) and wall time of conversions, side by side
with llama.cpp's own converter on the same checkpoint.

    make bench                                   # every case below, results appended to docs/benchmarks.md
    python -m tests.bench --cases llama3-8b      # some of them
    python -m tests.bench --list

Checkpoints are synthetic (random weights, the real models' shapes) and generated once
under build/bench/. Each case converts one checkpoint with bitnet-gguf under a memory
limit and, where given, with llama.cpp's `convert_hf_to_gguf.py` (from the llama-cpp-python
sdist the tests pin; `--no-lazy` for packed checkpoints, the only mode that reads them,
through tests/reference_convert.py, which names the BPE pre-tokenizer of a synthetic
tokenizer). Results are appended to docs/benchmarks.md with the command, the machine and
every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import format_size, parse_size  # noqa: E402
from tests.peak_rss import run_measuring_peak  # noqa: E402
from tests.synthetic import write_checkpoint, write_maple_checkpoint, write_qwen35_checkpoint  # noqa: E402

RESULTS = ROOT / "docs" / "benchmarks.md"

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=128256)
# checkpoint name -> (family, shape); the real models' shapes (FORMATS.md)
CHECKPOINTS = {
    "large-f32": ("1bitllm", dict(hidden_size=1536, intermediate_size=4096, num_layers=24, num_heads=16,
                                  vocab_size=32002, dtype="f32")),
    "3B-f32": ("1bitllm", dict(hidden_size=3200, intermediate_size=8640, num_layers=26, num_heads=32,
                               vocab_size=32002, dtype="f32")),
    "llama3-8b-packed": ("llama3-1.58", dict(num_layers=32, **LLAMA3_8B)),
    "llama3-8b-packed-4l": ("llama3-1.58", dict(num_layers=4, **LLAMA3_8B)),
    "llama3-8b-packed-16l": ("llama3-1.58", dict(num_layers=16, **LLAMA3_8B)),
    "8b-bf16-master": ("1bitllm", dict(num_layers=32, dtype="bf16", **LLAMA3_8B)),
    # 1bitLLM/bitnet_b1_58-xl (config.json: hidden 2048, FFN 5460, 24 layers, 32 heads, f16, tied):
    # ffn_down's rows of 5460 values fall back to F16
    "xl-f16": ("1bitllm", dict(hidden_size=2048, intermediate_size=5460, num_layers=24, num_heads=32,
                               vocab_size=32002, dtype="f16")),
    # prism-ml/Ternary-Bonsai-8B (Qwen3-8B: hidden 4096, FFN 12288, 36 layers, 32/8 heads, head_dim 128,
    # vocab 151936, untied), fp16 projections with one scale per 128 values: Q2_0 only
    # issue 23: per-tensor cost. 1818 layers of tiny projections (11 tensors a layer, rows of 128 values:
    # the projections fall back to F16) make 20,000 tensors in 1.2 GB
    "many-tensors-20k": ("1bitllm", dict(hidden_size=128, intermediate_size=256, num_layers=1818, num_heads=2)),
    # issue 23: DeepGrove Maple 20B-A1B (ECOSYSTEM-2026.md 1d: 256 experts, 8 active, SWA-512 3:1); the widths
    # are [inference] (20B over 24 layers x 256 experts x 3 projections: hidden 2048, expert FFN 512; 16 / 4
    # heads of 128); 2 of its 24 layers (each 1.6 GB bf16 of experts), a tiny vocabulary
    "maple-20b-2l": ("maple", dict(hidden_size=2048, num_layers=2, num_heads=16, num_kv_heads=4, head_dim=128,
                                   num_experts=256, experts_per_tok=8, moe_intermediate_size=512,
                                   sliding_window=512)),
    "bonsai-8b": ("bonsai", dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                                 num_kv_heads=8, head_dim=128, vocab_size=151936)),
    # issue 22: prism-ml/Bonsai-8B-unpacked (1-bit: Qwen3-8B, fp16 {-s, +s}, one s per 128 values)
    "bonsai-8b-binary": ("bonsai", dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                                        num_kv_heads=8, head_dim=128, vocab_size=151936, binary=True)),
    # issue 22: a Ternary-Bonsai-27B-shaped qwen35 (Qwen3.5-27B: hidden 5120, FFN 17408, 24 query / 4 KV
    # heads of 256, full attention every 4th layer, vocab 248320; the delta-net's 16 key / 48 value heads
    # of 128 are [inference]), ternary embeddings and head; 16 of its 64 layers (the disk: the checkpoint
    # and llama.cpp's F16 intermediate are each 14 GB at 16 layers)
    "qwen35-27b-16l": ("qwen35", dict(hidden_size=5120, intermediate_size=17408, num_layers=16, num_heads=24,
                                      num_kv_heads=4, head_dim=256, linear_key_heads=16, linear_value_heads=48,
                                      linear_key_head_dim=128, linear_value_head_dim=128, vocab_size=248320,
                                      ternary_embeddings=True)),
}


@dataclasses.dataclass(frozen=True)
class Case:
    checkpoint: str
    out_type: str = "tq2_0"
    limit: str = "1GiB"
    extra: tuple[str, ...] = ()
    reference: str | None = None   # llama.cpp mode: "lazy" or "no-lazy" (None: not run)
    # llama.cpp's route to a type its converter cannot write: `--outtype f16`, then llama_model_quantize
    # (llama-quantize) to this file type (LLAMA_FTYPE_MOSTLY_*); the converter is then run with `reference`
    route_ftype: int | None = None
    reference_args: tuple[str, ...] = ()
    note: str = ""
    kernel_config: tuple = ()      # TL1/TL2: (m, k, bm, bk, bmm) sections written to a kernel_config.ini


# The tiles bitnet.cpp's setup_env.py gives utils/codegen_tl2.py for Llama3-8B-1.58 (BM, BK, bm per shape)
LLAMA3_8B_TL2 = ((14336, 4096, 256, 96, 32), (4096, 14336, 128, 96, 32), (1024, 4096, 256, 96, 32),
                 (4096, 4096, 128, 96, 32))


CASES = {
    "8b-master": Case("8b-bf16-master", reference="lazy"),
    "llama3-8b": Case("llama3-8b-packed", reference="no-lazy", note="the seed problem"),
    "llama3-8b-i2s": Case("llama3-8b-packed", "i2_s", extra=("--target", "x86")),
    "llama3-8b-i2s-arm": Case("llama3-8b-packed", "i2_s", extra=("--target", "arm")),
    "llama3-8b-tl2": Case("llama3-8b-packed", "tl2", kernel_config=LLAMA3_8B_TL2),
    "llama3-8b-cluster": Case("llama3-8b-packed", extra=("--cluster", "local")),
    # issue 24: a low limit must not cost time (against "llama3-8b", back to back)
    "llama3-8b-256mib": Case("llama3-8b-packed", limit="256MiB"),
    # issue 24: three outputs from one read, against the three separate conversions (llama3-8b-tq2_0-x86,
    # llama3-8b-i2s, llama3-8b-iq2bn; every file byte-identical to its separate one)
    "llama3-8b-tq2_0-x86": Case("llama3-8b-packed", "tq2_0", extra=("--target", "x86")),
    "llama3-8b-iq2bn": Case("llama3-8b-packed", "iq2_bn", extra=("--target", "x86")),
    "llama3-8b-list": Case("llama3-8b-packed", "tq2_0,i2_s,iq2_bn", extra=("--target", "x86")),
    "llama3-8b-4l": Case("llama3-8b-packed-4l"),
    "llama3-8b-16l": Case("llama3-8b-packed-16l"),
    "large": Case("large-f32", reference="lazy"),
    "3B": Case("3B-f32", reference="lazy"),
    "xl": Case("xl-f16", reference="lazy"),
    "many-tensors": Case("many-tensors-20k", limit="256MiB", note="issue 23: 20,000 tiny tensors"),
    "maple-20b": Case("maple-20b-2l", reference="lazy", note="issue 23: Maple's real widths, 256 experts, 2 layers"),
    "bonsai-8b": Case("bonsai-8b", "q2_0", note="group-scaled ternary, one scale per 128 values"),
    "bonsai-8b-q1_0": Case("bonsai-8b-binary", "q1_0", reference="lazy", route_ftype=40,
                           note="issue 22: 1-bit Bonsai; llama.cpp: f16 then llama-quantize Q1_0"),
    "qwen35-27b-q2_0": Case("qwen35-27b-16l", "q2_0", extra=("--embedding-type", "q2_0"), reference="lazy",
                            route_ftype=41, reference_args=("--no-mtp",),
                            note="issue 22: Ternary-Bonsai-27B shape; llama.cpp: f16 then llama-quantize Q2_0"),
}


def checkpoint(name: str, workdir: Path) -> Path:
    path = workdir / name
    if not (path / "config.json").is_file():
        family, shape = CHECKPOINTS[name]
        print(f"generating the {name} checkpoint in {path} ...", flush=True)
        if family == "qwen35":
            write_qwen35_checkpoint(path, **shape)
        elif family == "maple":
            write_maple_checkpoint(path, **shape)
        else:
            write_checkpoint(path, family, **shape)
    return path


def machine() -> str:
    return (f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{format_size(psutil.virtual_memory().total)} RAM, Python {platform.python_version()}")


def tree_size(path: Path) -> int:
    """Bytes of the files under `path`, a file with several hard links (pack.zarr's links to
    quantize's code chunks) counted once: what the run directory takes on disk."""
    if path.is_file():
        return path.stat().st_size
    seen = {}
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def run_ours(case: Case, model: Path, workdir: Path) -> dict:
    several = "," in case.out_type  # -o names a directory that receives <model>-<TYPE>.gguf per type
    out = workdir / (f"{case.checkpoint}-{case.out_type.replace(',', '+')}" + ("" if several else ".gguf"))
    work = out.with_name(out.name + ".work")
    for p in (out, work):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    if several:
        out.mkdir()
    extra = list(case.extra)
    if case.kernel_config:
        ini = workdir / f"{case.checkpoint}-{case.out_type}-kernel_config.ini"
        ini.write_text("\n".join(f"[Kernels_{i}]\nm = {m}\nk = {k}\nbm = {a}\nbk = {b}\nbmm = {c}\n"
                                 for i, (m, k, a, b, c) in enumerate(case.kernel_config)))
        extra += ["--kernel-config", str(ini)]
    cmd = [sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out), "--type", case.out_type,
           "--memory-limit", case.limit, "--no-progress", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = run_measuring_peak(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, interval=0.05)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the CPU of the process tree: a shared machine's
    r["cpu"] = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime  # wall time is not
    r["output"] = tree_size(out) if several else sum(tree_size(p) for p in out.parent.glob(out.stem + "*.gguf"))
    r["workdir"] = tree_size(work) if work.exists() else 0
    r["stages"] = stage_figures(work)
    for p in (out, work):  # keep the disk free for the next run
        subprocess.run(["rm", "-rf", str(p)], check=True)
    return r


def stage_figures(work: Path) -> str:
    """Each stage's seconds (from the manifest) and the bytes its store holds on disk."""
    import json

    try:
        manifest = json.loads((work / "manifest.json").read_text())
        stages = manifest["stages"]
    except (OSError, ValueError, KeyError):
        return ""
    parts = []
    for stage in ("extract", "quantize", "pack", "assemble"):
        if stage not in stages and manifest.get("outputs"):
            continue  # several --type: each output's pack and assemble below
        seconds = stages.get(stage, {}).get("seconds")
        store = work / f"{stage}.zarr"
        held = f", {format_size(tree_size(store))}" if store.is_dir() else ""
        parts.append(f"{stage} {seconds if seconds is not None else '?'} s{held}")
    for tag, record in (manifest.get("outputs") or {}).items():
        parts.append(f"{tag}: " + ", ".join(f"{stage} {record.get('stages', {}).get(stage, {}).get('seconds', '?')} s"
                                            for stage in ("pack", "assemble")))
    return "; ".join(parts)


def run_reference(case: Case, model: Path, workdir: Path, python: str, src: Path) -> dict:
    """llama.cpp's converter (through tests/reference_convert.py, which names the synthetic BPE
    tokenizer's pre-tokenizer); with `route_ftype`, its F16 file then goes through llama.cpp's own
    quantizer, and the figures are the route's: the larger peak, the summed time, the F16 file as
    the largest intermediate."""
    out_type = "f16" if case.route_ftype is not None else case.out_type
    out = workdir / f"{case.checkpoint}-{out_type}-llamacpp.gguf"
    cmd = [python, str(ROOT / "tests" / "reference_convert.py"), str(src), "llama-bpe", str(model),
           "--outtype", out_type, "--outfile", str(out), *case.reference_args]
    if case.reference == "no-lazy":
        cmd.append("--no-lazy")
    r = run_measuring_peak(cmd, interval=0.05)
    r["output"] = tree_size(out) if out.exists() else 0
    r["workdir"] = 0
    if case.route_ftype is not None and r["exit"] == 0:
        final = workdir / f"{case.checkpoint}-{case.out_type}-llamacpp.gguf"
        q = run_measuring_peak([sys.executable, "-c", QUANTIZE, str(out), str(final), str(case.route_ftype)],
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, interval=0.05)
        r = {"exit": q["exit"], "peak": max(r["peak"], q["peak"]), "seconds": r["seconds"] + q["seconds"],
             "stderr": q["stderr"], "output": tree_size(final) if final.exists() else 0, "workdir": 0,
             "intermediate": r["output"], "steps": f"convert {r['seconds']:.0f} s, quantize {q['seconds']:.0f} s"}
        final.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    return r


# llama-quantize's own call (llama_model_quantize), every thread, as `llama-quantize F16 OUT TYPE` runs it
QUANTIZE = """import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=sorted(CASES))
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench")
    ap.add_argument("--reference-python", default=str(ROOT / "build" / "llama.cpp-convert" / "venv" / "bin" / "python"),
                    help="Python with torch and transformers for llama.cpp's converter (make reference-converter)")
    ap.add_argument("--reference-src", type=Path, default=ROOT / "build" / "llama.cpp-convert" / "src")
    ap.add_argument("--no-reference", action="store_true", help="skip llama.cpp's converter")
    ap.add_argument("--free-disk", action="store_true",
                    help="delete each generated checkpoint after its last case (the whole set needs ~40 GB)")
    args = ap.parse_args(argv)
    if args.list:
        for name, c in CASES.items():
            print(f"{name}: {c.checkpoint} -> {c.out_type} under {c.limit} {' '.join(c.extra)}"
                  f"{'; llama.cpp ' + c.reference if c.reference else ''}")
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()
    rows = []
    last_use = {CASES[name].checkpoint: name for name in args.cases}
    for name in args.cases:
        case = CASES[name]
        model = checkpoint(case.checkpoint, args.workdir)
        size = tree_size(model)
        r = run_ours(case, model, args.workdir)
        who = f"bitnet-gguf --memory-limit {case.limit} {' '.join(case.extra)}".strip()
        rows.append((name, case, size, who, r, parse_size(case.limit)))
        print(f"{name}: ours: exit {r['exit']}, peak {format_size(r['peak'])}, {r['seconds']:.0f} s", flush=True)
        if r["exit"]:
            print(r["stderr"], flush=True)
        if case.reference and not args.no_reference and (args.reference_src / "convert_hf_to_gguf.py").is_file():
            r = run_reference(case, model, args.workdir, args.reference_python, args.reference_src)
            who = f"llama.cpp convert_hf_to_gguf.py{' --no-lazy' if case.reference == 'no-lazy' else ''}"
            if case.route_ftype is not None:
                who += f" --outtype f16, then llama-quantize (file type {case.route_ftype})"
            rows.append((name, case, size, who, r, None))
            print(f"{name}: llama.cpp: exit {r['exit']}, peak {format_size(r['peak'])}, {r['seconds']:.0f} s", flush=True)
            if r["exit"]:
                print(r["stderr"], flush=True)
        if args.free_disk and last_use[case.checkpoint] == name:
            subprocess.run(["rm", "-rf", str(model)], check=True)

    command = "python -m tests.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [f"\n## {datetime.date.today().isoformat()}\n",
             f"Command: `{command.strip()}`  ", f"Machine: {machine()}  ",
             "Load average (1, 5, 15 min; other processes share the cores when above about 0.5): "
             f"{' '.join(f'{x:.1f}' for x in load_before)} at the start, "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end\n",
             "| case | checkpoint | safetensors | converter | type | exit | peak RSS (process tree) | limit | "
             "wall time | output | run directory |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, case, size, who, r, limit in rows:
        lines.append(f"| {name} | {case.checkpoint} | {format_size(size)} | {who} | {case.out_type.upper()} | "
                     f"{r['exit']} | {format_size(r['peak'])} | {format_size(limit) if limit else '-'} | "
                     f"{r['seconds']:.0f} s | {format_size(r['output'])} | "
                     f"{format_size(r['workdir']) if r['workdir'] else '-'} |")
    lines.append("")
    for name, case, size, who, r, limit in rows:
        if r.get("workdir"):
            lines.append(f"- {name}: CPU (user + sys of the process tree) {r['cpu']:.1f} s; run directory "
                         f"{r['workdir'] / size:.2f}x the checkpoint; {r.get('stages', '')}")
        if r.get("intermediate"):
            lines.append(f"- {name}: {who}: F16 intermediate {format_size(r['intermediate'])}; {r['steps']}")
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["exit"] == 0 for *_, r, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
