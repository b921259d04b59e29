"""`bitnet-gguf verify OUT.gguf MODEL`: check a GGUF (or a split set) against its checkpoint.

Independent of the run directory, the whole file is recomputed from the checkpoint and
compared: every key/value (name, type, value and order, split keys included), every
tensor info (name, shape, type, offset), every tensor's bytes, recomputed chunk by chunk
with the stages' own kernels (quantize's `row_abs_sums`, `code_rows`,
`ternary_scale`; pack's `encode_block`; the registry's I2_S / TL tail), and the file's length
(nothing after the last tensor). Files are read with our own reader (pipeline/gguf_file.py:
it reads I2_S). Memory stays at one chunk.

The output type is taken from the file's general.file_type and the embedding type from its
token_embd; anything else that differs is a problem. `verify` uses the converter's own
kernels, so it finds damaged or mismatched files, not kernel bugs (the tests check those).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from pipeline.budget import plan_budget
from pipeline.checkpoint import open_checkpoint
from pipeline.errors import CheckpointError
from pipeline.codecs import absmean_scale, absmean_total
from pipeline.families import TERNARY
from pipeline.gguf_file import (SPLIT_COUNT, GGUFContents, TensorInfo, align, part_kvs, read_gguf,
                                split_paths, type_sizes_for)
from pipeline.errors import OptionError
from pipeline.kernel_config import tiles_of
from pipeline.outtypes import (BY_GGML_TYPE, EMBEDDING_CHOICES, OUTPUT_TYPES, TARGET_NAMES, TARGETS, TERNARY_CHOICES,
                               resolve, target_of, targets_of, tensor_type)
from pipeline.safetensors_io import pread_exact
from pipeline.stores import row_ranges
from stages.assemble import TARGET_KEY, TILES_KEY, file_kvs
from stages.pack import encode_block
from stages.quantize import code_layout, code_rows, row_abs_sums, ternary_scale

_PART = re.compile(r"(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf")


def split_set(path: Path) -> list[Path]:
    """All parts of the split set `path` belongs to (just `path` when it is one file)."""
    contents = read_gguf(path)
    count = contents.kv(SPLIT_COUNT)
    if count is None:
        return [path]
    m = _PART.fullmatch(path.name)
    if not m or int(m.group("n")) != count:
        raise CheckpointError(f"{path}: a part of a {count}-part split set, but not named NAME-0000k-of-"
                              f"{count:05d}.gguf; give the first part's path")
    parts = split_paths(path.with_name(m.group("stem") + ".gguf"), count)
    missing = [p for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]}: part of the split set is missing")
    return parts


def verify(gguf_path: Path, model_dir: Path, memory_limit: int, log, name: str | None = None,
           tokenizer_pre: str | None = None, target: str | None = None) -> list[str]:
    """Return a list of problems (empty: the files are exactly what the checkpoint converts to).

    The layout is recomputed for `target` (x86, arm), by default the build the file names
    (our `bitnet_gguf.target` key; files without it are x86, the only layout written before).
    TL1/TL2 tiles are read from the file's `bitnet_gguf.kernel_tiles`."""
    ckpt = open_checkpoint(model_dir, name=name, tokenizer_pre=tokenizer_pre, memory_limit=memory_limit)
    paths = split_set(gguf_path)
    first = read_gguf(paths[0])
    sizes = type_sizes_for(first.kvs)  # later parts carry no model key/values: size them as the first
    parts = [first] + [read_gguf(p, sizes) for p in paths[1:]]
    problems: list[str] = []

    file_type = first.kv("general.file_type")
    option = next((n for n in TERNARY_CHOICES if OUTPUT_TYPES[n].file_type == file_type), None)
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
    log(f"{gguf_path}: {len(paths)} file(s), {option.upper()}{built}, embeddings {embedding_type.upper()}")

    expected = []
    for t in ckpt.plan.tensors:
        out, _ = tensor_type(t.role, t.shape, out_type, embedding_type, t.gguf_name)
        tiles = tiles_of(kernel_tiles, t.shape) if out.needs_tiles else None
        if out.needs_tiles and tiles is None:
            problems.append(f"{t.gguf_name}: the file's {TILES_KEY} has no tiles for its shape {tuple(t.shape)}")
            continue
        expected.append((t, out, TensorInfo(t.gguf_name, t.shape, out.ggml_type, out.nbytes(t.shape, tiles)), tiles))
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

    budget = plan_budget(memory_limit, 1)
    part_of = {t.name: paths[k] for k, c in enumerate(parts) for t in c.tensors}
    for planned, out, info, tiles in expected:
        t = by_name.get(info.name)
        if t is None:
            continue
        if (tuple(t.shape), t.ggml_type, t.nbytes) != (info.shape, info.ggml_type, info.nbytes):
            problem = (f"shape {list(t.shape)} type {t.ggml_type}, expected shape {list(info.shape)} "
                       f"type {info.ggml_type} ({out.codec.name})")
        else:
            problem = _check_tensor(part_of[info.name], t, planned, out, ckpt.sources[planned.hf_name], budget, tiles)
        log(f"{info.name}: {problem or 'ok'}")
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


def _check_tensor(path: Path, t, planned, out, src, budget, tiles=None) -> str | None:
    recipe = planned.recipe
    codec = out.codec
    if planned.role == TERNARY:
        # whole heads (the permutation) and whole tiles (TL)
        rows = budget.rows_per_chunk(planned.shape, math.lcm(recipe.row_multiple, codec.row_multiple(tiles)))
    else:
        rows = budget.rows_per_chunk(planned.shape)
    two_d = len(planned.shape) > 1
    ranges = row_ranges(planned.shape[0], rows) if two_d else [(0, planned.shape[0])]
    absmean = scale = None
    if planned.role == TERNARY:
        if recipe.scale_rule == "absmean":
            sums = (row_abs_sums(src.read_rows, r0, r1, src.dtype) for r0, r1 in ranges)
            absmean = float(absmean_scale(absmean_total(sums), math.prod(planned.shape)))
        scale = float(ternary_scale(recipe, absmean))
    row_bytes = codec.row_bytes(planned.shape[-1], tiles) if two_d else codec.row_bytes(planned.shape[0])
    # the bytes of a chunk's rows are a column range of every region (one region: whole rows)
    regions = codec.regions(planned.shape[-1], tiles) if two_d else [(0, row_bytes)]
    n_rows = planned.shape[0] if two_d else 1
    truncated = f"{path}: ends inside tensor {t.name}; the file is truncated"
    for r0, r1 in ranges:
        if planned.role == TERNARY:
            block = code_rows(src.read_rows, r0, r1, recipe, planned.shape, src.dtype, absmean)
            want = encode_block(block, out.name, scale, src.dtype, code_layout(planned.shape[1]), tiles)
        else:
            want = encode_block(src.read_rows(r0, r1), out.name, None, src.dtype)
        want = want.reshape(-1, row_bytes) if two_d else want.reshape(1, -1)
        for c0, c1 in regions:
            start = t.offset + n_rows * c0 + (r0 * (c1 - c0) if two_d else 0)
            part = np.ascontiguousarray(want[:, c0:c1]).reshape(-1)
            got = np.frombuffer(pread_exact(path, start, part.nbytes, truncated), dtype=np.uint8)
            if not np.array_equal(got, part):
                return f"bytes differ in rows {r0}..{r1}"
    tail = out.tail_bytes(planned.shape, scale, tiles)
    if tail:  # what a runtime reads of it: up to the scale (the 28 bytes after it are never read)
        body = t.nbytes - len(tail)
        got = bytes(pread_exact(path, t.offset + body, len(tail) - 28, truncated))
        if got != tail[:-28]:
            found = np.frombuffer(got[-4:], "<f4")[0]
            return f"the {codec.name} scale slot holds {found!r}, expected {np.float32(scale)!r}" \
                if got[:-4] == tail[:-32] else f"the {codec.name} padding before the scale is not zeros"
    return None
