"""Group-scaled ternary checkpoints (PrismML Ternary-Bonsai-like: Qwen3, fp16 projections that are
{-s, 0, +s} with one s per group of columns): what the data allows, and every refusal.

Ternarity is read from the data, every 32 values of a row; the scale decides the output types:
one scale per tensor takes any type, one per 256 values (or a multiple) TQ2_0, TQ1_0 and Q2_0,
one per 64 or 128 values only Q2_0. Each refusal
is one line naming the tensor (and for the data, the row and columns), exit 2, and no output
or temporary file; a refusal that only the data shows may leave the run directory.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.synthetic import write_checkpoint

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4, num_kv_heads=2)


def files_under(*dirs, skip=()) -> dict[str, tuple[int, int]]:
    out = {}
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            subdirs[:] = [s for s in subdirs if os.path.join(root, s) not in skip]
            for f in files:
                st = os.stat(os.path.join(root, f))
                out[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return out


def refused(model, out, *needles, extra=(), in_data=False) -> str:
    run_dir = str(out) + ".work"
    before = files_under(model, out.parent, skip=(run_dir,))
    proc = convert(model, out, *extra, check_exit=2)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("bitnet-gguf: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    if not in_data:
        assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial") or p.name.startswith(".")]
    assert files_under(model, out.parent, skip=(run_dir,)) == before, "a refused conversion touched files"
    return errors[0]


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d / "m.gguf"


def edit_tensor(model, name, change):
    """Rewrite one fp16 tensor of model.safetensors in place: change(values) -> values."""
    path = model / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    info = json.loads(raw[8:8 + n])[name]
    begin, end = (8 + n + o for o in info["data_offsets"])
    values = np.frombuffer(bytes(raw[begin:end]), "<f2").reshape(info["shape"]).copy()
    raw[begin:end] = change(values).astype("<f2").tobytes()
    path.write_bytes(bytes(raw))


def test_a_group_that_is_not_ternary_is_refused_naming_tensor_row_and_columns(tmp_path, out):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE)
    name = "model.layers.0.mlp.gate_proj.weight"

    def spoil(w):
        w[3, 130] = w[3, 128:160][w[3, 128:160] != 0][0] * 2 + 0.001  # a second magnitude in the group
        return w
    edit_tensor(model, name, spoil)
    refused(model, out, name, "row 3, columns 128..159", "not ternary", extra=("--type", "q2_0"), in_data=True)


def test_an_ordinary_float_qwen3_is_refused(tmp_path, out):
    """A Qwen3ForCausalLM checkpoint is only taken for group-scaled ternary; float weights are not."""
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE)
    edit_tensor(model, "model.layers.0.self_attn.q_proj.weight",
                lambda w: np.random.default_rng(0).normal(0, 0.02, w.shape))
    refused(model, out, "model.layers.0.self_attn.q_proj.weight", "row 0, columns 0..31", "not ternary",
            extra=("--type", "q2_0"), in_data=True)


def test_a_missing_q_norm_is_refused(tmp_path, out):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE)
    path = model / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    del header["model.layers.0.self_attn.q_norm.weight"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    refused(model, out, "model.layers.0.self_attn.q_norm.weight", "missing")


def test_groups_of_32_are_refused_without_the_option_even_for_q2_0(tmp_path, out):
    """Q2_0 keeps one scale per 64 values: a scale that changes every 32 is held by no type."""
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, group_size=32)
    refused(model, out, "--type q2_0", "changes inside a block of 64 values", "Q2_0 keeps one scale per 64 values",
            "no ternary type holds a scale that changes every 32 values", "pass --allow-requantize", "f16 holds them",
            extra=("--type", "q2_0"), in_data=True)


@pytest.mark.parametrize("out_type,needle", [("tq2_0", "changes inside a block of 256 values"),
                                            ("tq1_0", "changes inside a block of 256 values"),
                                            ("i2_s", "I2_S keeps one scale per tensor")])
def test_per_group_scales_refuse_the_types_with_bigger_blocks(tmp_path, out, out_type, needle):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE)
    refused(model, out, "model.layers.0.self_attn.q_proj.weight", f"--type {out_type}", needle,
            "converts without requantizing to --type q2_0", extra=("--type", out_type), in_data=True)


def test_groups_of_256_take_tq_but_not_i2_s(tmp_path, out):
    """One scale per 256 values: TQ2_0 and TQ1_0 keep one per block, so they hold it exactly
    (decoded with gguf's dequantizer: the checkpoint's values); I2_S is refused, naming the rest."""
    import gguf

    from pipeline.gguf_file import read_gguf
    from tests.reference_model import load_checkpoint

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, group_size=256)
    _, tensors = load_checkpoint(model)
    w = tensors["model.layers.0.mlp.gate_proj.weight"]
    assert len(np.unique(np.abs(w[w != 0]))) > 100  # many different scales
    for out_type in ("tq2_0", "tq1_0"):
        path = tmp_path / f"{out_type}.gguf"
        convert(model, path, "--type", out_type)
        t = next(t for t in read_gguf(path).tensors if t.name == "blk.0.ffn_gate.weight")
        raw = np.frombuffer(path.read_bytes()[t.offset:t.offset + t.nbytes], np.uint8).reshape(t.shape[0], -1)
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[out_type.upper()])
        np.testing.assert_array_equal(values, w.astype(np.float32))
    refused(model, out, "--type i2_s", "I2_S keeps one scale per tensor", "--type tq2_0 or tq1_0 or q2_0",
            extra=("--type", "i2_s"), in_data=True)


def test_rows_that_are_not_whole_64_value_blocks_are_refused_before_any_work(tmp_path, out):
    model = write_checkpoint(tmp_path / "m", "bonsai", **(SHAPE | dict(intermediate_size=288)), group_size=32)
    refused(model, out, "model.layers.0.mlp.down_proj.weight", "rows of 288 values", "multiple of 64",
            extra=("--type", "q2_0"))


def test_one_scale_per_tensor_takes_every_type(tmp_path_factory):
    """The same data at every ternary type: decoded values equal (I2_S and Q2_0 read with our
    readers, TQ with gguf's), so one magnitude per tensor is recognised as such. The checkpoint is
    tests/test_families.py's bonsai-uniform (SHAPE's projections, two layers), read from its
    conversions (one list of every type, once per run; x86 I2_S, which decode_i2s_reference reads)."""
    import gguf

    from pipeline.gguf_file import read_gguf
    from tests.test_codecs import q2_0_reference_decode
    from tests.test_families import CASES, case_outputs, decode_i2s_reference

    assert CASES["bonsai-uniform"][0] == "bonsai" and CASES["bonsai-uniform"][1]["group_size"] == 0
    _, outputs = case_outputs(tmp_path_factory, "bonsai-uniform")
    name = "blk.0.ffn_up.weight"
    decoded = {}
    for out_type in ("tq2_0", "tq1_0", "i2_s", "q2_0"):
        out = outputs[out_type][0]
        t = next(t for t in read_gguf(out).tensors if t.name == name)
        raw = out.read_bytes()[t.offset:t.offset + t.nbytes]
        shape = tuple(t.shape)
        if out_type == "i2_s":
            decoded[out_type] = decode_i2s_reference(raw, shape)[0]
        elif out_type == "q2_0":
            decoded[out_type] = q2_0_reference_decode(raw, *shape)
        else:
            qtype = gguf.GGMLQuantizationType[out_type.upper()]
            decoded[out_type] = gguf.quants.dequantize(np.frombuffer(raw, np.uint8).reshape(shape[0], -1), qtype)
    for out_type, values in decoded.items():
        np.testing.assert_array_equal(values, decoded["q2_0"], err_msg=out_type)
    assert len(np.unique(np.abs(decoded["q2_0"][decoded["q2_0"] != 0]))) == 1


# -- --allow-requantize: a type whose blocks are bigger than the groups ---------------------------

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HF_PROJECTIONS = dict(attn_q="self_attn.q_proj", attn_k="self_attn.k_proj", attn_v="self_attn.v_proj",
                      attn_output="self_attn.o_proj", ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj",
                      ffn_down="mlp.down_proj")


def printed_rms_change(warning: str) -> float:
    """The relative RMS change the warning prints, as a fraction."""
    import re

    return float(re.search(r"relative RMS change of its effective weights ([0-9.]+)%", warning).group(1)) / 100


def rms_change(new: np.ndarray, old: np.ndarray) -> float:
    old = old.astype(np.float64)
    return float(np.sqrt(((new.astype(np.float64) - old) ** 2).sum() / (old ** 2).sum()))


def tensor_bytes(path, name) -> tuple[np.ndarray, tuple]:
    from pipeline.gguf_file import read_gguf

    t = next(t for t in read_gguf(path).tensors if t.name == name)
    return np.frombuffer(path.read_bytes()[t.offset:t.offset + t.nbytes], np.uint8), tuple(t.shape)


@pytest.fixture
def tie_model(tmp_path):
    """Groups of 128 (the Bonsai layout), and in ffn_up row 0 a block of 256 whose second group's
    scale is exactly half the first's (the rounding tie: gguf's roundf keeps it as +-d)."""
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE)

    def tie(w):
        w[0, :128] = np.where(w[0, :128] != 0, np.sign(w[0, :128]) * np.float16(0.04), 0)
        w[0, 128:256] = np.where(w[0, 128:256] != 0, np.sign(w[0, 128:256]) * np.float16(0.02), 0)
        return w
    edit_tensor(model, "model.layers.0.mlp.up_proj.weight", tie)
    return model


@pytest.mark.parametrize("out_type", ["tq2_0", "tq1_0"])
def test_allow_requantize_writes_gguf_quants_of_the_effective_weights(tie_model, tmp_path, out_type):
    """Every projection's bytes are gguf.quants.quantize of the checkpoint's values (the effective
    weights: codes times their group's scale); one warning per tensor names it and what was lost;
    verify knows the file is requantized and checks it against gguf's quantizer."""
    import gguf

    from tests.reference_model import load_checkpoint

    out = tmp_path / f"{out_type}.gguf"
    proc = convert(tie_model, out, "--type", out_type, "--allow-requantize")
    _, tensors = load_checkpoint(tie_model)
    qtype = gguf.GGMLQuantizationType[out_type.upper()]
    for short in PROJECTIONS:
        name = f"blk.0.{short}.weight"
        raw, shape = tensor_bytes(out, name)
        w = tensors[f"model.layers.0.{HF_PROJECTIONS[short]}.weight"].astype(np.float32)
        np.testing.assert_array_equal(raw.reshape(shape[0], -1), gguf.quants.quantize(w, qtype), err_msg=name)
        warnings = [line for line in proc.stderr.splitlines() if f"warning: {name}: requantized" in line]
        assert len(warnings) == 1, proc.stderr
        assert f"to {out_type.upper()} (--allow-requantize)" in warnings[0]
        assert "blocks of 256 values had several scales; each now has one" in warnings[0]
        assert "became 0" in warnings[0] and "grew by up to" in warnings[0]
        # the RMS change it prints is the one between gguf's dequantization of the file and the checkpoint
        values = gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype)
        assert abs(printed_rms_change(warnings[0]) - rms_change(values, w)) <= 1e-6, (warnings[0], rms_change(values, w))
    # the tie survived as +-d: roundf(0.5) = 1
    raw, shape = tensor_bytes(out, "blk.0.ffn_up.weight")
    values = gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype)
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    assert (np.abs(values[0, :256][w[0, :256] != 0]) == np.float32(np.float16(0.04))).all()
    ok = run_cli("verify", out, tie_model)
    assert "blk.0.ffn_up.weight: ok (requantized to " + out_type.upper() in ok.stderr + ok.stdout
    assert "gguf.quants' quantizer" in ok.stderr + ok.stdout


def test_allow_requantize_to_i2_s_is_bitnet_cpps_quantizer(tie_model, tmp_path):
    """I2_S keeps one float32 scale per tensor: bitnet.cpp's quantize_i2_s makes it max |w| and
    every non-zero value its sign (decoded with the FORMATS.md reader of the tests)."""
    from tests.reference_model import load_checkpoint
    from tests.test_families import decode_i2s_reference

    out = tmp_path / "i2s.gguf"
    proc = convert(tie_model, out, "--type", "i2_s", "--target", "x86", "--allow-requantize")
    _, tensors = load_checkpoint(tie_model)
    for short in PROJECTIONS:
        name = f"blk.0.{short}.weight"
        raw, shape = tensor_bytes(out, name)
        values, scale, _ = decode_i2s_reference(raw.tobytes(), shape)
        w = tensors[f"model.layers.0.{HF_PROJECTIONS[short]}.weight"].astype(np.float32)
        assert scale == np.abs(w).max(), name
        np.testing.assert_array_equal(values, np.sign(w) * scale, err_msg=name)
        warnings = [line for line in proc.stderr.splitlines() if f"warning: {name}: requantized to I2_S" in line]
        assert len(warnings) == 1 and "different scales" in warnings[0] and "become one" in warnings[0], proc.stderr
        assert abs(printed_rms_change(warnings[0]) - rms_change(values, w)) <= 1e-6, (warnings[0], rms_change(values, w))
    ok = run_cli("verify", out, tie_model)
    assert "quantize_i2_s" in ok.stderr + ok.stdout


def test_without_the_option_a_requantizing_type_is_refused_and_a_rerun_redoes_only_pack(tmp_path, out):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE)
    refused(model, out, "--type tq2_0", "changes inside a block of 256 values", "--allow-requantize",
            extra=("--type", "tq2_0"), in_data=True)
    done = convert(model, out, "--type", "tq2_0", "--allow-requantize")
    assert "extract: already done, skipped" in done.stderr and "quantize: already done, skipped" in done.stderr
    again = convert(model, out, "--type", "tq2_0", "--allow-requantize")
    assert "pack: already done, skipped" in again.stderr and "requantized" not in again.stderr
    before = out.read_bytes()
    proc = convert(model, out, "--type", "tq2_0", check_exit=2)
    assert "pack: --allow-requantize (True -> False) changed since it was done" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("bitnet-gguf: error: tensor ")
    assert out.read_bytes() == before  # the refusal wrote nothing over the earlier file


def test_the_option_is_a_pack_input_only_for_group_scaled_checkpoints(tmp_path):
    from pipeline.checkpoint import open_checkpoint
    from pipeline.config import make_options
    from pipeline.runner import stage_keys

    for family, differs in (("bonsai", True), ("1bitllm", False)):
        model = write_checkpoint(tmp_path / family, family, **SHAPE)
        ckpt = open_checkpoint(model)
        keys = [stage_keys(make_options(model, output=tmp_path / "o.gguf", allow_requantize=flag), ckpt)
                for flag in (False, True)]
        assert keys[0]["quantize"] == keys[1]["quantize"]
        assert (keys[0]["pack"] != keys[1]["pack"]) == differs, family


def test_plan_and_help_show_the_option(tmp_path):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE)
    without = run_cli("plan", model, "--type", "tq2_0").stdout
    with_it = run_cli("plan", model, "--type", "tq2_0", "--allow-requantize").stdout
    line = next(l for l in without.splitlines() if l.startswith("blk.0.ffn_up.weight"))
    assert "refused if its scale changes inside a block of 256 values (unless --allow-requantize)" in line
    line = next(l for l in with_it.splitlines() if l.startswith("blk.0.ffn_up.weight"))
    assert "requantized (lossy) if its scale changes inside a block of 256 values" in line
    q2 = run_cli("plan", model, "--type", "q2_0").stdout
    line = next(l for l in q2.splitlines() if l.startswith("blk.0.ffn_up.weight"))
    assert "refused if its scale changes inside a block of 64 values (unless --allow-requantize)" in line
    text = " ".join(run_cli("convert", "--help").stdout.split())
    assert "--allow-requantize" in text and "requantized to --type by the type's own quantizer" in text


def test_groups_of_32_requantized_to_q2_0_are_llama_cpps_own_quantization(tmp_path, llama):
    """A scale that changes every 32 values, --type q2_0 --allow-requantize: every projection's bytes
    are what llama.cpp's llama_model_quantize (llama-quantize, file type 41) makes of the same
    checkpoint's effective weights written as F32; one warning per tensor; verify checks it."""
    from pipeline.gguf_file import read_gguf
    from tests.reference_model import load_checkpoint

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, group_size=32)
    ours, f32, theirs = tmp_path / "q2_0.gguf", tmp_path / "f32.gguf", tmp_path / "llama-q2_0.gguf"
    proc = convert(model, ours, "--type", "q2_0", "--allow-requantize")
    convert(model, f32, "--type", "f32")
    llama.quantize(f32, theirs, 41)
    _, tensors = load_checkpoint(model)
    types = {t.name: t.ggml_type for t in read_gguf(theirs).tensors}
    for short in PROJECTIONS:
        name = f"blk.0.{short}.weight"
        assert types[name] == 42, (name, types[name])  # llama.cpp wrote it as Q2_0 too
        raw, _ = tensor_bytes(ours, name)
        want, _ = tensor_bytes(theirs, name)
        np.testing.assert_array_equal(raw, want, err_msg=name)
        w = tensors[f"model.layers.0.{HF_PROJECTIONS[short]}.weight"]
        mags = np.abs(w.astype(np.float32)).reshape(w.shape[0], -1, 32).max(axis=2)
        assert (mags[:, 0::2] != mags[:, 1::2]).any(), name  # the scale changes every 32 values
        warnings = [line for line in proc.stderr.splitlines() if f"warning: {name}: requantized to Q2_0" in line]
        assert len(warnings) == 1 and "blocks of 64 values had several scales" in warnings[0], proc.stderr
        assert "blocks of 32 were under half of it" in warnings[0]
    ok = run_cli("verify", ours, model)
    assert "blk.0.ffn_up.weight: ok (requantized to Q2_0" in ok.stderr + ok.stdout
    assert "quantize_row_q2_0_ref" in ok.stderr + ok.stdout


@pytest.mark.parametrize("out_type", ["tq2_0", "i2_s"])
def test_groups_of_32_requantized_to_the_bigger_types(tmp_path, out_type):
    """The same checkpoint to TQ2_0 (bytes: gguf.quants.quantize of the checkpoint's values) and to
    x86 I2_S (decoded: sign times max |w| of the tensor, bitnet.cpp's quantize_i2_s)."""
    import gguf

    from tests.reference_model import load_checkpoint
    from tests.test_families import decode_i2s_reference

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, group_size=32)
    out = tmp_path / f"{out_type}.gguf"
    convert(model, out, "--type", out_type, "--target", "x86", "--allow-requantize")
    _, tensors = load_checkpoint(model)
    for short in PROJECTIONS:
        name = f"blk.0.{short}.weight"
        raw, shape = tensor_bytes(out, name)
        w = tensors[f"model.layers.0.{HF_PROJECTIONS[short]}.weight"].astype(np.float32)
        if out_type == "tq2_0":
            np.testing.assert_array_equal(raw.reshape(shape[0], -1), gguf.quants.quantize(w, gguf.GGMLQuantizationType.TQ2_0),
                                          err_msg=name)
        else:
            values, scale, _ = decode_i2s_reference(raw.tobytes(), shape)
            assert scale == np.abs(w).max(), name
            np.testing.assert_array_equal(values, np.sign(w) * scale, err_msg=name)
    ok = run_cli("verify", out, model)
    assert "blk.0.ffn_up.weight: ok (requantized to " in ok.stderr + ok.stdout


def test_a_group_scaled_projection_falls_back_to_f16_with_its_exact_values(tmp_path):
    """Rows of 320 values (5 groups of 64) are no whole TQ2_0 block: that projection is F16, and F16
    holds the checkpoint's fp16 values exactly (the others are requantized, as asked)."""
    from tests.reference_model import load_checkpoint

    model = write_checkpoint(tmp_path / "m", "bonsai", **(SHAPE | dict(intermediate_size=320)), group_size=64)
    out = tmp_path / "o.gguf"
    proc = convert(model, out, "--type", "tq2_0", "--allow-requantize")
    assert "blk.0.ffn_down.weight: row length 320 is not a multiple of 256, so it cannot be TQ2_0; writing F16" \
        in proc.stderr
    raw, shape = tensor_bytes(out, "blk.0.ffn_down.weight")
    _, tensors = load_checkpoint(model)
    w = tensors["model.layers.0.mlp.down_proj.weight"]
    assert len(np.unique(np.abs(w[w != 0]))) > 10
    np.testing.assert_array_equal(raw.view("<f2").reshape(shape), w)
    ok = run_cli("verify", out, model)
    assert "blk.0.ffn_down.weight: ok" in ok.stderr + ok.stdout
