"""Binary checkpoints (PrismML 1-bit Bonsai-like: Qwen3, fp16 projections {-s, +s} with one s per
128 values) and upstream llama.cpp's Q1_0 (ggml type 41, file type 40).

Binarity is read from the data (no zero anywhere in a projection). Q1_0 files are decoded here by
a decoder written from the format alone (per 128 values an fp16 d, then 16 bytes: bit i of byte j
is value 8j + i, set for +d) and must give the checkpoint's values exactly; llama.cpp runs them.
A ternary tensor is refused for Q1_0, or with --allow-requantize written as llama.cpp's own
llama_model_quantize writes it.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.synthetic import write_checkpoint
from tests.test_group_scaled import HF_PROJECTIONS, PROJECTIONS, SHAPE, refused, tensor_bytes

LLAMA_SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                   tokenizer_vocab=600, seed=21)


Q1_0_MAX, Q1_0_MEAN, Q1_0_TOP1 = 0.03, 0.015, 0.9  # a Q1_0 file itself in llama.cpp (see the test)


def decode_q1_0(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """Q1_0 from its description, one value at a time: fp16 d, then bit i of byte j = value 8j + i (+d if set)."""
    out = np.empty((rows, cols), np.float64)
    pos = 0
    for r in range(rows):
        for b in range(0, cols, 128):
            (d,) = struct.unpack("<e", raw[pos:pos + 2])
            for j in range(128):
                out[r, b + j] = d if (raw[pos + 2 + j // 8] >> (j % 8)) & 1 else -d
            pos += 18
    return out


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    """A binary Bonsai-like checkpoint and its Q1_0 file."""
    root = tmp_path_factory.mktemp("binary")
    model = write_checkpoint(root / "m", "bonsai", **LLAMA_SHAPE, binary=True)
    out = root / "m-q1_0.gguf"
    proc = convert(model, out, "--type", "q1_0")
    return model, out, proc


def test_q1_0_tensors_decode_exactly_to_the_checkpoints_values(binary):
    from pipeline.gguf_file import read_gguf
    from tests.reference_model import load_checkpoint

    model, out, _ = binary
    contents = read_gguf(out)
    assert contents.kv("general.file_type") == 40  # LLAMA_FTYPE_MOSTLY_Q1_0 in llama.h
    _, tensors = load_checkpoint(model)
    for layer in range(LLAMA_SHAPE["num_layers"]):
        for short in PROJECTIONS:
            name = f"blk.{layer}.{short}.weight"
            t = next(t for t in contents.tensors if t.name == name)
            assert t.ggml_type == 41, name
            raw, shape = tensor_bytes(out, name)
            assert raw.size == shape[0] * shape[1] // 128 * 18, name
            w = tensors[f"model.layers.{layer}.{HF_PROJECTIONS[short]}.weight"]
            assert (w != 0).all() and len(np.unique(np.abs(w))) > 10, name  # binary, many group scales
            np.testing.assert_array_equal(decode_q1_0(raw.tobytes(), *shape), w, err_msg=name)


def test_verify_and_inspect_know_q1_0(binary, tmp_path):
    model, out, _ = binary
    ok = run_cli("verify", out, model)
    assert "blk.0.ffn_up.weight: ok" in ok.stdout + ok.stderr
    shown = run_cli("inspect", out).stdout
    assert "general.file_type 40 (Q1_0)" in shown and "14 Q1_0" in shown, shown
    # one sign bit flipped: verify fails, naming the tensor
    from pipeline.gguf_file import read_gguf

    t = next(t for t in read_gguf(out).tensors if t.name == "blk.1.attn_v.weight")
    bad = tmp_path / "bad.gguf"
    raw = bytearray(out.read_bytes())
    raw[t.offset + 18 * 5 + 7] ^= 0x10
    bad.write_bytes(bytes(raw))
    proc = run_cli("verify", bad, model, check_exit=1)
    assert "blk.1.attn_v.weight" in proc.stdout + proc.stderr


def test_plan_and_help_name_q1_0(binary):
    model, _, _ = binary
    plan = run_cli("plan", model, "--type", "q1_0").stdout
    assert "blk.0.attn_q.weight" in plan and " Q1_0 " in plan, plan
    assert "refused if it holds a 0 or its scale changes inside a block of 128 values" in plan
    text = " ".join(run_cli("convert", "--help").stdout.split())
    assert "q1_0 (1.125 bits/weight" in text


def q1_0_as_f32(t, data: bytes) -> tuple[int, bytes]:
    if t.ggml_type != 41:
        return t.ggml_type, data
    return 0, decode_q1_0(data, t.shape[0], t.shape[1]).astype("<f4").tobytes()


@pytest.mark.llama
def test_q1_0_file_runs_in_llamacpp(llama, binary, tmp_path):
    """The Q1_0 file decoded to F32 (the decoder above) runs within the exact limits of the numpy
    reference (measured 0.02%); the Q1_0 file itself (llama.cpp's Q1_0 x Q8_0 kernel: 8-bit
    activations) within Q1_0_MAX / Q1_0_MEAN (measured 0.4% worst, 0.24% mean, top-1 everywhere)."""
    from tokenizers import Tokenizer

    from tests.reference_model import forward
    from tests.test_llamacpp import N_TOKENS, TEXT, llama_logits
    from tests.test_llamacpp_families import EXACT_MAX, EXACT_MEAN, check_logits, rewrite

    model, out, _ = binary
    tokens = Tokenizer.from_file(str(model / "tokenizer.json")).encode(TEXT + " " + TEXT).ids[:N_TOKENS]
    want = forward(model, tokens, embed_dtype=np.float16, ternary_dtype=np.float16)
    exact = rewrite(out, tmp_path / "f32.gguf", q1_0_as_f32)
    check_logits(llama_logits(llama, exact, tokens, n_vocab=want.shape[1]), want, EXACT_MAX, EXACT_MEAN, 1.0)
    check_logits(llama_logits(llama, out, tokens, n_vocab=want.shape[1]), want, Q1_0_MAX, Q1_0_MEAN, Q1_0_TOP1)


def test_binary_groups_of_128_are_exact_in_q2_0_and_refused_by_tq(binary, tmp_path):
    from tests.reference_model import load_checkpoint
    from tests.test_codecs import q2_0_reference_decode

    model, _, _ = binary
    out = tmp_path / "q2.gguf"
    convert(model, out, "--type", "q2_0")
    _, tensors = load_checkpoint(model)
    raw, shape = tensor_bytes(out, "blk.0.ffn_down.weight")
    np.testing.assert_array_equal(q2_0_reference_decode(raw.tobytes(), *shape),
                                  tensors["model.layers.0.mlp.down_proj.weight"])
    target = tmp_path / "o" / "tq.gguf"
    target.parent.mkdir()
    refused(model, target, "--type tq2_0", "changes inside a block of 256 values", "q2_0 or q1_0",
            extra=("--type", "tq2_0"), in_data=True)


def test_binary_with_one_scale_per_256_is_exact_in_tq2_0_and_q1_0(tmp_path):
    import gguf

    from tests.reference_model import load_checkpoint

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, group_size=256, binary=True)
    _, tensors = load_checkpoint(model)
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    for out_type in ("tq2_0", "q1_0"):
        out = tmp_path / f"{out_type}.gguf"
        convert(model, out, "--type", out_type)
        raw, shape = tensor_bytes(out, "blk.0.ffn_up.weight")
        got = gguf.quants.dequantize(raw.reshape(shape[0], -1), gguf.GGMLQuantizationType.TQ2_0) \
            if out_type == "tq2_0" else decode_q1_0(raw.tobytes(), *shape)
        np.testing.assert_array_equal(got, w, err_msg=out_type)


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d / "m.gguf"


def test_a_ternary_tensor_is_refused_for_q1_0_naming_it(tmp_path, out):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE)
    refused(model, out, "tensor model.layers.0.self_attn.q_proj.weight: --type q1_0", "value(s) of 0",
            "Q1_0 holds -d and +d only", "--type q2_0", "--allow-requantize", extra=("--type", "q1_0"), in_data=True)


def test_one_zero_in_a_binary_checkpoint_is_refused_naming_its_row(tmp_path, out):
    from tests.test_group_scaled import edit_tensor

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, binary=True)

    def zero(w):
        w[37, 200] = 0
        return w
    edit_tensor(model, "model.layers.0.mlp.gate_proj.weight", zero)
    refused(model, out, "tensor model.layers.0.mlp.gate_proj.weight", "1 value(s) of 0 (the first in row 37)",
            extra=("--type", "q1_0"), in_data=True)


@pytest.mark.parametrize("family", ["1bitllm", "llama3-1.58"])
def test_families_with_ternary_projections_are_refused_before_any_work(tmp_path, out, family):
    model = write_checkpoint(tmp_path / "m", family, num_layers=1)
    refused(model, out, "--type q1_0 holds binary projections", "are ternary", extra=("--type", "q1_0"))
    refused(model, out, "--type q1_0 holds binary projections", extra=("--type", "q1_0", "--allow-requantize"))


@pytest.mark.llama
def test_ternary_requantized_to_q1_0_is_llama_cpps_own_quantization(tmp_path, llama):
    """A ternary checkpoint, --type q1_0 --allow-requantize: every projection's bytes are what
    llama.cpp's llama_model_quantize (file type 40, MOSTLY_Q1_0) makes of the same checkpoint's values
    written as F32; one warning per tensor with the relative RMS change, which matches the decoded
    file's; verify checks it."""
    from pipeline.gguf_file import read_gguf
    from tests.reference_model import load_checkpoint
    from tests.test_group_scaled import printed_rms_change, rms_change

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE)
    ours, f32, theirs = tmp_path / "q1_0.gguf", tmp_path / "f32.gguf", tmp_path / "llama-q1_0.gguf"
    proc = convert(model, ours, "--type", "q1_0", "--allow-requantize")
    convert(model, f32, "--type", "f32")
    llama.quantize(f32, theirs, 40)
    _, tensors = load_checkpoint(model)
    types = {t.name: t.ggml_type for t in read_gguf(theirs).tensors}
    for short in PROJECTIONS:
        name = f"blk.0.{short}.weight"
        assert types[name] == 41, (name, types[name])  # llama.cpp wrote it as Q1_0 too
        raw, shape = tensor_bytes(ours, name)
        want, _ = tensor_bytes(theirs, name)
        np.testing.assert_array_equal(raw, want, err_msg=name)
        w = tensors[f"model.layers.0.{HF_PROJECTIONS[short]}.weight"]
        assert (w == 0).any(), name
        warnings = [line for line in proc.stderr.splitlines() if f"warning: {name}: requantized to Q1_0" in line]
        assert len(warnings) == 1 and f"its {int((w == 0).sum())} zero value(s) became +d" in warnings[0], proc.stderr
        assert abs(printed_rms_change(warnings[0]) - rms_change(decode_q1_0(raw.tobytes(), *shape), w)) < 1e-4
    ok = run_cli("verify", ours, model)
    assert "blk.0.ffn_up.weight: ok (requantized to Q1_0" in ok.stderr + ok.stdout
    assert "quantize_row_q1_0_ref" in ok.stderr + ok.stdout


def test_one_scale_per_tensor_ternary_requantized_to_q1_0(tmp_path):
    """group_size 0 (one scale for the tensor) with zeros: the same rule, decoded here: each value's
    sign (a 0 is +) times its block's mean |w| in fp16."""
    from tests.reference_model import load_checkpoint

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, group_size=0)
    out = tmp_path / "o.gguf"
    convert(model, out, "--type", "q1_0", "--allow-requantize")
    _, tensors = load_checkpoint(model)
    w = tensors["model.layers.0.self_attn.o_proj.weight"]
    raw, shape = tensor_bytes(out, "blk.0.attn_output.weight")
    blocks = np.abs(w).reshape(shape[0], -1, 128).mean(axis=2)
    want = np.where(w >= 0, 1.0, -1.0) * np.repeat(blocks.astype(np.float16).astype(np.float64), 128, axis=1)
    np.testing.assert_array_equal(decode_q1_0(raw.tobytes(), *shape), want)


# -- the codec alone -------------------------------------------------------------------------------

def q1_0_quantize_transcribed(values: np.ndarray) -> bytes:
    """quantize_row_q1_0_ref (ggml-quants.c of the llama-cpp-python 0.3.36 sdist), one value at a time:
    float32 sum_abs += fabsf(x), d = sum_abs / 128 to fp16; bit j set where x >= 0."""
    out = bytearray()
    for block in np.asarray(values, np.float32).reshape(-1, 128):
        total = np.float32(0)
        for x in block:
            total = np.float32(total + np.float32(abs(x)))
        out += struct.pack("<e", float(np.float16(np.float32(total / np.float32(128)))))
        qs = [0] * 16
        for j, x in enumerate(block):
            if x >= 0:
                qs[j // 8] |= 1 << (j % 8)
        out += bytes(qs)
    return bytes(out)


def test_the_codec_is_llama_cpps_rule_and_the_format():
    from pipeline.codecs import Q1_0

    rng = np.random.default_rng(3)
    values = (rng.standard_normal((3, 256)) * rng.uniform(1e-3, 10, (3, 1))).astype(np.float32)
    values[0, :50] = 0.0
    values[1, 7] = -0.0  # -0.0 >= 0 in C: +d
    assert Q1_0.quantize(values).tobytes() == q1_0_quantize_transcribed(values)
    codes = np.where(rng.random((2, 384)) < 0.5, -1, 1).astype(np.int8)
    scales = rng.uniform(0.01, 0.05, (2, 3)).astype(np.float16).astype(np.float32)
    raw = Q1_0.encode(codes, scales)
    np.testing.assert_array_equal(decode_q1_0(raw.tobytes(), 2, 384), codes * np.repeat(scales, 128, axis=1))
    np.testing.assert_array_equal(Q1_0.decode(raw), codes * np.repeat(scales, 128, axis=1))
