"""tests/gguf_kv.py reads a GGUF file's key/values and tensors exactly as gguf-py's GGUFReader gives them.

The tests that read a vocabulary of a few hundred thousand strings (test_vocab.py's Llama 3
vocabulary, test_vocab_memory.py's 2^18 tokens) use it instead of GGUFReader, which takes
20-25 s of CPU on each; here both read files of every value type, written by gguf-py's own writer
(every scalar and array type, empty, non-ASCII and long strings; it writes no empty array) and by the converter (the
vocabulary of each tokenizer kind with its scores, types and merges; whole conversions with
ternary, float and 8-bit tensors), and must agree on every key, value, type and order, and on every
tensor's name, type, shape, size and bytes. (test_index.py reads its 32k-vocabulary files with it.)
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from tests.conftest import run_cli, shared_checkpoint
from tests.gguf_kv import read_kv, read_tensors

T = gguf.GGUFValueType


def by_gguf_py(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def same(path) -> None:
    ours, theirs = read_kv(path), by_gguf_py(path)
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key] == value and type(ours[key]) is type(value), key
        if isinstance(value, list):
            assert [type(v) for v in ours[key]] == [type(v) for v in value], key


def test_every_value_type_of_gguf_py_s_writer(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "kinds.gguf"
    w = gguf.GGUFWriter(path, "llama")
    scalars = {T.UINT8: 255, T.INT8: -128, T.UINT16: 65535, T.INT16: -32768, T.UINT32: 2**32 - 1, T.INT32: -2**31,
               T.FLOAT32: 0.1, T.UINT64: 2**64 - 1, T.INT64: -2**63, T.FLOAT64: 1e-300, T.BOOL: True}
    for kind, value in scalars.items():
        w.add_key_value(f"test.scalar.{kind.name.lower()}", value, kind)
        w.add_key_value(f"test.array.{kind.name.lower()}", [value, value, 0] if kind != T.BOOL else [True, False],
                        T.ARRAY, sub_type=kind)
    w.add_key_value("test.floats", rng.standard_normal(1000).astype(np.float32).tolist(), T.ARRAY, sub_type=T.FLOAT32)
    w.add_string("test.string", "héllo, wörld ✓ \U0001F600")
    w.add_string("test.empty", "")
    w.add_key_value("test.strings", ["", "a", "Ġthe", "\n", "✓" * 300, "x" * 70000], T.ARRAY, sub_type=T.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    same(path)


@pytest.mark.parametrize("family", ["1bitllm", "llama3-1.58"])  # SentencePiece, and BPE with merges
def test_the_converters_vocabulary(tmp_path_factory, tmp_path, family):
    model = shared_checkpoint(tmp_path_factory, family, hidden_size=256, intermediate_size=512, num_layers=1,
                              num_heads=4)
    out = tmp_path / "v.gguf"
    run_cli("convert", model, "--vocab-only", "-o", out, "--no-progress")
    kv = read_kv(out)
    assert len(kv["tokenizer.ggml.tokens"]) > 256 and ("tokenizer.ggml.merges" in kv) == (family != "1bitllm")
    same(out)


def test_a_file_that_is_not_gguf_or_runs_short_is_refused(tmp_path):
    path = tmp_path / "short.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_key_value("test.strings", ["abc"] * 100, T.ARRAY, sub_type=T.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) - 2])
    with pytest.raises(ValueError):
        read_kv(path)
    path.write_bytes(b"GGML" + raw[4:])
    with pytest.raises(ValueError):
        read_kv(path)


@pytest.mark.parametrize("options", [("--type", "tq2_0", "--embedding-type", "bf16"),
                                     ("--type", "tq1_0", "--embedding-type", "q8_0")])
def test_the_converters_tensors(tmp_path_factory, tmp_path, options):
    model = shared_checkpoint(tmp_path_factory, "1bitllm", hidden_size=256, intermediate_size=512, num_layers=1,
                              num_heads=4)
    out = tmp_path / "m.gguf"
    run_cli("convert", model, "-o", out, "--no-progress", *options)
    same(out)
    ours = read_tensors(out)
    theirs = gguf.GGUFReader(out).tensors
    assert list(ours) == [t.name for t in theirs] and len({t.tensor_type for t in theirs}) >= 3
    for t in theirs:
        mine = ours[t.name]
        assert (mine.tensor_type, mine.shape, mine.n_bytes) == (t.tensor_type, t.shape.tolist(), t.n_bytes), t.name
        assert mine.data == bytes(t.data.view(np.uint8).reshape(-1)), t.name
