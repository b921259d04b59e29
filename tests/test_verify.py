"""`verify` recomputes every tensor from the source and finds any byte that differs.

It compares decoded values with effective weights computed independently, so a bug in a packing
kernel (which its byte recomputation shares) is still found; too small a memory limit is one line;
a split part replaced by a whole file, a whole file named as a part, and a key/value array of
another item type all fail.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.hostile import ERROR, cli
from tests.hostile import fresh, out, pristine  # noqa: F401 (fixtures)


def test_verify_accepts_a_good_file_and_finds_a_flipped_byte(checkpoint, tmp_path):
    model = checkpoint(intermediate_size=320, dtype="f16")  # ffn_down falls back to F16
    out = tmp_path / "m.gguf"
    convert(model, out, "--type", "tq1_0")
    ok = run_cli("verify", out, model)
    assert "OK" in ok.stdout

    reader = gguf.GGUFReader(out)
    target = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    raw = bytearray(out.read_bytes())
    raw[target.data_offset + 7] ^= 0x01
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    proc = run_cli("verify", bad, model, check_exit=1)
    assert "MISMATCH blk.1.attn_v.weight" in proc.stdout
    assert proc.stdout.count("MISMATCH") == 1


def test_verify_against_another_checkpoint_fails(checkpoint, tmp_path):
    model, other = checkpoint(seed=1), checkpoint(seed=2)
    out = tmp_path / "m.gguf"
    convert(model, out)
    proc = run_cli("verify", out, other, check_exit=1)
    assert proc.stdout.count("MISMATCH") >= 20


def packed(tmp_path, family="llama3-1.58"):
    from tests.synthetic import write_checkpoint

    return write_checkpoint(tmp_path / family, family, hidden_size=256, intermediate_size=512, num_layers=1,
                            num_heads=4, num_kv_heads=2)


def flip(path, offset, out):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    out.write_bytes(bytes(raw))
    return out


def kv_value_offset(path, key):
    """Byte offset of the value of `key` in a GGUF (found by its encoded name)."""
    raw = path.read_bytes()
    name = len(key).to_bytes(8, "little") + key.encode()
    return raw.index(name) + len(name) + 4  # after the u32 value type


@pytest.mark.parametrize("family,out_type", [("llama3-1.58", "tq2_0"), ("2b4t", "i2_s"), ("falcon3-1.58", "i2_s"),
                                             ("2b4t-bf16", "tq1_0"), ("bonsai", "q2_0"),
                                             ("falcon-e-prequantized", "q2_0")])
def test_verify_every_family_and_type(tmp_path, family, out_type):
    model = packed(tmp_path, family)
    out = tmp_path / "m.gguf"
    convert(model, out, "--type", out_type, "--embedding-type", "q8_0")
    assert "OK" in run_cli("verify", out, model).stdout


@pytest.fixture(scope="module")
def packed_converted(tmp_path_factory):
    """A packed checkpoint and its default conversion, made once for the tests that only read them."""
    root = tmp_path_factory.mktemp("packed")
    model = packed(root)
    convert(model, root / "m.gguf")
    return model, root / "m.gguf"


@pytest.mark.parametrize("key", ["llama.embedding_length", "llama.rope.freq_base", "tokenizer.ggml.tokens",
                                 "general.file_type", "tokenizer.ggml.bos_token_id"])
def test_verify_finds_a_flipped_byte_in_the_key_values(packed_converted, tmp_path, key):
    model, out = packed_converted
    offset = kv_value_offset(out, key) + (8 + 4 + 8 + 2 if key == "tokenizer.ggml.tokens" else 0)
    bad = flip(out, offset, tmp_path / "bad.gguf")
    proc = run_cli("verify", bad, model, check_exit=None)
    assert proc.returncode in (1, 2) and "OK" not in proc.stdout, proc.stdout + proc.stderr


def test_verify_finds_a_changed_block_scale_of_a_group_scaled_tensor(tmp_path):
    """Q2_0 of a group-scaled checkpoint: each 64-value block has its own scale, checked too."""
    from pipeline.gguf_file import read_gguf

    model = packed(tmp_path, "bonsai")
    out = tmp_path / "m.gguf"
    convert(model, out, "--type", "q2_0")
    t = next(t for t in read_gguf(out).tensors if t.name == "blk.0.ffn_up.weight")
    bad = flip(out, t.offset + 18 * 3 + 1, tmp_path / "bad.gguf")  # the fp16 d of the 4th block
    proc = run_cli("verify", bad, model, check_exit=None)
    assert proc.returncode == 1 and "blk.0.ffn_up.weight: bytes differ" in proc.stdout + proc.stderr


def test_verify_finds_trailing_bytes_and_a_wrong_i2s_scale(tmp_path):
    from pipeline.gguf_file import read_gguf

    model = packed(tmp_path, "2b4t")
    out = tmp_path / "m.gguf"
    convert(model, out, "--type", "i2_s")
    longer = tmp_path / "longer.gguf"
    longer.write_bytes(out.read_bytes() + b"garbage")
    proc = run_cli("verify", longer, model, check_exit=1)
    assert "byte(s) after the last tensor" in proc.stdout

    t = next(t for t in read_gguf(out).tensors if t.name == "blk.0.ffn_up.weight")
    bad = flip(out, t.offset + t.nbytes - 32, tmp_path / "scale.gguf")  # first byte of the float32 scale
    proc = run_cli("verify", bad, model, check_exit=1)
    assert "MISMATCH blk.0.ffn_up.weight: the I2_S scale" in proc.stdout


def test_verify_a_split_set_from_any_part(tmp_path):
    model = packed(tmp_path)
    out = tmp_path / "m.gguf"
    convert(model, out, "--split-max-tensors", "4")
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) == 3
    for p in parts:
        assert "3 file(s)" in run_cli("verify", p, model).stderr
    parts[1].unlink()
    proc = run_cli("verify", parts[0], model, check_exit=2)
    assert "missing" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_verify_a_float_type_file_with_metadata_overrides(checkpoint, tmp_path, out_type):
    """--type f16 / q8_0 files and --metadata / --model-name: verify recomputes them when told the
    same options, and finds the overrides missing when not."""
    import json

    model = checkpoint(dtype="f16")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"general.author": "Someone", "general.tags": ["x"]}))
    out = tmp_path / "m.gguf"
    convert(model, out, "--type", out_type, "--metadata", meta, "--model-name", "Named")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == out_type.upper()
    assert "OK" in run_cli("verify", out, model, "--metadata", meta, "--model-name", "Named").stdout
    proc = run_cli("verify", out, model, check_exit=1)
    assert "general.author" in proc.stdout and "general.name is 'Named'" in proc.stdout


@pytest.mark.parametrize("kernel", ["i2_s codes", "bf16 to f16", "tq2_0 block scale"])
def test_verify_does_not_trust_the_kernels_that_wrote_the_file(fresh, out, monkeypatch, kernel):
    """A bug in a packing kernel is in the converter and in verify's byte recomputation alike
    (both run here with the bug); the values decoded from the file still differ from the
    checkpoint's, and verify says so."""
    import pipeline.codecs.base
    import pipeline.codecs.bitnet_cpp
    import pipeline.codecs.ggml

    model = fresh("llama3-1.58")
    extra = ()
    if kernel == "i2_s codes":  # bit pairs not reversed: every code lands in another column
        monkeypatch.setattr(pipeline.codecs.bitnet_cpp, "_I2S_FROM_CODE_BYTE", np.arange(256, dtype=np.uint8))
        extra, victim = ("--type", "i2_s"), "blk.0.attn_q.weight"
    elif kernel == "bf16 to f16":  # one value in 16 loses its sign
        table = pipeline.codecs.ggml._F16_FROM_BF16.copy()
        table[::16] ^= np.uint16(0x8000)
        monkeypatch.setattr(pipeline.codecs.ggml, "_F16_FROM_BF16", table)
        victim = "token_embd.weight"
    else:  # the fp16 d of a block rounded the wrong way by a few ulps
        real = pipeline.codecs.base._fp16_bytes
        monkeypatch.setattr(pipeline.codecs.base, "_fp16_bytes",
                            lambda s: (real(s).view("<f2") * np.float16(1.01)).astype("<f2").view(np.uint8))
        victim = "blk.0.attn_q.weight"
    assert cli("convert", model, "-o", out, "--no-progress", *extra).returncode == 0
    proc = cli("verify", out, model)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"MISMATCH {victim}: values differ" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def converted_once(pristine, tmp_path_factory):
    """The packed checkpoint's default conversion, made once: the tests below only read the checkpoint."""
    out = tmp_path_factory.mktemp("converted") / "m.gguf"
    convert(pristine["llama3-1.58"], out)
    return pristine["llama3-1.58"], out


@pytest.fixture
def converted(converted_once, out):
    """(the checkpoint, the test's own copy of its converted file, in a directory of the user's files)."""
    model, done = converted_once
    shutil.copyfile(done, out)
    return model, out


@pytest.mark.parametrize("limit", ["1MiB", "30MiB"])
def test_verify_with_too_small_a_memory_limit_is_one_line(converted, limit):
    model, out = converted
    proc = run_cli("verify", out, model, "--memory-limit", limit, check_exit=2)
    assert proc.stderr.startswith(ERROR) and proc.stderr.count("\n") == 1, proc.stderr
    assert "--memory-limit" in proc.stderr or "memory" in proc.stderr
    assert not proc.stdout


@pytest.mark.parametrize("which", [0, 1])
def test_verify_of_a_split_set_with_a_part_replaced_by_a_whole_file_fails(converted, which):
    model, out = converted
    convert(model, out.with_name("s.gguf"), "--split-max-tensors", "4", "--workdir", out.parent / "w-split")
    parts = sorted(out.parent.glob("s-*-of-*.gguf"))
    assert len(parts) == 3
    for p in parts:
        assert "OK" in run_cli("verify", p, model).stdout
    shutil.copyfile(out, parts[which])  # the whole single file under a part's name
    for p in parts:
        proc = run_cli("verify", p, model, check_exit=None)
        assert proc.returncode == 1 and "OK" not in proc.stdout, (p, proc.stdout, proc.stderr)


def test_verify_of_a_whole_file_named_as_a_part_fails(converted):
    model, out = converted
    named = out.with_name("s-00001-of-00002.gguf")
    shutil.copyfile(out, named)
    proc = run_cli("verify", named, model, check_exit=1)
    assert "part 1 of a 2-part split set" in proc.stdout


def _array_item_type_offset(path: Path, key: str) -> int:
    raw = path.read_bytes()
    name = len(key).to_bytes(8, "little") + key.encode()
    at = raw.index(name) + len(name)
    assert int.from_bytes(raw[at:at + 4], "little") == 9  # ARRAY
    return at + 4


@pytest.mark.parametrize("key,item_type", [("tokenizer.ggml.token_type", 4),   # INT32 -> UINT32, same values
                                           ("tokenizer.ggml.token_type", 6)])  # -> FLOAT32, other values
def test_verify_finds_a_key_value_array_of_another_item_type(converted, tmp_path, key, item_type):
    model, out = converted
    raw = bytearray(out.read_bytes())
    at = _array_item_type_offset(out, key)
    assert int.from_bytes(raw[at:at + 4], "little") == 5  # INT32, as llama.cpp's converter writes it
    raw[at:at + 4] = item_type.to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    proc = run_cli("verify", bad, model, check_exit=1)
    assert f"MISMATCH m.gguf: {key}" in proc.stdout.replace("bad.gguf", "m.gguf"), proc.stdout
