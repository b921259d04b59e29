"""pack: quantize.zarr -> pack.zarr, the exact bytes each GGUF tensor will hold.

Every array is uint8 of shape (rows, bytes per row) (but the `codes_from` arrays below),
chunked by the same row ranges as quantize.zarr (a row is a whole number of blocks, so
chunks are block aligned). Attribute `ggml_type` names the GGML type (pipeline/outtypes.py).
Ternary codes arrive at 2 bits per value in TQ2_0's block order, so TQ2_0 is a copy plus the
block scales and I2_S a byte lookup (pipeline/codecs/ `encode_codes`; the layout of
`--target`'s bitnet.cpp build, one registry entry each): `read_rows` of such an array gives
those bytes. TL1/TL2 bytes come in tiles of BM
rows (from --kernel-config): their chunks hold whole tiles, so any memory limit and any
number of workers give the same bytes; TL2's three regions are column ranges of each
row chunk, which assemble writes region by region. With a float --type (f32, f16, bf16,
q8_0) the projections are their effective weights, the ternary values times the scale, as
llama.cpp's converter writes them with --outtype. A ternary
tensor whose row length is not a whole number of blocks of the requested type is
written as F16 (the ternary values times the scale), as llama.cpp's converter does.
Float tensors whose bytes do not change (an F32 norm from an F32 checkpoint, a BF16
embedding with --embedding-type bf16) are not copied: their arrays index the checkpoint's
bytes, which assemble copies into the GGUF (or hard-link the previous store's chunk files).
TQ2_0 and I2_S, whose bytes are a copy or a byte lookup of quantize's 2-bit codes, are not
written here either: their arrays hard-link quantize's code chunks (attribute `codes_from`) and
assemble encodes them as it writes the file (the types marked `from_codes` in outtypes.py).

A group-scaled tensor (quantize.zarr's block scales, one per 64 values, or per 32 where the data
changes that often) is written with one scale per block of the type where the scale is constant
over each; otherwise it is refused, or with
--allow-requantize its effective weights are requantized by the type's own quantizer
(pipeline/plan.py), with a warning saying what changed.

A scale the output type cannot hold as a normal number (a TQ block's fp16 d, an F16
fallback's values, I2_S's float32) is refused before any work, naming the tensor.
"""
from __future__ import annotations

import numpy as np

from pipeline.codecs import CODECS, Q1_0, codes_from_packed, encode_floats
from pipeline.context import StageContext
from pipeline.errors import CheckpointError
from pipeline.families import GROUP_COLUMNS, GROUPED, TERNARY, Recipe
from pipeline.kernel_config import tiles_of
from pipeline.outtypes import EMBEDDING_CHOICES, OUTPUT_TYPES, TERNARY_CHOICES
from pipeline.safetensors_io import as_float32
from pipeline.scheduler import chunk_task
from pipeline.stores import (CODES_FROM, ENCODED_FROM, array_path, copy_ref, ensure_array, get_array, index_array,
                             is_indexed, is_raw, open_array, open_store, read_rows, row_ranges, write_rows,
                             written_chunks)
from pipeline.plan import (LAYOUT_2BIT, LAYOUT_INT8, SAME_BYTES, check_scale, encoded_in_assemble, requantize_summary,
                           requantized_codes, requantized_scale, row_scaled)
from stages.quantize import BLOCK_SCALES_SUFFIX, link_task, values_per_scale


def scales_per_type_block(block_scales: np.ndarray, block_size: int, per_scale: int) -> np.ndarray:
    """One scale per block of an output type from one per `per_scale` values (group-scaled tensors;
    the scale is known to be constant over each of the type's blocks, zeros aside)."""
    rows = block_scales.shape[0]
    return block_scales.reshape(rows, -1, block_size // per_scale).max(axis=2)


def nonzero_per_block(ctx: StageContext, name: str, shape: tuple[int, int], per_scale: int) -> np.ndarray:
    """Non-zero codes of every block of `per_scale` values (one block scale each) of a quantize.zarr
    ternary array (uint8, rows x cols / per_scale), read chunk by chunk: what the requantization
    warning weighs each block's change with."""
    arr = open_array(array_path(ctx.input, name), "r")
    layout = arr.attrs.get("code_layout", LAYOUT_INT8)
    counts = []
    for r0, r1 in row_ranges(shape[0], ctx.budget.rows_per_chunk(shape)):
        block = read_rows(arr, r0, r1)
        codes = codes_from_packed(block) if layout == LAYOUT_2BIT else np.asarray(block, dtype=np.int8)
        counts.append((codes != 0).reshape(r1 - r0, -1, per_scale).sum(axis=2).astype(np.uint8))
    return np.concatenate(counts) if counts else np.zeros((0, shape[1] // per_scale), np.uint8)


def block_scale_problem(block_scales: np.ndarray, out, per_scale: int) -> str | None:
    """Why a group-scaled tensor (one scale per `per_scale` values) cannot be `out` without
    requantizing, or None: the type keeps one fp16 scale per block of block_size values (TQ, Q2_0;
    I2_S and TL one per tensor, after their codes), so the scale must be constant over each block."""
    codec = out.codec
    if not codec.ternary:  # a float type of the effective weights (--type f16, or the fallback): their values
        return None
    if row_scaled(codec):  # ik_llama.cpp's IQ*_BN: one scale per row (its row meta)
        top = block_scales.max(axis=1, keepdims=True)
        clash = (block_scales != top) & (block_scales > 0)
        if not clash.any():
            return None
        r, b = np.argwhere(clash)[0]
        return (f"its scale changes along a row (row {r}: {float(block_scales[r, b]):.6g} at columns "
                f"{b * per_scale}..{(b + 1) * per_scale - 1}, {float(top[r, 0]):.6g} elsewhere), and {codec.name} "
                f"keeps one scale per row")
    if codec.block_size % per_scale or codec.per_tensor_scale:
        return f"{codec.name} keeps one scale per tensor"
    per = out.block_size // per_scale
    blocks = block_scales.reshape(block_scales.shape[0], -1, per)
    top = blocks.max(axis=2, keepdims=True)
    clash = ((blocks != top) & (blocks > 0)).any(axis=2)
    if not clash.any():
        return None
    r, b = np.argwhere(clash)[0]
    return (f"its scale changes inside a block of {out.block_size} values (row {r}, columns "
            f"{b * out.block_size}..{(b + 1) * out.block_size - 1}), and {out.codec.name} keeps one scale per "
            f"{out.block_size} values")


def binary_problem(attrs, out) -> str | None:
    """Why a group-scaled tensor (quantize.zarr attributes `attrs`) cannot be `out` because it holds
    zeros, or None: Q1_0 stores a sign per value, -d or +d, so a 0 has no encoding."""
    if out.codec is not Q1_0 or not attrs.get("zeros"):
        return None
    return (f"it holds {attrs['zeros']} value(s) of 0 (the first in row {attrs['first_zero_row']}), so it is "
            f"ternary, and Q1_0 holds -d and +d only")


def group_problem(attrs, block_scales, out, per_scale) -> str | None:
    """Why a group-scaled tensor cannot be `out` without requantizing: its zeros (Q1_0) or its
    block scales (None: one scale per tensor)."""
    problem = binary_problem(attrs, out)
    if problem is None and block_scales is not None:
        problem = block_scale_problem(block_scales, out, per_scale)
    return problem


def ternary_embedding_plan(ctx: StageContext, src, name: str, shape, out, option: str):
    """(scale, block scales path or None) of an embedding or head written in a ternary
    --embedding-type, refusing (naming the rows) what the type cannot hold exactly: rows that are
    not {-s, 0, +s} per group, a scale changing inside a block of the type, a 0 for Q1_0."""
    attrs = src.attrs
    hf = attrs["hf_name"]
    floats = "choose --embedding-type f16, bf16, f32 or q8_0"
    if "ternary_rows" not in attrs:  # plan refuses this for other families; a store of an older run
        raise CheckpointError(f"tensor {hf}: --embedding-type {option}: its groups were not read; {floats}")
    if not attrs["ternary_rows"]:
        first, n = attrs["first_nonternary_row"], attrs["nonternary_rows"]
        raise CheckpointError(f"tensor {hf}: --embedding-type {option}: {n} of its {shape[0]} rows (the first: row "
                              f"{first}) are not ternary (-s, 0 and +s for one s per group of {GROUP_COLUMNS} values), "
                              f"so {out.codec.name} cannot hold them exactly; {floats}")
    scale, block_scales, values, per_scale = attrs.get("scale"), None, None, out.block_size
    if scale is None:
        block_scales = array_path(ctx.input, name + BLOCK_SCALES_SUFFIX)
        values = read_rows(open_array(block_scales, "r"), 0, shape[0])
        per_scale = values_per_scale(values, shape[1])
    if problem := group_problem(attrs, values, out, per_scale):
        takes = [n for n in EMBEDDING_CHOICES if OUTPUT_TYPES[n].codec.ternary and OUTPUT_TYPES[n].supports(shape[1])
                 and group_problem(attrs, values, OUTPUT_TYPES[n], per_scale) is None]
        rest = f"it converts exactly to --embedding-type {' or '.join(takes)}, or " if takes else ""
        raise CheckpointError(f"tensor {hf}: --embedding-type {option}: {problem}; {rest}{floats}")
    for v in ((values[values > 0].min(initial=1.0), values.max(initial=1.0)) if values is not None else (scale,)):
        check_scale(name, float(v), out.name)
    return scale, block_scales


def codes_in_assemble(out, src, block_scales, requantize) -> bool:
    """Whether a ternary tensor's pack.zarr array is quantize's 2-bit code chunks themselves (see
    CODES_FROM): the type says its bytes are a cheap rewrite of them (`from_codes`), the codes are
    raw 2-bit chunk files, and there are no block scales to fold in."""
    return (out.from_codes and src.attrs.get("role") == TERNARY and src.attrs.get("code_layout") == LAYOUT_2BIT
            and is_raw(src) and block_scales is None and not requantize)


def encode_block(block: np.ndarray, codec_name: str, scale: float | None, source_dtype: str | None = None,
                 layout: str | None = None, tiles=None, block_scales: np.ndarray | None = None,
                 requantize: bool = False, offset: float = 0.0) -> np.ndarray:
    """The GGUF bytes of one row chunk: float values in their source representation
    (`source_dtype`), or ternary codes as quantize.zarr stores them (`layout`) with their scale
    (and, for TL1/TL2, the tensor's kernel tiles; for group-scaled tensors, `block_scales`: one
    per 64 or 32 values of the chunk's rows, and `requantize` when the type cannot hold them: the
    effective weights quantized by the type's own rule, pipeline/plan.py; a type with one scale
    per tensor then takes `scale`). `codec_name` is an output type registry key."""
    codec = CODECS[codec_name]
    if requantize and codec is Q1_0:  # llama.cpp's own rule on the effective weights (a 0 becomes +d)
        codes = codes_from_packed(block) if layout == LAYOUT_2BIT else np.asarray(block, dtype=np.int8)
        if block_scales is None:
            return codec.quantize(codes * np.float32(scale))
        per_scale = values_per_scale(block_scales, codes.shape[1])
        return codec.quantize(codes * np.repeat(np.asarray(block_scales, dtype=np.float32), per_scale, axis=1))
    if block_scales is not None:
        codes = codes_from_packed(block) if layout == LAYOUT_2BIT else np.asarray(block, dtype=np.int8)
        per_scale = values_per_scale(block_scales, codes.shape[1])
        if not codec.ternary:  # the effective weights: each code times its block's scale
            return codec.encode(codes * np.repeat(np.asarray(block_scales, dtype=np.float32), per_scale, axis=1))
        if requantize:
            codes, per_block = requantized_codes(codes, block_scales, codec)
            if per_block is not None:
                return codec.encode(codes, per_block)
            return codec.encode(codes, np.float32(scale), tiles) if tiles else codec.encode(codes, np.float32(scale))
        if row_scaled(codec):  # one scale per row, constant along it (zero blocks aside)
            return codec.encode(codes, np.asarray(block_scales, dtype=np.float32).max(axis=1))
        return codec.encode(codes, scales_per_type_block(np.asarray(block_scales), codec.block_size, per_scale))
    if scale is None and offset:  # a norm stored as w where the runtime multiplies by 1 + w (Gemma3)
        return codec.encode(as_float32(block, source_dtype) + np.float32(offset))
    if scale is None:
        return encode_floats(block, source_dtype, codec_name)
    scale = np.float32(scale)
    if not codec.ternary and source_dtype == "F16":
        # a float type of the effective weights (--type f32/f16/bf16/q8_0, or a fallback) from fp16
        # master weights: llama.cpp's converter casts the ternary values times the scale back to the
        # checkpoint's fp16 before writing any type, so the value a code stands for is fp16(scale)
        scale = np.float32(np.float16(scale))
    if layout == LAYOUT_2BIT:
        return codec.encode_codes(block, scale, tiles) if tiles else codec.encode_codes(block, scale)
    if codec.ternary:
        return codec.encode(block, scale, tiles) if tiles else codec.encode(block, scale)
    return codec.encode(block.astype(np.float32) * scale)  # a float type of the ternary values


def encode_rows(src: str, out: str, start: int, stop: int, codec_name: str, scale: float | None,
                source_dtype: str, layout: str | None, tiles=None, block_scales: str | None = None,
                requantize: bool = False, offset: float = 0.0) -> None:
    scales = read_rows(open_array(block_scales, "r"), start, stop) if block_scales else None
    block = read_rows(open_array(src, "r"), start, stop, codec_name)  # codec_name: the output type's name
    if layout is None and CODECS[codec_name].ternary:  # a ternary embedding: its float values' signs are the codes
        block, layout = np.sign(as_float32(block, source_dtype)).astype(np.int8), LAYOUT_INT8
    data = encode_block(block, codec_name, scale, source_dtype, layout, tiles, scales, requantize, offset)
    if open_array(out, "r").ndim == 1:  # 1-D tensors are a single chunk; byte and element offsets differ
        write_rows(out, 0, data.shape[0], data)
    else:
        write_rows(out, start, stop, data)


def run(ctx: StageContext) -> None:
    source = open_store(ctx.input, "r")
    group = open_store(ctx.output)
    opts = ctx.options
    layout = opts.layout
    group.update_attributes({**source.attrs.asdict(), "stage": "pack", "out_type": layout.name,
                             "embedding_type": opts.embedding_type,
                             **({"target": layout.target} if layout.target else {}),
                             **({"kernel_tiles": [list(t) for t in opts.kernel_tiles]} if layout.needs_tiles else {})})
    plans = []
    for name in source.attrs["tensor_order"]:
        src = get_array(source, name)
        role = src.attrs["role"]
        shape = tuple(src.attrs["shape"])
        planned = ctx.plan.tensor(name)  # the output type (and why, if it is not --type) is the plan's
        out, fallback = OUTPUT_TYPES[planned.out_type], planned.fallback
        scale = src.attrs.get("scale") if role == TERNARY else None
        block_scales, requantize = None, None
        grouped = role == TERNARY and Recipe.from_json(src.attrs["recipe"]).weights == GROUPED
        if grouped:  # one scale per tensor, or per 64 (or 32) values; binary or ternary
            values, per_scale = None, out.block_size
            if scale is None:
                block_scales = array_path(ctx.input, name + BLOCK_SCALES_SUFFIX)
                values = read_rows(open_array(block_scales, "r"), 0, shape[0])
                per_scale = values_per_scale(values, shape[1])
            problem = group_problem(src.attrs, values, out, per_scale)
            if problem and not (opts.allow_requantize and out.codec.ternary):
                takes = [n for n in TERNARY_CHOICES if OUTPUT_TYPES[n].codec.ternary
                         and group_problem(src.attrs, values, OUTPUT_TYPES[n], per_scale) is None]
                option = "pass --allow-requantize to requantize it (lossy)"
                if not takes:
                    rest = (f"no ternary type holds a scale that changes every {per_scale} values: {option}, "
                            f"or write its values with a float --type (f16 holds them)")
                else:
                    rest = f"it converts without requantizing to --type {' or '.join(takes)}" \
                        + (f" (or {option})" if out.codec.ternary else "")
                raise CheckpointError(f"tensor {src.attrs['hf_name']}: --type {layout.type_option}: {problem}; {rest}")
            if problem:  # --allow-requantize: the type's own quantizer on the effective weights
                scales = values if values is not None else \
                    np.full((shape[0], shape[1] // per_scale), scale, dtype=np.float32)
                requantize = requantize_summary(scales, out.codec, nonzero_per_block(ctx, name, shape, per_scale),
                                                per_scale)
                if out.codec.per_tensor_scale:
                    scale = requantized_scale(scales)
            if values is not None:
                for v in (values[values > 0].min(initial=1.0), values.max(initial=1.0)):
                    check_scale(name, float(v), out.name)
        elif role != TERNARY and out.codec.ternary:  # --embedding-type q2_0 / q1_0 / tq2_0: the data must allow it
            scale, block_scales = ternary_embedding_plan(ctx, src, name, shape, out, opts.embedding_type)
        if scale is not None:
            check_scale(name, scale, out.name)
        # the name, not the zarr.Array: one per tensor held until every tensor is checked grows the peak with N
        plans.append((name, role, shape, out, fallback, scale, block_scales, requantize))

    short = [(name, out) for name, _, shape, out, *_ in plans
             if out.run_min_cols and len(shape) > 1 and shape[-1] < out.run_min_cols]
    if short:  # a valid file, but the runtime aborts at the first matmul (docs/notes/ik-llama.md section 6)
        name, out = short[0]
        ctx.log(f"warning: {len(short)} projection(s), e.g. {name}, have rows of fewer than {out.run_min_cols} "
                f"values: {out.runtime} aborts on {out.codec.name} rows that short at run time")
    tasks = []
    for name, role, shape, out, fallback, scale, block_scales, requantize in plans:
        src = get_array(source, name)
        if fallback:
            ctx.log(f"warning: {name}: {fallback}")
        if requantize:
            ctx.log(f"warning: {name}: requantized to {out.codec.name} (--allow-requantize): {requantize}")
        codec = out.codec
        tiles = tiles_of(opts.kernel_tiles, shape) if out.needs_tiles else None
        # the plan's rows (the input may come from a run under a larger memory limit), whole tiles
        rows = ctx.plan.tensor(name).chunk_rows["pack"]
        byte_shape = (*shape[:-1], codec.row_bytes(shape[-1], tiles))
        attrs = {"ggml_type": out.ggml_type, "type_name": codec.name, "out_type": out.name, "shape": list(shape),
                 "role": role, **({"scale": scale} if scale is not None else {}),
                 **({"requantized": requantize} if requantize else {}),
                 **({"tiles": list(tiles)} if tiles else {}),
                 **({"stack": list(ctx.plan.tensor(name).stack)} if ctx.plan.tensor(name).stack else {})}
        offset = src.attrs.get("recipe", {}).get("offset", 0.0) if role != TERNARY else 0.0
        unchanged = role != TERNARY and not offset and (src.attrs["source_dtype"], out.name) in SAME_BYTES
        if unchanged and is_indexed(src):  # the checkpoint's bytes are the GGUF's: assemble copies them
            index_array(group, name, byte_shape, rows, np.uint8, attrs, copy_ref(src))
            continue
        if is_indexed(src) and not offset and encoded_in_assemble(role, shape, out.name):
            # a float matrix in another float type (a BF16 embedding as F16): assemble converts the
            # checkpoint's rows as it writes them, and pack.zarr holds no copy
            index_array(group, name, byte_shape, rows, np.uint8,
                        {**attrs, ENCODED_FROM: {"source_dtype": src.attrs["source_dtype"], "dtype": str(src.dtype),
                                                 "columns": shape[-1]}}, copy_ref(src))
            continue
        paths = (array_path(ctx.input, name), array_path(ctx.output, name))
        if codes_in_assemble(out, src, block_scales, requantize):
            # TQ2_0 / I2_S are a cheap rewrite of quantize's 2-bit codes: link its chunk files, and
            # assemble encodes them as it writes (pack.zarr holds no second copy of the codes)
            arr = ensure_array(group, name, src.shape, src.chunks[0], np.uint8,
                               {**attrs, CODES_FROM: src.attrs["code_layout"]})
            done = written_chunks(arr)
            tasks += [chunk_task(link_task, *paths, i) for i in range(len(row_ranges(src.shape[0], src.chunks[0])))
                      if i not in done]
            continue
        arr = ensure_array(group, name, byte_shape, rows, np.uint8, attrs)
        same = unchanged and is_raw(src) and is_raw(arr) and src.chunks[0] == arr.chunks[0] and src.ndim > 1
        done = written_chunks(arr)
        code_layout = src.attrs.get("code_layout", LAYOUT_INT8) if role == TERNARY else None
        for i, (r0, r1) in enumerate(row_ranges(shape[0], rows if src.ndim > 1 else shape[0])):
            if i in done:
                continue
            if same:
                tasks.append(chunk_task(link_task, *paths, i))
            else:
                tasks.append(chunk_task(encode_rows, *paths, r0, r1, out.name, scale,
                                        src.attrs["source_dtype"], code_layout, tiles, block_scales,
                                        bool(requantize), offset))
    ctx.scheduler.run(tasks, "pack")

