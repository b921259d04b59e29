"""quantize: extract.zarr -> quantize.zarr.

Every ternary projection becomes int8 codes in {-1, 0, +1} plus one float32
`scale` (the magnitude a code of +-1 stands for), following the tensor's recipe:

- master weights (absmean): two chunked passes. Per-row sums of |W| (float64),
  reduced exactly with `math.fsum` into the absmean scale, written to the array's
  attributes before the second pass turns each chunk into codes. The scale does not
  depend on how rows were chunked, and a resumed run never recomputes it.
- packed weights: the codes are already there (never re-quantized); a chunk of
  output rows is read from the packed quarters it lives in, and the scale is the
  checkpoint's weight_scale in the family's direction (1 / ws or ws).

Either way, the llama q/k permutation moves rows within whole heads, so a chunk is
a whole number of heads. Other tensors are kept exactly as extracted (pack encodes
them in their output float type, F16 / BF16 / F32 / Q8_0).

The per-chunk kernels (`ternary_rows`, `row_abs_sums`) take a
`read(start, stop)` function of source rows, so `verify` runs the very same code
on the safetensors files.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.codecs import (NonFiniteWeights, absmean_row_sums, absmean_scale, absmean_total, effective_scale,
                             ternary_codes)
from pipeline.context import StageContext
from pipeline.families import TERNARY, Recipe
from pipeline.safetensors_io import as_float32
from pipeline.scheduler import chunk_task
from pipeline.stores import array_path, ensure_array, open_array, open_store, row_ranges, written_chunks

ReadRows = Callable[[int, int], np.ndarray]


class CorruptCodes(ValueError):
    """Packed data that is not ternary reached quantize (extract refuses it; this is a guard)."""


# -- per-chunk kernels ---------------------------------------------------------------------------

def unpack_rows(read_packed: ReadRows, start: int, stop: int, out_rows: int) -> np.ndarray:
    """int8 codes of unpacked rows [start, stop) of a (out_rows, cols) projection stored packed
    as (out_rows / 4, cols) uint8: row k * (out_rows / 4) + r is bits 2k..2k+1 of packed row r,
    and a field f stands for the code f - 1."""
    quarter = out_rows // 4
    pieces = []
    r = start
    while r < stop:
        k = r // quarter
        end = min(stop, (k + 1) * quarter)
        fields = (np.asarray(read_packed(r - k * quarter, end - k * quarter), dtype=np.uint8) >> np.uint8(2 * k)) \
            & np.uint8(3)
        if (fields == 3).any():
            raise CorruptCodes(f"packed field value 3 in rows {r}..{end}")
        pieces.append(fields.view(np.int8) - np.int8(1))
        r = end
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def permute_heads(block: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for NORM rope from Hugging Face's rotate-half order, within
    each of the block's `n_heads` whole heads: row 2i + j of a head is HF row j * (d/2) + i."""
    rows, cols = block.shape
    return block.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def row_abs_sums(read: ReadRows, start: int, stop: int, source_dtype: str) -> np.ndarray:
    """Per-row float64 sums of |W| of master-weight rows [start, stop)."""
    return absmean_row_sums(as_float32(read(start, stop), source_dtype))


def ternary_rows(read: ReadRows, start: int, stop: int, recipe: Recipe, out_rows: int, source_dtype: str,
                 absmean: float | None) -> np.ndarray:
    """int8 codes of GGUF rows [start, stop) of a ternary projection (whole heads when permuted)."""
    if recipe.packed:
        codes = unpack_rows(read, start, stop, out_rows)
    else:
        codes = ternary_codes(as_float32(read(start, stop), source_dtype), np.float32(absmean))
    if recipe.permute_heads:
        codes = permute_heads(codes, (stop - start) // recipe.row_multiple)
    return codes


def ternary_scale(recipe: Recipe, absmean: float | None) -> np.float32:
    """The magnitude a code of +-1 stands for, as the reference converters compute it in float32."""
    if recipe.scale_rule == "absmean":
        # codes use iscale = 1/absmean; the values they stand for are codes / iscale, which
        # llama.cpp's converter writes and which can differ from codes * absmean in the last bit
        return effective_scale(np.float32(absmean))
    ws = np.float32(recipe.weight_scale)
    if recipe.scale_rule == "divide":  # BitLinear: W = codes / weight_scale (float32 division, as torch)
        return np.float32(1) / ws
    if recipe.scale_rule == "multiply":  # AutoBitLinear: W = codes * weight_scale
        return ws
    raise ValueError(f"unknown scale rule {recipe.scale_rule!r}")


def ternary_chunk_rows(budget, shape: tuple[int, ...], recipe: Recipe) -> int:
    """Output rows per chunk of a ternary tensor: within the budget, whole heads when permuted."""
    return budget.rows_per_chunk(shape, multiple=recipe.row_multiple)


def codes_of(arr, start: int, stop: int) -> np.ndarray:
    """int8 codes in {-1, 0, +1} of rows [start, stop) of a quantize.zarr ternary array, whatever
    its on-disk layout (for inspect and notebooks)."""
    return np.asarray(arr[start:stop], dtype=np.int8)


# -- tasks ---------------------------------------------------------------------------------------

def _reader(path: str) -> ReadRows:
    arr = open_array(path, "r")
    return lambda a, b: arr[a:b]


def sums_task(src: str, start: int, stop: int, source_dtype: str) -> np.ndarray:
    return row_abs_sums(_reader(src), start, stop, source_dtype)


def codes_task(src: str, out: str, start: int, stop: int, recipe: dict, out_rows: int, source_dtype: str,
               absmean: float | None) -> None:
    open_array(out)[start:stop] = ternary_rows(_reader(src), start, stop, Recipe.from_json(recipe), out_rows,
                                               source_dtype, absmean)


def copy_task(src: str, out: str, start: int, stop: int) -> None:
    open_array(out)[start:stop] = open_array(src, "r")[start:stop]


def run(ctx: StageContext) -> None:
    source = open_store(ctx.input, "r")
    group = open_store(ctx.output)
    group.attrs.update({**source.attrs.asdict(), "stage": "quantize"})
    names = source.attrs["tensor_order"]

    layouts = {}
    for name in names:
        src = source[name]
        recipe = Recipe.from_json(src.attrs["recipe"])
        shape = tuple(src.attrs["shape"])
        base = {"hf_name": src.attrs["hf_name"], "role": recipe.role, "source_dtype": src.attrs["source_dtype"],
                "recipe": recipe.as_json()}
        if recipe.role == TERNARY:
            rows = ternary_chunk_rows(ctx.budget, shape, recipe)
            arr = ensure_array(group, name, shape, rows, np.int8, base, compress=True)
        else:  # kept in the source representation; pack encodes it in the chosen float type
            rows = src.chunks[0]
            arr = ensure_array(group, name, shape, rows, src.dtype, base)
        layouts[name] = (src, arr, recipe, rows)

    # pass 1: absmean scales of master-weight projections that do not have one yet; packed
    # projections take theirs from the checkpoint's weight_scale
    pending = [n for n, (_, arr, recipe, _) in layouts.items() if recipe.role == TERNARY and "scale" not in arr.attrs]
    tasks, owners = [], []
    for name in pending:
        src, _, recipe, rows = layouts[name]
        if recipe.scale_rule == "absmean":
            for r0, r1 in row_ranges(src.shape[0], rows):
                tasks.append(chunk_task(sums_task, array_path(ctx.input, name), r0, r1, src.attrs["source_dtype"]))
                owners.append(name)
    sums: dict[str, list[np.ndarray]] = {n: [] for n in pending}
    for name, part in zip(owners, ctx.scheduler.run(tasks, "quantize: scales")):
        sums[name].append(part)
    for name in pending:
        src, arr, recipe, _ = layouts[name]
        absmean = None
        if recipe.scale_rule == "absmean":
            try:
                absmean = float(absmean_scale(absmean_total(sums[name]), src.size))
            except NonFiniteWeights as e:
                raise NonFiniteWeights(f"{src.attrs['source_file']}: tensor {src.attrs['hf_name']}: {e}") from None
        arr.attrs.update({"absmean": absmean, "scale": float(ternary_scale(recipe, absmean))})

    # pass 2: codes for ternary tensors, copies of the rest
    tasks = []
    for name in names:
        src, arr, recipe, rows = layouts[name]
        done = written_chunks(arr)
        sdtype = src.attrs["source_dtype"]
        for i, (r0, r1) in enumerate(row_ranges(arr.shape[0], rows)):
            if i in done:
                continue
            paths = (array_path(ctx.input, name), array_path(ctx.output, name))
            if recipe.role == TERNARY:
                tasks.append(chunk_task(codes_task, *paths, r0, r1, recipe.as_json(), arr.shape[0], sdtype,
                                        arr.attrs["absmean"]))
            else:
                tasks.append(chunk_task(copy_task, *paths, r0, r1))
    ctx.scheduler.run(tasks, "quantize")
