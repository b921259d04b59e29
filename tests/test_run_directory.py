"""Run directories: one that is not ours, one that overlaps the checkpoint or the output, one we
cannot write, and links planted in ours where a file is written.

Every refusal is exit 2 with one stderr line naming the option or the file, and nothing outside
the run directory changes (tests/hostile.py `refuse`). A run directory of someone else's files is
left alone; `status` and `inspect` refuse it too, and `status` reads a run of ours without writing
(also on a read-only mount). A link planted at a name the converter writes (manifest, metadata
record, checksums, lock, a temporary name, a chunk directory of a store) is never written through.
A store deleted under a finished run is redone, and a chunk linked again after an interruption
leaves no temporary file.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, convert, run_cli
from tests.hostile import assert_same, cli, interrupted_run, one_line, refuse, tree
from tests.hostile import fresh, model, out, pristine  # noqa: F401 (fixtures)


@pytest.mark.parametrize("content", [
    {"manifest.json": json.dumps({"name": "my-web-app", "version": 2, "stages": {}})},
    {"manifest.json": json.dumps([1, 2, 3])},
    {"manifest.json": "not json at all"},
    {"notes.txt": "mine", "manifest.json": json.dumps({"tool": "something-else"})},
    {"photo.jpg": "\xff\xd8"},
    {"extract.zarr/zarr.json": json.dumps({"mine": True})},  # a store name, but no manifest of ours
    {"pack.zarr": "a file named like a store"},
    {"lock": "the user's lock file", "extract.zarr/data.bin": "precious"},
    {"metadata.json": json.dumps({"title": "my photos"})},
    {"extract.zarr/zarr.json": json.dumps({"node_type": "group", "attributes": {"stage": "pack"}}),
     "metadata.json": "{}"},
])
def test_a_workdir_holding_someone_elses_files_is_refused_and_left_alone(model, out, tmp_path, content):
    work = tmp_path / "theirs"
    for name, text in content.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    line = refuse(model, out, "--workdir", workdir=work, watch=[model, out.parent, work])
    assert str(work) in line


def test_a_workdir_that_is_a_file_is_refused(model, out, tmp_path):
    work = tmp_path / "file"
    work.write_text("not a directory")
    refuse(model, out, "not a directory", workdir=work, watch=[model, out.parent, work])


@pytest.fixture
def our_run(model, tmp_path):
    """A finished conversion's run directory (ours) and output."""
    work, first = tmp_path / "run", tmp_path / "first" / "m.gguf"
    first.parent.mkdir()
    convert(model, first, "--workdir", work)
    return work


@pytest.mark.parametrize("where", ["manifest.json", "metadata.json", "lock", "extract.zarr/zarr.json",
                                   "new.gguf", "extract.zarr/x.gguf"])
def test_the_output_inside_the_run_directory_is_refused(model, our_run, where):
    out = our_run / where
    for extra in ((), ("--force",)):  # without --force a file there may be refused as not a GGUF first
        refuse(model, out, "-o", extra=extra, workdir=our_run, watch=[model, our_run])
    assert "apart" in refuse(model, out, extra=("--force",), workdir=our_run, watch=[model, our_run])


def test_the_output_equal_to_the_workdir_is_refused(model, tmp_path):
    target = tmp_path / "same"
    refuse(model, target, "apart", workdir=target, watch=[model, tmp_path])
    assert not target.exists()


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_a_workdir_overlapping_the_checkpoint_is_refused(model, out, where):
    work = {"inside": model / "run", "same": model, "parent": model.parent}[where]
    refuse(model, out, "--workdir", workdir=work, watch=[model, out.parent, model.parent])


def test_a_workdir_equal_to_the_output_directory_is_refused(model, out):
    refuse(model, out, "--workdir", workdir=out.parent)


def test_a_workdir_name_too_long_is_refused(model, out, tmp_path):
    refuse(model, out, "--workdir", workdir=tmp_path / ("w" * 256))


@functools.lru_cache(maxsize=None)
def read_only_mounts_work() -> bool:
    probe = "d=$(mktemp -d) && mount --bind $d $d && mount -o remount,ro,bind $d && ! touch $d/x 2>/dev/null"
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


def run_with_read_only(directory: Path, *args) -> subprocess.CompletedProcess:
    """Run the command line with `directory` mounted read-only (in a mount namespace of its own:
    as root, permissions would not refuse anything)."""
    command = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "pipeline", *args))
    script = (f"mount --bind {shlex.quote(str(directory))} {shlex.quote(str(directory))} && "
              f"mount -o remount,ro,bind {shlex.quote(str(directory))} && exec {command}")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("case", ["new-workdir", "output-directory", "existing-run", "checkpoint"])
def test_read_only_places_are_refused_in_one_line(model, tmp_path, case):
    if not read_only_mounts_work():
        pytest.skip("no mount namespaces here")
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    if case == "existing-run":
        convert(model, rw / "first.gguf", "--workdir", ro / "run")
    args = {"new-workdir": ["-o", rw / "a.gguf", "--workdir", ro / "new"],
            "output-directory": ["-o", ro / "a.gguf", "--workdir", rw / "w"],
            "existing-run": ["-o", rw / "b.gguf", "--workdir", ro / "run"],
            "checkpoint": ["-o", rw / "c.gguf"]}[case]
    directory = model if case == "checkpoint" else ro
    before = tree(model, ro)
    proc = run_with_read_only(directory, "convert", model, *args, "--no-progress")
    if case == "checkpoint":  # the checkpoint is only read: a read-only one converts
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2, proc.stderr
    one_line(proc)
    assert_same(before, tree(model, ro))
    assert not [p for p in rw.iterdir() if p.name != "first.gguf" and not p.name.endswith(".work")]


def test_status_works_on_a_read_only_run_directory_and_changes_nothing(model, out):
    work = out.with_name("m.gguf.work")
    convert(model, out)
    before = tree(work, out.parent)
    proc = run_cli("status", work)
    assert "assemble" in proc.stdout and "done" in proc.stdout
    json.loads(run_cli("status", work, "--json").stdout)
    assert_same(before, tree(work, out.parent))
    if not read_only_mounts_work():
        pytest.skip("cannot make a read-only mount here (no mount namespace)")
    ro = run_with_read_only(work, "status", work)
    assert ro.returncode == 0, ro.stderr
    assert "assemble" in ro.stdout and "done" in ro.stdout and ro.stderr == ""
    assert_same(before, tree(work, out.parent))


@pytest.mark.parametrize("command,args", [("status", []), ("status", ["--json"]), ("inspect", []),
                                          ("inspect", ["--plot", "PLOT"]), ("inspect", ["--json"]),
                                          ("inspect", ["blk.0.attn_q.weight"])])
def test_status_and_inspect_refuse_a_directory_that_is_not_a_run_of_ours(tmp_path, command, args):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text(json.dumps({"name": "my-web-app", "stages": [1, 2]}))
    args = [str(tmp_path / "p.png") if a == "PLOT" else a for a in args]
    before = tree(tmp_path)
    proc = cli(command, theirs, *args)
    assert proc.returncode == 2 and "not a bitnet-gguf run directory" in one_line(proc), proc
    assert proc.stdout == ""
    assert_same(before, tree(tmp_path))


@pytest.fixture
def victim(tmp_path):
    """A user's file outside every run directory, which a planted link points to."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text("the user's precious file\n")
    return path


@pytest.mark.parametrize("name", ["manifest.json.tmp", "metadata.json.tmp", "quantize.checksums.json.tmp",
                                  "pack.checksums.json.tmp", "lock", "metadata.json", "pack.checksums.json"])
def test_a_link_planted_in_a_run_directory_is_never_written_through(fresh, out, tmp_path, victim, name):
    model, work = fresh("spm"), tmp_path / "work"
    interrupted_run(model, out, work, "extract")
    (work / name).unlink(missing_ok=True)
    (work / name).symlink_to(victim)
    before = victim.read_bytes()
    line = refuse(model, out, name, "link", workdir=work, watch=[model, out.parent, victim.parent])
    assert "run directory" in line
    assert victim.read_bytes() == before and (work / name).is_symlink()


def test_a_link_planted_inside_a_store_is_never_written_through(fresh, out, tmp_path):
    """A chunk directory of an unfinished store replaced by a link to a directory outside."""
    model, work = fresh("spm"), tmp_path / "work"
    interrupted_run(model, out, work, "quantize")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    chunks = sorted((work / "pack.zarr").glob("*/c"))[0]  # the store stays on disk; pack reruns into it
    shutil.rmtree(chunks)
    chunks.symlink_to(elsewhere)  # pack would write this array's chunk files there
    before = tree(elsewhere)
    refuse(model, out, "link", workdir=work, watch=[model, out.parent, elsewhere])
    assert_same(before, tree(elsewhere))


def test_write_json_atomic_never_writes_through_a_link_at_its_temporary_name(tmp_path, victim):
    """The race the start-up check cannot close: a link planted after it, at the temporary name."""
    from pipeline.rundir import write_json_atomic

    (tmp_path / "manifest.json.tmp").symlink_to(victim)
    write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert victim.read_text() == "the user's precious file\n"
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}
    assert not (tmp_path / "manifest.json").is_symlink() and not os.path.lexists(tmp_path / "manifest.json.tmp")


def test_the_gguf_writer_never_writes_through_a_link_at_its_path(tmp_path, victim):
    import numpy as np

    from pipeline.gguf_file import GGUFFileWriter, TensorInfo

    temp = tmp_path / ".m.gguf.1234abcd.partial"
    temp.symlink_to(victim)
    data = np.arange(8, dtype=np.float32)
    with GGUFFileWriter(temp, [], [TensorInfo("t", (8,), 0, data.nbytes)]) as w:
        w.write_header()
        w.write_tensor_data("t", data)
        w.end_tensor()
    assert victim.read_text() == "the user's precious file\n"
    assert not temp.is_symlink() and temp.read_bytes()[:4] == b"GGUF"


def test_create_exclusive_removes_what_is_there_and_refuses_a_directory(tmp_path, victim):
    from pipeline.errors import RunDirError
    from pipeline.safe_files import create_exclusive

    path = tmp_path / "x.tmp"
    path.symlink_to(victim)
    with create_exclusive(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and victim.read_text() == "the user's precious file\n"
    (tmp_path / "d.tmp").mkdir()
    with pytest.raises(RunDirError, match="d.tmp"):
        create_exclusive(tmp_path / "d.tmp")


def test_a_file_written_whole_never_writes_through_a_link_and_leaves_no_temporary_file(tmp_path, victim):
    from pipeline.safe_files import write_whole

    target = tmp_path / "d" / "x"
    target.parent.mkdir()
    (tmp_path / "d" / "x.partial").symlink_to(victim)
    write_whole(target, b"new")
    assert target.read_bytes() == b"new" and victim.read_text() == "the user's precious file\n"
    assert not os.path.lexists(tmp_path / "d" / "x.partial")

    def interrupted(tmp):  # as a SIGINT in the middle of the write
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_whole(target, interrupted)
    assert target.read_bytes() == b"new" and not os.path.lexists(tmp_path / "d" / "x.partial")
    with pytest.raises(FileNotFoundError):  # a missing directory is made only when asked
        write_whole(tmp_path / "e" / "y", b"z")
    assert not (tmp_path / "e").exists()
    write_whole(tmp_path / "e" / "f" / "y", "text", parents=True)
    assert (tmp_path / "e" / "f" / "y").read_text() == "text" and os.listdir(tmp_path / "e" / "f") == ["y"]


@pytest.mark.parametrize("store", ["extract", "quantize", "pack"])
def test_a_store_deleted_under_a_finished_run_is_redone_and_reruns_resume(fresh, out, tmp_path, store):
    model, work = fresh("spm"), tmp_path / "work"
    convert(model, out, "--workdir", work)
    expected = out.read_bytes()
    shutil.rmtree(work / f"{store}.zarr")
    proc = convert(model, out, "--workdir", work)
    assert f"{store}: its store" in proc.stderr and out.read_bytes() == expected
    proc = convert(model, out, "--workdir", work)
    assert "assemble: already done" in proc.stderr and out.read_bytes() == expected


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
