"""`bitnet-gguf inspect`: what is inside a run directory, tensor by tensor.

Reads only the stores' metadata and chunk listings, plus (with --codes) the
ternary codes chunk by chunk to count -1 / 0 / +1.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.rundir import STAGES, RunDir
from pipeline.stores import open_store, row_ranges, written_chunks
from stages.quantize import codes_of


def code_shares(arr) -> dict[str, float]:
    """Share of -1, 0 and +1 among the written codes of one quantize.zarr array (chunk by
    chunk; chunks not yet written are skipped rather than read as their fill value)."""
    counts = np.zeros(3, dtype=np.int64)
    written = written_chunks(arr)
    for i, (r0, r1) in enumerate(row_ranges(arr.shape[0], arr.chunks[0])):
        if i in written:
            counts += np.bincount(codes_of(arr, r0, r1).ravel().astype(np.int64) + 1, minlength=3)[:3]
    total = max(int(counts.sum()), 1)
    return {"-1": counts[0] / total, "0": counts[1] / total, "+1": counts[2] / total}


def describe(run: RunDir, codes: bool = False) -> dict:
    report = {"run_directory": str(run.path), "manifest": run.load(), "stores": {}}
    for stage in STAGES[:-1]:
        path = run.store(stage)
        if not path.is_dir():
            continue
        group = open_store(path, "r")
        tensors = {}
        for name in group.attrs.get("tensor_order", []):
            if name not in group:
                tensors[name] = {"state": "not created"}
                continue
            arr = group[name]
            n_chunks = math.ceil(arr.shape[0] / arr.chunks[0])
            info = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": f"{len(written_chunks(arr))}/{n_chunks}",
                    **{k: v for k, v in arr.attrs.asdict().items() if k in
                       ("role", "source_dtype", "absmean", "scale", "type_name")}}
            if codes and stage == "quantize" and arr.attrs.get("role") == "ternary" and written_chunks(arr):
                shares = code_shares(arr)
                if len(written_chunks(arr)) < n_chunks:
                    info["shares_of_written_chunks_only"] = True
                info["shares"] = shares
                info["sparsity"] = shares["0"]
            tensors[name] = info
        report["stores"][stage] = {"path": str(path), "tensors": tensors}
    return report


def format_report(report: dict) -> str:
    lines = [f"run directory: {report['run_directory']}"]
    for stage, store in report["stores"].items():
        lines.append(f"\n{stage}.zarr")
        for name, t in store["tensors"].items():
            if "shape" not in t:
                lines.append(f"  {name:<28} {t['state']}")
                continue
            extra = []
            if stage == "extract" and "source_dtype" in t:
                extra.append(f"source {t['source_dtype']}")
            if "type_name" in t:
                extra.append(t["type_name"])
            if "scale" in t:
                extra.append(f"scale {t['scale']:.6g}")
            if "shares" in t:
                s = t["shares"]
                partial = " (written chunks only)" if t.get("shares_of_written_chunks_only") else ""
                extra.append(f"-1/0/+1 {s['-1']:.1%}/{s['0']:.1%}/{s['+1']:.1%}{partial}")
            lines.append(f"  {name:<28} {'x'.join(map(str, t['shape'])):>12} {t['dtype']:<7} "
                         f"chunks {t['chunks']:<7} {'  '.join(extra)}")
    return "\n".join(lines)
