"""Values an output type cannot hold: refused naming the tensor, or written exactly.

NaN and infinities; float values beyond F16, BF16 or Q8_0's range (refused) or rounding to their
largest finite value (written); ternary scales that fp16 (TQ2_0/TQ1_0's block d) or float32
(I2_S's scale) holds only as a subnormal or not at all, from packed checkpoints' weight_scale and
from master weights with a tiny mean |W|: refused with the type that would hold them named, and
that type then converts and verifies. `verify` compares decoded values with the effective weights,
so it finds a file written without these checks, and one written by a broken packing kernel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.hostile import SHAPE, UP, cli, refuse, set_values
from tests.hostile import fresh, out, pristine  # noqa: F401 (fixtures)


@pytest.mark.parametrize("kind,name,value", [
    ("1bitllm", "model.embed_tokens.weight", np.nan),
    ("1bitllm", "model.embed_tokens.weight", -np.inf),
    ("1bitllm", "model.layers.0.input_layernorm.weight", np.inf),
    ("1bitllm", "model.norm.weight", np.nan),
    ("1bitllm", "model.layers.0.mlp.down_proj.weight", np.nan),
    ("llama3-1.58", "model.norm.weight", -np.inf),
    ("llama3-1.58", "lm_head.weight", np.nan),
    ("2b4t", "model.embed_tokens.weight", np.inf),
    ("2b4t", "model.layers.0.self_attn.attn_sub_norm.weight", np.nan),
])
def test_nan_and_inf_are_refused_naming_the_tensor(fresh, out, kind, name, value):
    model = fresh(kind)

    def poke(values):
        values.reshape(-1)[len(values.reshape(-1)) // 2] = value
        return values
    set_values(model / "model.safetensors", name, poke)
    refuse(model, out, name, "NaN or infinite", in_data=True)


@pytest.mark.parametrize("kind,name", [("1bitllm-f32", "model.embed_tokens.weight"), ("llama3-1.58", "lm_head.weight"),
                                       ("2b4t", "model.embed_tokens.weight")])
def test_a_value_beyond_f16_is_refused_and_bf16_or_f32_convert(fresh, out, kind, name):
    model = fresh(kind)

    def big(values):
        values[3, 7] = 70000.0
        return values
    set_values(model / "model.safetensors", name, big)
    line = refuse(model, out, name, "bf16", "f32", in_data=True)
    assert "--embedding-type" in line
    for etype in ("f32", "bf16"):
        convert(model, out, "--embedding-type", etype, "--workdir", out.parent / f"w-{etype}")
        assert out.read_bytes()[:4] == b"GGUF"
        out.unlink()


def test_a_value_beyond_q8_0s_range_is_refused(fresh, out):
    model = fresh("1bitllm-f32")
    set_values(model / "model.safetensors", "model.embed_tokens.weight", lambda v: v * np.float32(1e7))
    refuse(model, out, "model.embed_tokens.weight", extra=("--embedding-type", "q8_0"), in_data=True)


def test_a_large_norm_value_is_fine_in_f32(fresh, out):
    model = fresh("1bitllm-f32")
    set_values(model / "model.safetensors", "model.norm.weight", lambda v: v * np.float32(1e6))
    convert(model, out)
    run_cli("verify", out, model)


@pytest.mark.parametrize("out_type", ["tq2_0", "tq1_0"])
def test_a_projection_scale_beyond_fp16_is_refused_for_tq_and_converts_as_i2_s(fresh, out, out_type):
    model = fresh("1bitllm-f32")
    name = "model.layers.0.self_attn.o_proj.weight"
    set_values(model / "model.safetensors", name, lambda v: v * np.float32(1e7))
    refuse(model, out, "attn_output", "i2_s", extra=("--type", out_type), in_data=True)
    convert(model, out, "--type", "i2_s", "--workdir", out.parent / "w-i2s")
    run_cli("verify", out, model)


@pytest.mark.parametrize("family,scale", [("llama3-1.58", 1e-6), ("2b4t", 1e6), ("llama3-1.58", 1e30)])
def test_a_packed_weight_scale_fp16_cannot_hold_is_refused_for_tq_before_any_work(fresh, out, family, scale):
    """A packed projection's scale is its weight_scale, read before any work: refused then."""
    model = fresh(family)
    name = "model.layers.0.mlp.up_proj.weight_scale"
    set_values(model / "model.safetensors", name, lambda v: np.full_like(v, scale))
    refuse(model, out, "ffn_up", "i2_s")
    convert(model, out, "--type", "i2_s")
    run_cli("verify", out, model)


@pytest.mark.parametrize("family,scale", [("llama3-1.58", 1e-39), ("2b4t", 3e38)])
@pytest.mark.parametrize("out_type", ["i2_s", "tq2_0"])
def test_a_packed_weight_scale_no_float32_can_hold_is_refused_for_every_type(fresh, out, family, scale, out_type):
    """1 / 1e-39 (a bf16 subnormal) is beyond float32: not even I2_S's float32 scale holds it."""
    model = fresh(family)
    name = "model.layers.0.mlp.up_proj.weight_scale"
    set_values(model / "model.safetensors", name, lambda v: np.full_like(v, scale))
    if family == "2b4t":  # 3e38 fits float32: only the fp16 types refuse it
        if out_type == "i2_s":
            convert(model, out, "--type", out_type)
            return
    line = refuse(model, out, "ffn_up", extra=("--type", out_type))
    if family == "llama3-1.58":
        assert "i2_s" not in line  # it would not help


def tensor_values(path: Path, name: str) -> np.ndarray:
    """The values of one tensor of a GGUF file, decoded by gguf's own reader."""
    import gguf

    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)


@pytest.mark.parametrize("family,weight_scale", [
    ("llama3-1.58", 1e6),    # BitLinear divides: a scale of 1e-6, an fp16 subnormal (3% off)
    ("llama3-1.58", 3e4),    # 3.3e-5: just below fp16's smallest normal, 6.1e-5
    ("2b4t", 1e-7),          # AutoBitLinear multiplies: 1e-7 is 19% off as an fp16
    ("2b4t", 5e-5),
])
@pytest.mark.parametrize("out_type", ["tq2_0", "tq1_0"])
def test_a_packed_scale_fp16_holds_only_as_a_subnormal_is_refused_before_any_work(fresh, out, family,
                                                                                  weight_scale, out_type):
    model = fresh(family)
    set_values(model / "model.safetensors", UP, lambda v: np.full_like(v, weight_scale))
    line = refuse(model, out, "ffn_up", "i2_s", extra=("--type", out_type))
    assert "fp16" in line


@pytest.mark.parametrize("family,weight_scale", [("llama3-1.58", 1e6), ("2b4t", 1e-7)])
def test_the_same_scale_converts_exactly_as_i2_s(fresh, out, family, weight_scale):
    model = fresh(family)
    set_values(model / "model.safetensors", UP, lambda v: np.full_like(v, weight_scale))
    convert(model, out, "--type", "i2_s")
    assert "OK" in run_cli("verify", out, model).stdout


@pytest.mark.parametrize("family,weight_scale", [("llama3-1.58", 3e38), ("2b4t", 1e-39), ("2b4t", 1e-38)])
@pytest.mark.parametrize("out_type", ["i2_s", "tq2_0"])
def test_a_scale_float32_holds_only_as_a_subnormal_is_refused_for_every_type(fresh, out, family, weight_scale,
                                                                             out_type):
    """1 / 3e38 = 3.3e-39 and 1e-39 are float32 subnormals: I2_S's float32 scale would lose bits."""
    model = fresh(family)
    set_values(model / "model.safetensors", UP, lambda v: np.full_like(v, weight_scale))
    refuse(model, out, "ffn_up", extra=("--type", out_type))


@pytest.mark.parametrize("absmean", [2e-5, 5e-5])
def test_tiny_master_weights_are_refused_for_tq_and_convert_as_i2_s(fresh, out, absmean):
    """mean |W| of 2e-5 gives a scale fp16 holds only as a subnormal; i2_s holds it."""
    model = fresh("1bitllm-f32")
    name = "model.layers.0.self_attn.o_proj.weight"
    set_values(model / "model.safetensors", name, lambda v: v * np.float32(absmean / np.abs(v).mean()))
    line = refuse(model, out, "attn_output", "i2_s", in_data=True)
    assert "fp16" in line
    convert(model, out, "--type", "i2_s", "--workdir", out.parent / "w-i2s")
    assert "OK" in run_cli("verify", out, model).stdout


@pytest.mark.parametrize("out_type", ["tq2_0", "i2_s"])
def test_tiny_master_weights_written_as_an_f16_fallback_are_refused_for_every_type(tmp_path, out, out_type):
    """ffn_down's rows of 320 values are not whole blocks of any ternary type: it is F16 in every
    --type, and F16 holds a scale of 2e-5 only as a subnormal; i2_s is no way out, so not suggested."""
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "m320", "1bitllm", dtype="f32", **{**SHAPE, "intermediate_size": 320})
    name = "model.layers.0.mlp.down_proj.weight"
    set_values(model / "model.safetensors", name, lambda v: v * np.float32(2e-5 / np.abs(v).mean()))
    line = refuse(model, out, "ffn_down", "F16", extra=("--type", out_type), in_data=True)
    assert "i2_s" not in line


def test_verify_finds_a_file_whose_tq_block_scale_is_subnormal(fresh, out, monkeypatch):
    """A file written without the scale check (as an older converter, or llama.cpp's, writes it):
    its bytes are what the kernels make of the checkpoint, but its values are 3% off; verify
    compares values with the effective weights and fails."""
    import stages.pack

    model = fresh("llama3-1.58")
    set_values(model / "model.safetensors", UP, lambda v: np.full_like(v, 1e6))
    import pipeline.plan

    monkeypatch.setattr(stages.pack, "check_scale", lambda *a: None)
    monkeypatch.setattr(pipeline.plan, "check_scale", lambda *a: None)
    assert cli("convert", model, "-o", out, "--no-progress").returncode == 0
    d = np.abs(tensor_values(out, "blk.0.ffn_up.weight"))
    assert d.max() > 0 and abs(d.max() / 1e-6 - 1) > 0.01  # the file does hold wrong values
    monkeypatch.undo()
    proc = run_cli("verify", out, model, check_exit=1)
    assert "MISMATCH blk.0.ffn_up.weight: values differ" in proc.stdout, proc.stdout
    assert proc.stdout.count("MISMATCH") == 1


@pytest.mark.parametrize("value", [3.4e38, -3.4028e38, 3.397e38])
def test_values_beyond_bf16s_range_are_refused_for_a_bf16_embedding(fresh, out, value):
    """float32 values above bf16's largest (3.3895e38) round to infinity in BF16."""
    model = fresh("1bitllm-f32")
    name = "model.embed_tokens.weight"

    def big(values):
        values[5, 11] = value
        return values
    set_values(model / "model.safetensors", name, big)
    line = refuse(model, out, name, "BF16", "f32", extra=("--embedding-type", "bf16"), in_data=True)
    assert "bf16 or" not in line  # bf16 would not help
    if value == 3.4e38:
        convert(model, out, "--embedding-type", "f32", "--workdir", out.parent / "w-f32")
        assert "OK" in run_cli("verify", out, model).stdout


@pytest.mark.parametrize("kind,etype,value", [("1bitllm-f32", "f16", 65520.0), ("llama3-1.58", "f16", 3.38e38),
                                              ("1bitllm-f32", "q8_0", 8.35e6), ("2b4t", "q8_0", 3.3e38)])
def test_values_beyond_f16_and_q8_0_are_refused(fresh, out, kind, etype, value):
    model = fresh(kind)
    name = "model.embed_tokens.weight"

    def big(values):
        values[2, 3] = -value
        return values
    set_values(model / "model.safetensors", name, big)
    refuse(model, out, name, extra=("--embedding-type", etype), in_data=True)


@pytest.mark.parametrize("kind,etype,value", [("1bitllm-f32", "f16", 65519.0), ("1bitllm-f32", "q8_0", 8.3e6),
                                              ("1bitllm-f32", "bf16", 3.3895e38)])
def test_values_a_float_type_rounds_to_its_largest_convert_and_verify(fresh, out, kind, etype, value):
    """65519 is F16's 65504 after rounding, and 3.3895e38 BF16's largest: finite, so written."""
    model = fresh(kind)
    name = "model.embed_tokens.weight"

    def big(values):
        values[1, 1] = value
        return values
    set_values(model / "model.safetensors", name, big)
    convert(model, out, "--embedding-type", etype)
    assert np.isfinite(tensor_values(out, "token_embd.weight")).all()
    assert "OK" in run_cli("verify", out, model).stdout


def test_verify_finds_non_finite_values_a_file_holds(fresh, out, monkeypatch):
    """A BF16 embedding with an infinity (written without the range check): verify fails it."""
    import pipeline.runner

    model = fresh("1bitllm-f32")
    set_values(model / "model.safetensors", "model.embed_tokens.weight", lambda v: np.where(v > 0.05, 3.4e38, v))
    monkeypatch.setattr(pipeline.runner, "check_float_ranges", lambda *a: None)
    assert cli("convert", model, "-o", out, "--no-progress", "--embedding-type", "bf16").returncode == 0
    assert not np.isfinite(tensor_values(out, "token_embd.weight")).all()
    monkeypatch.undo()
    proc = run_cli("verify", out, model, check_exit=1)
    assert "MISMATCH token_embd.weight: values differ" in proc.stdout, proc.stdout
