"""The adversarial sweep of issue 17, classes 1-4 and 11: wrong files with exit 0, and verify.

Same conventions as tests/test_hostile.py (whose helpers and checkpoints this reuses): a
refusal is exit 2 with one stderr line naming the tensor or file, and nothing outside the
run directory changes. Classes (issue 17 numbering):
  1 scales an output type holds only as a subnormal (a TQ block's fp16 d, I2_S's float32),
    and `verify` comparing decoded values with effective weights computed independently
  2 float values a float output type cannot hold as finite numbers, for every float type
  3 a finished output that changed (another file of the same size, a flipped byte) with its
    mtime restored is not "already done"
  4 damage inside an interrupted (not yet sealed) store is refused, not sealed and assembled
 11 verify: a memory limit too small (one line), a split part replaced by a whole file, a
    key/value array of another item type
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.test_hostile import ERROR, SHAPE, cli, fresh, model, one_line, out, pristine, refuse, set_values  # noqa: F401

UP = "model.layers.0.mlp.up_proj.weight_scale"


def tensor_values(path: Path, name: str) -> np.ndarray:
    """The values of one tensor of a GGUF file, decoded by gguf's own reader."""
    import gguf

    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)


# == 1. scales an output type holds only as a subnormal ==========================================

@pytest.mark.parametrize("family,weight_scale", [
    ("llama3-1.58", 1e6),    # BitLinear divides: a scale of 1e-6, an fp16 subnormal (3% off)
    ("llama3-1.58", 3e4),    # 3.3e-5: just below fp16's smallest normal, 6.1e-5
    ("2b4t", 1e-7),          # AutoBitLinear multiplies: 1e-7 is 19% off as an fp16
    ("2b4t", 5e-5),
])
@pytest.mark.parametrize("out_type", ["tq2_0", "tq1_0"])
def test_a_packed_scale_fp16_holds_only_as_a_subnormal_is_refused_before_any_work(fresh, out, family,
                                                                                  weight_scale, out_type):
    model = fresh(family)
    set_values(model / "model.safetensors", UP, lambda v: np.full_like(v, weight_scale))
    line = refuse(model, out, "ffn_up", "i2_s", extra=("--type", out_type))
    assert "fp16" in line


@pytest.mark.parametrize("family,weight_scale", [("llama3-1.58", 1e6), ("2b4t", 1e-7)])
def test_the_same_scale_converts_exactly_as_i2_s(fresh, out, family, weight_scale):
    model = fresh(family)
    set_values(model / "model.safetensors", UP, lambda v: np.full_like(v, weight_scale))
    convert(model, out, "--type", "i2_s")
    assert "OK" in run_cli("verify", out, model).stdout


@pytest.mark.parametrize("family,weight_scale", [("llama3-1.58", 3e38), ("2b4t", 1e-39), ("2b4t", 1e-38)])
@pytest.mark.parametrize("out_type", ["i2_s", "tq2_0"])
def test_a_scale_float32_holds_only_as_a_subnormal_is_refused_for_every_type(fresh, out, family, weight_scale,
                                                                             out_type):
    """1 / 3e38 = 3.3e-39 and 1e-39 are float32 subnormals: I2_S's float32 scale would lose bits."""
    model = fresh(family)
    set_values(model / "model.safetensors", UP, lambda v: np.full_like(v, weight_scale))
    refuse(model, out, "ffn_up", extra=("--type", out_type))


@pytest.mark.parametrize("absmean", [2e-5, 5e-5])
def test_tiny_master_weights_are_refused_for_tq_and_convert_as_i2_s(fresh, out, absmean):
    """mean |W| of 2e-5 gives a scale fp16 holds only as a subnormal; i2_s holds it."""
    model = fresh("1bitllm-f32")
    name = "model.layers.0.self_attn.o_proj.weight"
    set_values(model / "model.safetensors", name, lambda v: v * np.float32(absmean / np.abs(v).mean()))
    line = refuse(model, out, "attn_output", "i2_s", in_data=True)
    assert "fp16" in line
    convert(model, out, "--type", "i2_s", "--workdir", out.parent / "w-i2s")
    assert "OK" in run_cli("verify", out, model).stdout


@pytest.mark.parametrize("out_type", ["tq2_0", "i2_s"])
def test_tiny_master_weights_written_as_an_f16_fallback_are_refused_for_every_type(tmp_path, out, out_type):
    """ffn_down's rows of 320 values are not whole blocks of any ternary type: it is F16 in every
    --type, and F16 holds a scale of 2e-5 only as a subnormal; i2_s is no way out, so not suggested."""
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "m320", "1bitllm", dtype="f32", **{**SHAPE, "intermediate_size": 320})
    name = "model.layers.0.mlp.down_proj.weight"
    set_values(model / "model.safetensors", name, lambda v: v * np.float32(2e-5 / np.abs(v).mean()))
    line = refuse(model, out, "ffn_down", "F16", extra=("--type", out_type), in_data=True)
    assert "i2_s" not in line


def test_verify_finds_a_file_whose_tq_block_scale_is_subnormal(fresh, out, monkeypatch):
    """A file written without the scale check (as an older converter, or llama.cpp's, writes it):
    its bytes are what the kernels make of the checkpoint, but its values are 3% off; verify
    compares values with the effective weights and fails."""
    import stages.pack

    model = fresh("llama3-1.58")
    set_values(model / "model.safetensors", UP, lambda v: np.full_like(v, 1e6))
    import pipeline.plan

    monkeypatch.setattr(stages.pack, "check_scale", lambda *a: None)
    monkeypatch.setattr(pipeline.plan, "check_scale", lambda *a: None)
    assert cli("convert", model, "-o", out, "--no-progress").returncode == 0
    d = np.abs(tensor_values(out, "blk.0.ffn_up.weight"))
    assert d.max() > 0 and abs(d.max() / 1e-6 - 1) > 0.01  # the file does hold wrong values
    monkeypatch.undo()
    proc = run_cli("verify", out, model, check_exit=1)
    assert "MISMATCH blk.0.ffn_up.weight: values differ" in proc.stdout, proc.stdout
    assert proc.stdout.count("MISMATCH") == 1


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


# == 2. float values a float output type cannot hold =============================================

@pytest.mark.parametrize("value", [3.4e38, -3.4028e38, 3.397e38])
def test_values_beyond_bf16s_range_are_refused_for_a_bf16_embedding(fresh, out, value):
    """float32 values above bf16's largest (3.3895e38) round to infinity in BF16."""
    model = fresh("1bitllm-f32")
    name = "model.embed_tokens.weight"

    def big(values):
        values[5, 11] = value
        return values
    set_values(model / "model.safetensors", name, big)
    line = refuse(model, out, name, "BF16", "f32", extra=("--embedding-type", "bf16"), in_data=True)
    assert "bf16 or" not in line  # bf16 would not help
    if value == 3.4e38:
        convert(model, out, "--embedding-type", "f32", "--workdir", out.parent / "w-f32")
        assert "OK" in run_cli("verify", out, model).stdout


@pytest.mark.parametrize("kind,etype,value", [("1bitllm-f32", "f16", 65520.0), ("llama3-1.58", "f16", 3.38e38),
                                              ("1bitllm-f32", "q8_0", 8.35e6), ("2b4t", "q8_0", 3.3e38)])
def test_values_beyond_f16_and_q8_0_are_refused(fresh, out, kind, etype, value):
    model = fresh(kind)
    name = "model.embed_tokens.weight"

    def big(values):
        values[2, 3] = -value
        return values
    set_values(model / "model.safetensors", name, big)
    refuse(model, out, name, extra=("--embedding-type", etype), in_data=True)


@pytest.mark.parametrize("kind,etype,value", [("1bitllm-f32", "f16", 65519.0), ("1bitllm-f32", "q8_0", 8.3e6),
                                              ("1bitllm-f32", "bf16", 3.3895e38)])
def test_values_a_float_type_rounds_to_its_largest_convert_and_verify(fresh, out, kind, etype, value):
    """65519 is F16's 65504 after rounding, and 3.3895e38 BF16's largest: finite, so written."""
    model = fresh(kind)
    name = "model.embed_tokens.weight"

    def big(values):
        values[1, 1] = value
        return values
    set_values(model / "model.safetensors", name, big)
    convert(model, out, "--embedding-type", etype)
    assert np.isfinite(tensor_values(out, "token_embd.weight")).all()
    assert "OK" in run_cli("verify", out, model).stdout


def test_verify_finds_non_finite_values_a_file_holds(fresh, out, monkeypatch):
    """A BF16 embedding with an infinity (written without the range check): verify fails it."""
    import pipeline.runner

    model = fresh("1bitllm-f32")
    set_values(model / "model.safetensors", "model.embed_tokens.weight", lambda v: np.where(v > 0.05, 3.4e38, v))
    monkeypatch.setattr(pipeline.runner, "check_float_ranges", lambda *a: None)
    assert cli("convert", model, "-o", out, "--no-progress", "--embedding-type", "bf16").returncode == 0
    assert not np.isfinite(tensor_values(out, "token_embd.weight")).all()
    monkeypatch.undo()
    proc = run_cli("verify", out, model, check_exit=1)
    assert "MISMATCH token_embd.weight: values differ" in proc.stdout, proc.stdout


# == 3. the finished output is judged by what it is, not by its size and mtime ==================

def _flip_keeping_mtime(path: Path, offset: int) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_keeping_mtime(path: Path, content: bytes) -> None:
    st = os.stat(path)
    tmp = path.with_name("other.tmp")
    tmp.write_bytes(content)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)


@pytest.mark.parametrize("how", ["flip a tensor byte", "flip a header byte", "another gguf of the same size",
                                 "zeros after the magic"])
def test_a_changed_output_with_its_mtime_restored_is_written_again(fresh, out, how):
    model = fresh("llama3-1.58")
    convert(model, out)
    clean = out.read_bytes()
    if how == "flip a tensor byte":
        _flip_keeping_mtime(out, len(clean) - 100)
    elif how == "flip a header byte":
        _flip_keeping_mtime(out, 40)
    elif how == "another gguf of the same size":  # converted from another checkpoint, same shapes
        other = fresh("llama3-1.58", name="other")
        set_values(other / "model.safetensors", UP, lambda v: v * np.float32(2))
        convert(other, out.parent / "o.gguf", "--workdir", out.parent / "w-other")
        content = (out.parent / "o.gguf").read_bytes()
        assert len(content) == len(clean) and content != clean
        _replace_keeping_mtime(out, content)
    else:
        _replace_keeping_mtime(out, b"GGUF" + bytes(len(clean) - 4))  # a GGUF by its magic, so no --force
    assert out.read_bytes() != clean and out.stat().st_size == len(clean)
    rerun = convert(model, out)
    assert "assemble: already done" not in rerun.stderr
    assert out.read_bytes() == clean
    if how == "flip a tensor byte":  # and an unchanged output still is "already done"
        assert "assemble: already done" in convert(model, out).stderr


def test_a_changed_part_of_a_split_set_is_written_again(fresh, out):
    model = fresh("llama3-1.58")
    convert(model, out, "--split-max-tensors", "4")
    parts = sorted(out.parent.glob("m-*-of-*.gguf"))
    assert len(parts) == 3
    clean = [p.read_bytes() for p in parts]
    _flip_keeping_mtime(parts[1], parts[1].stat().st_size - 10)
    rerun = convert(model, out, "--split-max-tensors", "4")
    assert "assemble: already done" not in rerun.stderr
    assert [p.read_bytes() for p in parts] == clean


# == 4. damage inside an interrupted store =======================================================

LATER = {"extract": ("quantize", "pack", "assemble"), "quantize": ("pack", "assemble"), "pack": ("assemble",)}


def interrupted_in(work: Path, stage: str, rng: random.Random) -> list[Path]:
    """Make a finished run directory look like one whose run was killed inside `stage`: its
    store unsealed, some of its chunks not yet written (chunk file and record gone), later
    stages not started. Returns the chunk files still there."""
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"][stage]["state"] = "running"
    for later in LATER[stage]:
        manifest["stages"].pop(later, None)
        (work / f"{later}.checksums.json").unlink(missing_ok=True)
        shutil.rmtree(work / f"{later}.zarr", ignore_errors=True)
    (work / f"{stage}.checksums.json").unlink()
    (work / "manifest.json").write_text(json.dumps(manifest))
    store = work / f"{stage}.zarr"
    chunks = sorted(p for p in store.rglob("*") if p.is_file() and "/c/" in str(p) and not p.name.endswith(".json"))
    for victim in rng.sample(chunks, len(chunks) // 3):
        rel = victim.relative_to(store).parts
        at = len(rel) - 1 - rel[::-1].index("c")
        (store.joinpath(*rel[:at]) / "digests" / rel[at + 1]).unlink(missing_ok=True)
        victim.unlink()
    return [p for p in chunks if p.exists() and p.stat().st_size > 1]


@pytest.mark.parametrize("stage", ["extract", "quantize", "pack"])
@pytest.mark.parametrize("how", ["flip", "swap"])
def test_damage_inside_an_interrupted_store_is_refused_not_sealed(fresh, out, stage, how):
    model = fresh("llama3-1.58")
    work = out.parent / "work"
    convert(model, out, "--workdir", work)
    clean = out.read_bytes()
    out.unlink()
    rng = random.Random(f"{stage}-{how}")
    remaining = interrupted_in(work, stage, rng)
    victim = rng.choice(remaining)
    raw = victim.read_bytes()
    if how == "flip":
        damaged = bytearray(raw)
        damaged[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    else:  # another chunk's bytes of the same size (another tensor's, or another row range's)
        same = [p for p in remaining if p != victim and p.stat().st_size == len(raw) and p.read_bytes() != raw]
        damaged = rng.choice(same).read_bytes()
    victim.unlink()  # a new file: a hard link would carry the change into the store it came from
    victim.write_bytes(bytes(damaged))
    proc = convert(model, out, "--workdir", work, check_exit=2)
    line = one_line(proc, after_log=True)
    assert "damaged" in line and "delete it" in line and str(victim) in line, line
    assert not out.exists() and not list(out.parent.glob(".*.partial"))
    if (stage, how) == ("pack", "flip"):  # the advice works: a new run directory converts to the clean bytes
        convert(model, out, "--workdir", out.parent / "new")
        assert out.read_bytes() == clean


def test_a_foreign_chunk_in_an_interrupted_store_is_refused(fresh, out):
    model = fresh("llama3-1.58")
    work = out.parent / "work"
    convert(model, out, "--workdir", work)
    out.unlink()
    remaining = interrupted_in(work, "pack", random.Random(7))
    planted = remaining[0].parent / "99"
    planted.write_bytes(remaining[0].read_bytes())
    line = one_line(convert(model, out, "--workdir", work, check_exit=2), after_log=True)
    assert "damaged" in line and "99" in line
    assert not out.exists()


def test_an_interrupted_store_without_damage_resumes_and_rewrites_nothing_recorded(fresh, out):
    model = fresh("llama3-1.58")
    work = out.parent / "work"
    convert(model, out, "--workdir", work)
    clean = out.read_bytes()
    out.unlink()
    remaining = interrupted_in(work, "quantize", random.Random(3))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in remaining}
    convert(model, out, "--workdir", work)
    assert out.read_bytes() == clean
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in remaining} == before


# == 11. verify ==================================================================================

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


def test_a_chunk_linked_again_after_an_interruption_leaves_no_temporary_file(tmp_path):
    """A kill between a chunk's link and its record: the rerun links the same file again, and
    rename() between two links of one file does nothing (the randomized kill test found the
    leftover .partial)."""
    import zarr

    from pipeline.stores import chunk_path, digest_path, link_chunk, written_chunks

    src = zarr.create_array(tmp_path / "a", shape=(8, 4), chunks=(4, 4), dtype="f4", compressors=None,
                            fill_value=0)
    dst = zarr.create_array(tmp_path / "b", shape=(8, 4), chunks=(4, 4), dtype="f4", compressors=None,
                            fill_value=0)
    src[:] = np.arange(32, dtype="f4").reshape(8, 4)
    link_chunk(src, dst, 0)
    digest_path(dst, 0).unlink()  # as if killed before the record was written
    assert written_chunks(dst) == set()
    link_chunk(src, dst, 0)
    assert sorted(p.name for p in chunk_path(dst, 0).parent.iterdir()) == ["0"]
    assert written_chunks(dst) == {0}
