"""The key/values and tensors of a GGUF file as gguf-py's GGUFReader gives them, read quickly.

GGUFReader makes a numpy view of every string of an array (two per token): it spends about 22 s of
CPU on llama.cpp's Llama 3 test vocabulary (128256 tokens, 280147 merges), 24 s on a 2^18-token
one and 2.8 s on any file of a 32k vocabulary before its first tensor, where this reading takes a
fraction of a second (the tensors' types and sizes come from gguf-py's tables). It is the test
suite's, not the converter's (the converter writes GGUF with its own pipeline/gguf_file.py), and
tests/test_gguf_kv.py holds it equal to GGUFReader on files of every value type, written by
gguf-py's own writer and by the converter. Little-endian files of GGUF versions 2 and 3, as
GGUFReader reads; nested arrays are not read here (use GGUFReader).
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np

STRING, ARRAY = 8, 9
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
           12: "<f8"}  # GGUFValueType -> numpy dtype, as gguf-py's reader maps them


class Tensor(NamedTuple):
    """One tensor as GGUFReader's ReaderTensor gives it: `tensor_type` (gguf.GGMLQuantizationType),
    `shape` (the dimensions in the file's order), `n_bytes`, and `data`: its bytes."""
    name: str
    tensor_type: object
    shape: list[int]
    n_bytes: int
    data: bytes


def read_kv(path) -> dict:
    """key -> value of every key/value pair in file order: str for a string, a Python number or
    bool for a scalar, a list of those for an array (gguf-py's `contents()`)."""
    return read_gguf(path)[0]


def read_tensors(path) -> dict[str, Tensor]:
    """name -> Tensor of every tensor, in file order (GGUFReader's `tensors`)."""
    return read_gguf(path)[1]


def read_gguf(path) -> tuple[dict, dict[str, Tensor]]:
    raw = memoryview(Path(path).read_bytes())
    if bytes(raw[:4]) != b"GGUF":
        raise ValueError("GGUF magic invalid")
    version, n_tensors, count = struct.unpack_from("<IQQ", raw, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}: not read here")
    pos, out = 24, {}
    for _ in range(count):
        key, pos = _string(raw, pos)
        (kind,), pos = struct.unpack_from("<I", raw, pos), pos + 4
        if key in out:
            raise KeyError(f"Duplicate {key}")
        out[key], pos = _value(raw, pos, kind)
    infos = []
    for _ in range(n_tensors):
        name, pos = _string(raw, pos)
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        dims = list(struct.unpack_from(f"<{n_dims}Q", raw, pos + 4))
        kind, offset = struct.unpack_from("<IQ", raw, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, dims, kind, offset))
    alignment = out.get("general.alignment", 32)
    start = -(-pos // alignment) * alignment
    tensors = {}
    for name, dims, kind, offset in infos:
        if name in tensors:
            raise ValueError(f"Found duplicated tensor with name {name}")
        tensor_type = gguf.GGMLQuantizationType(kind)
        block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        n_bytes = int(np.prod(dims)) * type_size // block_size
        at = start + offset
        if at + n_bytes > len(raw):
            raise ValueError(f"tensor {name} runs past the end of the file")
        tensors[name] = Tensor(name, tensor_type, dims, n_bytes, bytes(raw[at:at + n_bytes]))
    return out, tensors


def _string(raw: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", raw, pos)
    end = pos + 8 + n
    if end > len(raw):
        raise ValueError("a string runs past the end of the file")
    return str(raw[pos + 8:end], "utf-8"), end


def _value(raw: memoryview, pos: int, kind: int):
    if kind == STRING:
        return _string(raw, pos)
    if kind in SCALARS:
        dtype = np.dtype(SCALARS[kind])
        return np.frombuffer(raw, dtype, 1, pos).tolist()[0], pos + dtype.itemsize
    if kind != ARRAY:
        raise ValueError(f"unknown value type {kind}")
    item, n = struct.unpack_from("<IQ", raw, pos)
    pos += 12
    if item == STRING:
        values = []
        for _ in range(n):
            value, pos = _string(raw, pos)
            values.append(value)
        return values, pos
    if item not in SCALARS:
        raise ValueError(f"an array of value type {item}: not read here")
    dtype = np.dtype(SCALARS[item])
    return np.frombuffer(raw, dtype, n, pos).tolist(), pos + n * dtype.itemsize
