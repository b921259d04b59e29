"""The plan of a conversion, as one record, decided before any work and without reading weights.

For every GGUF tensor: its source (file, offset, dtype, shape), recipe, output type (and why
it fell back, if it did), byte size, split part and offset in that part's file; the key/value
count; every output file's size; the run directory's size per store; the memory budget
(workers, chunk size) and the peak memory it allows. `make_plan` also makes the checks that
refuse a conversion up front (a type that cannot hold a tensor, a packed scale a type cannot
store, a split set too large, an output part's path), so the runner only builds the plan and
runs the stages. `bitnet-gguf plan MODEL` (and `convert --dry-run`) prints it; `convert`
saves it as the run directory's plan.json.
"""
from __future__ import annotations

import dataclasses
import json
import math

from pipeline.budget import BYTES_PER_ELEMENT, HEADROOM, IN_FLIGHT_PER_WORKER, Budget
from pipeline.config import Options, check_output_path, format_size
from pipeline.errors import CheckpointError, OptionError
from pipeline.families import TERNARY
from pipeline.gguf_file import (MAX_SPLITS, GGUFWriterError, TensorInfo, align, alignment_of, as_kv, data_offsets,
                                file_size, header_bytes, part_kvs)
from pipeline.output import final_paths
from pipeline.outtypes import OUTPUT_TYPES, tensor_type

PLAN_VERSION = 1

# The run directory's files beside the stores' chunks, per tensor: every store's zarr.json and
# chunk digests, the checksums, extract's references, plan.json (measured: 6.7-7.5 KiB on the
# test checkpoints; tests/test_plan.py holds the total to 10%).
RECORD_BYTES_PER_TENSOR = 7 * 1024


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    name: str
    hf_name: str
    role: str
    source_file: str
    source_offset: int
    source_dtype: str
    source_shape: list
    shape: list
    recipe: dict
    out_type: str
    ggml_type: int
    nbytes: int
    part: int
    offset: int           # of the tensor's data in its part's file
    rows_per_chunk: int
    fallback: str | None  # why the tensor is not the --type, if it is not


@dataclasses.dataclass(frozen=True)
class Plan:
    model_dir: str
    family: str
    arch: str
    out_type: str
    embedding_type: str
    tensors: list[TensorRecord]
    kv_count: int
    outputs: list             # [path, bytes] of every file (one, or the parts of a split set)
    stores: dict              # bytes of each store's chunks in the run directory
    records: int              # bytes of everything else there: metadata, manifest, zarr.json files
    memory_limit: int
    workers: int
    chunk_elements: int
    peak_memory: int          # what the budget lets the conversion use at most
    version: int = PLAN_VERSION

    @property
    def output_bytes(self) -> int:
        return sum(size for _, size in self.outputs)

    @property
    def run_dir_bytes(self) -> int:
        return sum(self.stores.values()) + self.records

    def infos(self) -> list[TensorInfo]:
        return [TensorInfo(t.name, tuple(t.shape), t.ggml_type, t.nbytes) for t in self.tensors]

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "output_bytes": self.output_bytes, "run_dir_bytes": self.run_dir_bytes}

    def table(self) -> str:
        """What a person reads: one line per tensor, then the totals."""
        lines = [f"model: {self.model_dir} ({self.family}, GGUF arch {self.arch})",
                 f"{'tensor':<32} {'source':<16} {'output':<8} {'size':>10}  part  note"]
        for t in self.tensors:
            source = f"{t.source_dtype} {'x'.join(map(str, t.source_shape))}"
            lines.append(f"{t.name:<32} {source:<16} {OUTPUT_TYPES[t.out_type].codec.name:<8} "
                         f"{format_size(t.nbytes):>10}  {t.part + 1:>4}  {t.fallback or ''}")
        files = ", ".join(f"{p} ({format_size(s)})" for p, s in self.outputs)
        lines += [f"output: {files}; {len(self.tensors)} tensors, {self.kv_count} key/values",
                  "run directory: " + ", ".join(f"{k} {format_size(v)}" for k, v in self.stores.items())
                  + f", records {format_size(self.records)} (total {format_size(self.run_dir_bytes)})",
                  f"memory: at most {format_size(self.peak_memory)} of --memory-limit "
                  f"{format_size(self.memory_limit)} ({self.workers} worker(s), chunks of up to "
                  f"{format_size(self.chunk_elements * 4)} of float32)"]
        return "\n".join(lines)


def check_kernel_shapes(opts: Options, ckpt) -> None:
    """TL1/TL2: every ternary projection's (m, k) has a section in --kernel-config (refused before any work)."""
    from pipeline.kernel_config import missing_shapes_message, tiles_of

    layout = opts.layout
    if not layout.needs_tiles:
        return
    missing: dict[tuple[int, int], list[str]] = {}
    for t in ckpt.plan.tensors:
        if t.role == TERNARY and tiles_of(opts.kernel_tiles, t.shape) is None:
            missing.setdefault(tuple(t.shape), []).append(t.gguf_name)
    if missing or opts.kernel_config is None:
        if not missing:  # no ternary projection at all: nothing to ask for
            return
        raise OptionError(missing_shapes_message(opts.kernel_config, layout.codec, missing))


def tensor_tiles(opts: Options, role: str, shape) -> tuple | None:
    """The kernel tiles of a ternary projection of a TL type, else None."""
    if role != TERNARY or not opts.layout.needs_tiles:
        return None
    from pipeline.kernel_config import tiles_of

    return tiles_of(opts.kernel_tiles, shape)


def file_kvs(metadata: dict, opts: Options) -> list:
    from stages.assemble import file_kvs as kvs

    return kvs(metadata, opts.layout.name, opts.kernel_tiles)


def tensor_types(opts: Options, ckpt) -> list[tuple]:
    """(output type, fallback warning) of every tensor; raises for a type that cannot hold a tensor
    or a packed scale it cannot store."""
    from stages.pack import check_scale
    from stages.quantize import ternary_scale

    check_kernel_shapes(opts, ckpt)
    types, ternary, fallbacks = [], 0, 0
    for t in ckpt.plan.tensors:
        out, fallback = tensor_type(t.role, t.shape, opts.layout.name, opts.embedding_type, t.gguf_name)
        if t.role == TERNARY:
            ternary += 1
            fallbacks += fallback is not None
            if t.recipe.packed:  # the scale is the checkpoint's weight_scale, known now
                check_scale(t.gguf_name, float(ternary_scale(t.recipe, None)), out.name)
        types.append((out, fallback))
    if opts.out_type == "i2_s" and ternary and fallbacks == ternary:
        raise OptionError(f"--type i2_s: no projection of this checkpoint has rows that are a multiple of "
                          f"{opts.layout.block_size} values, so nothing could be I2_S; choose tq2_0 or tq1_0")
    return types


def split_parts(opts: Options, infos: list[TensorInfo], check_paths: bool = True) -> list[list[int]]:
    from stages.assemble import plan_parts

    parts = plan_parts(infos, opts.split_max_size, opts.split_max_tensors)
    if len(parts) > MAX_SPLITS:
        raise OptionError(f"--split-max-size / --split-max-tensors: {len(parts)} parts; a split set has at most "
                          f"{MAX_SPLITS}; allow larger parts")
    if check_paths and len(parts) > 1:  # every part's path, as -o's was checked
        for path in final_paths(opts.output, len(parts)):
            check_output_path(path, opts.force)
    return parts


def _chunked_bytes(rows: int, rows_per_chunk: int, row_bytes: int) -> int:
    """Bytes of a raw zarr array on disk: every chunk file is a whole chunk, the last one too."""
    return math.ceil(rows / rows_per_chunk) * rows_per_chunk * row_bytes if rows else 0


def store_sizes(opts: Options, ckpt, budget: Budget, types: list[tuple]) -> dict[str, int]:
    """The bytes extract, quantize and pack will hold (chunk files; their JSON is not counted).
    extract indexes the checkpoint (no tensor bytes: the side arrays, and a padded copy of a
    file's last chunk where the file ends inside it); quantize indexes float tensors; pack
    indexes the floats whose bytes do not change."""
    from stages.pack import SAME_BYTES
    from stages.quantize import LAYOUT_2BIT, code_layout, packed_block_rows, ternary_chunk_rows

    from pipeline.families import GROUP_COLUMNS, GROUPED

    sizes = {"extract": 0, "quantize": 0, "pack": 0}
    last: dict = {}  # the last tensor of each file
    for t in ckpt.plan.tensors:
        src = ckpt.sources[t.hf_name]
        if src.offset >= last.get(src.file, src).offset:
            last[src.file] = src
    for src in last.values():
        if len(src.shape) > 1:
            rows, chunk = src.shape[0], budget.rows_per_chunk(src.shape)
            if rows % chunk:
                sizes["extract"] += chunk * math.prod(src.shape[1:]) * src.np_dtype.itemsize
    for t, (out, _) in zip(ckpt.plan.tensors, types):
        src = ckpt.sources[t.hf_name]
        shape, source_shape = t.shape, t.source_shape
        src_rows = source_shape[0] if len(source_shape) > 1 else 1
        src_chunk = budget.rows_per_chunk(source_shape) if len(source_shape) > 1 else 1
        grouped = t.role == TERNARY and t.recipe.weights == GROUPED
        if grouped:  # one float32 magnitude per group of columns
            sizes["extract"] += _chunked_bytes(src_rows, src_chunk, source_shape[1] // GROUP_COLUMNS * 4)
        elif not (t.role == TERNARY and t.recipe.packed):
            side = 8 if t.role == TERNARY else 4  # abs_sums float64, abs_max float32
            sizes["extract"] += _chunked_bytes(src_rows, src_chunk, side) if len(source_shape) > 1 else side
        rows = budget.rows_per_chunk(shape) if len(shape) > 1 else shape[0]
        if t.role == TERNARY:
            cols = shape[1]
            code_bytes = cols // 4 if code_layout(cols) == LAYOUT_2BIT else cols
            q_rows = packed_block_rows(budget, shape, t.recipe) or ternary_chunk_rows(budget, shape, t.recipe)
            sizes["quantize"] += _chunked_bytes(shape[0], q_rows, code_bytes)
        elif (src.dtype, out.name) in SAME_BYTES:
            continue  # quantize and pack index the checkpoint's bytes
        codec = out.codec
        tiles = tensor_tiles(opts, t.role, shape) if out.needs_tiles else None
        if len(shape) > 1:  # as pack chunks it: whole tiles of a TL type
            rows = budget.rows_per_chunk(shape, codec.row_multiple(tiles))
            sizes["pack"] += _chunked_bytes(shape[0], rows, codec.row_bytes(shape[-1], tiles))
        else:
            sizes["pack"] += codec.row_bytes(shape[0])
    return sizes


def make_plan(opts: Options, ckpt, budget: Budget, check_paths: bool = True) -> Plan:
    """Everything the conversion will do, decided from the checkpoint's headers and the options;
    raises (OptionError, CheckpointError) for what would be refused."""
    types = tensor_types(opts, ckpt)
    infos = [TensorInfo(t.gguf_name, t.shape, out.ggml_type, out.nbytes(t.shape, tensor_tiles(opts, t.role, t.shape)))
             for t, (out, _) in zip(ckpt.plan.tensors, types)]
    parts = split_parts(opts, infos, check_paths)
    metadata = {"arch": ckpt.plan.arch, "kv": ckpt.kv}
    try:
        kvs = [as_kv(r) for r in file_kvs(metadata, opts)]
        alignment = alignment_of(kvs)
        part_of, offset_of, outputs = {}, {}, []
        for k, (idx, path) in enumerate(zip(parts, final_paths(opts.output, len(parts)))):
            own_kvs = part_kvs(kvs, k, len(parts), len(infos))
            own = [infos[i] for i in idx]
            start = align(len(header_bytes(own_kvs, own, alignment)), alignment)
            for i, off in zip(idx, data_offsets(own, alignment)):
                part_of[i], offset_of[i] = k, start + off
            outputs.append([str(path), file_size(own_kvs, own, alignment)])
    except (GGUFWriterError, ValueError) as e:
        raise CheckpointError(f"{opts.model_dir}: the GGUF header cannot be written ({e})") from None
    records = []
    for i, (t, (out, fallback)) in enumerate(zip(ckpt.plan.tensors, types)):
        src = ckpt.sources[t.hf_name]
        rows = budget.rows_per_chunk(t.shape) if len(t.shape) > 1 else t.shape[0]
        records.append(TensorRecord(t.gguf_name, t.hf_name, t.role, str(src.file), src.offset, src.dtype,
                                    list(src.shape), list(t.shape), t.recipe.as_json(), out.name, out.ggml_type,
                                    infos[i].nbytes, part_of[i], offset_of[i], rows, fallback))
    task = min(budget.chunk_elements, max((r.rows_per_chunk * math.prod(r.shape[1:]) for r in records
                                           if len(r.shape) > 1), default=1))
    peak = budget.baseline + HEADROOM + budget.workers * IN_FLIGHT_PER_WORKER * BYTES_PER_ELEMENT * task
    return Plan(str(opts.model_dir), ckpt.plan.family.description, ckpt.plan.arch, opts.out_type,
                opts.embedding_type, records, len(kvs), outputs, store_sizes(opts, ckpt, budget, types),
                len(json.dumps(metadata, indent=2, sort_keys=True)) + RECORD_BYTES_PER_TENSOR * len(records),
                budget.memory_limit, budget.workers, budget.chunk_elements, int(min(peak, budget.memory_limit)))


def save_plan(run, plan: Plan) -> None:
    from pipeline.rundir import write_json_atomic

    write_json_atomic(run.path / "plan.json", plan.as_json())


def load_plan(run) -> dict | None:
    try:
        return json.loads((run.path / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

