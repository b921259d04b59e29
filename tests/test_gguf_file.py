"""Our GGUF container against gguf-py's writer and reader, and against hostile files.

Every file our writer produces for types gguf-py knows is compared byte for byte with what
`gguf.GGUFWriter` writes for the same key/values and tensors (single files and split sets);
our reader is compared with `gguf.GGUFReader`. I2_S (type 36), which gguf-py cannot write,
is checked against a GGUFWriter file holding a same-sized stand-in tensor.
"""
from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType as VT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import GGUFFormatError, UserError
from pipeline.gguf_file import (KV, GGUFFileWriter, GGUFSplitWriter, GGUFWriterError, TensorInfo, file_size,
                                model_kvs, plan_split, read_gguf, split_paths)

# this module's own hypothesis settings, on each test (a profile loaded at import would apply to
# every module collected after it)
HYPOTHESIS = settings(max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ARCH = "bitnet"
I2_S_TYPE = 36

# -- building inputs ----------------------------------------------------------------------------

# (key, value, type, sub_type) as a converter would hand them to GGUFWriter.add_key_value
EVERY_KIND = [
    ("general.name", "tiny model", VT.STRING, None),
    ("test.unicode", "ünïcödé ✓ 日本", VT.STRING, None),
    ("test.empty_string", "", VT.STRING, None),
    ("test.u8", 200, VT.UINT8, None),
    ("test.i8", -5, VT.INT8, None),
    ("test.u16", 60000, VT.UINT16, None),
    ("test.i16", -300, VT.INT16, None),
    ("test.u32", 4_000_000_000, VT.UINT32, None),
    ("test.i32", -2_000_000_000, VT.INT32, None),
    ("test.f32", 0.1, VT.FLOAT32, None),
    ("test.bool_true", True, VT.BOOL, None),
    ("test.bool_false", False, VT.BOOL, None),
    ("test.u64", 2**63 + 5, VT.UINT64, None),
    ("test.i64", -(2**62), VT.INT64, None),
    ("test.f64", 1 / 3, VT.FLOAT64, None),
    ("tokenizer.ggml.tokens", ["<s>", "", "ü", "▁the", "\n"], VT.ARRAY, None),
    ("test.int_array_inferred", [1, -2, 3], VT.ARRAY, None),
    ("test.float_array_inferred", [0.5, -1.25, 3e-8], VT.ARRAY, None),
    ("test.bool_array", [True, False, True], VT.ARRAY, None),
    ("test.u8_array", [0, 255, 7], VT.ARRAY, VT.UINT8),
    ("test.i64_array", [-(2**63), 2**63 - 1], VT.ARRAY, VT.INT64),
    ("test.u32_array", [1, 2], VT.ARRAY, VT.UINT32),
    ("test.f64_array", [1e300, -0.0], VT.ARRAY, VT.FLOAT64),
    ("test.string_array_typed", ["a"], VT.ARRAY, VT.STRING),
]


def records_of(kinds) -> list[dict]:
    """The JSON records the pipeline stores (see pipeline.metadata.kv_record)."""
    return [{"key": key, "type": vtype.name, "sub_type": None if sub is None else sub.name, "value": value}
            for key, value, vtype, sub in kinds]


def tensor_data(rng: np.random.Generator, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes of a tensor, from gguf's own quantizer (or float bytes), byte shape."""
    values = rng.standard_normal(shape).astype(np.float32)
    if qtype == QT.F32:
        return values.view(np.uint8)
    if qtype == QT.F16:
        return values.astype(np.float16).view(np.uint8)
    return gguf.quants.quantize(values, qtype)


TENSOR_SPECS = [
    ("token_embd.weight", QT.F16, (4, 64)),
    ("blk.0.attn_norm.weight", QT.F32, (7,)),
    ("blk.0.attn_q.weight", QT.TQ2_0, (3, 256)),
    ("blk.0.attn_k.weight", QT.TQ1_0, (2, 512)),
    ("blk.0.ffn_up.weight", QT.Q8_0, (2, 64)),
    ("blk.0.cube.weight", QT.F32, (2, 3, 5)),
    ("output_norm.weight", QT.F32, (1,)),
]


def make_tensors(seed: int = 0, specs=TENSOR_SPECS) -> list[tuple[TensorInfo, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for name, qtype, shape in specs:
        data = tensor_data(rng, qtype, shape)
        out.append((TensorInfo(name, shape, int(qtype), data.nbytes), data))
    return out


def reference_writer(path: Path, kinds, tensors, **split) -> gguf.GGUFWriter:
    """A GGUFWriter holding the key/values (alignment through add_custom_alignment) and tensor infos."""
    w = gguf.GGUFWriter(path, ARCH, **split)
    for key, value, vtype, sub in kinds:
        if key == "general.alignment":
            w.add_custom_alignment(value)
        else:
            w.add_key_value(key, value, vtype, sub_type=sub)
    for info, data in tensors:
        if split:
            w.add_tensor(info.name, data, raw_dtype=QT(info.ggml_type))
        else:
            w.add_tensor_info(info.name, data.shape, np.dtype(np.uint8), data.nbytes, raw_dtype=QT(info.ggml_type))
    return w


def write_reference(path: Path, kinds, tensors) -> bytes:
    """GGUFWriter's streaming path, as stages/assemble.py used it."""
    w = reference_writer(path, kinds, tensors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    if tensors:
        w.write_ti_data_to_file()
        for _, data in tensors:
            w.write_tensor_data(data)
    else:
        w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def write_ours(path: Path, records, tensors, chunk_sizes=(1, 7, 0, 100)) -> bytes:
    """Our writer, streaming each tensor in uneven chunks (including empty ones)."""
    with GGUFFileWriter(path, model_kvs(ARCH, records), [info for info, _ in tensors]) as w:
        w.write_header()
        for i, (info, data) in enumerate(tensors):
            flat, at, k = data.reshape(-1), 0, 0
            while at < flat.size:
                n = chunk_sizes[k % len(chunk_sizes)]
                w.write_tensor_data(i if k % 2 else info.name, flat[at:at + n])
                at, k = at + n, k + 1
            w.end_tensor()
    return path.read_bytes()


def reader_view(path: Path):
    """What gguf.GGUFReader sees: key -> (type, sub type, value); tensors as our reader reports them."""
    r = gguf.GGUFReader(path)
    fields = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        sub = f.types[-1] if f.types[0] == VT.ARRAY else None
        fields[f.name] = (f.types[0], sub, f.contents())
    tensors = [(t.name, tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type), int(t.data_offset),
                int(t.n_bytes)) for t in r.tensors]
    return fields, tensors, r.alignment


def our_view(path: Path):
    c = read_gguf(path)
    fields = {kv.key: (kv.type, kv.sub_type, kv.value) for kv in c.kvs}
    return fields, [tuple(t) for t in c.tensors], c.alignment


def assert_same_reading(path: Path) -> None:
    ours, theirs = our_view(path), reader_view(path)
    assert list(ours[0]) == list(theirs[0])           # key order
    for key in ours[0]:
        t, sub, value = ours[0][key]
        rt, rsub, rvalue = theirs[0][key]
        assert (t, sub) == (rt, rsub), key
        if t in (VT.FLOAT32, VT.FLOAT64) or sub in (VT.FLOAT32, VT.FLOAT64):
            np.testing.assert_array_equal(np.asarray(value, dtype=np.float64), np.asarray(rvalue, dtype=np.float64))
        else:
            assert value == rvalue, key
    assert ours[1:] == theirs[1:]


# -- byte identity with GGUFWriter --------------------------------------------------------------

@pytest.mark.parametrize("alignment", [None, 32, 64, 8])
def test_single_file_is_byte_identical_to_gguf_writer(tmp_path, alignment):
    kinds = list(EVERY_KIND)
    if alignment is not None:
        kinds.insert(5, ("general.alignment", alignment, VT.UINT32, None))   # in the middle, as anywhere
    tensors = make_tensors()
    ref = write_reference(tmp_path / "ref.gguf", kinds, tensors)
    ours = write_ours(tmp_path / "ours.gguf", records_of(kinds), tensors)
    assert ours == ref
    assert len(ours) == file_size(model_kvs(ARCH, records_of(kinds)), [i for i, _ in tensors])
    assert_same_reading(tmp_path / "ours.gguf")
    c = read_gguf(tmp_path / "ours.gguf")
    assert c.alignment == (alignment or 32) and c.data_start % c.alignment == 0
    for t, (info, data) in zip(c.tensors, tensors):
        assert (t.name, t.shape, t.ggml_type, t.nbytes) == tuple(info)
        assert ours[t.offset:t.offset + t.nbytes] == data.tobytes()


def test_no_tensors_and_no_keys(tmp_path):
    ref = write_reference(tmp_path / "ref.gguf", [], [])
    assert write_ours(tmp_path / "ours.gguf", [], []) == ref
    c = read_gguf(tmp_path / "ours.gguf")
    assert [kv.key for kv in c.kvs] == ["general.architecture"] and c.tensors == []


def test_architecture_record_is_moved_first(tmp_path):
    records = records_of(EVERY_KIND[:3]) + [{"key": "general.architecture", "type": "STRING",
                                             "sub_type": None, "value": ARCH}]
    ref = write_reference(tmp_path / "ref.gguf", EVERY_KIND[:3], [])
    assert write_ours(tmp_path / "ours.gguf", records, []) == ref
    with pytest.raises(GGUFWriterError):
        model_kvs("llama", records)


VALUE_STRATEGIES = {
    VT.UINT8: st.integers(0, 2**8 - 1), VT.INT8: st.integers(-(2**7), 2**7 - 1),
    VT.UINT16: st.integers(0, 2**16 - 1), VT.INT16: st.integers(-(2**15), 2**15 - 1),
    VT.UINT32: st.integers(0, 2**32 - 1), VT.INT32: st.integers(-(2**31), 2**31 - 1),
    VT.UINT64: st.integers(0, 2**64 - 1), VT.INT64: st.integers(-(2**63), 2**63 - 1),
    VT.FLOAT32: st.floats(width=32, allow_nan=False), VT.FLOAT64: st.floats(allow_nan=False),
    VT.BOOL: st.booleans(), VT.STRING: st.text(max_size=20),
}


@st.composite
def kv_kinds(draw):
    keys = draw(st.lists(st.text(min_size=1, max_size=12).filter(lambda k: not k.startswith("general.")),
                         max_size=8, unique=True))
    kinds = []
    for key in keys:
        vtype = draw(st.sampled_from(list(VALUE_STRATEGIES) + [VT.ARRAY]))
        if vtype == VT.ARRAY:
            sub = draw(st.sampled_from(list(VALUE_STRATEGIES)))
            kinds.append((key, draw(st.lists(VALUE_STRATEGIES[sub], min_size=1, max_size=6)), vtype, sub))
        else:
            kinds.append((key, draw(VALUE_STRATEGIES[vtype]), vtype, None))
    alignment = draw(st.sampled_from([None, 1, 16, 32, 128]))
    if alignment is not None:
        kinds.insert(draw(st.integers(0, len(kinds))), ("general.alignment", alignment, VT.UINT32, None))
    return kinds


@st.composite
def tensor_sets(draw):
    n = draw(st.integers(0, 5))
    out = []
    for i in range(n):
        qtype = QT(draw(st.sampled_from(sorted(GGML_QUANT_SIZES))))
        block, size = GGML_QUANT_SIZES[qtype]
        rows, blocks = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        data = np.frombuffer(draw(st.binary(min_size=rows * blocks * size, max_size=rows * blocks * size)),
                             dtype=np.uint8).reshape(rows, blocks * size)
        out.append((TensorInfo(f"t{i}.weight", (rows, blocks * block), int(qtype), data.nbytes), data))
    return out


@HYPOTHESIS
@given(kinds=kv_kinds(), tensors=tensor_sets(), chunks=st.lists(st.integers(0, 50), min_size=1, max_size=4))
def test_random_files_are_byte_identical(tmp_path_factory, kinds, tensors, chunks):
    if not any(chunks):
        chunks.append(1)
    d = tmp_path_factory.mktemp("prop")
    ref = write_reference(d / "ref.gguf", kinds, tensors)
    assert write_ours(d / "ours.gguf", records_of(kinds), tensors, chunk_sizes=chunks) == ref
    assert_same_reading(d / "ours.gguf")


# -- split sets ---------------------------------------------------------------------------------

def write_reference_split(path: Path, kinds, tensors, **split) -> list[Path]:
    w = reference_writer(path, kinds, tensors, **split)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(path)


def write_ours_split(path: Path, records, tensors, max_size=0, max_tensors=0, metadata_only_first=False):
    infos = [i for i, _ in tensors]
    parts = plan_split(infos, max_size, max_tensors, metadata_only_first)
    paths = split_paths(path, len(parts))
    with GGUFSplitWriter(paths, model_kvs(ARCH, records), infos, parts) as w:
        w.write_header()
        for info, data in tensors:
            half = data.nbytes // 2
            w.write_tensor_data(info.name, data.reshape(-1)[:half])
            w.write_tensor_data(info.name, data.reshape(-1)[half:])
            w.end_tensor()
    return paths


SPLITS = [
    dict(split_max_tensors=2),
    dict(split_max_tensors=1),
    dict(split_max_size=700),          # the 1.3 kB tensors go alone; small ones share
    dict(split_max_size=1),
    dict(split_max_size=2000, split_max_tensors=3),
    dict(split_max_tensors=3, small_first_shard=True),
    dict(split_max_tensors=100),       # one part: a plain file without split keys
    dict(split_max_tensors=100, small_first_shard=True),
]


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_split_sets_are_byte_identical_to_gguf_writer(tmp_path, split):
    (tmp_path / "ref").mkdir(), (tmp_path / "ours").mkdir()
    tensors = make_tensors(1)
    ref_paths = write_reference_split(tmp_path / "ref" / "model.gguf", EVERY_KIND, tensors, **split)
    ours = write_ours_split(tmp_path / "ours" / "model.gguf", records_of(EVERY_KIND), tensors,
                            split.get("split_max_size", 0), split.get("split_max_tensors", 0),
                            split.get("small_first_shard", False))
    assert [p.name for p in ours] == [p.name for p in ref_paths]
    for mine, ref in zip(ours, ref_paths):
        assert mine.read_bytes() == ref.read_bytes(), mine.name
        assert_same_reading(mine)
    if len(ours) > 1:
        first, later = read_gguf(ours[0]), [read_gguf(p) for p in ours[1:]]
        assert [kv.key for kv in first.kvs][-3:] == ["split.no", "split.count", "split.tensors.count"]
        assert all([kv.key for kv in c.kvs] == ["split.no", "split.count", "split.tensors.count"] for c in later)
        assert [c.kv("split.no") for c in [first, *later]] == list(range(len(ours)))
        assert sum(len(c.tensors) for c in [first, *later]) == first.kv("split.tensors.count") == len(tensors)


def test_split_names_follow_llama_split_path(tmp_path):
    # llama.cpp: "%s-%05d-of-%05d.gguf" with the part number from 1
    assert [p.name for p in split_paths(tmp_path / "m.gguf", 3)] == \
        ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]
    assert split_paths(tmp_path / "m.gguf", 1) == [tmp_path / "m.gguf"]
    with pytest.raises(GGUFWriterError):
        split_paths(tmp_path / "m.gguf", 0)


def test_plan_split_limits():
    infos = [TensorInfo(f"t{i}", (n,), int(QT.I8), n) for i, n in enumerate([10, 50, 10, 10, 200, 5])]
    assert plan_split(infos) == [[0, 1, 2, 3, 4, 5]]
    assert plan_split(infos, max_size=60) == [[0, 1], [2, 3], [4], [5]]
    assert plan_split(infos, max_tensors=4) == [[0, 1, 2, 3], [4, 5]]
    assert plan_split(infos, max_size=1000, max_tensors=2, metadata_only_first=True) == [[], [0, 1], [2, 3], [4, 5]]


def test_split_keeps_a_custom_alignment_in_every_part(tmp_path):
    kinds = [("general.alignment", 64, VT.UINT32, None)] + EVERY_KIND[:2]
    paths = write_ours_split(tmp_path / "m.gguf", records_of(kinds), make_tensors(2), max_tensors=3)
    assert len(paths) == 3
    for p in paths:
        assert read_gguf(p).alignment == 64 and gguf.GGUFReader(p).alignment == 64


# -- I2_S ----------------------------------------------------------------------------------------

def test_i2s_tensor_layout_matches_a_same_sized_stand_in(tmp_path):
    """An I2_S tensor of n values takes n/4 + 32 bytes. GGUFWriter cannot write type 36, so it
    writes a same-sized I8 stand-in; our file must differ only in that tensor's ne and type."""
    rng = np.random.default_rng(3)
    rows, cols = 4, 256
    i2s_bytes = rows * cols // 4 + 32
    i2s_data = rng.integers(0, 256, i2s_bytes, dtype=np.uint8)
    before, after = make_tensors(4, TENSOR_SPECS[:2]), make_tensors(5, TENSOR_SPECS[2:4])
    standin = (TensorInfo("blk.0.attn_v.weight", (1, i2s_bytes), int(QT.I8), i2s_bytes), i2s_data.reshape(1, -1))
    ref = bytearray(write_reference(tmp_path / "ref.gguf", EVERY_KIND[:4], before + [standin] + after))

    i2s = (TensorInfo("blk.0.attn_v.weight", (rows, cols), I2_S_TYPE, i2s_bytes), i2s_data)
    ours = write_ours(tmp_path / "ours.gguf", records_of(EVERY_KIND[:4]), before + [i2s] + after)

    name = struct.pack("<Q", len(i2s[0].name)) + i2s[0].name.encode()
    at = ref.index(name) + len(name)
    assert struct.unpack_from("<IQQI", ref, at) == (2, i2s_bytes, 1, int(QT.I8))
    struct.pack_into("<IQQI", ref, at, 2, cols, rows, I2_S_TYPE)
    assert ours == bytes(ref)

    c = read_gguf(tmp_path / "ours.gguf")
    t = c.tensors[2]
    assert (t.name, t.shape, t.ggml_type, t.nbytes) == ("blk.0.attn_v.weight", (rows, cols), I2_S_TYPE, i2s_bytes)
    assert ours[t.offset:t.offset + t.nbytes] == i2s_data.tobytes()
    assert all(x.offset % c.alignment == 0 for x in c.tensors)
    assert c.tensors[3].offset == t.offset + -(-i2s_bytes // 32) * 32


def test_gguf_package_cannot_read_or_write_i2s(tmp_path):
    """Why this module exists: gguf 0.19 has no ggml type 36."""
    i2s = (TensorInfo("w", (1, 128), I2_S_TYPE, 64), np.zeros(64, np.uint8))
    write_ours(tmp_path / "i2s.gguf", [], [i2s])
    with pytest.raises(ValueError):
        gguf.GGUFReader(tmp_path / "i2s.gguf")
    with pytest.raises((ValueError, KeyError)):
        gguf.GGUFWriter(tmp_path / "x.gguf", ARCH).add_tensor_info("w", (1, 64), np.dtype(np.uint8), 64,
                                                                    raw_dtype=QT(I2_S_TYPE))


def test_i2s_cut_inside_its_tail_is_refused(tmp_path):
    i2s = (TensorInfo("w", (2, 128), I2_S_TYPE, 96), np.arange(96, dtype=np.uint8))
    data = write_ours(tmp_path / "i2s.gguf", [], [i2s])
    end = read_gguf(tmp_path / "i2s.gguf").tensors[0].offset + 96
    (tmp_path / "cut.gguf").write_bytes(data[:end - 1])
    with pytest.raises(GGUFFormatError, match="cut short"):
        read_gguf(tmp_path / "cut.gguf")


# -- writer misuse ------------------------------------------------------------------------------

def small_writer(tmp_path, **kw):
    infos = [TensorInfo("a", (4,), int(QT.F32), 16), TensorInfo("b", (2,), int(QT.F16), 4)]
    return GGUFFileWriter(tmp_path / "m.gguf", model_kvs(ARCH, []), infos, **kw)


def test_writer_refuses_misuse(tmp_path):
    w = small_writer(tmp_path)
    with pytest.raises(GGUFWriterError, match="header"):
        w.write_tensor_data(0, bytes(4))
    w.write_header()
    with pytest.raises(GGUFWriterError, match="out of order"):
        w.write_tensor_data("b", bytes(4))
    w.write_tensor_data("a", bytes(10))
    with pytest.raises(GGUFWriterError, match="more than"):
        w.write_tensor_data("a", bytes(7))
    with pytest.raises(GGUFWriterError, match="10 of its 16"):
        w.end_tensor()
    w.write_tensor_data(0, bytes(6))
    w.end_tensor()
    with pytest.raises(GGUFWriterError, match="1 of 2"):
        w.close()
    w.abort()


def test_writer_context_closes_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with small_writer(tmp_path) as w:
            w.write_header()
            raise RuntimeError("boom")
    assert w._file is None


@pytest.mark.parametrize("bad", [
    dict(tensors=[TensorInfo("a", (4,), int(QT.F32), 15)]),                       # wrong nbytes
    dict(tensors=[TensorInfo("a", (100,), int(QT.Q8_0), 106)]),                    # not whole blocks
    dict(tensors=[TensorInfo("a", (4,), 0, 16), TensorInfo("a", (4,), 0, 16)]),    # duplicate name
    dict(tensors=[TensorInfo("x" * 64, (4,), 0, 16)]),                             # llama.cpp's name limit
    dict(tensors=[TensorInfo("a", (1, 1, 1, 1, 4), 0, 16)]),                       # > 4 dims
    dict(kvs=[KV("k", VT.UINT32, 1), KV("k", VT.UINT32, 2)]),                       # duplicate key
    dict(kvs=[KV("k", VT.ARRAY, [[1], [2]])]),                                     # nested array
    dict(kvs=[KV("k", VT.ARRAY, [], None)]),                                       # empty, no item type
    dict(kvs=[KV("k", VT.UINT8, 256)]),                                            # out of range
    dict(kvs=[KV("general.alignment", VT.UINT32, 48)]),                            # not a power of two
    dict(kvs=[KV("general.alignment", VT.UINT64, 64)]),                            # llama.cpp needs u32
    dict(kvs=[KV("general.alignment", VT.UINT32, 64)], alignment=32),              # disagrees
])
def test_writer_refuses_what_llama_cpp_cannot_read(tmp_path, bad):
    with pytest.raises(GGUFWriterError):
        w = GGUFFileWriter(tmp_path / "m.gguf", bad.get("kvs", []), bad.get("tensors", []),
                           alignment=bad.get("alignment"))
        w.write_header()


def test_unknown_type_ids_are_written_with_the_callers_size(tmp_path):
    info = TensorInfo("w", (3, 10), 200, 17)
    write_ours(tmp_path / "m.gguf", [], [(info, np.arange(17, dtype=np.uint8))])
    with pytest.raises(GGUFFormatError, match="type id 200"):
        read_gguf(tmp_path / "m.gguf")
    from pipeline.gguf_file import TYPE_SIZES, TypeSize
    c = read_gguf(tmp_path / "m.gguf", type_sizes={**TYPE_SIZES, 200: TypeSize(10, 5, 2)})
    assert c.tensors[0].nbytes == 17


# -- reader robustness --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("valid") / "m.gguf"
    data = write_ours(path, records_of(EVERY_KIND), make_tensors(6))
    return path, data


def refused_quickly(path: Path, data: bytes, match: str | None = None) -> None:
    path.write_bytes(data)
    start = time.process_time()  # CPU, not wall: quick on a loaded machine too
    with pytest.raises(GGUFFormatError, match=match) as e:
        read_gguf(path)
    assert time.process_time() - start < 0.5
    assert isinstance(e.value, UserError) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_truncated_files_are_refused_at_every_cut(tmp_path, valid_file):
    _, data = valid_file
    c = read_gguf(valid_file[0])
    end = c.tensors[-1].offset + c.tensors[-1].nbytes
    cuts = list(range(0, c.data_start + 1)) + list(range(c.data_start, end, 97)) + [end - 1]
    for cut in cuts:
        refused_quickly(tmp_path / "cut.gguf", data[:cut])
    (tmp_path / "ok.gguf").write_bytes(data[:end])          # the last padding is not needed
    assert read_gguf(tmp_path / "ok.gguf").tensors == c.tensors


def patched(data: bytes, at: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt if fmt[0] in "<>" else "<" + fmt, out, at, *values)
    return bytes(out)


def first_tensor_info_at(data: bytes, name: str) -> int:
    enc = struct.pack("<Q", len(name)) + name.encode()
    return data.index(enc) + len(enc)


@pytest.mark.parametrize("case", ["magic", "version", "big_endian", "n_kv", "n_tensors", "key_length",
                                  "array_count", "string_array_count", "value_type", "item_type",
                                  "n_dims", "ne", "ggml_type", "offset", "alignment", "duplicate_key"])
def test_corrupt_headers_are_refused_quickly(tmp_path, valid_file, case):
    _, data = valid_file
    tokens_at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens")
    u8s_at = data.index(b"test.u8_array") + len("test.u8_array")
    ti = first_tensor_info_at(data, TENSOR_SPECS[0][0])
    bad = {
        "magic": lambda: b"GGUX" + data[4:],
        "version": lambda: patched(data, 4, "I", 1),
        "big_endian": lambda: patched(data, 4, ">I", 3),
        "n_kv": lambda: patched(data, 16, "Q", 2**63),
        "n_tensors": lambda: patched(data, 8, "Q", 2**40),
        "key_length": lambda: patched(data, 24, "Q", 2**62),
        "array_count": lambda: patched(data, u8s_at + 8, "Q", 2**61),
        "string_array_count": lambda: patched(data, tokens_at + 8, "Q", 2**60),
        "value_type": lambda: patched(data, tokens_at, "I", 13),
        "item_type": lambda: patched(data, tokens_at + 4, "I", int(VT.ARRAY)),
        "n_dims": lambda: patched(data, ti, "I", 2**31),
        "ne": lambda: patched(data, ti + 4, "Q", 2**63),
        "ggml_type": lambda: patched(data, ti + 4 + 16, "I", 1000),
        "offset": lambda: patched(data, ti + 4 + 16 + 4, "Q", 32),
        "alignment": lambda: b"",   # built below
        "duplicate_key": lambda: b"",
    }
    if case == "alignment":
        kinds = [("general.alignment", 64, VT.UINT32, None)]
        good = write_ours(tmp_path / "a.gguf", records_of(kinds), make_tensors(7, TENSOR_SPECS[:1]))
        at = good.index(b"general.alignment") + len("general.alignment") + 4
        refused_quickly(tmp_path / "bad.gguf", patched(good, at, "I", 48), "power of two")
        return
    if case == "duplicate_key":
        recs = [{"key": "aa", "type": "UINT8", "sub_type": None, "value": 1},
                {"key": "ab", "type": "UINT8", "sub_type": None, "value": 2}]
        good = write_ours(tmp_path / "d.gguf", recs, [])
        refused_quickly(tmp_path / "bad.gguf", good.replace(b"ab", b"aa"), "duplicate")
        return
    refused_quickly(tmp_path / "bad.gguf", bad[case]())


@HYPOTHESIS
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_random_corruption_never_escapes_as_another_error(tmp_path_factory, valid_file, flips):
    path, data = valid_file
    c = read_gguf(path)
    out = bytearray(data)
    for at, byte in flips:
        out[at % c.data_start] = byte
    p = tmp_path_factory.mktemp("flip") / "m.gguf"
    p.write_bytes(bytes(out))
    try:
        read_gguf(p)
    except GGUFFormatError:
        pass


def test_empty_and_tiny_files(tmp_path):
    for data in (b"", b"GGUF", b"GGUF" + bytes(10)):
        refused_quickly(tmp_path / "t.gguf", data)
