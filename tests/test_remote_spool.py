"""The spool (pipeline/spool.py): a remote checkpoint's float tensors fetched into the run directory
while the stages before assemble run, and taken by assemble's reads.

Against fsspec's memory:// filesystem: ranges fetched in order, served byte-exact once and their
files removed, a damaged file refused, a range its reader asked for first left to it, a killed
run's files taken up again only for the same ranges and version. Against the test HTTP server
(tests/remote_server.py, throttled): the float tensors come over while quantize still fetches the
projections, each byte once, the output is the local conversion's, the spool leaves nothing; a
kill while it fetches resumes without fetching again what it had recorded.
"""
from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli
from tests.remote_server import CheckpointServer
from tests.test_remote_sources import assert_no_weights_on_disk, env_for


# -- the spool on its own (memory://) ------------------------------------------------------------------

@pytest.fixture
def blob():
    import fsspec

    data = np.random.default_rng(7).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    fs = fsspec.filesystem("memory")
    fs.pipe("/spool-test/blob.bin", data)
    yield "memory://spool-test/blob.bin", data
    fs.rm("/spool-test", recursive=True)


def counting_fetches(monkeypatch, gate: threading.Event | None = None, gated_start: int | None = None) -> list:
    """Record the start offset of every request the spool makes (`gated_start`: held until `gate`)."""
    from pipeline import remote

    seen = []
    real = remote.fetch_async

    def fetch(url, start, end, version=""):
        seen.append(start)
        if gate is not None and start == gated_start:
            return remote._POOL.submit(lambda: (gate.wait(30), real(url, start, end, version).result())[1])
        return real(url, start, end, version)
    monkeypatch.setattr(remote, "fetch_async", fetch)
    return seen


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the spool did not get there"
        time.sleep(0.01)


def test_spooled_ranges_are_served_byte_exact_once_and_their_files_removed(blob, tmp_path, monkeypatch):
    from pipeline import spool

    url, data = blob
    monkeypatch.setattr(spool.remote, "REQUEST_BYTES", 4096)  # several requests per range
    seen = counting_fetches(monkeypatch)
    ranges = [(url, a, 10_000 + a % 13, "v1") for a in range(0, 8 * 65536, 65536)]
    s = spool.Spool(tmp_path / "spool", ranges)
    try:
        wait_for(lambda: not s.thread.is_alive())  # every range fetched and recorded
        index = json.loads((tmp_path / "spool" / "index.json").read_text())
        assert [(e["offset"], e["n"]) for e in index] == [(a, n) for _, a, n, _ in ranges]
        for _, a, n, v in ranges:
            buf = bytearray(n)
            assert s.take(url, a, memoryview(buf), v)
            assert bytes(buf) == data[a:a + n]
            assert not s.take(url, a, memoryview(bytearray(n)), v), "a range is served once"
        assert not s.take(url, 3, memoryview(bytearray(10)), "v1"), "a range not spooled is the reader's"
        assert not s.take(url, 0, memoryview(bytearray(10_000)), "v2"), "nor one of another version"
    finally:
        s.close()
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["index.json"]
    assert sorted(set(seen)) == sorted(seen), "no request made twice"
    assert sum(1 for _ in seen) == sum(-(-n // 4096) for _, _, n, _ in ranges)


def test_a_damaged_file_is_refused_and_a_range_its_reader_asked_for_first_is_left_to_it(blob, tmp_path, monkeypatch):
    from pipeline import spool

    url, data = blob
    gate = threading.Event()
    ranges = [(url, a, 4096, "v") for a in (0, 8192, 16384, 24576)]
    seen = counting_fetches(monkeypatch, gate, gated_start=8192)
    s = spool.Spool(tmp_path / "spool", ranges)
    try:
        wait_for(lambda: s.state.get(0) == "done" and s.state.get(1) == "fetching")
        assert not s.take(url, 16384, memoryview(bytearray(4096)), "v"), "not begun: its reader fetches it"
        with open(s._path(0), "r+b") as f:  # one byte changed on disk
            f.seek(100)
            f.write(bytes([data[100] ^ 1]))
        assert not s.take(url, 0, memoryview(bytearray(4096)), "v"), "a damaged file is fetched again"
        assert not s._path(0).exists()
        gate.set()
        buf = bytearray(4096)
        assert s.take(url, 8192, memoryview(buf), "v"), "a range being fetched is waited for"
        assert bytes(buf) == data[8192:12288]
        wait_for(lambda: s.state.get(3) == "done")
    finally:
        gate.set()
        s.close()
    assert 16384 not in seen, "the range its reader took is not fetched by the spool"


def test_a_link_or_fifo_planted_in_the_spool_is_never_written_through_nor_waited_on(blob, tmp_path, monkeypatch):
    """The spool's directory is in the run directory, which other processes can write to: a link at
    a temporary name is replaced, not written through; a FIFO at a finished range's name is not
    opened for reading (that would wait for a writer forever): the range is its reader's."""
    from pipeline import spool

    url, data = blob
    gate = threading.Event()
    ranges = [(url, a, 4096, "v") for a in (0, 8192, 16384)]
    counting_fetches(monkeypatch, gate, gated_start=8192)
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's file")
    s = spool.Spool(tmp_path / "spool", ranges)
    try:
        wait_for(lambda: s.state.get(0) == "done" and s.state.get(1) == "fetching")
        os.symlink(victim, f"{s._path(2)}.partial")  # before range 2 begins
        s._path(0).unlink()
        os.mkfifo(s._path(0))
        assert not s.take(url, 0, memoryview(bytearray(4096)), "v"), "a FIFO is not read: the reader fetches"
        gate.set()
        wait_for(lambda: s.state.get(2) == "done")
        buf = bytearray(4096)
        assert s.take(url, 16384, memoryview(buf), "v")
        assert bytes(buf) == data[16384:20480]
    finally:
        gate.set()
        s.close()
    assert victim.read_bytes() == b"someone else's file"


def test_a_killed_runs_files_are_taken_up_for_the_same_ranges_only(blob, tmp_path, monkeypatch):
    from pipeline import spool

    url, data = blob
    ranges = [(url, a, 4096, "v") for a in (0, 8192, 16384)]
    s = spool.Spool(tmp_path / "spool", ranges)
    wait_for(lambda: not s.thread.is_alive())
    s.close()
    (tmp_path / "spool" / "000001.bin.partial").write_bytes(b"left by a kill")
    seen = counting_fetches(monkeypatch)
    again = spool.Spool(tmp_path / "spool", ranges)  # the rerun: nothing fetched again
    try:
        wait_for(lambda: again.thread.is_alive() is False)
        buf = bytearray(4096)
        assert again.take(url, 16384, memoryview(buf), "v") and bytes(buf) == data[16384:20480]
    finally:
        again.close()
    assert seen == []
    assert not (tmp_path / "spool" / "000001.bin.partial").exists()
    changed = spool.Spool(tmp_path / "spool", [(u, a, n, "w") for u, a, n, _ in ranges])  # a new version
    try:
        wait_for(lambda: all(changed.state.get(i) == "done" for i in range(3)))
    finally:
        changed.close()
    assert sorted(seen) == [0, 8192, 16384]


# -- in a conversion (the test HTTP server) --------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(checkpoint, its local conversion): a packed checkpoint whose embedding and head (F16 in the
    output, BF16 in the checkpoint) are about half its bytes, as in the packed 8B."""
    from tests.synthetic import write_checkpoint

    base = tmp_path_factory.mktemp("spool")
    ckpt = write_checkpoint(base / "llama3-8b-packed", "llama3-1.58", hidden_size=256, intermediate_size=2048,
                            num_layers=4, num_heads=4, num_kv_heads=4, vocab_size=2048)
    ref = base / "local.gguf"
    run_cli("convert", ckpt, "-o", ref, "--no-progress", "--memory-limit", "512MiB")
    return ckpt, ref


def float_spans(ckpt: Path) -> list[tuple[int, int]]:
    """[start, end) in the file of the checkpoint's float (non-projection) tensors, from its header."""
    raw = (ckpt / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return [(8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and v["dtype"] in ("BF16", "F16", "F32") and "proj" not in k]


def weight_requests(server) -> list[dict]:
    return [dict(e, start=int(e["range"][6:].split("-")[0]), end=int(e["range"].split("-")[1]) + 1)
            for e in server.log if e["method"] == "GET" and e["path"].endswith(".safetensors") and e["range"]
            and e["status"] in (200, 206)]


def is_float(request: dict, spans) -> bool:
    return any(a <= request["start"] < b for a, b in spans)


def test_the_float_tensors_come_over_under_quantize_once_and_leave_nothing(packed, tmp_path):
    ckpt, ref = packed
    srv = CheckpointServer(ckpt)
    srv.throttle = 2_000_000  # 4 MB: two seconds, the float tensors' half read while quantize reads the other
    try:
        out = tmp_path / "remote.gguf"
        run_cli("convert", srv.dir_url, "-o", out, "--no-progress", "--memory-limit", "512MiB",
                env=env_for(srv, tmp_path))
        requests = weight_requests(srv)
    finally:
        srv.close()
    assert filecmp.cmp(out, ref, shallow=False)
    spans = float_spans(ckpt)
    floats = [r for r in requests if is_float(r, spans)]
    projections = [r for r in requests if not is_float(r, spans) and r["start"] > 8 + 4096]  # past the header
    projections = [r for r in requests if not is_float(r, spans)]
    # each float byte once (the output has them all: no byte more is no byte twice), in requests that
    # began before the projections' reads ended
    assert sum(r["end"] - r["start"] for r in floats) == sum(b - a for a, b in spans)
    assert min(r["begun"] for r in floats) < max(r["ended"] for r in projections), \
        "the float tensors were fetched only after the projections"
    work = Path(str(out) + ".work")
    assert not (work / "spool").exists()
    assert_no_weights_on_disk(ckpt, work)


def test_a_kill_while_spooling_resumes_without_fetching_the_recorded_ranges_again(packed, tmp_path):
    ckpt, ref = packed
    out = tmp_path / "remote.gguf"
    work = Path(str(out) + ".work")
    srv = CheckpointServer(ckpt)
    try:
        env = {**env_for(srv, tmp_path), "PYTHONPATH": str(ROOT)}
        srv.throttle = 1_000_000
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "convert", srv.dir_url, "-o", str(out),
                                 "--no-progress", "--memory-limit", "512MiB"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        index = work / "spool" / "index.json"

        def present() -> list:
            """The recorded ranges whose files are there (assemble removes those it took)."""
            try:
                entries = json.loads(index.read_text())
            except (OSError, ValueError):
                return []
            return [e for e in entries if (work / "spool" / e["file"]).is_file()]
        deadline = time.monotonic() + 120
        while not present() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "killed mid-run, not after it finished"
        kept = present()
        assert 0 < len(kept) < len(float_spans(ckpt)), "killed while the spool was fetching"
        srv.throttle = 0
        srv.log.clear()
        run_cli("convert", srv.dir_url, "-o", out, "--no-progress", "--memory-limit", "512MiB", env=env)
        again = {(r["start"], r["end"] - r["start"]) for r in weight_requests(srv)}
    finally:
        srv.close()
    assert filecmp.cmp(out, ref, shallow=False)
    assert not [e for e in kept if (e["offset"], e["n"]) in again], "a recorded range is not fetched again"
    assert not (work / "spool").exists()
    assert_no_weights_on_disk(ckpt, work)


def test_the_test_servers_throttle_is_one_link_for_all_connections(packed):
    """The bench's bare transfer time (bytes / rate) means something only if more connections buy no
    more bandwidth: 3.2 MB over 8 connections at 4 MB/s take at least 0.8 s (less one 64 KiB piece
    per connection, written at the start of its slot), as over one."""
    import concurrent.futures
    import urllib.request

    ckpt, _ = packed
    srv = CheckpointServer(ckpt)
    srv.throttle = 4_000_000
    url = srv.dir_url + "model.safetensors"
    n = 400_000  # 3.2 MB of the checkpoint's 3.9

    def get(i: int) -> int:
        req = urllib.request.Request(url, headers={"Range": f"bytes={8 + i * n}-{8 + (i + 1) * n - 1}"})
        with urllib.request.urlopen(req) as r:
            return len(r.read())
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(get, range(8))) == 8 * n
        requests = weight_requests(srv)
    finally:
        srv.close()
    span = max(r["ended"] for r in requests) - min(r["begun"] for r in requests)
    assert span >= (8 * n - 8 * 65536) / srv.throttle, span
