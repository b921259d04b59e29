"""Independent numpy decoders of bitnet.cpp's target-specific weight layouts, for the tests.

Written from /work/shared/FORMATS.md (I2_S for ARM builds) and TL-FORMAT.md (TL1, TL2)
alone; nothing here imports the converter's codecs. Where the converter builds a layout by
reshaping and transposing whole arrays, these decoders follow the documents' other
formulation: every byte offset is split into its mixed-radix digits, which name the row and
columns the byte holds. Each returns the tensor's ternary codes (int8, shape (m, k)) and its
float32 scale, and checks what the documents say must hold (payload size, zero padding).
"""
from __future__ import annotations

import numpy as np

SCALE_SLOT = 32  # float32 scale + 28 unused bytes after every I2_S / TL tensor


def _digits(offsets: np.ndarray, radices: list[int]) -> list[np.ndarray]:
    """Mixed-radix digits of `offsets`, most significant first, for the given digit ranges."""
    out = []
    rest = offsets.copy()
    for radix in reversed(radices):
        out.append(rest % radix)
        rest //= radix
    assert (rest == 0).all(), "offset out of range"
    return out[::-1]


def _scale(raw: bytes, at: int) -> np.float32:
    return np.frombuffer(raw[at:at + 4], dtype="<f4")[0]


def decode_i2s_arm(raw: bytes, shape: tuple[int, int]) -> tuple[np.ndarray, np.float32]:
    """FORMATS.md, ARM NEON: blocks of 64 values in 16 bytes over the flattened tensor; byte b of
    block i holds value 64i + b in bits 7:6, 64i + 16 + b in 5:4, 64i + 32 + b in 3:2, 64i + 48 + b
    in 1:0; field 0 -> -1, 1 -> 0, 2 -> +1; then the float32 scale at n / 4 and 28 bytes."""
    n = shape[0] * shape[1]
    assert len(raw) == n // 4 + SCALE_SLOT
    data = np.frombuffer(raw[:n // 4], dtype=np.uint8)
    offsets = np.arange(data.size)
    block, b = offsets // 16, offsets % 16
    codes = np.full(n, 99, dtype=np.int8)
    for group, shift in enumerate((6, 4, 2, 0)):
        field = (data >> shift) & 3
        assert (field != 3).all(), "field 3 is not a code"
        codes[64 * block + 16 * group + b] = field.astype(np.int8) - 1
    return codes.reshape(shape), _scale(raw, n // 4)


def _pair_digits(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """c2 = 3x + y + 4 (0..8) -> (x, y)."""
    assert (value <= 8).all(), "pair code above 8"
    v = value.astype(np.int16) - 4
    y = (v + 1) % 3 - 1
    return ((v - y) // 3).astype(np.int8), y.astype(np.int8)


def _balanced_ternary(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """v = 9a + 3b + c (each in -1..1, |v| <= 13) -> (a, b, c)."""
    v = v.astype(np.int16)
    c = (v + 1) % 3 - 1
    v = (v - c) // 3
    b = (v + 1) % 3 - 1
    a = (v - b) // 3
    return a.astype(np.int8), b.astype(np.int8), c.astype(np.int8)


def decode_tl1(raw: bytes, shape: tuple[int, int], BM: int, BK: int, bm: int) -> tuple[np.ndarray, np.float32]:
    """TL-FORMAT.md section 2: M * K / 4 bytes, the scale at byte M * K / 4."""
    m, k = shape
    by = 256 // bm
    size = m * k // 4
    assert len(raw) == size + SCALE_SLOT
    data = np.frombuffer(raw[:size], dtype=np.uint8)
    I, J, R, Y, a, p, b = _digits(np.arange(size), [m // BM, k // BK, BM // bm, BK // by, bm // 16, by // 4, 16])
    row = I * BM + R * bm + 16 * a + b
    col = J * BK + Y * by + 4 * p
    codes = np.full((m, k), 99, dtype=np.int8)
    codes[row, col], codes[row, col + 1] = _pair_digits(data >> 4)
    codes[row, col + 2], codes[row, col + 3] = _pair_digits(data & 15)
    return codes, _scale(raw, size)


def _quarter_swap(s: np.ndarray) -> np.ndarray:
    return np.where((s >= 8) & (s < 16), s + 8, np.where((s >= 16) & (s < 24), s - 8, s))


def tl2_payload(m: int, k: int) -> int:
    """TL-FORMAT.md section 3 D: P (Python floor division, left to right)."""
    return (((k - 256) * m // 3) * 5) // 8 + 64 * m


def decode_tl2(raw: bytes, shape: tuple[int, int], BM: int, BK: int) -> tuple[np.ndarray, np.float32]:
    """TL-FORMAT.md section 3: regions A (magnitudes), B (signs), C (two-weight tail), D (zeros up to
    P); the scale at pad32(P)."""
    m, k = shape
    k3, k2 = k - k % BK, k % BK
    p = tl2_payload(m, k)
    slot = -(-p // 32) * 32
    assert len(raw) == slot + SCALE_SLOT
    codes = np.full((m, k), 99, dtype=np.int8)

    size_a = m * k3 // 6
    a_bytes = np.frombuffer(raw[:size_a], dtype=np.uint8)
    I, J, R, Y, s = _digits(np.arange(size_a), [m // BM, k3 // BK, BM // 32, BK // 6, 32])
    row = I * BM + R * 32 + _quarter_swap(s)
    col = J * BK + 6 * Y
    magnitude = np.zeros((m, k3 // 3), dtype=np.int16)  # per triple
    magnitude[row, col // 3] = a_bytes >> 4
    magnitude[row, col // 3 + 1] = a_bytes & 15
    assert (magnitude <= 13).all(), "triple magnitude above 13"

    size_b = m * k3 // 24
    b_bytes = np.frombuffer(raw[size_a:size_a + size_b], dtype=np.uint8)
    I, J, R, Z, u = _digits(np.arange(size_b), [m // BM, k3 // BK, BM // 32, BK // 24, 32])
    negative = np.zeros((m, k3 // 3), dtype=bool)
    c, e = u // 2, u % 2
    for beta in range(8):
        h = 15 - (8 * e + beta)
        row = I * BM + R * 32 + 16 * (h % 2) + c
        triple = (J * BK + 24 * Z + 3 * (h // 2)) // 3
        negative[row, triple] = (b_bytes >> beta) & 1 == 1
    assert not (negative & (magnitude == 0)).any(), "sign bit set on a triple of value 0 (sigma = 1 only if v3 < 0)"
    v3 = np.where(negative, -magnitude, magnitude)
    first, second, third = _balanced_ternary(v3)
    codes[:, 0:k3:3], codes[:, 1:k3:3], codes[:, 2:k3:3] = first, second, third

    start_c = 5 * m * k3 // 24
    size_c = m * k2 // 4
    if k2:
        c_bytes = np.frombuffer(raw[start_c:start_c + size_c], dtype=np.uint8)
        I, J2, R, Y, s = _digits(np.arange(size_c), [m // BM, k2 // 32, BM // 32, 8, 32])
        row = I * BM + R * 32 + _quarter_swap(s)
        col = k3 + 32 * J2 + 4 * Y
        codes[row, col], codes[row, col + 1] = _pair_digits(c_bytes >> 4)
        codes[row, col + 2], codes[row, col + 3] = _pair_digits(c_bytes & 15)
    assert raw[start_c + size_c:slot] == bytes(slot - start_c - size_c), "padding up to the scale is not zeros"
    return codes, _scale(raw, slot)


def kernel_config_text(sections: list[tuple[int, int, int, int, int]]) -> str:
    """A kernel_config.ini as bitnet.cpp's codegen writes it: [Kernels_i] with m, k, bm, bk, bmm."""
    out = []
    for i, (m, k, BM, BK, bm) in enumerate(sections):
        out.append(f"[Kernels_{i}]\nm = {m}\nk = {k}\nbm = {BM}\nbk = {BK}\nbmm = {bm}\n")
    return "\n".join(out)


def test_tiles(kind: str, shapes) -> list[tuple[int, int, int, int, int]]:
    """Tiles for the test shapes, varied between shapes (several tiles per matrix where it can):
    TL1 alternates (BK 64, bm 32) and (BK 128, bm 64); TL2 alternates BK 96 and 192 (bm 32)."""
    sections = []
    for i, (m, k) in enumerate(sorted(set(map(tuple, shapes)))):
        if kind == "tl1":
            BK, bm = ((64, 32), (128, 64))[i % 2] if k % 128 == 0 else (64, 32)
        else:
            BK, bm = (96, 192)[i % 2], 32
            if k % BK % 32 or k % BK > 256:
                BK = 96 if BK == 192 else 192
        BM = next(x for x in (64, 128, 32, m) if m % x == 0 and x % bm == 0 and x < m or x == m)
        sections.append((m, k, BM, BK, bm))
    return sections


test_tiles.__test__ = False  # a helper, not a test
