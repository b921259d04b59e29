"""Conversions at the same time: to one output from two run directories (raced and interleaved),
two in one run directory, and `status` polled while conversions start.

An output is never a mix and never another run's file under our name: the loser of a race keeps
its file beside the output and says where, in one line; the winner's file verifies against its
own checkpoint. A second conversion in a busy run directory is refused in one line and the first
finishes; `status` never makes a conversion refuse.
"""
from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import convert, popen_cli, run_cli
from tests.hostile import ERROR, assert_same, cli, one_line, partials, rewrite_in_place, tree
from tests.hostile import fresh, model, out, pristine  # noqa: F401 (fixtures)


def test_concurrent_conversions_to_one_output_never_leave_a_wrong_file(fresh, tmp_path):
    """Rounds of two runs (different checkpoints, different run directories) racing to one -o."""
    import gguf

    models = {name: fresh("1bitllm", name) for name in ("alpha", "beta")}
    rewrite_in_place(models["beta"] / "model.safetensors")  # different weights, same shapes
    out = tmp_path / "race" / "m.gguf"
    out.parent.mkdir()
    for rnd in range(4):
        if rnd % 2 == 0 and out.exists():
            out.unlink()
        # two processes at once (forked from the two servers: tests/conftest.py popen_cli)
        procs = {name: popen_cli("convert", m, "-o", out, "--no-progress", "--workdir", tmp_path / f"work-{name}",
                                 stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
                 for name, m in models.items()}
        results = {name: (p.wait(timeout=300), p.stderr.read()) for name, p in procs.items()}
        left = []
        for name, (code, err) in results.items():
            assert code in (0, 2), (name, code, err)
            if code == 2:
                line = err.strip().splitlines()[-1]
                assert line.startswith(ERROR) and [x for x in err.splitlines() if "error" in x] == [line], err
                m = re.search(r"stays at (\S+)", line)
                assert m, line
                kept = Path(m.group(1))
                assert kept.parent == out.parent and kept.read_bytes()[:4] == b"GGUF"
                left.append(kept)
        assert sorted(partials(out.parent)) == sorted(left), results
        winner = gguf.GGUFReader(out).fields["general.name"]
        name = bytes(winner.parts[winner.data[0]]).decode().lower()  # "Alpha": llama.cpp's title of the name
        proc = run_cli("verify", out, models[name], check_exit=None)
        assert proc.returncode == 0, (rnd, name, results, proc.stdout[-2000:])
        for kept in left:
            kept.unlink()


@pytest.mark.parametrize("when", ["quantize: running", "assemble: running"])
def test_an_output_another_run_wrote_meanwhile_is_not_replaced_and_a_rerun_replaces_it(fresh, tmp_path, when):
    """The same race, interleaved on purpose: B finishes while A works."""
    import gguf

    from pipeline.config import make_options
    from pipeline.errors import RunDirError
    from pipeline.runner import convert as run_convert

    alpha, beta = fresh("1bitllm", "alpha"), fresh("1bitllm", "beta")
    rewrite_in_place(beta / "model.safetensors")
    out = tmp_path / "race" / "m.gguf"
    out.parent.mkdir()
    opts = make_options(alpha, output=out, workdir=tmp_path / "work-alpha", progress=False)

    def log(line):
        if line == when:
            convert(beta, out, "--workdir", tmp_path / "work-beta")
    with pytest.raises(RunDirError, match="another process") as e:
        run_convert(opts, log)
    kept = Path(re.search(r"stays at (\S+)", str(e.value)).group(1))
    assert partials(out.parent) == [kept]

    def name_of(path):
        field = gguf.GGUFReader(path).fields["general.name"]
        return bytes(field.parts[field.data[0]]).decode()
    assert name_of(out) == "Beta" and name_of(kept) == "Alpha"  # titles of the names, as llama.cpp's converter
    run_cli("verify", out, beta)
    proc = convert(alpha, out, "--workdir", tmp_path / "work-alpha")  # the message's other advice
    assert "assemble: running" in proc.stderr
    assert name_of(out) == "Alpha" and not partials(out.parent)
    run_cli("verify", out, alpha)


def test_a_second_conversion_in_a_busy_run_directory_is_refused_and_the_first_finishes(model, out):
    from pipeline.config import make_options
    from pipeline.runner import convert as run_convert

    opts = make_options(model, output=out, progress=False)
    second = []

    def log(line):
        if line in ("extract: running", "assemble: running"):
            before = tree(model, out.parent, skip=[opts.workdir])
            second.append(convert(model, out, check_exit=None, timeout=120))
            assert_same(before, tree(model, out.parent, skip=[opts.workdir]))
    run_convert(opts, log)
    assert len(second) == 2
    for proc in second:
        assert proc.returncode == 2 and "another conversion is running" in one_line(proc)
    run_cli("verify", out, model)


def test_status_polled_continuously_never_makes_a_conversion_refuse(model, out):
    """One thread runs `status` as a command, another asks what it asks (the manifest, whether the
    lock is held) in a tight loop, while 20 conversions start in the same run directory."""
    from pipeline.rundir import RunDir

    work = out.with_name("m.gguf.work")
    convert(model, out)
    stop = threading.Event()
    polls, asked = [], []

    def poll():
        while not stop.is_set():
            polls.append(run_cli("status", work, check_exit=None).returncode)

    def ask():
        run = RunDir(work)
        while not stop.is_set():
            asked.append((bool(run.load()), run.is_locked()))
    threads = [threading.Thread(target=poll), threading.Thread(target=ask)]
    for t in threads:
        t.start()
    try:
        codes = []
        for _ in range(20):  # in this process, so they start often; each takes the lock
            proc = cli("convert", model, "-o", out, "--no-progress")
            codes.append((proc.returncode, proc.stderr[-300:]))
        while len(polls) < 3:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [c for c, _ in codes] == [0] * 20, [c for c in codes if c[0]]
    assert set(polls) == {0}, polls
    assert len(asked) > 100 and all(loaded for loaded, _ in asked)
    assert any(locked for _, locked in asked), "the asking never overlapped a conversion"
