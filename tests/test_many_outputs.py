"""`--type a,b,c`: one file per type from one read of the checkpoint.

Each output of a comma list must be byte-identical to a conversion to that type alone; `plan`
lists every output; a kill during the second output's pack resumes without touching the first;
an output its data refuses is named and the finished ones stay; what plan refuses for any output
(and a type listed twice, -o naming a file) is refused before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from tests import kill_points as kp
from tests import write_points
from tests.conftest import ROOT, convert, run_cli
from tests.synthetic import write_checkpoint

TYPES = ("tq2_0", "i2_s", "iq2_bn")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("many")


@pytest.fixture(scope="module")
def model(root):
    return write_checkpoint(root / "m", "llama3-1.58", num_heads=8, num_kv_heads=2)


@pytest.fixture(scope="module")
def alone(root, model):
    """Each type converted on its own (its own run directory)."""
    made = {}
    for t in TYPES:
        made[t] = root / f"alone-{t}.gguf"
        convert(model, made[t], "--type", t, "--target", "x86")
    return made


def identity(path):
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def test_comma_list_writes_each_type_byte_identical_to_its_own_conversion(root, model, alone):
    out = root / "list"
    out.mkdir()
    proc = convert(model, out, "--type", ",".join(TYPES), "--target", "x86")
    assert sorted(p.name for p in out.glob("*.gguf")) == sorted(f"m-{t.upper()}.gguf" for t in TYPES)
    for t in TYPES:
        assert (out / f"m-{t.upper()}.gguf").read_bytes() == alone[t].read_bytes(), t
    # the checkpoint is read once: extract and quantize run once, pack and assemble per output
    assert proc.stderr.count("extract: running") == 1 and proc.stderr.count("quantize: running") == 1
    assert proc.stderr.count("pack: running") == 3 and proc.stderr.count("assemble: running") == 3
    work = out / "m.work"
    assert sorted(p.name for p in work.glob("pack*.zarr")) == [f"pack-{t}.zarr" for t in sorted(TYPES)]
    # a rerun finds everything done and leaves the files as they are
    before = {t: identity(out / f"m-{t.upper()}.gguf") for t in TYPES}
    again = convert(model, out, "--type", ",".join(TYPES), "--target", "x86")
    assert "running" not in again.stderr
    assert {t: identity(out / f"m-{t.upper()}.gguf") for t in TYPES} == before
    status = run_cli("status", work).stdout
    for t in TYPES:
        assert f"output: {out / f'm-{t.upper()}.gguf'}\n  pack      done" in status
    shown = run_cli("inspect", work).stdout
    assert "\npack-i2_s.zarr\n  layout: I2_S for bitnet.cpp's x86 builds" in shown and "\npack-iq2_bn.zarr\n" in shown


def test_plan_lists_every_output(root, model):
    out = root / "planned"
    out.mkdir()
    text = run_cli("plan", model, "-o", out, "--type", "tq2_0,iq2_bn").stdout
    assert text.startswith("2 outputs from one read")
    for t in ("TQ2_0", "IQ2_BN"):
        assert f"{out / f'm-{t}.gguf'} (" in text
    data = json.loads(run_cli("plan", model, "-o", out, "--type", "tq2_0,iq2_bn", "--json").stdout)
    assert [p["out_type"] for p in data["outputs"]] == ["tq2_0", "iq2_bn"]
    assert [p["outputs"][0][0] for p in data["outputs"]] == [str(out / "m-TQ2_0.gguf"), str(out / "m-IQ2_BN.gguf")]
    assert data["output_bytes"] == sum(p["output_bytes"] for p in data["outputs"])
    # the shared stores once, the pack stores of both
    first, second = data["outputs"]
    assert data["run_dir_bytes"] == first["run_dir_bytes"] + second["stores"]["pack"]
    assert list(out.iterdir()) == []  # plan writes nothing


def test_a_kill_during_the_second_outputs_pack_resumes_and_leaves_the_first_alone(root, model, alone, tmp_path):
    out, work, log = tmp_path / "out", tmp_path / "out" / "m.work", tmp_path / "log"
    out.mkdir()
    extra = ("--type", "tq2_0,i2_s", "--target", "x86")
    writes = kp.recorded_writes(ROOT, model, out, work, "1GiB", log, *extra)
    # the write that seals the second output's pack store: its chunks are all written, its state is "running"
    k = next(int(w.split()[0]) for w in writes if "pack-i2_s.checksums.json" in w)
    for p in out.iterdir():  # start again from nothing
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    proc = kp.start(ROOT, model, out, work, "1GiB", log, *extra,
                    watch={write_points.KILL_AT_ENV: str(k), write_points.SIGNAL_ENV: str(int(signal.SIGKILL))})
    assert proc.wait(timeout=kp.TIMEOUT) == -signal.SIGKILL
    first = out / "m-TQ2_0.gguf"
    assert first.read_bytes() == alone["tq2_0"].read_bytes() and not (out / "m-I2_S.gguf").exists()
    seen = identity(first)
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["outputs"]["i2_s"]["stages"]["pack"]["state"] == "running"
    again = convert(model, out, *extra)
    assert "pack (m-TQ2_0.gguf): already done" in again.stderr
    assert "assemble (m-TQ2_0.gguf): already done" in again.stderr
    assert again.stderr.count("pack: running") == 1 and "extract: running" not in again.stderr
    assert identity(first) == seen
    assert (out / "m-I2_S.gguf").read_bytes() == alone["i2_s"].read_bytes()


@pytest.fixture(scope="module")
def bonsai(root):
    """Group-scaled: one scale per 128 values, which Q2_0 holds and TQ2_0 (one per 256) does not."""
    return write_checkpoint(root / "b", "bonsai", num_heads=4, num_kv_heads=2, group_size=128)


def test_an_output_the_data_refuses_is_named_and_the_others_are_written(root, bonsai, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = convert(bonsai, out, "--type", "tq2_0,q2_0", check_exit=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bitnet-gguf: error:")]
    assert len(errors) == 1 and "1 of 2 outputs failed (output b-TQ2_0.gguf (--type tq2_0): tensor" in errors[0]
    assert errors[0].endswith("written: b-Q2_0.gguf")
    assert sorted(p.name for p in out.glob("*.gguf")) == ["b-Q2_0.gguf"]
    convert(bonsai, tmp_path / "alone.gguf", "--type", "q2_0")
    assert (out / "b-Q2_0.gguf").read_bytes() == (tmp_path / "alone.gguf").read_bytes()
    assert not list(out.glob(".*partial"))


@pytest.mark.parametrize("types, extra, message", [
    ("tq2_0,i2_s,tq2_0", (), "--type: tq2_0 is listed twice; list each type once"),
    ("auto,tq2_0", (), "--type: tq2_0 is what auto chose (one ternary scale per tensor"),
    ("tq2_0,auto", (), "--type: auto chose tq2_0 (one ternary scale per tensor"),
    ("tq2_0,tl1", (), "output m-TL1.gguf (--type tl1): "),
    ("tq2_0,", (), "has an empty entry"),
    ("tq2_0,i2_s", ("--vocab-only",), "--vocab-only"),
])
def test_refused_lists_write_nothing(root, model, tmp_path, types, extra, message):
    out = tmp_path / "out"
    out.mkdir()
    proc = convert(model, out, "--type", types, *extra, check_exit=2)
    assert proc.stderr.startswith("bitnet-gguf: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert list(out.iterdir()) == []


def test_o_must_name_a_directory(model, tmp_path):
    proc = convert(model, tmp_path / "x.gguf", "--type", "tq2_0,i2_s", check_exit=2)
    assert "-o: with several --type values, -o names the directory" in proc.stderr
    assert list(tmp_path.iterdir()) == []
