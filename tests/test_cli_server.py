"""The tests' way of running the command line (tests/conftest.py `run_cli`, tests/cli_server.py):
a run forked from the server must look to a test like an ordinary `python -m pipeline` process."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import _FORK_SERVERS, ROOT, run_cli

def test_a_forked_run_is_served_and_behaves_as_a_process_of_its_own(tmp_path):
    """Exit status, stdout and stderr, working directory: the same as an ordinary process's."""
    if not _FORK_SERVERS.enabled:
        pytest.skip("BITNET_GGUF_TEST_FORK_SERVER=0")
    missing = tmp_path / "nope"
    served = run_cli("convert", missing, "-o", tmp_path / "x.gguf", "--no-progress", check_exit=2)
    assert _FORK_SERVERS.servers, "run_cli did not use the fork server"
    plain = subprocess.run([sys.executable, "-m", "pipeline", "convert", str(missing), "-o", str(tmp_path / "x.gguf"),
                            "--no-progress"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (served.returncode, served.stdout, served.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    # a relative path is taken from the working directory given (or the test's own)
    rel = run_cli("convert", "nope", "-o", "x.gguf", "--no-progress", check_exit=2, cwd=tmp_path)
    assert str(missing) in rel.stderr, rel.stderr
    os.chdir(tmp_path)
    try:
        assert str(missing) in run_cli("convert", "nope", "-o", "x.gguf", "--no-progress", check_exit=2).stderr
    finally:
        os.chdir(ROOT)


def test_consecutive_runs_come_from_two_servers_with_their_own_hash_seeds(tmp_path):
    """Two consecutive runs come from the two servers in turn, whose string hash seeds differ, as two
    ordinary processes' do (the tests comparing two conversions' bytes rely on it)."""
    if not _FORK_SERVERS.enabled:
        pytest.skip("BITNET_GGUF_TEST_FORK_SERVER=0")
    run_cli("status", tmp_path, check_exit=None)  # starts the servers if no test has yet
    (first, first_path), (second, second_path) = _FORK_SERVERS.servers
    assert first.pid != second.pid and first.poll() is None and second.poll() is None
    hashes = [Path(path + ".log").read_text().split("hash of a string: ")[1].split()[0]
              for path in (first_path, second_path)]
    assert hashes[0] != hashes[1], hashes
    before = _FORK_SERVERS.turn
    run_cli("status", tmp_path, check_exit=None)
    run_cli("status", tmp_path, check_exit=None)
    assert _FORK_SERVERS.turn == before + 2


def test_a_run_with_another_environment_is_an_ordinary_process(tmp_path, monkeypatch):
    """Modules read some variables when imported: a changed environment is not served by a fork."""
    served = _FORK_SERVERS.serves({**os.environ, "PYTHONPATH": str(ROOT)})
    monkeypatch.setenv("DASK_TEMPORARY_DIRECTORY", str(tmp_path))
    assert not _FORK_SERVERS.serves({**os.environ, "PYTHONPATH": str(ROOT)})
    assert served == _FORK_SERVERS.enabled


def test_a_run_past_its_timeout_is_killed(tmp_path):
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "m", "1bitllm", hidden_size=256, intermediate_size=512, num_layers=1)
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("convert", model, "-o", tmp_path / "m.gguf", "--no-progress", timeout=0.01)


PROBE = '''"""What a process's signals look like to it: each signal's disposition and the blocked set."""
import signal

def name(handler):
    if handler is signal.default_int_handler:
        return "python's SIGINT handler"
    return signal.Handlers(handler).name if handler in (signal.SIG_DFL, signal.SIG_IGN) else \
        "unknown" if handler is None else "a handler of its own"

for sig in sorted(signal.valid_signals()):
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        print(int(sig), name(signal.getsignal(sig)))
print("blocked", sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
'''


@pytest.mark.parametrize("default_sigint", [False, True], ids=["inherited", "default SIGINT"])
@pytest.mark.parametrize("caller", ["SIGINT handled", "SIGINT ignored"])
def test_a_forked_command_has_an_ordinary_processs_signal_dispositions(tmp_path, default_sigint, caller):
    """A forked child inherits the server's dispositions, the server those its caller gave it: they
    must be those a process started by the caller has, with SIGINT put back to its default when
    asked (tests/kill_points.py asks), also when the caller ignores SIGINT (pytest started in the
    background by a shell)."""
    from tests.conftest import ForkedProcess, ForkServers

    if not _FORK_SERVERS.enabled:
        pytest.skip("BITNET_GGUF_TEST_FORK_SERVER=0")
    (tmp_path / "probe.py").write_text(PROBE)

    def default() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    servers = ForkServers(sys.executable, "signal")  # servers of their own, started as the caller is now
    before = signal.signal(signal.SIGINT, signal.SIG_IGN if caller == "SIGINT ignored" else signal.default_int_handler)
    try:
        with servers.popen([], servers.env, tmp_path, "probe", subprocess.PIPE, None, default_sigint) as forked:
            assert isinstance(forked, ForkedProcess)
            got = forked.stdout.read()
        plain = subprocess.run([sys.executable, "-m", "probe"], cwd=tmp_path, capture_output=True, text=True,
                               env=servers.env, preexec_fn=default if default_sigint else None)
    finally:
        signal.signal(signal.SIGINT, before)
        servers.stop()
    assert forked.returncode == 0 and plain.returncode == 0, (got, plain.stderr)
    assert got == plain.stdout
    sigint = "SIG_IGN" if caller == "SIGINT ignored" and not default_sigint else "python's SIGINT handler"
    assert f"{int(signal.SIGINT)} {sigint}\n" in got, got


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_forked_command_left_running_ends_by_each_signal_as_an_ordinary_process(tmp_path, sig):
    """kill_points' way (popen_cli, SIGINT at its default): a conversion held before a run-directory
    write by tests/write_points.py is signalled by its pid. SIGTERM and SIGINT reach the CLI's own
    handling (exit 130, its one line), SIGKILL ends it (-9): the same exit status and stderr as an
    ordinary process's, and the forked child's CPU time reaches this process's figures."""
    from tests import kill_points as kp
    from tests import write_points
    from tests.conftest import _FORKED_CPU, ForkedProcess
    from tests.synthetic import write_bitnet_checkpoint

    model = write_bitnet_checkpoint(tmp_path / "model", num_layers=1)
    out, work, pause, log = tmp_path / "m.gguf", tmp_path / "m.work", str(tmp_path / "pause"), tmp_path / "log"
    outcomes = []
    for forked in (True, False):
        for leftover in (out, work, log, Path(pause + ".paused")):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        watch = {write_points.PAUSE_AT_ENV: "3", write_points.PAUSE_FILE_ENV: pause}
        cpu = _FORKED_CPU[0]
        if forked:
            proc = kp.start(ROOT, model, out, work, "512MiB", log, watch=watch)
            assert isinstance(proc, ForkedProcess) == _FORK_SERVERS.enabled
        else:
            with open(log, "ab") as err:
                proc = subprocess.Popen([sys.executable, "-m", "tests.write_points", "convert", str(model), "-o",
                                         str(out), "--workdir", str(work), "--memory-limit", "512MiB", "--no-progress"],
                                        stdout=subprocess.DEVNULL, stderr=err,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                                        env={**os.environ, "PYTHONPATH": str(ROOT), write_points.WATCH_ENV: str(work),
                                             write_points.OUTPUT_ENV: str(out), **watch})
        try:
            deadline = time.monotonic() + kp.TIMEOUT
            while not os.path.exists(pause + ".paused"):
                assert proc.poll() is None, f"ended before its third write:\n{log.read_text()}"
                assert time.monotonic() < deadline, "never reached its third write"
                time.sleep(0.01)
            assert proc.poll() is None
            proc.send_signal(sig)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if forked and _FORK_SERVERS.enabled:
            assert _FORKED_CPU[0] > cpu, "the forked command's CPU time was not counted"
        # the one known difference: the budget's baseline, the process's resident size (docs/testing.md)
        outcomes.append((code, re.sub(r"baseline [0-9.]+ MiB", "baseline N MiB", log.read_text())))
    assert outcomes[0] == outcomes[1], outcomes
    code, stderr = outcomes[0]
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL, outcomes
    else:
        assert code == 130 and stderr.splitlines()[-1] == "bitnet-gguf: interrupted; rerun the same command to continue", \
            outcomes
        assert "Traceback" not in stderr, stderr


def test_with_the_fork_server_off_a_command_left_running_is_an_ordinary_process(tmp_path, monkeypatch):
    """BITNET_GGUF_TEST_FORK_SERVER=0's way (the servers disabled): popen_cli is subprocess.Popen."""
    from tests.conftest import popen_cli

    monkeypatch.setattr(_FORK_SERVERS, "enabled", False)
    with popen_cli("status", tmp_path / "nope", stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert isinstance(proc, subprocess.Popen)
        err = proc.stderr.read()
    assert proc.returncode == 2 and str(tmp_path / "nope") in err, err
