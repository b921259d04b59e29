"""`status` and `inspect` show what is in a run directory, as a user debugging would look."""
from __future__ import annotations

import json

import numpy as np

from tests.conftest import convert, read_source_tensors, run_cli


def test_inspect_reports_codes_and_scales_of_the_source(checkpoint, tmp_path):
    model = checkpoint(dtype="bf16")
    out = tmp_path / "m.gguf"
    convert(model, out)
    work = tmp_path / "m.gguf.work"
    report = json.loads(run_cli("inspect", work, "--codes", "--json").stdout)
    quant = report["stores"]["quantize"]["tensors"]["blk.1.ffn_up.weight"]
    w = read_source_tensors(model)["model.layers.1.mlp.up_proj.weight"]
    s = np.float32(np.abs(w.astype(np.float64)).mean())
    codes = np.clip(np.rint(w * (np.float32(1) / s)), -1, 1)
    assert quant["absmean"] == float(s)
    assert quant["chunks"] == "1/1"
    for key, value in (("-1", -1), ("0", 0), ("+1", 1)):
        assert abs(quant["shares"][key] - float((codes == value).mean())) < 1e-12
    assert report["stores"]["extract"]["tensors"]["token_embd.weight"]["source_dtype"] == "BF16"
    assert report["stores"]["pack"]["tensors"]["blk.0.attn_q.weight"]["type_name"] == "TQ2_0"
    table = run_cli("inspect", work).stdout
    assert "blk.1.ffn_up.weight" in table and "TQ2_0" in table
    status = run_cli("status", work).stdout
    assert all(f"{stage}" in status for stage in ("extract", "quantize", "pack", "assemble"))
    assert status.count("done") == 4


def test_inspect_refuses_a_directory_that_is_not_a_run(tmp_path):
    proc = run_cli("inspect", tmp_path, check_exit=2)
    assert "not a bitnet-gguf run directory" in proc.stderr


def test_status_shows_an_interrupted_stage_and_how_to_continue(checkpoint, tmp_path):
    model = checkpoint()
    out = tmp_path / "m.gguf"
    convert(model, out)
    work = tmp_path / "m.gguf.work"
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"]["pack"]["state"] = "running"  # what a killed run leaves behind
    (work / "manifest.json").write_text(json.dumps(manifest))
    out.unlink()
    status = run_cli("status", work).stdout
    assert "pack      interrupted" in status and "rerun the same convert command" in status
    assert "assemble  output missing" in status
