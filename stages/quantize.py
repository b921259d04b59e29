"""quantize: extract.zarr -> quantize.zarr.

Every ternary projection becomes its codes at 2 bits per value (pipeline/codecs/base.py
`pack_fields`: blocks of 128 values in 32 bytes; rows that are not whole blocks keep
int8 codes) plus one float32 `scale` (the magnitude a code of +-1 stands for),
following the tensor's recipe:

- master weights (absmean): extract already wrote the per-row float64 sums of |W|
  beside each tensor; they are reduced exactly with `math.fsum` into the absmean
  scale, written to the array's attributes before the codes pass. The scale does not
  depend on how rows were chunked, and a resumed run never recomputes it.
- packed weights: the codes are already there (never re-quantized); a chunk of
  output rows is read from the packed quarters it lives in, and the scale is the
  checkpoint's weight_scale in the family's direction (1 / ws or ws).
- group-scaled weights (float values already {-s, 0, +s} per group of columns): the codes
  are the values' signs; the magnitudes extract recorded per 32 values decide the scale:
  one for the whole tensor (`scale`, any output type), or one per block of 64 values
  (`<name>.block_scales`, rows x cols / 64; only Q2_0 holds that), or, when the
  magnitude changes inside a block of 64, one per 32 values (rows x cols / 32: no type
  holds that; pack refuses it, naming the tensor, or requantizes it with
  --allow-requantize). The values per block scale are cols / the array's columns. The count
  of zero values (attribute `zeros`, from extract's per-row counts) says whether the tensor is
  binary ({-s, +s}, 0 zeros: Q1_0 holds it) or ternary. A tensor scaled per row (BitCPM) is
  the case whose group is the whole row: its block scales agree along each row, so every type
  with a block scale (TQ2_0, TQ1_0, Q2_0) holds it where a row is whole blocks. Attribute
  `scale_granularity` says which case a tensor is: "tensor", "row" or "group N".

Either way, the llama q/k permutation moves rows within whole heads, so a chunk is
a whole number of heads. A packed byte with a 2-bit field of 3 (not a code) is refused
here, naming the tensor: this is the one pass that reads the packed bytes. Other tensors
are not rewritten: their arrays index the same checkpoint bytes as extract's (or, for an
array extract copied, hard-link its chunk files); pack encodes them in their output type.

The per-chunk kernels (`ternary_fields`, `code_rows`, `row_abs_sums`) take a
`read(start, stop)` function of source rows, so `verify` runs the very same code
on the safetensors files.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.codecs import (CODE_BLOCK, NonFiniteWeights, absmean_scale, absmean_total, codes_from_packed,
                             pack_fields, absmean_row_sums, scale_granularity, sign_fields,
                             ternary_codes)
from pipeline.context import StageContext
from pipeline.errors import CheckpointError
from pipeline.families import (GROUP_COLUMNS, GROUPED, TERNARY, Recipe, apply_reorder, apply_transform,
                               source_row_runs)
from pipeline.plan import LAYOUT_2BIT, LAYOUT_INT8, code_layout, packed_blocks, ternary_scale
from pipeline.safetensors_io import as_float32
from pipeline.scheduler import chunk_task, run_reading_ahead
from pipeline.stores import (array_path, copy_ref, ensure_array, get_array, has_member, index_array, is_indexed,
                             is_raw, link_chunk, open_array, open_store, read_rows, remote_range, row_ranges, source_ref,
                             write_rows, written_chunks)

ReadRows = Callable[[int, int], np.ndarray]
SUMS_SUFFIX = ".abs_sums"     # extract.zarr: per-row float64 sums of |W| beside a master-weight projection
GROUP_SUFFIX = ".group_max"   # extract.zarr: magnitude of every GROUP_COLUMNS values of a group-scaled projection
ZEROS_SUFFIX = ".zeros"          # extract.zarr: zero values per row of a group-scaled projection (or embedding)
TERNARY_ROWS_SUFFIX = ".ternary_rows"  # extract.zarr: 1 where an embedding row is {-s, 0, +s} per group
BLOCK_SCALES_SUFFIX = ".block_scales"  # quantize.zarr: one scale per 64 (or 32) values, when not one per tensor
SCALE_BLOCK = 64              # values per block scale (Q2_0's block)



class CorruptCodes(ValueError):
    """Packed data that is not ternary (a 2-bit field holding 3)."""


def invalid_packed_fields(block: np.ndarray) -> int:
    """How many 2-bit fields of a packed uint8 block hold 3 (only 0, 1, 2 are codes)."""
    both_bits = (block >> 1) & block & np.uint8(0x55)
    if not both_bits.any():
        return 0
    return int(np.unpackbits(both_bits).sum())


def corrupt_packed(src, bad: int, start: int, stop: int) -> CheckpointError:
    """The refusal of packed rows [start, stop) of extract's array `src` holding `bad` fields of 3."""
    ref = source_ref(src) or {}
    return CheckpointError(f"{ref.get('file', src.attrs.get('source_file'))}: tensor {src.attrs.get('hf_name')} holds "
                           f"{bad} packed 2-bit field(s) of value 3 in rows {start}..{stop}; only 0, 1 and 2 are "
                           "ternary codes, the file is corrupt")


# -- per-chunk kernels ---------------------------------------------------------------------------

def unpack_fields_rows(read_packed: ReadRows, start: int, stop: int, out_rows: int) -> np.ndarray:
    """Fields (code + 1, uint8) of unpacked rows [start, stop) of a (out_rows, cols) projection
    stored packed as (out_rows / 4, cols) uint8: row k * (out_rows / 4) + r is bits 2k..2k+1 of
    packed row r, and a field f stands for the code f - 1."""
    quarter = out_rows // 4
    pieces = []
    r = start
    while r < stop:
        k = r // quarter
        end = min(stop, (k + 1) * quarter)
        fields = np.asarray(read_packed(r - k * quarter, end - k * quarter), dtype=np.uint8) >> np.uint8(2 * k)
        fields &= np.uint8(3)
        if (fields == 3).any():
            raise CorruptCodes(f"packed field value 3 in rows {r}..{end}")
        pieces.append(fields)
        r = end
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def quarters_from_packed(packed: np.ndarray) -> np.ndarray:
    """The 2-bit code layout of all four output row blocks a block of packed rows holds.

    `packed`: (R, cols) uint8 rows r0..r0+R of a packed projection (cols a multiple of 128);
    returns (4, R, cols / 4): block k is output rows k * (out / 4) + r0 .. + R in the layout of
    `pipeline.codecs.pack_fields`. A packed byte holds one field per quarter (bits 2k..2k+1)
    and a code-layout byte holds four columns 32 apart of one quarter, so a 32-bit word of
    the four bytes at columns 128i + b + 32j (j = 0..3) is a 4 x 4 matrix of 2-bit fields:
    transposing it (two masked swaps) turns it into the four output bytes at once.
    """
    rows, cols = packed.shape
    nb = cols // CODE_BLOCK
    words = np.ascontiguousarray(packed.reshape(rows, nb, 4, 32).transpose(0, 1, 3, 2)).view("<u4")
    # field (j, k) sits at bit 8j + 2k; swap the off-diagonal 2 x 2 blocks, then inside them
    t = ((words >> np.uint32(12)) ^ words) & np.uint32(0x0000F0F0)
    words ^= t ^ (t << np.uint32(12))
    t = ((words >> np.uint32(6)) ^ words) & np.uint32(0x00CC00CC)
    words ^= t ^ (t << np.uint32(6))
    return words.view(np.uint8).reshape(rows, nb, 32, 4).transpose(3, 0, 1, 2).reshape(4, rows, nb * 32)


def permute_heads(block: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for NORM rope from Hugging Face's rotate-half order, within
    each of the block's `n_heads` whole heads: row 2i + j of a head is HF row j * (d/2) + i."""
    rows, cols = block.shape
    return block.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def row_abs_sums(read: ReadRows, start: int, stop: int, source_dtype: str) -> np.ndarray:
    """Per-row float64 sums of |W| of master-weight rows [start, stop)."""
    return absmean_row_sums(as_float32(read(start, stop), source_dtype))


def ternary_fields(read: ReadRows, start: int, stop: int, recipe: Recipe, out_rows: int, source_dtype: str,
                   absmean: float | None) -> np.ndarray:
    """Fields (code + 1 in {0, 1, 2}, uint8) of GGUF rows [start, stop) of a ternary projection
    (whole heads when permuted)."""
    if recipe.packed:
        fields = unpack_fields_rows(read, start, stop, out_rows)
    elif recipe.weights == GROUPED:
        fields = sign_fields(as_float32(read(start, stop), source_dtype))
    else:
        fields = ternary_codes(as_float32(read(start, stop), source_dtype), np.float32(absmean)).view(np.uint8)
        fields += np.uint8(1)  # int8 -1/0/+1 viewed as uint8 is 255/0/1; + 1 wraps to 0/1/2
    if recipe.permute_heads:
        fields = permute_heads(fields, (stop - start) // recipe.row_multiple)
    return fields


def code_rows(read: ReadRows, start: int, stop: int, recipe: Recipe, shape: tuple[int, int], source_dtype: str,
              absmean: float | None) -> np.ndarray:
    """What quantize.zarr stores for GGUF rows [start, stop): 2-bit codes, or int8 codes for rows
    that are not whole 128-value blocks."""
    fields = ternary_fields(read, start, stop, recipe, shape[0], source_dtype, absmean)
    if code_layout(shape[1]) == LAYOUT_2BIT:
        return pack_fields(fields)
    return fields.view(np.int8) - np.int8(1)


def stored_codes(block: np.ndarray, layout: str) -> np.ndarray:
    """int8 codes from what quantize.zarr stores."""
    return codes_from_packed(block) if layout == LAYOUT_2BIT else np.asarray(block, dtype=np.int8)


def codes_of(arr, start: int, stop: int) -> np.ndarray:
    """int8 codes in {-1, 0, +1} of rows [start, stop) of a quantize.zarr ternary array, whatever
    its on-disk layout (for inspect and notebooks)."""
    return stored_codes(arr[start:stop], arr.attrs.get("code_layout", LAYOUT_INT8))


def group_scales(mags: np.ndarray) -> tuple[float | None, np.ndarray | None]:
    """(one scale for the whole tensor, or None; else float32 block scales) from the per-32-value
    magnitudes of a group-scaled tensor (0: a group of zeros, which takes any scale). The blocks
    are of 64 values where each block's non-zero magnitudes agree (Q2_0 holds that), else of 32."""
    nonzero = mags[mags > 0]
    if nonzero.size == 0 or (nonzero == nonzero[0]).all():
        return (float(nonzero[0]) if nonzero.size else 1.0), None
    halves = mags.reshape(mags.shape[0], -1, SCALE_BLOCK // GROUP_COLUMNS)
    top = halves.max(axis=2)
    if ((halves != top[..., None]) & (halves > 0)).any():
        return None, np.asarray(mags, dtype=np.float32)
    return None, top.astype(np.float32)


def values_per_scale(block_scales, cols: int) -> int:
    """How many values of a row one block scale covers (64, or 32: see group_scales)."""
    return cols // block_scales.shape[1]


def zero_attrs(zeros: np.ndarray) -> dict:
    """`zeros` (total zero values) and `first_zero_row` from the per-row counts extract wrote."""
    rows_with = np.flatnonzero(zeros)
    return {"zeros": int(zeros.sum(dtype=np.int64)), "first_zero_row": int(rows_with[0]) if rows_with.size else None}


def ternary_embedding_attrs(ctx: StageContext, source, group, name: str) -> dict:
    """What --embedding-type q2_0 / q1_0 / tq2_0 needs of an embedding or head of a group-scaled
    checkpoint: whether every row is {-s, 0, +s} per group (else the first row that is not and how
    many are not), its zeros, and its scale (one per tensor, else `<name>.block_scales` as for a
    projection). Done for every such conversion (pack alone knows the embedding type), so the
    magnitudes (a float32 per 32 values: 78 MB for a 151936 x 4096 embedding) are read in row
    chunks of the budget, twice: to decide the layout, then to write the block scales."""
    rows_flags = get_array(source, name + TERNARY_ROWS_SUFFIX)
    ternary = read_rows(rows_flags, 0, rows_flags.shape[0])
    attrs = {"ternary_rows": bool(ternary.all()), **zero_attrs(read_rows(get_array(source, name + ZEROS_SUFFIX), 0,
                                                                       ternary.shape[0]))}
    if not attrs["ternary_rows"]:
        bad = np.flatnonzero(ternary == 0)
        return {**attrs, "first_nonternary_row": int(bad[0]), "nonternary_rows": int(bad.size), "scale": None}
    mags = get_array(source, name + GROUP_SUFFIX)
    rows = ctx.budget.rows_per_chunk((mags.shape[0], mags.shape[1] * GROUP_COLUMNS))
    ranges = row_ranges(mags.shape[0], rows)
    first, uniform, per64 = None, True, True
    for r0, r1 in ranges:
        m = read_rows(mags, r0, r1)
        nonzero = m[m > 0]
        if nonzero.size:
            first = nonzero[0] if first is None else first
            uniform = uniform and bool((nonzero == first).all())
        halves = m.reshape(m.shape[0], -1, SCALE_BLOCK // GROUP_COLUMNS)
        per64 = per64 and not ((halves != halves.max(axis=2, keepdims=True)) & (halves > 0)).any()
    if uniform:
        return {**attrs, "scale": float(first) if first is not None else 1.0}
    per = SCALE_BLOCK if per64 else GROUP_COLUMNS
    shape = (mags.shape[0], mags.shape[1] * GROUP_COLUMNS // per)
    ensure_array(group, name + BLOCK_SCALES_SUFFIX, shape, rows, np.float32, {"of": name})
    for r0, r1 in ranges:  # one scale per 64 values where each 64 holds one, else per 32 (group_scales' rule)
        m = read_rows(mags, r0, r1)
        blocks = m.reshape(m.shape[0], -1, SCALE_BLOCK // GROUP_COLUMNS).max(axis=2) if per64 else m
        write_rows(array_path(ctx.output, name + BLOCK_SCALES_SUFFIX), r0, r1, blocks.astype(np.float32))
    return {**attrs, "scale": None}


# -- tasks ---------------------------------------------------------------------------------------

def codes_task(src: str, out: str, start: int, stop: int, recipe: dict, shape: list, source_dtype: str,
               absmean: float | None) -> None:
    recipe = Recipe.from_json(recipe)
    source = open_array(src, "r")

    def read(a: int, b: int) -> np.ndarray:
        # qwen35's V-head reorder: output rows from their source runs (each a whole head), or columns
        runs = source_row_runs(recipe.reorder, a, b, shape[0])
        block = read_rows(source, a, b) if len(runs) == 1 and runs[0] == (a, b) else \
            np.concatenate([read_rows(source, r0, r1) for r0, r1 in runs])
        if recipe.reorder is not None and recipe.reorder[0] == 1:
            block = apply_reorder(recipe.reorder, block)
        if recipe.packed and (bad := invalid_packed_fields(block)):  # name the tensor, count the bad fields
            raise corrupt_packed(source, bad, a, b)
        return block
    write_rows(out, start, stop, code_rows(read, start, stop, recipe, tuple(shape), source_dtype, absmean))


def quarters_task(src: str, out: str, start: int, stop: int, recipe: dict, shape: list, missing: list) -> None:
    """Packed rows [start, stop) -> the four output chunks (of rows stop - start) they hold."""
    recipe = Recipe.from_json(recipe)
    source = open_array(src, "r")
    packed = read_rows(source, start, stop)
    if bad := invalid_packed_fields(packed):
        raise corrupt_packed(source, bad, start, stop)
    quarters = quarters_from_packed(packed)
    quarter = shape[0] // 4
    for k in missing:
        block = quarters[k]
        if recipe.permute_heads:
            block = permute_heads(block, (stop - start) // recipe.row_multiple)
        write_rows(out, k * quarter + start, k * quarter + stop, block)


def rewrite_task(src: str, out: str, recipe: dict, shape: list, source_dtype: str) -> None:
    """A small float tensor whose values or order are not the checkpoint's (Recipe.rewritten), whole:
    float32 values in the GGUF's shape and order."""
    recipe = Recipe.from_json(recipe)
    source = open_array(src, "r")
    values = as_float32(read_rows(source, 0, source.shape[0]), source_dtype).reshape(shape)
    values = apply_reorder(recipe.reorder, apply_transform(recipe.transform, values, source_dtype))
    write_rows(out, 0, shape[0], values)


def reordered_group_side(recipe: Recipe, mags: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """extract's per-32-value magnitudes and per-row zeros of a V-reordered projection, in GGUF order
    (a column reorder moves whole value heads: whole runs of 32, _hybrid_dims checks)."""
    if recipe.reorder is None:
        return mags, zeros
    axis, first, n_k, per_k, head = recipe.reorder
    if axis == 0:
        return apply_reorder(recipe.reorder, mags), apply_reorder(recipe.reorder, zeros)
    return apply_reorder((1, first // GROUP_COLUMNS, n_k, per_k, head // GROUP_COLUMNS), mags), zeros


def link_task(src: str, out: str, index: int) -> None:
    link_chunk(open_array(src, "r"), open_array(out, "r"), index)


def copy_task(src: str, out: str, start: int, stop: int) -> None:
    write_rows(out, start, stop, read_rows(open_array(src, "r"), start, stop))


def run(ctx: StageContext) -> None:
    source = open_store(ctx.input, "r")
    group = open_store(ctx.output)
    group.update_attributes({**source.attrs.asdict(), "stage": "quantize"})  # one write (attrs.update: one a key)
    names = source.attrs["tensor_order"]

    tasks, ahead = [], {}  # ahead: task index -> the remote byte range it reads, where that is one range
    for name in names:
        src = get_array(source, name)
        recipe = Recipe.from_json(src.attrs["recipe"])
        shape = tuple(src.attrs["shape"])
        base = {"hf_name": src.attrs["hf_name"], "role": recipe.role, "source_dtype": src.attrs["source_dtype"],
                "recipe": recipe.as_json(), "shape": list(shape)}
        paths = (array_path(ctx.input, name), array_path(ctx.output, name))
        if recipe.role != TERNARY and recipe.rewritten:
            base["source_dtype"] = "F32"  # what rewrite_task writes
            arr = ensure_array(group, name, shape, shape[0], np.float32, base)
            if not written_chunks(arr):
                tasks.append(chunk_task(rewrite_task, *paths, recipe.as_json(), list(shape), src.attrs["source_dtype"]))
            continue
        if recipe.role != TERNARY:
            # not rewritten: the same checkpoint bytes, or the same chunk files (pack encodes them in
            # their output type); chunks of this run's size (extract may have run under a larger limit)
            rows = ctx.plan.tensor(name).chunk_rows["quantize"]
            if has_member(source, name + GROUP_SUFFIX):  # an embedding or head that may be ternary: its groups
                base.update(ternary_embedding_attrs(ctx, source, group, name))
            if is_indexed(src):
                index_array(group, name, src.shape, rows, src.dtype, base, copy_ref(src))
                continue
            arr = ensure_array(group, name, src.shape, rows, src.dtype, base)
            same = rows == src.chunks[0] and is_raw(src) and is_raw(arr)
            done = written_chunks(arr)
            for i, (r0, r1) in enumerate(row_ranges(src.shape[0], rows)):
                if i not in done:
                    tasks.append(chunk_task(link_task, *paths, i) if same else chunk_task(copy_task, *paths, r0, r1))
            continue
        layout = code_layout(shape[1])
        rows = ctx.plan.tensor(name).chunk_rows["quantize"]  # the plan's (pipeline/plan.py chunk_rows)
        block_rows = rows if packed_blocks(shape, recipe) else None
        stored = (shape[0], shape[1] // 4) if layout == LAYOUT_2BIT else shape
        codes_dtype = np.uint8 if layout == LAYOUT_2BIT else np.int8
        # a resumed run's array keeps its scale; a new one is written once, with it
        arr = ensure_array(group, name, stored, rows, codes_dtype, {**base, "code_layout": layout}) \
            if has_member(group, name) else None
        if recipe.weights == GROUPED and (arr is None or "scale" not in arr.attrs):
            mags = get_array(source, name + GROUP_SUFFIX)
            mags, zeros = reordered_group_side(recipe, read_rows(mags, 0, mags.shape[0]),
                                               read_rows(get_array(source, name + ZEROS_SUFFIX), 0, shape[0]))
            scale, blocks = group_scales(mags)
            if blocks is not None:
                if recipe.permute_heads:  # the codes' rows move (llama q/k order): their scales with them
                    blocks = permute_heads(blocks, recipe.permute_heads)
                ensure_array(group, name + BLOCK_SCALES_SUFFIX, blocks.shape, blocks.shape[0], np.float32,
                             {"of": name})
                write_rows(array_path(ctx.output, name + BLOCK_SCALES_SUFFIX), 0, blocks.shape[0], blocks)
            # binary ({-s, +s}) when no value is 0: Q1_0 holds it; the first row with a zero names it otherwise
            arr = ensure_array(group, name, stored, rows, codes_dtype, {
                **base, "code_layout": layout, "absmean": None, "scale": scale,
                "scale_granularity": scale_granularity(mags, GROUP_COLUMNS), **zero_attrs(zeros)})
        elif arr is None or "scale" not in arr.attrs:
            absmean = None
            if recipe.scale_rule == "absmean":  # the row sums extract wrote beside the tensor
                sums = get_array(source, name + SUMS_SUFFIX)
                try:
                    absmean = float(absmean_scale(absmean_total([read_rows(sums, 0, sums.shape[0])]), src.size))
                except NonFiniteWeights as e:
                    raise NonFiniteWeights(f"{src.attrs['source_file']}: tensor {src.attrs['hf_name']}: {e}") \
                        from None
            # rewritten as extract writes its arrays' metadata (ensure_array): zarr's attrs.update
            # costs several times more, for every projection
            arr = ensure_array(group, name, stored, rows, codes_dtype, {
                **base, "code_layout": layout, "absmean": absmean, "scale": float(ternary_scale(recipe, absmean)),
                "scale_granularity": "tensor"})
        done = written_chunks(arr)
        if block_rows:  # packed: one task reads a block of packed rows once for four output chunks
            per_quarter = shape[0] // 4 // block_rows
            for i, (r0, r1) in enumerate(row_ranges(shape[0] // 4, block_rows)):
                missing = [k for k in range(4) if k * per_quarter + i not in done]
                if missing:
                    ahead[len(tasks)] = remote_range(src, r0, r1)
                    tasks.append(chunk_task(quarters_task, *paths, r0, r1, recipe.as_json(), list(shape), missing))
            continue
        one_range = not recipe.packed and recipe.reorder is None  # codes_task reads rows [r0, r1) at once
        for i, (r0, r1) in enumerate(row_ranges(shape[0], rows)):
            if i not in done:
                ahead[len(tasks)] = remote_range(src, r0, r1) if one_range else None
                tasks.append(chunk_task(codes_task, *paths, r0, r1, recipe.as_json(), list(shape),
                                        src.attrs["source_dtype"], arr.attrs["absmean"]))
    run_reading_ahead(ctx, tasks, [ahead.get(i) for i in range(len(tasks))], "quantize")
