"""Converting where the checkpoint lives: https://, hf:// and fsspec URLs, read by byte range.

A real threaded HTTP server started here (tests/remote_server.py) serves one small checkpoint as
a plain directory and as a Hub repository (HF_ENDPOINT pointed at it). Every remote conversion
must be byte-identical to the local conversion of the same files (one shared reference), leave
nothing of the weights on disk, survive injected faults and kills, start over when the files
changed between runs, refuse a change mid-run, and never write a credential anywhere.
"""
from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, popen_cli, run_cli
from tests.remote_server import CheckpointServer

REPO = "org/model"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
SECRET = "hf_SECRETtoken1234567890"
# a conversion run by main() in the pytest process: its budget starts from that process's resident
# size, several hundred MiB after a worker's earlier tests (a file's bytes do not depend on the limit)
IN_PROCESS_LIMIT = ("--memory-limit", "2GiB")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(checkpoint dir, reference GGUF, server): a sharded bf16 checkpoint named like the repository
    (general.name comes from the name), converted locally once."""
    from tests.synthetic import write_checkpoint

    base = tmp_path_factory.mktemp("remote")
    ckpt = write_checkpoint(base / "model", "1bitllm", hidden_size=256, intermediate_size=512, num_layers=2,
                            num_heads=4, vocab_size=512, dtype="bf16", shards=2)
    ref = base / "reference.gguf"
    run_cli("convert", ckpt, "-o", ref, "--no-progress", "--memory-limit", "512MiB")
    server = CheckpointServer(ckpt, repo=REPO, commit=COMMIT_A)
    yield ckpt, ref, server
    server.close()


@pytest.fixture
def server(served):
    _, _, srv = served
    srv.faults, srv.etags, srv.token, srv.gated, srv.throttle = [], {}, None, False, 0
    srv.change_after, srv.weight_reads, srv.commit, srv.ranges = 0, 0, COMMIT_A, True
    srv.log.clear()
    return srv


def env_for(server, tmp_path, **extra) -> dict:
    """The CLI's environment: the Hub at the test server, a private temporary directory (to see
    that the staged small files are removed), no token from the machine."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf-home"), "TMPDIR": str(tmp),
                "HF_HUB_DISABLE_TELEMETRY": "1", **extra})
    return env


def at_run_time(env) -> tuple[str, ...]:
    """The variables env_for sets or removes, which the command reads at run time only: huggingface_hub's
    HF_* (it is imported when the command reaches a Hub, never by the fork server's preload) and TMPDIR
    (tempfile reads it on first use). A command with such an environment is still forked from the
    server (tests/conftest.py run_cli, popen_cli); the hf:// tests show HF_ENDPOINT is the one given."""
    return tuple(sorted({k for k in (*env, *os.environ) if k.startswith("HF_")} | {"TMPDIR"}))


def remote_cli(*args, env, **kw):
    return run_cli(*args, env=env, read_at_run_time=at_run_time(env), **kw)


def convert_remote(url, out, env, *extra, check_exit=0):
    return remote_cli("convert", url, "-o", out, "--no-progress", "--memory-limit", "512MiB", *extra,
                      env=env, check_exit=check_exit)


def test_a_forked_command_reads_the_hub_and_the_temporary_directory_it_is_given(tmp_path):
    """What at_run_time says: a command given env_for's variables is forked (not an ordinary
    process), and huggingface_hub and tempfile in it see those variables, not the server's."""
    from tests.conftest import fork_servers

    class Stub:
        url = "http://127.0.0.1:9/stub"
    env = {**env_for(Stub(), tmp_path), "PYTHONPATH": str(ROOT)}  # as run_cli and popen_cli give it
    servers = fork_servers()
    if not servers.enabled:
        pytest.skip("BITNET_GGUF_TEST_FORK_SERVER=0: every command is an ordinary process")
    assert servers.serves(env, at_run_time(env))
    script = tmp_path / "show.py"
    script.write_text("import tempfile\nimport huggingface_hub.constants as c\n"
                      "print(c.ENDPOINT, c.HF_HOME, tempfile.gettempdir())\n")
    proc = servers.run([], env, None, 120, script=str(script))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [Stub.url, str(tmp_path / "hf-home"), str(tmp_path / "tmp")], proc.stdout


def weight_samples(ckpt: Path, n: int = 48) -> list[bytes]:
    """Pieces of the checkpoint's tensor bytes (past every header), to look for on disk."""
    rng = np.random.default_rng(0)
    out = []
    for f in sorted(ckpt.glob("*.safetensors")):
        raw = f.read_bytes()
        start = 8 + int.from_bytes(raw[:8], "little")
        for a in rng.integers(start, len(raw) - 64, n):
            out.append(raw[a:a + 64])
    return out


def files_under(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()]


def assert_no_weights_on_disk(ckpt: Path, *roots: Path) -> None:
    samples = weight_samples(ckpt)
    for p in files_under(*roots):
        data = p.read_bytes()
        hits = [s for s in samples if s in data]
        assert not hits, f"{p} holds checkpoint tensor bytes"


def data_bytes(ckpt: Path, twice=lambda name: False) -> tuple[int, int, int]:
    """(tensor bytes, header bytes, bytes of the tensors `twice` names) of the checkpoint's
    safetensors files, from their own bytes."""
    tensors = headers = again = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        sizes = {k: e - b for k, v in header.items() if k != "__metadata__" for b, e in [v["data_offsets"]]}
        tensors += sum(sizes.values())
        again += sum(v for k, v in sizes.items() if twice(k))
        headers += 8 + n
    return tensors, headers, again


def latent_projection(name: str) -> bool:
    """A bf16 BitNet checkpoint's ternary projections (q/k/v/o, gate/up/down), whose absmean scale
    needs a pass over all of a tensor before its first code: the tensors a conversion reads twice."""
    return name.endswith("_proj.weight")


# -- https:// -------------------------------------------------------------------------------------------

def test_https_source_converts_byte_identical_fetching_what_plan_said_and_storing_no_weights(served, server,
                                                                                              tmp_path):
    ckpt, ref, _ = served
    env = env_for(server, tmp_path)
    url = server.dir_url
    plan = remote_cli("plan", url, "-o", tmp_path / "model.gguf", "--memory-limit", "512MiB", env=env)
    # plan reads headers and small files only: no weight read past a header
    tensors, headers, twice = data_bytes(ckpt, latent_projection)
    assert 0 < twice < tensors
    assert server.sent(".safetensors") <= headers * 2  # the length, then the header (and the shard's length again)
    said = int(re.search(r"fetches about .*? \((\d+) bytes\)", plan.stdout)[1])
    small = sum((ckpt / n).stat().st_size for n in os.listdir(ckpt) if not n.endswith(".safetensors"))
    # each byte once, the latent projections' twice (extract's absmean pass, then quantize's codes)
    assert said == small + headers + tensors + twice, (said, small, headers, tensors, twice)

    server.log.clear()
    out = tmp_path / "model.gguf"
    proc = convert_remote(url, out, env)
    assert filecmp.cmp(out, ref, shallow=False)
    fetched = server.sent(".safetensors")
    # what plan said of the weight files (and the 8 bytes of each shard's header length, read twice):
    # no byte more, no digest blocks around a read (a remote file is pinned by its ETag)
    assert said - small <= fetched <= said - small + 8 * 2, (fetched, said - small)
    assert_no_weights_on_disk(ckpt, Path(str(out) + ".work"), tmp_path / "tmp")
    assert not list((tmp_path / "tmp").iterdir()), "the staged small files are removed at exit"
    assert "nothing of the weights is stored" in proc.stderr


def test_faults_are_retried_and_the_bytes_are_the_same(served, server, tmp_path):
    ckpt, ref, _ = served
    # spread over the run: extract's reads of the projections, then quantize's and assemble's reads
    server.faults = [f for fault in ("500", "reset", "truncate", "slow", "500") for f in [fault] + [None] * 5]
    server.slow_seconds = 1.0
    out = tmp_path / "model.gguf"
    convert_remote(server.dir_url, out, env_for(server, tmp_path))
    assert filecmp.cmp(out, ref, shallow=False)
    assert not [f for f in server.faults if f], "every injected fault was met"


def test_a_server_that_keeps_failing_stops_the_run_resumably_and_a_rerun_finishes(served, server, tmp_path,
                                                                                    monkeypatch, capsys):
    from pipeline import remote
    from pipeline.cli import main

    ckpt, ref, _ = served
    monkeypatch.setattr(remote, "RETRIES", 2)
    monkeypatch.setattr(remote, "RETRY_BASE", 0.01)
    out = tmp_path / "model.gguf"
    url = server.dir_url
    args = ["convert", url, "-o", str(out), "--no-progress", "--memory-limit", "512MiB"]
    server.faults = ["500"] * 6 + [None] * 3 + ["500"] * 10_000  # some chunks get through first
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"bitnet-gguf: failed: {url}") and "rerun the same command" in err[-1], err[-1]
    assert not out.exists()
    server.faults = []
    assert main(args) == 0
    assert filecmp.cmp(out, ref, shallow=False)


def test_a_kill_mid_run_resumes_to_the_same_bytes(served, server, tmp_path):
    ckpt, ref, _ = served
    out = tmp_path / "model.gguf"
    env = env_for(server, tmp_path)
    server.throttle = 2 * 1024**2
    cmd = ["convert", server.dir_url, "-o", str(out), "--no-progress", "--memory-limit", "512MiB"]
    for stop_after in (6, 30):  # in extract, then later (quantize reads the weights again)
        proc = popen_cli(*cmd, env=env, read_at_run_time=at_run_time(env), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while server.weight_reads < stop_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "killed mid-run, not after it finished"
    server.throttle = 0
    remote_cli("convert", server.dir_url, "-o", out, "--no-progress", "--memory-limit", "512MiB", env=env)
    assert filecmp.cmp(out, ref, shallow=False)
    assert_no_weights_on_disk(ckpt, Path(str(out) + ".work"))


def test_a_new_etag_between_runs_starts_over(served, server, tmp_path):
    ckpt, ref, _ = served
    out, env, url = tmp_path / "model.gguf", env_for(server, tmp_path), server.dir_url
    convert_remote(url, out, env)
    server.etags = {"model-00001-of-00002.safetensors": '"v2"'}
    proc = convert_remote(url, out, env)
    assert "the checkpoint changed since this run directory was made: starting over" in proc.stderr
    assert filecmp.cmp(out, ref, shallow=False)


def test_a_file_replaced_mid_run_is_refused_in_one_line_and_a_rerun_starts_over(served, server, tmp_path):
    ckpt, ref, _ = served
    out, env, url = tmp_path / "model.gguf", env_for(server, tmp_path), server.dir_url
    server.change_after = 4
    proc = convert_remote(url, out, env, check_exit=2)
    lines = proc.stderr.strip().splitlines()
    assert re.search(r"error: .*(changed during the conversion|another version of this file).*nothing was written; "
                     "rerun the same command to start over", lines[-1]), lines[-1]
    assert not out.exists()
    server.change_after = 0
    proc = convert_remote(url, out, env)
    assert filecmp.cmp(out, ref, shallow=False)


@pytest.mark.parametrize("case", ["missing directory", "no token", "no ranges"])
def test_refusals_of_https_are_one_line_exit_2_and_write_nothing(served, server, tmp_path, case):
    url = f"{server.url}/files/elsewhere/" if case == "missing directory" else server.dir_url
    server.token = SECRET if case == "no token" else None
    server.ranges = case != "no ranges"
    out = tmp_path / "model.gguf"
    proc = convert_remote(url, out, env_for(server, tmp_path), check_exit=2)
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"bitnet-gguf: error: {server.url}/"), line
    # over HTTP a directory cannot be told missing: its config.json is
    assert {"missing directory": "has no config.json", "no token": "access denied",
            "no ranges": "ignores range requests"}[case] in line, line
    assert not out.exists() and not Path(str(out) + ".work").exists()


def test_credentials_never_reach_the_run_directory_the_output_or_the_log(served, server, tmp_path):
    ckpt, ref, _ = served
    server.token = SECRET
    host = server.url.split("//")[1]
    out = tmp_path / "model.gguf"
    proc = convert_remote(f"http://user:{SECRET}@{host}/files/model/", out, env_for(server, tmp_path))
    assert filecmp.cmp(out, ref, shallow=False)
    out2 = tmp_path / "hf.gguf"
    proc2 = convert_remote(f"hf://{REPO}", out2, env_for(server, tmp_path, HF_TOKEN=SECRET))
    assert all(e["auth"] for e in server.log), "every request carried the credential"
    status = remote_cli("status", str(out) + ".work", "--json", env=env_for(server, tmp_path))
    for text in (proc.stderr, proc.stdout, proc2.stderr, status.stdout):
        assert SECRET not in text
    for p in files_under(tmp_path):
        assert SECRET.encode() not in p.read_bytes(), p


# -- hf:// ----------------------------------------------------------------------------------------------

def test_hf_source_converts_byte_identical_and_a_new_commit_starts_over(served, server, tmp_path):
    ckpt, ref, _ = served
    out, env = tmp_path / "model.gguf", env_for(server, tmp_path)
    proc = convert_remote(f"hf://{REPO}", out, env)
    assert filecmp.cmp(out, ref, shallow=False)
    assert f"commit {COMMIT_A}" in proc.stderr
    assert any(f"/resolve/{COMMIT_A}/" in e["path"] for e in server.log), "reads name the commit"
    assert not any("/resolve/main/" in e["path"] for e in server.log)
    manifest = json.loads((Path(str(out) + ".work") / "manifest.json").read_text())
    assert manifest["options"]["model_dir"] == f"hf://{REPO}"
    assert all(name.startswith(f"hf://{REPO}@{COMMIT_A}/") and ident[-1] == COMMIT_A
               for name, *ident in manifest["fingerprint"])
    server.commit = COMMIT_B  # main moved on
    proc = convert_remote(f"hf://{REPO}", out, env)
    assert "starting over" in proc.stderr
    assert filecmp.cmp(out, ref, shallow=False)
    assert_no_weights_on_disk(ckpt, Path(str(out) + ".work"))


@pytest.mark.parametrize("case", ["gated", "no such repository", "no such revision", "private"])
def test_hf_refusals_name_the_login_or_gated_step(served, server, tmp_path, case):
    url = {"no such repository": "hf://org/other", "no such revision": f"hf://{REPO}@v9"}.get(case, f"hf://{REPO}")
    server.gated = case == "gated"
    server.token = SECRET if case == "private" else None
    out = tmp_path / "model.gguf"
    proc = convert_remote(url, out, env_for(server, tmp_path), check_exit=2)
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"bitnet-gguf: error: {url}: "), line
    if case == "gated":
        assert "gated" in line and "hf auth login" in line
    elif case == "no such revision":
        assert "not found" in line
    else:
        assert "hf auth login" in line
    assert not out.exists() and not Path(str(out) + ".work").exists()


# -- fsspec memory:// -------------------------------------------------------------------------------------

def test_memory_filesystem_source_converts_byte_identical_and_verifies(served, tmp_path, capsys):
    import fsspec

    from pipeline.cli import main

    ckpt, ref, _ = served
    fs = fsspec.filesystem("memory")
    for p in ckpt.iterdir():
        fs.pipe(f"/models/model/{p.name}", p.read_bytes())
    out = tmp_path / "model.gguf"
    try:
        assert main(["convert", "memory://models/model", "-o", str(out), "--no-progress",
                     *IN_PROCESS_LIMIT]) == 0
        assert main(["verify", str(ref), "memory://models/model"]) == 0  # verify reads a remote source too
    finally:
        fs.rm("/models", recursive=True)
    assert filecmp.cmp(out, ref, shallow=False)
    assert_no_weights_on_disk(ckpt, Path(str(out) + ".work"))


def test_verify_of_a_remote_source_ends_its_fetch_threads(tmp_path):
    """As a conversion does (remote.end_fetching), every command ends the fetch threads it used (verify
    reads every tensor, in requests of REQUEST_BYTES from the pool): left to the interpreter's exit, a
    signal landing while the pool starts a thread hangs the exit (tests/test_interrupted_exit.py)."""
    import threading

    import fsspec

    from pipeline import remote
    from pipeline.cli import main
    from tests.synthetic import write_checkpoint

    def fetching():
        return [t for t in threading.enumerate() if t.name.startswith("bitnet-gguf-fetch") and t.is_alive()]

    ckpt = write_checkpoint(tmp_path / "m", "llama3-1.58", hidden_size=256, intermediate_size=512, num_layers=1,
                            num_heads=4, num_kv_heads=2, vocab_size=16384)  # an 8 MiB head: two requests
    ref = tmp_path / "m.gguf"
    assert main(["convert", str(ckpt), "-o", str(ref), "--no-progress", *IN_PROCESS_LIMIT]) == 0
    fs = fsspec.filesystem("memory")
    for p in ckpt.iterdir():
        fs.pipe(f"/ended-test/m/{p.name}", p.read_bytes())
    remote.end_fetching()  # an earlier test's threads, if any
    for t in fetching():
        t.join(timeout=30)
    used = []
    submit = remote._POOL.submit
    remote._POOL.submit = lambda *a, **kw: used.append(1) or submit(*a, **kw)
    try:
        assert main(["verify", str(ref), "memory://ended-test/m", *IN_PROCESS_LIMIT]) == 0
    finally:
        fs.rm("/ended-test", recursive=True)
    assert used  # it did fetch through the pool
    left = fetching()
    for t in left:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in left)


def test_an_uninstalled_filesystem_is_one_line(tmp_path):
    proc = run_cli("plan", "nosuchfs://bucket/model/", "-o", tmp_path / "m.gguf", check_exit=2)
    line, = proc.stderr.strip().splitlines()
    assert "no filesystem for nosuchfs://" in line and "install" in line


def test_a_first_byte_slower_than_the_read_timeout_is_retried(served, server, tmp_path, monkeypatch):
    from pipeline import remote
    from pipeline.cli import main

    ckpt, ref, _ = served
    monkeypatch.setattr(remote, "READ_TIMEOUT", 0.5)
    monkeypatch.setattr(remote, "RETRY_BASE", 0.01)
    server.faults, server.slow_seconds = ["slow", "slow"], 2.0
    out = tmp_path / "model.gguf"
    assert main(["convert", server.dir_url, "-o", str(out), "--no-progress", *IN_PROCESS_LIMIT]) == 0
    assert filecmp.cmp(out, ref, shallow=False)
    assert not server.faults


def test_a_remote_tensor_larger_than_half_the_limit_converts_under_it(tmp_path):
    """The range requests' buffers are inside --memory-limit: a 256 MiB embedding over HTTP under 384MiB."""
    from tests.peak_rss import run_measuring_peak
    from tests.synthetic import write_checkpoint

    MiB = 1024**2
    ckpt = write_checkpoint(tmp_path / "big", "1bitllm", hidden_size=2048, intermediate_size=256, num_layers=1,
                            num_heads=16, vocab_size=32768, dtype="f32")
    srv = CheckpointServer(ckpt)
    try:
        out = tmp_path / "big.gguf"
        r = run_measuring_peak([sys.executable, "-m", "pipeline", "convert", srv.dir_url, "-o", str(out),
                                "--no-progress", "--memory-limit", "384MiB"],
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        srv.close()
    assert r["exit"] == 0, r["stderr"]
    print(f"peak RSS of the remote conversion: {r['peak'] / MiB:.0f} MiB (limit 384 MiB)")
    assert r["peak"] <= 384 * MiB, f"peak RSS {r['peak'] / MiB:.0f} MiB exceeds --memory-limit 384MiB"
    tensors, _, _ = data_bytes(ckpt)
    # the embedding came over the network once (assemble's read: extract has no value pass for it)
    assert 256 * MiB <= srv.sent(".safetensors") < tensors + 256 * MiB


def test_a_packed_checkpoint_from_memory_converts_like_the_local_one(tmp_path):
    """The packed family's reads (quarters of packed rows, weight_scale, q/k permutation) through fsspec."""
    import fsspec

    from pipeline.cli import main
    from tests.synthetic import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "packed", "llama3-1.58", hidden_size=256, intermediate_size=512,
                            num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=512)
    ref, out = tmp_path / "local.gguf", tmp_path / "memory.gguf"
    assert main(["convert", str(ckpt), "-o", str(ref), "--no-progress", *IN_PROCESS_LIMIT]) == 0
    fs = fsspec.filesystem("memory")
    for p in ckpt.iterdir():
        fs.pipe(f"/packed-test/packed/{p.name}", p.read_bytes())
    try:
        assert main(["convert", "memory://packed-test/packed", "-o", str(out), "--no-progress",
                     *IN_PROCESS_LIMIT]) == 0
    finally:
        fs.rm("/packed-test", recursive=True)
    assert filecmp.cmp(out, ref, shallow=False)


def test_the_read_ahead_serves_ranges_in_order_holds_at_most_its_depth_and_never_other_bytes():
    import fsspec

    from pipeline import remote

    data = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    fs = fsspec.filesystem("memory")
    fs.pipe("/read-ahead/blob.bin", data)
    url = "memory://read-ahead/blob.bin"
    ranges = [(url, a, 4096 + a % 7, "") for a in range(0, 40 * 8192, 8192)]
    fetched = []
    real_fetch = remote._fetch_once

    def counting(fs_, path, start, end, version):
        fetched.append(start)
        return real_fetch(fs_, path, start, end, version)

    try:
        remote._fetch_once = counting
        with remote.prefetching(ranges, 2):
            ahead = remote._PREFETCH[-1]
            order = [0, 1, 2, 5, 3, 4] + list(range(6, 40))  # 3 and 4 come after 5: read again by their tasks
            for i in order:
                _, a, n, _ = ranges[i]
                buf = bytearray(n)
                remote.read_into(url, a, buf)
                assert bytes(buf) == data[a:a + n]
                assert len(ahead.futures) <= 2
    finally:
        remote._fetch_once = real_fetch
        fs.rm("/read-ahead", recursive=True)
    assert sorted(set(fetched)) == [a for _, a, _, _ in ranges]
    assert len(fetched) <= len(ranges) + 2 + 2  # the two passed over, and at most the depth cancelled too late


# -- each byte fetched once where the design allows ------------------------------------------------------

def test_a_packed_checkpoint_is_fetched_once_as_plan_says(tmp_path):
    """Packed projections and float tensors have no value pass in extract: every byte comes over once
    (4 KV heads: each quarter of packed k rows holds whole heads, as in every real checkpoint; a head
    larger than a quarter takes quantize's slow path, which reads the packed rows once per quarter).
    The directory's name gives general.basename, finetune and size label, remote as local."""
    from tests.synthetic import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "llama3-8b-packed", "llama3-1.58", hidden_size=256, intermediate_size=512,
                            num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=512)
    ref, out = tmp_path / "local.gguf", tmp_path / "remote.gguf"
    run_cli("convert", ckpt, "-o", ref, "--no-progress", "--memory-limit", "512MiB")
    srv = CheckpointServer(ckpt)
    try:
        env = env_for(srv, tmp_path)
        plan = remote_cli("plan", srv.dir_url, "-o", out, "--memory-limit", "512MiB", env=env)
        said = int(re.search(r"fetches about .*? \((\d+) bytes\)", plan.stdout)[1])
        tensors, headers, _ = data_bytes(ckpt)
        small = sum((ckpt / n).stat().st_size for n in os.listdir(ckpt) if not n.endswith(".safetensors"))
        assert said == small + headers + tensors, (said, small, headers, tensors)
        srv.log.clear()
        convert_remote(srv.dir_url, out, env)
        assert said - small <= srv.sent(".safetensors") <= said - small + 8, (srv.sent(".safetensors"), said - small)
    finally:
        srv.close()
    assert filecmp.cmp(out, ref, shallow=False)


@pytest.mark.parametrize("name,value,extra,words", [
    ("model.embed_tokens.weight", 70000.0, (), ("beyond F16's range", "--embedding-type bf16 or f32")),
    ("model.embed_tokens.weight", 1e38, ("--embedding-type", "q8_0"), ("beyond Q8_0's range",)),
    ("model.norm.weight", np.nan, (), ("NaN or infinite",)),
])
def test_values_extract_did_not_fetch_are_refused_as_they_are_read_like_local_ones(served, tmp_path, name, value,
                                                                                     extra, words):
    """A remote float tensor's values are checked by the stage that fetches them (no extract pass): the
    same one-line refusal as a local conversion's, exit 2, no output and no temporary file."""
    from tests.hostile import refuse, set_values

    model = tmp_path / "model"
    model.mkdir()
    for p in served[0].iterdir():
        (model / p.name).write_bytes(p.read_bytes())

    def poke(values):
        values.reshape(-1)[values.size // 2 + 3] = value
        return values
    shard = next(f for f in sorted(model.glob("*.safetensors")) if name.encode() in f.read_bytes()[:100_000])
    set_values(shard, name, poke)
    local = refuse(model, tmp_path / "local.gguf", name, *words, extra=extra, in_data=True)
    srv = CheckpointServer(model)
    try:
        url = srv.dir_url
        line = refuse(url, tmp_path / "remote.gguf", name, *words, extra=extra, in_data=True, watch=[tmp_path / "t"])
    finally:
        srv.close()
    assert line.replace(url.rstrip("/"), str(model)) == local.replace("local.gguf", "remote.gguf")
