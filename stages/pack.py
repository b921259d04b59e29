"""pack: quantize.zarr -> pack.zarr, the exact bytes each GGUF tensor will hold.

Every array is uint8 of shape (rows, bytes per row), chunked by the same row
ranges as before (a row is a whole number of blocks, so chunks are block
aligned). Attribute `ggml_type` names the GGML type. A ternary tensor whose row
length is not a whole number of blocks of the requested type is written as F16
(the ternary values times the scale), as llama.cpp's converter does.
"""
from __future__ import annotations

import numpy as np

from pipeline.codecs import CODECS
from pipeline.context import StageContext
from pipeline.families import TERNARY
from pipeline.outtypes import tensor_type
from pipeline.safetensors_io import as_float32
from pipeline.scheduler import chunk_task
from pipeline.stores import array_path, ensure_array, open_array, open_store, row_ranges, written_chunks


def encode_block(block: np.ndarray, codec_name: str, scale: float | None, source_dtype: str | None = None) \
        -> np.ndarray:
    """The GGUF bytes of one row chunk: float values in their source representation
    (`source_dtype`), or ternary codes with their scale."""
    codec = CODECS[codec_name]
    if scale is None:
        return codec.encode(as_float32(block, source_dtype))
    if codec.ternary:
        return codec.encode(block, np.float32(scale))
    return codec.encode(block.astype(np.float32) * np.float32(scale))  # ternary fell back to a float type


def encode_rows(src: str, out: str, start: int, stop: int, codec_name: str, scale: float | None,
                source_dtype: str) -> None:
    data = encode_block(open_array(src, "r")[start:stop], codec_name, scale, source_dtype)
    dest = open_array(out)
    if dest.ndim == 1:  # 1-D tensors are a single chunk; byte and element offsets differ
        dest[:] = data
    else:
        dest[start:stop] = data


def run(ctx: StageContext) -> None:
    source = open_store(ctx.input, "r")
    group = open_store(ctx.output)
    opts = ctx.options
    group.attrs.update({**source.attrs.asdict(), "stage": "pack", "out_type": opts.out_type,
                        "embedding_type": opts.embedding_type})
    tasks = []
    for name in source.attrs["tensor_order"]:
        src = source[name]
        role = src.attrs["role"]
        out, fallback = tensor_type(role, src.shape, opts.out_type, opts.embedding_type, name)
        if fallback:
            ctx.log(f"warning: {name}: {fallback}")
        codec = out.codec
        rows = src.chunks[0] if src.ndim > 1 else codec.row_bytes(src.shape[0])
        scale = src.attrs.get("scale") if role == TERNARY else None
        byte_shape = (*src.shape[:-1], codec.row_bytes(src.shape[-1]))
        arr = ensure_array(group, name, byte_shape, rows, np.uint8, {
            "ggml_type": out.ggml_type, "type_name": codec.name, "shape": list(src.shape),
            "role": role, **({"scale": scale} if scale is not None else {}),
        })
        done = written_chunks(arr)
        for i, (r0, r1) in enumerate(row_ranges(src.shape[0], src.chunks[0])):
            if i not in done:
                tasks.append(chunk_task(encode_rows, array_path(ctx.input, name), array_path(ctx.output, name),
                                        r0, r1, codec.name.lower(), scale, src.attrs["source_dtype"]))
    ctx.scheduler.run(tasks, "pack")
