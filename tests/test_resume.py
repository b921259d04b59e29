"""A conversion killed with SIGKILL at any point and rerun gives a byte-identical file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, convert


def start(model, out, work):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out),
                             "--workdir", str(work), "--memory-limit", "512MiB", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def big_packed_checkpoint(tmp_path):
    from tests.synthetic import write_checkpoint

    return write_checkpoint(tmp_path / "packed", "llama3-1.58", hidden_size=1024, intermediate_size=4096,
                            num_layers=3, num_heads=8, num_kv_heads=2, vocab_size=65536)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["1bitllm", "llama3-1.58"])
def test_sigkill_at_any_point_then_rerun_gives_identical_bytes(checkpoint, tmp_path, family):
    # the embedding spans several chunks under 512MiB, so kills land inside stages
    if family == "1bitllm":
        model = checkpoint(hidden_size=1024, intermediate_size=2048, num_layers=3, num_heads=8,
                           vocab_size=32768, dtype="bf16")
    else:  # packed projections, q/k permutation, untied bf16 embedding and lm_head
        model = big_packed_checkpoint(tmp_path)
    clean = tmp_path / "clean.gguf"
    t0 = time.monotonic()
    convert(model, clean, "--memory-limit", "512MiB")
    duration = time.monotonic() - t0
    expected = clean.read_bytes()

    for k in range(1, 6):
        out, work = tmp_path / f"killed{k}.gguf", tmp_path / f"work{k}"
        proc = start(model, out, work)
        time.sleep(duration * k / 6)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # killed after the rename (while it logged the summary), the file there is the complete one
        assert not out.exists() or out.read_bytes() == expected, "a killed run left a partial file at the output path"
        rerun = convert(model, out, "--workdir", str(work), "--memory-limit", "512MiB")
        assert out.read_bytes() == expected, f"kill after {duration * k / 6:.1f} s: rerun differs"
        assert not out.with_name(out.name + ".partial").exists()
        assert not list(work.rglob("*.partial"))
        print(f"killed after {duration * k / 6:.1f} s of {duration:.1f} s; rerun:",
              [line for line in rerun.stderr.splitlines() if "already done" in line])


def test_stores_without_a_manifest_are_not_reused(checkpoint, tmp_path):
    first, second = checkpoint(seed=1), checkpoint(seed=2)
    work = tmp_path / "work"
    convert(first, tmp_path / "a.gguf", "--workdir", str(work))
    (work / "manifest.json").unlink()
    out = tmp_path / "b.gguf"
    proc = convert(second, out, "--workdir", str(work))
    assert "starting over" in proc.stderr
    convert(second, tmp_path / "clean.gguf")
    assert out.read_bytes() == (tmp_path / "clean.gguf").read_bytes()


def test_all_zero_chunks_are_on_disk(checkpoint, tmp_path):
    """An all-zero chunk must be written, or a rerun would take it for missing work."""
    import json

    from tests.conftest import run_cli

    model = checkpoint()
    path = model / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + n])["model.embed_tokens.weight"]["data_offsets"]
    raw[8 + n + begin: 8 + n + end] = bytes(end - begin)
    path.write_bytes(bytes(raw))
    convert(model, tmp_path / "m.gguf")
    report = json.loads(run_cli("inspect", tmp_path / "m.gguf.work", "--json").stdout)
    for stage in ("extract", "quantize", "pack"):
        chunks = report["stores"][stage]["tensors"]["token_embd.weight"]["chunks"]
        done, total = chunks.split("/")
        assert done == total, (stage, chunks)
    again = convert(model, tmp_path / "m.gguf")
    assert again.stderr.count("already done") == 4
