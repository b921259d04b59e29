"""quantize: extract.zarr -> quantize.zarr.

Ternary projections take two chunked passes: per-row sums of |W| (float64),
reduced exactly with `math.fsum` into the absmean scale, which is written to the
array's attributes (`absmean`, and `scale`, the magnitude the codes stand for)
before the second pass turns each chunk into int8 codes. The
scale therefore does not depend on how rows were chunked, and a resumed run
never recomputes it. Other tensors are cast to their output float type
(token embedding F16, norms F32).
"""
from __future__ import annotations

import numpy as np

from pipeline.codecs import (NonFiniteWeights, absmean_row_sums, absmean_scale, absmean_total, effective_scale,
                             ternary_codes)
from pipeline.context import StageContext
from pipeline.families import FLOAT_TYPE, TERNARY
from pipeline.safetensors_io import as_float32
from pipeline.scheduler import chunk_task
from pipeline.stores import array_path, ensure_array, open_array, open_store, row_ranges, written_chunks

FLOAT_DTYPES = {"f16": np.float16, "f32": np.float32}


def row_abs_sums(src: str, start: int, stop: int, source_dtype: str) -> np.ndarray:
    return absmean_row_sums(as_float32(open_array(src, "r")[start:stop], source_dtype))


def write_codes(src: str, out: str, start: int, stop: int, source_dtype: str, absmean: float) -> None:
    block = as_float32(open_array(src, "r")[start:stop], source_dtype)
    open_array(out)[start:stop] = ternary_codes(block, np.float32(absmean))


def write_cast(src: str, out: str, start: int, stop: int, source_dtype: str, dtype) -> None:
    block = as_float32(open_array(src, "r")[start:stop], source_dtype)
    open_array(out)[start:stop] = block.astype(dtype)


def run(ctx: StageContext) -> None:
    source = open_store(ctx.input, "r")
    group = open_store(ctx.output)
    group.attrs.update({**source.attrs.asdict(), "stage": "quantize"})
    names = source.attrs["tensor_order"]

    ternary, layouts = [], {}
    for name in names:
        src = source[name]
        role, sdtype = src.attrs["role"], src.attrs["source_dtype"]
        rows = src.chunks[0]
        base = {"hf_name": src.attrs["hf_name"], "role": role, "source_dtype": sdtype}
        if role == TERNARY:
            arr = ensure_array(group, name, src.shape, rows, np.int8, base, compress=True)
            ternary.append(name)
        else:
            dtype = FLOAT_DTYPES[FLOAT_TYPE[role]]
            arr = ensure_array(group, name, src.shape, rows, dtype, base)
        layouts[name] = (src, arr, role, sdtype, rows)

    # pass 1: absmean scales of the ternary tensors that do not have one yet
    pending = [n for n in ternary if "scale" not in layouts[n][1].attrs]
    tasks, owners = [], []
    for name in pending:
        src, _, _, sdtype, rows = layouts[name]
        for r0, r1 in row_ranges(src.shape[0], rows):
            tasks.append(chunk_task(row_abs_sums, array_path(ctx.input, name), r0, r1, sdtype))
            owners.append(name)
    sums: dict[str, list[np.ndarray]] = {n: [] for n in pending}
    for name, part in zip(owners, ctx.scheduler.run(tasks, "quantize: scales")):
        sums[name].append(part)
    for name in pending:
        src, arr = layouts[name][0], layouts[name][1]
        try:
            absmean = absmean_scale(absmean_total(sums[name]), src.size)
        except NonFiniteWeights as e:
            raise NonFiniteWeights(f"{src.attrs['source_file']}: tensor {src.attrs['hf_name']}: {e}") from None
        # codes use iscale = 1/absmean; the values they stand for are codes / iscale, which
        # llama.cpp's converter writes and which can differ from codes * absmean in the last bit
        arr.attrs.update({"absmean": float(absmean), "scale": float(effective_scale(absmean))})

    # pass 2: codes for ternary tensors, casts for the rest
    tasks = []
    for name in names:
        src, arr, role, sdtype, rows = layouts[name]
        done = written_chunks(arr)
        for i, (r0, r1) in enumerate(row_ranges(src.shape[0], rows)):
            if i in done:
                continue
            args = (array_path(ctx.input, name), array_path(ctx.output, name), r0, r1, sdtype)
            if role == TERNARY:
                task = chunk_task(write_codes, *args, arr.attrs["absmean"])
            else:
                task = chunk_task(write_cast, *args, arr.dtype)
            tasks.append(task)
    ctx.scheduler.run(tasks, "quantize")
