"""`bitnet-gguf plan` (and `convert --dry-run`): the plan a conversion follows, shown before any
work and without writing anything; the sizes it predicts are those of the files the conversion
then writes (every GGUF part and every tensor's offset exactly, the run directory's stores within
10%), and its memory figure is not below the peak measured."""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests.conftest import ROOT, convert, run_cli
from tests.peak_rss import run_measuring_peak

CASES = {
    # name: (family, checkpoint shape, convert options)
    "master-tq2_0": ("1bitllm", dict(hidden_size=256, intermediate_size=640, dtype="f16"), ["--type", "tq2_0"]),
    "packed-split": ("llama3-1.58", dict(hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2),
                     ["--type", "tq1_0", "--split-max-tensors", "7"]),
    "2b4t-i2_s": ("2b4t", dict(hidden_size=256, intermediate_size=512), ["--type", "i2_s"]),
    "master-f16": ("1bitllm", dict(hidden_size=256, intermediate_size=512, dtype="bf16"), ["--type", "f16"]),
    "group-scaled-q2_0": ("bonsai", dict(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2),
                          ["--type", "q2_0"]),
}


def files_under(*dirs) -> dict:
    return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_size for d in dirs for r, _, fs in os.walk(d)
            for f in fs}


@pytest.mark.parametrize("case", CASES)
def test_plan_predicts_the_files_the_conversion_writes(tmp_path, case):
    from pipeline.gguf_file import read_gguf
    from tests.synthetic import write_checkpoint

    family, shape, options = CASES[case]
    model = write_checkpoint(tmp_path / "model", family, num_layers=2, **shape)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    before = files_under(tmp_path)
    plan = json.loads(run_cli("plan", model, "-o", out, *options, "--json").stdout)
    table = run_cli("convert", model, "-o", out, *options, "--dry-run").stdout
    assert files_under(tmp_path) == before, "plan / --dry-run wrote something"
    assert "blk.0.attn_q.weight" in table and "run directory:" in table

    convert(model, out, *options)
    written = {}
    for path, size in plan["outputs"]:
        assert os.path.getsize(path) == size, path
        for t in read_gguf(path).tensors:
            written[t.name] = (plan["outputs"].index([path, size]), t.offset, t.nbytes, t.ggml_type)
    assert {t["name"]: (t["part"], t["offset"], t["nbytes"], t["ggml_type"]) for t in plan["tensors"]} == written
    assert plan["output_bytes"] == sum(os.path.getsize(p) for p, _ in plan["outputs"])
    work = out.with_name(out.name + ".work")
    for store, predicted in plan["stores"].items():  # the chunks (the zarr.json files are in "records")
        measured = sum(size for path, size in files_under(work / f"{store}.zarr").items()
                       if "/c/" in path or "padded-chunk" in path)
        assert abs(measured - predicted) <= 0.1 * measured, (store, predicted, measured)
    measured = sum(files_under(work).values())
    assert abs(measured - plan["run_dir_bytes"]) <= 0.1 * measured, (plan["run_dir_bytes"], measured)
    saved = json.loads((work / "plan.json").read_text())
    assert saved == plan | {"memory_limit": saved["memory_limit"], "peak_memory": saved["peak_memory"]}


def test_the_memory_figure_is_not_below_the_measured_peak(tmp_path):
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "model", "llama3-1.58", hidden_size=1024, intermediate_size=4096,
                             num_layers=2, num_heads=8, num_kv_heads=2, vocab_size=32768)
    out = tmp_path / "m.gguf"
    plan = json.loads(run_cli("plan", model, "-o", out, "--memory-limit", "512MiB", "--json").stdout)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    got = run_measuring_peak([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out),
                              "--memory-limit", "512MiB", "--no-progress"], env=env)
    assert got["exit"] == 0, got["stderr"]
    assert plan["peak_memory"] >= got["peak"], (plan["peak_memory"], got["peak"])
    assert plan["peak_memory"] <= 512 * 1024**2


def test_plan_refuses_what_convert_refuses(checkpoint, tmp_path):
    model = checkpoint(hidden_size=320, intermediate_size=448)  # no row is a multiple of 128
    proc = run_cli("plan", model, "-o", tmp_path / "m.gguf", "--type", "i2_s", check_exit=2)
    assert proc.stderr.count("\n") == 1 and "--type i2_s" in proc.stderr and proc.stdout == ""


def test_the_runner_and_the_plan_import_no_stage_helpers():
    """The plan module holds the decisions (output types, scale checks, key/values, parts); the
    runner builds the plan and runs the stages, which import the decisions from the plan."""
    import ast

    for module in ("pipeline/runner.py", "pipeline/plan.py", "pipeline/context.py"):
        tree = ast.parse((ROOT / module).read_text())
        found = [ast.unparse(n) for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("stages")
                 or isinstance(n, ast.Import) and any(a.name.startswith("stages") for a in n.names)]
        assert not found, (module, found)


def test_the_stages_follow_the_plan(tmp_path, monkeypatch):
    """Pack and assemble take each tensor's output type, fallback and part from the plan: a plan
    that writes one projection as F16 (for a reason of its own) gives a file with that tensor in
    F16, with the plan's warning, and every other tensor as --type says."""
    import gguf

    import pipeline.plan
    from tests.synthetic import write_checkpoint
    from tests.hostile import cli

    decided = pipeline.plan.tensor_type

    def with_one_f16(role, shape, out_type, embedding_type, name="", *rest):
        if name == "blk.1.attn_v.weight":
            return pipeline.plan.OUTPUT_TYPES["f16"], "kept F16 by this test's plan"
        return decided(role, shape, out_type, embedding_type, name, *rest)

    monkeypatch.setattr(pipeline.plan, "tensor_type", with_one_f16)
    model = write_checkpoint(tmp_path / "model", "1bitllm", num_layers=2, hidden_size=256, intermediate_size=512)
    out = tmp_path / "m.gguf"
    proc = cli("convert", model, "-o", out, "--no-progress", "--split-max-tensors", "9")
    assert proc.returncode == 0, proc.stderr
    assert "warning: blk.1.attn_v.weight: kept F16 by this test's plan" in proc.stderr
    plan = json.loads((tmp_path / "m.gguf.work" / "plan.json").read_text())
    types = {}
    for k, (path, size) in enumerate(plan["outputs"]):
        for t in gguf.GGUFReader(path).tensors:
            types[t.name] = (k, t.tensor_type.name)
    assert types == {t["name"]: (t["part"], gguf.GGMLQuantizationType(t["ggml_type"]).name) for t in plan["tensors"]}
    assert types["blk.1.attn_v.weight"][1] == "F16" and types["blk.0.attn_v.weight"][1] == "TQ2_0"
