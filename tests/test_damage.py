"""A damaged run directory is found before its stores are read, and refused in one line.

When a stage finishes, the size and xxh3 digest of every file of its store are recorded
beside it; the next stage checks its input against that record. Each case damages one
finished store (a chunk file deleted, flipped, truncated, or a file added), makes the
stage that reads it run again, and expects exit 2 with one line that says the run
directory is damaged and to delete it; no GGUF may appear, and the checkpoint is untouched.
"""
from __future__ import annotations

import json
import random

import pytest

from tests.conftest import convert
from tests.test_bad_input import snapshot


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from tests.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("damage")
    model = write_checkpoint(root / "m", "llama3-1.58", hidden_size=256, intermediate_size=512, num_layers=2,
                             num_heads=4, num_kv_heads=2, vocab_size=2048)
    out = root / "clean.gguf"
    convert(model, out, "--memory-limit", "512MiB")
    return model, out


def chunk_files(store):
    return sorted(p for p in store.rglob("*") if p.is_file() and p.parent.name != "" and "/c/" in str(p))


DAMAGE = ["delete", "flip", "truncate", "add"]


def damage(store, how: str, rng: random.Random):
    files = chunk_files(store)
    victim = rng.choice(files)
    if how == "delete":
        victim.unlink()
    elif how == "flip":
        raw = bytearray(victim.read_bytes())
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        # a hard link shares the change with the store it came from; write a new file instead
        victim.unlink()
        victim.write_bytes(bytes(raw))
    elif how == "truncate":
        raw = victim.read_bytes()
        victim.unlink()
        victim.write_bytes(raw[:len(raw) // 2])
    else:
        (victim.parent / "99").write_bytes(b"\0" * 16)
    return victim


def make_stage_rerun(work, stage: str) -> None:
    """Make the stage after `stage` run again on the next convert."""
    manifest = json.loads((work / "manifest.json").read_text())
    nxt = {"extract": "quantize", "quantize": "pack", "pack": "assemble"}[stage]
    manifest["stages"][nxt]["state"] = "running"  # as if it had been interrupted
    (work / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("stage", ["extract", "quantize", "pack"])
@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_store_is_refused_with_one_line(finished, tmp_path, stage, how):
    model, clean = finished
    out = tmp_path / "m.gguf"
    work = tmp_path / "work"
    convert(model, out, "--workdir", work, "--memory-limit", "512MiB")
    out.unlink()
    victim = damage(work / f"{stage}.zarr", how, random.Random(f"{stage}-{how}"))
    make_stage_rerun(work, stage)
    before = snapshot(model)
    proc = convert(model, out, "--workdir", work, "--memory-limit", "512MiB", check_exit=2)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("bitnet-gguf: error:") and "damaged" in lines[-1] and "delete it" in lines[-1], lines
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert victim.name in lines[-1] or "99" in lines[-1]
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))
    assert snapshot(model) == before
    # the advice works: a new run directory converts to the clean bytes
    convert(model, out, "--workdir", tmp_path / "new", "--memory-limit", "512MiB")
    assert out.read_bytes() == clean.read_bytes()


def test_a_missing_checksum_record_is_damage(finished, tmp_path):
    model, _ = finished
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    convert(model, out, "--workdir", work)
    out.unlink()
    (work / "pack.checksums.json").unlink()
    proc = convert(model, out, "--workdir", work, check_exit=2)
    assert "pack.checksums.json" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("stage", ["quantize", "pack"])
def test_a_file_where_a_store_should_be_is_replaced_when_the_stage_is_redone(finished, tmp_path, stage):
    model, clean = finished
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    convert(model, out, "--workdir", work, "--memory-limit", "512MiB")
    out.unlink()
    import shutil

    shutil.rmtree(work / f"{stage}.zarr")
    (work / f"{stage}.zarr").write_bytes(b"not a store")
    # a new --type redoes pack (and a reset of quantize redoes it): the file is removed, not a crash
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"][stage]["key"] = "changed"
    (work / "manifest.json").write_text(json.dumps(manifest))
    convert(model, out, "--workdir", work, "--memory-limit", "512MiB")
    assert out.read_bytes() == clean.read_bytes()
