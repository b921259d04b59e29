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
from tests.test_families import CASE_TYPES, case_checkpoint
from tests.test_ik_types import IK_TYPES, OWN_CASES, ik_outputs

TYPES = ("tq2_0", "i2_s", "iq2_bn")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("many")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """tests/test_families.py's llama3 checkpoint (llama3-1.58, 8 heads, 2 KV heads, 2 layers), whose
    list of seven types that file and tests/test_ik_types.py read: `alone` below checks three of them."""
    return case_checkpoint(tmp_path_factory, "llama3")


def named(t: str) -> str:
    return f"model-{t.upper()}.gguf"  # the outputs of a list: <model directory name>-<TYPE>.gguf


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
    assert sorted(p.name for p in out.glob("*.gguf")) == sorted(named(t) for t in TYPES)
    for t in TYPES:
        assert (out / named(t)).read_bytes() == alone[t].read_bytes(), t
    # the checkpoint is read once: extract and quantize run once, pack and assemble per output
    assert proc.stderr.count("extract: running") == 1 and proc.stderr.count("quantize: running") == 1
    assert proc.stderr.count("pack: running") == 3 and proc.stderr.count("assemble: running") == 3
    work = out / "model.work"
    assert sorted(p.name for p in work.glob("pack*.zarr")) == [f"pack-{t}.zarr" for t in sorted(TYPES)]
    # a rerun finds everything done and leaves the files as they are
    before = {t: identity(out / named(t)) for t in TYPES}
    again = convert(model, out, "--type", ",".join(TYPES), "--target", "x86")
    assert "running" not in again.stderr
    assert {t: identity(out / named(t)) for t in TYPES} == before
    status = run_cli("status", work).stdout
    for t in TYPES:
        assert f"output: {out / named(t)}\n  pack      done" in status
    shown = run_cli("inspect", work).stdout
    assert "\npack-i2_s.zarr\n  layout: I2_S for bitnet.cpp's x86 builds" in shown and "\npack-iq2_bn.zarr\n" in shown


def test_plan_lists_every_output(root, model):
    out = root / "planned"
    out.mkdir()
    text = run_cli("plan", model, "-o", out, "--type", "tq2_0,iq2_bn").stdout
    assert text.startswith("2 outputs from one read")
    for t in ("TQ2_0", "IQ2_BN"):
        assert f"{out / named(t)} (" in text
    data = json.loads(run_cli("plan", model, "-o", out, "--type", "tq2_0,iq2_bn", "--json").stdout)
    assert [p["out_type"] for p in data["outputs"]] == ["tq2_0", "iq2_bn"]
    assert [p["outputs"][0][0] for p in data["outputs"]] == [str(out / named("tq2_0")), str(out / named("iq2_bn"))]
    assert data["output_bytes"] == sum(p["output_bytes"] for p in data["outputs"])
    # the shared stores once, the pack stores of both
    first, second = data["outputs"]
    assert data["run_dir_bytes"] == first["run_dir_bytes"] + second["stores"]["pack"]
    assert list(out.iterdir()) == []  # plan writes nothing


def test_a_kill_during_the_second_outputs_pack_resumes_and_leaves_the_first_alone(root, model, alone, tmp_path):
    out, work, log = tmp_path / "out", tmp_path / "out" / "model.work", tmp_path / "log"
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
    first = out / named("tq2_0")
    assert first.read_bytes() == alone["tq2_0"].read_bytes() and not (out / named("i2_s")).exists()
    seen = identity(first)
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["outputs"]["i2_s"]["stages"]["pack"]["state"] == "running"
    again = convert(model, out, *extra)
    assert f"pack ({named('tq2_0')}): already done" in again.stderr
    assert f"assemble ({named('tq2_0')}): already done" in again.stderr
    assert again.stderr.count("pack: running") == 1 and "extract: running" not in again.stderr
    assert identity(first) == seen
    assert (out / named("i2_s")).read_bytes() == alone["i2_s"].read_bytes()


# -- the lists the other files read ------------------------------------------------------------------
# tests/test_families.py converts each of its cases to every type that it, tests/test_ik_types.py and
# tests/test_bitnet_targets.py read there with one list (CASE_TYPES), and tests/test_ik_types.py its
# own two cases to its three types (OWN_CASES). Each such list is checked here against conversions to
# one type alone: byte for byte, and the warnings that file reads from the list's output (conftest
# output_log) against those of the conversion alone. Every type of the lists on two families or more,
# later places in a list preferred; the llama3 list also against `alone` above (the same checkpoint).
ALONE = {  # case -> the types converted alone
    "1bitllm-f16": ("iq2_bn_r4",), "llama3-sharded": ("tq1_0",), "falcon3-head-dim": ("i2_s",),
    "2b4t": ("iq1_bn",), "2b4t-bf16-sharded": ("tq1_0",), "falcon-e": ("q2_0",), "falcon-e-prequantized": ("q2_0",),
    "1bitllm-xl-shape": ("tq2_0", "i2_s"), "bonsai-uniform": ("iq2_bn",),
    "2b4t-bf16": ("iq2_bn_r4",), "odd-ffn": ("iq1_bn",),
}
ALONE_PARAMS = [(case, t) for case, types in ALONE.items() for t in types]


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("case,out_type", ALONE_PARAMS, ids=[f"{c}-{t}" for c, t in ALONE_PARAMS])
def test_the_other_files_lists_give_each_types_own_conversion(tmp_path_factory, tmp_path, case, out_type):
    model, outputs = ik_outputs(tmp_path_factory, case)
    listed, log = outputs[out_type]
    out = tmp_path / "alone.gguf"  # as the files converted it before the lists: --target for I2_S only
    proc = convert(model, out, "--type", out_type, *(("--target", "x86") if out_type == "i2_s" else ()))
    assert out.read_bytes() == listed.read_bytes(), (case, out_type)
    assert warnings(proc.stderr) == warnings(log), (case, out_type)
    if case in ("1bitllm-xl-shape", "2b4t", "odd-ffn"):  # the lists whose warnings the files read have some
        assert warnings(log), (case, out_type)


def test_the_llama3_list_of_the_other_files_gives_each_types_own_conversion(tmp_path_factory, alone):
    _, outputs = ik_outputs(tmp_path_factory, "llama3")
    for t in TYPES:
        assert outputs[t][0].read_bytes() == alone[t].read_bytes(), t


def test_every_list_of_the_other_files_and_every_type_in_them_is_checked():
    lists = {case: types for case, types in CASE_TYPES.items() if len(types) > 1}
    lists |= {case: IK_TYPES for case in OWN_CASES}
    checked = ALONE | {"llama3": TYPES}
    assert set(checked) == set(lists)
    for case, types in checked.items():
        assert set(types) <= set(lists[case]), case
    for t in {t for types in lists.values() for t in types}:
        assert sum(t in types for types in checked.values()) >= 2, t


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
    ("tq2_0,tl1", (), "output model-TL1.gguf (--type tl1): "),
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
