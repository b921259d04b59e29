"""A conversion interrupted at any point, once or several times, and rerun gives a byte-identical file.

The kill points are drawn from a seeded RNG (tests/kill_points.py; the seed is printed, and
BITNET_GGUF_KILL_SEED picks another) and aimed at every stage by watching the run directory:
the manifest's running stage, the chunk files in its store, the bytes of the temporary output,
and extract's index of the checkpoint (kills before, during and after it is written); and
between two run-directory writes, by the process itself (tests/write_points.py; every such
window in turn: tests/test_run_directory_windows.py).
Mostly SIGKILL, some SIGTERM and SIGINT (exit 130, no *.partial left behind); some runs are
interrupted two or three times before the rerun, and some change --memory-limit between runs
(the converter must resume or redo, never mix).
"""
from __future__ import annotations

import collections
import filecmp
import random
import shutil
import signal
import time

import pytest

from tests import kill_points as kp
from tests.conftest import ROOT, convert, run_cli

MEMORY_LIMITS = ("512MiB", "1GiB")  # the first is the one most runs use
KILLS = {"1bitllm": 28, "llama3-1.58": 21}  # per checkpoint kind: 4 and 3 aimed at each target (pack is short: a third of its kills land after it)
MIN_PER_STAGE = 2


def master_checkpoint(d):
    from tests.synthetic import write_checkpoint

    return write_checkpoint(d, "1bitllm", hidden_size=1024, intermediate_size=2048, num_layers=3, num_heads=8,
                            vocab_size=32768, dtype="bf16")


def packed_checkpoint(d):
    """Packed projections, q/k permutation, untied bf16 embedding and lm_head."""
    from tests.synthetic import write_checkpoint

    return write_checkpoint(d, "llama3-1.58", hidden_size=1024, intermediate_size=4096, num_layers=3,
                            num_heads=8, num_kv_heads=2, vocab_size=65536)


CHECKPOINTS = {"1bitllm": master_checkpoint, "llama3-1.58": packed_checkpoint}


def clean_conversions(model, tmp_path):
    """The expected file (512MiB) and, per memory limit, what a clean conversion looks like."""
    refs, files = {}, {}
    for mem in MEMORY_LIMITS:
        out, work = tmp_path / f"clean-{mem}.gguf", tmp_path / f"clean-{mem}.work"
        t0 = time.monotonic()
        writes = kp.recorded_writes(ROOT, model, out, work, mem, tmp_path / f"clean-{mem}.txt")
        refs[mem] = kp.Reference(time.monotonic() - t0,
                                 {s: kp.count_chunks(work / f"{s}.zarr") for s in kp.CHUNK_STAGES},
                                 out.stat().st_size, kp.index_files(work), len(writes))
        # the watcher's quick count is the count of the chunk files it stands for
        assert refs[mem].chunks == {s: len(kp.chunk_files(work / f"{s}.zarr")) for s in kp.CHUNK_STAGES}, refs
        files[mem] = out
        shutil.rmtree(work)
    expected = files[MEMORY_LIMITS[0]]
    for mem, path in files.items():
        assert filecmp.cmp(path, expected, shallow=False), f"a clean conversion under {mem} differs"
    for mem in MEMORY_LIMITS[1:]:
        files[mem].unlink()
    # a tensor spread over several chunks, so kills land between chunks of one tensor
    assert refs[MEMORY_LIMITS[0]].chunks["extract"] > 35, refs
    return expected, refs


def check_interrupted(k: kp.Kill, out, work, expected, where: str) -> None:
    sig = signal.Signals(k.point.signal)
    if k.landed == "finished":
        assert k.returncode == 0, f"{where}: exit {k.returncode} without a signal\n{k.stderr}"
    elif sig == signal.SIGKILL:
        assert k.returncode == -signal.SIGKILL, f"{where}: exit {k.returncode}\n{k.stderr}"
    else:
        assert k.returncode == 130, f"{where}: {sig.name} gave exit {k.returncode}, not 130\n{k.stderr}"
        assert "interrupted" in k.stderr and "Traceback" not in k.stderr, f"{where}: stderr\n{k.stderr}"
        left = kp.partials(work, out)
        assert not left, f"{where}: {sig.name} left temporary files: {[str(p) for p in left]}"
    # the output appears whole or not at all
    assert not out.exists() or filecmp.cmp(out, expected, shallow=False), \
        f"{where}: an interrupted run left an incomplete file at the output path"


@pytest.mark.slow
@pytest.mark.parametrize("family", list(KILLS))
def test_interrupted_anywhere_then_rerun_gives_identical_bytes(tmp_path, family):
    seed = kp.seed()
    print(f"\n{family}: kill seed {seed} (set {kp.SEED_ENV} to choose another)")
    rng = random.Random(f"{seed}:{family}")
    model = CHECKPOINTS[family](tmp_path / "model")
    expected, refs = clean_conversions(model, tmp_path)
    scenarios = kp.plan(rng, KILLS[family], MEMORY_LIMITS)
    landed, index_moments = collections.Counter(), collections.Counter()
    for i, scenario in enumerate(scenarios):
        d = tmp_path / f"run{i}"
        d.mkdir()
        out, work = d / "model.gguf", d / "work"
        story, stores_limit = [], None  # the --memory-limit of the last run that reached a stage
        for j, point in enumerate(scenario.kills):
            where = f"seed {seed}, {family}, scenario {i}, kill {j + 1} ({point.describe()})"
            k = kp.interrupt(ROOT, model, out, work, point, refs[point.memory_limit], d / "stderr.txt")
            story.append(f"{point.describe()} -> landed in {k.landed}{f' ({k.index} the index)' if k.index else ''} "
                         f"after {k.seconds:.2f} s")
            landed[k.landed] += 1
            if k.landed != "start":  # a run killed before any stage left the stores as they were
                stores_limit = point.memory_limit
            index_moments[k.index] += bool(k.index)
            check_interrupted(k, out, work, expected, where)
        snapshot, states = kp.all_chunk_files(work), kp.stage_states(work) or {}
        where = f"seed {seed}, {family}, scenario {i}: " + "; ".join(story) + \
            f"; rerun with --memory-limit {scenario.final_memory_limit}"
        print(where)
        rerun = convert(model, out, "--workdir", work, "--memory-limit", scenario.final_memory_limit)
        assert filecmp.cmp(out, expected, shallow=False), f"{where}: the rerun's file differs from a clean conversion"
        left = kp.partials(work, out)
        assert not left, f"{where}: temporary files left after the rerun: {[str(p) for p in left]}"
        run_cli("status", work)
        for stage, state in states.items():  # whatever the limit: a finished stage is not redone
            if state == "done":
                assert f"{stage}: already done" in rerun.stderr, f"{where}: {stage} was redone\n{rerun.stderr}"
        # the same command as the one that wrote the stores: resume (another limit may rechunk)
        if scenario.final_memory_limit == stores_limit:
            rewritten = sorted(p for p, ident in snapshot.items() if kp.chunk_identity(work, p) != ident
                               and not kp.beside_unfinished_chunk(work, p, snapshot))
            assert not rewritten, f"{where}: the rerun rewrote {len(rewritten)} chunk(s) already on disk, " \
                                  f"e.g. {rewritten[:3]}"
        shutil.rmtree(d)
    print(f"{family}: {sum(landed.values())} kills landed in:",
          ", ".join(f"{w} {landed[w]}" for w in ("start", *kp.STAGES, "between", "after", "finished") if landed[w]),
          "; in extract:", ", ".join(f"{m} the index {index_moments[m]}" for m in kp.INDEX_MOMENTS))
    thin = [s for s in kp.STAGES if landed[s] < MIN_PER_STAGE]
    assert not thin, f"seed {seed}, {family}: fewer than {MIN_PER_STAGE} kills landed in {thin}: {dict(landed)}"
    assert index_moments["before"] and index_moments["after"], \
        f"seed {seed}, {family}: no kill landed before or after extract's index: {dict(index_moments)}"


@pytest.mark.slow
def test_sigterm_after_a_sigkilled_assemble_leaves_no_temporary_output(tmp_path):
    """The temporary output a SIGKILL left is gone after a later run exits 130, even one stopped
    before it reached assemble (seed 1 of the randomized test found it: SIGKILL, SIGKILL, SIGTERM
    in assemble, the last before assemble reopened the file)."""
    model = master_checkpoint(tmp_path / "model")
    out, work, log = tmp_path / "model.gguf", tmp_path / "work", tmp_path / "stderr.txt"
    any_size = kp.Reference(seconds=0.0, chunks={}, size=1)  # assemble: kill once the file has a byte
    k = kp.interrupt(ROOT, model, out, work, kp.KillPoint("assemble", 0.5, signal.SIGKILL, "512MiB"), any_size, log)
    assert k.landed == "assemble" and kp.partials(work, out), f"no temporary output to leave behind: {k}"
    # another output type redoes pack: stop it there, long before assemble
    k = kp.interrupt(ROOT, model, out, work, kp.KillPoint("pack", 0.0, signal.SIGTERM, "512MiB"), any_size, log,
                     "--type", "tq1_0")
    assert k.landed == "pack" and k.returncode == 130, k
    left = kp.partials(work, out)
    assert not left, f"exit 130 left temporary files: {[str(p) for p in left]}"


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


def test_an_interrupt_that_cuts_an_event_loop_short_exits_with_one_line(tmp_path):
    """A signal can land while zarr builds its event loop: the half-built loop and the coroutine
    it never ran are collected on the way out, and what Python prints about them then (a
    traceback from the loop's __del__, a RuntimeWarning) must not reach the user (the randomized
    kill test found this: SIGTERM at the start of extract)."""
    import subprocess
    import sys
    script = (
        "import asyncio, sys\n"
        "import pipeline.cli as cli\n"
        "def cut_short(args):\n"
        "    loop = asyncio.SelectorEventLoop.__new__(asyncio.SelectorEventLoop)  # no __init__ ran\n"
        "    async def never(): pass\n"
        "    pending = never()\n"
        "    raise KeyboardInterrupt\n"
        "cli.cmd_status = cut_short\n"
        "sys.exit(cli.main(['status', sys.argv[1]]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "bitnet-gguf: interrupted; rerun the same command to continue\n"
