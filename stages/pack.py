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
from pipeline.families import FLOAT_TYPE, TERNARY
from pipeline.scheduler import chunk_task
from pipeline.stores import array_path, ensure_array, open_array, open_store, row_ranges, written_chunks


def choose_codec(role: str, shape: tuple[int, ...], out_type: str):
    """(codec, fallback reason or None) for one tensor."""
    if role != TERNARY:
        return CODECS[FLOAT_TYPE[role]], None
    codec = CODECS[out_type]
    if codec.supports(shape[-1]):
        return codec, None
    return CODECS["f16"], (f"row length {shape[-1]} is not a multiple of {codec.block_size}, "
                           f"so it cannot be {codec.name}; writing F16")


def encode_block(block: np.ndarray, codec_name: str, scale: float | None) -> np.ndarray:
    """The GGUF bytes of one row chunk: float values, or ternary codes with their scale."""
    codec = CODECS[codec_name]
    if scale is None:
        return codec.encode(block)
    if codec.ternary:
        return codec.encode(block, np.float32(scale))
    return codec.encode(block.astype(np.float32) * np.float32(scale))  # ternary fell back to a float type


def encode_rows(src: str, out: str, start: int, stop: int, codec_name: str, scale: float | None) -> None:
    data = encode_block(open_array(src, "r")[start:stop], codec_name, scale)
    dest = open_array(out)
    if dest.ndim == 1:  # 1-D tensors are a single chunk; byte and element offsets differ
        dest[:] = data
    else:
        dest[start:stop] = data


def run(ctx: StageContext) -> None:
    source = open_store(ctx.input, "r")
    group = open_store(ctx.output)
    group.attrs.update({**source.attrs.asdict(), "stage": "pack", "out_type": ctx.options.out_type})
    tasks = []
    for name in source.attrs["tensor_order"]:
        src = source[name]
        role = src.attrs["role"]
        codec, fallback = choose_codec(role, src.shape, ctx.options.out_type)
        if fallback:
            ctx.log(f"warning: {name}: {fallback}")
        rows = src.chunks[0] if src.ndim > 1 else codec.row_bytes(src.shape[0])
        scale = src.attrs.get("scale") if role == TERNARY else None
        byte_shape = (*src.shape[:-1], codec.row_bytes(src.shape[-1]))
        arr = ensure_array(group, name, byte_shape, rows, np.uint8, {
            "ggml_type": int(codec.ggml_type), "type_name": codec.name, "shape": list(src.shape),
            "role": role, **({"scale": scale} if scale is not None else {}),
        })
        done = written_chunks(arr)
        for i, (r0, r1) in enumerate(row_ranges(src.shape[0], src.chunks[0])):
            if i not in done:
                tasks.append(chunk_task(encode_rows, array_path(ctx.input, name), array_path(ctx.output, name),
                                        r0, r1, codec.name.lower(), scale))
    ctx.scheduler.run(tasks, "pack")
