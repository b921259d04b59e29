"""Independent plain-Python references for ik_llama.cpp's IQ2_BN, IQ1_BN and IQ2_BN_R4, for tests.

Transliterated loop by loop from ik_llama.cpp @8337e4c, ggml/src/iqk/iqk_quantize.cpp
(quantize_one_row_1bn / _2bn, repack_iq2_bn, dequantize_row_iq1_bn / _iq2_bn / _iq2_bn_r4) and
the CUDA kernels dequantize_block_iq1_bn / _iq2_bn (ggml-cuda/convert.cu), which read the row
meta; nothing here imports the converter. Slow (one Python step per value): small sizes only.
NUMPY_DECODERS does each decoder's same float32 operations per value on whole arrays, for files of
test size (tests/test_ik_codecs.py holds them equal to the loops on random bytes).
"""
from __future__ import annotations

import struct

import numpy as np

QK = 64
K_MULT = (81, 27, 9, 3, 1)      # IQ1BNQuantizer::k_mult
K_NB = (1, 3, 9, 27, 81, 243)   # quantize_one_row_1bn's k_nb
F32 = np.float32


def _fp16_bytes(x: float) -> bytes:
    try:
        return struct.pack("<e", x)  # round to nearest even, like GGML_FP32_TO_FP16
    except OverflowError:
        return b"\x00\x7c"          # +inf


def _field(v, thresh) -> int:
    """`fabsf(v) < thresh ? 1 : v < 0 ? 0 : 2`, in float32."""
    return 1 if abs(F32(v)) < thresh else 0 if F32(v) < 0 else 2


# -- quantizers (float values -> bytes) ----------------------------------------------------------

def quantize_iq2_bn_row(src) -> bytes:
    """quantize_one_row_2bn: float32 max, then per block qs[j] = L[j] | L[j+16]<<2 | ..."""
    src = [F32(v) for v in src]
    mx = F32(0)
    for v in src:
        mx = max(mx, abs(v))
    thresh = F32(0.5) * mx
    out = bytearray(struct.pack("<f", mx))
    for ib in range(len(src) // QK):
        L = [_field(src[QK * ib + j], thresh) for j in range(QK)]
        for j in range(16):
            out.append(L[j] | L[j + 16] << 2 | L[j + 32] << 4 | L[j + 48] << 6)
    return bytes(out)


def quantize_iq1_bn_row(src) -> bytes:
    """quantize_one_row_1bn: fp16 max, then per block 12 bytes ql of 5 trits and 1 byte extra."""
    src = [F32(v) for v in src]
    mx = F32(0)
    for v in src:
        mx = max(mx, abs(v))
    thresh = F32(0.5) * mx
    out = bytearray(_fp16_bytes(float(mx)))
    for ib in range(len(src) // QK):
        xb = src[QK * ib:QK * (ib + 1)]
        ql = []
        v13 = 0
        for i16 in range(4):
            for k in range(3):
                idx = 0
                for j in range(5):
                    idx += K_NB[j] * _field(xb[16 * i16 + 5 * k + j], thresh)
                ql.append((256 * idx + K_NB[5] - 1) // K_NB[5])
            v13 += K_NB[i16] * _field(xb[16 * i16 + 15], thresh)
        out += bytes(ql) + bytes([(256 * v13 + K_NB[5] - 1) // K_NB[5]])
    return bytes(out)


def repack_iq2_bn(rows4: list[bytes], n_per_row: int) -> bytes:
    """repack_iq2_bn for one group of 4 IQ2_BN rows: their 4 float maxes, then per block
    y4[64 ib + 4 k + i + 16 l] from bits 2l of x4[k][16 ib + i + 0/4/8/12]."""
    assert len(rows4) == 4
    x4 = [r[4:] for r in rows4]
    out = bytearray(b"".join(r[:4] for r in rows4))
    y4 = bytearray(n_per_row)  # 4 rows * n/4 bytes
    for ib in range(n_per_row // QK):
        for k in range(4):
            for l in range(4):
                for i in range(4):
                    y4[64 * ib + 4 * k + i + 16 * l] = (
                        ((x4[k][16 * ib + i + 0] >> 2 * l) & 3) << 0
                        | ((x4[k][16 * ib + i + 4] >> 2 * l) & 3) << 2
                        | ((x4[k][16 * ib + i + 8] >> 2 * l) & 3) << 4
                        | ((x4[k][16 * ib + i + 12] >> 2 * l) & 3) << 6)
    return bytes(out + y4)


def quantize_tensor(values: np.ndarray, kind: str) -> bytes:
    """The tensor's bytes as ik's quantize_iq2_bn / _iq1_bn / _iq2_bn_r4 write them."""
    rows = [list(r) for r in np.asarray(values, dtype=np.float32)]
    if kind == "iq2_bn":
        return b"".join(quantize_iq2_bn_row(r) for r in rows)
    if kind == "iq1_bn":
        return b"".join(quantize_iq1_bn_row(r) for r in rows)
    assert kind == "iq2_bn_r4" and len(rows) % 4 == 0
    n = len(rows[0])
    return b"".join(repack_iq2_bn([quantize_iq2_bn_row(r) for r in rows[g:g + 4]], n)
                    for g in range(0, len(rows), 4))


# -- decoders (bytes -> float values) ------------------------------------------------------------

def decode_iq2_bn(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """Row size 4 + cols / 4; per row the CUDA kernel's d * ((qs[j] >> 2t) & 3) - d for value
    j + 16 t of a block (the CPU loop's d1..d4 = 1, 1/4, 1/16, 1/64 on the masked bits)."""
    row_size = 4 + cols // 4
    assert len(raw) == rows * row_size
    out = np.zeros((rows, cols), dtype=np.float32)
    for r in range(rows):
        row = raw[r * row_size:(r + 1) * row_size]
        d = F32(struct.unpack("<f", row[:4])[0])
        qs = row[4:]
        for ib in range(cols // QK):
            for j in range(16):
                b = qs[16 * ib + j]
                for t, (mask, mult) in enumerate(((0x03, 1.0), (0x0c, 0.25), (0x30, 0.0625), (0xc0, 0.015625))):
                    out[r, QK * ib + j + 16 * t] = d * F32(mult * (b & mask)) - d
    return out


def decode_iq1_bn(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """Row size 2 + 13 cols / 64; dequantize_row_iq1_bn's trit extraction: v = (byte * k_mult[j])
    mod 256, trit = (v + (v >> 1)) >> 7, times the fp16 row scale (as the CUDA kernel)."""
    row_size = 2 + 13 * (cols // QK)
    assert len(raw) == rows * row_size
    out = np.zeros((rows, cols), dtype=np.float32)
    for r in range(rows):
        row = raw[r * row_size:(r + 1) * row_size]
        d = F32(struct.unpack("<e", row[:2])[0])
        y = []
        for ib in range(cols // QK):
            blk = row[2 + 13 * ib:2 + 13 * (ib + 1)]
            ql, extra = blk[:12], blk[12]
            for i16 in range(4):
                for k in range(3):
                    for j in range(5):
                        v = (ql[3 * i16 + k] * K_MULT[j]) & 0xFF
                        y.append(((v + (v >> 1)) >> 7) - 1)
                v = (extra * K_MULT[i16]) & 0xFF
                y.append(((v + (v >> 1)) >> 7) - 1)
        with np.errstate(invalid="ignore"):  # an fp16 max of inf: 0 * inf is NaN, as in ik
            out[r] = np.array(y, dtype=np.float32) * d
    return out


def decode_iq2_bn_r4(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """dequantize_row_iq2_bn_r4 over groups of 4 rows: 4 floats d4, then per block of 64 columns
    y4[k][64 ib + 16 l + i + 4 m] = d4[k] * (((qx[4k + i + 16l] >> 2m) & 3) - 1)."""
    assert rows % 4 == 0
    group = 4 * (4 + cols // 4)
    assert len(raw) == rows // 4 * group
    out = np.zeros((rows, cols), dtype=np.float32)
    for g in range(rows // 4):
        chunk = raw[g * group:(g + 1) * group]
        d4 = [F32(x) for x in struct.unpack("<4f", chunk[:16])]
        qx = chunk[16:]
        for ib in range(cols // QK):
            for k in range(4):
                for l in range(4):
                    for i in range(4):
                        q = qx[64 * ib + 4 * k + i + 16 * l]
                        for m in range(4):
                            out[4 * g + k, 64 * ib + 16 * l + i + 4 * m] = d4[k] * F32(((q >> 2 * m) & 3) - 1)
    return out


DECODERS = {"iq2_bn": decode_iq2_bn, "iq1_bn": decode_iq1_bn, "iq2_bn_r4": decode_iq2_bn_r4}


# -- the decoders above on whole arrays (the same float32 operation for each value) -----------------

def _fields(q: np.ndarray) -> np.ndarray:
    """The four 2-bit fields of each byte, (q >> 2m) & 3 for m = 0..3, on a new last axis."""
    return np.stack([(q >> 2 * m) & 3 for m in range(4)], axis=-1)


def np_decode_iq2_bn(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """decode_iq2_bn: value j + 16 t of block ib is d * F32((qs[16 ib + j] >> 2t) & 3) - d."""
    row_size = 4 + cols // 4
    assert len(raw) == rows * row_size
    a = np.frombuffer(raw, np.uint8).reshape(rows, row_size)
    d = a[:, :4].copy().view("<f4").astype(F32)                      # (rows, 1)
    q = _fields(a[:, 4:].reshape(rows, cols // QK, 16))              # (rows, block, j, t)
    q = q.swapaxes(2, 3).reshape(rows, cols).astype(F32)             # value 16 t + j of each block
    return d * q - d


def np_decode_iq1_bn(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """decode_iq1_bn: per block, for i16 = 0..3 the 15 trits of ql[3 i16 + k] (k = 0..2, j = 0..4) and
    the one of `extra` times k_mult[i16]; v = (byte * k_mult) mod 256, trit (v + (v >> 1)) >> 7, minus 1."""
    row_size = 2 + 13 * (cols // QK)
    assert len(raw) == rows * row_size
    a = np.frombuffer(raw, np.uint8).reshape(rows, row_size)
    d = a[:, :2].copy().view("<f2").astype(F32)                      # (rows, 1)
    blocks = a[:, 2:].reshape(rows, cols // QK, 13).astype(np.int64)
    ql = blocks[:, :, :12].reshape(rows, -1, 4, 3)                   # (rows, block, i16, k)
    v = (ql[..., None] * np.array(K_MULT)) & 0xFF                    # (rows, block, i16, k, j)
    v = v.reshape(rows, -1, 4, 15)
    extra = (blocks[:, :, 12:13] * np.array(K_MULT[:4])) & 0xFF      # (rows, block, i16)
    v = np.concatenate([v, extra[..., None]], axis=-1).reshape(rows, cols)
    trits = (((v + (v >> 1)) >> 7) - 1).astype(F32)
    with np.errstate(invalid="ignore"):  # an fp16 max of inf: 0 * inf is NaN, as in ik
        return trits * d


def np_decode_iq2_bn_r4(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """decode_iq2_bn_r4: y4[k][64 ib + 16 l + i + 4 m] = d4[k] * F32(((qx[64 ib + 4 k + i + 16 l] >> 2m) & 3) - 1)."""
    assert rows % 4 == 0
    group = 4 * (4 + cols // 4)
    assert len(raw) == rows // 4 * group
    a = np.frombuffer(raw, np.uint8).reshape(rows // 4, group)
    d4 = a[:, :16].copy().view("<f4").astype(F32).reshape(rows, 1)  # row 4 g + k
    qx = a[:, 16:].reshape(rows // 4, cols // QK, 4, 4, 4)           # (g, ib, l, k, i)
    f = _fields(qx).astype(np.int64) - 1                             # (g, ib, l, k, i, m)
    f = f.transpose(0, 3, 1, 2, 5, 4).reshape(rows, cols)            # row (g, k), column (ib, l, m, i)
    return d4 * f.astype(F32)


NUMPY_DECODERS = {"iq2_bn": np_decode_iq2_bn, "iq1_bn": np_decode_iq1_bn, "iq2_bn_r4": np_decode_iq2_bn_r4}
