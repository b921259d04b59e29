"""ik_llama.cpp's IQ2_BN / IQ1_BN / IQ2_BN_R4 codecs against references written from ik's code.

tests/ik_layouts.py transliterates ik's quantizers and decoders loop by loop; the hand-worked
examples below spell out the bytes from ik's code in comments. None of the expected values
come from pipeline/codecs/ik.py.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codecs import CodecError
from pipeline.codecs.ik import IQ1_BN, IQ2_BN, IQ2_BN_R4
from tests import ik_layouts

# this module's own hypothesis settings, on each test (a profile loaded at import would apply to
# every module collected after it)
HYPOTHESIS = settings(max_examples=40, deadline=None)

CODECS = {"iq2_bn": IQ2_BN, "iq1_bn": IQ1_BN, "iq2_bn_r4": IQ2_BN_R4}
ROW_SHAPES = ["random", "zero", "plus", "minus", "sparse"]


def _row(rng: np.random.Generator, kind: str, cols: int) -> np.ndarray:
    if kind == "random":
        return rng.integers(-1, 2, cols)
    row = np.zeros(cols)
    if kind == "plus":
        row[:] = 1
    elif kind == "minus":
        row[:] = -1
    elif kind == "sparse":
        row[rng.integers(cols)] = rng.choice([-1, 1])
    return row


# scales the converter meets (absmean-sized), powers of two, fp16-unrepresentable ones, and the
# edges of ik's rule: 0 and the float32 subnormals whose half rounds to 0 or not
SCALES = st.one_of(
    st.floats(0.0001220703125, 10.0, width=32),
    st.sampled_from([0.0, 2.0 ** -149, 3 * 2.0 ** -149, 2.0 ** -126, 0.5, 1.0, 1 / 3, 65504.0, 70000.0]),
)


@st.composite
def tensors(draw, row_multiple: int = 1):
    rows = row_multiple * draw(st.integers(1, 3 if row_multiple > 1 else 5))
    cols = 64 * draw(st.integers(1, 3))
    kinds = draw(st.lists(st.sampled_from(ROW_SHAPES), min_size=rows, max_size=rows))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    codes = np.array([_row(rng, k, cols) for k in kinds], dtype=np.int8)
    if draw(st.booleans()):
        scale = np.float32(draw(SCALES))
    else:
        scale = np.array([draw(SCALES) for _ in range(rows)], dtype=np.float32)
    return codes, scale


def _values(codes: np.ndarray, scale) -> np.ndarray:
    """codes * scale as float32 per row, as a converter hands them to llama-quantize."""
    s = np.broadcast_to(np.asarray(scale, dtype=np.float32).reshape(-1, 1), (codes.shape[0], 1))
    return codes.astype(np.float32) * s


def _expected_decoded(kind: str, codes: np.ndarray, scale) -> np.ndarray:
    values = _values(codes, scale)
    row_max = np.abs(values).max(axis=1)
    # s = 2**-149: 0.5f * s rounds to 0, no |x| is below it, and ik stores the zeros as +s
    lost = (row_max > 0) & (np.float32(0.5) * row_max == 0)
    values = np.where(lost[:, None] & (codes == 0), row_max[:, None], values)
    if kind != "iq1_bn":
        return values
    # IQ1_BN keeps the row max as fp16 (ik rounds to nearest even, overflow to inf)
    with np.errstate(over="ignore", invalid="ignore"):
        d = row_max.astype(np.float16).astype(np.float32)
        return np.where(row_max[:, None] > 0, codes * d[:, None], np.float32(0))


@pytest.mark.parametrize("kind", ["iq2_bn", "iq1_bn"])
@HYPOTHESIS
@given(data=tensors())
def test_bytes_equal_iks_quantizer_and_decode_back(kind, data):
    codes, scale = data
    raw = CODECS[kind].encode(codes, scale)
    values = _values(codes, scale)
    assert raw.tobytes() == ik_layouts.quantize_tensor(values, kind)
    decoded = ik_layouts.DECODERS[kind](raw.tobytes(), *codes.shape)
    np.testing.assert_array_equal(decoded, _expected_decoded(kind, codes, scale))
    np.testing.assert_array_equal(CODECS[kind].decode(raw), decoded)


@HYPOTHESIS
@given(data=tensors(row_multiple=4))
def test_r4_bytes_equal_iks_repack_and_decode_back(data):
    codes, scale = data
    raw = IQ2_BN_R4.encode(codes, scale)
    assert raw.shape == (codes.shape[0], IQ2_BN_R4.row_bytes(codes.shape[1]))
    assert raw.tobytes() == ik_layouts.quantize_tensor(_values(codes, scale), "iq2_bn_r4")
    decoded = ik_layouts.decode_iq2_bn_r4(raw.tobytes(), *codes.shape)
    np.testing.assert_array_equal(decoded, _expected_decoded("iq2_bn_r4", codes, scale))
    np.testing.assert_array_equal(IQ2_BN_R4.decode(raw), decoded)


def test_row_chunks_encode_independently():
    rng = np.random.default_rng(7)
    codes = rng.integers(-1, 2, (8, 128)).astype(np.int8)
    scales = rng.uniform(0.01, 2, 8).astype(np.float32)
    for codec in (IQ2_BN, IQ1_BN, IQ2_BN_R4):
        whole = codec.encode(codes, scales)
        parts = np.concatenate([codec.encode(codes[:4], scales[:4]), codec.encode(codes[4:], scales[4:])])
        np.testing.assert_array_equal(whole, parts)


@pytest.mark.parametrize("kind", ["iq2_bn", "iq1_bn", "iq2_bn_r4"])
def test_numpy_decoders_are_the_loops_on_any_bytes(kind):
    """ik_layouts.NUMPY_DECODERS (what tests/test_ik_types.py decodes whole files with) against the
    loop transliterations, on random bytes: every byte value in every position, scales included
    (NaN, inf, subnormal and negative ones among them), several blocks and row groups."""
    rng = np.random.default_rng(21)
    row_bytes = {"iq2_bn": lambda c: 4 + c // 4, "iq1_bn": lambda c: 2 + 13 * (c // 64),
                 "iq2_bn_r4": lambda c: 4 + c // 4}[kind]
    for rows, cols in ((4, 64), (8, 192), (12, 320)):
        for _ in range(3):
            raw = rng.integers(0, 256, rows * row_bytes(cols), dtype=np.uint8).tobytes()
            with np.errstate(all="ignore"):
                want = ik_layouts.DECODERS[kind](raw, rows, cols)
                got = ik_layouts.NUMPY_DECODERS[kind](raw, rows, cols)
            assert got.dtype == want.dtype == np.float32
            np.testing.assert_array_equal(got, want, err_msg=f"{kind} {rows}x{cols}")


# -- hand-worked bytes ---------------------------------------------------------------------------

def test_iq2_bn_example():
    codes = np.zeros((1, 64), dtype=np.int8)
    codes[0, 0], codes[0, 16], codes[0, 63] = 1, -1, 1
    # row meta: float32 max|x| = 0.5 -> 00 00 00 3f
    # field L = 2 for +0.5, 0 for -0.5, 1 for 0 (|0| < 0.25)
    # byte 0 = L[0] | L[16]<<2 | L[32]<<4 | L[48]<<6 = 2 | 0 | 1<<4 | 1<<6 = 0x52
    # byte 15 = L[15] | L[31]<<2 | L[47]<<4 | L[63]<<6 = 1 | 4 | 16 | 2<<6 = 0x95
    # every other byte: four fields of 1 = 0x55
    expected = bytes.fromhex("0000003f") + bytes([0x52] + [0x55] * 14 + [0x95])
    assert IQ2_BN.encode(codes, 0.5).tobytes() == expected


def test_iq1_bn_example():
    codes = np.zeros((1, 64), dtype=np.int8)
    codes[0, 0], codes[0, 4], codes[0, 15], codes[0, 63] = 1, -1, 1, -1
    # row meta: fp16(1.0) = 0x3c00 -> 00 3c
    # ql[0] = values 0..4 with weights 1, 3, 9, 27, 81: 2*1 + 1*3 + 1*9 + 1*27 + 0*81 = 41,
    #   stored as (256*41 + 242) // 243 = 10738 // 243 = 44 = 0x2c
    # ql[1..11]: five zeros, 1+3+9+27+81 = 121 -> (30976 + 242) // 243 = 128 = 0x80
    # extra = values 15, 31, 47, 63 with weights 1, 3, 9, 27: 2 + 3 + 9 + 0 = 14
    #   -> (3584 + 242) // 243 = 15 = 0x0f
    expected = bytes.fromhex("003c") + bytes([0x2c] + [0x80] * 11 + [0x0f])
    assert IQ1_BN.encode(codes, 1.0).tobytes() == expected
    # ik's decoder on byte 0x2c: value 0 uses k_mult 81: 44*81 mod 256 = 236, (236 + 118) >> 7 = 2
    # -> +1; value 4 uses k_mult 1: (44 + 22) >> 7 = 0 -> -1
    np.testing.assert_array_equal(IQ1_BN.decode(np.frombuffer(expected, np.uint8)[None]), codes.astype(np.float32))


def test_iq2_bn_r4_example():
    codes = np.zeros((4, 64), dtype=np.int8)
    for k in range(4):
        codes[k, k] = 1
    # group meta: the 4 rows' float32 maxes 1, 2, 3, 4 -> 0000803f 00000040 00004040 00008040
    # byte 16l + 4k + i holds row k's values 16l + 4m + i in bits 2m: row k's +1 at value k is
    # l = 0, m = 0, i = k -> byte 5k gets field 2 in bits 1:0 (0x56); the rest are 0x55
    block = [0x55] * 64
    for k in range(4):
        block[5 * k] = 0x56
    expected = bytes.fromhex("0000803f" "00000040" "00004040" "00008040") + bytes(block)
    raw = IQ2_BN_R4.encode(codes, np.array([1, 2, 3, 4], dtype=np.float32))
    assert raw.shape == (4, 20)  # 4 rows of IQ2_BN's 4 + 64/4 bytes, in file order
    assert raw.tobytes() == expected


def test_all_zero_row():
    # max = 0 -> thresh = 0; no |x| < 0, and 0 is not < 0, so every field is 2 (+1) under a zero scale
    zero = np.zeros((1, 64), dtype=np.int8)
    assert IQ2_BN.encode(zero, 0.7).tobytes() == bytes(4) + bytes([0xAA] * 16)
    # IQ1_BN: five 2s = 2*121 = 242 -> (256*242 + 242) // 243 = 255; extra 2*40 = 80 -> 85 = 0x55
    assert IQ1_BN.encode(zero, 0.7).tobytes() == bytes(2) + bytes([0xFF] * 12 + [0x55])
    for codec in (IQ2_BN, IQ1_BN):
        assert not codec.decode(codec.encode(zero, 0.7)).any()


def test_zero_scale_turns_minus_one_into_two():
    # x = -1 * 0.0 = -0.0: not < thresh (0), not < 0 -> field 2, like the zeros
    codes = np.array([[-1, 1] + [0] * 62], dtype=np.int8)
    assert IQ2_BN.encode(codes, 0.0).tobytes() == bytes(4) + bytes([0xAA] * 16)


def test_smallest_subnormal_scale():
    # s = 2**-149: thresh = 0.5f * s rounds to 0, so zeros become 2 while +-s keep 2 / 0
    codes = np.array([[1, -1] + [0] * 62], dtype=np.int8)
    raw = IQ2_BN.encode(codes, 2.0 ** -149).tobytes()
    assert raw[:4] == struct.pack("<f", 2.0 ** -149)
    assert raw[4] == 2 | 2 << 2 | 2 << 4 | 2 << 6 and raw[5] == 0 | 2 << 2 | 2 << 4 | 2 << 6


def test_row_sizes_follow_ggml_row_size():
    # ggml_row_size = row_meta_size + type_size * n / 64: IQ2_BN 4 + 16 n/64, IQ1_BN 2 + 13 n/64
    assert [IQ2_BN.row_bytes(n) for n in (64, 2560)] == [20, 644]
    assert [IQ1_BN.row_bytes(n) for n in (64, 2560)] == [15, 522]
    assert IQ2_BN_R4.row_bytes(2560) == 644


# -- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", [IQ2_BN, IQ1_BN, IQ2_BN_R4])
def test_row_length_not_multiple_of_64_refused(codec):
    with pytest.raises(CodecError, match="multiple of 64"):
        codec.encode(np.zeros((4, 96), dtype=np.int8), 1.0)
    assert not codec.supports(96) and codec.supports(128)


def test_r4_rows_not_multiple_of_4_refused():
    with pytest.raises(CodecError, match="multiple of 4 rows"):
        IQ2_BN_R4.encode(np.zeros((6, 64), dtype=np.int8), 1.0)
    assert IQ2_BN_R4.row_multiple() == 4


@pytest.mark.parametrize("codes, scale", [
    (np.full((1, 64), 2, dtype=np.int8), 1.0),           # not ternary
    (np.zeros((1, 64), dtype=np.float32), 1.0),          # not integer codes
    (np.zeros((1, 64), dtype=np.int8), -1.0),            # negative scale
    (np.zeros((1, 64), dtype=np.int8), float("nan")),
    (np.zeros((2, 64), dtype=np.int8), np.ones(3, np.float32)),  # one scale per row, wrong count
])
def test_bad_input_refused(codes, scale):
    for codec in (IQ2_BN, IQ1_BN):
        with pytest.raises(CodecError):
            codec.encode(codes, scale)


@pytest.mark.parametrize("codec, width", [(IQ2_BN, 21), (IQ2_BN, 4), (IQ1_BN, 16), (IQ2_BN_R4, 20)])
def test_bad_data_refused(codec, width):
    rows = 2 if codec is IQ2_BN_R4 else 1  # 20 bytes is a good R4 row, 2 rows are not a group
    with pytest.raises(CodecError):
        codec.decode(np.zeros((rows, width), dtype=np.uint8))
