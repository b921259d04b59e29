"""Every window between two run-directory writes: a conversion killed there is taken up by the same command.

tests/write_points.py kills the converter from inside, just before its k-th write to the run
directory or the output (the lock, manifest.json, plan.json, metadata.json, a store made or
removed, the temporary GGUF, the rename into place): every k of a conversion into a new run
directory, and every k up to the first store it makes of a rerun whose --type redoes pack and
assemble and of a rerun of a run directory that lost its manifest (their later windows are the
new run's). The rerun must finish with a clean conversion's bytes. Two identical commands
meet in every window of the run directory's set-up (one is held there) and are started at once:
one runs, the other is refused in one line, and a rerun finishes byte-identical.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from tests import kill_points as kp
from tests import write_points
from tests.conftest import ROOT, convert, popen_cli

MEMORY_LIMIT = "512MiB"
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
BUSY = "another conversion is running in this run directory"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The checkpoint, and a clean conversion's bytes for --type tq2_0 and tq1_0. One layer: the
    run-directory writes (37 of a new run) do not depend on the number of tensors, and each of the
    kills and reruns costs about a quarter less CPU than with two layers."""
    from tests.synthetic import write_bitnet_checkpoint

    root = tmp_path_factory.mktemp("windows")
    model = write_bitnet_checkpoint(root / "model", num_layers=1)
    files = {}
    for out_type in ("tq2_0", "tq1_0"):
        out = root / f"clean-{out_type}.gguf"
        convert(model, out, "--type", out_type, "--memory-limit", MEMORY_LIMIT)
        files[out_type] = out.read_bytes()
    return model, files


def finished_run(model, d):
    """A finished tq2_0 run at d/work and d/model.gguf, kept aside to be put back before each kill."""
    out, work = d / "model.gguf", d / "work"
    convert(model, out, "--workdir", work, "--memory-limit", MEMORY_LIMIT)
    aside = d.parent / f"{d.name}-finished"
    shutil.copytree(d, aside, symlinks=True)
    return aside


def put_back(aside, d, lose_manifest: bool):
    shutil.rmtree(d, ignore_errors=True)
    if aside is None:
        d.mkdir()
        return
    shutil.copytree(aside, d, symlinks=True)
    if lose_manifest:
        (d / "work" / "manifest.json").unlink()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["new", "type change", "lost manifest"])
def test_a_kill_in_every_window_between_run_directory_writes_is_resumed(clean, tmp_path, run):
    model, files = clean
    extra = ("--type", "tq1_0") if run == "type change" else ()
    expected = files["tq1_0" if run == "type change" else "tq2_0"]
    before = files["tq2_0"]  # what the output may still hold when the kill lands before the rename
    d = tmp_path / "run"
    d.mkdir()
    aside = None if run == "new" else finished_run(model, d)
    out, work, log = d / "model.gguf", d / "work", tmp_path / "stderr.txt"

    put_back(aside, d, run == "lost manifest")
    writes = kp.recorded_writes(ROOT, model, out, work, MEMORY_LIMIT, log, *extra)
    assert out.read_bytes() == expected
    # the windows that matter most are there: before and after plan.json, the first manifest, a store
    names = " ".join(writes)
    assert "plan.json" in names and "manifest.json" in names and ".partial" in names, writes
    seed = kp.seed()
    rng = random.Random(f"{seed}:{run}")
    print(f"\n{run}: {len(writes)} run-directory writes; kill seed {seed} ({kp.SEED_ENV} picks another)")
    ref = kp.Reference(0.0, {}, 0, 0, len(writes))
    if run != "new":  # up to the first store made: removing the old ones, the manifest, the plan
        writes = writes[:next(i for i, w in enumerate(writes, start=1) if w.split()[1] == "os.mkdir")]
    for k, write in enumerate(writes, start=1):
        put_back(aside, d, run == "lost manifest")
        sig = rng.choice(SIGNALS)
        point = kp.KillPoint("write", 0.0, sig, MEMORY_LIMIT, at_write=k)
        where = f"seed {seed}, {run}: {point.describe()}, before «{write}»"
        killed = kp.interrupt(ROOT, model, out, work, point, ref, log, *extra)
        if sig == signal.SIGKILL:
            assert killed.returncode == -signal.SIGKILL, f"{where}: exit {killed.returncode}\n{killed.stderr}"
        else:
            assert killed.returncode == 130, f"{where}: exit {killed.returncode}\n{killed.stderr}"
            lines = killed.stderr.strip().splitlines()
            assert lines and lines[-1].startswith("bitnet-gguf: interrupted") and "Traceback" not in killed.stderr, \
                f"{where}\n{killed.stderr}"
            left = kp.partials(work, out)
            assert not left, f"{where}: {sig.name} left temporary files {[str(p) for p in left]}"
        assert not out.exists() or out.read_bytes() in (before, expected), \
            f"{where}: the output path holds a file that is neither the old nor the new GGUF"
        rerun = convert(model, out, "--workdir", work, "--memory-limit", MEMORY_LIMIT, *extra, check_exit=None)
        assert rerun.returncode == 0, f"{where}: the rerun exited {rerun.returncode}\n{rerun.stderr}"
        assert out.read_bytes() == expected, f"{where}: the rerun's file differs from a clean conversion"
        left = kp.partials(work, out)
        assert not left, f"{where}: temporary files left after the rerun: {[str(p) for p in left]}"


def held_at(model, out, work, k: int, pause: str, log):
    """A conversion held just before its k-th run-directory write (write_points' pause)."""
    proc = kp.start(ROOT, model, out, work, MEMORY_LIMIT, log,
                    watch={write_points.PAUSE_AT_ENV: str(k), write_points.PAUSE_FILE_ENV: pause})
    deadline = time.monotonic() + kp.TIMEOUT
    while not os.path.exists(pause + ".paused"):
        assert proc.poll() is None, f"the held conversion ended first:\n{log.read_text()}"
        assert time.monotonic() < deadline, "the held conversion never reached its write"
        time.sleep(0.02)
    return proc


def check_pair(codes_and_logs, where: str) -> None:
    """Of two identical commands, each finished or was refused in one line as busy; one finished."""
    for code, stderr in codes_and_logs:
        if code != 0:
            assert code == 2 and BUSY in one_line(stderr), f"{where}: exit {code}\n{stderr}"
    assert 0 in [code for code, _ in codes_and_logs], f"{where}: neither command finished"


@pytest.mark.slow
def test_two_identical_commands_meet_in_every_window_of_the_set_up(clean, tmp_path):
    """One command is held before each write of the run directory's set-up (up to the first
    store) while the same command runs: before the lock the second takes the directory over, after
    it the second is refused as busy; either way both end well and a rerun finishes."""
    model, files = clean
    d = tmp_path / "run"
    d.mkdir()
    out, work = d / "model.gguf", d / "work"
    writes = kp.recorded_writes(ROOT, model, out, work, MEMORY_LIMIT, tmp_path / "record.txt")
    set_up = next(i for i, w in enumerate(writes, start=1) if ".zarr" in w)
    for k in range(1, set_up + 1):
        shutil.rmtree(d)
        d.mkdir()
        pause = str(tmp_path / f"pause-{k}")
        first_log = tmp_path / f"first-{k}.txt"
        first = held_at(model, out, work, k, pause, first_log)
        try:
            second = convert(model, out, "--workdir", work, "--memory-limit", MEMORY_LIMIT, check_exit=None)
        finally:
            open(pause + ".go", "w").close()
            code = first.wait(timeout=kp.TIMEOUT)
        where = f"held before write {k} ({writes[k - 1]})"
        check_pair([(code, first_log.read_text()), (second.returncode, second.stderr)], where)
        again = convert(model, out, "--workdir", work, "--memory-limit", MEMORY_LIMIT)
        assert again.stderr.count("already done") == 4, f"{where}: the rerun redid work\n{again.stderr}"
        assert out.read_bytes() == files["tq2_0"], f"{where}: the file differs from a clean conversion"


def test_two_identical_commands_started_at_once(clean, tmp_path):
    model, files = clean
    for round_ in range(3):
        d = tmp_path / f"round{round_}"
        d.mkdir()
        out, work = d / "model.gguf", d / "work"
        cmd = ["convert", model, "-o", out, "--workdir", work, "--memory-limit", MEMORY_LIMIT, "--no-progress"]
        procs = [popen_cli(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]  # forked
        results = [(p.wait(timeout=kp.TIMEOUT), p.stderr.read()) for p in procs]
        for p in procs:
            p.stderr.close()
        check_pair(results, f"round {round_}")
        convert(model, out, "--workdir", work, "--memory-limit", MEMORY_LIMIT)
        assert out.read_bytes() == files["tq2_0"], f"round {round_}: the file differs from a clean conversion"
