"""ik_llama.cpp's own ternary types: IQ2_BN (ggml type 135), IQ1_BN (134), IQ2_BN_R4 (335).

Shaped like the other codecs (`pipeline/codecs/base.py`: classes used without instances, whole
rows in, (rows, row_bytes) uint8 out), so they join the same registry. Unlike the other ternary types,
every row starts with row meta: the row's max |x| (float32 for IQ2_BN, fp16 for IQ1_BN), so
`scale` may be one float per tensor or one per row. The bytes are those ik's quantizer writes
for the float values codes * scale; docs/notes/ik-llama.md gives the layouts and where in ik's
sources they come from.
"""
from __future__ import annotations

import numpy as np

from pipeline.codecs.base import Codec, CodecError

QK_IQ1BN = 64  # values per block, IQ1_BN and IQ2_BN alike

# A base-3 number v < 243 is stored in a byte as ceil(256 v / 243) = (256 v + 242) // 243, so
# that multiplying the byte by a power of 3 (mod 256) brings any trit to the top (ik's decoder).
_BASE3_STORE = ((np.arange(243, dtype=np.uint32) * 256 + 242) // 243).astype(np.uint8)
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint16)


def _row_fields(codes: np.ndarray, scale) -> tuple[np.ndarray, np.ndarray, int]:
    """(fields (rows, cols) uint8, row max float32 (rows,), blocks per row) for codes * scale.

    ik maps a value x to 1 if |x| < thresh = 0.5f * max|x| of its row, else 0 if x < 0, else 2.
    With x = code * s (s >= 0) that is code + 1, except in rows whose thresh is 0 (all codes
    zero, s = 0, or s = 2**-149, whose half rounds to 0): there no |x| is below thresh, so every
    zero value (also -0.0, which is not < 0) becomes 2.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise CodecError(f"codes must be 2-D (rows, cols), got shape {codes.shape}")
    rows, cols = codes.shape
    if cols == 0 or cols % QK_IQ1BN:
        raise CodecError(f"row length {cols} is not a positive multiple of {QK_IQ1BN}")
    if codes.dtype.kind not in "iu":
        raise CodecError(f"ternary codes must be integers, got {codes.dtype}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise CodecError("ternary codes must lie in {-1, 0, +1}")
    scales = np.asarray(scale, dtype=np.float32)
    if scales.ndim == 0:
        scales = np.full(rows, scales, dtype=np.float32)
    elif scales.shape != (rows,):
        raise CodecError(f"scale must be one float or one per row {(rows,)}, got shape {scales.shape}")
    if not (np.isfinite(scales) & (scales >= 0)).all():
        raise CodecError("ternary scales must be finite and >= 0")
    q = codes.astype(np.int8, copy=False).view(np.uint8) + np.uint8(1)  # -1 (255) wraps to 0
    # max |code * s| in float32: s itself when the row has a non-zero code (|+-1 * s| is exact)
    row_max = np.where((q != 1).any(axis=1), scales, np.float32(0)).astype(np.float32)
    no_thresh = (np.float32(0.5) * row_max) == 0
    if no_thresh.any():
        q[no_thresh] = np.where(q[no_thresh] == 1, np.uint8(2), q[no_thresh])
        q[row_max == 0] = 2  # s = 0: -1 * 0.0 is -0.0, not < 0, so -1 codes become 2 as well
    return q, row_max, cols // QK_IQ1BN


def _data_blocks(data: np.ndarray, codec) -> tuple[np.ndarray, int]:
    """(uint8 (rows, row_bytes) data, blocks per row), checking the row size."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] <= codec.row_meta_size \
            or (data.shape[1] - codec.row_meta_size) % codec.type_size:
        raise CodecError(f"{codec.name} data must be (rows, {codec.row_meta_size} + k * {codec.type_size}) "
                         f"bytes, got shape {data.shape}")
    return data, (data.shape[1] - codec.row_meta_size) // codec.type_size


class _RowScaled(Codec):
    """A type whose rows start with their own scale (`row_meta_size` bytes) before the blocks."""
    row_meta_size = 0

    @classmethod
    def row_bytes(cls, cols: int, tiles=None) -> int:
        return cls.row_meta_size + super().row_bytes(cols)


class IQ2_BN(_RowScaled):
    """A row is float32 max|x| (4 bytes) then blocks of 64 values in 16 bytes: byte j of a block
    holds the fields of values j, 16 + j, 32 + j, 48 + j in bits 1:0, 3:2, 5:4, 7:6 (field =
    code + 1; decoded x = max * (field - 1))."""
    name, ggml_type, block_size, type_size, ternary = "IQ2_BN", 135, QK_IQ1BN, 16, True
    row_meta_size = 4

    @classmethod
    def _blocks(cls, q: np.ndarray, rows: int, nb: int) -> np.ndarray:
        f = q.reshape(rows, nb, 4, 16)
        out = f[:, :, 3] << np.uint8(6)
        out |= f[:, :, 2] << np.uint8(4)
        out |= f[:, :, 1] << np.uint8(2)
        out |= f[:, :, 0]
        return out.reshape(rows, nb * 16)

    @classmethod
    def encode(cls, codes: np.ndarray, scale) -> np.ndarray:
        q, row_max, nb = _row_fields(codes, scale)
        rows = q.shape[0]
        out = np.empty((rows, cls.row_bytes(nb * QK_IQ1BN)), dtype=np.uint8)
        out[:, :4] = row_max.astype("<f4")[:, None].view(np.uint8)
        out[:, 4:] = cls._blocks(q, rows, nb)
        return out

    @classmethod
    def decode(cls, data: np.ndarray) -> np.ndarray:
        data, nb = _data_blocks(data, cls)
        rows = data.shape[0]
        d = data[:, :4].copy().view("<f4").astype(np.float32)  # (rows, 1)
        b = data[:, 4:].reshape(rows, nb, 1, 16)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
        q = ((b >> shifts) & np.uint8(3)).reshape(rows, nb * QK_IQ1BN)
        return (q.astype(np.float32) - 1) * d


class IQ1_BN(_RowScaled):
    """A row is fp16 max|x| (2 bytes) then blocks of 64 values in 13 bytes. Each 16 values of a
    block give three bytes ql[3g + k] (k = 0..2), the base-3 number of values 16g + 5k + j with
    weight 3**j (the first value least significant), and one trit, value 16g + 15, to byte 12
    (`extra`) with weight 3**g; every byte stores its number v as (256 v + 242) // 243."""
    name, ggml_type, block_size, type_size, ternary = "IQ1_BN", 134, QK_IQ1BN, 13, True
    row_meta_size = 2

    @classmethod
    def encode(cls, codes: np.ndarray, scale) -> np.ndarray:
        q, row_max, nb = _row_fields(codes, scale)
        rows = q.shape[0]
        groups = q.reshape(rows, nb, 4, 16).astype(np.uint16)
        ql = (groups[..., :15].reshape(rows, nb, 4, 3, 5) * _POW3).sum(axis=-1, dtype=np.uint16)
        extra = (groups[..., 15] * _POW3[:4]).sum(axis=-1, dtype=np.uint16)
        blocks = np.empty((rows, nb, 13), dtype=np.uint8)
        blocks[..., :12] = np.take(_BASE3_STORE, ql.reshape(rows, nb, 12))
        blocks[..., 12] = np.take(_BASE3_STORE, extra)
        out = np.empty((rows, cls.row_bytes(nb * QK_IQ1BN)), dtype=np.uint8)
        with np.errstate(over="ignore"):  # ik's fp16 conversion also gives inf above 65504
            out[:, :2] = row_max.astype("<f2")[:, None].view(np.uint8)
        out[:, 2:] = blocks.reshape(rows, nb * 13)
        return out

    @classmethod
    def decode(cls, data: np.ndarray) -> np.ndarray:
        data, nb = _data_blocks(data, cls)
        rows = data.shape[0]
        d = data[:, :2].copy().view("<f2").astype(np.float32)  # (rows, 1)
        blocks = data[:, 2:].reshape(rows, nb, 13)
        v = ((blocks.astype(np.uint16) * 243) >> 8)            # the stored base-3 numbers
        ql = v[..., :12].reshape(rows, nb, 4, 3, 1)
        trits = (ql // _POW3) % 3                              # (rows, nb, 4, 3, 5)
        last = (v[..., 12:13] // _POW3[:4]) % 3                # (rows, nb, 4)
        q = np.concatenate([trits.reshape(rows, nb, 4, 15), last[..., None]], axis=-1)
        with np.errstate(invalid="ignore"):  # 0 * inf where the fp16 max overflowed: NaN, as in ik
            return (q.reshape(rows, nb * QK_IQ1BN).astype(np.float32) - 1) * d


class IQ2_BN_R4(IQ2_BN):
    """IQ2_BN with 4 rows interleaved; the tensor's rows must be a multiple of 4. A group of 4
    rows is their 4 float32 maxes, then per block of 64 columns 64 bytes: byte 16l + 4k + i
    holds row k's values 16l + i, 16l + 4 + i, 16l + 8 + i, 16l + 12 + i in bits 1:0, 3:2, 5:4,
    7:6. Row sizes are IQ2_BN's, so a group is 4 * row_bytes; `encode` returns it split into
    4 rows of row_bytes (the bytes in file order)."""
    name, ggml_type = "IQ2_BN_R4", 335

    @classmethod
    def row_multiple(cls, tiles=None) -> int:
        return 4

    @classmethod
    def encode(cls, codes: np.ndarray, scale) -> np.ndarray:
        q, row_max, nb = _row_fields(codes, scale)
        rows = q.shape[0]
        if rows % 4:
            raise CodecError(f"{cls.name} needs a multiple of 4 rows, got {rows}")
        g = rows // 4
        f = q.reshape(g, 4, nb, 4, 4, 4).transpose(0, 2, 3, 1, 5, 4)  # (g, nb, l, k, i, m)
        packed = f[..., 3] << np.uint8(6)
        packed |= f[..., 2] << np.uint8(4)
        packed |= f[..., 1] << np.uint8(2)
        packed |= f[..., 0]
        out = np.empty((g, 16 + nb * 64), dtype=np.uint8)
        out[:, :16] = row_max.astype("<f4").reshape(g, 4).view(np.uint8)
        out[:, 16:] = packed.reshape(g, nb * 64)
        return out.reshape(rows, cls.row_bytes(nb * QK_IQ1BN))

    @classmethod
    def decode(cls, data: np.ndarray) -> np.ndarray:
        data, nb = _data_blocks(data, cls)
        rows = data.shape[0]
        if rows % 4:
            raise CodecError(f"{cls.name} data must hold a multiple of 4 rows, got {rows}")
        g = rows // 4
        groups = data.reshape(g, 16 + nb * 64)
        d = groups[:, :16].copy().view("<f4").astype(np.float32)  # (g, 4)
        b = groups[:, 16:].reshape(g, nb, 4, 4, 4, 1)              # (g, nb, l, k, i, 1)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
        q = (b >> shifts) & np.uint8(3)                             # (g, nb, l, k, i, m)
        q = q.transpose(0, 3, 1, 2, 5, 4).reshape(g, 4, nb * QK_IQ1BN)
        return ((q.astype(np.float32) - 1) * d[..., None]).reshape(rows, nb * QK_IQ1BN)


IK_CODECS: dict[str, type[Codec]] = {"iq2_bn": IQ2_BN, "iq1_bn": IQ1_BN, "iq2_bn_r4": IQ2_BN_R4}
