"""Every supported checkpoint family converts to the weights its checkpoint stands for.

Synthetic checkpoints of every family (tests/synthetic.py) are converted with the CLI,
and every tensor of the GGUF is decoded with gguf's own dequantizer and compared with
the effective weights computed from the checkpoint by tests/reference_model.py
(written from FORMATS.md: unpack the quarter layout, apply weight_scale in the family's
direction, absmean for master weights) with the llama q/k permutation written here
from the format description. The llama-arch files must also be byte-identical to what
llama.cpp's own converter writes (`--no-lazy`, the only mode that reads packed
checkpoints), except the naming keys its heuristics add.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.conftest import convert, shared_checkpoint, shared_conversion, shared_outputs
from tests.reference_model import effective_weights
from tests.synthetic import write_checkpoint

# family -> (GGUF arch, q/k permuted, output tensor)
FAMILY_FACTS = {
    "1bitllm": ("bitnet", False, False),
    "llama3-1.58": ("llama", True, True),
    "falcon3-1.58": ("llama", True, True),
    "2b4t": ("bitnet-b1.58", False, False),
    "2b4t-bf16": ("bitnet-b1.58", False, False),
    "falcon-e": ("llama", True, True),
    "falcon-e-prequantized": ("llama", True, True),
    "bonsai": ("qwen3", False, True),
}

CASES = {
    # name: (family, checkpoint arguments)
    "1bitllm-f16": ("1bitllm", dict(num_heads=4, num_kv_heads=2, dtype="f16")),
    "llama3": ("llama3-1.58", dict(num_heads=8, num_kv_heads=2, num_layers=2)),
    "llama3-sharded": ("llama3-1.58", dict(num_heads=4, num_kv_heads=4, shards=3, seed=1)),
    # head_dim 128 with hidden 256 and 4 heads: q_proj has 512 rows, o_proj 512 columns
    "falcon3-head-dim": ("falcon3-1.58", dict(num_heads=4, num_kv_heads=1, head_dim=128, seed=2)),
    "2b4t": ("2b4t", dict(num_heads=4, num_kv_heads=1, seed=3)),
    "2b4t-bf16-sharded": ("2b4t-bf16", dict(num_heads=4, num_kv_heads=2, shards=2, seed=4)),
    # onebitllms' quantize_to_1bit layout (Falcon-E main revision): weight_scale = 1 / absmean
    "falcon-e": ("falcon-e", dict(num_heads=4, num_kv_heads=2, head_dim=128, seed=9)),
    # Falcon-E prequantized revision: bf16 master weights of a Llama, absmean, q/k permuted
    "falcon-e-prequantized": ("falcon-e-prequantized", dict(num_heads=4, num_kv_heads=1, shards=2, seed=10)),
    # 1bitLLM bitnet_b1_58-xl's shape scaled down (hidden 2048 -> 256, FFN 5460 -> 340: a multiple
    # of 4 but not of 8, 32, 128 or 256, like 5460): ffn_down's rows cannot be TQ/I2_S -> F16
    "1bitllm-xl-shape": ("1bitllm", dict(hidden_size=256, intermediate_size=340, num_heads=4, dtype="f16",
                                         seed=11)),
    # PrismML Ternary-Bonsai-like (Qwen3, q/k norms, fp16 ternary projections), one scale per
    # group of 128 values of a row (Q2_0 only), per 64, or one per tensor (every type)
    "bonsai": ("bonsai", dict(num_heads=4, num_kv_heads=2, head_dim=64, seed=15)),
    "bonsai-g64": ("bonsai", dict(num_heads=4, num_kv_heads=1, group_size=64, shards=2, seed=16)),
    "bonsai-uniform": ("bonsai", dict(num_heads=4, num_kv_heads=2, group_size=0, seed=17)),
}

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.inner_attn_ln": "attn_sub_norm", "mlp.ffn_layernorm": "ffn_sub_norm",
    "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, block, rest = hf.split(".", 3)
    return f"blk.{block}.{HF_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """FORMATS.md: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def tensor_values(t) -> np.ndarray:
    """A GGUF tensor decoded with gguf's reference dequantizer, in numpy order."""
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape([int(x) for x in reversed(t.shape)])


def expected_tensor(name: str, w: np.ndarray, tensor_type, config: dict) -> np.ndarray:
    """What the file must hold for effective weights w (float64)."""
    if w.ndim == 1:
        return w.astype(np.float32)
    if tensor_type == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float32).astype(np.float16).astype(np.float32)
    # ternary: every non-zero magnitude is the same; TQ blocks store it as fp16
    mags = np.unique(np.abs(w[w != 0]))
    assert len(mags) == 1, f"{name}: the effective weights are not ternary"
    d = np.float32(np.float16(np.float32(mags[0])))
    return (np.sign(w) * d).astype(np.float32)


# The types each case is read at here, in tests/test_ik_types.py (the ik types) and in
# tests/test_bitnet_targets.py (its x86 I2_S): all of one case from one `--type a,b,c` conversion,
# once per run (conftest.shared_outputs; tests/test_many_outputs.py holds each list's files and
# warnings equal to conversions to one type). I2_S in the x86 layout, which decode_i2s_reference
# reads, on any machine (--target changes nothing else).
TQ, I2S, Q2, IK = ("tq2_0", "tq1_0"), ("i2_s",), ("q2_0",), ("iq2_bn", "iq1_bn", "iq2_bn_r4")
CASE_TYPES = {
    "1bitllm-f16": TQ + I2S + Q2 + IK,
    "llama3": TQ + I2S + Q2 + IK,
    "llama3-sharded": TQ,
    "falcon3-head-dim": TQ + I2S,
    "2b4t": TQ + I2S + Q2 + IK,
    "2b4t-bf16-sharded": TQ + I2S,
    "falcon-e": TQ + I2S + Q2 + IK,
    "falcon-e-prequantized": TQ + I2S + Q2,
    "1bitllm-xl-shape": TQ + I2S,
    "bonsai": Q2,
    "bonsai-g64": Q2,
    "bonsai-uniform": TQ + I2S + Q2 + IK,
}


def case_checkpoint(tmp_path_factory, case: str) -> Path:
    family, kw = CASES[case]
    return shared_checkpoint(tmp_path_factory, family, **kw)


def case_outputs(tmp_path_factory, case: str) -> tuple[Path, dict[str, tuple[Path, str]]]:
    """(checkpoint, type -> (GGUF, what its conversion printed; None for a case of one type, which is
    converted alone)) of every type of CASE_TYPES[case]."""
    model = case_checkpoint(tmp_path_factory, case)
    types = CASE_TYPES[case]
    if len(types) == 1:
        out = shared_conversion(tmp_path_factory, model, "--type", types[0])
        return model, {types[0]: (out, None)}
    return model, shared_outputs(tmp_path_factory, model, types, "--target", "x86")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    logs = {}

    def get(case: str, out_type: str) -> tuple[Path, Path]:
        model, outputs = case_outputs(tmp_path_factory, case)
        out, logs[out] = outputs[out_type]
        return model, out
    get.logs = logs  # the GGUF -> what its conversion printed
    return get


GROUP_SCALED = ("bonsai", "bonsai-g64")  # the scale changes along rows: only Q2_0 holds them
PARAMS = [(c, t) for c in CASES if c not in GROUP_SCALED for t in ("tq2_0", "tq1_0")]


@pytest.mark.parametrize("case,out_type", PARAMS, ids=[f"{c}-{t}" for c, t in PARAMS])
def test_every_tensor_decodes_to_the_checkpoints_effective_weights(converted, case, out_type):
    model, out = converted(case, out_type)
    family = CASES[case][0]
    arch, permuted, has_output = FAMILY_FACTS[family]
    config = json.loads((model / "config.json").read_text())
    weights = effective_weights(model)
    reader = gguf.GGUFReader(out)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    tensors = {t.name: t for t in reader.tensors}
    expected_names = {gguf_name(n) for n in weights if not n.endswith("weight_scale")}
    assert set(tensors) == expected_names
    assert ("output.weight" in tensors) == has_output
    ternary_type = gguf.GGMLQuantizationType[out_type.upper()]
    for hf, w in weights.items():
        if hf.endswith("weight_scale"):
            continue
        name = gguf_name(hf)
        t = tensors[name]
        if permuted and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"] if "attn_q" in name else config["num_key_value_heads"]
            w = llama_permute(w, heads)
        projection = w.ndim == 2 and name not in ("token_embd.weight", "output.weight")
        # rows that are not whole 256-value blocks are F16, as llama.cpp's converter writes them
        whole_blocks = w.ndim == 2 and w.shape[1] % 256 == 0
        assert t.tensor_type == (ternary_type if projection and whole_blocks else
                                 gguf.GGMLQuantizationType.F16 if w.ndim == 2 else gguf.GGMLQuantizationType.F32), name
        np.testing.assert_array_equal(tensor_values(t), expected_tensor(name, w, t.tensor_type, config), err_msg=name)


# -- I2_S (bitnet.cpp) -----------------------------------------------------------------------------

def decode_i2s_reference(raw: bytes, shape: tuple[int, ...]) -> tuple[np.ndarray, np.float32, bytes]:
    """(values, scale, unused tail) of an I2_S tensor, written from FORMATS.md: the whole tensor
    flattened, blocks of 128 values in 32 bytes, byte b of block i holding element 128i + b in
    bits 7:6, 128i + 32 + b in 5:4, 128i + 64 + b in 3:2, 128i + 96 + b in 1:0; 0 -> -1, 1 -> 0,
    2 -> +1; then the float32 scale and 28 unused bytes."""
    n = int(np.prod(shape))
    assert len(raw) == n // 4 + 32
    packed = np.frombuffer(raw[:n // 4], dtype=np.uint8).reshape(-1, 32)
    fields = np.stack([(packed >> s) & 3 for s in (6, 4, 2, 0)], axis=1)  # (blocks, 4, 32)
    assert (fields != 3).all(), "field value 3 is not a code"
    codes = fields.reshape(-1).astype(np.float32) - 1
    scale = np.frombuffer(raw[n // 4:n // 4 + 4], dtype="<f4")[0]
    return (codes * scale).reshape(shape), scale, raw[n // 4 + 4:]


I2S_CASES = ["1bitllm-f16", "llama3", "falcon3-head-dim", "2b4t", "2b4t-bf16-sharded", "falcon-e",
             "falcon-e-prequantized", "1bitllm-xl-shape", "bonsai-uniform"]


@pytest.mark.parametrize("case", I2S_CASES)
def test_i2s_tensors_decode_to_the_effective_weights(converted, case):
    from pipeline.gguf_file import read_gguf

    model, out = converted(case, "i2_s")
    family = CASES[case][0]
    arch, permuted, has_output = FAMILY_FACTS[family]
    config = json.loads((model / "config.json").read_text())
    weights = effective_weights(model)
    contents = read_gguf(out)
    assert contents.kv("general.architecture") == arch
    assert contents.kv("general.file_type") == 40
    assert contents.alignment == 32
    tensors = {t.name: t for t in contents.tensors}
    assert set(tensors) == {gguf_name(n) for n in weights}
    raw_file = out.read_bytes()
    end = 0
    for hf, w in weights.items():
        name = gguf_name(hf)
        t = tensors[name]
        assert t.offset % 32 == 0, f"{name} is not aligned"
        raw = raw_file[t.offset:t.offset + t.nbytes]
        end = max(end, t.offset + t.nbytes)
        assert tuple(t.shape) == w.shape
        if w.ndim == 1:
            assert t.ggml_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.frombuffer(raw, "<f4"), w.astype(np.float32), err_msg=name)
            continue
        if name in ("token_embd.weight", "output.weight"):
            assert t.ggml_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(np.frombuffer(raw, "<f2").reshape(w.shape), w.astype(np.float16))
            continue
        if permuted and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = llama_permute(w, config["num_attention_heads"] if "attn_q" in name else config["num_key_value_heads"])
        if w.shape[1] % 128:  # bitnet.cpp computes such rows wrong: F16 with the same values
            assert t.ggml_type == gguf.GGMLQuantizationType.F16, name
            np.testing.assert_array_equal(np.frombuffer(raw, "<f2").reshape(w.shape), w.astype(np.float16))
            continue
        assert t.ggml_type == 36, name
        values, scale, tail = decode_i2s_reference(raw, w.shape)
        assert scale == np.float32(np.abs(w).max()), name  # the effective magnitude, float32
        np.testing.assert_array_equal(values, w.astype(np.float32), err_msg=name)
        assert tail == bytes(28)
    assert len(raw_file) == -(-end // 32) * 32, "bytes after the last tensor"


Q2_0_CASES = ["1bitllm-f16", "llama3", "2b4t", "falcon-e", "falcon-e-prequantized", "bonsai", "bonsai-g64",
              "bonsai-uniform"]


@pytest.mark.parametrize("case", Q2_0_CASES)
def test_q2_0_tensors_decode_to_the_effective_weights(converted, case):
    """--type q2_0 (upstream llama.cpp's type 42, which the gguf package here cannot read): every
    projection decoded with the transcription of llama.cpp's dequantize_row_q2_0 (tests/test_codecs.py)."""
    from pipeline.gguf_file import read_gguf
    from tests.test_codecs import q2_0_reference_decode

    model, out = converted(case, "q2_0")
    arch, permuted, _ = FAMILY_FACTS[CASES[case][0]]
    config = json.loads((model / "config.json").read_text())
    contents = read_gguf(out)
    assert contents.kv("general.file_type") == 41
    tensors = {t.name: t for t in contents.tensors}
    raw_file = out.read_bytes()
    for hf, w in effective_weights(model).items():
        name = gguf_name(hf)
        t = tensors[name]
        if w.ndim == 1 or name in ("token_embd.weight", "output.weight"):
            continue
        if permuted and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = llama_permute(w, config["num_attention_heads"] if "attn_q" in name else config["num_key_value_heads"])
        assert t.ggml_type == 42, name
        values = q2_0_reference_decode(raw_file[t.offset:t.offset + t.nbytes], *w.shape)
        if case in GROUP_SCALED:  # one fp16 scale per group: Q2_0 holds the values exactly
            assert (w.astype(np.float16) == w).all(), name
            np.testing.assert_array_equal(values, w.astype(np.float32), err_msg=name)
        else:
            np.testing.assert_array_equal(values, expected_tensor(name, w, None, config), err_msg=name)


def test_i2s_rows_not_a_multiple_of_128_fall_back_to_f16_with_a_warning(tmp_path):
    # intermediate 320: gate/up rows have 256 values (I2_S), down_proj rows 320 (not a multiple of 128)
    model = write_checkpoint(tmp_path / "m", "llama3-1.58", hidden_size=256, intermediate_size=320, num_layers=1,
                             num_heads=4, num_kv_heads=2)
    out = tmp_path / "m.gguf"
    proc = convert(model, out, "--type", "i2_s", "--target", "x86")  # ARM's 64-value blocks hold 320
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: blk.0.ffn_down.weight: row length 320 is not a multiple of 128, so it cannot be "
                      "I2_S; writing F16"]
    from pipeline.gguf_file import read_gguf

    types = {t.name: t.ggml_type for t in read_gguf(out).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_up.weight"] == 36


def test_xl_shaped_ffn_down_falls_back_to_f16_with_the_existing_warning(converted):
    """bitnet_b1_58-xl (hidden 2048, FFN 5460; here 256 and 340): every ffn_down row is 340 values,
    not whole TQ blocks, so each layer's ffn_down is F16 with one warning; the rest is TQ2_0
    (test_every_tensor_decodes_to_the_checkpoints_effective_weights decodes that file)."""
    _, out = converted("1bitllm-xl-shape", "tq2_0")
    warned = [line for line in converted.logs[out].splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: blk.{i}.ffn_down.weight: row length 340 is not a multiple of 256, so it cannot be "
                      "TQ2_0; writing F16" for i in range(2)]


def test_i2s_needs_at_least_one_projection_it_can_hold(tmp_path):
    model = write_checkpoint(tmp_path / "m", "1bitllm", hidden_size=320, intermediate_size=320, num_layers=1,
                             num_heads=4)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    proc = convert(model, out, "--type", "i2_s", "--target", "x86", check_exit=2)
    assert proc.stderr.count("\n") == 1 and "--type i2_s" in proc.stderr and "multiple of 128" in proc.stderr
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("case,out_type", [("llama3", "tq2_0"), ("2b4t", "tq2_0"), ("2b4t", "i2_s")])
def test_split_output_holds_the_same_tensors_as_one_file(converted, tmp_path, case, out_type):
    from pipeline.gguf_file import read_gguf

    model, single = converted(case, out_type)
    out = tmp_path / "split.gguf"
    target = ("--target", "x86") if out_type == "i2_s" else ()
    proc = convert(model, out, "--type", out_type, "--split-max-tensors", "7", *target)
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    n = len(parts)
    assert n > 2 and [p.name for p in parts] == [f"split-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]
    assert not out.exists() and f"{parts[0]} (+ {n - 1} more parts)" in proc.stderr
    one = read_gguf(single)
    raw_one = single.read_bytes()
    got = {}
    for k, p in enumerate(parts):
        c = read_gguf(p)
        assert (c.kv("split.no"), c.kv("split.count"), c.kv("split.tensors.count")) == (k, n, len(one.tensors))
        assert len(c.tensors) <= 7
        raw = p.read_bytes()
        for t in c.tensors:
            got[t.name] = raw[t.offset:t.offset + t.nbytes]
        if k == 0:
            keys = {kv.key for kv in c.kvs} - {"split.no", "split.count", "split.tensors.count"}
            assert keys == {kv.key for kv in one.kvs}
        else:
            assert {kv.key for kv in c.kvs} == {"split.no", "split.count", "split.tensors.count"}
    assert list(got) == [t.name for t in one.tensors]
    for t in one.tensors:
        assert got[t.name] == raw_one[t.offset:t.offset + t.nbytes], t.name
    # a rerun is a no-op
    again = convert(model, out, "--type", out_type, "--split-max-tensors", "7", *target)
    assert again.stderr.count("already done") == 4


@pytest.mark.parametrize("case,extra", [("llama3", ("--type", "tq2_0", "--embedding-type", "q8_0")),
                                        ("1bitllm-f16", ("--type", "tq1_0", "--embedding-type", "f32")),
                                        ("2b4t", ("--type", "tq2_0", "--embedding-type", "bf16"))])
def test_our_container_equals_gguf_writers(tmp_path, converted, case, extra):
    """The same key/values and tensors written by gguf.GGUFWriter give the same bytes as our file."""
    model, _ = converted(case, "tq2_0")
    ours = tmp_path / "ours.gguf"
    convert(model, ours, *extra)
    reader = gguf.GGUFReader(ours)
    theirs = tmp_path / "theirs.gguf"
    writer = gguf.GGUFWriter(theirs, bytes(reader.fields["general.architecture"].parts[-1]).decode())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        value = field.contents()
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert theirs.read_bytes() == ours.read_bytes()


def test_tokenizer_pre_option_names_the_pre_tokenizer(tmp_path, converted):
    model, _ = converted("llama3", "tq2_0")
    out = tmp_path / "m.gguf"
    convert(model, out, "--tokenizer-pre", "falcon3")
    pre = gguf.GGUFReader(out).fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == "falcon3"
