"""`bitnet-gguf verify OUT.gguf MODEL`: check a GGUF (or a split set) against its checkpoint.

Independent of the run directory, the whole file is recomputed from the checkpoint and
compared: every key/value (name, type, value and order, split keys included), every
tensor info (name, shape, type, offset), every tensor's bytes, recomputed chunk by chunk
with the stages' own kernels (quantize's `row_abs_sums`, `code_rows`,
`ternary_scale`; pack's `encode_block`; the registry's I2_S / TL tail), and the file's length
(nothing after the last tensor). Files are read with our own reader (pipeline/gguf_file.py:
it reads I2_S). Memory stays at one chunk.

The output type is taken from the file's general.file_type and the embedding type from its
token_embd; anything else that differs is a problem. The byte comparison uses the converter's
own kernels, so on its own it would find damaged or mismatched files, not kernel bugs: every
tensor's bytes are also decoded to values and compared with the effective weights computed
independently from the checkpoint in float64 (`EffectiveWeights`), to each type's precision.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from pipeline.budget import plan_budget
from pipeline.checkpoint import open_checkpoint
from pipeline.errors import CheckpointError
from pipeline.codecs import absmean_scale, absmean_total, group_magnitudes
from pipeline.families import (GROUP_COLUMNS, GROUPED, TERNARY, apply_reorder, apply_transform,
                               source_row_runs)
from pipeline.gguf_file import (SPLIT_COUNT, GGUFContents, align, array_item_type, part_kvs,
                                read_gguf, split_paths, type_sizes_for)
from pipeline.errors import OptionError
from pipeline.kernel_config import tiles_of
from pipeline.outtypes import (BY_GGML_TYPE, type_of_file, EMBEDDING_CHOICES, OUTPUT_TYPES, TARGET_NAMES, TARGETS, TERNARY_CHOICES,
                               resolve, target_of, targets_of, tensor_type)
from pipeline.safetensors_io import as_float32, pread_exact
from pipeline.stores import row_ranges
from pipeline.plan import I2S_ZERO_BELOW, gguf_tensors, stacked_info, LAYOUT_INT8, TARGET_KEY, TILES_KEY, code_layout, file_kvs, requantized_scale, ternary_scale
from stages.pack import block_scale_problem, encode_block
from stages.quantize import code_rows, group_scales, permute_heads, row_abs_sums, values_per_scale

_PART = re.compile(r"(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf")


class NotAPart(Exception):
    """A file named as a part of a split set holds a whole model (no split keys)."""


def split_set(path: Path) -> list[Path]:
    """All parts of the split set `path` belongs to (just `path` when it is one file)."""
    contents = read_gguf(path)
    count = contents.kv(SPLIT_COUNT)
    m = _PART.fullmatch(path.name)
    if count is None:
        if m and int(m.group("n")) > 1:  # a part of a set replaced by a whole file: the set is broken
            raise NotAPart(f"{path.name}: named as part {int(m.group('k'))} of a {int(m.group('n'))}-part split set, "
                           f"but it is a single file (no {SPLIT_COUNT}); the set is not what convert writes")
        return [path]
    if not m or int(m.group("n")) != count:
        raise CheckpointError(f"{path}: a part of a {count}-part split set, but not named NAME-0000k-of-"
                              f"{count:05d}.gguf; give the first part's path")
    parts = split_paths(path.with_name(m.group("stem") + ".gguf"), count)
    missing = [p for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]}: part of the split set is missing")
    return parts


def verify(gguf_path: Path, model_dir: Path, memory_limit: int, log, name: str | None = None,
           tokenizer_pre: str | None = None, target: str | None = None, model_name: str | None = None,
           metadata_file: Path | None = None) -> list[str]:
    """Return a list of problems (empty: the files are exactly what the checkpoint converts to).

    The layout is recomputed for `target` (x86, arm), by default the build the file names
    (our `bitnet_gguf.target` key; files without it are x86, the only layout written before).
    TL1/TL2 tiles are read from the file's `bitnet_gguf.kernel_tiles`. `model_name`,
    `metadata_file`: the --model-name and --metadata the file was converted with."""
    ckpt = open_checkpoint(model_dir, name=name, tokenizer_pre=tokenizer_pre, model_name=model_name,
                           metadata_file=metadata_file, memory_limit=memory_limit)
    try:
        paths = split_set(gguf_path)
    except NotAPart as e:
        return [str(e)]
    first = read_gguf(paths[0])
    sizes = type_sizes_for(first.kvs)  # later parts carry no model key/values: size them as the first
    parts = [first] + [read_gguf(p, sizes) for p in paths[1:]]
    problems: list[str] = []

    file_type = first.kv("general.file_type")
    own = type_of_file(file_type, [t.ggml_type for c in parts for t in c.tensors])
    option = own.type_option if own is not None else None
    if option is None:
        return [f"general.file_type {file_type!r} is not one of ours ({', '.join(TERNARY_CHOICES)})"]
    named = first.kv(TARGET_KEY)
    if target is None:
        target = named if named in TARGETS else target_of(option, "x86" if targets_of(option) else None)
    try:
        out_type = resolve(option, target).name
    except OptionError as e:
        return [str(e).replace("--type", "the file's type", 1)]
    kernel_tiles = tuple(tuple(first.kv(TILES_KEY, [])[i:i + 5]) for i in range(0, len(first.kv(TILES_KEY, [])), 5))
    tensors = [t for c in parts for t in c.tensors]
    by_name = {t.name: t for t in tensors}
    embd = by_name.get("token_embd.weight")
    embedding_type = BY_GGML_TYPE[embd.ggml_type].name if embd is not None and embd.ggml_type in BY_GGML_TYPE \
        and BY_GGML_TYPE[embd.ggml_type].name in EMBEDDING_CHOICES else "f16"
    built = f" for bitnet.cpp's {TARGET_NAMES[target]} builds" if OUTPUT_TYPES[out_type].target else ""
    budget = plan_budget(memory_limit, 1)  # a limit too small is refused before anything is logged
    log(f"{gguf_path}: {len(paths)} file(s), {option.upper()}{built}, embeddings {embedding_type.upper()}")

    expected = []  # (planned tensors, output type, GGUF tensor info, tiles): the experts of a stack together
    for name, members in gguf_tensors(ckpt.plan.tensors):
        planned = [ckpt.plan.tensors[i] for i in members]
        t = planned[0]
        out, _ = tensor_type(t.role, t.shape, out_type, embedding_type, t.gguf_name, ckpt.plan.family.norm_type)
        tiles = tiles_of(kernel_tiles, t.shape) if out.needs_tiles else None
        if out.needs_tiles and tiles is None:
            problems.append(f"{t.gguf_name}: the file's {TILES_KEY} has no tiles for its shape {tuple(t.shape)}")
            continue
        info = stacked_info(name, [(p.shape, out.ggml_type, out.nbytes(p.shape, tiles)) for p in planned],
                            t.stack is not None)
        expected.append((planned, out, info, tiles))
    if problems:
        return problems

    # key/values, part by part
    kvs = file_kvs({"arch": ckpt.plan.arch, "kv": ckpt.kv}, out_type, kernel_tiles)
    for k, c in enumerate(parts):
        want = part_kvs(kvs, k, len(parts), len(expected)) if len(parts) > 1 else kvs
        problems += _compare_kvs(paths[k], c, want)

    # tensor infos
    got_names = [t.name for t in tensors]
    want_names = [info.name for _, _, info, _ in expected]
    if got_names != want_names:
        extra = sorted(set(got_names) - set(want_names))
        missing = sorted(set(want_names) - set(got_names))
        problems.append(f"tensors differ: {len(got_names)} in the file, {len(want_names)} expected"
                        f"{'; not in the source: ' + ', '.join(extra[:5]) if extra else ''}"
                        f"{'; missing: ' + ', '.join(missing[:5]) if missing else ''}"
                        f"{'; in another order' if not extra and not missing else ''}")
    for part_path, c in zip(paths, parts):
        if c.tensors:
            end = align(c.tensors[-1].offset + c.tensors[-1].nbytes - c.data_start, c.alignment) + c.data_start
        else:
            end = align(c.data_start, c.alignment)
        if c.file_size != end:
            problems.append(f"{part_path.name}: {c.file_size - end} byte(s) after the last tensor")

    part_of = {t.name: paths[k] for k, c in enumerate(parts) for t in c.tensors}
    for members, out, info, tiles in expected:
        t = by_name.get(info.name)
        if t is None:
            continue
        notes: list[str] = []
        if (tuple(t.shape), t.ggml_type, t.nbytes) != (info.shape, info.ggml_type, info.nbytes):
            problem = (f"shape {list(t.shape)} type {t.ggml_type}, expected shape {list(info.shape)} "
                       f"type {info.ggml_type} ({out.codec.name})")
        else:
            problem, start = None, 0
            for planned in members:  # a stack: each expert's bytes in turn, where they are in the tensor
                nbytes = out.nbytes(planned.shape, tiles)
                own = t._replace(offset=t.offset + start, nbytes=nbytes) if len(members) > 1 else t
                start += nbytes
                problem = _check_tensor(part_of[info.name], own, planned, out,
                                        in_gguf_order(ckpt.sources[planned.hf_name], planned), budget, tiles, notes)
                if problem and planned.stack is not None:
                    problem = f"expert {planned.stack[1]} ({planned.hf_name}): {problem}"
                if problem:
                    break
        log(f"{info.name}: {problem or 'ok'}{''.join(f' ({n})' for n in sorted(set(notes))) if not problem else ''}")
        if problem:
            problems.append(f"{info.name}: {problem}")
    return problems


def _compare_kvs(path: Path, contents: GGUFContents, want) -> list[str]:
    got = contents.kvs
    problems = []
    got_keys, want_keys = [kv.key for kv in got], [kv.key for kv in want]
    if got_keys != want_keys:
        extra, missing = sorted(set(got_keys) - set(want_keys)), sorted(set(want_keys) - set(got_keys))
        problems.append(f"{path.name}: key/values differ: {len(got_keys)} in the file, {len(want_keys)} expected"
                        f"{'; unexpected: ' + ', '.join(extra[:5]) if extra else ''}"
                        f"{'; missing: ' + ', '.join(missing[:5]) if missing else ''}")
    want_by_key = {kv.key: kv for kv in want}
    for kv in got:
        w = want_by_key.get(kv.key)
        if w is None:
            continue
        if kv.type != w.type or not _same_value(kv.value, w.value):
            problems.append(f"{path.name}: {kv.key} is {_short(kv.value)}, expected {_short(w.value)}")
        elif kv.type == GGUFValueType.ARRAY and kv.sub_type != array_item_type(w):
            problems.append(f"{path.name}: {kv.key} is an array of {kv.sub_type.name}, "
                            f"expected {array_item_type(w).name}")
    return problems


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return np.float32(a).tobytes() == np.float32(b).tobytes() or (a == b)
    return a == b


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


class _GGUFOrder:
    """A checkpoint tensor read as the GGUF holds it (qwen35: value heads reordered, the small float
    tensors transformed, pipeline.families), so the checks below apply unchanged."""

    def __init__(self, src, planned):
        self.src, self.recipe, self.shape = src, planned.recipe, planned.shape
        self.whole = self.recipe.role != TERNARY  # Recipe.rewritten float tensors are small: read whole
        self.dtype = "F32" if self.whole else src.dtype

    def __getattr__(self, name):
        return getattr(self.src, name)

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        if self.whole:
            values = as_float32(self.src.read_rows(0, self.src.shape[0]), self.src.dtype).reshape(self.shape)
            return apply_reorder(self.recipe.reorder,
                                 apply_transform(self.recipe.transform, values, self.src.dtype))[r0:r1]
        runs = source_row_runs(self.recipe.reorder, r0, r1, self.shape[0])
        block = np.concatenate([self.src.read_rows(a, b) for a, b in runs])
        return apply_reorder(self.recipe.reorder, block) if self.recipe.reorder[0] == 1 else block


def in_gguf_order(src, planned):
    return _GGUFOrder(src, planned) if planned.recipe.rewritten else src


def _check_tensor(path: Path, t, planned, out, src, budget, tiles=None, notes=None) -> str | None:
    recipe = planned.recipe
    codec = out.codec
    if planned.role == TERNARY:
        # whole heads (the permutation) and whole tiles (TL)
        rows = budget.rows_per_chunk(planned.shape, math.lcm(recipe.row_multiple, codec.row_multiple(tiles)))
    else:
        rows = budget.rows_per_chunk(planned.shape)
    two_d = len(planned.shape) > 1
    ranges = row_ranges(planned.shape[0], rows) if two_d else [(0, planned.shape[0])]
    absmean = scale = blocks = total_abs = requantized = None
    if planned.role == TERNARY and recipe.weights == GROUPED:
        mags, zeros = [], 0
        for r0, r1 in ranges:
            values = as_float32(src.read_rows(r0, r1), src.dtype)
            m, bad = group_magnitudes(values, GROUP_COLUMNS)
            if bad is not None:
                return f"the checkpoint's values are not ternary in row {r0 + bad[0]}"
            mags.append(m)
            zeros += int((values == 0).sum())
        mags = np.concatenate(mags)
        scale, blocks = group_scales(mags)
        if blocks is not None and recipe.permute_heads:  # in the file's row order, as the codes
            blocks = permute_heads(blocks, recipe.permute_heads)
        if (out.name == "q1_0" and zeros) or blocks is not None and out.codec.ternary and \
                block_scale_problem(blocks, out, values_per_scale(blocks, planned.shape[-1])):
            # only --allow-requantize writes this: the type's own quantizer of the effective weights
            requantized = RequantizedReference(planned, src, out, float(mags.max(initial=0.0)))
            if out.codec.per_tensor_scale:
                scale = requantized_scale(blocks)
            if notes is not None:
                notes.append(f"requantized to {out.codec.name}: checked against "
                             + ("gguf.quants' quantizer of the checkpoint's values" if requantized.qtype is not None
                                else f"llama.cpp's quantize_row_{out.name}_ref of the checkpoint's values"
                                if out.name in ("q2_0", "q1_0")
                                else "ik_llama.cpp's row rule (d = max |w| of the row) on the checkpoint's values"
                                if out.name in IK_DECODED
                                else "bitnet.cpp's quantize_i2_s of the checkpoint's values" if decodable(out)
                                else "the converter's requantization (bytes only)"))
    elif planned.role != TERNARY and codec.ternary:  # a ternary --embedding-type: its groups' scales, from the data
        mags = []
        for r0, r1 in ranges:
            m, bad = group_magnitudes(as_float32(src.read_rows(r0, r1), src.dtype), GROUP_COLUMNS)
            if bad is not None:
                return f"the checkpoint's values are not ternary in row {r0 + bad[0]}, yet the file holds {codec.name}"
            mags.append(m)
        scale, blocks = group_scales(np.concatenate(mags))
    elif planned.role == TERNARY:
        if recipe.scale_rule == "absmean":  # one pass: the converter's row sums, and the reference's own sum
            sums, total_abs = [], 0.0
            for r0, r1 in ranges:
                block = src.read_rows(r0, r1)
                sums.append(row_abs_sums(lambda a, b: block, r0, r1, src.dtype))
                total_abs += float(np.abs(source_values(block, src.dtype)).sum(dtype=np.float64))
            absmean = float(absmean_scale(absmean_total(sums), math.prod(planned.shape)))
        scale = float(ternary_scale(recipe, absmean))
    row_bytes = codec.row_bytes(planned.shape[-1], tiles) if two_d else codec.row_bytes(planned.shape[0])
    # the bytes of a chunk's rows are a column range of every region (one region: whole rows)
    regions = codec.regions(planned.shape[-1], tiles) if two_d else [(0, row_bytes)]
    n_rows = planned.shape[0] if two_d else 1
    truncated = f"{path}: ends inside tensor {t.name}; the file is truncated"
    tail = out.tail_bytes(planned.shape, scale, tiles)
    tail_scale = None
    if tail:  # what a runtime reads of it: up to the scale (the 28 bytes after it are never read)
        body = t.nbytes - len(tail)
        got = bytes(pread_exact(path, t.offset + body, len(tail) - 28, truncated))
        tail_scale = float(np.frombuffer(got[-4:], "<f4")[0])
        if got != tail[:-28]:
            return f"the {codec.name} scale slot holds {np.float32(tail_scale)!r}, expected {np.float32(scale)!r}" \
                if got[:-4] == tail[:-32] else f"the {codec.name} padding before the scale is not zeros"
    # the values, independently, for the types whose rows are whole and that can be decoded here
    # (group-scaled tensors: their bytes only, against the per-block scales recomputed above)
    reference = EffectiveWeights(planned, src, total_abs) \
        if len(regions) == 1 and decodable(out) and requantized is None else None
    for r0, r1 in ranges:
        if planned.role == TERNARY:
            block = code_rows(src.read_rows, r0, r1, recipe, planned.shape, src.dtype, absmean)
            want = encode_block(block, out.name, scale, src.dtype, code_layout(planned.shape[1]), tiles,
                                None if blocks is None else blocks[r0:r1], requantized is not None)
        elif codec.ternary:  # the signs of the embedding's values are its codes
            signs = np.sign(as_float32(src.read_rows(r0, r1), src.dtype)).astype(np.int8)
            want = encode_block(signs, out.name, scale, src.dtype, LAYOUT_INT8, None,
                                None if blocks is None else blocks[r0:r1])
        else:
            want = encode_block(src.read_rows(r0, r1), out.name, None, src.dtype, offset=recipe.offset)
        want = want.reshape(-1, row_bytes) if two_d else want.reshape(1, -1)
        for c0, c1 in regions:
            start = t.offset + n_rows * c0 + (r0 * (c1 - c0) if two_d else 0)
            part = np.ascontiguousarray(want[:, c0:c1]).reshape(-1)
            got = np.frombuffer(pread_exact(path, start, part.nbytes, truncated), dtype=np.uint8)
            if not np.array_equal(got, part):
                return f"bytes differ in rows {r0}..{r1}"
        # the file's bytes equal `want` here: decode them to values
        if requantized is not None and (problem := requantized.check(want, r0, r1, tail_scale)):
            return problem
        if reference is not None and \
                (problem := reference.check(out, want if two_d else want.reshape(-1), r0, r1, tail_scale)):
            return problem
    return None


# -- the values, computed independently ---------------------------------------------------------
# The byte comparison above recomputes the file with the converter's own kernels, so a kernel
# that writes the wrong bytes (or a scale a type holds only as a subnormal) would agree with
# itself. Here the file's bytes are decoded to values (gguf's reference dequantizer; I2_S from
# its format) and compared with the effective weights computed from the checkpoint in float64,
# written plainly from the recipe: absmean in float64, packed fields unpacked one quarter at a
# time, the q/k permutation as an index map, the weight_scale rule. Each type must hold them to
# the precision it promises.

# relative error a type may add to a value (of the scale, for ternary values): half an ulp of
# its float, and a little more for the float32 steps of the reference converters
VALUE_PRECISION = {"F32": 0.0, "F16": 2.0 ** -10, "BF16": 2.0 ** -7, "TQ1_0": 2.0 ** -10, "TQ2_0": 2.0 ** -10,
                   "Q2_0": 2.0 ** -10, "Q1_0": 2.0 ** -10, "IQ1_BN": 2.0 ** -10, "IQ2_BN": 0.0, "IQ2_BN_R4": 0.0,
                   "I2_S": 2.0 ** -20}
SUBNORMAL_HALF_STEP = {"F16": 2.0 ** -25, "BF16": 2.0 ** -134}
TIE_WIDTH = 1e-5  # |W| / absmean this close to 0.5 may round either way (float32 vs float64)
CHECK_ELEMENTS = 1 << 20  # values compared at a time (the float64 reference of a chunk is not held whole)


class EffectiveWeights:
    """The values a tensor of the checkpoint stands for, row range by row range, in float64."""

    def __init__(self, planned, src, total_abs: float | None):
        """`total_abs`: the sum of |W| over a master-weight tensor (float64)."""
        self.planned, self.src, self.recipe = planned, src, planned.recipe
        self.absmean = self.scale = None
        if planned.role == TERNARY and self.recipe.weights != GROUPED:  # group-scaled: the checkpoint's values
            if self.recipe.scale_rule == "absmean":
                self.absmean = max(total_abs / math.prod(planned.shape), 1e-5)  # BitNet b1.58: mean |W|, floor 1e-5
                self.scale = self.absmean
            elif self.recipe.scale_rule == "divide":
                self.scale = 1.0 / float(self.recipe.weight_scale)
            else:
                self.scale = float(self.recipe.weight_scale)

    def _source(self, r0: int, r1: int) -> np.ndarray:
        return source_values(self.src.read_rows(r0, r1), self.src.dtype)

    def _hf_rows(self, r0: int, r1: int) -> np.ndarray:
        """The checkpoint's (unpacked) row of every GGUF row in [r0, r1)."""
        rows = np.arange(r0, r1)
        heads = self.recipe.permute_heads
        if not heads:
            return rows
        d = self.planned.shape[0] // heads  # rows per head; GGUF row 2i + j of a head is HF row j * d/2 + i
        within = rows % d
        return rows - within + (within % 2) * (d // 2) + within // 2

    def _codes(self, hf_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes, alternative codes at rounding ties) of the given checkpoint rows."""
        lo, hi = int(hf_rows.min()), int(hf_rows.max()) + 1
        if self.recipe.packed:
            quarter = self.planned.shape[0] // 4
            fields = np.empty((hi - lo, self.planned.shape[1]), dtype=np.int16)
            for k in range(lo // quarter, (hi - 1) // quarter + 1):
                a, b = max(lo, k * quarter), min(hi, (k + 1) * quarter)
                packed = self.src.read_rows(a - k * quarter, b - k * quarter).astype(np.int16)
                fields[a - lo:b - lo] = (packed >> (2 * k)) & 3
            codes = fields[hf_rows - lo] - 1
            return codes, codes
        ratio = self._source(lo, hi)[hf_rows - lo] / self.absmean
        codes = np.clip(np.rint(ratio), -1, 1)
        tie = np.abs(np.abs(ratio) - 0.5) < TIE_WIDTH
        return codes, np.where(tie, np.sign(ratio) - codes, codes)

    def check(self, out, got: np.ndarray, r0: int, r1: int, tail_scale: float | None) -> str | None:
        """A problem with the values the file's bytes `got` of GGUF rows [r0, r1) decode to."""
        if got.ndim == 1:  # a 1-D tensor (a norm): one small row
            return self._compare(out, decode_values(out, got, tail_scale), r0, r1)
        cols = self.planned.shape[-1]
        step = max(1, CHECK_ELEMENTS // cols)
        whole = out.codec.row_multiple()  # IQ2_BN_R4: groups of 4 rows decode together
        if self.recipe.permute_heads:
            whole = math.lcm(whole, self.planned.shape[0] // self.recipe.permute_heads)
        step = max(whole, step // whole * whole)
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            values = decode_values(out, got[a - r0:b - r0], tail_scale)
            if problem := self._compare(out, values, a, b):
                return problem
        return None

    def _compare(self, out, values: np.ndarray, a: int, b: int) -> str | None:
        name = out.codec.name
        if self.planned.role == TERNARY and self.recipe.weights != GROUPED:
            codes, alternative = self._codes(self._hf_rows(a, b))
            scale = self.scale
            if name in ("F32", "F16", "BF16", "Q8_0") and self.src.dtype == "F16":
                # the effective weights of fp16 master weights are fp16 values (llama.cpp's converter
                # casts codes times the scale back to the checkpoint's type before any output type)
                scale = float(np.float16(scale))
            err = np.minimum(np.abs(values - codes * scale), np.abs(values - alternative * scale))
            if name == "Q8_0":  # --type q8_0: d = fp16(scale / 127) per block, as for float values below
                tol = abs(self.scale) * (0.51 / 127 + 2.0 ** -10) + 127 * 2.0 ** -25
            else:  # at least float32's half ulp: the file holds the float32 product of code and scale
                tol = abs(self.scale) * max(VALUE_PRECISION[name], 2.0 ** -23)
            what = f"scale {self.scale:.6g}"
        else:
            hf_rows = self._hf_rows(a, b)  # a group-scaled projection's values are the checkpoint's
            want = self._source(int(hf_rows.min()), int(hf_rows.max()) + 1)[hf_rows - hf_rows.min()] \
                + self.recipe.offset  # Gemma3's norms: 1 + w
            err = np.abs(values - want)
            if name == "Q8_0":  # a block of 32 stores round(x / d), d = fp16(max|x| / 127) (for a block of
                # tiny values a subnormal fp16, as gguf's quantizer and llama.cpp write it: 127 half-steps of 2^-24)
                amax = np.abs(want).reshape(*want.shape[:-1], -1, 32).max(axis=-1)
                tol = np.repeat(amax * (0.51 / 127 + 2.0 ** -10) + 127 * 2.0 ** -25, 32, axis=-1)
            else:  # half a step of the type's subnormals, for values below its normal range
                tol = np.maximum(np.abs(want) * VALUE_PRECISION[name], SUBNORMAL_HALF_STEP.get(name, 0.0))
            what = "the checkpoint's values"
        bad = ~(err <= tol)  # NaN or infinity in the file is bad too
        if bad.any():
            i = np.unravel_index(int(np.argmax(bad)), bad.shape)
            row = a + (i[0] if bad.ndim > 1 else 0)
            return (f"values differ from the checkpoint's ({what}) by up to {float(np.nanmax(np.where(bad, err, 0))):.3g} "
                    f"in rows {a}..{b}, first at row {row}: {name} cannot hold them to its precision")
        return None


class RequantizedReference:
    """A group-scaled tensor requantized to a type that cannot hold its scales (--allow-requantize),
    checked independently of pipeline/plan.py's rule: TQ2_0 / TQ1_0 bytes must be what gguf.quants'
    quantizer makes of the checkpoint's values, Q2_0 bytes what llama.cpp's quantize_row_q2_0_ref
    makes of them (`q2_0_reference`); x86 I2_S values must be bitnet.cpp's quantize_i2_s of them
    (scale max |w| over the tensor, code sign(w) where |w| >= 1e-6)."""

    def __init__(self, planned, src, out, largest: float):
        from gguf import GGMLQuantizationType

        self.planned, self.src, self.out, self.largest = planned, src, out, largest
        self.qtype = GGMLQuantizationType[out.codec.name] if out.name in ("tq1_0", "tq2_0") else None
        if planned.recipe.permute_heads:
            raise ValueError("a group-scaled tensor with the q/k permutation has no requantization reference here")

    def check(self, got: np.ndarray, r0: int, r1: int, tail_scale: float | None) -> str | None:
        from gguf.quants import quantize

        values = source_values(self.src.read_rows(r0, r1), self.src.dtype).astype(np.float32)
        if self.qtype is not None or self.out.name in ("q2_0", "q1_0"):
            want = (quantize(values, self.qtype) if self.qtype is not None else q2_0_reference(values)
                    if self.out.name == "q2_0" else q1_0_reference(values)).reshape(got.shape)
            if not np.array_equal(want, got):
                return f"rows {r0}..{r1} are not gguf's {self.out.codec.name} quantization of the checkpoint's values"
            return None
        if self.out.name in IK_DECODED:  # quantize_one_row_2bn / _1bn: d = max|x| of the row, 0 below d / 2
            d = np.abs(values).max(axis=1, keepdims=True).astype(np.float32)
            want = np.where(np.abs(values) < np.float32(0.5) * d, 0.0, np.sign(values)).astype(np.float64)
            d = d.astype(np.float16) if self.out.name == "iq1_bn" else d
            if not np.array_equal(decode_values(self.out, got, None), want * d.astype(np.float64)):
                return (f"rows {r0}..{r1} are not ik_llama.cpp's {self.out.codec.name} quantization of the "
                        "checkpoint's values")
            return None
        if not decodable(self.out):
            return None
        if np.float32(tail_scale) != np.float32(self.largest):
            return f"the {self.out.codec.name} scale is {tail_scale!r}, not max |w| = {self.largest!r}"
        codes = np.where(np.abs(values.astype(np.float64)) < I2S_ZERO_BELOW, 0, np.sign(values))
        if not np.array_equal(decode_values(self.out, got, tail_scale), codes * np.float64(np.float32(self.largest))):
            return f"rows {r0}..{r1} are not bitnet.cpp's {self.out.codec.name} quantization of the checkpoint's values"
        return None


def q2_0_reference(values: np.ndarray) -> np.ndarray:
    """Q2_0 bytes of float32 rows, as llama.cpp's quantize_row_q2_0_ref (ggml-quants.c of the
    llama-cpp-python sdist) writes them: per 64 values d = max |x| (fp16 first), q = roundf(x / d)
    + 1 clamped to 0..3 (x times 1 / d in float32), value j in bits 2 (j % 4) of byte j / 4."""
    from gguf.quants import np_roundf

    x = np.asarray(values, dtype=np.float32).reshape(-1, 64)
    d = np.abs(x).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(np_roundf(x * inv).astype(np.int32) + 1, 0, 3).astype(np.uint8).reshape(-1, 16, 4)
    qs = (q << np.array([0, 2, 4, 6], np.uint8)).sum(axis=2, dtype=np.uint8)
    blocks = np.concatenate([d.astype("<f2").view(np.uint8), qs], axis=1)
    return blocks.reshape(*np.shape(values)[:-1], -1)


def q1_0_reference(values: np.ndarray) -> np.ndarray:
    """Q1_0 bytes of float32 rows, as llama.cpp's quantize_row_q1_0_ref writes them: per 128 values
    an fp16 d, the float32 running sum of |x| in value order (a cumulative sum: each step rounds as
    the C loop's +=) divided by 128; then 16 bytes, bit i of byte j set where value 8j + i >= 0."""
    x = np.asarray(values, dtype=np.float32).reshape(-1, 128)
    d = np.cumsum(np.abs(x), axis=1, dtype=np.float32)[:, -1:] / np.float32(128)
    bits = (x >= 0).reshape(-1, 16, 8).astype(np.uint16) << np.arange(8, dtype=np.uint16)
    blocks = np.concatenate([d.astype("<f2").view(np.uint8), bits.sum(axis=2).astype(np.uint8)], axis=1)
    return blocks.reshape(*np.shape(values)[:-1], -1)


def source_values(block: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values of checkpoint rows in their source representation (bf16 is the top half of a float32)."""
    if dtype == "BF16":
        return (np.asarray(block, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(block).astype(np.float64)


IK_DECODED = ("iq2_bn", "iq1_bn", "iq2_bn_r4")
VALUE_DECODED = ("tq1_0", "tq2_0", "i2_s", "q2_0", "q1_0", "f16", "bf16", "f32", "q8_0", *IK_DECODED)
IK_TRIT_MULT = np.array([81, 27, 9, 3, 1], dtype=np.uint8)  # byte * 3**(4 - j) mod 256 brings trit j to the top


def decode_ik(name: str, rows: np.ndarray) -> np.ndarray:
    """float64 values of (rows, row_bytes) of ik_llama.cpp's types, from docs/notes/ik-llama.md
    (not pipeline/codecs/ik.py): IQ2_BN is a float32 d, then per 64 values 16 bytes, value
    j + 16t in bits 2t of byte j; IQ1_BN an fp16 d, then per 64 values 12 bytes of 5 trits
    (value 16g + 5k + j is trit j of byte 3g + k, read as ik does: v = byte * 3**(4 - j) mod 256,
    trit = 3v >> 8) and one byte of the 4 trits of values 16g + 15; IQ2_BN_R4 groups of 4 rows,
    their 4 float32 d, then per 64 columns byte 16l + 4k + i holding row k's values 16l + i + 4m
    in bits 2m. A value is d (field - 1)."""
    n_rows = rows.shape[0]
    shifts = np.array([0, 2, 4, 6], np.uint8)
    if name == "iq2_bn":
        d = rows[:, :4].copy().view("<f4").astype(np.float64)
        f = (rows[:, 4:].reshape(n_rows, -1, 1, 16) >> shifts.reshape(4, 1)) & 3  # (rows, blocks, t, j)
        return (f.reshape(n_rows, -1).astype(np.float64) - 1) * d
    if name == "iq1_bn":
        d = rows[:, :2].copy().view("<f2").astype(np.float64)
        blocks = rows[:, 2:].reshape(n_rows, -1, 13)
        v = (blocks[..., :12, None] * IK_TRIT_MULT).astype(np.uint16)     # uint8 product: mod 256
        trits = ((v * 3) >> 8).reshape(n_rows, blocks.shape[1], 4, 15)    # (rows, blocks, g, 5k + j)
        last = ((blocks[..., 12:13] * IK_TRIT_MULT[:4]).astype(np.uint16) * 3) >> 8  # (rows, blocks, g)
        f = np.concatenate([trits, last[..., None]], axis=-1)
        return (f.reshape(n_rows, -1).astype(np.float64) - 1) * d
    assert name == "iq2_bn_r4" and n_rows % 4 == 0, name
    groups = rows.reshape(n_rows // 4, -1)
    d = groups[:, :16].copy().view("<f4").astype(np.float64)                     # (groups, 4)
    b = groups[:, 16:].reshape(n_rows // 4, -1, 4, 4, 4)                           # (groups, block, l, k, i)
    f = (b[..., None] >> shifts) & 3                                               # (..., m)
    f = f.transpose(0, 3, 1, 2, 5, 4).reshape(n_rows // 4, 4, -1)                  # (groups, k, block l m i)
    return ((f.astype(np.float64) - 1) * d[..., None]).reshape(n_rows, -1)


def decodable(out) -> bool:
    """Whether `decode_values` reads this type (gguf's types, x86 I2_S and Q2_0; the ARM I2_S and TL
    layouts are checked by their bytes only)."""
    return out.name in VALUE_DECODED


def decode_values(out, data: np.ndarray, tail_scale: float | None) -> np.ndarray:
    """float64 values of a tensor's bytes (rows of them): gguf's reference dequantizer; I2_S (which
    gguf does not know) from its format: 2-bit fields q[b], q[32+b], q[64+b], q[96+b] of each
    128-value block in bits 7:6, 5:4, 3:2, 1:0 of byte b, code q - 1, times the float32 tail scale;
    Q2_0 (which gguf does not decode) from FORMATS.md: per 18 bytes an fp16 d, then value j in bits
    2 (j % 4) of byte j / 4, (q - 1) d."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if out.name == "q1_0":  # per 18 bytes an fp16 d, then bit i of byte j: value 8j + i is +d if set, else -d
        blocks = data.reshape(-1, 18)
        d = blocks[:, :2].copy().view("<f2").astype(np.float64)
        bit = (blocks[:, 2:, None] >> np.arange(8, dtype=np.uint8)) & 1
        values = np.where(bit.reshape(-1, 128) == 1, 1.0, -1.0) * d
        return values.reshape(*data.shape[:-1], -1) if data.ndim > 1 else values.reshape(-1)
    if out.name in IK_DECODED:
        return decode_ik(out.name, data.reshape(-1, data.shape[-1]))
    if out.name == "q2_0":
        blocks = data.reshape(-1, 18)
        d = blocks[:, :2].copy().view("<f2").astype(np.float64)
        q = (blocks[:, 2:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
        values = (q.reshape(-1, 64).astype(np.float64) - 1) * d
        return values.reshape(*data.shape[:-1], -1) if data.ndim > 1 else values.reshape(-1)
    if out.name == "i2_s":
        rows = data.reshape(-1, data.shape[-1])
        fields = (rows.reshape(rows.shape[0], -1, 1, 32) >> np.array([6, 4, 2, 0], np.uint8).reshape(4, 1)) & 3
        return (fields.reshape(rows.shape[0], -1).astype(np.float64) - 1) * np.float64(np.float32(tail_scale))
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    with np.errstate(over="ignore", invalid="ignore"):
        return dequantize(data, GGMLQuantizationType(out.ggml_type)).astype(np.float64)
