"""The plan of a conversion, as one record, decided before any work and without reading weights.

For every GGUF tensor: its source (file, offset, dtype, shape), recipe, output type (and why
it fell back, if it did), byte size, split part and offset in that part's file; the key/value
count; every output file's size; the run directory's size per store; the memory budget
(workers, chunk size) and the peak memory it allows. `make_plan` also makes the checks that
refuse a conversion up front (a type that cannot hold a tensor, a packed scale a type cannot
store, a split set too large, an output part's path), so the runner only builds the plan and
runs the stages. `bitnet-gguf plan MODEL` (and `convert --dry-run`) prints it; `convert`
saves it as the run directory's plan.json and hands it to every stage: pack writes each tensor
in the plan's output type, assemble puts it in the plan's part. The decisions themselves (a
projection's code layout, its scale, the scale check, the key/values, the split) live here, and
the stages import them from here.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import gguf
import numpy as np

from pipeline.budget import (BYTES_PER_ELEMENT, CODES_BYTES_PER_ELEMENT, FLOAT_BYTES_PER_ELEMENT, HEADROOM,
                             IN_FLIGHT_PER_WORKER, PACKED_BYTES_PER_ELEMENT, Budget)
from pipeline.codecs import MAGNITUDE_BITS, Q1_0, codes_supported, effective_scale
from pipeline.config import Options, check_output_path, format_size
from pipeline.errors import CheckpointError, OptionError
from pipeline.families import EMBEDDING, GROUP_COLUMNS, GROUPED, OUTPUT, TERNARY, Recipe
from pipeline.gguf_file import (MAX_SPLITS, TL_TILES_KEY, GGUFWriterError, TensorInfo, align, alignment_of, as_kv,
                                data_offsets, file_size, header_bytes, model_kvs, part_kvs, plan_split)
from pipeline.output import final_paths
from pipeline.outtypes import OUTPUT_TYPES, arch_traps, file_runtimes, runtimes_lines, tensor_type

PLAN_VERSION = 1

# The run directory's files beside the stores' chunks, per tensor: every store's zarr.json and
# chunk digests, the checksums, extract's references, plan.json (measured: 6.7-7.5 KiB on the
# test checkpoints; tests/test_plan.py holds the total to 10%).
RECORD_BYTES_PER_TENSOR = 7 * 1024


# -- the decisions, which the stages follow -------------------------------------------------------

# quantize.zarr holds a projection's codes 2 bits each where its rows are whole 128-value blocks
LAYOUT_2BIT, LAYOUT_INT8 = "2bit-128", "int8"


def code_layout(cols: int) -> str:
    return LAYOUT_2BIT if codes_supported(cols) else LAYOUT_INT8


def ternary_scale(recipe: Recipe, absmean: float | None) -> np.float32:
    """The magnitude a code of +-1 stands for, as the reference converters compute it in float32."""
    if recipe.scale_rule == "absmean":
        # codes use iscale = 1/absmean; the values they stand for are codes / iscale, which
        # llama.cpp's converter writes and which can differ from codes * absmean in the last bit
        return effective_scale(np.float32(absmean))
    ws = np.float32(recipe.weight_scale)
    if recipe.scale_rule == "divide":  # BitLinear: W = codes / weight_scale (float32 division, as torch)
        with np.errstate(over="ignore"):  # a tiny weight_scale gives inf, which check_scale refuses
            return np.float32(1) / ws
    if recipe.scale_rule == "multiply":  # AutoBitLinear: W = codes * weight_scale
        return ws
    if recipe.scale_rule == "group":  # read from the data (group_scales); not known from the recipe
        raise ValueError("a group-scaled tensor's scale comes from its data: use group_scales")
    raise ValueError(f"unknown scale rule {recipe.scale_rule!r}")


def source_bytes_per_element(role: str, recipe: Recipe, scans_groups: bool = False) -> int:
    """Working set per element of the kernels that read a tensor's source (extract, quantize) and of
    pack's for a float tensor (pipeline/budget.py): a packed projection's never leave its 2-bit and
    8-bit data; a float tensor passed through is read, measured and cast; the rest (master weights,
    group-scaled ones, `scans_groups`: an embedding read for ternary groups, float tensors rewritten
    or offset) are charged the most."""
    if role == TERNARY:
        return PACKED_BYTES_PER_ELEMENT if recipe.packed else BYTES_PER_ELEMENT
    plain = not (scans_groups or recipe.rewritten or recipe.offset)
    return FLOAT_BYTES_PER_ELEMENT if plain else BYTES_PER_ELEMENT


def conversion_bytes_per_element(ckpt) -> int:
    """The working set per element of the kernel that handles most of a checkpoint's elements (its
    projections': packed or not), which decides the number of workers (budget.plan_budget)."""
    by_cost: dict[int, int] = {}
    for t in ckpt.plan.tensors:
        cost = source_bytes_per_element(t.role, t.recipe, ternary_embedding_scan(ckpt.plan.family, t.role, t.shape))
        by_cost[cost] = by_cost.get(cost, 0) + math.prod(t.shape)
    return max(by_cost, key=by_cost.get, default=BYTES_PER_ELEMENT)


def packed_blocks(shape: tuple[int, int], recipe: Recipe) -> bool:
    """Whether quantize turns blocks of a packed projection's rows into four output chunks at once
    (one per quarter): the rows are whole quarters of whole heads, of whole 128-value blocks."""
    rows, cols = shape
    return bool(recipe.packed and codes_supported(cols) and rows % 4 == 0 and (rows // 4) % recipe.row_multiple == 0)


def packed_block_rows(budget, shape: tuple[int, int], recipe: Recipe) -> int | None:
    """Rows R of a packed projection that one task turns into four output chunks (one per
    quarter), or None when the fast path does not apply: R divides out / 4 (so every output
    chunk lies in one quarter) and holds whole heads when permuted."""
    if not packed_blocks(shape, recipe):
        return None
    rows, cols = shape
    quarter, multiple = rows // 4, recipe.row_multiple
    limit = budget.rows_per_chunk((rows, cols), per_element=PACKED_BYTES_PER_ELEMENT)
    return largest_divisor(quarter, multiple, max(limit, multiple))


def largest_divisor(n: int, multiple: int, limit: int) -> int | None:
    """The largest multiple of `multiple` that divides `n` and is at most `limit`, or None."""
    best = None
    for r in range(multiple, min(n, limit) + 1, multiple):
        if n % r == 0:
            best = r
    return best


def ternary_chunk_rows(budget, shape: tuple[int, ...], recipe: Recipe) -> int:
    """Output rows per chunk of a ternary tensor: within the budget, whole heads when permuted."""
    return budget.rows_per_chunk(shape, multiple=recipe.row_multiple,
                                 per_element=source_bytes_per_element(TERNARY, recipe))


def chunk_rows(budget, role: str, recipe: Recipe, shape, source_shape, out, tiles=None,
               scans_groups: bool = False) -> dict[str, int]:
    """Rows per chunk of a tensor in each stage's store, decided once (the plan records them and the
    stages follow it), and `task_bytes`, the working set of its largest chunk task. extract: of the
    source tensor; a packed projection's blocks are one chunk there and one task in quantize, so
    quantize reads whole digested chunks. quantize: of the GGUF tensor (its codes), or of the source
    tensor for a float one. pack: of the GGUF tensor's bytes (a 1-D tensor: its byte count); for
    2-bit codes encoded into a ternary type, quantize's rows where the kernel's memory allows, else
    a divisor of them, so that pack reads whole chunks (else no more rows than quantize's)."""
    source_cost = source_bytes_per_element(role, recipe, scans_groups)
    source_2d = len(source_shape) > 1
    extract = budget.rows_per_chunk(source_shape, per_element=source_cost) if source_2d else source_shape[0]
    codec = out.codec
    if len(shape) < 2:
        return {"extract": extract, "quantize": shape[0], "pack": codec.row_bytes(shape[0]),
                "task_bytes": BYTES_PER_ELEMENT * shape[0]}
    multiple, cols = codec.row_multiple(tiles), math.prod(shape[1:])
    if role != TERNARY:
        cost = source_cost if not out.codec.ternary else BYTES_PER_ELEMENT  # a ternary --embedding-type
        quantize = shape[0] if recipe.rewritten else extract
        pack = budget.rows_per_chunk(shape, multiple, per_element=cost)
        largest = max(extract * math.prod(source_shape[1:]) if source_2d else 1, pack * cols)
        return {"extract": extract, "quantize": quantize, "pack": pack,
                "task_bytes": cost * min(budget.elements(cost), largest)}
    block = packed_block_rows(budget, tuple(shape), recipe)
    quantize = block or ternary_chunk_rows(budget, shape, recipe)
    if block:
        extract = block
    pack_cost = BYTES_PER_ELEMENT
    if codec.ternary and not tiles and recipe.weights != GROUPED and code_layout(shape[1]) == LAYOUT_2BIT:
        pack_cost = CODES_BYTES_PER_ELEMENT
        limit = budget.rows_per_chunk(shape, multiple, per_element=pack_cost)
        pack = quantize if quantize <= limit and quantize % multiple == 0 else \
            largest_divisor(quantize, multiple, limit) or max(multiple, min(limit, quantize) // multiple * multiple)
    else:
        pack = budget.rows_per_chunk(shape, multiple)
    task = max(min(quantize * cols, budget.elements(source_cost)) * source_cost,
               min(pack * cols, budget.elements(pack_cost)) * pack_cost)
    return {"extract": extract, "quantize": quantize, "pack": pack, "task_bytes": task}


# -- requantizing group-scaled tensors (--allow-requantize) ------------------------------------
# A group-scaled projection keeps one scale per 64 values (quantize.zarr's block_scales; per 32
# where the data's scale changes that often: per_scale below is the values per block scale). A type
# with bigger blocks holds it losslessly only where the scale is constant over each of its blocks;
# otherwise the conversion is refused, or with --allow-requantize the effective weights (codes
# times their block's scale) are quantized to the type by its own reference quantizer:
# - TQ2_0 / TQ1_0 (one fp16 d per 256 values) and Q2_0 (per 64): gguf.quants' quantize_blocks /
#   llama.cpp's quantize_row_q2_0_ref, d = max|x| of the block, q = roundf(x * (1 / d)) in float32;
#   so a value keeps its code where its scale is at least half the block's largest, else becomes 0,
#   and every value of the block is then +-d or 0;
# - I2_S (and TL1/TL2: one float32 scale per tensor): bitnet.cpp's quantize_i2_s
#   (src/ggml-bitnet-mad.cpp), scale = max|x| of the tensor, code = sign(x) where |x| >= 1e-6.
# - ik_llama.cpp's IQ2_BN / IQ1_BN / IQ2_BN_R4 (one scale per row): quantize_one_row_2bn / _1bn
#   (docs/notes/ik-llama.md section 2), d = max|x| of the row, a value keeps its code where
#   |x| >= 0.5f * d (float32), else becomes 0.
I2S_ZERO_BELOW = 1e-6      # quantize_i2_s: |x| below this is code 0


def row_scaled(codec) -> bool:
    """Whether a ternary type keeps one scale per row (ik_llama.cpp's IQ*_BN row meta)."""
    return bool(getattr(codec, "row_meta_size", 0))


def requantize_per_row(block_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep, d) of ik's row rule: d = the row's largest scale (float32, shape (rows,)); a block of
    scale s keeps its codes (1) where s is not below 0.5f * d, else they become 0."""
    s = np.asarray(block_scales, dtype=np.float32)
    d = s.max(axis=1, initial=np.float32(0)).astype(np.float32)
    keep = (s >= (np.float32(0.5) * d)[:, None]) & (s > 0)
    return keep.astype(np.int8), d


def _roundf(a: np.ndarray) -> np.ndarray:
    """gguf.quants.np_roundf (round half away from zero) of non-negative values."""
    floored = np.floor(a)
    return floored + np.floor(2 * (a - floored))


def requantize_per_block(block_scales: np.ndarray, block_size: int, per_scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, d): for every block of `per_scale` values (one block scale), 1 where its codes survive
    requantization to a type of `block_size`-value blocks and 0 where they become 0; every type
    block's new scale d (float32)."""
    rows = block_scales.shape[0]
    s = np.asarray(block_scales, dtype=np.float32).reshape(rows, -1, block_size // per_scale)
    d = s.max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    keep = _roundf(s * inv).astype(np.int8)
    return keep.reshape(rows, -1), d.reshape(rows, -1)


def requantized_codes(codes: np.ndarray, block_scales: np.ndarray, codec) -> tuple[np.ndarray, np.ndarray | None]:
    """(int8 codes, one scale per block of the type or None) of rows of a group-scaled tensor
    requantized to `codec` (the tensor scale of a type with one per tensor is `requantized_scale`)."""
    block_scales = np.asarray(block_scales, dtype=np.float32)
    per_scale = codes.shape[1] // block_scales.shape[1]
    if row_scaled(codec):  # one scale per row: ik's row rule
        keep, d = requantize_per_row(block_scales)
        return codes * np.repeat(keep, per_scale, axis=1), d
    if codec.per_tensor_scale:  # one scale per tensor: codes are the signs of values >= 1e-6
        keep = (block_scales.astype(np.float64) >= I2S_ZERO_BELOW).astype(np.int8)
        return codes * np.repeat(keep, per_scale, axis=1), None
    keep, d = requantize_per_block(block_scales, codec.block_size, per_scale)
    return codes * np.repeat(keep, per_scale, axis=1), d


def requantized_scale(block_scales: np.ndarray) -> float:
    """The one scale of a type with one per tensor: max|x| over the tensor (quantize_i2_s)."""
    return float(np.float32(np.max(block_scales, initial=0.0)))


def q1_0_block_means(block_scales: np.ndarray, nonzero: np.ndarray, per_scale: int) -> np.ndarray:
    """Q1_0's d of every 128-value block of a ternary tensor requantized by llama.cpp's rule, mean |w|
    of the block (float64: for the warning; the bytes are `Q1_0.quantize`'s), from the scale and the
    non-zero count of every block of `per_scale` values."""
    s = np.asarray(block_scales, dtype=np.float64)
    n = np.asarray(nonzero, dtype=np.float64)
    per = Q1_0.block_size // per_scale
    return (n * s).reshape(s.shape[0], -1, per).sum(axis=2) / Q1_0.block_size


def requantize_rms_change(block_scales: np.ndarray, nonzero: np.ndarray, codec, per_scale: int) -> float:
    """Relative RMS change of the effective weights, sqrt(sum (w' - w)^2 / sum w^2), from the block
    scales and the number of non-zero codes of every block of `per_scale` values (every value of a
    block is +-its scale before, +-its new magnitude after)."""
    s = np.asarray(block_scales, dtype=np.float64)
    if codec.name == Q1_0.name:  # every value becomes +-d, a zero +d: (d - s)^2 per non-zero, d^2 per zero
        n = np.asarray(nonzero, dtype=np.float64)
        d = np.repeat(q1_0_block_means(s, n, per_scale), Q1_0.block_size // per_scale, axis=1)
        total = float((n * s * s).sum())
        change = float((n * (d - s) ** 2 + (per_scale - n) * d * d).sum())
        return math.sqrt(change / total) if total else 0.0
    if codec.per_tensor_scale:
        new = np.where(s >= I2S_ZERO_BELOW, requantized_scale(block_scales), 0.0)
    elif row_scaled(codec):
        keep, d = requantize_per_row(block_scales)
        new = keep * d.astype(np.float64)[:, None]
    else:
        keep, d = requantize_per_block(block_scales, codec.block_size, per_scale)
        new = keep * np.repeat(d.astype(np.float64), codec.block_size // per_scale, axis=1)
    n = np.asarray(nonzero, dtype=np.float64)
    total = float((n * s * s).sum())
    return math.sqrt(float((n * (new - s) ** 2).sum()) / total) if total else 0.0


def requantize_summary(block_scales: np.ndarray, codec, nonzero: np.ndarray, per_scale: int) -> str:
    """What requantizing a group-scaled tensor to `codec` loses, from its block scales (one per
    `per_scale` values) and the count of non-zero codes of every such block."""
    change = requantize_rms_change(block_scales, nonzero, codec, per_scale)
    if codec.name == Q1_0.name:
        zeros = int((per_scale - np.asarray(nonzero, dtype=np.int64)).sum())
        changes = (f"Q1_0 holds -d and +d only: its {zeros} zero value(s) became +d, and every block of 128 values "
                   "has one magnitude, the mean |w| of the block (llama.cpp's quantize_row_q1_0_ref)")
    else:
        changes = _requantize_changes(block_scales, codec, per_scale)
    return changes + f"; relative RMS change of its effective weights {change:.4%}"


def _requantize_changes(block_scales: np.ndarray, codec, per_scale: int) -> str:
    scales = np.asarray(block_scales, dtype=np.float32)
    if codec.per_tensor_scale:
        nonzero = np.unique(scales[scales > 0])
        top = requantized_scale(scales)
        small = int((nonzero < I2S_ZERO_BELOW).sum())
        low = float(nonzero[nonzero >= I2S_ZERO_BELOW].min(initial=top))
        return (f"its {nonzero.size} different scales ({low:.4g} to {top:.4g}) become one, {top:.4g} (bitnet.cpp's "
                f"{codec.name} quantizer: max |w|), so its values grow by up to {(top / low - 1) * 100:.3g}%"
                + (f"; {small} scale(s) under 1e-6 become 0" if small else ""))
    rows = scales.shape[0]
    if row_scaled(codec):
        keep, d = requantize_per_row(scales)
        several = ((scales != d[:, None]) & (scales > 0)).any(axis=1)
        dropped = int(((keep == 0) & (scales > 0)).sum())
        kept = (keep > 0) & (scales > 0)
        growth = (float(np.where(kept, d[:, None] / np.where(kept, scales, 1), 1).max(initial=1.0)) - 1) * 100
        return (f"{int(several.sum())} of {rows} rows had several scales; each now has one, its largest "
                f"(ik_llama.cpp's {codec.name} quantizer: d = max |w| of the row): the values of {dropped} of "
                f"{int((scales > 0).sum())} blocks of {per_scale} were under half of it and became 0, the others grew "
                f"by up to {growth:.3g}%")
    keep, d = requantize_per_block(scales, codec.block_size, per_scale)
    per = codec.block_size // per_scale
    s = scales.reshape(rows, -1, per)
    several = ((s != d[..., None]) & (s > 0)).any(axis=2)
    dropped = int(((keep == 0) & (scales > 0)).sum())
    kept = (keep.reshape(s.shape) > 0) & (s > 0)
    growth = (float(np.where(kept, d[..., None] / np.where(kept, s, 1), 1).max(initial=1.0)) - 1) * 100
    return (f"{int(several.sum())} of {several.size} blocks of {codec.block_size} values had several scales; each "
            f"now has one, its largest ({codec.name}'s reference quantizer: d = max |w|): the values of {dropped} of "
            f"{int((scales > 0).sum())} blocks of {per_scale} were under half of it and became 0, the others grew by up to "
            f"{growth:.3g}%")


# pack: float tensors whose output type is their source type keep the checkpoint's bytes
SAME_BYTES = {("F32", "f32"), ("F16", "f16"), ("BF16", "bf16")}
FLOAT_TYPES = ("f32", "f16", "bf16")


def encoded_in_assemble(role: str, shape, out_name: str) -> bool:
    """A float matrix written as another float type (a BF16 embedding as F16) is converted by
    assemble from the checkpoint's rows: pack.zarr indexes them instead of holding a copy."""
    return role != TERNARY and len(shape) > 1 and out_name in FLOAT_TYPES


# The smallest normal numbers: below them a float keeps fewer significant bits than its type
# promises (an fp16 scale of 1e-6 is 2^-20 in 2^-24 steps, up to 3% off; 1e-7 is 19% off).
FP16_TINY = float(np.finfo(np.float16).tiny)    # 6.1e-5
FP32_TINY = float(np.finfo(np.float32).tiny)    # 1.2e-38
FP16_SCALE_TYPES = ("tq1_0", "tq2_0", "q2_0", "q1_0", "f16", "iq1_bn")  # a TQ/Q2_0/Q1_0 block's d, an F16 fallback's values, IQ1_BN's row scale


def check_scale(name: str, scale: float, codec_name: str) -> None:
    """The scale must be a normal float32 (I2_S stores it so); a TQ block stores it as fp16, and
    an F16 fallback its values: there it must be a normal fp16 too. A subnormal or overflowing
    scale is refused naming the tensor, not written with a few bits of precision."""
    with np.errstate(over="ignore", under="ignore"):
        s32 = np.float32(scale)
        d = np.float16(s32)
    if not np.isfinite(s32) or abs(float(s32)) < FP32_TINY:
        raise CheckpointError(f"tensor {name}: its ternary scale {scale:.6g} is not a normal float32 (above 1.2e-38, "
                              "finite; the checkpoint's weight_scale is out of range); it cannot be converted")
    if codec_name in FP16_SCALE_TYPES:
        if not np.isfinite(d) or abs(float(d)) < FP16_TINY:
            advice = ("its rows are not whole blocks, so it is written as F16 in every --type; it cannot be converted"
                      if codec_name == "f16" else "convert with --type iq2_bn (a float32 row scale) instead"
                      if codec_name == "iq1_bn" else "convert with --type i2_s (a float32 scale) instead")
            raise CheckpointError(f"tensor {name}: its ternary scale {scale:.6g} is outside what {codec_name.upper()} "
                                  f"stores to fp16's precision (a normal fp16, {FP16_TINY:.3g} to 65504); {advice}")


# Our own key/values (bitnet.cpp and llama.cpp ignore keys they do not know): the bitnet.cpp build
# a file's layout is for, and a TL file's kernel tiles, so `verify` and `inspect` of the file alone can tell.
TARGET_KEY = "bitnet_gguf.target"
TILES_KEY = TL_TILES_KEY   # UINT32 array: m, k, BM, BK, bm per kernel_config.ini section


def file_kvs(metadata: dict, out_type: str, kernel_tiles=()) -> list:
    """Every key/value of the file: the run's metadata, then file type and quantization version,
    then (for a layout made for one bitnet.cpp build) our target and kernel tiles."""
    out = OUTPUT_TYPES[out_type]
    records = [*metadata["kv"],
               {"key": gguf.Keys.General.FILE_TYPE, "type": "UINT32", "sub_type": None,
                "value": out.file_type},
               {"key": gguf.Keys.General.QUANTIZATION_VERSION, "type": "UINT32", "sub_type": None,
                "value": gguf.GGML_QUANT_VERSION}]
    if out.target:
        records.append({"key": TARGET_KEY, "type": "STRING", "sub_type": None, "value": out.target})
    if out.needs_tiles:
        records.append({"key": TILES_KEY, "type": "ARRAY", "sub_type": "UINT32",
                        "value": [int(v) for entry in kernel_tiles for v in entry]})
    return model_kvs(metadata["arch"], records)


def plan_parts(infos: list[TensorInfo], max_size: int, max_tensors: int) -> list[list[int]]:
    return plan_split(infos, max_size=max_size, max_tensors=max_tensors)



def _plain(value):
    """dataclasses.asdict of the plan's values (dataclasses of numbers, text, lists, tuples and dicts
    of them), without its generic deep copy of every leaf: a model of many tensors has tens of
    thousands of records, written once and compared once."""
    if isinstance(value, (str, int, float, type(None))):
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return copy.deepcopy(value)


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
    requantize: str | None = None  # group-scaled: what happens if the data's scales do not fit the type
    stack: list | None = None  # an expert: [stacked GGUF tensor, expert index, experts] (its offset: within it)
    chunk_rows: dict | None = None  # rows per chunk in extract, quantize and pack, and task_bytes (chunk_rows())


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
    type_choice: str = "given"  # "given" (--type), or why --type auto chose out_type
    fetch: dict | None = None   # a remote checkpoint: bytes the conversion fetches (remote.fetch_estimate)
    arch_traps: list = dataclasses.field(default_factory=list)  # outtypes.ARCH_TRAPS that apply to this file

    @property
    def output_bytes(self) -> int:
        return sum(size for _, size in self.outputs)

    @property
    def run_dir_bytes(self) -> int:
        return sum(self.stores.values()) + self.records

    def tensor(self, name: str) -> TensorRecord:
        index = self.__dict__.get("_by_name")
        if index is None:  # built once: pack asks for every tensor, and a scan each time is O(N^2)
            index = {}
            for t in self.tensors:
                index.setdefault(t.name, t)
            object.__setattr__(self, "_by_name", index)
        return index[name]

    def parts(self) -> list[list[int]]:
        """GGUF tensor indices (of `infos`) of every output part, in file order."""
        parts: list[list[int]] = [[] for _ in self.outputs]
        for i, (_, members) in enumerate(gguf_tensors(self.tensors)):
            parts[self.tensors[members[0]].part].append(i)
        return parts

    def infos(self) -> list[TensorInfo]:
        """The GGUF's tensor infos: one per tensor, one per stack of experts."""
        return [stacked_info(name, [(tuple(self.tensors[i].shape), self.tensors[i].ggml_type, self.tensors[i].nbytes)
                                    for i in members], self.tensors[members[0]].stack is not None)
                for name, members in gguf_tensors(self.tensors)]

    def output_types(self) -> list:
        """The registry entries of the file's tensors, in order of first use."""
        return list(dict.fromkeys(OUTPUT_TYPES[t.out_type] for t in self.tensors))

    def as_json(self) -> dict:
        return {**self._json_head(), "tensors": [_plain(t) for t in self.tensors]}

    def _json_head(self) -> dict:
        """as_json without its tensors."""
        types = self.output_types()
        return {**{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "tensors"},
                "output_bytes": self.output_bytes, "run_dir_bytes": self.run_dir_bytes,
                "runtimes": file_runtimes(types),
                "traps": [*(trap for t in types for trap in t.traps), *self.arch_traps]}

    def write_json(self, f) -> None:
        """as_json's compact text with sorted keys, as json.dumps(sort_keys=True) writes it, to the
        text file `f` one tensor at a time: the records of every tensor made at once, and their text,
        were most of a run's peak for a model of tens of thousands of tensors."""
        encode = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
        head = self._json_head()
        head["tensors"] = None  # its place among the sorted keys
        for i, key in enumerate(sorted(head)):
            f.write(("{" if i == 0 else ",") + encode(key) + ":")
            if key != "tensors":
                f.write(encode(head[key]))
                continue
            f.write("[")
            for j, t in enumerate(self.tensors):
                f.write(("," if j else "") + encode(_plain(t)))
            f.write("]")
        f.write("}")

    def table(self) -> str:
        """What a person reads: one line per tensor, then the totals."""
        chosen = f"--type auto: {self.type_choice}" if self.type_choice != "given" else "given with --type"
        lines = [f"model: {self.model_dir} ({self.family}, GGUF arch {self.arch})",
                 f"type: {OUTPUT_TYPES[self.out_type].codec.name if self.out_type in OUTPUT_TYPES else self.out_type}"
                 f" ({chosen})",
                 *runtimes_lines(self.output_types(), self.arch_traps),
                 f"{'tensor':<32} {'source':<16} {'output':<8} {'size':>10}  part  note"]
        for t in self.tensors:
            source = f"{t.source_dtype} {'x'.join(map(str, t.source_shape))}"
            lines.append(f"{t.name:<32} {source:<16} {OUTPUT_TYPES[t.out_type].codec.name:<8} "
                         f"{format_size(t.nbytes):>10}  {t.part + 1:>4}  {t.fallback or t.requantize or ''}")
        files = ", ".join(f"{p} ({format_size(s)})" for p, s in self.outputs)
        lines += [f"output: {files}; {len(gguf_tensors(self.tensors))} tensors, {self.kv_count} key/values",
                  "run directory: " + ", ".join(f"{k} {format_size(v)}" for k, v in self.stores.items())
                  + f", records {format_size(self.records)} (total {format_size(self.run_dir_bytes)})",
                  f"memory: at most {format_size(self.peak_memory)} of --memory-limit "
                  f"{format_size(self.memory_limit)} ({self.workers} worker(s), chunks of up to "
                  f"{format_size(self.chunk_elements * 4)} of float32)"]
        if self.fetch:
            f = self.fetch
            lines.append(f"network: the conversion fetches about {format_size(f['total'])} ({f['total']} bytes): "
                         f"small files {format_size(f['small_files'])}, safetensors headers "
                         f"{format_size(f['headers'])}, the {format_size(f['tensors'])} of tensors once, and "
                         f"{format_size(f['fetched_twice'])} of them again (extract's pass before a latent "
                         "projection's codes or a group-scaled tensor's); nothing of the weights is stored")
        return "\n".join(lines)


def gguf_tensors(tensors) -> list[tuple[str, list[int]]]:
    """(GGUF tensor name, indices of `tensors` it is made of) in file order: an expert (`stack` set:
    [name, index, experts], a list or tuple) joins the stack named there, every other tensor is one."""
    out: list[tuple[str, list[int]]] = []
    for i, t in enumerate(tensors):
        stack = t.stack
        if stack is not None and out and out[-1][0] == stack[0]:
            out[-1][1].append(i)
        else:
            out.append((stack[0] if stack is not None else (t.name if hasattr(t, "name") else t.gguf_name), [i]))
    return out


def stacked_info(name: str, members: list[tuple[tuple, int, int]], stacked: bool) -> TensorInfo:
    """The GGUF tensor info of one tensor, or of a stack of experts (`stacked`; (shape, type, bytes)
    each, in order): [experts, *shape], their bytes one after another."""
    shape, ggml_type, nbytes = members[0]
    if not stacked:
        return TensorInfo(name, tuple(shape), ggml_type, nbytes)
    return TensorInfo(name, (len(members), *shape), ggml_type, sum(m[2] for m in members))


def check_stack_type(opts: Options, ckpt) -> None:
    """A stack of experts is one GGUF tensor, its experts' bytes one after another, each expert with its
    own scales: a type with one scale per tensor (I2_S, TL1, TL2) cannot hold one (refused first)."""
    stacked = next((t for t in ckpt.plan.tensors if t.stack is not None), None)
    codec = opts.layout.codec
    if stacked is not None and (codec.per_tensor_scale or opts.layout.needs_tiles):
        raise OptionError(f"--type {opts.layout.type_option}: {codec.name} keeps one scale per tensor, and "
                          f"{stacked.stack[0]} stacks {stacked.stack[2]} experts, each with its own scales; choose "
                          "tq2_0, tq1_0, q2_0 or a float --type")


def check_stacks(opts: Options, ckpt, types: list[tuple]) -> None:
    """The experts of a stack have one shape and one output type (a fallback cannot split a stack)."""
    seen: dict[str, tuple] = {}
    for t, (out, _) in zip(ckpt.plan.tensors, types):
        if t.stack is not None and seen.setdefault(t.stack[0], (out.name, t.shape)) != (out.name, t.shape):
            raise CheckpointError(f"{opts.model_dir}: the experts of {t.stack[0]} differ in shape or output type "
                                  f"({t.hf_name}); a stack holds experts of one shape")


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


def tensor_types(opts: Options, ckpt) -> list[tuple]:
    """(output type, fallback warning) of every tensor; raises for a type that cannot hold a tensor
    or a packed scale it cannot store."""
    check_stack_type(opts, ckpt)
    check_kernel_shapes(opts, ckpt)
    types, ternary, fallbacks = [], 0, 0
    for t in ckpt.plan.tensors:
        out, fallback = tensor_type(t.role, t.shape, opts.layout.name, opts.embedding_type, t.gguf_name,
                                    ckpt.plan.family.norm_type)
        if t.role == TERNARY:
            ternary += 1
            fallbacks += fallback is not None
            if t.recipe.packed:  # the scale is the checkpoint's weight_scale, known now
                check_scale(t.gguf_name, float(ternary_scale(t.recipe, None)), out.name)
        types.append((out, fallback))
    embedding = OUTPUT_TYPES[opts.embedding_type]
    if embedding.codec.ternary and ckpt.plan.family.scale_rule != "group":
        raise OptionError(f"--embedding-type {opts.embedding_type} holds ternary or binary embeddings (-s, 0, +s per "
                          f"group, read from the data), which only group-scaled checkpoints have; a "
                          f"{ckpt.plan.family.name} checkpoint's are floats: choose f16, bf16, f32 or q8_0")
    if opts.layout.codec is Q1_0 and (cast := [t for t in ckpt.plan.tensors
                                                if t.role == TERNARY and t.recipe.weights != GROUPED]):
        raise OptionError(f"--type q1_0 holds binary projections (-s and +s, one s per 128 values), which only "
                          f"group-scaled checkpoints can be (read from the data); {cast[0].hf_name} and the other "
                          f"projections of a {ckpt.plan.family.name} checkpoint are ternary: choose tq2_0, tq1_0 or "
                          "another --type")
    if opts.out_type == "i2_s" and ternary and fallbacks == ternary:
        raise OptionError(f"--type i2_s: no projection of this checkpoint has rows that are a multiple of "
                          f"{opts.layout.block_size} values, so nothing could be I2_S; choose tq2_0 or tq1_0")
    return types


def split_parts(opts: Options, infos: list[TensorInfo], check_paths: bool = True) -> list[list[int]]:
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


def store_sizes(opts: Options, ckpt, budget: Budget, types: list[tuple], rows_of: list[dict]) -> dict[str, int]:
    """The bytes extract, quantize and pack will hold (chunk files; their JSON is not counted).
    extract indexes the checkpoint (no tensor bytes: the side arrays, and a padded copy of a
    file's last chunk where the file ends inside it); quantize indexes float tensors; pack
    indexes the floats whose bytes do not change."""
    sizes = {"extract": 0, "quantize": 0, "pack": 0}
    last: dict = {}  # the last tensor of each file, and its extract rows per chunk
    for t, rows in zip(ckpt.plan.tensors, rows_of):
        src = ckpt.sources[t.hf_name]
        if src.offset >= last.get(src.file, (src, 0))[0].offset:
            last[src.file] = (src, rows["extract"])
    for src, chunk in last.values():
        if len(src.shape) > 1 and src.shape[0] % chunk:
            sizes["extract"] += chunk * math.prod(src.shape[1:]) * src.np_dtype.itemsize
    for t, (out, _), chunks in zip(ckpt.plan.tensors, types, rows_of):
        src = ckpt.sources[t.hf_name]
        shape, source_shape = t.shape, t.source_shape
        src_rows = source_shape[0] if len(source_shape) > 1 else 1
        src_chunk = chunks["extract"] if len(source_shape) > 1 else 1
        grouped = t.role == TERNARY and t.recipe.weights == GROUPED
        if grouped:  # one float32 magnitude per group of columns, and a uint32 count of zeros per row
            sizes["extract"] += _chunked_bytes(src_rows, src_chunk, source_shape[1] // GROUP_COLUMNS * 4 + 4)
        elif not (t.role == TERNARY and t.recipe.packed):
            side = 8 if t.role == TERNARY else 4  # abs_sums float64, abs_max float32
            if ternary_embedding_scan(ckpt.plan.family, t.role, source_shape):
                # a group-scaled checkpoint's embedding: magnitudes per 32 values, zeros and a flag per row;
                # quantize's block scales (one float32 per 64 values, as for projections)
                side += source_shape[1] // GROUP_COLUMNS * 4 + 5
                sizes["quantize"] += source_shape[0] * (source_shape[1] // 64) * 4
            sizes["extract"] += _chunked_bytes(src_rows, src_chunk, side) if len(source_shape) > 1 else side
        if t.role == TERNARY:
            cols = shape[1]
            code_bytes = cols // 4 if code_layout(cols) == LAYOUT_2BIT else cols
            q_rows = chunks["quantize"]
            sizes["quantize"] += _chunked_bytes(shape[0], q_rows, code_bytes)
            if grouped:  # block scales (one chunk): the data decides; estimated as one float32 per 64 values,
                # Bonsai's case (0 for one scale per tensor, twice this for a scale changing every 32 values)
                sizes["quantize"] += shape[0] * (cols // 64) * 4
            if out.from_codes and code_layout(cols) == LAYOUT_2BIT and not grouped:
                sizes["pack"] += _chunked_bytes(shape[0], q_rows, code_bytes)  # links to quantize's chunk files
                continue
        elif not t.recipe.offset and ((src.dtype, out.name) in SAME_BYTES
                                      or encoded_in_assemble(t.role, shape, out.name)):
            continue  # quantize and pack index the checkpoint's bytes (assemble converts them)
        codec = out.codec
        tiles = tensor_tiles(opts, t.role, shape) if out.needs_tiles else None
        if len(shape) > 1:  # as pack chunks it: whole tiles of a TL type
            sizes["pack"] += _chunked_bytes(shape[0], chunks["pack"], codec.row_bytes(shape[-1], tiles))
        else:
            sizes["pack"] += codec.row_bytes(shape[0])
    return sizes


def ternary_embedding_scan(family, role: str, shape) -> bool:
    """Whether extract scans the embedding or head of a group-scaled checkpoint for ternary groups
    (Ternary-Bonsai's are ternary: a ternary --embedding-type holds them when the data allows)."""
    return family.scale_rule == "group" and role in (EMBEDDING, OUTPUT) and len(shape) == 2 \
        and shape[1] % GROUP_COLUMNS == 0


def fetched_once(family, t, source) -> bool:
    """Whether a remote checkpoint's tensor is fetched once, by the stage that uses its values, and
    not first by extract: a packed projection (extract records nothing of it; quantize checks its
    fields) or a float tensor kept as it is (its range and finiteness are checked as it is read,
    stores.check_unscanned; a remote file's content is pinned by its version, so no digests). A
    latent projection is fetched twice by nature: its absmean scale is needed before its first code;
    so are a group-scaled projection's and embedding's groups, and a float tensor quantize rewrites.
    `source`: the tensor's safetensors_io.TensorSource."""
    if t.recipe.packed:
        return True
    return t.role != TERNARY and t.recipe.weights != GROUPED and not t.recipe.rewritten \
        and source.dtype in MAGNITUDE_BITS and not ternary_embedding_scan(family, t.role, source.shape)


def fetched_once_names(ckpt) -> set[str]:
    """Checkpoint names of the planned tensors of a remote checkpoint that extract does not read (its
    files' versions pin their bytes: a file whose server names no version is digested as a local one)."""
    return {t.hf_name for t in ckpt.plan.tensors if pinned(ckpt.sources[t.hf_name].file)
            and fetched_once(ckpt.plan.family, t, ckpt.sources[t.hf_name])}


def pinned(file) -> bool:
    """Whether `file` is a remote file whose server names its version (commit, ETag, ...)."""
    from pipeline.remote import RemoteFile

    return isinstance(file, RemoteFile) and bool(file.version)


def requantize_note(opts: Options, t, out) -> str | None:
    """A group-scaled projection: what the conversion does if the data's scale changes inside one
    of the type's blocks (Q2_0: if it changes every 32 values; the data decides, in pack)."""
    codec = out.codec
    if t.role != TERNARY or t.recipe.weights != GROUPED or not codec.ternary:
        return None
    where = "the tensor" if codec.per_tensor_scale else "a row" if row_scaled(codec) \
        else f"a block of {codec.block_size} values"
    what = f"it holds a 0 or its scale changes inside {where}" if codec is Q1_0 else f"its scale changes inside {where}"
    if opts.allow_requantize:
        return f"requantized (lossy) if {what}"
    return f"refused if {what} (unless --allow-requantize)"


def make_plan(opts: Options, ckpt, budget: Budget, check_paths: bool = True) -> Plan:
    """Everything the conversion will do, decided from the checkpoint's headers and the options;
    raises (OptionError, CheckpointError) for what would be refused."""
    types = tensor_types(opts, ckpt)
    check_stacks(opts, ckpt, types)
    sizes = [out.nbytes(t.shape, tensor_tiles(opts, t.role, t.shape)) for t, (out, _) in zip(ckpt.plan.tensors, types)]
    groups = gguf_tensors(ckpt.plan.tensors)
    infos = [stacked_info(name, [(ckpt.plan.tensors[i].shape, types[i][0].ggml_type, sizes[i]) for i in members],
                          ckpt.plan.tensors[members[0]].stack is not None) for name, members in groups]
    gguf_index, within = [0] * len(sizes), [0] * len(sizes)  # of each planned tensor: its GGUF tensor, offset in it
    for g, (_, members) in enumerate(groups):
        start = 0
        for i in members:
            gguf_index[i], within[i] = g, start
            start += sizes[i]
    parts = split_parts(opts, infos, check_paths)
    metadata = {"arch": ckpt.plan.arch, "kv": ckpt.kv}
    try:
        kvs = [as_kv(r) for r in file_kvs(metadata, opts.layout.name, opts.kernel_tiles)]
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
    records, rows_of = [], []
    for i, (t, (out, fallback)) in enumerate(zip(ckpt.plan.tensors, types)):
        src = ckpt.sources[t.hf_name]
        rows = chunk_rows(budget, t.role, t.recipe, t.shape, src.shape, out, tensor_tiles(opts, t.role, t.shape)
                          if out.needs_tiles else None, ternary_embedding_scan(ckpt.plan.family, t.role, src.shape))
        rows_of.append(rows)
        g = gguf_index[i]
        records.append(TensorRecord(t.gguf_name, t.hf_name, t.role, str(src.file), src.offset, src.dtype,
                                    list(src.shape), list(t.shape), t.recipe.as_json(), out.name, out.ggml_type,
                                    sizes[i], part_of[g], offset_of[g] + within[i], rows["quantize"], fallback,
                                    requantize_note(opts, t, out), list(t.stack) if t.stack else None, rows))
    task = max((r["task_bytes"] for r in rows_of), default=BYTES_PER_ELEMENT)
    peak = budget.baseline + HEADROOM + budget.workers * IN_FLIGHT_PER_WORKER * task
    from pipeline.remote import fetch_estimate, label

    return Plan(label(opts.model_dir), ckpt.plan.family.description, ckpt.plan.arch, opts.out_type,
                opts.embedding_type, records, len(kvs), outputs, store_sizes(opts, ckpt, budget, types, rows_of),
                len(json.dumps(metadata, separators=(",", ":"), sort_keys=True)) + RECORD_BYTES_PER_TENSOR * len(records),
                budget.memory_limit, budget.workers, budget.chunk_elements, int(min(peak, budget.memory_limit)),
                type_choice=opts.type_reason or "given", fetch=fetch_estimate(ckpt),
                arch_traps=arch_traps(ckpt.plan.arch, {k.key: k.value for k in kvs}.get))


def save_plan(run, plan: Plan, tag: str | None = None) -> None:
    """plan.json (plan-<tag>.json), whole or not at all, written tensor by tensor (Plan.write_json)."""
    import os

    from pipeline.rundir import plan_name
    from pipeline.safe_files import create_exclusive, write_whole

    def make(tmp: str) -> None:
        with create_exclusive(tmp, "w") as f:
            plan.write_json(f)
            f.flush()
            os.fsync(f.fileno())

    write_whole(run.path / plan_name(tag), make, suffix=".tmp")


def load_plan(run) -> dict | None:
    try:
        return json.loads((run.path / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

