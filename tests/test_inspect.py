"""`status` and `inspect` show what is in a run directory, as a user debugging would look:
every tensor, one tensor (checked against the safetensors and GGUF files), and the --plot figure
of a finished and of an interrupted run."""
from __future__ import annotations

import json
import re
import shutil
import struct

import gguf
import gguf.quants
import numpy as np
import pytest

from tests.conftest import convert, read_source_tensors, run_cli
from tests.synthetic import write_checkpoint


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


# -- inspect WORKDIR TENSOR and inspect WORKDIR --plot -------------------------------------------
SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family -> (checkpoint, gguf, run directory), converted once for the module."""
    out = {}
    for family, extra in (("1bitllm", {"dtype": "bf16"}), ("llama3-1.58", {})):
        base = tmp_path_factory.mktemp(family)
        model = write_checkpoint(base / "model", family, **SHAPE, **extra)
        convert(model, base / "m.gguf")
        out[family] = (model, base / "m.gguf", base / "m.gguf.work")
    return out


def gguf_tensor(path, name):
    return next(t for t in gguf.GGUFReader(path).tensors if t.name == name)


def gguf_code_shares(path, name) -> dict[str, float]:
    """-1/0/+1 shares read from the GGUF file itself (gguf-py's dequantize: values are codes x scale)."""
    t = gguf_tensor(path, name)
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    n = values.size
    return {"-1": float((values < 0).sum() / n), "0": float((values == 0).sum() / n), "+1": float((values > 0).sum() / n)}


def safetensors_value(path, name) -> np.float32:
    """A one-element tensor (weight_scale) read from the safetensors bytes as float32."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    info = json.loads(raw[8:8 + n])[name]
    data = raw[8 + n + info["data_offsets"][0]: 8 + n + info["data_offsets"][1]]
    if info["dtype"] == "BF16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)[0]
    return np.frombuffer(data, {"F32": "<f4", "F16": "<f2"}[info["dtype"]])[0].astype(np.float32)


def png_size(path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    length, kind = struct.unpack(">I4s", raw[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", raw[16:24])


def test_one_tensor_of_a_packed_checkpoint(runs):
    model, out, work = runs["llama3-1.58"]
    name = "blk.0.attn_q.weight"
    report = json.loads(run_cli("inspect", work, name, "--codes", "--json").stdout)
    ws = safetensors_value(model / "model.safetensors", "model.layers.0.self_attn.q_proj.weight_scale")
    expected_scale = float(np.float32(1) / ws)  # BitLinear: W = codes / weight_scale
    t = gguf_tensor(out, name)
    assert report["shape"] == [int(d) for d in reversed(t.shape)] == [256, 256]
    assert report["source_file"] == "model.safetensors" and report["source_dtype"] == "U8"
    assert report["hf_name"] == "model.layers.0.self_attn.q_proj.weight"
    assert report["recipe"]["weights"] == "packed" and report["recipe"]["permute_heads"] == 4
    assert report["weight_scale"] == float(ws)
    assert report["stores"]["quantize"]["scale"] == expected_scale == report["stores"]["pack"]["scale"]
    assert report["stores"]["extract"]["stored_shape"] == [64, 256]  # four codes per byte
    pack = report["stores"]["pack"]
    assert pack["ggml_type"] == int(t.tensor_type) == int(gguf.GGMLQuantizationType.TQ2_0)
    assert pack["type_name"] == "TQ2_0" and pack["nbytes"] == t.n_bytes
    assert all(s["chunks_written"] == s["chunks"] >= 1 for s in report["stores"].values())
    shares = gguf_code_shares(out, name)
    assert abs(sum(report["shares"].values()) - 1) < 1e-12
    for key in shares:
        assert abs(report["shares"][key] - shares[key]) < 1e-12
    assert report["sparsity"] == report["shares"]["0"]

    text = run_cli("inspect", work, name, "--codes").stdout
    for expected in ("256 x 256", "model.layers.0.self_attn.q_proj.weight in model.safetensors, U8",
                     "weights packed, scale rule divide, permuted over 4 heads", f"scale {expected_scale:.8g}",
                     f"TQ2_0 (ggml type {int(t.tensor_type)}), {t.n_bytes} bytes", "1 of 1 chunks written",
                     f"sparsity {shares['0']:.1%}", f"weight_scale   {float(ws):.8g}"):
        assert expected in text, (expected, text)


def test_one_tensor_of_a_master_checkpoint(runs):
    model, out, work = runs["1bitllm"]
    name = "blk.1.ffn_down.weight"
    report = json.loads(run_cli("inspect", work, name, "--codes", "--json").stdout)
    w = read_source_tensors(model)["model.layers.1.mlp.down_proj.weight"]
    assert report["recipe"]["weights"] == "master" and report["recipe"]["scale_rule"] == "absmean"
    assert report["source_dtype"] == "BF16" and "weight_scale" not in report
    assert report["stores"]["quantize"]["absmean"] == float(np.float32(np.abs(w.astype(np.float64)).mean()))
    t = gguf_tensor(out, name)
    assert report["stores"]["pack"]["nbytes"] == t.n_bytes
    shares = gguf_code_shares(out, name)
    assert all(abs(report["shares"][k] - shares[k]) < 1e-12 for k in shares)
    assert "no permutation" in run_cli("inspect", work, name).stdout


def test_plot_of_finished_runs_is_a_png(runs, tmp_path):
    for family, (_, _, work) in runs.items():
        png = tmp_path / f"{family}.png"
        proc = run_cli("inspect", work, "--plot", png)
        width, height = png_size(png)
        assert 800 <= width <= 4000 and 500 <= height <= 4000, (width, height)
        m = re.search(r"quantize.zarr (\d+) of (\d+) chunks written", proc.stderr)
        assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 14, proc.stderr  # 2 layers x 7 projections


def test_plot_path_takes_any_type_matplotlib_writes(tmp_path):
    from pipeline.errors import OptionError
    from pipeline.inspect_run import check_plot_path

    for name in ("a.png", "a.PNG", "a.svg", "a.pdf", "a.jpg"):
        assert check_plot_path(tmp_path / name) == tmp_path / name
    for name in ("a.txt", "a.gguf", "a"):
        with pytest.raises(OptionError, match="--plot"):
            check_plot_path(tmp_path / name)


def test_plot_histogram_of_master_weights_marks_what_rounds_to_zero(runs):
    """The |W|/absmean histogram below 0.5 is the share of codes 0 in the rows it sampled (read
    back from the GGUF file; ffn rows are not permuted)."""
    from pipeline.inspect_run import HIST_BINS, HIST_MAX, SAMPLE_ROWS, collect_layer_stats
    from pipeline.rundir import RunDir

    model, out, work = runs["1bitllm"]
    stats = collect_layer_stats(RunDir(work))
    assert stats.master and stats.n_layers == 2
    counts, rows, layers, n = stats.hist["up"]
    assert layers == [0, 1] and rows == 2 * SAMPLE_ROWS and n == rows * 256
    below = counts[: round(0.5 / HIST_MAX * HIST_BINS)].sum()
    zeros = 0
    for layer in layers:
        t = gguf_tensor(out, f"blk.{layer}.ffn_up.weight")
        zeros += int((gguf.quants.dequantize(t.data, t.tensor_type)[:SAMPLE_ROWS] == 0).sum())
    assert abs(int(below) - zeros) <= 2, (below, zeros)
    assert not collect_layer_stats(RunDir(runs["llama3-1.58"][2])).hist  # packed: no master weights


def test_plot_and_tensor_of_an_interrupted_run(runs, tmp_path):
    model, out, finished = runs["1bitllm"]
    work = tmp_path / "m.gguf.work"
    shutil.copytree(finished, work)
    quant = work / "quantize.zarr"
    for name in ("blk.0.ffn_up.weight", "blk.1.attn_q.weight"):  # chunks a killed run had not written
        shutil.rmtree(quant / name / "c" / "0")
    shutil.rmtree(quant / "blk.1.ffn_down.weight")                  # an array not even created
    shutil.rmtree(work / "pack.zarr")                                # a stage not started
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["stages"]["quantize"]["state"] = "running"
    for stage in ("pack", "assemble"):
        manifest["stages"].pop(stage, None)
    (work / "manifest.json").write_text(json.dumps(manifest))

    png = tmp_path / "partial.png"
    proc = run_cli("inspect", work, "--plot", png)
    png_size(png)
    assert "quantize.zarr 11 of 13 chunks written (1 tensor(s) not created yet)" in proc.stderr
    assert "pack.zarr" not in proc.stderr

    from pipeline.inspect_run import collect_layer_stats
    from pipeline.rundir import RunDir

    stats = collect_layer_stats(RunDir(work))
    kinds = ["q", "k", "v", "o", "gate", "up", "down"]
    missing = {(kinds.index("up"), 0), (kinds.index("q"), 1), (kinds.index("down"), 1)}
    for k in range(7):
        for layer in range(2):
            assert np.isnan(stats.shares[:, k, layer]).all() == ((k, layer) in missing)
    assert np.isnan(stats.scale[kinds.index("down"), 1]) and not np.isnan(stats.scale[kinds.index("up"), 0])

    report = json.loads(run_cli("inspect", work, "blk.0.ffn_up.weight", "--codes", "--json").stdout)
    assert report["stores"]["quantize"]["chunks_written"] == 0 and "pack" not in report["stores"]
    assert "shares" not in report and report["codes"] == "no chunk written yet"
    text = run_cli("inspect", work, "blk.1.ffn_down.weight").stdout
    assert "quantize.zarr  not created" in text


def one_line_refusal(*args) -> str:
    proc = run_cli(*args, check_exit=2)
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


def test_refusals_are_one_line(runs, tmp_path):
    work = runs["llama3-1.58"][2]
    err = one_line_refusal("inspect", work, "blk.9.attn_q.weight")
    assert str(work) in err and "blk.9.attn_q.weight" in err and f"inspect {work}" in err
    err = one_line_refusal("inspect", work, "--plot", tmp_path / "plot.txt")
    assert "plot.txt" in err and ".png" in err
    err = one_line_refusal("inspect", work, "--plot", tmp_path / "no" / "such" / "plot.png")
    assert str(tmp_path / "no" / "such") in err and "does not exist" in err
    (tmp_path / "dir.png").mkdir()
    assert "is a directory" in one_line_refusal("inspect", work, "--plot", tmp_path / "dir.png")
    assert "not a bitnet-gguf run directory" in one_line_refusal("inspect", tmp_path, "--plot", tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "plot.txt").exists()
