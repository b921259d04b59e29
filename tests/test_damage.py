"""A damaged run directory is found before its stores are read, and refused in one line.

When a stage finishes, the size and xxh3 digest of every file of its store are recorded
beside it; the next stage checks its input against that record. Each case damages one
finished store (a chunk file deleted, flipped, truncated, or a file added), makes the
stage that reads it run again, and expects exit 2 with one line that says the run
directory is damaged and to delete it; no GGUF may appear, and the checkpoint is untouched.
The same holds inside an interrupted (not yet sealed) store: a flipped or swapped chunk, or a
foreign one, is refused rather than sealed and assembled, and an undamaged one resumes without
rewriting a recorded chunk; a checksum record entry of the wrong type is damage too.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import convert
from tests.hostile import assert_same, one_line, tree
from tests.test_bad_input import snapshot
from tests.hostile import out, pristine  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from tests.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("damage")
    model = write_checkpoint(root / "m", "llama3-1.58", hidden_size=256, intermediate_size=512, num_layers=2,
                             num_heads=4, num_kv_heads=2, vocab_size=2048)
    out = root / "clean.gguf"
    convert(model, out, "--memory-limit", "512MiB")  # its run directory, clean.gguf.work, is copied per test
    return model, out


@pytest.fixture(scope="module")
def converted_small(pristine, tmp_path_factory):
    """kind -> (checkpoint, GGUF, run directory) of a copy of a `pristine` checkpoint converted once
    (`convert MODEL -o OUT --workdir WORK`); a test copies the run directory (`copy_run`) and converts
    this checkpoint, which no test changes."""
    root = tmp_path_factory.mktemp("damage-small")
    made = {}

    def get(kind: str):
        if kind not in made:
            model = shutil.copytree(pristine[kind], root / kind / "model")
            out, work = root / kind / "m.gguf", root / kind / "work"
            convert(model, out, "--workdir", work)
            made[kind] = model, out, work
        return made[kind]
    return get


def copy_run(work: Path, to: Path) -> Path:
    """A copy of a finished run directory (new files: damage to the copy stays in it)."""
    return Path(shutil.copytree(work, to, symlinks=True))


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
    shutil.copytree(clean.with_name("clean.gguf.work"), work, symlinks=True)  # the same conversion's run directory
    victim = damage(work / f"{stage}.zarr", how, random.Random(f"{stage}-{how}"))
    make_stage_rerun(work, stage)
    before, beside = snapshot(model), tree(tmp_path, skip=[work])
    proc = convert(model, out, "--workdir", work, "--memory-limit", "512MiB", check_exit=2)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("bitnet-gguf: error:") and "damaged" in lines[-1] and "delete it" in lines[-1], lines
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert victim.name in lines[-1] or "99" in lines[-1]
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))
    assert snapshot(model) == before
    # nothing but the run directory changed: a conversion with a new run directory starts from what the
    # module's clean conversion started from (the same command), wherever the damage was
    assert_same(beside, tree(tmp_path, skip=[work]))
    if how == "delete":  # the advice works: a new run directory converts to the clean bytes (once per stage)
        convert(model, out, "--workdir", tmp_path / "new", "--memory-limit", "512MiB")
        assert out.read_bytes() == clean.read_bytes()


def test_a_missing_checksum_record_is_damage(finished, tmp_path):
    model, clean = finished
    out, work = tmp_path / "m.gguf", copy_run(clean.with_name("clean.gguf.work"), tmp_path / "work")
    (work / "pack.checksums.json").unlink()
    proc = convert(model, out, "--workdir", work, "--memory-limit", "512MiB", check_exit=2)
    assert "pack.checksums.json" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("stage", ["quantize", "pack"])
def test_a_file_where_a_store_should_be_is_replaced_when_the_stage_is_redone(finished, tmp_path, stage):
    model, clean = finished
    out, work = tmp_path / "m.gguf", copy_run(clean.with_name("clean.gguf.work"), tmp_path / "work")
    shutil.rmtree(work / f"{stage}.zarr")
    (work / f"{stage}.zarr").write_bytes(b"not a store")
    # a new --type redoes pack (and a reset of quantize redoes it): the file is removed, not a crash
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"][stage]["key"] = "changed"
    (work / "manifest.json").write_text(json.dumps(manifest))
    convert(model, out, "--workdir", work, "--memory-limit", "512MiB")
    assert out.read_bytes() == clean.read_bytes()


def forget_after(work: Path, stage: str) -> None:
    """A finished run directory as a conversion interrupted after `stage` leaves it (tests/hostile.py
    interrupted_run without its conversion): the later stages gone from the manifest."""
    manifest = json.loads((work / "manifest.json").read_text())
    stages = ["extract", "quantize", "pack", "assemble"]
    for later in stages[stages.index(stage) + 1:]:
        manifest["stages"].pop(later, None)
    (work / "manifest.json").write_text(json.dumps(manifest))


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
def test_damage_inside_an_interrupted_store_is_refused_not_sealed(converted_small, out, stage, how):
    model, finished_out, finished_work = converted_small("llama3-1.58")
    work = copy_run(finished_work, out.parent / "work")
    clean = finished_out.read_bytes()
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


def test_a_foreign_chunk_in_an_interrupted_store_is_refused(converted_small, out):
    model, _, finished_work = converted_small("llama3-1.58")
    work = copy_run(finished_work, out.parent / "work")
    remaining = interrupted_in(work, "pack", random.Random(7))
    planted = remaining[0].parent / "99"
    planted.write_bytes(remaining[0].read_bytes())
    line = one_line(convert(model, out, "--workdir", work, check_exit=2), after_log=True)
    assert "damaged" in line and "99" in line
    assert not out.exists()


def test_an_interrupted_store_without_damage_resumes_and_rewrites_nothing_recorded(converted_small, out):
    model, finished_out, finished_work = converted_small("llama3-1.58")
    work = copy_run(finished_work, out.parent / "work")
    clean = finished_out.read_bytes()
    remaining = interrupted_in(work, "quantize", random.Random(3))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in remaining}
    convert(model, out, "--workdir", work)
    assert out.read_bytes() == clean
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in remaining} == before


@pytest.mark.parametrize("entry", [(5,), (None,), (1.5, "ab"), (True, "ab"), ("12", "ab"), (12, 34), (12, "ab", 1)])
def test_a_checksum_record_entry_of_the_wrong_type_is_damage(converted_small, out, tmp_path, entry):
    model, _, finished_work = converted_small("spm")
    work = copy_run(finished_work, tmp_path / "work")
    forget_after(work, "quantize")
    path = work / "quantize.checksums.json"
    lines = path.read_text().splitlines(keepends=True)  # the record is JSON, one file a line
    assert json.loads("".join(lines))["files"]
    rel = json.loads(lines[1].rstrip(",\n"))[0]
    lines[1] = json.dumps([rel, *entry]) + ",\n"
    path.write_text("".join(lines))
    proc = convert(model, out, "--workdir", work, check_exit=2)
    line = one_line(proc, after_log=True)
    assert "quantize.checksums.json" in line and "damaged" in line
    assert not out.exists()


@pytest.mark.parametrize("how", ["swapped", "repeated", "cut short", "more after its end"])
def test_a_checksum_record_out_of_order_repeated_or_cut_is_damage(converted_small, out, tmp_path, how):
    """The record is read a line at a time, in the order the seal wrote it (every file once, sorted):
    entries out of that order, an entry twice (which could stand for a file added beside it), a
    record without its end or with more after it, are refused as a damaged record."""
    model, _, finished_work = converted_small("spm")
    work = copy_run(finished_work, tmp_path / "work")
    forget_after(work, "quantize")
    path = work / "quantize.checksums.json"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) > 4 and lines[-1] == "]}\n"
    if how == "swapped":
        lines[1], lines[2] = lines[2], lines[1]
    elif how == "repeated":
        lines.insert(2, lines[1])
    elif how == "cut short":
        lines = lines[:-1]
    else:
        lines.append(lines[1])
    path.write_text("".join(lines))
    proc = convert(model, out, "--workdir", work, check_exit=2)
    line = one_line(proc, after_log=True)
    assert "quantize.checksums.json" in line and "damaged" in line, line
    assert not out.exists()


def test_a_chunk_changed_after_the_running_conversion_recorded_it_is_found_before_the_next_stage_reads_it(tmp_path):
    """A chunk the running conversion wrote and recorded is sealed from its record, not read again
    (RunDir.seal with the time the stage started): bytes changed before the seal are not seen
    there, but the seal keeps the digest recorded at write time, so the next stage's check of its
    input names the chunk. A chunk recorded before the stage started (an earlier, interrupted
    run's) is read again and refused at the seal, as before."""
    import numpy as np

    from pipeline.errors import RunDirError
    from pipeline.rundir import RunDir
    from pipeline.stores import chunk_path, ensure_array, open_store, write_rows

    (tmp_path / "work").mkdir()
    run = RunDir(tmp_path / "work")
    store = run.store("quantize")
    arr = ensure_array(open_store(store), "t", (8, 4), 2, np.float32, {})
    since = time.time_ns()
    write_rows(str(store / "t"), 0, 8, np.arange(32, dtype=np.float32).reshape(8, 4))
    victim = chunk_path(arr, 1)
    raw = bytearray(victim.read_bytes())
    raw[5] ^= 4
    victim.unlink()
    victim.write_bytes(bytes(raw))
    run.seal("quantize", since_ns=since)
    with pytest.raises(RunDirError) as found:
        run.check_sealed("quantize")
    assert str(victim) in str(found.value) and "changed after it was written" in str(found.value)
    with pytest.raises(RunDirError) as found:
        run.seal("quantize", since_ns=time.time_ns())
    assert str(victim) in str(found.value) and "changed after it was written" in str(found.value)
