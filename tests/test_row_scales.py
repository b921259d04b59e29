"""Per-row scales: a projection whose non-zero magnitudes are one value per row (BitCPM), read from
the data like the groups of Ternary-Bonsai, and recorded per tensor as its scale granularity
("tensor", "row" or "group N").

A row's scale is constant over every block of the row, so TQ2_0, TQ1_0 and Q2_0 hold it exactly
when the row is whole blocks (Q1_0 too when the row is binary); I2_S and TL keep one scale per
tensor, so they are refused naming the tensor, or requantized with --allow-requantize. The
checkpoint here is a Qwen3 (group-scaled family) with one scale per row; MiniCPM has its own tests.
"""
from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest

from pipeline.codecs import scale_granularity
from tests.conftest import convert, read_source_tensors, run_cli
from tests.synthetic import ROW_SCALES, write_checkpoint
from tests.test_codecs import q2_0_reference_decode
from tests.test_group_scaled import HF_PROJECTIONS, PROJECTIONS, printed_rms_change, refused, rms_change, tensor_bytes

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)


# -- the granularity, from magnitudes per 32 values -------------------------------------------------

def test_granularity_of_hand_made_magnitudes():
    rows = np.array([[0.5] * 8, [0.25] * 8])                          # 256 columns, a scale per row
    assert scale_granularity(rows, 32) == "row"
    assert scale_granularity(np.full((2, 8), 0.5), 32) == "tensor"
    assert scale_granularity(np.zeros((2, 8)), 32) == "tensor"        # all zeros: any scale
    with_zeros = rows.copy()
    with_zeros[0, 3] = with_zeros[1, 0] = 0                           # a group of zeros takes the row's scale
    assert scale_granularity(with_zeros, 32) == "row"
    halves = np.array([[0.5] * 4 + [0.25] * 4])                       # a scale per 128 values
    assert scale_granularity(halves, 32) == "group 128"
    assert scale_granularity(np.array([[0.5, 0.25] * 4]), 32) == "group 32"
    assert scale_granularity(np.array([[0.5, 0.5, 0.25, 0.25] * 2]), 32) == "group 64"


# -- a Qwen3 with one scale per row -------------------------------------------------------------------

@pytest.fixture(scope="module")
def rows_model(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("rows") / "m", "bonsai", **SHAPE, group_size=ROW_SCALES)


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d / "m.gguf"


def decoded(path, name) -> tuple[str, np.ndarray]:
    """(GGML type name, values) of one tensor: gguf's dequantizer, or llama.cpp's Q2_0 rule."""
    from pipeline.gguf_file import read_gguf  # the container only

    t = next(t for t in read_gguf(path).tensors if t.name == name)
    data = path.read_bytes()[t.offset:t.offset + t.nbytes]
    if t.ggml_type == 42:
        return "Q2_0", q2_0_reference_decode(data, math.prod(t.shape[:-1]), t.shape[-1]).reshape(t.shape)
    qtype = gguf.GGMLQuantizationType(t.ggml_type)
    return qtype.name, gguf.quants.dequantize(np.frombuffer(data, np.uint8), qtype).reshape(t.shape)


@pytest.mark.parametrize("out_type", ["tq2_0", "tq1_0", "q2_0"])
def test_block_types_hold_per_row_scales_exactly(rows_model, tmp_path, out_type):
    path = tmp_path / f"{out_type}.gguf"
    convert(rows_model, path, "--type", out_type)
    source = read_source_tensors(rows_model)
    for layer in range(SHAPE["num_layers"]):
        for short in PROJECTIONS:
            w = source[f"model.layers.{layer}.{HF_PROJECTIONS[short]}.weight"]
            row_scales = np.abs(w).max(axis=1)
            assert len(np.unique(row_scales)) > 1 and (np.abs(w) == 0).any()  # per row, and ternary
            type_name, values = decoded(path, f"blk.{layer}.{short}.weight")
            assert type_name == out_type.upper()
            np.testing.assert_array_equal(values, w)


def test_binary_rows_take_q1_0_exactly(tmp_path):
    model = write_checkpoint(tmp_path / "m", "bonsai", **{**SHAPE, "num_layers": 1}, group_size=ROW_SCALES, binary=True)
    path = tmp_path / "q1.gguf"
    proc = convert(model, path)  # --type auto: binary with a scale per row -> Q1_0
    assert "type: Q1_0, chosen by --type auto" in proc.stderr
    from pipeline.gguf_file import read_gguf
    from tests.test_binary_q1_0 import decode_q1_0

    source = read_source_tensors(model)
    infos = {t.name: t for t in read_gguf(path).tensors}
    for short in PROJECTIONS:
        t = infos[f"blk.0.{short}.weight"]
        assert t.ggml_type == 41
        values = decode_q1_0(path.read_bytes()[t.offset:t.offset + t.nbytes], *t.shape)
        np.testing.assert_array_equal(values, source[f"model.layers.0.{HF_PROJECTIONS[short]}.weight"])


def test_auto_picks_tq2_0(rows_model, tmp_path):
    proc = convert(rows_model, tmp_path / "auto.gguf")
    assert "type: TQ2_0, chosen by --type auto" in proc.stderr and "one scale per row" in proc.stderr, proc.stderr


def test_rows_that_are_not_whole_256_blocks_take_q2_0_with_auto(tmp_path):
    model = write_checkpoint(tmp_path / "m", "bonsai", hidden_size=320, intermediate_size=640, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=64, group_size=ROW_SCALES)
    path = tmp_path / "auto.gguf"
    proc = convert(model, path)
    assert "type: Q2_0, chosen by --type auto" in proc.stderr, proc.stderr
    source = read_source_tensors(model)
    for short in PROJECTIONS:
        type_name, values = decoded(path, f"blk.0.{short}.weight")
        assert type_name == "Q2_0"
        np.testing.assert_array_equal(values, source[f"model.layers.0.{HF_PROJECTIONS[short]}.weight"])


def test_i2_s_is_refused_naming_the_tensor(rows_model, out):
    refused(rows_model, out, "model.layers.0.self_attn.q_proj.weight", "--type i2_s", "I2_S keeps one scale per tensor",
            "--type tq2_0 or tq1_0 or q2_0", "--allow-requantize", extra=("--type", "i2_s", "--target", "x86"),
            in_data=True)


def test_allow_requantize_to_i2_s_warns_once_per_tensor(rows_model, tmp_path):
    """bitnet.cpp's quantize_i2_s of the checkpoint's values: scale max |w| over the tensor, every
    non-zero value its sign; one warning per tensor saying what changed."""
    from tests.test_families import decode_i2s_reference

    path = tmp_path / "i2s.gguf"
    proc = convert(rows_model, path, "--type", "i2_s", "--target", "x86", "--allow-requantize")
    source = read_source_tensors(rows_model)
    for layer in range(SHAPE["num_layers"]):
        for short in PROJECTIONS:
            name = f"blk.{layer}.{short}.weight"
            raw, shape = tensor_bytes(path, name)
            values, scale, _ = decode_i2s_reference(raw.tobytes(), shape)
            w = source[f"model.layers.{layer}.{HF_PROJECTIONS[short]}.weight"]
            assert scale == np.abs(w).max(), name
            np.testing.assert_array_equal(values, np.sign(w) * scale, err_msg=name)
            warnings = [line for line in proc.stderr.splitlines() if f"warning: {name}: requantized to I2_S" in line]
            assert len(warnings) == 1, proc.stderr
            assert abs(printed_rms_change(warnings[0]) - rms_change(values, w)) <= 1e-6, warnings[0]


def test_inspect_shows_the_granularity_and_plots_the_row_scales(rows_model, tmp_path):
    from pipeline.inspect_run import collect_layer_stats
    from pipeline.rundir import RunDir

    path = tmp_path / "m.gguf"
    convert(rows_model, path, "--type", "tq2_0")
    work = str(path) + ".work"
    table = run_cli("inspect", work).stdout
    lines = [line for line in table.splitlines() if ".attn_q.weight" in line and "256x64 uint8" in line]  # quantize.zarr
    assert lines and all("scale per row" in line for line in lines), table
    report = json.loads(run_cli("inspect", work, "--json").stdout)
    quantized = report["stores"]["quantize"]["tensors"]
    assert {quantized[f"blk.{i}.{p}.weight"]["scale_granularity"] for i in range(2) for p in PROJECTIONS} == {"row"}
    assert "scale_granularity" not in quantized["token_embd.weight"]

    stats = collect_layer_stats(RunDir(path.parent / (path.name + ".work")))
    source = read_source_tensors(rows_model)
    middle = SHAPE["num_layers"] // 2
    for kind, short in (("q", "attn_q"), ("v", "attn_v"), ("down", "ffn_down")):
        layer, drawn = stats.row_scales[kind]
        assert layer == middle
        # Qwen3 has no q/k permutation: the rows drawn are the checkpoint's, in its order
        want = np.abs(source[f"model.layers.{middle}.{HF_PROJECTIONS[short]}.weight"]).max(axis=1)
        np.testing.assert_array_equal(drawn, want)
    plot = tmp_path / "plot.png"
    proc = run_cli("inspect", work, "--plot", plot)
    assert plot.stat().st_size > 10_000 and "wrote" in proc.stdout + proc.stderr


def test_master_weights_are_scaled_per_tensor(tmp_path):
    model = write_checkpoint(tmp_path / "m", "1bitllm", hidden_size=256, intermediate_size=512, num_layers=1)
    path = tmp_path / "m.gguf"
    convert(model, path)
    quantized = json.loads(run_cli("inspect", str(path) + ".work", "--json").stdout)["stores"]["quantize"]["tensors"]
    assert quantized["blk.0.attn_q.weight"]["scale_granularity"] == "tensor"
