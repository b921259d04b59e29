"""extract indexes the checkpoint instead of copying it, and every read of those bytes is guarded.

extract.zarr holds each tensor's metadata and a `source_ref` (file, offset, identity), plus
the per-row side arrays; zarr opens the store with data through extract.refs.json beside it
(a kerchunk reference set, read by fsspec). The later stages read the checkpoint through the reference:
a file that changed under a run is refused, between runs it makes the rerun start over, and
`status` / `inspect` say when the files are gone or changed. The bytes are compared with the
safetensors files parsed here by hand (8-byte length, JSON header, raw bytes).
"""
from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests import kill_points as kp
from tests.conftest import ROOT, convert, run_cli
from tests.gguf_kv import read_tensors


def tensors_by_hand(path: Path) -> dict[str, tuple[str, list, bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor of one safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items()}


def move_to_end(path: Path, name: str) -> None:
    """Rewrite a safetensors file with tensor `name`'s bytes last (its edge chunk then runs past
    the end of the file)."""
    tensors = tensors_by_hand(path)
    order = [k for k in tensors if k != name] + [name]
    header, offset = {}, 0
    for k in order:
        dtype, shape, data = tensors[k]
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(tensors[k][2] for k in order))


def chunk_files(array_dir: Path) -> list[Path]:
    return [p for p in (array_dir / "c").rglob("*") if p.is_file()] if (array_dir / "c").is_dir() else []


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A bf16 master checkpoint whose embedding (several chunks, the last one short) is the
    file's last tensor, converted with BF16 embeddings (bytes no stage changes)."""
    from tests.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("index")
    model = write_checkpoint(root / "m", "1bitllm", hidden_size=256, intermediate_size=512, num_layers=2,
                             num_heads=4, vocab_size=32768 + 64, dtype="bf16")
    move_to_end(model / "model.safetensors", "model.embed_tokens.weight")
    out, work = root / "m.gguf", root / "work"
    convert(model, out, "--workdir", work, "--memory-limit", "256MiB", "--embedding-type", "bf16")
    return model, out, work


def test_extract_writes_no_tensor_bytes_and_zarr_reads_them_from_the_checkpoint(converted):
    from pipeline.stores import open_store, open_with_refs

    model, out, work = converted
    source = tensors_by_hand(model / "model.safetensors")
    store = work / "extract.zarr"
    local = open_store(store, "r")
    names = local.attrs["tensor_order"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in the store that zarr cannot take for a member
        members = set(local.array_keys())
    assert set(names) <= members
    embd = local["token_embd.weight"]
    assert embd.shape[0] % embd.chunks[0] and embd.shape[0] > embd.chunks[0], "want an edge chunk at the file's end"
    for name in names:
        assert not chunk_files(store / name), f"extract copied {name}"
    sides = [n for n in members if n.endswith((".abs_sums", ".abs_max"))]
    assert sides and all(chunk_files(store / n) for n in sides)
    weights = sum(len(b) for *_, b in source.values())
    held = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert held < weights / 4, (held, weights)
    # zarr itself, through the reference file, reads every tensor's bytes from the checkpoint
    viewed = open_with_refs(store)
    for name in names:
        dtype, shape, data = source[local[name].attrs["hf_name"]]
        values = viewed[name][...]
        assert list(values.shape) == shape and values.tobytes() == data, name
    for name in sides:
        assert np.array_equal(viewed[name][...], local[name][...]), name
    assert (store / "token_embd.weight" / f"padded-chunk.{embd.shape[0] // embd.chunks[0]}").is_file()


def test_bytes_no_stage_changes_go_from_the_checkpoint_to_the_gguf(converted):
    import gguf

    model, out, work = converted
    source = tensors_by_hand(model / "model.safetensors")
    for stage in ("quantize", "pack"):
        assert not chunk_files(work / f"{stage}.zarr" / "token_embd.weight"), f"{stage} copied the embedding"
    embd = read_tensors(out)["token_embd.weight"]  # gguf-py's reading (tests/gguf_kv.py)
    assert embd.tensor_type == gguf.GGMLQuantizationType.BF16
    assert embd.data == source["model.embed_tokens.weight"][2]
    run_cli("verify", out, model)


@pytest.mark.parametrize("embedding_type", ["f16", "f32"])
def test_a_float_matrix_in_another_float_type_is_converted_by_assemble_from_the_checkpoint(converted, tmp_path,
                                                                                         embedding_type):
    """A BF16 embedding written as F16 (the default) or F32: pack.zarr holds no copy of it (the
    largest part of a packed checkpoint's run directory); assemble converts the checkpoint's
    rows chunk by chunk, and the bytes are numpy's conversion of the bf16 values, read by hand;
    `inspect` reads the converted bytes back through the store."""
    model = converted[0]
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    convert(model, out, "--workdir", work, "--memory-limit", "256MiB", "--embedding-type", embedding_type)
    assert not chunk_files(work / "pack.zarr" / "token_embd.weight"), "pack copied the embedding"
    dtype, shape, raw = tensors_by_hand(model / "model.safetensors")["model.embed_tokens.weight"]
    assert dtype == "BF16"
    values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    want = values.astype("<f2" if embedding_type == "f16" else "<f4")
    embd = read_tensors(out)["token_embd.weight"]  # gguf-py's reading (tests/gguf_kv.py)
    assert embd.data == want.tobytes()
    report = json.loads(run_cli("inspect", work, "token_embd.weight", "--json").stdout)
    assert report["stores"]["pack"]["in_checkpoint"], report["stores"]["pack"]
    from pipeline.stores import open_store, read_rows

    arr = open_store(work / "pack.zarr", "r")["token_embd.weight"]
    assert read_rows(arr, 3, 9).tobytes() == want[3:9].tobytes()


@pytest.mark.parametrize("out_type", ["tq2_0", "i2_s"])
def test_tq2_0_and_i2_s_projections_are_quantizes_codes_encoded_by_assemble(converted, tmp_path, out_type):
    """TQ2_0 and I2_S bytes are a copy or a byte lookup of quantize's 2-bit codes: pack.zarr's
    chunk files are quantize's (the same files, no second copy), assemble encodes them as it
    writes, and the file's bytes decode (gguf's dequantizer; the tests' I2_S reader) to quantize's
    codes times the tensor's scale; read_rows of the pack array gives the file's bytes."""
    import gguf

    from pipeline.gguf_file import read_gguf
    from pipeline.stores import open_store, read_rows
    from stages.quantize import codes_of
    from tests.test_families import decode_i2s_reference

    model = converted[0]
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    convert(model, out, "--workdir", work, "--memory-limit", "256MiB", "--type", out_type, "--target", "x86")
    quantized, packed = open_store(work / "quantize.zarr", "r"), open_store(work / "pack.zarr", "r")
    tensors = {t.name: t for t in read_gguf(out).tensors}
    data = out.read_bytes()
    projections = [n for n in packed.attrs["tensor_order"] if packed[n].attrs["role"] == "ternary"]
    assert len(projections) == 14
    for name in projections:
        q, p = quantized[name], packed[name]
        ours = sorted(chunk_files(work / "pack.zarr" / name))
        assert ours and len(ours) == len(chunk_files(work / "quantize.zarr" / name)), name
        for mine, theirs in zip(ours, sorted(chunk_files(work / "quantize.zarr" / name))):
            assert os.path.samefile(mine, theirs), (name, mine)
        t = tensors[name]
        raw = data[t.offset:t.offset + t.nbytes]
        shape = tuple(p.attrs["shape"])
        codes = codes_of(q, 0, shape[0]).astype(np.float32)
        if out_type == "tq2_0":
            values = gguf.quants.dequantize(np.frombuffer(raw, np.uint8).reshape(shape[0], -1),
                                            gguf.GGMLQuantizationType.TQ2_0)
            np.testing.assert_array_equal(values, codes * np.float32(np.float16(q.attrs["scale"])), err_msg=name)
        else:
            values, scale, _ = decode_i2s_reference(raw, shape)
            assert scale == np.float32(q.attrs["scale"])
            np.testing.assert_array_equal(values, codes * scale, err_msg=name)
        body = read_rows(p, 0, shape[0]).tobytes()
        assert raw[:len(body)] == body, name


def test_a_read_of_a_changed_or_missing_file_is_refused(converted, tmp_path):
    import shutil

    from pipeline.errors import CheckpointError
    from pipeline.stores import check_source_file, open_store, read_rows, source_ref

    model, _, work = converted
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    moved = tmp_path / "m"
    shutil.copytree(model, moved)  # the references still name the original files
    arr = open_store(copy / "extract.zarr", "r")["blk.0.attn_q.weight"]
    expected = read_rows(arr, 0, 8)
    assert expected.tobytes() == tensors_by_hand(model / "model.safetensors")[arr.attrs["hf_name"]][2][:expected.nbytes]
    ref = dict(source_ref(arr), file=str(moved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="changed during the conversion"):
        check_source_file(ref)  # another file (inode, times) is not the one indexed
    os.utime(moved / "model.safetensors", ns=(0, 0))
    ref["identity"] = [ref["identity"][0], 0, os.stat(moved / "model.safetensors").st_ctime_ns + 1,
                       os.stat(moved / "model.safetensors").st_ino]
    with pytest.raises(CheckpointError, match="changed during the conversion"):
        check_source_file(ref)
    (moved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="changed during the conversion"):
        check_source_file(ref)


def test_status_and_inspect_say_when_the_checkpoint_is_changed_or_gone(converted, tmp_path):
    import shutil

    model, out, _ = converted
    mine = tmp_path / "model"
    shutil.copytree(model, mine)
    work = tmp_path / "work"
    convert(mine, tmp_path / "m.gguf", "--workdir", work, "--memory-limit", "256MiB")
    assert "checkpoint unchanged" in run_cli("status", work).stdout
    assert json.loads(run_cli("inspect", work, "--json").stdout)["checkpoint"]["state"] == "unchanged"
    os.utime(mine / "model.safetensors")
    status = run_cli("status", work).stdout
    assert "checkpoint changed" in status and str(mine / "model.safetensors") in status
    assert json.loads(run_cli("inspect", work, "--json").stdout)["checkpoint"]["state"] == "changed"
    (mine / "model.safetensors").unlink()
    assert "checkpoint gone" in run_cli("status", work).stdout
    text = run_cli("inspect", work, "blk.0.attn_q.weight").stdout
    assert "checkpoint" in text and "gone" in text


@pytest.mark.parametrize("family,when", [("1bitllm", "pack: running"), ("llama3-1.58", "quantize: running"),
                                         ("llama3-1.58", "pack: running")])
def test_a_checkpoint_changed_while_a_later_stage_reads_it_is_refused(tmp_path, family, when):
    from pipeline.config import make_options
    from pipeline.errors import CheckpointError
    from pipeline.runner import convert as run_convert
    from tests.synthetic import write_checkpoint
    from tests.hostile import rewrite_in_place

    model = write_checkpoint(tmp_path / "model", family, hidden_size=256, intermediate_size=512, num_layers=2,
                             num_heads=4, num_kv_heads=2 if family != "1bitllm" else None, vocab_size=2048,
                             **({"dtype": "f32"} if family == "1bitllm" else {}))
    out = tmp_path / "m.gguf"
    opts = make_options(model, output=out, progress=False)

    def log(line):
        if line == when:
            rewrite_in_place(model / "model.safetensors")
    with pytest.raises(CheckpointError, match="changed during the conversion"):
        run_convert(opts, log)
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))
    proc = convert(model, out)  # the advice: the same command starts over from the new files
    assert "starting over" in proc.stderr
    clean = tmp_path / "clean.gguf"
    convert(model, clean, "--workdir", tmp_path / "clean.work")
    assert out.read_bytes() == clean.read_bytes()


@pytest.mark.slow
def test_a_checkpoint_changed_between_a_kill_and_the_rerun_redoes_extract(tmp_path):
    from tests.synthetic import write_checkpoint
    from tests.hostile import rewrite_in_place

    model = write_checkpoint(tmp_path / "model", "llama3-1.58", hidden_size=512, intermediate_size=1024,
                             num_layers=2, num_heads=8, num_kv_heads=2, vocab_size=8192)
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    any_chunk = kp.Reference(seconds=0.0, chunks={"quantize": 1}, size=1)
    k = kp.interrupt(ROOT, model, out, work, kp.KillPoint("quantize", 0.5, signal.SIGKILL, "512MiB"), any_chunk,
                     tmp_path / "log.txt")
    assert k.landed in ("quantize", "between", "pack"), k
    rewrite_in_place(model / "model.safetensors")
    proc = convert(model, out, "--workdir", work, "--memory-limit", "512MiB")
    assert "starting over" in proc.stderr and "extract: already done" not in proc.stderr
    clean = tmp_path / "clean.gguf"
    convert(model, clean, "--workdir", tmp_path / "clean.work", "--memory-limit", "512MiB")
    assert out.read_bytes() == clean.read_bytes()


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_row_maxima_from_bit_patterns_equal_numpy_on_the_values(dtype):
    """extract's row max |x| from sign-cleared bit patterns: the same float32 values as numpy's
    abs and max over the values, and non-finite exactly when numpy says so (inf, NaN, -0.0)."""
    from stages.extract import row_abs_max_bits

    rng = np.random.default_rng(7)
    uint = np.uint32 if dtype == "F32" else np.uint16
    specials = {"BF16": [0x7F80, 0xFF80, 0x7FC1, 0x8000, 0x0001], "F16": [0x7C00, 0xFC00, 0x7E01, 0x8000, 0x0001],
                "F32": [0x7F800000, 0xFF800000, 0x7FC00001, 0x80000000, 0x00000001]}[dtype]
    for trial in range(300):
        x = rng.standard_normal((5, 40)).astype(np.float32) * np.float32(rng.choice([1e-30, 1e-3, 1.0, 3e4]))
        with np.errstate(over="ignore"):  # large values become F16 infinities: one more special
            bits = (x.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" else x.astype(
                {"F16": "<f2", "F32": "<f4"}[dtype]).view(uint)
        if trial % 3 == 0:
            bits[rng.integers(5), rng.integers(40)] = rng.choice(specials)
        values = (bits.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else \
            bits.view({"F16": np.float16, "F32": np.float32}[dtype]).astype(np.float32)
        with np.errstate(invalid="ignore"):
            expected = np.abs(values).max(axis=1)
        got, finite = row_abs_max_bits(bits, dtype)
        assert finite == bool(np.isfinite(expected).all()), trial
        if finite:
            assert got.dtype == np.float32 and np.array_equal(got, expected), trial


def test_the_disk_estimate_covers_the_run_directory_without_a_copy_of_the_weights(converted):
    model, out, work = converted
    plan = json.loads(run_cli("plan", model, "-o", out, "--workdir", work, "--memory-limit", "256MiB",
                              "--embedding-type", "bf16", "--json").stdout)
    held = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    weights = (model / "model.safetensors").stat().st_size
    assert abs(plan["run_dir_bytes"] - held) <= 0.1 * held and plan["run_dir_bytes"] < held + weights, \
        (held, plan["run_dir_bytes"], weights)
    assert plan["output_bytes"] == out.stat().st_size
