"""The converter without Linux's calls (os.preadv, os.pread, os.copy_file_range, fcntl,
/proc/locks): what macOS and Windows lack. pipeline/portable.py chooses each call once at import; here
the whole conversion, a kill and a resume, `status`, a refused second conversion and `verify` run
with those calls hidden (tests/without_linux_calls.py), and the file must be byte-identical to
a normal run's."""
from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import time

import pytest

from tests import kill_points as kp
from tests.conftest import convert, popen_cli, run_cli

# forked from servers that hid the calls before they imported anything else (tests/conftest.py fork_servers)
HIDDEN = {"module": "tests.without_linux_calls", "preload": "tests.without_linux_calls:hide,*"}


def without_linux_calls(*args, check_exit: int | None = 0) -> subprocess.CompletedProcess:
    return run_cli(*args, check_exit=check_exit, **HIDDEN)


def test_the_hidden_calls_make_portable_choose_its_other_paths():
    chosen = without_linux_calls("--choices").stdout.split()
    assert chosen == ["_read_into_seek", "_copy_buffered", "lockf", "_held_by_trying"]


@pytest.mark.parametrize("family", ["1bitllm", "llama3-1.58"])
def test_convert_kill_resume_status_verify_without_linux_calls(tmp_path, family):
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "model", family, hidden_size=512, intermediate_size=1024, num_layers=2,
                             num_heads=4, vocab_size=16384)
    expected = tmp_path / "normal.gguf"
    convert(model, expected, "--memory-limit", "512MiB")

    out, work, log = tmp_path / "portable.gguf", tmp_path / "portable.work", tmp_path / "log"
    with open(log, "wb") as err:
        proc = popen_cli("convert", model, "-o", out, "--workdir", work, "--memory-limit", "512MiB", "--no-progress",
                         stdout=subprocess.DEVNULL, stderr=err, **HIDDEN)
    try:
        deadline = time.monotonic() + 300
        while kp.count_chunks(work / "quantize.zarr") < 2:  # killed inside quantize, extract done
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)  # held still inside quantize, with its lock
        status = without_linux_calls("status", work).stdout
        assert "(a conversion is running)" in status, status
        second = without_linux_calls("convert", model, "-o", out, "--workdir", work, "--no-progress", check_exit=2)
        assert "another conversion is running" in second.stderr
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()

    status = without_linux_calls("status", work).stdout  # the dead process's lock is gone with it
    assert "(a conversion is running)" not in status and "interrupted" in status, status
    resumed = without_linux_calls("convert", model, "-o", out, "--workdir", work, "--memory-limit", "512MiB",
                                  "--no-progress")
    assert "extract: already done" in resumed.stderr, resumed.stderr
    assert filecmp.cmp(out, expected, shallow=False), "the file written without Linux's calls differs"
    assert "done" in without_linux_calls("status", work).stdout
    assert "OK" in without_linux_calls("verify", out, model).stdout


def test_portable_reads_and_copies_match_the_bytes(tmp_path, monkeypatch):
    from pipeline import portable

    data = os.urandom(300_000)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data)
    dst.write_bytes(b"\xee" * 1000)
    monkeypatch.setattr(portable, "COPY_BUFFER", 4096)  # several rounds of the buffer
    fd_in = portable.open_read(src)
    fd_out = os.open(dst, os.O_RDWR)
    try:
        for read in (portable._read_into_seek, portable.read_into):
            buf = bytearray(5000)
            assert read(fd_in, memoryview(buf), 123_456) == 5000 and bytes(buf) == data[123_456:128_456]
            assert read(fd_in, memoryview(buf), len(data) - 10) == 10 and bytes(buf[:10]) == data[-10:]
        for copy in (portable._copy_buffered, portable.copy_range):
            assert copy(fd_in, fd_out, 50_000, 7, 500) == 50_000
            assert copy(fd_in, fd_out, 100, len(data) - 40, 60_000) == 40  # the source ends first
            got = dst.read_bytes()
            assert got[:500] == b"\xee" * 500 and got[500:50_500] == data[7:50_007]
            assert got[60_000:60_040] == data[-40:]
    finally:
        os.close(fd_in)
        os.close(fd_out)
