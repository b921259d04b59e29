"""BitCPM4 / BitCPM-CANN: MiniCPM (MiniCPMForCausalLM) checkpoints whose bf16 projections are
ternary-valued, with one scale per row (or per tensor, or per group), read from the data.

llama.cpp's own converter (conversion/minicpm.py, `--outtype f32`) is the reference for names,
key/values (embedding, residual and logit scales) and the q/k permutation: our `--type f32` file
must be that file, and our ternary files must decode (with gguf's dequantizer, or the transcription
of llama.cpp's Q2_0 one) to its values exactly. Both files run in llama.cpp. A MiniCPM whose
projections are not ternary is refused before any work, as a float Llama is.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.synthetic import write_checkpoint
from tests.test_codecs import q2_0_reference_decode
from tests.test_group_scaled import refused
from tests.test_llamacpp import N_CTX
from tests.test_llamacpp_families import TQ_MAX, TQ_MEAN, TQ_TOP1, check_logits
from tests.test_reference_converter import compare_with_llama_cpp, llama_convert, llama_cpp_convert  # noqa: F401

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def bitcpm(tmp_path_factory, llama_convert):  # noqa: F811
    """(checkpoint, llama.cpp's f32 file of it): one scale per row, bf16, untied head."""
    root = tmp_path_factory.mktemp("bitcpm")
    model = write_checkpoint(root / "bitcpm", "minicpm", **SHAPE)
    reference = root / "reference-f32.gguf"
    llama_cpp_convert(llama_convert, model, reference, "f32")
    return model, reference


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def file_values(path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (GGML type name, values in numpy order), decoded by gguf's dequantizer or, for Q2_0
    (which gguf-py does not know), the transcription of llama.cpp's dequantize_row_q2_0."""
    from pipeline.gguf_file import read_gguf  # the container only; the decoding is not ours

    raw = Path(path).read_bytes()
    out = {}
    for t in read_gguf(path).tensors:
        data = raw[t.offset:t.offset + t.nbytes]
        rows = math.prod(t.shape[:-1])
        if t.ggml_type == 42:
            out[t.name] = ("Q2_0", q2_0_reference_decode(data, rows, t.shape[-1]).reshape(t.shape))
        else:
            qtype = gguf.GGMLQuantizationType(t.ggml_type)
            out[t.name] = (qtype.name, gguf.quants.dequantize(np.frombuffer(data, np.uint8), qtype).reshape(t.shape))
    return out


def test_f32_is_llama_cpps_file(bitcpm, tmp_path):
    """Every key/value (MiniCPM's three scalings among them) and every tensor's bytes."""
    model, reference = bitcpm
    ours = tmp_path / "ours.gguf"
    convert(model, ours, "--type", "f32", "--embedding-type", "f32")
    compare_with_llama_cpp(ours, reference)
    config = json.loads((model / "config.json").read_text())
    fields = gguf.GGUFReader(ours).fields
    # MiniCPM's muP scalings as its modeling code applies them (config.json: 12, 1.4, hidden / 4)
    assert fields["minicpm.embedding_scale"].contents() == pytest.approx(config["scale_emb"], rel=1e-7)
    assert fields["minicpm.residual_scale"].contents() == pytest.approx(1.4 / math.sqrt(2), rel=1e-7)
    assert fields["minicpm.logit_scale"].contents() == pytest.approx(4.0, rel=1e-7)


@pytest.mark.parametrize("out_type", ["tq2_0", "tq1_0", "q2_0"])
def test_ternary_types_hold_the_checkpoint_values_exactly(bitcpm, tmp_path, out_type):
    model, reference = bitcpm
    ours = tmp_path / f"{out_type}.gguf"
    convert(model, ours, "--type", out_type)
    want, got = file_values(reference), file_values(ours)
    type_name = {"tq2_0": "TQ2_0", "tq1_0": "TQ1_0", "q2_0": "Q2_0"}[out_type]
    for layer in range(SHAPE["num_layers"]):
        for proj in PROJECTIONS:
            name = f"blk.{layer}.{proj}.weight"
            assert got[name][0] == type_name, name
            w = want[name][1]
            assert len(np.unique(np.abs(w).max(axis=1))) > 1, f"{name}: the checkpoint should have a scale per row"
            np.testing.assert_array_equal(got[name][1], w, err_msg=name)
    checked = run_cli("verify", ours, model)  # verify reads the row scales in the file's (permuted) order too
    assert "OK: key/values, tensors and length" in checked.stdout + checked.stderr


def test_tq2_0_runs_in_llama_cpp_near_the_f32_file(bitcpm, llama, tmp_path):
    model, reference = bitcpm
    ours = tmp_path / "tq2_0.gguf"
    convert(model, ours, "--type", "tq2_0")
    n_vocab = int(tensors(reference)["token_embd.weight"].shape[1])
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, 300, 24)]
    want = llama.logits(reference, tokens, n_ctx=N_CTX)
    got = llama.logits(ours, tokens, n_ctx=N_CTX)
    assert want.shape == (len(tokens), n_vocab)
    check_logits(got, want, TQ_MAX, TQ_MEAN, TQ_TOP1)


def test_auto_picks_tq2_0_for_scales_per_row(bitcpm, tmp_path):
    model, _ = bitcpm
    proc = convert(model, tmp_path / "auto.gguf")
    assert "type: TQ2_0, chosen by --type auto" in proc.stderr and "one scale per row" in proc.stderr


def test_i2_s_of_a_row_scaled_projection_is_refused_naming_it(bitcpm, tmp_path):
    model, _ = bitcpm
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    refused(model, out, "model.layers.0.self_attn.q_proj.weight", "I2_S keeps one scale per tensor",
            "--allow-requantize", extra=("--type", "i2_s"), in_data=True)


def test_a_minicpm_that_is_not_ternary_is_refused_in_one_line(tmp_path):
    model = write_checkpoint(tmp_path / "minicpm", "minicpm", **SHAPE, float_projections=True)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    refused(model, out, "model.layers.0.self_attn.q_proj.weight", "not ternary", "not a BitNet model")
    assert not (out.parent / "m.gguf.work").exists()  # refused before any work


@pytest.mark.parametrize("key", ["scale_emb", "dim_model_base"])
def test_a_missing_scaling_is_refused(tmp_path, key):
    model = write_checkpoint(tmp_path / "minicpm", "minicpm", **SHAPE)
    config = json.loads((model / "config.json").read_text())
    del config[key]
    (model / "config.json").write_text(json.dumps(config))
    proc = run_cli("plan", model, check_exit=2)
    assert key in proc.stderr and "positive numbers" in proc.stderr, proc.stderr


@pytest.mark.parametrize("group_size", [0, 128])
def test_one_scale_per_tensor_or_per_group_is_read_from_the_data_too(tmp_path, group_size):
    model = write_checkpoint(tmp_path / "minicpm", "minicpm", **SHAPE, group_size=group_size)
    ours = tmp_path / "q2.gguf"
    convert(model, ours, "--type", "q2_0")
    proc = run_cli("inspect", str(ours) + ".work", "blk.0.attn_q.weight")
    assert ("scale per tensor" if group_size == 0 else "scale per group 128") in proc.stdout, proc.stdout


def test_longrope_is_refused_for_now(tmp_path):
    """MiniCPM4's LongRoPE (rope_scaling with long_factor / short_factor: llama.cpp writes them as
    two generated F32 tensors) is not written yet: refused in one line, not dropped."""
    model = write_checkpoint(tmp_path / "minicpm", "minicpm", **SHAPE)
    config = json.loads((model / "config.json").read_text())
    half = config["hidden_size"] // config["num_attention_heads"] // 2
    config["rope_scaling"] = {"rope_type": "longrope", "long_factor": [1.0 + i / half for i in range(half)],
                              "short_factor": [1.0 + i / half for i in range(half)],
                              "original_max_position_embeddings": 32768}
    (model / "config.json").write_text(json.dumps(config))
    proc = run_cli("plan", model, check_exit=2)
    assert proc.stderr.strip().count("\n") == 0 and "rope_scaling" in proc.stderr, proc.stderr
