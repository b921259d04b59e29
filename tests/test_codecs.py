"""The codecs against independent references.

TQ1_0 / TQ2_0 / F16 / F32 bytes are compared with gguf-py's numpy quantizer (the reference
FORMATS.md names); I2_S, which gguf does not know, with a slow element-by-element packer
written from the FORMATS.md description; the absmean kernel with float64 numpy and Python's
own `round`.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import quants as gq
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codecs import (CODECS, F16, F32, I2_S, QK_K, TQ1_0, TQ2_0, CodecError, NonFiniteWeights,
                             absmean_row_sums, absmean_scale, absmean_total, ternary_codes)

TQ_CODECS = [TQ2_0, TQ1_0]
# this module's own hypothesis settings, on each test (a profile loaded at import would apply to
# every module collected after it)
HYPOTHESIS = settings(max_examples=60, deadline=None)

# -- building codes ---------------------------------------------------------------------------

BLOCK_KINDS = ["random", "zero", "plus", "minus", "sparse", "max_and_min"]


def make_codes(rng: np.random.Generator, kinds: list[list[str]], block: int = QK_K) -> np.ndarray:
    """A (rows, blocks * block) int8 code matrix, one kind per block."""
    rows = []
    for row_kinds in kinds:
        parts = []
        for kind in row_kinds:
            if kind == "random":
                b = rng.integers(-1, 2, block)
            elif kind == "zero":
                b = np.zeros(block)
            elif kind == "plus":
                b = np.ones(block)
            elif kind == "minus":
                b = -np.ones(block)
            elif kind == "sparse":  # a single non-zero code somewhere in the block
                b = np.zeros(block)
                b[rng.integers(block)] = rng.choice([-1, 1])
            else:  # both extremes present, the rest zero
                b = np.zeros(block)
                b[0], b[-1] = 1, -1
            parts.append(b)
        rows.append(np.concatenate(parts))
    return np.array(rows, dtype=np.int8)


@st.composite
def code_matrices(draw, block: int = QK_K):
    rows = draw(st.integers(1, 4))
    blocks = draw(st.integers(1, 4))
    kinds = draw(st.lists(st.lists(st.sampled_from(BLOCK_KINDS), min_size=blocks, max_size=blocks),
                          min_size=rows, max_size=rows))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_codes(np.random.default_rng(seed), kinds, block)


# Scales from below the fp16 subnormal range (fp16(s) = 0) through fp16 subnormals (< 6.1e-5),
# ordinary values, and past the fp16 maximum (fp16(s) = inf): gguf must agree everywhere.
any_scale = st.floats(min_value=float(np.float32(1e-8)), max_value=1e5, width=32)
# Scales whose fp16 is finite and non-zero, for round trips through values.
fp16_scale = st.floats(min_value=float(np.float32(1e-5)), max_value=6e4, width=32)


def fp16_ties() -> list[np.float32]:
    """float32 values exactly half-way between two neighbouring fp16 values (round to even)."""
    out = []
    for h in [np.float16(1.0), np.float16(0.333), np.float16(1e-4), np.float16(3e-5), np.float16(1234.0)]:
        up = np.nextafter(h, np.float16(np.inf))
        mid = (np.float32(h) + np.float32(up)) / np.float32(2)
        assert np.float32(h) < mid < np.float32(up)
        out.append(np.float32(mid))
    return out


def gguf_bytes(codes: np.ndarray, scale: np.float32, codec) -> np.ndarray:
    return gq.quantize((codes * np.float32(scale)).astype(np.float32), codec.ggml_type)


# -- TQ1_0 / TQ2_0 ----------------------------------------------------------------------------

@pytest.mark.parametrize("codec", TQ_CODECS, ids=lambda c: c.name)
@HYPOTHESIS
@given(codes=code_matrices(), scale=any_scale)
def test_tq_encode_matches_gguf(codec, codes, scale):
    scale = np.float32(scale)
    with np.errstate(over="ignore"):  # scales past 65504 are inf in fp16, for gguf and us alike
        ours = codec.encode(codes, scale)
        ref = gguf_bytes(codes, scale, codec)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("codec", TQ_CODECS, ids=lambda c: c.name)
@HYPOTHESIS
@given(codes=code_matrices(), seed=st.integers(0, 2**32 - 1))
def test_tq_encode_takes_one_scale_per_block(codec, codes, seed):
    """Group-scaled tensors whose scale is constant over each 256-value block: one scale per block,
    the same bytes as gguf's quantizer on the values."""
    rows, nb = codes.shape[0], codes.shape[1] // QK_K
    scales = np.random.default_rng(seed).uniform(1e-3, 10, (rows, nb)).astype(np.float16).astype(np.float32)
    values = (codes.reshape(rows, nb, QK_K) * scales[..., None]).reshape(codes.shape).astype(np.float32)
    want = gq.quantize(values, codec.ggml_type)
    np.testing.assert_array_equal(codec.encode(codes, scales), want)
    if codec is TQ2_0:
        from pipeline.codecs import pack_fields

        np.testing.assert_array_equal(codec.encode_codes(pack_fields((codes + 1).astype(np.uint8)), scales), want)


@pytest.mark.parametrize("codec", TQ_CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("scale", [np.float32(1e-5), np.float32(1.0), np.float32(0.1), np.float32(65504),
                                   np.float32(65519), *fp16_ties()])
def test_tq_encode_special_scales(codec, scale):
    codes = make_codes(np.random.default_rng(7), [BLOCK_KINDS, BLOCK_KINDS[::-1]])
    np.testing.assert_array_equal(codec.encode(codes, scale), gguf_bytes(codes, scale, codec))


@pytest.mark.parametrize("codec", TQ_CODECS, ids=lambda c: c.name)
def test_tq_block_scale_layout(codec):
    """d sits in the last two bytes: fp16(scale) for a block with a non-zero code, 0 otherwise."""
    codes = make_codes(np.random.default_rng(0), [["zero", "plus", "sparse", "zero"]])
    scale = np.float32(0.0123)
    blocks = codec.encode(codes, scale).reshape(4, codec.type_size)
    d = blocks[:, -2:].copy().view("<f2").ravel()
    np.testing.assert_array_equal(d, [0, np.float16(scale), np.float16(scale), 0])


@pytest.mark.parametrize("codec", TQ_CODECS, ids=lambda c: c.name)
@HYPOTHESIS
@given(codes=code_matrices(), scale=fp16_scale)
def test_tq_decode_round_trip(codec, codes, scale):
    scale = np.float32(scale)
    data = codec.encode(codes, scale)
    values = codec.decode(data)
    expected = codes.astype(np.float32) * np.float32(np.float16(scale))
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(values, gq.dequantize(data, codec.ggml_type))


@pytest.mark.parametrize("codec", TQ_CODECS, ids=lambda c: c.name)
def test_tq_decode_reads_gguf_bytes(codec):
    """Our decoder reads what gguf wrote, including blocks gguf made from non-ternary values."""
    values = np.random.default_rng(3).normal(size=(3, 2 * QK_K)).astype(np.float32)
    data = gq.quantize(values, codec.ggml_type)
    np.testing.assert_array_equal(codec.decode(data), gq.dequantize(data, codec.ggml_type))


@pytest.mark.parametrize("codec", TQ_CODECS, ids=lambda c: c.name)
def test_tq_row_chunks_are_independent(codec):
    codes = make_codes(np.random.default_rng(1), [["random", "sparse"]] * 7)
    scale = np.float32(0.37)
    whole = codec.encode(codes, scale)
    parts = np.concatenate([codec.encode(codes[a:b], scale) for a, b in [(0, 1), (1, 4), (4, 7)]])
    np.testing.assert_array_equal(parts, whole)


@pytest.mark.parametrize("codec", TQ_CODECS, ids=lambda c: c.name)
def test_tq_sizes_and_rejections(codec):
    block_size, type_size = GGML_QUANT_SIZES[codec.ggml_type]
    assert (codec.block_size, codec.type_size) == (block_size, type_size)
    assert codec.supports(512) and not codec.supports(8640) and not codec.supports(128)
    assert codec.row_bytes(3 * QK_K) == 3 * type_size
    with pytest.raises(CodecError):
        codec.row_bytes(3200)
    with pytest.raises(CodecError):
        codec.encode(np.zeros((2, 3 * 128), np.int8), np.float32(1))
    with pytest.raises(CodecError):
        codec.encode(np.full((1, QK_K), 2, np.int8), np.float32(1))
    for bad in [0.0, -1.0, np.inf, np.nan]:
        with pytest.raises(CodecError):
            codec.encode(np.ones((1, QK_K), np.int8), np.float32(bad))


def test_tq_accepts_wider_integer_codes():
    codes = make_codes(np.random.default_rng(2), [["random"]])
    s = np.float32(0.5)
    np.testing.assert_array_equal(TQ2_0.encode(codes.astype(np.int64), s), TQ2_0.encode(codes, s))


# -- absmean ternary quantization -------------------------------------------------------------

def python_ternary(x: np.ndarray, scale: np.float32) -> np.ndarray:
    """Element by element: the float32 product x * float32(1 / s), Python's half-to-even round.

    (gguf's np_roundf rounds half away from zero, but it only ever sees values that are
    already -1, 0 or +1 inside the TQ quantizers, so that difference never shows up there.)
    """
    iscale = np.float32(1) / np.float32(scale)
    out = []
    for v in np.asarray(x, np.float32).ravel():
        # the double product of two float32 values is exact; rounding it once gives the
        # correctly rounded float32 product
        prod = float(np.float32(float(v) * float(iscale)))
        out.append(max(-1, min(1, round(prod))))
    return np.array(out, dtype=np.int8).reshape(np.shape(x))


def test_ternary_ties_round_half_to_even():
    s = np.float32(0.25)  # a power of two, so x * (1 / s) is exact and ties are exact ties
    x = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49, 0.51, 1.0, -1.0, 0.0, -0.0], np.float32) * s
    codes = ternary_codes(x, s)
    np.testing.assert_array_equal(codes, [0, 0, 1, -1, 1, -1, 0, 1, 1, -1, 0, 0])
    np.testing.assert_array_equal(codes, python_ternary(x, s))
    assert codes.dtype == np.int8


@pytest.mark.parametrize("s", [np.float32(0.25), np.float32(0.0123), np.float32(1 / 3), np.float32(1e-5),
                               np.float32(7.77)])
def test_ternary_near_the_boundaries(s):
    """Values one or two float32 steps either side of +-0.5 s and +-1.5 s, where multiplying
    by 1/s and dividing by s can round differently."""
    centres = np.array([0.5, -0.5, 1.5, -1.5], np.float32) * s
    x = [centres]
    for direction in (np.inf, -np.inf):
        step = centres
        for _ in range(3):
            step = np.nextafter(step, np.float32(direction))
            x.append(step)
    x = np.stack(x)
    np.testing.assert_array_equal(ternary_codes(x, s), python_ternary(x, s))


def as_source(values: np.ndarray, kind: str) -> np.ndarray:
    if kind == "f16":
        return values.astype(np.float16)
    if kind == "bf16":  # what a bf16 checkpoint widens to: float32 with the low 16 bits clear
        return (values.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return values.astype(np.float32)


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16"])
@HYPOTHESIS
@given(seed=st.integers(0, 2**32 - 1), spread=st.floats(1e-3, 1e2),
       shape=st.tuples(st.integers(1, 9), st.integers(1, 70)))
def test_ternary_random_inputs(kind, seed, spread, shape):
    x = as_source(np.random.default_rng(seed).normal(scale=spread, size=shape), kind)
    s = absmean_scale(absmean_total([absmean_row_sums(x)]), x.size)
    codes = ternary_codes(x, s)
    ref = np.clip(np.rint(x.astype(np.float32) * (np.float32(1) / s)), -1, 1).astype(np.int8)
    np.testing.assert_array_equal(codes, ref)
    if x.size <= 64:
        np.testing.assert_array_equal(codes, python_ternary(x, s))


@HYPOTHESIS
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 40), cols=st.integers(1, 50),
       cuts=st.lists(st.integers(0, 40), max_size=6), kind=st.sampled_from(["f32", "f16", "bf16"]),
       spread=st.sampled_from([1e-3, 1.0, 3e3]))
def test_absmean_chunked_matches_mean(seed, rows, cols, cuts, kind, spread):
    x = as_source(np.random.default_rng(seed).normal(scale=spread, size=(rows, cols)), kind)
    bounds = [0, *sorted(c for c in cuts if c < rows), rows]
    partials = [absmean_row_sums(x[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    assert all(p.dtype == np.float64 for p in partials)
    s = absmean_scale(absmean_total(partials), x.size)
    expected = np.float32(max(np.mean(np.abs(x.astype(np.float64))), 1e-5))
    assert s.dtype == np.float32
    assert abs(float(s) - float(expected)) <= float(np.spacing(expected))
    # bit-identical whatever the chunking (and the order the chunks finish in)
    assert s == absmean_scale(absmean_total(partials[::-1]), x.size)
    assert s == absmean_scale(absmean_total([absmean_row_sums(x)]), x.size)


def test_absmean_floor():
    zeros = np.zeros((4, 8), np.float16)
    assert absmean_scale(absmean_total([absmean_row_sums(zeros)]), zeros.size) == np.float32(1e-5)
    tiny = np.full((2, 2), 1e-7, np.float32)
    assert absmean_scale(absmean_total([absmean_row_sums(tiny)]), tiny.size) == np.float32(1e-5)
    codes = ternary_codes(zeros, absmean_scale(0.0, zeros.size))
    assert not codes.any()


def test_absmean_rejects_non_finite():
    x = np.array([[1.0, np.nan]], np.float32)
    with pytest.raises(NonFiniteWeights):
        absmean_scale(absmean_total([absmean_row_sums(x)]), x.size)
    with pytest.raises(NonFiniteWeights):
        absmean_scale(float("inf"), 4)


def test_absmean_row_sums_do_not_touch_their_input():
    x = np.array([[-1.0, 2.0]], np.float32)
    absmean_row_sums(x)
    np.testing.assert_array_equal(x, [[-1.0, 2.0]])


# -- I2_S -------------------------------------------------------------------------------------

def i2s_reference(values: np.ndarray) -> bytes:
    """FORMATS.md, slowly: the flattened tensor in blocks of 128, 32 bytes a block."""
    flat = [float(v) for v in np.asarray(values, np.float32).ravel()]

    def code(v: float) -> int:
        return 1 if abs(v) < 1e-6 else (2 if v > 0 else 0)

    out = bytearray()
    for i in range(len(flat) // 128):
        for b in range(32):
            out.append(code(flat[128 * i + b]) << 6 | code(flat[128 * i + 32 + b]) << 4
                       | code(flat[128 * i + 64 + b]) << 2 | code(flat[128 * i + 96 + b]))
    return bytes(out)


@HYPOTHESIS
@given(codes=code_matrices(block=128), scale=fp16_scale, cut=st.integers(0, 4))
def test_i2s_matches_reference(codes, scale, cut):
    scale = np.float32(scale)
    cut = min(cut, codes.shape[0])
    packed = np.concatenate([I2_S.encode(codes[:cut], scale), I2_S.encode(codes[cut:], scale)])
    assert packed.shape == (codes.shape[0], codes.shape[1] // 4) and packed.dtype == np.uint8
    assert packed.tobytes() == i2s_reference(codes * scale)
    np.testing.assert_array_equal(I2_S.decode(packed, scale), codes.astype(np.float32) * scale)
    np.testing.assert_array_equal(I2_S.decode_codes(packed), codes)


def test_i2s_tail():
    s = np.float32(0.0421)
    tail = I2_S.i2s_tail(s)
    assert len(tail) == 32 and tail[:4] == struct.pack("<f", float(s)) and tail[4:] == bytes(28)


def test_i2s_rejects_partial_blocks():
    assert I2_S.supports(128) and I2_S.supports(2560) and not I2_S.supports(3200 + 64)
    assert I2_S.row_bytes(256) == 64
    with pytest.raises(CodecError):
        I2_S.row_bytes(192)
    with pytest.raises(CodecError):
        I2_S.encode(np.zeros((2, 192), np.int8), np.float32(1))
    with pytest.raises(CodecError):
        I2_S.encode(np.full((1, 128), -2, np.int8), np.float32(1))


# -- F16 / F32 --------------------------------------------------------------------------------

@pytest.mark.parametrize("codec,dtype", [(F16, np.float16), (F32, np.float32)], ids=["F16", "F32"])
@HYPOTHESIS
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(3,), (2, 5), (4, 64)]))
def test_float_codecs(codec, dtype, seed, shape):
    values = np.random.default_rng(seed).normal(scale=10, size=shape)
    data = codec.encode(values)
    expected = values.astype(dtype).view(np.uint8)
    assert data.dtype == np.uint8 and data.shape == (*shape[:-1], shape[-1] * codec.type_size)
    np.testing.assert_array_equal(data, expected)
    np.testing.assert_array_equal(data.view(dtype), gq.quantize(values, codec.ggml_type))
    np.testing.assert_array_equal(codec.decode(data), values.astype(dtype).astype(np.float32))
    assert codec.row_bytes(shape[-1]) == shape[-1] * codec.type_size
    # non-contiguous input (a column slice) encodes like its copy
    np.testing.assert_array_equal(codec.encode(values[..., ::2]), codec.encode(values[..., ::2].copy()))


def test_registry():
    """Type ids, block sizes and file types agree with gguf's constants (and FORMATS.md for I2_S)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    from pipeline.outtypes import EMBEDDING_CHOICES, OUTPUT_TYPES, TERNARY_CHOICES

    assert set(CODECS) == set(OUTPUT_TYPES) == {"tq2_0", "tq1_0", "i2_s", "i2_s_arm", "tl1", "tl2", "f16", "bf16",
                                                "f32", "q8_0", "q2_0", "q1_0", "iq2_bn", "iq1_bn", "iq2_bn_r4"}
    # --type: the ternary types, and the float types of the effective weights (as llama.cpp's --outtype)
    assert set(TERNARY_CHOICES) == {"tq2_0", "tq1_0", "i2_s", "tl1", "tl2", "q2_0", "q1_0", "f16", "bf16", "f32",
                                    "q8_0", "iq2_bn", "iq1_bn", "iq2_bn_r4"}
    # --embedding-type: the float types, and the ternary ones for group-scaled checkpoints' ternary embeddings
    assert EMBEDDING_CHOICES == ("f16", "bf16", "f32", "q8_0", "tq2_0", "q2_0", "q1_0")
    file_types = {"tq2_0": LlamaFileType.MOSTLY_TQ2_0, "tq1_0": LlamaFileType.MOSTLY_TQ1_0,
                  "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16, "f32": LlamaFileType.ALL_F32,
                  "q8_0": LlamaFileType.MOSTLY_Q8_0,
                  # gguf 0.19: Q1_0 = 41, (128, 2 + 16), MOSTLY_Q1_0 = 40; gguf 0.18 (pyproject's lowest) has no Q1_0
                  "q1_0": getattr(LlamaFileType, "MOSTLY_Q1_0", 40)}
    for name, t in OUTPUT_TYPES.items():
        if name == "i2_s":  # bitnet.cpp's fork only: type 36, file type 40, 128 values in 32 bytes + 32-byte tail
            assert (t.ggml_type, t.file_type, t.block_size, t.codec.type_size, t.codec.tail_size(), t.target) \
                == (36, 40, 128, 32, 32, "x86")
            continue
        if name == "i2_s_arm":  # FORMATS.md: ARM builds read blocks of 64 values in 16 bytes
            assert (t.ggml_type, t.file_type, t.block_size, t.codec.type_size, t.codec.tail_size(), t.target,
                    t.type_option) == (36, 40, 64, 16, 32, "arm", "i2_s")
            continue
        if name in ("tl1", "tl2"):  # TL-FORMAT.md: types 38 / 39, file types 38 / 39, ARM / x86
            assert (t.ggml_type, t.file_type, t.target) == {"tl1": (38, 38, "arm"), "tl2": (39, 39, "x86")}[name]
            continue
        if name == "q2_0":  # newer than the gguf package here; llama.cpp 0.3.36's gguf-py constants.py:
            # Q2_0 = 42, MOSTLY_Q2_0 = 41, GGML_QUANT_SIZES[Q2_0] = (64, 2 + 16)
            assert (t.ggml_type, t.file_type, t.block_size, t.codec.type_size, t.codec.tail_size(), t.target) \
                == (42, 41, 64, 18, 0, None)
            continue
        if name.startswith("iq"):  # ik_llama.cpp's ggml.h / llama.h (docs/notes/ik-llama.md section 1)
            assert (t.ggml_type, t.file_type, t.block_size, t.codec.type_size, t.codec.row_meta_size, t.runtime) \
                == {"iq1_bn": (134, 136, 64, 13, 2, "ik_llama.cpp"), "iq2_bn": (135, 137, 64, 16, 4, "ik_llama.cpp"),
                    "iq2_bn_r4": (335, 337, 64, 16, 4, "ik_llama.cpp")}[name]
            continue
        if name.upper() not in GGMLQuantizationType.__members__:  # Q1_0 before gguf 0.19: its numbers above
            assert name == "q1_0" and (t.ggml_type, t.file_type, t.block_size, t.codec.type_size) == (41, 40, 128, 18)
            continue
        gtype = GGMLQuantizationType[name.upper()]
        assert t.ggml_type == gtype
        assert (t.block_size, t.codec.type_size) == GGML_QUANT_SIZES[gtype]
        assert t.file_type == file_types[name] and t.codec.tail_size() == 0 and t.target is None
    assert [k for k, v in CODECS.items() if v.ternary] == ["tq2_0", "tq1_0", "i2_s", "i2_s_arm", "tl1", "tl2", "q2_0",
                                                           "q1_0", "iq2_bn", "iq1_bn", "iq2_bn_r4"]


# -- Q2_0 (upstream llama.cpp, type 42) ---------------------------------------------------------

def q2_0_reference_quantize(values: np.ndarray) -> bytes:
    """llama.cpp's quantize_row_q2_0_ref (ggml-quants.c of the llama-cpp-python 0.3.36 sdist),
    transcribed element by element: per block of 64, d = max|x| (fp16, first 2 bytes),
    q = clamp(round(x / d) + 1, 0, 3) (roundf: half away from zero), value j in byte j // 4
    at bits 2 * (j % 4)."""
    out = bytearray()
    for row in np.asarray(values, dtype=np.float32):
        for b in range(0, len(row), 64):
            block = row[b:b + 64]
            d = max(abs(float(x)) for x in block)
            inv = 1.0 / np.float32(d) if d > 0 else 0.0
            out += struct.pack("<e", d)
            qs = [0] * 16
            for j, x in enumerate(block):
                v = float(np.float32(x) * np.float32(inv))
                q = int(np.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1) + 1
                qs[j // 4] |= min(max(q, 0), 3) << (2 * (j % 4))
            out += bytes(qs)
    return bytes(out)


def q2_0_reference_decode(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """q2_0_reference_decode_loops on whole arrays, the same float32 product per value, for files
    of test size (test_q2_0_reference_decode_is_the_transcription holds the two equal on any bytes)."""
    assert len(raw) == rows * cols // 64 * 18
    blocks = np.frombuffer(raw, np.uint8).reshape(rows, cols // 64, 18)
    d = blocks[:, :, :2].copy().view("<f2").astype(np.float32)                     # (rows, blocks, 1)
    q = np.stack([(blocks[:, :, 2:] >> 2 * m) & 3 for m in range(4)], axis=-1)  # value j: byte j // 4, field j % 4
    return ((q.reshape(rows, cols // 64, 64).astype(np.float32) - 1) * d).reshape(rows, cols)


def q2_0_reference_decode_loops(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """dequantize_row_q2_0, transcribed: x = (q - 1) * d, 00 = -1, 01 = 0, 10 = +1, 11 = +2."""
    out = np.empty((rows, cols), np.float32)
    pos = 0
    for r in range(rows):
        for b in range(0, cols, 64):
            (d,) = struct.unpack("<e", raw[pos:pos + 2])
            for j in range(64):
                q = (raw[pos + 2 + j // 4] >> (2 * (j % 4))) & 3
                out[r, b + j] = (q - 1) * np.float32(d)
            pos += 18
    return out


@HYPOTHESIS
@given(codes=code_matrices(block=64), scale=fp16_scale)
def test_q2_0_matches_llama_cpps_reference_quantizer(codes, scale):
    from pipeline.codecs import Q2_0

    ours = Q2_0.encode(codes, np.float32(scale))
    assert ours.shape == (codes.shape[0], codes.shape[1] // 64 * 18)
    assert ours.tobytes() == q2_0_reference_quantize(codes * np.float32(scale))
    np.testing.assert_array_equal(Q2_0.decode(ours), q2_0_reference_decode_loops(ours.tobytes(), *codes.shape))
    np.testing.assert_array_equal(Q2_0.decode(ours), codes * np.float32(np.float16(scale)))


def test_q2_0_reference_decode_is_the_transcription():
    """The array decoder the file tests use against the element-by-element transcription, on random
    bytes: every field value in every position, any fp16 scale (NaN, inf, subnormal, negative)."""
    rng = np.random.default_rng(21)
    for rows, cols in ((1, 64), (3, 192), (8, 320)):
        for _ in range(3):
            raw = rng.integers(0, 256, rows * cols // 64 * 18, dtype=np.uint8).tobytes()
            with np.errstate(all="ignore"):
                want, got = q2_0_reference_decode_loops(raw, rows, cols), q2_0_reference_decode(raw, rows, cols)
            assert got.dtype == want.dtype == np.float32
            np.testing.assert_array_equal(got, want, err_msg=f"{rows}x{cols}")


@HYPOTHESIS
@given(codes=code_matrices(block=64), seed=st.integers(0, 2**32 - 1))
def test_q2_0_takes_one_scale_per_block(codes, seed):
    """A group-scaled tensor: each 64-value block keeps its own scale, losslessly."""
    from pipeline.codecs import Q2_0

    rows, nb = codes.shape[0], codes.shape[1] // 64
    scales = np.random.default_rng(seed).uniform(1e-3, 10, (rows, nb)).astype(np.float16).astype(np.float32)
    values = (codes.reshape(rows, nb, 64) * scales[..., None]).reshape(codes.shape)
    ours = Q2_0.encode(codes, scales)
    assert ours.tobytes() == q2_0_reference_quantize(values)
    np.testing.assert_array_equal(Q2_0.decode(ours), values)


def test_q2_0_code_layout_path_and_rejections():
    from pipeline.codecs import Q2_0, pack_fields

    codes = make_codes(np.random.default_rng(3), [["random", "zero"], ["sparse", "max_and_min"]], block=64)
    packed = pack_fields((codes + 1).astype(np.uint8))
    assert Q2_0.encode_codes(packed, np.float32(0.5)).tobytes() == Q2_0.encode(codes, np.float32(0.5)).tobytes()
    assert not Q2_0.supports(96) and Q2_0.supports(64) and Q2_0.row_bytes(128) == 36
    with pytest.raises(CodecError):
        Q2_0.encode(np.zeros((1, 96), np.int8), np.float32(1))
    with pytest.raises(CodecError):
        Q2_0.encode(np.zeros((2, 128), np.int8), np.ones((2, 3), np.float32))
