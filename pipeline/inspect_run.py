"""`bitnet-gguf inspect`: what is inside a run directory, tensor by tensor.

- `inspect WORKDIR`: every tensor of every store (shape, dtype, chunks written, scale and its
  granularity: per tensor, row or group, GGML type; with --codes the share of -1 / 0 / +1).
- `inspect WORKDIR TENSOR`: one tensor across the stores (recipe, source, chunk layout,
  scales, GGML type and byte size; with --codes its shares and sparsity).
- `inspect WORKDIR --plot FILE`: a figure of every layer and projection: the scale
  (and absmean; for scales per row or group, their median and range), the shares of -1 / 0 / +1,
  for master-weight checkpoints a histogram of |W| / absmean over sampled rows with the rounding
  thresholds, for per-row scaled checkpoints the scale of every row of the middle layer, and for
  a mixture of experts each expert's median row scale by layer and the middle layer's stacks as
  pictures of every row of every expert.

Only what is written is read: a missing store, an array not yet created or a chunk
not yet on disk is skipped (and reported as such). A store or array whose zarr.json cannot be
read (or holds attributes of the wrong type) is shown as damaged and the rest is shown; the
command then says the run directory is damaged in one line on stderr and exits 2, as a
conversion does for a damaged store. Codes are read chunk by chunk and
the histogram reads a few rows of a few chunks, so memory stays at one chunk.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from pipeline.errors import OptionError, RunDirError
from pipeline.rundir import STAGES, RunDir, checkpoint_state
from pipeline.safetensors_io import as_float32
from pipeline.stores import is_indexed, open_store, read_rows, row_ranges, written_chunks
from stages.quantize import BLOCK_SCALES_SUFFIX

# projection kinds in drawing order: short label -> the middle of the GGUF name blk.N.<...>.weight
PROJECTIONS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
_KIND_OF = {gguf: kind for kind, gguf in PROJECTIONS.items()}
_PROJECTION_NAME = re.compile(r"^blk\.(\d+)\.(" + "|".join(PROJECTIONS.values()) + r")\.weight$")
# a mixture of experts' stacks (pipeline.families.expert_name: one tensor per expert in the stores)
EXPERT_STACKS = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
_EXPERT_KIND_OF = {gguf: kind for kind, gguf in EXPERT_STACKS.items()}
_EXPERT_NAME = re.compile(r"^blk\.(\d+)\.(" + "|".join(EXPERT_STACKS.values()) + r")\.weight\.(\d+)$")

TERNARY_ROLE = "ternary"
MASTER = "master"
STORE_STAGES = STAGES[:-1]  # assemble writes the GGUF file, not a store

# histogram of |W| / absmean: range, bins, and how much of the checkpoint it samples
HIST_MAX = 3.0
HIST_BINS = 60
THRESHOLDS = (0.5, 1.5)        # |W|/absmean rounds to 0 below 0.5, to 1 up to 1.5, clipped to 1 above
SAMPLE_TENSORS = 4             # layers sampled per projection kind
SAMPLE_CHUNKS = 2              # written row chunks read per sampled tensor
SAMPLE_ROWS = 16               # rows read from each of those chunks
SHARE_SPAN = 0.05              # share maps colour at least +-5 points around the median
ANNOTATE_MAX_LAYERS = 16       # write the percentages into the share maps up to this many layers


def parse_projection(name: str) -> tuple[int, str] | None:
    """(layer, kind) of a GGUF projection name such as blk.3.ffn_up.weight, else None."""
    m = _PROJECTION_NAME.match(name)
    return (int(m.group(1)), _KIND_OF[m.group(2)]) if m else None


def parse_expert(name: str) -> tuple[int, str, int] | None:
    """(layer, kind, expert) of an expert's tensor such as blk.3.ffn_up_exps.weight.7, else None."""
    m = _EXPERT_NAME.match(name)
    return (int(m.group(1)), _EXPERT_KIND_OF[m.group(2)], int(m.group(3))) if m else None


def store_path(run: RunDir, stage: str) -> Path:
    """The store of `stage`, a stage name or "pack-<TYPE>" (one output's own pack store, several --type)."""
    base, _, tag = stage.partition("-")
    return run.store(base, tag or None)


def open_stores(run: RunDir, damaged: list[str] | None = None) -> dict:
    """The stores of a run directory that exist, by stage (one output's own pack store of several
    --type as "pack-<TYPE>"); a store whose group metadata cannot be read is left out and its
    problem appended to `damaged`."""
    stores = {}
    for stage in (*STORE_STAGES, *(f"pack-{t}" for t in run.tags())):
        path = store_path(run, stage)
        if not path.is_dir():
            continue
        try:
            group = open_store(path, "r")
            order = group.attrs.get("tensor_order", [])
            if not (isinstance(order, list) and all(isinstance(n, str) for n in order)):
                raise TypeError(f"attribute tensor_order is {type(order).__name__}, not a list of names")
        except Exception as e:  # noqa: BLE001 - zarr raises many kinds for a metadata file it cannot parse
            if damaged is None:
                raise
            damaged.append(f"{path / 'zarr.json'}: unreadable: {_one_line(e)}")
            continue
        stores[stage] = group
    return stores


# What inspect reads from an array's attributes, and the JSON types they must have
_ATTR_TYPES = {"role": str, "source_dtype": str, "type_name": str, "hf_name": str, "source_file": str,
               "code_layout": str, "out_type": str, "scale": (int, float, type(None)),
               "absmean": (int, float, type(None)), "recipe": dict, "shape": list, "ggml_type": int,
               "scale_granularity": str}
DAMAGED = "damaged"


def open_member(run: RunDir, stage: str, group, name: str, damaged: list[str]):
    """`group[name]` when its zarr.json reads as an array whose attributes inspect can show; None
    when the array is not created; DAMAGED (the reason appended to `damaged`) otherwise."""
    import zarr

    meta = store_path(run, stage) / name / "zarr.json"
    if not os.path.lexists(meta):
        return None
    try:
        arr = group[name]
        if not isinstance(arr, zarr.Array):
            raise TypeError(f"a {type(arr).__name__}, not an array")
        attrs = arr.attrs.asdict()
        if not (len(arr.chunks) == len(arr.shape) and all(c > 0 for c in arr.chunks)):
            raise ValueError(f"chunks {arr.chunks} do not fit shape {arr.shape}")
        for key, kind in _ATTR_TYPES.items():
            if key in attrs and (not isinstance(attrs[key], kind) or isinstance(attrs[key], bool)):
                raise TypeError(f"attribute {key} is {type(attrs[key]).__name__}")
    except Exception as e:  # noqa: BLE001 - zarr raises many kinds for a metadata file it cannot parse
        damaged.append(f"{meta}: unreadable: {_one_line(e)}")
        return DAMAGED
    return arr


def _one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:160]


def damage_error(run: RunDir, damaged: list[str]) -> RunDirError:
    """The one line for what inspect found damaged (it has shown the rest)."""
    more = f", and {len(damaged) - 1} more damaged file(s)" if len(damaged) > 1 else ""
    return RunDirError(f"{run.path}: the run directory is damaged ({damaged[0]}{more}); delete it and convert again")


def chunk_count(arr) -> int:
    return math.ceil(arr.shape[0] / arr.chunks[0]) if arr.shape[0] else 0


def is_ternary(arr) -> bool:
    return arr.attrs.get("role") == TERNARY_ROLE


# -- counting codes ------------------------------------------------------------------------------

@dataclasses.dataclass
class CodeCounts:
    counts: np.ndarray   # int64 [n(-1), n(0), n(+1)] over the written chunks
    written: int         # chunks counted
    total: int           # chunks of the array

    @property
    def shares(self) -> dict[str, float]:
        n = max(int(self.counts.sum()), 1)
        return {"-1": self.counts[0] / n, "0": self.counts[1] / n, "+1": self.counts[2] / n}


def count_codes(arr) -> CodeCounts:
    """-1 / 0 / +1 counts of a quantize.zarr ternary array, chunk by chunk, written chunks only
    (a chunk not yet written would read as its fill value)."""
    from stages.quantize import codes_of

    counts = np.zeros(3, dtype=np.int64)
    written = written_chunks(arr)
    for i, (r0, r1) in enumerate(row_ranges(arr.shape[0], arr.chunks[0])):
        if i in written:
            codes = codes_of(arr, r0, r1)
            nonzero = np.count_nonzero(codes)
            negative = np.count_nonzero(codes < 0)
            counts += (negative, codes.size - nonzero, nonzero - negative)
    return CodeCounts(counts, len(written), chunk_count(arr))


def code_shares(arr) -> dict[str, float]:
    """Share of -1, 0 and +1 among the written codes of one quantize.zarr array."""
    return count_codes(arr).shares


def _codes_info(arr) -> dict:
    c = count_codes(arr)
    info = {"shares": c.shares, "sparsity": c.shares["0"], "codes_counted": int(c.counts.sum())}
    if c.written < c.total:
        info["shares_of_written_chunks_only"] = True
    return info


# -- every tensor ---------------------------------------------------------------------------------

def describe(run: RunDir, codes: bool = False) -> dict:
    manifest = run.load()
    damaged: list[str] = []
    report = {"run_directory": str(run.path), "manifest": manifest, "checkpoint": checkpoint_state(manifest),
              "stores": {}}
    for stage, group in open_stores(run, damaged).items():
        tensors = {}
        for name in group.attrs.get("tensor_order", []):
            arr = open_member(run, stage, group, name, damaged)
            if arr is None:
                tensors[name] = {"state": "not created"}
                continue
            if arr is DAMAGED:
                tensors[name] = {"state": DAMAGED, "problem": damaged[-1]}
                continue
            written = written_chunks(arr)
            info = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": f"{len(written)}/{chunk_count(arr)}",
                    **({"in_checkpoint": True} if is_indexed(arr) else {}),
                    **{k: v for k, v in arr.attrs.asdict().items() if k in
                       ("role", "source_dtype", "absmean", "scale", "scale_granularity", "type_name")}}
            if codes and stage == "quantize" and is_ternary(arr) and written:
                info.update(_codes_info(arr))
            tensors[name] = info
        report["stores"][stage] = {"path": str(store_path(run, stage)), "tensors": tensors,
                                   **{k: v for k, v in group.attrs.asdict().items()
                                      if k in ("out_type", "target", "kernel_tiles") and stage.startswith("pack")}}
    if damaged:
        report["damaged"] = damaged
    return report


def layout_line(store: dict) -> str | None:
    """What pack.zarr was laid out for: "layout: I2_S for bitnet.cpp's ARM builds"."""
    from pipeline.outtypes import OUTPUT_TYPES, TARGET_NAMES

    out = OUTPUT_TYPES.get(store.get("out_type", ""))
    if out is None:
        return None
    line = f"  layout: {out.codec.name}"
    if store.get("target"):
        line += f" for bitnet.cpp's {TARGET_NAMES.get(store['target'], store['target'])} builds (target {store['target']})"
    if store.get("kernel_tiles"):
        line += "; kernel tiles (m, k: bm bk bmm) " + ", ".join(f"{m}x{k}: {a} {b} {c}"
                                                               for m, k, a, b, c in store["kernel_tiles"])
    return line


def format_report(report: dict) -> str:
    lines = [f"run directory: {report['run_directory']}"]
    for problem in report.get("damaged", []):
        if "/zarr.json: " in problem and problem.split("/zarr.json: ")[0].endswith(".zarr"):
            lines.append(f"damaged store: {problem}")
    if report.get("checkpoint"):
        source = report["checkpoint"]
        lines.append(f"checkpoint: {source['path']} ({source['state']}: {source['message']})")
    for stage, store in report["stores"].items():
        lines.append(f"\n{stage}.zarr")
        if stage.startswith("pack") and (layout := layout_line(store)):
            lines.append(layout)
        for name, t in store["tensors"].items():
            if "shape" not in t:
                lines.append(f"  {name:<28} {t['state']}" + (f": {t['problem']}" if "problem" in t else ""))
                continue
            extra = []
            if stage == "extract" and "source_dtype" in t:
                extra.append(f"source {t['source_dtype']}")
            if "type_name" in t:
                extra.append(t["type_name"])
            if t.get("in_checkpoint"):
                extra.append("bytes in the checkpoint")
            if t.get("scale") is not None:
                extra.append(f"scale {t['scale']:.6g}")
            if t.get("scale_granularity") not in (None, "tensor"):
                extra.append(f"scale per {t['scale_granularity']}")
            if "shares" in t:
                extra.append(_format_shares(t))
            lines.append(f"  {name:<28} {'x'.join(map(str, t['shape'])):>12} {t['dtype']:<7} "
                         f"chunks {t['chunks']:<7} {'  '.join(extra)}")
    return "\n".join(lines)


def _format_shares(t: dict) -> str:
    s = t["shares"]
    partial = " (written chunks only)" if t.get("shares_of_written_chunks_only") else ""
    return f"-1/0/+1 {s['-1']:.1%}/{s['0']:.1%}/{s['+1']:.1%}{partial}"


# -- one tensor ------------------------------------------------------------------------------------

def _store_info(stage: str, arr) -> dict:
    attrs = arr.attrs.asdict()
    written = written_chunks(arr)
    info = {"stored_shape": list(arr.shape), "dtype": str(arr.dtype), "rows_per_chunk": arr.chunks[0],
            "chunks": chunk_count(arr), "chunks_written": len(written)}
    if is_indexed(arr):
        info["in_checkpoint"] = True
    for key in ("code_layout", "scale", "absmean", "scale_granularity"):
        if key in attrs:
            info[key] = attrs[key]
    if stage.startswith("pack") and "ggml_type" in attrs:
        from stages.assemble import array_layout

        info["ggml_type"] = attrs["ggml_type"]
        info["type_name"] = attrs.get("type_name")
        try:
            out, tiles = array_layout(arr)
        except KeyError:
            out = tiles = None
        if out is not None:
            info["nbytes"] = out.nbytes(tuple(attrs.get("shape", arr.shape)), tiles)
            if out.target:
                info["target"] = out.target
            if tiles:
                info["tiles"] = list(tiles)
    return info


TENSOR_FIELDS = ("shape", "role", "hf_name", "source_file", "source_dtype", "recipe")


def describe_tensor(run: RunDir, name: str, codes: bool = False) -> dict:
    """One tensor across the stores; RunDirError if no store lists it."""
    damaged: list[str] = []
    stores = open_stores(run, damaged)
    found = {stage: group for stage, group in stores.items() if name in group.attrs.get("tensor_order", [])}
    if not found:
        if damaged:
            raise damage_error(run, damaged)
        raise RunDirError(f"{run.path}: no tensor {name!r} in this run directory; "
                          f"run `bitnet-gguf inspect {run.path}` to list the names")
    fields: dict = {}
    per_store: dict = {}
    codes_info: dict = {}
    for stage, group in found.items():
        arr = open_member(run, stage, group, name, damaged)
        if arr is None:
            per_store[stage] = {"state": "not created"}
            continue
        if arr is DAMAGED:
            per_store[stage] = {"state": DAMAGED, "problem": damaged[-1]}
            continue
        for key, value in arr.attrs.asdict().items():  # extract's attributes first: the GGUF shape, the source
            if key in TENSOR_FIELDS:
                fields.setdefault(key, value)
        per_store[stage] = _store_info(stage, arr)
        if codes and stage == "quantize" and is_ternary(arr):
            codes_info = _codes_info(arr) if written_chunks(arr) else {"codes": "no chunk written yet"}
    if "shape" not in fields:  # neither extract nor pack written: the quantize array's rows and columns
        fields["shape"] = next((s["stored_shape"] for s in per_store.values() if "stored_shape" in s), None)
    recipe = fields.get("recipe") or {}
    return {"run_directory": str(run.path), "tensor": name, "checkpoint": checkpoint_state(run.load()),
            **{k: fields[k] for k in TENSOR_FIELDS if fields.get(k) is not None},
            **({"weight_scale": recipe["weight_scale"]} if recipe.get("weight_scale") is not None else {}),
            "stores": per_store, **codes_info, **({"damaged": damaged} if damaged else {})}


def format_tensor(report: dict) -> str:
    lines = [f"{report['tensor']}  (run directory {report['run_directory']})"]

    def row(label: str, value) -> None:
        lines.append(f"  {label:<14} {value}")

    source = report.get("checkpoint")
    if source and source["state"] != "unchanged":
        row("checkpoint", f"{source['state']}: {source['message']}")
    if "shape" in report:
        row("shape", " x ".join(map(str, report["shape"])))
    if "role" in report:
        row("role", report["role"])
    if "hf_name" in report:
        row("source", f"{report['hf_name']} in {report.get('source_file', '?')}, {report.get('source_dtype', '?')}")
    recipe = report.get("recipe")
    if recipe and recipe.get("role") == TERNARY_ROLE:
        heads = recipe.get("permute_heads") or 0
        row("recipe", f"weights {recipe.get('weights')}, scale rule {recipe.get('scale_rule')}, "
                      + (f"permuted over {heads} heads" if heads else "no permutation"))
    if "weight_scale" in report:
        row("weight_scale", f"{report['weight_scale']:.8g}")
    for stage, s in report["stores"].items():
        if "stored_shape" not in s:
            row(f"{stage}.zarr", s["state"] + (f": {s['problem']}" if "problem" in s else ""))
            continue
        parts = [f"{'x'.join(map(str, s['stored_shape']))} {s['dtype']}",
                 f"{s['rows_per_chunk']} rows/chunk", f"{s['chunks_written']} of {s['chunks']} chunks written"
                 + (" (bytes in the checkpoint)" if s.get("in_checkpoint") else "")]
        if "code_layout" in s:
            parts.insert(1, f"codes {s['code_layout']}")
        if s.get("scale") is not None:
            parts.append(f"scale {s['scale']:.8g}")
        if s.get("absmean") is not None:
            parts.append(f"absmean {s['absmean']:.8g}")
        if "scale_granularity" in s:
            parts.append(f"scale per {s['scale_granularity']}")
        if "ggml_type" in s:
            parts.append(f"{s.get('type_name')} (ggml type {s['ggml_type']})"
                         + (f" for target {s['target']}" if "target" in s else "")
                         + (f", tiles bm {s['tiles'][0]} bk {s['tiles'][1]} bmm {s['tiles'][2]}" if "tiles" in s else "")
                         + (f", {s['nbytes']} bytes in the GGUF" if "nbytes" in s else ""))
        row(f"{stage}.zarr", ", ".join(parts))
    if "codes" in report:
        row("codes", report["codes"])
    if "shares" in report:
        row("codes", f"{_format_shares(report)}, sparsity {report['sparsity']:.1%} "
                     f"({report['codes_counted']} codes)")
    return "\n".join(lines)


# -- the figure ------------------------------------------------------------------------------------

@dataclasses.dataclass
class LayerStats:
    """What the figure shows, gathered from the stores (NaN where nothing is written yet)."""
    n_layers: int
    scale: np.ndarray            # [kind, layer]
    absmean: np.ndarray          # [kind, layer]
    shares: np.ndarray           # [code -1/0/+1, kind, layer]
    partial: np.ndarray          # [kind, layer] bool: shares of some chunks only
    chunks: dict                 # stage -> [chunks written, chunks, arrays not created] over the projections
    master: bool                 # master-weight checkpoint (histograms drawn)
    hist: dict                   # kind -> (counts[HIST_BINS], rows sampled, layers sampled, values)
    damaged: list = dataclasses.field(default_factory=list)  # zarr.json files that could not be read
    # scales per row or group: their range [kind, layer] (the median is `scale`), and kind ->
    # (layer, the scale of each row) for per-row scaled projections of the middle layer
    scale_lo: np.ndarray | None = None
    scale_hi: np.ndarray | None = None
    row_scales: dict = dataclasses.field(default_factory=dict)
    # a mixture of experts: kind -> [layer, expert] median of the expert's row scales (NaN: not
    # written), and kind -> (layer, [expert, row] the scale of each row: the middle layer's stack)
    experts: dict = dataclasses.field(default_factory=dict)
    expert_rows: dict = dataclasses.field(default_factory=dict)


def _projections(group) -> dict[tuple[int, str], str]:
    names = {}
    for name in group.attrs.get("tensor_order", []):
        parsed = parse_projection(name)
        if parsed is not None:
            names[parsed] = name
    return names


def _sample_hist(arr, absmean: float) -> tuple[np.ndarray, int]:
    """Histogram of |W| / absmean over a few rows of a few written chunks of a master projection."""
    written = sorted(written_chunks(arr))
    ranges = row_ranges(arr.shape[0], arr.chunks[0])
    picks = [written[i] for i in np.unique(np.linspace(0, len(written) - 1, SAMPLE_CHUNKS).round().astype(int))] \
        if written else []
    counts, rows = np.zeros(HIST_BINS, dtype=np.int64), 0
    for i in picks:
        r0, r1 = ranges[i]
        block = as_float32(read_rows(arr, r0, min(r1, r0 + SAMPLE_ROWS)), arr.attrs["source_dtype"])
        ratio = np.minimum(np.abs(block) / np.float32(absmean), np.float32(HIST_MAX * (1 - 1e-6)))
        counts += np.histogram(ratio, bins=HIST_BINS, range=(0, HIST_MAX))[0]
        rows += block.shape[0]
    return counts, rows


def collect_layer_stats(run: RunDir) -> LayerStats:
    damaged: list[str] = []
    stores = open_stores(run, damaged)
    kinds = list(PROJECTIONS)
    names: dict[tuple[int, str], str] = {}
    for group in stores.values():
        names.update(_projections(group))
    n_layers = max((layer for layer, _ in names), default=-1) + 1
    shape = (len(kinds), n_layers)
    stats = LayerStats(n_layers, np.full(shape, np.nan), np.full(shape, np.nan), np.full((3, *shape), np.nan),
                       np.zeros(shape, dtype=bool), {}, False, {}, damaged, np.full(shape, np.nan),
                       np.full(shape, np.nan))
    arrays = {}
    for stage, group in stores.items():
        written = total = missing = 0
        for (layer, kind), name in _projections(group).items():
            arr = open_member(run, stage, group, name, damaged)
            if arr is None or arr is DAMAGED:  # a damaged array is drawn as one not written
                missing += 1
                continue
            arrays[stage, name] = arr
            n_written, n_total = len(written_chunks(arr)), chunk_count(arr)
            written, total = written + n_written, total + n_total
            k = kinds.index(kind)
            if stage == "extract" and (arr.attrs.get("recipe") or {}).get("weights") == MASTER:
                stats.master = True
            if stage == "quantize":
                for key, target in (("scale", stats.scale), ("absmean", stats.absmean)):
                    if arr.attrs.get(key) is not None:
                        target[k, layer] = arr.attrs[key]
                granularity = arr.attrs.get("scale_granularity")
                if granularity not in (None, "tensor") and name + BLOCK_SCALES_SUFFIX in group:
                    _block_scale_stats(stats, group[name + BLOCK_SCALES_SUFFIX], k, kind, layer, granularity)
                if n_written:
                    stats.shares[:, k, layer] = list(count_codes(arr).shares.values())
                    stats.partial[k, layer] = n_written < n_total
        stats.chunks[stage] = [written, total, missing]
        if stage == "quantize":
            _collect_experts(run, group, stats, damaged)
    source = checkpoint_state(run.load()) or {}
    if stats.master and "extract" in stores and source.get("state") == "unchanged":  # extract indexes its bytes
        stats.hist = _collect_hists({n: a for (stage, n), a in arrays.items() if stage == "extract"}, names, stats)
    return stats


def row_scales_of(arr, blocks) -> np.ndarray | None:
    """The scale of each row of a quantized projection (GGUF order; 0: a row of zeros): the largest
    of its block scales for scales per row or group, its one scale for a scale per tensor. None
    when nothing of it is written yet."""
    granularity = arr.attrs.get("scale_granularity")
    if granularity in (None, "tensor"):
        scale = arr.attrs.get("scale")
        return None if scale is None else np.full(arr.shape[0], scale, dtype=np.float32)
    if blocks is None:
        return None
    try:
        return np.asarray(blocks[...], dtype=np.float32).max(axis=1)
    except (OSError, ValueError, KeyError):  # not written (a run stopped in quantize)
        return None


def _collect_experts(run: RunDir, group, stats: LayerStats, damaged: list[str]) -> None:
    """The experts' row scales from quantize.zarr: each expert's median (for the map of experts by
    layer) and, for the middle layer, every row of every expert (the stack as one picture)."""
    found = {}
    for name in group.attrs.get("tensor_order", []):
        parsed = parse_expert(name)
        if parsed is not None:
            found[parsed] = name
    if not found:
        return
    n_experts = max(x for _, _, x in found) + 1
    middle = stats.n_layers // 2  # the layer the per-row panels of the dense projections show
    for (layer, kind, expert), name in sorted(found.items()):
        arr = open_member(run, "quantize", group, name, damaged)
        if arr is None or arr is DAMAGED:
            continue
        blocks = open_member(run, "quantize", group, name + BLOCK_SCALES_SUFFIX, damaged)
        rows = row_scales_of(arr, None if blocks is DAMAGED else blocks)
        medians = stats.experts.setdefault(kind, np.full((stats.n_layers, n_experts), np.nan))
        if rows is None:
            continue
        nonzero = rows[rows > 0]
        if nonzero.size:
            medians[layer, expert] = float(np.median(nonzero))
        if layer == middle:
            picture = stats.expert_rows.setdefault(kind, (layer, np.full((n_experts, rows.size), np.nan)))[1]
            if picture.shape[1] == rows.size:
                picture[expert] = np.where(rows > 0, rows, np.nan)


def _block_scale_stats(stats: LayerStats, blocks, k: int, kind: str, layer: int, granularity: str) -> None:
    """Median and range of a tensor's block scales (a small array: one per 64 values), and for a
    per-row scaled projection of the middle layer, the scale of every row (0: a row of zeros)."""
    try:
        values = np.asarray(blocks[...], dtype=np.float32)
    except (OSError, ValueError, KeyError):  # not written (a run stopped in quantize): drawn as missing
        return
    nonzero = values[values > 0]
    if nonzero.size:
        stats.scale[k, layer] = float(np.median(nonzero))
        stats.scale_lo[k, layer], stats.scale_hi[k, layer] = float(nonzero.min()), float(nonzero.max())
    if granularity == "row" and layer == stats.n_layers // 2:
        stats.row_scales[kind] = (layer, values.max(axis=1))


def _collect_hists(extract: dict, names: dict, stats: LayerStats) -> dict:
    """`extract`: extract.zarr's readable projection arrays by name."""
    hists = {}
    kinds = list(PROJECTIONS)
    for k, kind in enumerate(kinds):
        layers = [layer for layer in range(stats.n_layers)
                  if (layer, kind) in names and names[layer, kind] in extract
                  and not math.isnan(stats.absmean[k, layer]) and stats.absmean[k, layer] > 0
                  and written_chunks(extract[names[layer, kind]])]
        if not layers:
            continue
        picked = sorted({layers[i] for i in np.linspace(0, len(layers) - 1, SAMPLE_TENSORS).round().astype(int)})
        counts, rows = np.zeros(HIST_BINS, dtype=np.int64), 0
        for layer in picked:
            c, r = _sample_hist(extract[names[layer, kind]], float(stats.absmean[k, layer]))
            counts, rows = counts + c, rows + r
        hists[kind] = (counts, rows, picked, int(counts.sum()))
    return hists


def supported_plot_types() -> dict[str, str]:
    from matplotlib.backend_bases import FigureCanvasBase

    return FigureCanvasBase.get_supported_filetypes()


def check_plot_path(path: Path) -> Path:
    """The figure's path, refused in one line when it cannot be written or its type is unknown."""
    path = Path(path)
    types = supported_plot_types()
    ext = path.suffix.lower().lstrip(".")
    if ext not in types:
        raise OptionError(f"--plot {path}: {'unknown image type .' + ext if ext else 'no file extension'}; "
                          f"name a file ending in one of {', '.join('.' + t for t in sorted(types))}")
    parent = path.parent
    if not parent.is_dir():
        raise OptionError(f"--plot {path}: the directory {parent} does not exist; create it or choose another path")
    if path.is_dir():
        raise OptionError(f"--plot {path}: is a directory; name an image file")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OptionError(f"--plot {path}: cannot write there (permission denied); choose another path")
    return path


def share_color_range(share: np.ndarray) -> tuple[float, float]:
    """Colour range of a share map: its values, but at least SHARE_SPAN either side of the median,
    so that a uniform model looks uniform and a layer that is off stands out."""
    values = share[np.isfinite(share)]
    mid = float(np.median(values))
    return max(0.0, min(float(values.min()), mid - SHARE_SPAN)), min(1.0, max(float(values.max()), mid + SHARE_SPAN))


def _chunks_line(stats: LayerStats) -> str:
    parts = [f"{stage}.zarr {w} of {t} chunks written" + (f" ({m} tensor(s) not created yet)" if m else "")
             for stage, (w, t, m) in stats.chunks.items()]
    return "; ".join(parts) if parts else "no store written yet"


def _nothing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def draw(stats: LayerStats, title: str):
    """The figure (a matplotlib Figure on the Agg canvas; nothing is displayed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    kinds = list(PROJECTIONS)
    layers = np.arange(stats.n_layers)
    heights = [3.0, 2.0, 2.0, 2.0] + ([2.6] if stats.master else []) + ([2.6] if stats.row_scales else []) \
        + ([3.0, 3.0] if stats.experts else [])
    fig = Figure(figsize=(16, sum(heights) + 1.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{title}\nternary projections: {_chunks_line(stats)}", fontsize=11)
    grid = fig.add_gridspec(len(heights), len(kinds), height_ratios=heights)

    ax = fig.add_subplot(grid[0, :])
    colors = [f"C{i}" for i in range(len(kinds))]
    if np.isfinite(stats.scale).any():
        for k, kind in enumerate(kinds):
            ax.plot(layers, stats.scale[k], marker="o", ms=3, color=colors[k], label=f"{kind} scale")
            if stats.scale_lo is not None and np.isfinite(stats.scale_lo[k]).any():  # per row or group
                ax.fill_between(layers, stats.scale_lo[k], stats.scale_hi[k], color=colors[k], alpha=0.15)
            if stats.master and np.isfinite(stats.absmean[k]).any():
                ax.plot(layers, stats.absmean[k], ls="none", marker="x", ms=6, color=colors[k])
        ax.set_xlim(-0.5, max(stats.n_layers - 0.5, 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("scale")
        ax.grid(alpha=0.3)
        ax.legend(ncol=len(kinds), fontsize=8, loc="upper left", bbox_to_anchor=(0, 1.18), frameon=False)
        spread = stats.scale_lo is not None and np.isfinite(stats.scale_lo).any()
        ax.set_title("scale per layer (x: absmean)" if stats.master else
                     "scale per layer (scales per row or group: median, band from least to largest)" if spread
                     else "scale per layer", fontsize=10, loc="right")
    else:
        _nothing(ax, "no scale written yet (quantize.zarr)")

    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    for row, (label, share) in enumerate(zip(("-1", "0", "+1"), stats.shares), start=1):
        ax = fig.add_subplot(grid[row, :])
        if not np.isfinite(share).any():
            _nothing(ax, f"share of {label}: no codes written yet (quantize.zarr)")
            continue
        vmin, vmax = share_color_range(share)
        image = ax.imshow(np.ma.masked_invalid(share), aspect="auto", cmap=cmap, interpolation="nearest",
                          vmin=vmin, vmax=vmax)
        fig.colorbar(image, ax=ax, pad=0.005, fraction=0.03).ax.tick_params(labelsize=8)
        ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
        ax.set_xticks(layers if stats.n_layers <= 40 else layers[::4])
        ax.tick_params(labelsize=8)
        ax.set_title(f"share of {label}" + (" (= sparsity)" if label == "0" else "")
                     + ("; grey: not written, *: some chunks only" if row == 1 else ""), fontsize=10, loc="left")
        for k, layer in zip(*np.nonzero(stats.partial)):
            ax.text(layer, k, "*", ha="center", va="center", color="red", fontsize=10)
        if stats.n_layers <= ANNOTATE_MAX_LAYERS:
            for k, layer in zip(*np.nonzero(np.isfinite(share))):
                dark = (share[k, layer] - vmin) / (vmax - vmin) < 0.6
                ax.text(layer, k, f"{share[k, layer]:.1%}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
        if row == 3:
            ax.set_xlabel("layer")

    if stats.master:
        edges = np.linspace(0, HIST_MAX, HIST_BINS + 1)
        for k, kind in enumerate(kinds):
            ax = fig.add_subplot(grid[4, k])
            if kind not in stats.hist:
                _nothing(ax, f"{kind}: not written yet")
                continue
            counts, rows, picked, n = stats.hist[kind]
            ax.stairs(counts / max(n, 1), edges, fill=True, color=colors[k], alpha=0.7)
            for t in THRESHOLDS:
                ax.axvline(t, color="black", ls="--", lw=0.8)
            ax.set_title(f"{kind}: {rows} rows of layers {','.join(map(str, picked))}", fontsize=8)
            ax.set_xlabel(f"|W| / absmean (last bin: >= {HIST_MAX:g})", fontsize=7)
            ax.tick_params(labelsize=7)
            below = counts[: int(THRESHOLDS[0] / HIST_MAX * HIST_BINS)].sum() / max(n, 1)
            ax.text(0.98, 0.95, f"< 0.5: {below:.0%}\n(-> code 0)", ha="right", va="top",
                    transform=ax.transAxes, fontsize=7)
    if stats.row_scales:
        for k, kind in enumerate(kinds):
            ax = fig.add_subplot(grid[4 + stats.master, k])
            if kind not in stats.row_scales:
                _nothing(ax, f"{kind}: no scale per row")
                continue
            layer, scales = stats.row_scales[kind]
            ax.plot(np.arange(scales.size), np.where(scales > 0, scales, np.nan), lw=0.6, color=colors[k])
            ax.set_title(f"{kind}: scale of each row, layer {layer}", fontsize=8)
            ax.set_xlabel("row (GGUF order)", fontsize=7)
            ax.tick_params(labelsize=7)
    if stats.experts:
        _draw_experts(fig, grid, 4 + stats.master + bool(stats.row_scales), stats, cmap)
    return fig


def _draw_experts(fig, grid, row: int, stats: LayerStats, cmap) -> None:
    """Two rows of panels from grid row `row`, one column group per expert projection: the median row scale of every
    expert of every layer (an expert that is off, or not written, stands out), and the middle
    layer's stack as one picture, the scale of every row of every expert."""
    columns = len(PROJECTIONS)
    spans = [slice(round(i * columns / len(EXPERT_STACKS)), round((i + 1) * columns / len(EXPERT_STACKS)))
             for i in range(len(EXPERT_STACKS))]
    for i, kind in enumerate(EXPERT_STACKS):
        top = fig.add_subplot(grid[row, spans[i]])
        bottom = fig.add_subplot(grid[row + 1, spans[i]])
        medians = stats.experts.get(kind)
        if medians is None or not np.isfinite(medians).any():
            _nothing(top, f"{kind} experts: no scale written yet (quantize.zarr)")
        else:
            image = top.imshow(np.ma.masked_invalid(medians.T), aspect="auto", cmap=cmap, interpolation="nearest")
            fig.colorbar(image, ax=top, pad=0.01, fraction=0.04).ax.tick_params(labelsize=7)
            top.set_title(f"{EXPERT_STACKS[kind]}: median row scale of each expert (grey: not written)", fontsize=8)
            top.set_xlabel("layer", fontsize=7)
            top.set_ylabel("expert", fontsize=7)
            top.tick_params(labelsize=7)
        if kind not in stats.expert_rows or not np.isfinite(stats.expert_rows[kind][1]).any():
            _nothing(bottom, f"{kind} experts: no row scales of the middle layer yet")
            continue
        layer, picture = stats.expert_rows[kind]
        image = bottom.imshow(np.ma.masked_invalid(picture), aspect="auto", cmap=cmap, interpolation="nearest")
        fig.colorbar(image, ax=bottom, pad=0.01, fraction=0.04).ax.tick_params(labelsize=7)
        bottom.set_title(f"blk.{layer}.{EXPERT_STACKS[kind]}: scale of each row of each expert", fontsize=8)
        bottom.set_xlabel("row (GGUF order)", fontsize=7)
        bottom.set_ylabel("expert", fontsize=7)
        bottom.tick_params(labelsize=7)


def plot_run(run: RunDir, path: Path) -> str:
    """Draw the run directory's figure into `path`; returns a one-line summary."""
    return plot_stats(run, collect_layer_stats(run), path)


def plot_stats(run: RunDir, stats: LayerStats, path: Path) -> str:
    """Draw the figure of `stats` (collect_layer_stats) into `path`; returns a one-line summary."""
    path = check_plot_path(path)
    fig = draw(stats, f"{run.path}: {stats.n_layers} layers x {len(PROJECTIONS)} projections")
    try:
        fig.savefig(path)
    except OSError as e:
        raise OptionError(f"--plot {path}: cannot write the figure ({e.strerror or e}); choose another path") from None
    experts = f" (and {next(iter(stats.experts.values())).shape[1]} experts a stack)" if stats.experts else ""
    return f"wrote {path}: {stats.n_layers} layers x {len(PROJECTIONS)} projections{experts}; {_chunks_line(stats)}"


# -- the command -----------------------------------------------------------------------------------

# -- a GGUF file alone ----------------------------------------------------------------------------

def describe_gguf(path: Path, tensor: str | None = None) -> dict:
    """What a GGUF file's header says: arch, output type, the bitnet.cpp build its layout is for
    (our key), TL kernel tiles, and its tensors (or one tensor)."""
    from gguf import GGMLQuantizationType

    from pipeline.gguf_file import read_gguf
    from pipeline.outtypes import BY_GGML_TYPE, arch_traps, file_runtimes, registry_entry, type_of_file
    from pipeline.plan import TARGET_KEY, TILES_KEY

    contents = read_gguf(path)

    def type_name(t: int) -> str:
        own = BY_GGML_TYPE.get(t)
        if own is not None:
            return own.codec.name
        return GGMLQuantizationType(t).name if t in GGMLQuantizationType._value2member_map_ else str(t)

    file_type = contents.kv("general.file_type")
    out = type_of_file(file_type, [t.ggml_type for t in contents.tensors])
    tiles = contents.kv(TILES_KEY) or []
    target = contents.kv(TARGET_KEY)
    types = [registry_entry(t.ggml_type, target) for t in contents.tensors]
    known = [t for t in types if t is not None]
    report = {"file": str(path), "architecture": contents.kv("general.architecture"),
              "file_type": file_type, "type": out.codec.name if out else None,
              "target": target,
              # which runtimes load it, from its tensors' types (I2_S: the layout bitnet_gguf.target names,
              # x86 when the key is absent, as for other converters' files)
              "runtimes": file_runtimes(known) if known and len(known) == len(types) else None,
              "traps": list(dict.fromkeys([*(trap for t in known for trap in t.traps),
                                           *arch_traps(contents.kv("general.architecture"), contents.kv)])),
              "kernel_tiles": [tiles[i:i + 5] for i in range(0, len(tiles), 5)],
              "tensors": {t.name: {"shape": list(t.shape), "type": type_name(t.ggml_type), "ggml_type": t.ggml_type,
                                   "offset": t.offset, "nbytes": t.nbytes} for t in contents.tensors}}
    if tensor is not None:
        if tensor not in report["tensors"]:
            raise RunDirError(f"{path}: no tensor {tensor!r} in this file; `bitnet-gguf inspect {path}` lists them")
        report["tensors"] = {tensor: report["tensors"][tensor]}
    return report


def format_gguf(report: dict) -> str:
    from pipeline.outtypes import TARGET_NAMES, runtimes_report_lines

    lines = [f"GGUF file: {report['file']}",
             f"  arch {report['architecture']}, general.file_type {report['file_type']}"
             + (f" ({report['type']})" if report["type"] else "")]
    if report["target"]:
        lines.append(f"  laid out for bitnet.cpp's {TARGET_NAMES.get(report['target'], report['target'])} builds "
                     f"(bitnet_gguf.target = {report['target']})")
    elif report["type"] == "I2_S":
        lines.append("  no bitnet_gguf.target: an I2_S file of another converter, most likely for x86 builds")
    if report["kernel_tiles"]:
        lines.append("  kernel tiles (m, k: bm bk bmm) " + ", ".join(f"{m}x{k}: {a} {b} {c}"
                                                                    for m, k, a, b, c in report["kernel_tiles"]))
    counts: dict[str, int] = {}
    for t in report["tensors"].values():
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    lines.append(f"  {len(report['tensors'])} tensor(s): " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    if report["runtimes"] is None:
        lines.append("  runs in: unknown (a tensor type bitnet-gguf does not write)")
    else:
        lines += [f"  {line}" for line in runtimes_report_lines(report["runtimes"], report["traps"])]
    for name, t in report["tensors"].items():
        lines.append(f"  {name:<28} {'x'.join(map(str, t['shape'])):>12} {t['type']:<6} {t['nbytes']} bytes at {t['offset']}")
    return "\n".join(lines)


def stack_members(run: RunDir, name: str) -> list[str]:
    """The experts' tensors of the stacked GGUF tensor `name` (pipeline.families.expert_name), in
    order; [] when `name` is not a stack this run directory knows."""
    for group in open_stores(run, []).values():
        order = group.attrs.get("tensor_order", [])
        if name in order:
            return []
        members = [n for n in order if n.startswith(name + ".") and n[len(name) + 1:].isdigit()]
        if members:
            return sorted(members, key=lambda n: int(n[len(name) + 1:]))
    return []


def inspect_command(run: RunDir, tensor: str | None = None, codes: bool = False, as_json: bool = False,
                    plot: Path | None = None, log=print) -> tuple[str, list[str]]:
    """(what `bitnet-gguf inspect` prints, the zarr.json files it found damaged); with `plot` it
    also draws the figure and tells `log`."""
    if plot is not None:
        check_plot_path(plot)
    out, damaged = [], []
    experts = stack_members(run, tensor) if tensor is not None else []
    if experts:  # a stacked GGUF tensor (a mixture of experts): each expert, as a tensor of its own
        reports = [describe_tensor(run, name, codes=codes) for name in experts]
        for report in reports:
            damaged += report.get("damaged", [])
        out.append(json.dumps({"stack": tensor, "experts": reports}, indent=2, default=float) if as_json else
                   f"{tensor}: a stack of {len(experts)} experts, each converted as a tensor of its own\n"
                   + "\n".join(format_tensor(r) for r in reports))
    elif tensor is not None:
        report = describe_tensor(run, tensor, codes=codes)
        damaged += report.get("damaged", [])
        out.append(json.dumps(report, indent=2, default=float) if as_json else format_tensor(report))
    if plot is not None:
        stats = collect_layer_stats(run)
        damaged += stats.damaged
        log(plot_stats(run, stats, plot))
    if tensor is None and plot is None:
        report = describe(run, codes=codes)
        damaged += report.get("damaged", [])
        out.append(json.dumps(report, indent=2, default=float) if as_json else format_report(report))
    return "\n".join(out), list(dict.fromkeys(damaged))
