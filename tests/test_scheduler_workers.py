"""--scheduler tcp://...: a cluster whose only worker dies mid-run is reported, given up on, and resumed.

A dask scheduler is started in the test (distributed.LocalCluster without workers of its own)
with one worker process; the worker is killed once extract is done. The conversion must say
that it waits for a worker, give up after --worker-timeout with one line and exit 1, and a
rerun with a new worker must continue (extract not redone) to a clean conversion's bytes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, convert, popen_cli, run_cli

WORKER_TIMEOUT = 2  # seconds a conversion waits for a worker before it gives up: the wait is the point, not its length


@pytest.fixture
def cluster():
    """A scheduler with no workers; `start_worker()` adds one process (killable)."""
    from distributed import Client, LocalCluster

    local = LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1", scheduler_port=0,
                         dashboard_address=None)
    client = Client(local)
    workers = []

    def start_worker() -> subprocess.Popen:
        dask = Path(sys.executable).with_name("dask")
        proc = subprocess.Popen([str(dask), "worker", local.scheduler_address, "--nthreads", "1", "--no-nanny",
                                 "--no-dashboard", "--memory-limit", "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        workers.append(proc)
        client.wait_for_workers(len([w for w in workers if w.poll() is None]), timeout=120)
        return proc

    yield local.scheduler_address, start_worker
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    client.close()
    local.close()


def exit_after_killing_at_extract_done(proc, log: Path, victim) -> tuple[int, float]:
    """Kill `victim` (a dask worker or scheduler process) once the conversion `proc` logs that
    extract is done; (the conversion's exit status, when the victim was gone)."""
    try:
        deadline = time.monotonic() + 300
        while "extract: done" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        return proc.wait(timeout=300), killed_at
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_cluster_whose_only_worker_dies_gives_up_and_the_rerun_continues(cluster, tmp_path):
    from tests.synthetic import write_bitnet_checkpoint

    address, start_worker = cluster
    model = write_bitnet_checkpoint(tmp_path / "model")
    clean = tmp_path / "clean.gguf"
    convert(model, clean)
    out, work, log = tmp_path / "m.gguf", tmp_path / "work", tmp_path / "stderr.txt"
    worker = start_worker()
    with open(log, "wb") as err:  # forked from the test server (tests/conftest.py popen_cli), as run_cli's commands
        proc = popen_cli("convert", model, "-o", out, "--workdir", work, "--no-progress", "--scheduler", address,
                         "--worker-timeout", WORKER_TIMEOUT, stdout=subprocess.DEVNULL, stderr=err)
    code, killed_at = exit_after_killing_at_extract_done(proc, log, worker)
    text = log.read_text()
    assert code == 1, f"exit {code}\n{text}"
    assert time.monotonic() - killed_at >= WORKER_TIMEOUT - 1
    waiting = [line for line in text.splitlines() if "no dask worker is connected; waiting" in line]
    assert len(waiting) == 1 and "--worker-timeout" in waiting[0], text
    last = text.strip().splitlines()[-1]
    assert last.startswith("bitnet-gguf: failed: --scheduler") and "--worker-timeout" in last \
        and "rerun" in last and "Traceback" not in text, text
    assert not out.exists()

    start_worker()
    rerun = convert(model, out, "--workdir", work, "--scheduler", address, "--worker-timeout", str(WORKER_TIMEOUT))
    assert "extract: already done" in rerun.stderr, rerun.stderr
    assert out.read_bytes() == clean.read_bytes()


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf", "nan"])
def test_a_worker_timeout_that_is_no_positive_number_is_refused(checkpoint, tmp_path, value):
    out = tmp_path / "m.gguf"
    proc = run_cli("convert", checkpoint(), "-o", out, "--worker-timeout", value, check_exit=2)
    assert proc.stderr.count("\n") == 1 and "--worker-timeout" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model0"]


def test_the_worker_timeout_is_in_the_help():
    text = run_cli("convert", "--help").stdout
    assert "--worker-timeout SECONDS" in text


@pytest.fixture
def own_scheduler(tmp_path):
    """A dask scheduler in a process of its own (killable) with one worker: (address, scheduler process)."""
    import json

    dask = Path(sys.executable).with_name("dask")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    info = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(info)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)]
    try:
        deadline = time.monotonic() + 120
        while not (info.exists() and info.read_text().strip()):
            assert time.monotonic() < deadline and procs[0].poll() is None, "the scheduler did not start"
            time.sleep(0.05)
        address = json.loads(info.read_text())["address"]
        procs.append(subprocess.Popen([str(dask), "worker", address, "--nthreads", "1", "--no-nanny",
                                       "--no-dashboard", "--memory-limit", "0"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        from distributed import Client
        with Client(address, timeout=120) as client:
            client.wait_for_workers(1, timeout=120)
        yield address, procs[0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_a_scheduler_that_goes_away_mid_run_is_one_line_and_the_rerun_continues(own_scheduler, tmp_path):
    """The scheduler's process killed while the conversion waits for its tasks: distributed's client
    logged its reconnection's traceback, then the run ended with 'FutureCancelledError'. One line
    naming --scheduler, exit 1, and a rerun (here on the threaded scheduler) continues."""
    from tests.synthetic import write_bitnet_checkpoint

    address, scheduler = own_scheduler
    model = write_bitnet_checkpoint(tmp_path / "model")
    clean = tmp_path / "clean.gguf"
    convert(model, clean)
    out, work, log = tmp_path / "m.gguf", tmp_path / "work", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out), "--workdir", str(work),
               "--no-progress", "--scheduler", address, "--worker-timeout", "600"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    code, _ = exit_after_killing_at_extract_done(proc, log, scheduler)
    text = log.read_text()
    assert code == 1, f"exit {code}\n{text}"
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"bitnet-gguf: failed: --scheduler {address}: lost the connection") and "rerun" in last, text
    assert "Traceback" not in text and "ERROR" not in text, text
    assert not out.exists()
    rerun = convert(model, out, "--workdir", work)
    assert "extract: already done" in rerun.stderr, rerun.stderr
    assert out.read_bytes() == clean.read_bytes()
