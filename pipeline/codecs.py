"""Codecs: numpy blocks in, the bytes of one GGUF tensor type out.

Two kinds of kernel live here, both pure functions of numpy arrays:

- the absmean ternary quantizer of BitNet b1.58 (`absmean_row_sums`,
  `absmean_total`, `absmean_scale`, `effective_scale`, `ternary_codes`), used by the quantize stage;
- one small codec class per output type (`TQ2_0`, `TQ1_0`, `I2_S`, `F16`,
  `F32`), used by the pack stage on row chunks. A ternary tensor travels between
  the two as int8 `codes` in {-1, 0, +1} plus one float32 `scale`
  (W' = codes * scale); the ternary codecs pack the codes directly, with integer
  arithmetic only, and produce the same bytes as `gguf.quants.quantize` applied
  to the float values `codes * scale`.

Codecs are classes used without instances (like gguf-py's `quants.py`). Each
works on whole rows; a row must be a whole number of blocks (`supports`), so any
split of a tensor into row chunks encodes independently.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from pipeline.errors import CheckpointError

QK_K = 256        # values per TQ1_0 / TQ2_0 block
QK_I2_S = 128     # values per I2_S block (32 bytes) in bitnet.cpp's x86 builds
QK_I2_S_ARM = 64  # ... and in its ARM (NEON) builds (16 bytes)
QK2_0 = 64        # values per Q2_0 block (upstream llama.cpp, ggml type 42)
QK1_0 = 128       # values per Q1_0 block (upstream llama.cpp, ggml type 41: binary, 1-bit Bonsai)
I2_S_TAIL = 32    # bytes after an I2_S tensor's packed codes: float32 scale + 28 unused
ABSMEAN_FLOOR = 1e-5


class CodecError(ValueError):
    """A codec was given data it cannot encode (a bug upstream, not a user error)."""


class NonFiniteWeights(CheckpointError):
    """A tensor that should be ternary-quantized holds NaN or infinite values."""


# -- absmean ternary quantization (BitNet b1.58) ----------------------------------------------

def absmean_row_sums(block: np.ndarray) -> np.ndarray:
    """float64 sum of |x| over each row of a block (a 1-D block is one row).

    Values are widened to float32 first (what the reference converters see). A row is
    never split between chunks, so the per-row sums, and `absmean_total` of them, do
    not depend on how a tensor was chunked.
    """
    values = np.abs(np.asarray(block, dtype=np.float32))
    return np.atleast_1d(values.reshape(values.shape[0] if values.ndim > 1 else 1, -1).sum(axis=1, dtype=np.float64))


def absmean_total(row_sums) -> float:
    """Exactly rounded total of per-row sums (math.fsum), whatever their order."""
    return math.fsum(np.concatenate([np.atleast_1d(r) for r in row_sums]).tolist())


def absmean_scale(total_abs_sum: float, n: int) -> np.float32:
    """The tensor's scale s = max(mean|W|, 1e-5), rounded once to float32."""
    total = float(total_abs_sum)
    if not np.isfinite(total):
        raise NonFiniteWeights(f"sum of |W| is {total}: the weights contain NaN or Inf")
    if n <= 0:
        raise CodecError(f"absmean of an empty tensor (n = {n})")
    return np.float32(max(total / n, ABSMEAN_FLOOR))


def effective_scale(absmean: np.float32) -> np.float32:
    """The magnitude a code of +-1 stands for: float32(1 / float32(1 / absmean)).

    llama.cpp's converter writes codes / iscale (iscale = 1 / absmean in float32), which
    differs from codes * absmean in the last bit for some scales; we match its bytes.
    """
    return np.float32(1) / (np.float32(1) / np.float32(absmean))


def ternary_codes(block: np.ndarray, scale: np.float32) -> np.ndarray:
    """int8 codes clip(round(x / scale), -1, 1) for one block of weights.

    Computed exactly as llama.cpp's converter does it in torch, so our codes equal its codes
    bit for bit: in float32, x is multiplied by iscale = float32(1) / scale (not divided by
    scale; x * fl(1/s) and x / s differ in the last bit for some x, which moves values lying
    next to +-0.5 across the rounding boundary), then rounded half to even (torch.round and
    np.rint both do that, so +-0.5 -> 0 and +-1.5 -> +-2 -> +-1), then clamped.
    """
    iscale = np.float32(1) / np.float32(scale)
    values = np.array(block, dtype=np.float32, copy=True)
    values *= iscale
    np.rint(values, out=values)
    np.clip(values, -1, 1, out=values)
    return values.astype(np.int8)


# -- group-scaled ternary weights (read from the data) ------------------------------------------

def group_magnitudes(block: np.ndarray, group: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """(float32 (rows, cols / group) magnitudes, first non-ternary (row, group) or None) of float
    weights that should hold {-s, 0, +s} in every run of `group` values of a row: each group's s
    is its max |x| (0 for an all-zero group), and every value's |x| must be 0 or s (NaN and
    infinities never are)."""
    values = np.asarray(block, dtype=np.float32)
    rows, cols = values.shape
    a = np.abs(values).reshape(rows, cols // group, group)
    m = a.max(axis=2)
    ok = ((a == 0) | (a == m[..., None])).all(axis=2) & np.isfinite(m)
    if ok.all():
        return m, None
    r, g = np.argwhere(~ok)[0]
    return m, (int(r), int(g))


def group_rows(block: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (rows, cols / group) magnitudes, bool per row: every run of `group` values of the row
    is {-s, 0, +s}) of float weights that may or may not be ternary (an embedding)."""
    values = np.asarray(block, dtype=np.float32)
    rows, cols = values.shape
    a = np.abs(values).reshape(rows, cols // group, group)
    m = a.max(axis=2)
    ok = ((a == 0) | (a == m[..., None])).all(axis=2) & np.isfinite(m)
    return m, ok.all(axis=1)


def constant_over(mags: np.ndarray, values: int, group: int) -> bool:
    """Whether the non-zero magnitudes (one per `group` values, rows x groups) agree inside every run
    of `values` values of a row (a group of zeros takes any scale)."""
    rows, groups = mags.shape
    if values % group or groups * group % values:
        return False
    m = mags.reshape(rows, -1, values // group)
    top = m.max(axis=2, keepdims=True)
    return not ((m != top) & (m > 0)).any()


def scale_granularity(mags: np.ndarray, group: int) -> str:
    """How finely a ternary tensor's scale changes, from its magnitudes per `group` values:
    "tensor" (one non-zero magnitude), "row" (one per row: the group is the whole row) or
    "group N" (N: the largest power-of-two multiple of `group` the scale is constant over)."""
    nonzero = mags[mags > 0]
    if nonzero.size == 0 or (nonzero == nonzero[0]).all():
        return "tensor"
    cols = mags.shape[1] * group
    if constant_over(mags, cols, group):
        return "row"
    n = group
    while n * 2 < cols and constant_over(mags, n * 2, group):
        n *= 2
    return f"group {n}"


def sign_fields(block: np.ndarray) -> np.ndarray:
    """Fields (code + 1, uint8) of ternary float values: the sign of each value."""
    codes = np.sign(np.asarray(block, dtype=np.float32)).astype(np.int8)
    return codes.view(np.uint8) + np.uint8(1)


# -- helpers shared by the ternary codecs -----------------------------------------------------

def _trits(codes: np.ndarray) -> np.ndarray:
    """codes in {-1, 0, +1} (any integer dtype) -> uint8 q = code + 1 in {0, 1, 2}."""
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise CodecError(f"ternary codes must be integers, got {codes.dtype}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise CodecError("ternary codes must lie in {-1, 0, +1}")
    # int8 -1/0/+1 viewed as uint8 is 255/0/1; uint8 addition wraps 255 + 1 to 0.
    return codes.astype(np.int8, copy=False).view(np.uint8) + np.uint8(1)


def _fp16_bytes(scale: np.float32) -> np.ndarray:
    """The 2 little-endian bytes of fp16(scale) (via float32, as gguf's quantizer rounds)."""
    return np.array([np.float32(scale)], dtype=np.float32).astype("<f2").view(np.uint8)


def _d_bytes(scale, rows: int, nb: int, nonzero: np.ndarray) -> np.ndarray:
    """(rows, nb, 2) fp16 bytes of each block's d: fp16(scale) for a block with a non-zero code, 0
    for a block without one (gguf's and llama.cpp's quantizers write d = max|x| = 0 there, and the
    block decodes to exact zeros whatever d is). `scale` is one scale, or one per block (rows, nb)
    for group-scaled tensors whose scale is constant over each block of the type; a block of zeros
    takes any scale (a group of zeros has none: 0), every other block needs a finite positive one.
    `nonzero`: (rows, nb, 1) bool, whether each block has a non-zero code."""
    scales = np.asarray(scale, dtype=np.float32)
    if scales.ndim == 0:
        d = _fp16_bytes(_check_scale(scales))
    else:
        if scales.shape != (rows, nb):
            raise CodecError(f"block scales must have shape {(rows, nb)}, got {scales.shape}")
        used = nonzero[..., 0]
        if not (~used | (np.isfinite(scales) & (scales > 0))).all():
            raise CodecError("block scales must be finite and positive for every block with a non-zero code")
        d = np.where(used, scales, np.float32(0)).astype("<f2")[..., None].view(np.uint8)
    return np.where(nonzero, d, np.uint8(0))


def _check_scale(scale) -> np.float32:
    s = np.float32(scale)
    if not (np.isfinite(s) and s > 0):
        raise CodecError(f"a ternary scale must be finite and positive, got {scale!r}")
    return s


def _pack_base3(q: np.ndarray) -> np.ndarray:
    """(..., k, width) trits -> (..., width) base-3 numbers, the first field most significant.

    Horner's rule in uint8: every intermediate is at most 3**5 - 1 = 242, so nothing wraps.
    """
    acc = q[..., 0, :].copy()
    for i in range(1, q.shape[-2]):
        acc *= np.uint8(3)
        acc += q[..., i, :]
    return acc


# A TQ1_0 byte holding base-3 number v (< 243) is stored as ceil(v * 256 / 243), which puts the
# most significant trit in the top bits of the byte. Read back: v = (b * 243) >> 8.
_TQ1_STORE = ((np.arange(243, dtype=np.uint32) * 256 + 242) // 243).astype(np.uint8)
_TQ1_LOAD = ((np.arange(256, dtype=np.uint32) * 243) >> 8).astype(np.uint8)


def _unpack_base3(packed: np.ndarray, fields: int, weights: tuple[int, ...]) -> np.ndarray:
    """(..., width) base-3 numbers -> (..., fields, width) trits, inverse of `_pack_base3`."""
    v = packed.astype(np.int16)
    w = np.array(weights[:fields], dtype=np.int16).reshape(fields, 1)
    return ((v[..., None, :] // w) % 3).astype(np.uint8)


def _rows_of_blocks(a: np.ndarray, block_size: int, what: str) -> tuple[int, int]:
    if a.ndim != 2:
        raise CodecError(f"{what} must be 2-D (rows, cols), got shape {a.shape}")
    rows, cols = a.shape
    if cols % block_size:
        raise CodecError(f"row length {cols} is not a multiple of the block size {block_size}")
    return rows, cols // block_size


# -- ternary codes at 2 bits per value (what quantize.zarr stores) -----------------------------
#
# Row by row, blocks of 128 values in 32 bytes: byte b of block i holds the fields
# f = code + 1 of values 128i + b, 128i + 32 + b, 128i + 64 + b and 128i + 96 + b in bits
# 1:0, 3:2, 5:4 and 7:6. That is TQ2_0's order inside each half of a 256-value block (so
# TQ2_0 is these bytes plus a block scale) and I2_S's with the bit pairs reversed (so I2_S
# is one byte lookup): the two fast output types need no per-value work in pack. TL1 and TL2
# work from the same fields moved into column order (`column_order`), never one byte per value.

CODE_BLOCK = 128
_ZERO_CODES_BYTE = 0x55  # four fields of 1 (code 0)


def codes_supported(cols: int) -> bool:
    return cols > 0 and cols % CODE_BLOCK == 0


def pack_fields(fields: np.ndarray) -> np.ndarray:
    """(rows, cols) fields in {0, 1, 2} (uint8) -> (rows, cols / 4) bytes of the 2-bit code layout."""
    rows, nb = _rows_of_blocks(fields, CODE_BLOCK, "fields")
    f = np.asarray(fields, dtype=np.uint8).reshape(rows, nb, 4, 32)
    out = f[:, :, 3, :] << np.uint8(6)
    out |= f[:, :, 2, :] << np.uint8(4)
    out |= f[:, :, 1, :] << np.uint8(2)
    out |= f[:, :, 0, :]
    return out.reshape(rows, nb * 32)


def unpack_fields(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_fields`: (rows, cols / 4) bytes -> (rows, cols) fields (uint8)."""
    rows, nb = _rows_of_blocks(np.asarray(packed), 32, "packed codes")
    b = np.asarray(packed, dtype=np.uint8).reshape(rows, nb, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    return ((b >> shifts) & np.uint8(3)).reshape(rows, nb * CODE_BLOCK)


def codes_from_packed(packed: np.ndarray) -> np.ndarray:
    """int8 codes in {-1, 0, +1} from the 2-bit code layout."""
    return unpack_fields(packed).view(np.int8) - np.int8(1)


# I2_S byte from a code-layout byte: the same four fields with their bit pairs reversed
_I2S_FROM_CODE_BYTE = np.array([((b & 3) << 6) | (((b >> 2) & 3) << 4) | (((b >> 4) & 3) << 2) | (b >> 6)
                                for b in range(256)], dtype=np.uint8)


# -- codecs ------------------------------------------------------------------------------------

class Codec:
    """One GGUF tensor type: row chunks in, the tensor's bytes (rows, row_bytes) out."""

    name: str
    ggml_type: int
    block_size: int   # values per block
    type_size: int    # bytes per block
    ternary: bool     # encode(codes, scale) if True, encode(values) if False
    # one scale for the whole tensor, stored after its codes (I2_S, TL1, TL2), rather than one per
    # block: a group-scaled tensor takes such a type only if its scale is one number
    per_tensor_scale: bool = False

    def __init__(self):
        raise TypeError("codecs are used through their class methods")

    @classmethod
    def supports(cls, cols: int) -> bool:
        return cols > 0 and cols % cls.block_size == 0

    @classmethod
    def row_bytes(cls, cols: int, tiles=None) -> int:
        if not cls.supports(cols):
            raise CodecError(f"{cls.name} cannot hold rows of {cols} values "
                             f"(not a multiple of {cls.block_size})")
        return cols // cls.block_size * cls.type_size

    @classmethod
    def encode_codes(cls, packed: np.ndarray, scale: np.float32, tiles=None) -> np.ndarray:
        """The bytes of ternary values given as the 2-bit code layout (see `pack_fields`) and
        their scale; the same bytes as `encode` of the int8 codes (or of codes * scale)."""
        codes = codes_from_packed(packed)
        if cls.ternary:
            return cls.encode(codes, scale, tiles) if tiles is not None else cls.encode(codes, scale)
        return cls.encode(codes.astype(np.float32) * np.float32(scale))

    # A tensor's bytes are its rows' bytes, written region by region (one region: row after
    # row; TL2 has three, each a column range of every row chunk), then a tail.

    @classmethod
    def regions(cls, cols: int, tiles=None) -> list[tuple[int, int]]:
        """Byte column ranges of the (rows, row_bytes) array, in the order the file holds them."""
        return [(0, cls.row_bytes(cols, tiles))]

    @classmethod
    def tail_size(cls, shape=None, tiles=None) -> int:
        return 0

    @classmethod
    def tail_bytes(cls, shape, scale, tiles=None) -> bytes:
        return b""

    @classmethod
    def row_multiple(cls, tiles=None) -> int:
        """Rows a chunk must be a multiple of (whole tiles), 1 for row-by-row types."""
        return 1


class TQ2_0(Codec):
    """66 bytes per 256 values: 64 bytes of 2-bit q = code + 1, then fp16 d = max|x|.

    Byte 32j + m of a block holds q[128j + m] in bits 1:0, q[128j + 32 + m] in 3:2,
    q[128j + 64 + m] in 5:4 and q[128j + 96 + m] in 7:6.
    """
    name, ggml_type, block_size, type_size, ternary = "TQ2_0", GGMLQuantizationType.TQ2_0, QK_K, 66, True

    @classmethod
    def encode(cls, codes: np.ndarray, scale: np.float32) -> np.ndarray:
        rows, nb = _rows_of_blocks(codes, QK_K, "codes")
        q = _trits(codes).reshape(rows, nb, 2, 4, 32)
        out = np.empty((rows, nb, cls.type_size), dtype=np.uint8)
        qs = out[..., :64].reshape(rows, nb, 2, 32)
        np.left_shift(q[..., 3, :], 6, out=qs)
        qs |= q[..., 2, :] << 4
        qs |= q[..., 1, :] << 2
        qs |= q[..., 0, :]
        out[..., 64:] = _block_d(q.reshape(rows, nb, QK_K), scale)
        return out.reshape(rows, nb * cls.type_size)

    @classmethod
    def encode_codes(cls, packed: np.ndarray, scale: np.float32) -> np.ndarray:
        """The code layout is TQ2_0's qs order: copy 64 bytes per block, add d."""
        rows, nb = _rows_of_blocks(np.asarray(packed), 64, "packed codes")
        qs = np.asarray(packed, dtype=np.uint8).reshape(rows, nb, 64)
        out = np.empty((rows, nb, cls.type_size), dtype=np.uint8)
        out[..., :64] = qs
        nonzero = (qs != _ZERO_CODES_BYTE).any(axis=-1, keepdims=True)
        out[..., 64:] = _d_bytes(scale, rows, nb, nonzero)
        return out.reshape(rows, nb * cls.type_size)

    @classmethod
    def decode(cls, data: np.ndarray) -> np.ndarray:
        rows, nb = _rows_of_blocks(np.asarray(data), cls.type_size, "data")
        blocks = np.asarray(data, dtype=np.uint8).reshape(rows, nb, cls.type_size)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
        q = (blocks[..., :64].reshape(rows, nb, 2, 1, 32) >> shifts) & np.uint8(3)
        return _values(q.reshape(rows, nb, QK_K), blocks[..., 64:], rows)


class TQ1_0(Codec):
    """54 bytes per 256 values: base-3 packed q = code + 1, then fp16 d = max|x|.

    Bytes 0-31 hold 5 trits each, q[m], q[32+m], ..., q[128+m] (first most significant);
    bytes 32-47 hold q[160+m], q[176+m], ..., q[224+m]; bytes 48-51 hold 4 trits,
    q[240+m], q[244+m], q[248+m], q[252+m], times 3 (a zero fifth trit). Every one of
    those 52 bytes stores its number v as ceil(v * 256 / 243).
    """
    name, ggml_type, block_size, type_size, ternary = "TQ1_0", GGMLQuantizationType.TQ1_0, QK_K, 54, True

    @classmethod
    def encode(cls, codes: np.ndarray, scale: np.float32) -> np.ndarray:
        rows, nb = _rows_of_blocks(codes, QK_K, "codes")
        q = _trits(codes).reshape(rows, nb, QK_K)
        out = np.empty((rows, nb, cls.type_size), dtype=np.uint8)
        out[..., 0:32] = _pack_base3(q[..., 0:160].reshape(rows, nb, 5, 32))
        out[..., 32:48] = _pack_base3(q[..., 160:240].reshape(rows, nb, 5, 16))
        out[..., 48:52] = _pack_base3(q[..., 240:256].reshape(rows, nb, 4, 4)) * np.uint8(3)
        out[..., :52] = _TQ1_STORE[out[..., :52]]
        out[..., 52:] = _block_d(q, scale)
        return out.reshape(rows, nb * cls.type_size)

    @classmethod
    def decode(cls, data: np.ndarray) -> np.ndarray:
        rows, nb = _rows_of_blocks(np.asarray(data), cls.type_size, "data")
        blocks = np.asarray(data, dtype=np.uint8).reshape(rows, nb, cls.type_size)
        v = _TQ1_LOAD[blocks[..., :52]]
        weights = (81, 27, 9, 3, 1)
        q = np.concatenate([
            _unpack_base3(v[..., 0:32], 5, weights).reshape(rows, nb, 160),
            _unpack_base3(v[..., 32:48], 5, weights).reshape(rows, nb, 80),
            _unpack_base3(v[..., 48:52], 4, weights).reshape(rows, nb, 16),
        ], axis=-1)
        return _values(q, blocks[..., 52:], rows)


def _block_d(q: np.ndarray, scale) -> np.ndarray:
    """(rows, nb, 256) trits -> (rows, nb, 2) fp16 bytes of each block's d = max|code * scale|.

    That maximum is fp16(scale) when the block has a non-zero code and 0 otherwise (gguf's
    quantizer takes max|x| in float32 and casts it: code * scale is exactly +-scale). `scale`
    may be one per block, (rows, nb).
    """
    return _d_bytes(scale, q.shape[0], q.shape[1], (q != 1).any(axis=-1, keepdims=True))


def _values(q: np.ndarray, d_bytes: np.ndarray, rows: int) -> np.ndarray:
    """(rows, nb, 256) trits and (rows, nb, 2) fp16 bytes -> float32 (rows, nb * 256) values."""
    d = np.ascontiguousarray(d_bytes).view("<f2").astype(np.float32)
    return ((q.astype(np.float32) - 1) * d).reshape(rows, -1)


class I2_S(Codec):
    """bitnet.cpp's I2_S (type 36, not in upstream ggml) as its x86 builds read it: 2-bit codes,
    one float32 scale.

    The tensor's data is its packed codes (n / 4 bytes) followed by `i2s_tail(scale)`. The
    codes are laid out over the flattened tensor in blocks of `block_size` values, four groups
    of `group` (x86: 128 = 4 x 32, in 32 bytes): byte b of a block holds q[b] in bits 7:6,
    q[group + b] in 5:4, q[2 group + b] in 3:2 and q[3 group + b] in 1:0, q = code + 1. Rows
    must be whole blocks: then row chunks pack independently (and bitnet.cpp computes wrong
    results for other row lengths anyway).
    """
    name, ggml_type, block_size, type_size, ternary = "I2_S", 36, QK_I2_S, 32, True
    per_tensor_scale = True
    group = QK_I2_S // 4

    @classmethod
    def encode(cls, codes: np.ndarray, scale: np.float32 | None = None, tiles=None) -> np.ndarray:
        """The packed codes of a row chunk; the scale goes in the tail, not here."""
        rows, nb = _rows_of_blocks(codes, cls.block_size, "codes")
        q = _trits(codes).reshape(rows, nb, 4, cls.group)
        out = np.left_shift(q[..., 0, :], 6)
        out |= q[..., 1, :] << 4
        out |= q[..., 2, :] << 2
        out |= q[..., 3, :]
        return out.reshape(rows, nb * cls.type_size)

    @classmethod
    def encode_codes(cls, packed: np.ndarray, scale: np.float32 | None = None, tiles=None) -> np.ndarray:
        """The code layout with each byte's bit pairs reversed (one table lookup)."""
        _rows_of_blocks(np.asarray(packed), 32, "packed codes")
        return np.take(_I2S_FROM_CODE_BYTE, np.asarray(packed, dtype=np.uint8))  # np.take: twice as fast as indexing

    @classmethod
    def tail_size(cls, shape=None, tiles=None) -> int:
        return I2_S_TAIL

    @classmethod
    def tail_bytes(cls, shape, scale, tiles=None) -> bytes:
        return cls.i2s_tail(np.float32(scale))

    @staticmethod
    def i2s_tail(scale: np.float32) -> bytes:
        """What follows the last packed byte: the scale (float32, little-endian), 28 zeros."""
        return np.array([scale], dtype="<f4").tobytes() + bytes(I2_S_TAIL - 4)

    @classmethod
    def decode_codes(cls, packed: np.ndarray) -> np.ndarray:
        rows, nb = _rows_of_blocks(np.asarray(packed), cls.type_size, "packed")
        blocks = np.asarray(packed, dtype=np.uint8).reshape(rows, nb, 1, cls.group)
        shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(4, 1)
        q = (blocks >> shifts) & np.uint8(3)
        return (q.astype(np.int8) - np.int8(1)).reshape(rows, nb * cls.block_size)

    @classmethod
    def decode(cls, packed: np.ndarray, scale: np.float32) -> np.ndarray:
        return cls.decode_codes(packed).astype(np.float32) * np.float32(scale)


# ARM I2_S bytes from two code-layout bytes A and B 16 apart, indexed by A | B << 8: the low byte
# of the entry comes from their low nibbles (A's two fields to bits 7:6 and 3:2, B's to 5:4 and 1:0),
# the high byte from their high nibbles.
def _arm_from_nibbles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a & 3) << 6) | ((b & 3) << 4) | (((a >> 2) & 3) << 2) | ((b >> 2) & 3)


_AB = np.arange(65536, dtype=np.uint32)
_ARM_FROM_PAIR = (_arm_from_nibbles(_AB & 15, (_AB >> 8) & 15)
                  | (_arm_from_nibbles((_AB >> 4) & 15, _AB >> 12) << 8)).astype(np.uint16)
del _AB


class I2_S_ARM(I2_S):
    """I2_S as bitnet.cpp's ARM (NEON) builds read it: blocks of 64 values in 16 bytes, four
    groups of 16 (`QK_I2_S` is 64 under `__ARM_NEON`); same codes, scale and tail as x86.

    From the 2-bit code layout (blocks of 128 in 32 bytes, byte b holding values b, 32 + b,
    64 + b, 96 + b in bits 1:0 .. 7:6), bytes A = b and B = 16 + b of a block hold the first
    ARM block's values b, 32 + b and 16 + b, 48 + b in their low nibbles, and the second's in
    their high nibbles: one 16-bit table lookup per pair of output bytes.
    """
    block_size, type_size = QK_I2_S_ARM, 16
    group = QK_I2_S_ARM // 4

    @classmethod
    def encode_codes(cls, packed: np.ndarray, scale: np.float32 | None = None, tiles=None) -> np.ndarray:
        rows, nb = _rows_of_blocks(np.asarray(packed), 32, "packed codes")
        blocks = np.asarray(packed, dtype=np.uint8).reshape(rows, nb, 2, 16)
        pairs = np.empty((rows, nb, 16, 2), dtype=np.uint8)  # (A, B) side by side: little-endian A | B << 8
        pairs[..., 0] = blocks[:, :, 0, :]
        pairs[..., 1] = blocks[:, :, 1, :]
        out = np.take(_ARM_FROM_PAIR, pairs.view("<u2")[..., 0]).astype("<u2", copy=False)
        # entry bytes (first block's byte, second block's byte) -> the two 16-byte blocks
        return np.ascontiguousarray(out.view(np.uint8).reshape(rows, nb, 16, 2).transpose(0, 1, 3, 2)) \
            .reshape(rows, nb * 32)


# -- bitnet.cpp's lookup-table types (TL1: ARM NEON, TL2: x86 AVX2) ------------------------------
#
# Written from TL-FORMAT.md. Their bytes depend on tile sizes that bitnet.cpp's code generator
# compiled into the user's build (kernel_config.ini, one section per matrix shape): `Tiles`.
# A tensor's bytes are M / BM tiles of BM rows, tile after tile, so a row chunk that holds
# whole tiles encodes alone (`row_multiple`). One float32 scale per tensor follows the
# payload in a 32-byte slot, as for I2_S.

class Tiles(NamedTuple):
    """One kernel_config.ini section's tiles: BM (`bm` there) rows per tile, BK (`bk`) columns
    per K block, bm (`bmm`) rows per SIMD tile."""
    BM: int
    BK: int
    bm: int


# The TL types group neighbouring columns of a row (pairs, triples), which the code layout keeps
# 32 apart. They first move the same 2-bit fields into column order: byte j of a row holds the
# fields of columns 4j, 4j + 1, 4j + 2, 4j + 3 in bits 1:0, 3:2, 5:4, 7:6, so that any n
# consecutive columns are 2n consecutive bits of the row (little-endian).
#
# In a 32-byte block of the code layout, read as four little-endian 64-bit words, the field of
# column 32p + 8a + i is in word a at field index 4i + p (bits 8i + 2p, 8i + 2p + 1); in column
# order it is in word p at field index 8a + i. `column_order` gets there with delta swaps, each of
# which exchanges two bits of the position: inside every word, field index 4i + p -> 8p + i
# (a rotation of its five bits, four swaps), then across the block's words, word a's 16-bit lane p
# -> word p's lane a (two swaps).

def _index_bit_swap(j: int, k: int) -> tuple[np.uint64, np.uint64]:
    """The delta swap exchanging bits j < k of the field index (0..31) of a 64-bit word: the
    shift between the exchanged fields (in bits) and the mask of the lower ones."""
    mask = sum(3 << 2 * f for f in range(32) if f >> j & 1 and not f >> k & 1)
    return np.uint64(2 * ((1 << k) - (1 << j))), np.uint64(mask)


# field index bits (i2 i1 i0 p1 p0), swapping bit 1 with 4, 0 with 3, 1 with 2, then 0 with 1: (p1 p0 i2 i1 i0)
_IN_WORD_SWAPS = [_index_bit_swap(j, k) for j, k in [(1, 4), (0, 3), (1, 2), (0, 1)]]
# (lower word, upper word, shift, mask): the 32-bit halves, then the 16-bit lanes, of a 4 x 4 lane transpose
_CROSS_WORD_SWAPS = [(0, 2, np.uint64(32), np.uint64(0x00000000FFFFFFFF)),
                     (1, 3, np.uint64(32), np.uint64(0x00000000FFFFFFFF)),
                     (0, 1, np.uint64(16), np.uint64(0x0000FFFF0000FFFF)),
                     (2, 3, np.uint64(16), np.uint64(0x0000FFFF0000FFFF))]


def _delta_swap(low: np.ndarray, high: np.ndarray, shift: np.uint64, mask: np.uint64, t: np.ndarray) -> None:
    """Exchange the bits of `low` under `mask` with the bits of `high` `shift` places up (in place;
    `low` and `high` may be the same array; `t` is scratch space of their shape)."""
    np.right_shift(high, shift, out=t)
    t ^= low
    t &= mask
    low ^= t
    t <<= shift
    high ^= t


def column_order(packed: np.ndarray) -> np.ndarray:
    """(rows, cols / 4) bytes of the 2-bit code layout -> the same fields in column order."""
    rows, nb = _rows_of_blocks(np.asarray(packed), 32, "packed codes")
    blocks = np.ascontiguousarray(packed, dtype=np.uint8).view("<u8").reshape(rows, nb, 4)
    w = np.ascontiguousarray(blocks.transpose(2, 0, 1))  # w[a]: word a of every block
    t = np.empty_like(w)
    for shift, mask in _IN_WORD_SWAPS:
        _delta_swap(w, w, shift, mask, t)
    for lower, upper, shift, mask in _CROSS_WORD_SWAPS:
        _delta_swap(w[upper], w[lower], shift, mask, t[0])
    return np.ascontiguousarray(w.transpose(1, 2, 0)).view(np.uint8).reshape(rows, nb * 32)


def _columns_from_fields(fields: np.ndarray) -> np.ndarray:
    """(rows, cols) fields (code + 1, cols a multiple of 4) -> (rows, cols / 4) bytes in column order."""
    f = np.asarray(fields, dtype=np.uint8)
    out = f[:, 3::4] << np.uint8(6)
    out |= f[:, 2::4] << np.uint8(4)
    out |= f[:, 1::4] << np.uint8(2)
    out |= f[:, 0::4]
    return out


def _pair_code_bytes(columns: np.ndarray) -> np.ndarray:
    """Column-order bytes (fields f0..f3 of four consecutive columns) -> TL1's byte of the same columns,
    16 * c2(t0, t1) + c2(t2, t3), where c2(x, y) = 3x + y + 4 = 3 f_x + f_y."""
    pairs = columns & np.uint8(0x33)  # f0 | f2 << 4
    pairs *= np.uint8(3)
    second = columns >> np.uint8(2)
    second &= np.uint8(0x33)  # f1 | f3 << 4
    pairs += second  # c2(t0, t1) | c2(t2, t3) << 4 (each at most 8: no carry between the nibbles)
    out = pairs << np.uint8(4)
    pairs >>= np.uint8(4)
    out |= pairs
    return out


# TL2's sign word of a 32-row run: the 8 sign bits of row c (first triple in the top bit of a
# byte) go to word bits 15, 13, ..., 1, those of row 16 + c to bits 14, 12, ..., 0.
_SPREAD_EVEN = np.array([sum(((b >> (7 - q)) & 1) << (15 - 2 * q) for q in range(8)) for b in range(256)],
                        dtype=np.uint16)


class _TernaryTiles(Codec):
    """A lookup-table type: encodes whole tiles of rows from their fields in column order."""
    per_tensor_scale = True

    @classmethod
    def encode(cls, codes: np.ndarray, scale: np.float32 | None = None, tiles=None) -> np.ndarray:
        return cls.encode_columns(_columns_from_fields(_trits(codes)), tiles)

    @classmethod
    def encode_codes(cls, packed: np.ndarray, scale: np.float32 | None = None, tiles=None) -> np.ndarray:
        return cls.encode_columns(column_order(packed), tiles)


# The quarter swap of TL2's 32-row runs: byte s of a run holds row _QUARTER_SWAP[s].
_QUARTER_SWAP = np.r_[0:8, 16:24, 8:16, 24:32]


def _tl_tiles(tiles) -> Tiles:
    if tiles is None:
        raise CodecError("TL1/TL2 need the tile sizes of the tensor's shape (kernel_config.ini)")
    return Tiles(*tiles)


class TL1(_TernaryTiles):
    """TL1 (type 38): four weights of a row per byte, 16 * c2(k0, k0+1) + c2(k0+2, k0+3).

    Byte order, most significant first: BM-row tile, BK-column block, bm-row group, by-column
    group (by = 256 / bm), 16-row group, 4-column group, row in the 16. M * K / 4 bytes.
    """
    name, ggml_type, block_size, type_size, ternary = "TL1", 38, 4, 1, True

    @classmethod
    def row_multiple(cls, tiles=None) -> int:
        return _tl_tiles(tiles).BM

    @staticmethod
    def tile_problem(m: int, k: int, tiles: Tiles) -> str | None:
        """Why bitnet.cpp's TL1 code generator and converter cannot use these tiles for (m, k)."""
        BM, BK, bm = tiles
        if bm not in (32, 64):
            return f"bmm = {bm} is not 32 or 64"
        if m % BM or BM % bm:
            return f"bm = {BM} does not divide m = {m} or is not a multiple of bmm = {bm}"
        if k % BK or BK % (256 // bm):
            return f"bk = {BK} does not divide k = {k} or is not a multiple of {256 // bm} (256 / bmm)"
        return None

    @classmethod
    def encode_columns(cls, columns: np.ndarray, tiles) -> np.ndarray:
        BM, BK, bm = _tl_tiles(tiles)
        by = 256 // bm
        rows, cols = columns.shape[0], columns.shape[1] * 4
        if rows % BM or cols % BK or BK % by or bm % 16 or by % 4:
            raise CodecError(f"TL1 tiles {tuple(tiles)} do not divide a chunk of shape {(rows, cols)}")
        b = _pair_code_bytes(columns)
        b = b.reshape(rows // BM, BM // bm, bm // 16, 16, cols // BK, BK // by, by // 4)
        # axes (tile, bm group, 16-row group, row, K block, by group, 4-col group) -> file order
        return np.ascontiguousarray(b.transpose(0, 4, 1, 5, 2, 6, 3)).reshape(rows, cols // 4)

    @classmethod
    def tail_size(cls, shape=None, tiles=None) -> int:
        return I2_S_TAIL

    @classmethod
    def tail_bytes(cls, shape, scale, tiles=None) -> bytes:
        return I2_S.i2s_tail(np.float32(scale))

    @staticmethod
    def file_nbytes(shape) -> int:
        m, k = shape
        return m * k // 4 + I2_S_TAIL


def tl2_payload_size(m: int, k: int) -> int:
    """P: what bitnet.cpp reserves for a TL2 tensor's payload, as if its two-weight tail were
    256 columns wide (Python floor division, left to right)."""
    return (((k - 256) * m // 3) * 5) // 8 + 64 * m


def _triple_values(columns: np.ndarray) -> np.ndarray:
    """(rows, n) column-order bytes, n a multiple of 3 -> (rows, 4n / 3) int8 v3 = 9 t0 + 3 t1 + t2 of
    the row's consecutive triples of columns."""
    rows, n = columns.shape
    # every 3 bytes (12 columns, four triples) read as the low 24 bits of a little-endian uint32
    # (from a copy with a spare byte at the end, which the last one reads)
    spare = np.empty(rows * n + 1, dtype=np.uint8)
    spare[:-1].reshape(rows, n)[...] = columns
    x = np.ndarray((rows, n // 3), dtype="<u4", buffer=spare, strides=(n, 3)).copy()
    # the four 6-bit triples into the four bytes: 12-bit halves to 16-bit lanes, then 6-bit quarters to bytes
    upper = x & np.uint32(0x00FFF000)
    x &= np.uint32(0x00000FFF)
    upper <<= np.uint32(4)
    x |= upper
    np.bitwise_and(x, np.uint32(0x0FC00FC0), out=upper)
    x &= np.uint32(0x003F003F)
    upper <<= np.uint32(2)
    x |= upper
    t = x.view(np.uint8)  # f0 | f1 << 2 | f2 << 4 of each triple, f = code + 1
    f = t & np.uint8(3)
    v = f * np.uint8(9)
    np.right_shift(t, np.uint8(2), out=f)
    f &= np.uint8(3)
    f *= np.uint8(3)
    v += f
    np.right_shift(t, np.uint8(4), out=f)
    v += f
    v -= np.uint8(13)  # 9 f0 + 3 f1 + f2 - 13 = 9 t0 + 3 t1 + t2, in -13..13 once viewed as int8
    return v.view(np.int8)


class TL2(_TernaryTiles):
    """TL2 (type 39): the first K3 = K - K mod BK columns as triples (magnitude nibbles, then
    sign bits), the last K2 = K mod BK as pairs; zero padding to P bytes.

    Three regions, each tile after tile: A, magnitudes, 16 * |v3(k0..k0+2)| + |v3(k0+3..k0+5)|
    (v3 = 9a + 3b + c), ordered tile, K block, 32-row run, 6-column group, row (quarter swapped);
    B, signs, 16 little-endian uint16 words per 32-row run and 24 columns; C, the K2 tail as
    TL1's pair bytes in blocks of 32 columns, 32-row runs, 4-column groups, row (quarter swapped).
    """
    name, ggml_type, block_size, type_size, ternary = "TL2", 39, 4, 1, True

    @classmethod
    def split(cls, cols: int, tiles) -> tuple[int, int]:
        BK = _tl_tiles(tiles).BK
        return cols - cols % BK, cols % BK

    @classmethod
    def row_bytes(cls, cols: int, tiles=None) -> int:
        k3, k2 = cls.split(cols, tiles)
        return k3 // 6 + k3 // 24 + k2 // 4

    @classmethod
    def regions(cls, cols: int, tiles=None) -> list[tuple[int, int]]:
        k3, k2 = cls.split(cols, tiles)
        bounds = [0, k3 // 6, k3 // 6 + k3 // 24, k3 // 6 + k3 // 24 + k2 // 4]
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

    @classmethod
    def row_multiple(cls, tiles=None) -> int:
        return _tl_tiles(tiles).BM

    @staticmethod
    def tile_problem(m: int, k: int, tiles: Tiles) -> str | None:
        """Why bitnet.cpp's TL2 code generator and converter cannot use these tiles for (m, k)."""
        BM, BK, bm = tiles
        if bm != 32:
            return f"bmm = {bm} is not 32 (TL2 kernels have 32-row tiles)"
        if m % BM or BM % 32:
            return f"bm = {BM} does not divide m = {m} or is not a multiple of 32"
        if BK % 24:
            return f"bk = {BK} is not a multiple of 24"
        if k < 256 or k % BK % 32 or k % BK > 256:
            return (f"k = {k} leaves a two-weight tail of k mod bk = {k % BK} columns; it must be a multiple of 32, "
                    "at most 256, and k at least 256")
        return None

    @classmethod
    def encode_columns(cls, columns: np.ndarray, tiles) -> np.ndarray:
        BM, BK, bm = _tl_tiles(tiles)
        rows, cols = columns.shape[0], columns.shape[1] * 4
        k3, k2 = cls.split(cols, tiles)
        if rows % BM or BM % 32 or bm != 32 or BK % 24 or k2 % 32:
            raise CodecError(f"TL2 tiles {tuple(tiles)} do not divide a chunk of shape {(rows, cols)}")
        n_tiles, runs = rows // BM, BM // 32
        parts = []
        if k3:
            v3 = _triple_values(columns[:, :k3 // 4])
            # the magnitudes of triples 2g and 2g + 1 are the low and high byte of little-endian word g
            pairs = np.abs(v3).view("<u2")
            a = ((pairs << np.uint16(4)) | (pairs >> np.uint16(8))).astype(np.uint8)
            a = a.reshape(n_tiles, runs, 32, k3 // BK, BK // 6)[:, :, _QUARTER_SWAP]
            parts.append(np.ascontiguousarray(a.transpose(0, 3, 1, 4, 2)).reshape(rows, k3 // 6))
            # the sign of triple q of a 24-column group, row 16 p + c of a run, is bit 15 - (2q + p) of
            # little-endian word c of the run's 16
            signs = np.take(_SPREAD_EVEN, np.packbits(v3 < 0, axis=1))  # 8 triples of a row per byte
            signs = signs.reshape(n_tiles, runs, 2, 16, k3 // BK, BK // 24)
            words = signs[:, :, 0] | (signs[:, :, 1] >> np.uint16(1))
            words = np.ascontiguousarray(words.transpose(0, 3, 1, 4, 2)).astype("<u2", copy=False)
            parts.append(words.view(np.uint8).reshape(rows, k3 // 24))
        if k2:
            c = _pair_code_bytes(columns[:, k3 // 4:]).reshape(n_tiles, runs, 32, k2 // 32, 8)[:, :, _QUARTER_SWAP]
            parts.append(np.ascontiguousarray(c.transpose(0, 3, 1, 4, 2)).reshape(rows, k2 // 4))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    @staticmethod
    def file_nbytes(shape) -> int:
        m, k = shape
        return -(-tl2_payload_size(m, k) // 32) * 32 + I2_S_TAIL

    @classmethod
    def tail_size(cls, shape=None, tiles=None) -> int:
        m, k = shape
        return cls.file_nbytes(shape) - m * cls.row_bytes(k, tiles)

    @classmethod
    def tail_bytes(cls, shape, scale, tiles=None) -> bytes:
        """Zeros up to the scale slot at pad32(P), the scale, 28 zeros."""
        return bytes(cls.tail_size(shape, tiles) - I2_S_TAIL) + I2_S.i2s_tail(np.float32(scale))


class Q2_0(Codec):
    """Upstream llama.cpp's Q2_0 (ggml type 42, not in the gguf package's enum): 18 bytes per 64
    values, fp16 d first, then 16 bytes; value j of a block is in byte j // 4 at bits 2 * (j % 4),
    as q = code + 1 (x = (q - 1) * d; q = 3 would be +2d and never occurs for ternary codes).

    One scale per 64 values, so `scale` may also be one scale per block, shape (rows, cols / 64):
    the type for checkpoints whose ternary scale changes along a row (groups of 64 or multiples).
    Like llama.cpp's reference quantizer on the values codes * scale, a block without a non-zero
    code stores d = 0.
    """
    name, ggml_type, block_size, type_size, ternary = "Q2_0", 42, QK2_0, 18, True

    @classmethod
    def encode(cls, codes: np.ndarray, scale) -> np.ndarray:
        rows, nb = _rows_of_blocks(codes, QK2_0, "codes")
        q = _trits(codes).reshape(rows, nb, 16, 4)
        out = np.empty((rows, nb, cls.type_size), dtype=np.uint8)
        qs = out[..., 2:]
        np.left_shift(q[..., 3], 6, out=qs)
        qs |= q[..., 2] << 4
        qs |= q[..., 1] << 2
        qs |= q[..., 0]
        nonzero = (q != 1).any(axis=(-2, -1))[..., None]
        out[..., :2] = _d_bytes(scale, rows, nb, nonzero)
        return out.reshape(rows, nb * cls.type_size)

    @classmethod
    def decode(cls, data: np.ndarray) -> np.ndarray:
        rows, nb = _rows_of_blocks(np.asarray(data), cls.type_size, "data")
        blocks = np.asarray(data, dtype=np.uint8).reshape(rows, nb, cls.type_size)
        d = np.ascontiguousarray(blocks[..., :2]).view("<f2").astype(np.float32)  # (rows, nb, 1)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
        q = (blocks[..., 2:, None] >> shifts) & np.uint8(3)                       # (rows, nb, 16, 4)
        return ((q.reshape(rows, nb, QK2_0).astype(np.float32) - 1) * d).reshape(rows, -1)


class Q1_0(Codec):
    """Upstream llama.cpp's Q1_0 (ggml type 41): 18 bytes per 128 values, fp16 d first, then 16
    bytes of signs; bit i of byte j is value 8j + i of the block, set for +d and clear for -d. It
    holds binary values ({-s, +s}: 1-bit Bonsai) exactly, `scale` one per tensor or one per block
    (rows, cols / 128); a code of 0 has no encoding (pack refuses such a tensor, or requantizes it
    with `quantize`, llama.cpp's own rule)."""
    name, ggml_type, block_size, type_size, ternary = "Q1_0", 41, QK1_0, 18, True

    @classmethod
    def encode(cls, codes: np.ndarray, scale) -> np.ndarray:
        rows, nb = _rows_of_blocks(codes, QK1_0, "codes")
        codes = np.asarray(codes)
        if codes.size and (codes == 0).any():
            raise CodecError("Q1_0 holds binary codes (-1, +1) only, not 0")
        out = np.empty((rows, nb, cls.type_size), dtype=np.uint8)
        out[..., 2:] = np.packbits((codes > 0).reshape(rows, nb, QK1_0), axis=-1, bitorder="little")
        out[..., :2] = _d_bytes(scale, rows, nb, np.ones((rows, nb, 1), dtype=bool))  # no block of zeros
        return out.reshape(rows, nb * cls.type_size)

    @classmethod
    def quantize(cls, values: np.ndarray) -> np.ndarray:
        """Q1_0 bytes of float32 rows by llama.cpp's quantize_row_q1_0_ref: d = the block's sum of |x|,
        accumulated in float32 in value order, divided by 128, stored as fp16; the bit is set where
        x >= 0 (so a 0 becomes +d). Summed one column at a time, so the float32 rounding is the C loop's."""
        rows, nb = _rows_of_blocks(np.asarray(values), QK1_0, "values")
        x = np.asarray(values, dtype=np.float32).reshape(rows, nb, QK1_0)
        total = np.zeros((rows, nb), dtype=np.float32)
        for j in range(QK1_0):
            total += np.abs(x[..., j])
        out = np.empty((rows, nb, cls.type_size), dtype=np.uint8)
        out[..., 2:] = np.packbits(x >= 0, axis=-1, bitorder="little")
        with np.errstate(over="ignore"):
            out[..., :2] = (total / np.float32(QK1_0)).astype("<f2")[..., None].view(np.uint8)
        return out.reshape(rows, nb * cls.type_size)

    @classmethod
    def decode(cls, data: np.ndarray) -> np.ndarray:
        rows, nb = _rows_of_blocks(np.asarray(data), cls.type_size, "data")
        blocks = np.asarray(data, dtype=np.uint8).reshape(rows, nb, cls.type_size)
        d = np.ascontiguousarray(blocks[..., :2]).view("<f2").astype(np.float32)
        bits = np.unpackbits(blocks[..., 2:], axis=-1, bitorder="little").astype(np.float32)
        return ((bits * 2 - 1) * d).reshape(rows, -1)


class _Float(Codec):
    block_size, ternary = 1, False
    dtype: np.dtype

    @classmethod
    def encode(cls, values: np.ndarray) -> np.ndarray:
        """Values of any shape -> uint8 (..., cols * itemsize), little-endian."""
        arr = np.ascontiguousarray(values, dtype=cls.dtype)
        return arr.view(np.uint8) if arr.ndim else arr.reshape(1).view(np.uint8)

    @classmethod
    def decode(cls, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(data, dtype=np.uint8).view(cls.dtype).astype(np.float32)


class F16(_Float):
    name, ggml_type, type_size, dtype = "F16", GGMLQuantizationType.F16, 2, np.dtype("<f2")


class F32(_Float):
    name, ggml_type, type_size, dtype = "F32", GGMLQuantizationType.F32, 4, np.dtype("<f4")


class _GGUFQuant(Codec):
    """A float type whose bytes gguf-py's reference quantizer (`gguf.quants`) already produces
    exactly; used for embeddings, whose rows are encoded independently."""
    ternary = False

    @classmethod
    def encode(cls, values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=np.float32)
        rows = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
        out = gguf_quants.quantize(rows, GGMLQuantizationType(cls.ggml_type))
        return out.reshape(*values.shape[:-1], -1) if values.ndim > 1 else out.reshape(-1)

    @classmethod
    def decode(cls, data: np.ndarray) -> np.ndarray:
        return gguf_quants.dequantize(np.ascontiguousarray(data, dtype=np.uint8),
                                      GGMLQuantizationType(cls.ggml_type)).astype(np.float32)


class BF16(_GGUFQuant):
    """bfloat16, rounded to nearest even (NaN kept quiet), as gguf-py writes it."""
    name, ggml_type, block_size, type_size = "BF16", GGMLQuantizationType.BF16, 1, 2


class Q8_0(_GGUFQuant):
    """34 bytes per 32 values: fp16 d = max|x| / 127, then 32 int8 round(x / d)."""
    name, ggml_type, block_size, type_size = "Q8_0", GGMLQuantizationType.Q8_0, 32, 34


CODECS: dict[str, type[Codec]] = {"tq2_0": TQ2_0, "tq1_0": TQ1_0, "i2_s": I2_S, "i2_s_arm": I2_S_ARM,
                                  "tl1": TL1, "tl2": TL2, "f16": F16, "bf16": BF16, "f32": F32, "q8_0": Q8_0}
CODECS["q2_0"] = Q2_0  # upstream llama.cpp (type 42): group-scaled checkpoints
CODECS["q1_0"] = Q1_0  # upstream llama.cpp (type 41): binary group-scaled checkpoints


# -- float tensors in a float output type ---------------------------------------------------------

# float16 bits of every bfloat16 bit pattern, converted by numpy (round to nearest even)
with np.errstate(over="ignore", invalid="ignore"):
    _F16_FROM_BF16 = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32).astype("<f2").view(np.uint16)


def encode_floats(block: np.ndarray, source_dtype: str, codec_name: str) -> np.ndarray:
    """GGUF bytes of float rows given in their source representation (bf16 as uint16 bits)."""
    if source_dtype == "BF16" and codec_name == "f16":  # the common embedding case: one table lookup
        return _F16_FROM_BF16[np.asarray(block, dtype=np.uint16)].view(np.uint8).reshape(*block.shape[:-1], -1)
    from pipeline.safetensors_io import as_float32

    return CODECS[codec_name].encode(as_float32(block, source_dtype))
