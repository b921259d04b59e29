"""The codecs of ggml's types, which upstream llama.cpp reads: TQ2_0, TQ1_0, Q2_0, Q1_0 and the
float types F16, F32, BF16, Q8_0 (and `encode_floats`, float rows in their source dtype).

The ternary codecs pack the codes directly, with integer arithmetic only, and produce the same
bytes as `gguf.quants.quantize` (or llama.cpp's reference quantizer) applied to the float values
`codes * scale`.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from pipeline.codecs.base import (_ZERO_CODES_BYTE, Codec, CodecError, _d_bytes, _pack_base3, _rows_of_blocks,
                                  _trits, _unpack_base3)

QK_K = 256        # values per TQ1_0 / TQ2_0 block
QK2_0 = 64        # values per Q2_0 block (upstream llama.cpp, ggml type 42)
QK1_0 = 128       # values per Q1_0 block (upstream llama.cpp, ggml type 41: binary, 1-bit Bonsai)

# A TQ1_0 byte holding base-3 number v (< 243) is stored as ceil(v * 256 / 243), which puts the
# most significant trit in the top bits of the byte. Read back: v = (b * 243) >> 8.
_TQ1_STORE = ((np.arange(243, dtype=np.uint32) * 256 + 242) // 243).astype(np.uint8)
_TQ1_LOAD = ((np.arange(256, dtype=np.uint32) * 243) >> 8).astype(np.uint8)


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


# -- float tensors in a float output type ---------------------------------------------------------

# float16 bits of every bfloat16 bit pattern, converted by numpy (round to nearest even)
with np.errstate(over="ignore", invalid="ignore"):
    _F16_FROM_BF16 = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32).astype("<f2").view(np.uint16)


def encode_floats(block: np.ndarray, source_dtype: str, codec_name: str) -> np.ndarray:
    """GGUF bytes of float rows given in their source representation (bf16 as uint16 bits)."""
    if source_dtype == "BF16" and codec_name == "f16":  # the common embedding case: one table lookup
        return _F16_FROM_BF16[np.asarray(block, dtype=np.uint16)].view(np.uint8).reshape(*block.shape[:-1], -1)
    from pipeline.codecs import CODECS
    from pipeline.safetensors_io import as_float32

    return CODECS[codec_name].encode(as_float32(block, source_dtype))
