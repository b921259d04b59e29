"""The codecs of bitnet.cpp's own types: I2_S in the layouts of its x86 and ARM builds (I2_S,
I2_S_ARM) and the lookup-table types TL1 (ARM) and TL2 (x86), whose bytes depend on the tiles
of the user's build (`Tiles`, from --kernel-config). Each keeps one float32 scale per tensor,
after its codes.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipeline.codecs.base import Codec, CodecError, _rows_of_blocks, _trits

QK_I2_S = 128     # values per I2_S block (32 bytes) in bitnet.cpp's x86 builds
QK_I2_S_ARM = 64  # ... and in its ARM (NEON) builds (16 bytes)
I2_S_TAIL = 32    # bytes after an I2_S tensor's packed codes: float32 scale + 28 unused


# I2_S byte from a code-layout byte: the same four fields with their bit pairs reversed
_I2S_FROM_CODE_BYTE = np.array([((b & 3) << 6) | (((b >> 2) & 3) << 4) | (((b >> 4) & 3) << 2) | (b >> 6)
                                for b in range(256)], dtype=np.uint8)


class _ScaleAfterCodes(Codec):
    """bitnet.cpp's types with one float32 scale per tensor, in a 32-byte slot after the codes."""
    per_tensor_scale = True

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


class I2_S(_ScaleAfterCodes):
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


class _TernaryTiles(_ScaleAfterCodes):
    """A lookup-table type: encodes whole tiles of rows from their fields in column order."""

    @classmethod
    def row_multiple(cls, tiles=None) -> int:
        return _tl_tiles(tiles).BM

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
