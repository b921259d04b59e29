"""The tests' way of running the command line (tests/conftest.py `run_cli`, tests/cli_server.py):
a run forked from the server must look to a test like an ordinary `python -m pipeline` process."""
from __future__ import annotations

import os
import subprocess
import sys
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
