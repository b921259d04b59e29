"""extract: safetensors -> extract.zarr, one array per tensor in its source representation.

bf16 is stored as its uint16 bit pattern (attribute `source_dtype` says so); packed
uint8 projections stay packed (4 codes per byte), with their checked `weight_scale`
in the tensor's recipe. Rows are copied in chunks with `os.pread`; no tensor is ever
read whole. This is the one pass that reads the checkpoint, so it also records what
later stages need to know about the values, beside each tensor:

- master-weight projections: per-row float64 sums of |W| (`<name>.abs_sums`), from
  which quantize computes the absmean scale without reading the weights again;
- other float tensors: per-row max |x| (`<name>.abs_max`), so a value that the chosen
  output type cannot hold (above F16's 65504) is refused before anything is packed;
- group-scaled ternary projections (float values already {-s, 0, +s} per group of columns):
  the magnitude s of every run of GROUP_COLUMNS values (`<name>.group_max`, rows x cols / 32),
  after checking that each run holds one magnitude at most;

and refuses what cannot be converted at all, naming the tensor: NaN or infinite
weights, a packed 2-bit field holding 3 (only 0, 1, 2 are codes). A task writes its
side array chunk before the data chunk, so a data chunk on disk means both are.
"""
from __future__ import annotations

import numpy as np

from pipeline.codecs import absmean_row_sums, group_magnitudes
from pipeline.context import StageContext
from pipeline.errors import CheckpointError
from pipeline.families import GROUP_COLUMNS, GROUPED, TERNARY
from pipeline.safetensors_io import TensorSource, as_float32
from pipeline.scheduler import chunk_task
from pipeline.stores import array_path, ensure_array, open_store, read_rows, row_ranges, write_rows, written_chunks
from stages.quantize import SUMS_SUFFIX

MAX_SUFFIX = ".abs_max"
GROUP_SUFFIX = ".group_max"


def invalid_packed_fields(block: np.ndarray) -> int:
    """How many 2-bit fields of a packed uint8 block hold 3 (only 0, 1, 2 are codes)."""
    both_bits = (block >> 1) & block & np.uint8(0x55)
    if not both_bits.any():
        return 0
    return int(np.unpackbits(both_bits).sum())


def row_abs_max(values: np.ndarray) -> np.ndarray:
    """float32 max |x| of each row (a 1-D tensor is one row)."""
    a = np.abs(values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1))
    return a.max(axis=1) if a.size else np.zeros(a.shape[0], np.float32)


def copy_rows(source: TensorSource, out: str, start: int, stop: int, kind: str) -> None:
    """Copy rows [start, stop); kind: "packed", "master" (write |W| row sums), "grouped" (group
    magnitudes) or "float" (row maxima)."""
    block = source.read_rows(start, stop)
    if kind == "grouped":
        mags, bad = group_magnitudes(as_float32(block, source.dtype), GROUP_COLUMNS)
        if bad is not None:
            row, g = bad
            raise CheckpointError(f"{source.file}: tensor {source.name}, row {start + row}, columns "
                                  f"{g * GROUP_COLUMNS}..{(g + 1) * GROUP_COLUMNS - 1}: the values are not ternary "
                                  "(-s, 0 and +s for one s per group); only group-scaled ternary weights "
                                  "convert here, this checkpoint's are not")
        write_rows(out + GROUP_SUFFIX, start, stop, mags)
    elif kind == "packed":
        if bad := invalid_packed_fields(block):
            raise CheckpointError(f"{source.file}: tensor {source.name} holds {bad} packed 2-bit field(s) of value 3 "
                                  f"in rows {start}..{stop}; only 0, 1 and 2 are ternary codes, the file is corrupt")
    else:
        values = as_float32(block, source.dtype)
        side = absmean_row_sums(values) if kind == "master" else row_abs_max(values)
        if not np.isfinite(side).all():
            raise CheckpointError(f"{source.file}: tensor {source.name} holds NaN or infinite values in rows "
                                  f"{start}..{stop}; the checkpoint is damaged")
        sides = out + (SUMS_SUFFIX if kind == "master" else MAX_SUFFIX)
        if len(source.shape) == 1:  # a 1-D tensor is one row, in one chunk
            write_rows(sides, 0, 1, side)
        else:
            write_rows(sides, start, stop, side)
    write_rows(out, start, stop, block)


def side_array_name(name: str, kind: str) -> str | None:
    return {"master": name + SUMS_SUFFIX, "float": name + MAX_SUFFIX, "grouped": name + GROUP_SUFFIX}.get(kind)


def run(ctx: StageContext) -> None:
    ckpt = ctx.checkpoint
    plan = ckpt.plan
    group = open_store(ctx.output)
    group.attrs.update({
        "stage": "extract",
        "family": plan.family.name,
        "arch": plan.arch,
        "model_dir": str(ckpt.model_dir),
        "config": plan.config,
        "tensor_order": [t.gguf_name for t in plan.tensors],
    })
    tasks = []
    for t in plan.tensors:
        src = ckpt.sources[t.hf_name]
        kind = ("packed" if t.recipe.packed else "grouped" if t.recipe.weights == GROUPED
                else "master" if t.role == TERNARY else "float")
        rows = ctx.budget.rows_per_chunk(src.shape)
        arr = ensure_array(group, t.gguf_name, src.shape, rows, src.np_dtype, {
            "hf_name": t.hf_name, "role": t.role, "source_dtype": src.dtype,
            "source_file": src.file.name, "shape": list(t.shape), "recipe": t.recipe.as_json(),
        })
        side = side_array_name(t.gguf_name, kind)
        if side and kind == "grouped":
            ensure_array(group, side, (src.shape[0], src.shape[1] // GROUP_COLUMNS), rows, np.float32,
                         {"of": t.gguf_name})
        elif side:
            n_rows = src.shape[0] if len(src.shape) > 1 else 1
            ensure_array(group, side, (n_rows,), rows if len(src.shape) > 1 else 1,
                         np.float64 if kind == "master" else np.float32, {"of": t.gguf_name})
        done = written_chunks(arr)
        out = array_path(ctx.output, t.gguf_name)
        for i, (r0, r1) in enumerate(row_ranges(src.shape[0], rows)):
            if i not in done:
                tasks.append(chunk_task(copy_rows, src, out, r0, r1, kind))
    ctx.scheduler.run(tasks, "extract")


def largest_values(store, name: str) -> float:
    """max |x| of a float tensor, from the row maxima extract recorded."""
    maxima = open_store(store, "r")[name + MAX_SUFFIX]
    return float(read_rows(maxima, 0, maxima.shape[0]).max(initial=0.0))
