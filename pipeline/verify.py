"""`bitnet-gguf verify OUT.gguf MODEL_DIR`: check a GGUF against its source checkpoint.

Independent of the run directory: the expected bytes of every tensor are
recomputed from the safetensors files with the stages' own per-chunk kernels
(quantize's `row_abs_sums`, `ternary_rows`, `ternary_scale`, `float_rows`; pack's
`encode_block`), chunk by chunk, and compared with the file's bytes, read with
`os.pread` at the offsets the GGUF header gives. Memory stays at one chunk.
"""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np

from pipeline.budget import plan_budget
from pipeline.checkpoint import open_checkpoint
from pipeline.codecs import CODECS, absmean_scale, absmean_total
from pipeline.errors import CheckpointError
from pipeline.families import FLOAT_TYPE, TERNARY
from pipeline.safetensors_io import pread_exact
from pipeline.stores import row_ranges
from stages.pack import encode_block
from stages.quantize import row_abs_sums, ternary_chunk_rows, ternary_rows, ternary_scale


def verify(gguf_path: Path, model_dir: Path, memory_limit: int, log) -> list[str]:
    """Return a list of problems (empty: every tensor matches)."""
    ckpt = open_checkpoint(model_dir)
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    tensors = {t.name: t for t in reader.tensors}
    budget = plan_budget(memory_limit, 1)
    problems = []
    expected_names = [t.gguf_name for t in ckpt.plan.tensors]
    extra = sorted(set(tensors) - set(expected_names))
    if extra:
        problems.append(f"tensors not in the source: {', '.join(extra)}")
    for planned in ckpt.plan.tensors:
        t = tensors.get(planned.gguf_name)
        if t is None:
            problems.append(f"{planned.gguf_name}: missing")
            continue
        problem = _check_tensor(gguf_path, t, planned, ckpt.sources[planned.hf_name], budget)
        log(f"{planned.gguf_name}: {problem or 'ok'}")
        if problem:
            problems.append(f"{planned.gguf_name}: {problem}")
    return problems


def _check_tensor(path: Path, t, planned, src, budget) -> str | None:
    shape = tuple(int(x) for x in reversed(t.shape))
    if shape != planned.shape:
        return f"shape {list(shape)} in the file, {list(planned.shape)} in the source"
    type_name = t.tensor_type.name.lower()
    if type_name not in CODECS:
        return f"unexpected type {t.tensor_type.name}"
    codec = CODECS[type_name]
    recipe = planned.recipe
    if planned.role == TERNARY:
        rows = ternary_chunk_rows(budget, planned.shape, recipe)
    else:
        rows = budget.rows_per_chunk(planned.shape)
    ranges = row_ranges(planned.shape[0], rows) if len(planned.shape) > 1 else [(0, planned.shape[0])]
    absmean = scale = None
    if planned.role == TERNARY:
        if recipe.scale_rule == "absmean":
            total = absmean_total(row_abs_sums(src.read_rows, r0, r1, src.dtype) for r0, r1 in ranges)
            absmean = float(absmean_scale(total, math.prod(planned.shape)))
        scale = float(ternary_scale(recipe, absmean))
    elif codec.name.lower() != FLOAT_TYPE[planned.role]:
        return f"type {codec.name}, expected {FLOAT_TYPE[planned.role].upper()}"
    row_bytes = codec.row_bytes(planned.shape[-1]) if len(planned.shape) > 1 else codec.row_bytes(planned.shape[0])
    for r0, r1 in ranges:
        if planned.role == TERNARY:
            block = ternary_rows(src.read_rows, r0, r1, recipe, planned.shape[0], src.dtype, absmean)
        else:
            block = src.read_rows(r0, r1)
        want = encode_block(block, codec.name.lower(), scale, src.dtype)
        start = t.data_offset + (r0 * row_bytes if len(planned.shape) > 1 else 0)
        got = np.frombuffer(pread_exact(path, start, want.nbytes, f"{path}: ends inside tensor {t.name}; "
                                        "the file is truncated"), dtype=np.uint8)
        if not np.array_equal(got, want.reshape(-1)):
            return f"bytes differ in rows {r0}..{r1}"
    return None
