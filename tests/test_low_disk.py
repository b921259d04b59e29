"""convert --low-disk: the same bytes with the run directory consumed as the output grows.

Every --low-disk output is compared with the ordinary conversion of the same checkpoint (packed,
bf16, served over HTTP by tests/remote_server.py, and from fsspec's memory://). The disk is
measured from inside the run (an audit hook sums the blocks under the output's directory, which
holds the run directory and the temporary output, just before each removal of a tensor's codes,
the moment that tensor's growth of the output peaks, and before the rename into place) and held
to the output plus the largest tensor's codes plus what the run directory keeps anyway (in bytes
the files hold: a test-sized tensor's codes fill a fraction of their disk blocks). Kills
land exactly where they are aimed, from the same audit hook (SIGKILL or SIGTERM raised by the
process itself): mid-tensor, between a tensor's record and the removal of its codes, between the
removal from pack.zarr and from quantize.zarr, before the rename into place; each rerun must
give the same bytes.
"""
from __future__ import annotations

import filecmp
import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli, shared_checkpoint, shared_conversion
from tests.hostile import one_line, tree
from tests.peak_rss import file_bytes

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=3, num_heads=4, vocab_size=512)
MEM = ("--memory-limit", "512MiB")
# main() in the pytest process: its budget starts from that process's resident size, several
# hundred MiB after a worker's earlier tests (a file's bytes do not depend on the limit)
IN_PROCESS_LIMIT = ("--memory-limit", "2GiB")

def hooked(kind: str, n: int, sig: int, watch: Path, report: Path, *argv) -> subprocess.CompletedProcess:
    """`convert ...` under tests/assemble_points.py's audit hook: killed (SIGKILL, or SIGTERM raised in the
    thread making the call) at the n-th event of `kind`, or with signal 0 the peak bytes under `watch`
    written to `report`. Forked from the test server as any command (run_cli)."""
    return run_cli(kind, n, int(sig), watch, report, "--", *argv, module="tests.assemble_points", check_exit=None,
                   timeout=300)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(checkpoint, the ordinary conversion's GGUF, its run directory kept)."""
    model = shared_checkpoint(tmp_path_factory, "llama3-1.58", **SHAPE)
    out = shared_conversion(tmp_path_factory, model, *MEM)
    return model, out


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    model = shared_checkpoint(tmp_path_factory, "1bitllm", dtype="bf16", **SHAPE)
    return model, shared_conversion(tmp_path_factory, model, *MEM)


def code_dirs(work: Path) -> list[Path]:
    """The chunk directories of the code arrays of quantize.zarr and pack.zarr still on disk."""
    found = []
    for store in ("quantize.zarr", "pack.zarr"):
        for arr in sorted((work / store).iterdir()) if (work / store).is_dir() else []:
            meta = arr / "zarr.json"
            if (arr / "c").is_dir() and meta.is_file() and json.loads(meta.read_text()).get("attributes", {}) \
                    .get("role") == "ternary":
                found.append(arr / "c")
    return found


def low_disk(model, out: Path, *extra, **kw) -> subprocess.CompletedProcess:
    return run_cli("convert", model, "-o", out, "--no-progress", *MEM, "--low-disk", *extra, **kw)


def assert_consumed(out: Path) -> None:
    work = Path(str(out) + ".work")
    assert code_dirs(work) == [], "the codes of the tensors written stay in the run directory"
    assert json.loads((work / "manifest.json").read_text())["codes_consumed"] is True
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


# -- the same bytes ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["packed", "bf16"])
def test_low_disk_writes_the_ordinary_conversions_bytes_and_leaves_no_codes(which, request, tmp_path):
    model, ref = request.getfixturevalue(which)
    assert code_dirs(Path(str(ref) + ".work")), "the ordinary run keeps its codes (what --low-disk removes)"
    out = tmp_path / "m.gguf"
    low_disk(model, out)
    assert filecmp.cmp(out, ref, shallow=False)
    assert_consumed(out)
    assert "--low-disk" in run_cli("status", Path(str(out) + ".work")).stdout
    # the same command again: done, nothing redone; with the output gone: quantize redone, same bytes
    again = low_disk(model, out)
    assert "assemble: already done, skipped" in again.stderr and "redoing" not in again.stderr
    out.unlink()
    redo = low_disk(model, out)
    assert "removed as an earlier --low-disk run" in redo.stderr and "quantize: running" in redo.stderr
    assert filecmp.cmp(out, ref, shallow=False)


def test_another_type_after_low_disk_redoes_quantize_and_keeps_the_codes_without_it(packed, tmp_path):
    model, ref = packed
    out = tmp_path / "m.gguf"
    low_disk(model, out)
    i2s_ref = tmp_path / "i2s-ref.gguf"
    run_cli("convert", model, "-o", i2s_ref, "--no-progress", *MEM, "--type", "i2_s")
    i2s = tmp_path / "i2s.gguf"
    proc = run_cli("convert", model, "-o", i2s, "--workdir", Path(str(out) + ".work"), "--no-progress", *MEM,
                   "--type", "i2_s")
    assert "removed as an earlier --low-disk run" in proc.stderr
    assert filecmp.cmp(i2s, i2s_ref, shallow=False)
    assert code_dirs(Path(str(out) + ".work")), "without --low-disk the codes stay"
    run_cli("inspect", Path(str(out) + ".work"), "--codes")  # no longer consumed: the codes can be counted


def test_remote_sources_with_low_disk_give_the_same_bytes(bf16, tmp_path):
    """An https:// source (tests/remote_server.py), killed in assemble after some tensors (whose float
    tensors assemble fetches), and a memory:// one, in this process."""
    import fsspec

    from pipeline.cli import main
    from tests.remote_server import CheckpointServer

    model, ref = bf16
    server = CheckpointServer(model)
    try:
        out = tmp_path / "http" / "m.gguf"
        out.parent.mkdir()
        args = ("convert", server.dir_url, "-o", out, "--no-progress", *MEM, "--low-disk")
        killed = hooked("rmtree", 5, signal.SIGKILL, out.parent, tmp_path / "r", *args)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        rerun = run_cli(*args)
        assert "continuing the unfinished output after" in rerun.stderr
        assert filecmp.cmp(out, ref, shallow=False)
        assert_consumed(out)
    finally:
        server.close()
    fs = fsspec.filesystem("memory")
    for p in model.iterdir():
        fs.pipe(f"/low-disk/{model.name}/{p.name}", p.read_bytes())
    mem_out = tmp_path / "memory.gguf"
    try:
        assert main(["convert", f"memory://low-disk/{model.name}", "-o", str(mem_out), "--no-progress", *IN_PROCESS_LIMIT,
                     "--low-disk"]) == 0
    finally:
        fs.rm("/low-disk", recursive=True)
    assert filecmp.cmp(mem_out, ref, shallow=False)
    assert_consumed(mem_out)


# -- the disk ------------------------------------------------------------------------------------

def test_peak_disk_is_the_output_plus_one_tensors_codes(packed, tmp_path):
    """Measured from inside the run at every moment the output peaks between two removals; the
    ordinary run's peak (the output beside every code) measured the same way shows what is saved."""
    model, ref = packed
    largest = max(file_bytes([d]) for d in code_dirs(Path(str(ref) + ".work")))
    all_codes = file_bytes(code_dirs(Path(str(ref) + ".work")))
    peaks = {}
    for name, extra in (("ordinary", ()), ("low", ("--low-disk",))):
        out = tmp_path / name / "m.gguf"
        out.parent.mkdir()
        report = tmp_path / f"{name}.peak"
        proc = hooked("measure", 0, 0, out.parent, report, "convert", model, "-o", out, "--no-progress", *MEM,
                      *extra)
        assert proc.returncode == 0, proc.stderr
        assert filecmp.cmp(out, ref, shallow=False)
        kept = file_bytes([Path(str(out) + ".work")])  # what stays of the run directory at the end
        peaks[name] = (int(report.read_text()), file_bytes([out]), kept)
    peak, output, kept = peaks["low"]
    assert peak <= output + largest + kept, (peaks, largest)
    ordinary_peak = peaks["ordinary"][0]
    assert ordinary_peak >= output + all_codes, "the measure sees the codes beside the finished output"
    assert peak <= ordinary_peak - all_codes + largest, "the saving is every code but one tensor's"


# -- kills inside assemble -----------------------------------------------------------------------

KILLS = [
    ("record", 1, signal.SIGKILL),   # the first tensor written, not yet recorded: nothing consumed
    ("record", 1, signal.SIGTERM),
    ("read", 1, signal.SIGKILL),     # the first codes read: mid-file, the float tensors before them recorded
    ("read", 6, signal.SIGTERM),     # mid-tensor
    ("record", 5, signal.SIGKILL),   # a tensor written, its record not yet made
    ("rmtree", 1, signal.SIGKILL),   # the first record made, its codes not yet removed
    ("rmtree", 4, signal.SIGKILL),   # a tensor's pack.zarr chunks removed, its quantize.zarr ones not yet
    ("rmtree", 7, signal.SIGTERM),   # between a record and its removal
    ("publish", 1, signal.SIGKILL),  # every tensor recorded, before the rename into place
    ("publish", 1, signal.SIGTERM),
    ("done", 1, signal.SIGKILL),     # renamed into place, the manifest not yet saying so
]


@pytest.mark.parametrize("kind,n,sig", KILLS, ids=[f"{k}{n}-{signal.Signals(s).name}" for k, n, s in KILLS])
def test_a_kill_inside_assemble_reruns_to_the_same_bytes(packed, tmp_path, kind, n, sig):
    model, ref = packed
    out = tmp_path / "m.gguf"
    args = ("convert", model, "-o", out, "--no-progress", *MEM, "--low-disk")
    killed = hooked(kind, n, sig, out.parent, tmp_path / "r", *args)
    assert killed.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), killed.stderr
    assert "assemble: running" in killed.stderr and out.exists() == (kind == "done")
    manifest = json.loads((Path(str(out) + ".work") / "manifest.json").read_text())
    recorded = manifest["stages"]["assemble"].get("low_disk", {}).get("tensors", 0)
    assert (recorded > 0) == (kind != "record" or n > 1)
    rerun = run_cli(*args)
    assert ("continuing the unfinished output after" in rerun.stderr) == (recorded > 0 and kind != "done")
    assert "redoing" not in rerun.stderr
    assert ("assemble: already done, skipped" in rerun.stderr) == (kind == "done")
    assert filecmp.cmp(out, ref, shallow=False)
    assert_consumed(out)


def test_a_lost_unfinished_output_redoes_quantize(packed, tmp_path):
    model, ref = packed
    out = tmp_path / "m.gguf"
    args = ("convert", model, "-o", out, "--no-progress", *MEM, "--low-disk")
    assert hooked("rmtree", 5, signal.SIGKILL, out.parent, tmp_path / "r", *args).returncode == -signal.SIGKILL
    for p in tmp_path.iterdir():
        if p.name.endswith(".partial"):
            p.unlink()
    rerun = run_cli(*args)
    assert "removed as an earlier --low-disk run" in rerun.stderr
    assert filecmp.cmp(out, ref, shallow=False)


# -- refusals ------------------------------------------------------------------------------------

def test_several_types_with_low_disk_are_refused_in_one_line(packed, tmp_path):
    model, _ = packed
    before = tree(tmp_path)
    proc = run_cli("convert", model, "-o", tmp_path, "--no-progress", "--type", "tq2_0,i2_s", "--low-disk",
                   check_exit=2)
    assert "--low-disk" in one_line(proc) and "several --type" in proc.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize("option", [("--codes",), ("--plot", "p.png")])
def test_inspecting_the_codes_of_consumed_stores_is_refused_in_one_line(packed, tmp_path, option):
    model, _ = packed
    out = tmp_path / "m.gguf"
    low_disk(model, out)
    work = Path(str(out) + ".work")
    before = tree(tmp_path)
    proc = run_cli("inspect", work, *option, check_exit=2, cwd=tmp_path)
    assert "--low-disk" in one_line(proc) and option[0] in proc.stderr
    assert tree(tmp_path) == before
    assert "quantize.zarr" in run_cli("inspect", work).stdout  # the rest of inspect still works


def test_a_split_output_killed_mid_file_continues_every_part(packed, tmp_path_factory, tmp_path):
    """--split-max-tensors: a record holds every part's length; the rerun reopens each."""
    model, _ = packed
    ref = shared_conversion(tmp_path_factory, model, *MEM, "--split-max-tensors", "8")
    refs = sorted(ref.parent.glob("m-0000*-of-*.gguf"))
    assert len(refs) == 4  # 30 tensors, 8 a part
    out = tmp_path / "m.gguf"
    args = ("convert", model, "-o", out, "--no-progress", *MEM, "--low-disk", "--split-max-tensors", "8")
    killed = hooked("rmtree", 21, signal.SIGKILL, out.parent, tmp_path / "r", *args)  # in the second part
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    progress = json.loads((Path(str(out) + ".work") / "manifest.json").read_text())["stages"]["assemble"]["low_disk"]
    assert 8 < progress["tensors"] < 30 and len(progress["lengths"]) == 4
    rerun = run_cli(*args)
    assert "continuing the unfinished output after" in rerun.stderr
    for r in refs:
        assert filecmp.cmp(tmp_path / r.name, r, shallow=False), r.name
    assert code_dirs(Path(str(out) + ".work")) == []
