"""Checkpoint bytes that change while the file's size, times and inode do not are refused.

Extract records an xxh3 digest of every block of the checkpoint bytes its stores refer to; the
later stages check them as they read. Each case converts, then puts the run directory back to
where a run stopped right after extract would have left it, changes the checkpoint's bytes
without changing its fingerprint, and reruns: the run refuses mid-run in one line (exit 2, the
file named, no GGUF), and the next rerun starts over and writes exactly the GGUF a fresh
conversion of the changed checkpoint gives.

The fingerprint (size, mtime, inode) is checked too: a weight file rewritten with the same size and
mtime, in place or as a new file, or a shard in a subdirectory changed, is noticed by the rerun and
converted again; a weight file changed during a run is refused before the output appears.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.hostile import assert_same, move_shard_into_subdirectory, partials, rewrite_in_place, tree
from tests.hostile import fresh, model, out, pristine  # noqa: F401 (fixtures)

PROJECTION = "model.layers.0.self_attn.q_proj.weight"  # packed uint8: quantize reads it
EMBEDDING = "model.embed_tokens.weight"                # BF16, written as F16: assemble reads it


@pytest.fixture
def packed_model(tmp_path):
    from tests.synthetic import write_checkpoint

    return write_checkpoint(tmp_path / "m", "llama3-1.58", hidden_size=256, intermediate_size=512, num_layers=2,
                            num_heads=4, num_kv_heads=2, vocab_size=2048)


def tensor_offset(path, name: str) -> int:
    """Byte offset of tensor `name`'s data in a safetensors file (parsed here, not by the converter)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def changed_byte(old: int, tensor: str) -> int:
    """Another valid value for one byte of `tensor`: packed fields stay codes (0, 1, 2); for
    BF16, the low byte of a value changes its last mantissa bits only (finite stays finite)."""
    if tensor == PROJECTION:
        return 0xAA if old != 0xAA else 0x55
    return old ^ 0x01


def stop_after_extract(work) -> None:
    """The run directory as a run stopped between extract and quantize leaves it."""
    from pipeline.rundir import RunDir

    run = RunDir(work)
    run.reset_from("quantize", run.load())


def identity(path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def check_refused(proc, out, weights) -> None:
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("bitnet-gguf: error:") and str(weights) in lines[-1] and "rerun" in lines[-1], lines
    assert "size and times are unchanged" in lines[-1] and "start over" in lines[-1], lines[-1]
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert "extract: already done, skipped" in proc.stderr  # refused mid-run, after extract was reused
    assert not out.exists() and not list(out.parent.glob(".*.partial"))


def rerun_starts_over(model, out, work, tmp_path, old_gguf, *wrapper) -> None:
    proc = run_convert(wrapper, model, out, "--workdir", work)
    assert "starting over" in proc.stderr
    fresh = tmp_path / "fresh.gguf"
    convert(model, fresh, "--workdir", tmp_path / "fresh-work")
    assert out.read_bytes() == fresh.read_bytes()
    assert out.read_bytes() != old_gguf  # the change reached the file: it is the new content's GGUF


def run_convert(wrapper, model, out, *extra, check_exit=0):
    if not wrapper:
        return convert(model, out, *extra, check_exit=check_exit)
    # forked from the test server as any command: tests/restored_ctime.py replaces os.stat and
    # os.fstat when it runs, and the converter looks them up in os at each call
    proc = run_cli(*wrapper, "convert", model, "-o", out, "--no-progress", *extra, module="tests.restored_ctime",
                   check_exit=None)
    assert proc.returncode == check_exit, proc.stderr
    return proc


@pytest.mark.parametrize("tensor", [PROJECTION, EMBEDDING])
def test_a_write_through_an_already_dirty_mapped_page(packed_model, tmp_path, tensor):
    """A process holding the file mapped writable: its first write to a page marks the file
    modified (and the page dirty); later writes through that page update no time until the
    kernel writes it back (dirty_expire_centisecs, 30 s by default). The first write lands before
    the first run, the second, which changes a byte, after its extract."""
    weights = packed_model / "model.safetensors"
    offset = tensor_offset(weights, tensor)
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    with open(weights, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        old = mapped[offset]
        mapped[offset] = old  # dirties the page: the times change now
        convert(packed_model, out, "--workdir", work)
        old_gguf = out.read_bytes()
        out.unlink()
        stop_after_extract(work)
        before = identity(weights)
        mapped[offset] = changed_byte(old, tensor)
        if identity(weights) != before:
            pytest.skip("the kernel wrote the page back meanwhile, so the write changed the times (a slow run)")
        proc = convert(packed_model, out, "--workdir", work, check_exit=2)
        check_refused(proc, out, weights)
        assert ("quantize: running" if tensor == PROJECTION else "assemble: running") in proc.stderr
        status = run_cli("status", work).stdout  # says so until the rerun starts over
        assert f"checkpoint changed: {weights} is not the file this run read" in status, status
        rerun_starts_over(packed_model, out, work, tmp_path, old_gguf)


@pytest.mark.parametrize("ctime_restored", [False, True], ids=["ctime-changes", "ctime-restored"])
def test_a_same_inode_rollback_to_other_bytes(packed_model, tmp_path, ctime_restored):
    """The bytes rewritten in place and the times put back with os.utime, as a snapshot rollback
    leaves the file: same inode, size, atime and mtime. Linux changes the ctime on both calls, so
    the converter's fingerprint sees this one ("ctime-changes": the rerun starts over at once). A
    rollback restores the ctime too; no unprivileged test can, so "ctime-restored" runs the
    converter with stat reporting mtime as ctime for the checkpoint (tests/restored_ctime.py):
    the fingerprint is then unchanged, and only the content digests find the change."""
    weights = packed_model / "model.safetensors"
    offset = tensor_offset(weights, EMBEDDING)
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    wrapper = (packed_model,) if ctime_restored else ()
    run_convert(wrapper, packed_model, out, "--workdir", work)
    old_gguf = out.read_bytes()
    out.unlink()
    stop_after_extract(work)
    st = os.stat(weights)
    with open(weights, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([changed_byte(old, EMBEDDING)]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert identity(weights)[:2] + identity(weights)[3:] == [st.st_size, st.st_mtime_ns, st.st_ino]
    if ctime_restored:
        check_refused(run_convert(wrapper, packed_model, out, "--workdir", work, check_exit=2), out, weights)
    rerun_starts_over(packed_model, out, work, tmp_path, old_gguf, *wrapper)


def test_a_damaged_row_maxima_chunk_is_the_run_directory_s_damage(packed_model, tmp_path):
    """extract's per-row maxima (read to refuse a float tensor F16 cannot hold) are the run
    directory's, not the checkpoint's: a damaged chunk of them is reported as a damaged store,
    even on a rerun that reuses extract and reads them before any stage checks its input."""
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    convert(packed_model, out, "--workdir", work)
    chunk = work / "extract.zarr" / "token_embd.weight.abs_max" / "c" / "0"
    raw = np.frombuffer(chunk.read_bytes(), dtype="<f4").copy()
    raw[0] = 1e30  # beyond F16: read as the checkpoint's, it would be blamed on the embedding
    chunk.unlink()
    chunk.write_bytes(raw.tobytes())
    proc = convert(packed_model, tmp_path / "other.gguf", "--workdir", work, check_exit=2)  # a new -o redoes assemble only
    last = proc.stderr.strip().splitlines()[-1]
    assert "damaged" in last and str(chunk) in last and "F16" not in last, last
    assert not (tmp_path / "other.gguf").exists()


def test_row_maxima_changed_after_they_were_recorded_are_damage_when_read(tmp_path):
    """The row maxima are read right after extract's store is sealed, before the next stage checks
    it, and the seal takes the digests this run recorded as the chunks were written: so the read
    itself compares each chunk with its record, and a chunk changed since is the run directory's
    damage, named, not a value blamed on the checkpoint."""
    from pipeline.stores import DamagedStore, MAX_SUFFIX, chunk_path, ensure_array, largest_values, open_store, \
        write_rows

    group = open_store(tmp_path / "extract.zarr")
    arr = ensure_array(group, "t" + MAX_SUFFIX, (6,), 2, np.float32, {"of": "t"})
    write_rows(str(tmp_path / "extract.zarr" / ("t" + MAX_SUFFIX)), 0, 6, np.arange(6, dtype=np.float32))
    assert largest_values(tmp_path / "extract.zarr", "t") == 5.0
    chunk = chunk_path(arr, 2)
    chunk.write_bytes(np.array([1e30, 0], dtype="<f4").tobytes())
    with pytest.raises(DamagedStore) as found:
        largest_values(tmp_path / "extract.zarr", "t")
    assert str(chunk) in str(found.value) and "changed after it was written" in str(found.value)


def test_reads_anywhere_in_a_tensor_check_whole_blocks(tmp_path):
    """A read of any byte range gives the file's bytes, and a byte changed in a block that the
    range touches is refused, whatever the chunk and block boundaries (small ones here)."""
    from pipeline.stores import SourceContentChanged, content_spec, make_ref, read_source, record_content

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1000, dtype=np.uint8)
    path = tmp_path / "w.bin"
    path.write_bytes(b"h" * 24 + data.tobytes())
    (tmp_path / "arr").mkdir()
    content = {**content_spec(tmp_path / "arr", 96, 1000, "t"), "block": 40}  # chunks of 96, blocks 40, 40, 16
    for i in range(-(-1000 // 96)):
        record_content(content, i, data[i * 96:(i + 1) * 96])
    st = os.stat(path)
    ref = make_ref(path, 24, tmp_path, [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino], content)
    for start, stop in [(0, 1000), (0, 1), (39, 41), (45, 60), (95, 97), (100, 336), (990, 1000), (17, 903)]:
        got = np.empty(stop - start, dtype=np.uint8)
        read_source(ref, start, got)
        assert (got == data[start:stop]).all(), (start, stop)
    with open(path, "r+b") as f:  # byte 130 of the tensor: chunk 1 (96..192), block 96..136
        f.seek(24 + 130)
        f.write(bytes([data[130] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    st = os.stat(path)
    ref["identity"] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]  # past the fingerprint
    for start, stop in [(96, 97), (100, 101), (135, 137), (100, 200)]:  # ranges touching the changed byte's block
        with pytest.raises(SourceContentChanged):
            read_source(ref, start, np.empty(stop - start, dtype=np.uint8))
    got = np.empty(40, dtype=np.uint8)
    read_source(ref, 136, got)  # the next block, unchanged
    assert (got == data[136:176]).all()


def converted_fresh(model: Path, tmp_path: Path, tag: str) -> bytes:
    out = tmp_path / f"clean-{tag}" / "m.gguf"
    out.parent.mkdir()
    convert(model, out)
    return out.read_bytes()


@pytest.mark.parametrize("family,how", [("1bitllm", "in-place"), ("llama3-1.58", "in-place"),
                                        ("1bitllm", "replaced")])
def test_a_weight_file_rewritten_with_the_same_size_and_mtime_is_noticed(fresh, tmp_path, family, how):
    model = fresh(family)
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    convert(model, out, "--workdir", work)
    old = out.read_bytes()
    weights = model / "model.safetensors"
    if how == "in-place":
        rewrite_in_place(weights)
    else:  # a new file (new inode) with the old size and times
        st = os.stat(weights)
        copy = model / "copy.tmp"
        shutil.copyfile(weights, copy)
        rewrite_in_place(copy, keep_times=False)
        os.replace(copy, weights)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc = convert(model, out, "--workdir", work)
    assert "already done" not in proc.stderr.split("extract:")[1].splitlines()[0]
    new = out.read_bytes()
    assert new != old
    assert new == converted_fresh(model, tmp_path, "changed")


def test_a_shard_in_a_subdirectory_converts_and_its_change_is_noticed(fresh, tmp_path):
    model = fresh("sharded")
    moved = move_shard_into_subdirectory(model, "nested/dir")
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    convert(model, out, "--workdir", work)
    run_cli("verify", out, model)
    old = out.read_bytes()
    rewrite_in_place(moved)
    convert(model, out, "--workdir", work)
    assert out.read_bytes() != old
    assert out.read_bytes() == converted_fresh(model, tmp_path, "changed")


@pytest.mark.parametrize("when", ["extract: running", "quantize: running", "assemble: running"])
def test_a_weight_file_changed_during_the_run_is_refused_before_the_output_appears(model, out, when):
    from pipeline.config import make_options
    from pipeline.errors import CheckpointError
    from pipeline.runner import convert as run_convert

    opts = make_options(model, output=out, progress=False)
    seen = []

    def log(line):
        seen.append(line)
        if line == when:
            rewrite_in_place(model / "model.safetensors")
    before = tree(out.parent, skip=[opts.workdir])
    with pytest.raises(CheckpointError, match="changed during the conversion"):
        run_convert(opts, log)
    assert when in seen
    assert not out.exists() and not partials(out.parent)
    assert_same(before, tree(out.parent, skip=[opts.workdir]))
    if when == "assemble: running":  # the message's advice works
        convert(model, out)
        run_cli("verify", out, model)
