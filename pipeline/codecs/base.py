"""What every codec shares: the `Codec` base class, the 2-bit code layout of quantize.zarr, and the
small helpers of the ternary codecs (trits, base-3 packing, fp16 block scales, block checks).

Codecs are classes used without instances (like gguf-py's `quants.py`). Each works on whole
rows; a row must be a whole number of blocks (`supports`), so any split of a tensor into row
chunks encodes independently.
"""
from __future__ import annotations

import numpy as np


class CodecError(ValueError):
    """A codec was given data it cannot encode (a bug upstream, not a user error)."""


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
