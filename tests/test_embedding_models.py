"""microsoft BitNet embedding models (bitnet-embedding-0.6b on Qwen3, bitnet-embedding-270m on Gemma3:
an RMSNorm before every projection, bf16 master weights, last-token pooling).

What microsoft/BitNet's `utils/convert-bitnet-embedding-to-gguf.py` writes is written down here
from reading that file (commit 16da220 of the repository; line numbers below), as an expectation
table independent of our code: tensor names, shapes, types and key/values. That converter does not
run here: its get_vocab_base_pre (lines 94-161) raises for any tokenizer whose hash is not one of the
real ones, and its --outtype i2_s needs BitNet's own gguf-py (GGMLQuantizationType.I2_S) from the fork
that could not be fetched (docs/notes/families.md, section 4). It was run once outside the repository
(--outtype f16, with get_vocab_base_pre answered for the Qwen3 row); what that established is kept as
data, tests/data/embconv-reference.json, which `test_against_its_output` checks our file against.

Effective weights are decoded with the tests' own readers (FORMATS.md's I2_S, gguf.quants for TQ)
and compared with absmean ternarization computed here in numpy from the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.reference_model import load_checkpoint
from tests.synthetic import write_checkpoint
from tests.test_group_scaled import files_under, refused

FAMILIES = {"bitnet-embedding-qwen3": "qwen3", "bitnet-embedding-gemma3": "gemma3"}
# head_dim 128 != hidden / heads = 64, as in the real models (the key/value lengths must say so)
SHAPES = {"bitnet-embedding-qwen3": dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                                         num_kv_heads=2, head_dim=128),
          "bitnet-embedding-gemma3": dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                                          num_kv_heads=1, head_dim=128)}
PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj"}
F16, I2_S = 1, 36  # ggml type ids


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, tmp_path_factory):
    family = request.param
    return write_checkpoint(tmp_path_factory.mktemp("emb") / family, family, **SHAPES[family], seed=3)


def arch_of(model: Path) -> str:
    return FAMILIES[model.name]


@pytest.fixture(scope="module")
def i2s_file(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "emb-i2s.gguf"
    convert(model, out, "--type", "i2_s", "--target", "x86")
    return out


def expected_tensors(config: dict, arch: str) -> dict[str, tuple[tuple[int, ...], int]]:
    """GGUF name -> (numpy shape, ggml type) that the converter writes with --outtype i2_s.

    build_tensor_name_map (lines 36-87): embed_tokens -> token_embd, norm -> output_norm, per layer
    input_layernorm -> attn_norm, q/k/v/o_proj -> attn_q/k/v/output, q_norm/k_norm -> attn_q_norm/
    attn_k_norm, <proj>.norm -> <gguf proj>_norm_in (seven), gate/up/down_proj -> ffn_gate/up/down,
    and for qwen3 post_attention_layernorm -> ffn_norm (lines 78-79), for gemma3 post_attention_layernorm
    -> post_attention_norm, pre_feedforward_layernorm -> ffn_norm, post_feedforward_layernorm ->
    post_ffw_norm (lines 80-85). Types (lines 584-627): a 2-D
    tensor that is not a norm or token_embd -> I2_S (lines 590-598); token_embd -> float16 (601-606);
    every norm, *_norm_in included -> float16 (620-622). No output.weight (lines 632-633)."""
    h, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    out = {"token_embd.weight": ((v, h), F16), "output_norm.weight": ((h,), F16)}
    for i in range(config["num_hidden_layers"]):
        b = f"blk.{i}."
        out |= {b + "attn_norm.weight": ((h,), F16), b + "ffn_norm.weight": ((h,), F16),
                b + "attn_q_norm.weight": ((hd,), F16), b + "attn_k_norm.weight": ((hd,), F16),
                b + "attn_q.weight": ((q, h), I2_S), b + "attn_k.weight": ((kv, h), I2_S),
                b + "attn_v.weight": ((kv, h), I2_S), b + "attn_output.weight": ((h, q), I2_S),
                b + "ffn_gate.weight": ((ff, h), I2_S), b + "ffn_up.weight": ((ff, h), I2_S),
                b + "ffn_down.weight": ((h, ff), I2_S)}
        if arch == "gemma3":
            out |= {b + "post_attention_norm.weight": ((h,), F16), b + "post_ffw_norm.weight": ((h,), F16)}
        for name, inputs in (("attn_q", h), ("attn_k", h), ("attn_v", h), ("attn_output", q), ("ffn_gate", h),
                             ("ffn_up", h), ("ffn_down", ff)):
            out[b + f"{name}_norm_in.weight"] = ((inputs,), F16)
    return out


def gemma_vocab(model: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """_set_vocab_gemma3 (lines 262-327) on tokenizer.json: (tokens, scores, token types)."""
    data = json.loads((model / "tokenizer.json").read_text())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    rank_of = {}
    for rank, merge in enumerate(merges):   # lines 274-282: the merged token's first rank, negated
        rank_of.setdefault("".join(merge) if isinstance(merge, list) else "".join(merge.split(" ", 1)), -float(rank))
    by_id = {i: t for t, i in vocab.items()}
    added = {t["id"]: t for t in data["added_tokens"]}
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:                                            # lines 293-297
            tokens.append(f"[PAD{i}]"), scores.append(-10000.0), types.append(5)   # UNUSED
        elif i in added:                                         # lines 304-310; 164-171 for "looks special"
            special = added[i]["special"] or (t.startswith(("<|", "<", "[")) and t.endswith(("|>", ">", "]")))
            tokens.append(t), scores.append(-1000.0), types.append(3 if special else 4)  # CONTROL / USER_DEFINED
        elif t.startswith("<0x") and t.endswith(">") and len(t) == 6:  # lines 311-314
            tokens.append(t), scores.append(0.0), types.append(6)   # BYTE
        elif t == "<unk>":                                        # lines 315-317
            tokens.append(t), scores.append(0.0), types.append(2)   # UNKNOWN
        else:                                                     # lines 318-321
            tokens.append(t), scores.append(rank_of.get(t, 0.0)), types.append(1)  # NORMAL
    return tokens, scores, types


def expected_kvs(model: Path, config: dict) -> dict[str, object]:
    """The key/values the converter writes that depend on the checkpoint (set_gguf_parameters,
    lines 339-392; _set_vocab_bpe, lines 193-245; _set_vocab_gemma3, lines 248-332)."""
    tokens = json.loads((model / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokens["added_tokens"]}
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    modules = json.loads((model / "modules.json").read_text())
    pool_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
    pool = json.loads((model / pool_dir / "config.json").read_text())
    # lines 381-386: mean, then cls, then last token; gguf.PoolingType MEAN 1, CLS 2, LAST 3
    pooling = 1 if pool.get("pooling_mode_mean_tokens") else 2 if pool.get("pooling_mode_cls_token") else \
        3 if pool.get("pooling_mode_lasttoken") else None
    a = arch_of(model)
    if a == "gemma3":
        vocab, scores, types = gemma_vocab(model, config["vocab_size"])
        tokenizer = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",   # lines 324-325
                     "tokenizer.ggml.tokens": vocab, "tokenizer.ggml.scores": scores,
                     "tokenizer.ggml.token_type": types,
                     "tokenizer.ggml.add_space_prefix": False,                        # line 329
                     # SpecialVocab from tokenizer_config.json (lines 331-332)
                     "tokenizer.ggml.eos_token_id": added[tokenizer_config["eos_token"]],
                     "tokenizer.ggml.bos_token_id": added[tokenizer_config["bos_token"]]}
    else:
        tokenizer = {"tokenizer.ggml.model": "gpt2",                                     # line 228
                     # line 239: eos is 151643, <|endoftext|> in Qwen3's vocabulary; here that token's id
                     "tokenizer.ggml.eos_token_id": added["<|endoftext|>"],
                     "tokenizer.ggml.add_eos_token": True}                              # line 245
    return tokenizer | {
        "general.architecture": a,                                         # SUPPORTED_ARCHS, lines 27-30
        f"{a}.block_count": config["num_hidden_layers"],                   # line 348
        f"{a}.context_length": config.get("max_position_embeddings", 32768),  # line 349
        f"{a}.embedding_length": config["hidden_size"],                    # line 350
        f"{a}.feed_forward_length": config["intermediate_size"],           # line 351
        f"{a}.attention.head_count": config["num_attention_heads"],        # line 352
        f"{a}.attention.head_count_kv": config["num_key_value_heads"],     # line 353
        f"{a}.vocab_size": config["vocab_size"],                           # line 354
        f"{a}.rope.dimension_count": config["head_dim"],                   # lines 356-357
        f"{a}.attention.key_length": config["head_dim"],                   # line 358
        f"{a}.attention.value_length": config["head_dim"],                 # line 359
        f"{a}.rope.freq_base": np.float32(config["rope_theta"]),           # line 362
        f"{a}.attention.layer_norm_rms_epsilon": np.float32(config["rms_norm_eps"]),  # line 364
        "general.file_type": 40,                                           # line 538, LLAMA_FTYPE_MOSTLY_I2_S
        f"{a}.pooling_type": pooling,                                      # line 392
    }


def test_tensor_names_shapes_and_types_are_the_converters(i2s_file, model):
    from pipeline.gguf_file import read_gguf

    config = json.loads((model / "config.json").read_text())
    got = {t.name: (tuple(t.shape), t.ggml_type) for t in read_gguf(i2s_file).tensors}
    assert got == expected_tensors(config, arch_of(model))


def test_key_values_are_the_converters(i2s_file, model):
    """Every key/value the converter decides from the checkpoint has its value; the keys we add
    beyond it are the general.* ones llama.cpp's converter writes and our target key."""
    from pipeline.gguf_file import read_gguf

    config = json.loads((model / "config.json").read_text())
    kvs = {kv.key: kv.value for kv in read_gguf(i2s_file).kvs}
    want = expected_kvs(model, config)
    assert want[f"{arch_of(model)}.pooling_type"] == 3
    for key, value in want.items():
        assert key in kvs, key
        got = np.float32(kvs[key]) if isinstance(value, np.float32) else kvs[key]
        if key == "tokenizer.ggml.scores":
            got, value = np.float32(got).tolist(), np.float32(value).tolist()
        assert got == value, (key, str(kvs[key])[:200], str(value)[:200])
    if arch_of(model) == "qwen3":  # the tokenizer's own eos (tokenizer_config.json: <|im_end|>) is overridden
        assert kvs["tokenizer.ggml.tokens"][kvs["tokenizer.ggml.eos_token_id"]] == "<|endoftext|>"
    else:  # the synthetic vocabulary has every kind of token the converter tells apart
        assert set(kvs["tokenizer.ggml.token_type"]) == {1, 3, 4, 5, 6}, set(kvs["tokenizer.ggml.token_type"])
    # SpecialVocab.add_to_gguf (line 241) writes the tokenizer's other special keys, as ours does
    tokenizer_keys = {k for k in kvs if k.startswith("tokenizer.")}
    assert {"tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"} <= tokenizer_keys
    assert ("tokenizer.ggml.merges" in tokenizer_keys) == (arch_of(model) == "qwen3")  # load_merges, lines 233/331
    ours_only = set(kvs) - set(want) - tokenizer_keys - {"general.name"}
    assert ours_only == {"general.type", "general.size_label", "general.quantization_version",
                         "bitnet_gguf.target"}, ours_only


def absmean_ternary(w: np.ndarray) -> tuple[np.ndarray, float]:
    """BitNet b1.58's weight quantization in float64: codes clip(round(w / mean|w|)), scale mean|w|."""
    absmean = max(float(np.abs(w).mean()), 1e-5)
    return np.clip(np.rint(w / absmean), -1, 1), absmean


def test_i2s_effective_weights_are_absmean_ternarization(i2s_file, model):
    """Decoded with FORMATS.md's I2_S reader: the codes are absmean ternarization of the bf16 master
    weights, and the scale is mean|w| to float32 precision; the converter's own rule (quantize_to_i2_s,
    lines 428-492: float32 np.mean, np.round(w / mean)) gives the same codes and a scale within 2
    float32 ulps (its float32 pairwise sum against our exact one)."""
    from pipeline.gguf_file import read_gguf
    from tests.test_families import decode_i2s_reference

    _, tensors = load_checkpoint(model)
    raw_file = i2s_file.read_bytes()
    for t in read_gguf(i2s_file).tensors:
        if t.ggml_type != I2_S:
            continue
        layer, proj = t.name.split(".")[1], t.name.split(".")[2]
        w = tensors[f"layers.{layer}.{PROJ[proj]}.weight"]
        values, scale, _ = decode_i2s_reference(raw_file[t.offset:t.offset + t.nbytes], tuple(t.shape))
        codes, absmean = absmean_ternary(w)
        np.testing.assert_array_equal(np.sign(values), codes, err_msg=t.name)
        assert abs(float(scale) - absmean) <= absmean * 2.0 ** -23, (t.name, scale, absmean)
        w32 = w.astype(np.float32)
        ms_scale = np.float32(np.mean(np.abs(w32)))
        ms_codes = np.round(w32 * (1.0 / ms_scale)).clip(-1, 1)
        np.testing.assert_array_equal(np.sign(values), ms_codes, err_msg=t.name)
        assert abs(float(scale) - float(ms_scale)) <= 2 * float(np.spacing(ms_scale)), (t.name, scale, ms_scale)


def test_norms_and_embedding_are_the_checkpoints_in_f16(i2s_file, model):
    """lines 601-627: token_embd and every norm as float16 of the bf16 values; Gemma3's own norms
    as float16 of float32(w) + 1, its input norms without (lines 610-618)."""
    from pipeline.gguf_file import read_gguf

    _, tensors = load_checkpoint(model)
    raw_file = i2s_file.read_bytes()
    hf = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    gemma = arch_of(model) == "gemma3"
    own = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    if gemma:
        own |= {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
    for t in read_gguf(i2s_file).tensors:
        if t.ggml_type != F16:
            continue
        if t.name in hf:
            name = hf[t.name]
        else:
            _, layer, short, _ = t.name.split(".")
            name = own.get(short) or PROJ[short.removesuffix("_norm_in")] + ".norm"
            name = f"layers.{layer}.{name}.weight"
        got = np.frombuffer(raw_file[t.offset:t.offset + t.nbytes], "<f2").reshape(t.shape)
        want = tensors[name].astype(np.float32)
        if gemma and t.name != "token_embd.weight" and not t.name.endswith("_norm_in.weight"):
            want = want + np.float32(1.0)
        np.testing.assert_array_equal(got, want.astype(np.float16), err_msg=t.name)


@pytest.mark.parametrize("out_type", ["tq2_0", "tq1_0", "i2_s-arm"])
def test_other_ternary_types_decode_to_the_same_weights(model, tmp_path, out_type):
    import gguf

    from pipeline.gguf_file import read_gguf
    from tests.bitnet_layouts import decode_i2s_arm

    out = tmp_path / "o.gguf"
    args = ("--type", "i2_s", "--target", "arm") if out_type == "i2_s-arm" else ("--type", out_type)
    convert(model, out, *args)
    _, tensors = load_checkpoint(model)
    raw_file = out.read_bytes()
    for t in read_gguf(out).tensors:
        if len(t.shape) != 2 or t.name == "token_embd.weight":
            continue
        raw = raw_file[t.offset:t.offset + t.nbytes]
        if out_type == "i2_s-arm":
            codes, scale = decode_i2s_arm(raw, tuple(t.shape))
            values = codes.astype(np.float64) * scale
        else:
            values = gguf.quants.dequantize(np.frombuffer(raw, np.uint8).reshape(t.shape[0], -1),
                                            gguf.GGMLQuantizationType[out_type.upper()])
        layer, proj = t.name.split(".")[1], t.name.split(".")[2]
        codes, absmean = absmean_ternary(tensors[f"layers.{layer}.{PROJ[proj]}.weight"])
        np.testing.assert_array_equal(np.sign(values), codes, err_msg=t.name)
        np.testing.assert_allclose(np.abs(values[codes != 0]), absmean, rtol=2.0 ** -10, err_msg=t.name)
    run_cli("verify", out, model)


def test_verify_accepts_the_file(i2s_file, model):
    assert "OK" in run_cli("verify", i2s_file, model).stdout


# What microsoft's converter's own output for the test checkpoints held, as far as the comparison of
# 2026-12-03 established it (docs/notes/families.md, section 4): its file was made outside the
# repository and is not kept; its key/values and tensor digests are (docs/testing.md says how).
EMBCONV_REFERENCE = Path(__file__).parent / "data" / "embconv-reference.json"
OURS_ONLY = {"general.type", "general.size_label", "general.quantization_version", "bitnet_gguf.target"}


def file_digests(model: Path) -> dict[str, str]:
    return {str(p.relative_to(model)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(model.rglob("*")) if p.is_file()}


def value_record(value) -> dict:
    """A key's value as embconv-reference.json holds it: arrays by length and the sha256 of their compact JSON."""
    if isinstance(value, list):
        return {"len": len(value), "sha256": hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()}
    return {"value": value}


def test_against_its_output(i2s_file, model):
    """The converter's own file (--outtype f16) for the same checkpoint: the same tensor names and
    shapes, the same bytes for every tensor both write as F16 (norms, Gemma3's w + 1 included, and
    token_embd), the same key/values but general.name (it writes the directory's name as it is),
    general.file_type (its file is F16, ours I2_S), Qwen3's EOS id (it writes Qwen3's 151643 whatever
    the vocabulary) and the four we add. Its --outtype i2_s needs BitNet's gguf-py fork
    (GGMLQuantizationType.I2_S), which could not be fetched, so its projections are F16 of the master
    weights there: compared by name and shape only."""
    from pipeline.gguf_file import read_gguf

    theirs = json.loads(EMBCONV_REFERENCE.read_text())[model.name]
    assert file_digests(model) == theirs["checkpoint"], (
        "the test checkpoint is no longer the one microsoft's converter was run on (tests/synthetic.py "
        "changed?): its recorded output does not apply; rerun that converter as docs/notes/families.md says")
    ours = read_gguf(i2s_file)
    raw = i2s_file.read_bytes()
    mine = {t.name: t for t in ours.tensors}
    assert {n: list(t.shape) for n, t in mine.items()} == {n: t["shape"] for n, t in theirs["tensors"].items()}
    compared = 0
    for name, t in theirs["tensors"].items():
        m = mine[name]
        assert t["type"] == F16, name
        if m.ggml_type == F16:
            assert hashlib.sha256(raw[m.offset:m.offset + m.nbytes]).hexdigest() == t["sha256"], name
            compared += 1
        else:
            assert t["sha256"] is None, name
            assert m.ggml_type == I2_S and len(m.shape) == 2 and name != "token_embd.weight", name
    assert compared > 10
    kvs, their_kvs = {kv.key: kv for kv in ours.kvs}, theirs["kvs"]
    assert set(kvs) - set(their_kvs) == OURS_ONLY
    assert set(their_kvs) <= set(kvs)
    for key, kv in their_kvs.items():
        if key == "tokenizer.ggml.eos_token_id" and arch_of(model) == "qwen3":
            # it writes 151643, <|endoftext|>'s id in Qwen3's vocabulary (lines 235-239), whatever the
            # vocabulary; we write that token's id in this one (151643 on the real model)
            tokens = kvs["tokenizer.ggml.tokens"].value
            assert kv["value"] == 151643 and kvs[key].value == tokens.index("<|endoftext|>"), key
        elif key not in ("general.name", "general.file_type"):
            assert {"type": int(kvs[key].type), **value_record(kvs[key].value)} == kv, key
    assert their_kvs["general.file_type"]["value"] == 1 and kvs["general.file_type"].value == 40


# -- bad input: one line, exit 2, nothing written -------------------------------------------------

@pytest.fixture(params=list(FAMILIES))
def fresh(tmp_path, request):
    family = request.param
    model = write_checkpoint(tmp_path / family, family, **(SHAPES[family] | dict(num_layers=1)), seed=4)
    out = tmp_path / "out"
    out.mkdir()
    return model, out / "m.gguf"


def rewrite_tensor(model: Path, name: str, new: np.ndarray | None) -> None:
    """Drop tensor `name` from model.safetensors (new None) or replace it with `new` (raw bf16 bits)."""
    path = model / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    blobs = {}
    for key, info in header.items():
        begin, end = (8 + n + o for o in info["data_offsets"])
        blobs[key] = (info, raw[begin:end])
    if new is None:
        del blobs[name]
    else:
        blobs[name] = ({"dtype": "BF16", "shape": list(new.shape)}, new.astype("<u2").tobytes())
    out_header, data, offset = ({"__metadata__": meta} if meta else {}), b"", 0
    for key in sorted(blobs):
        info, blob = blobs[key]
        out_header[key] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + len(blob)]}
        data += blob
        offset += len(blob)
    text = json.dumps(out_header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_a_missing_projection_norm_is_refused(fresh):
    model, out = fresh
    rewrite_tensor(model, "layers.0.mlp.up_proj.norm.weight", None)
    refused(model, out, "tensor layers.0.mlp.up_proj.norm.weight is missing", "blk.0.ffn_up_norm_in.weight")


def test_a_projection_norm_of_the_wrong_shape_is_refused(fresh):
    model, out = fresh
    rewrite_tensor(model, "layers.0.self_attn.o_proj.norm.weight", np.full(256, 0x3F80, np.uint16))
    refused(model, out, "layers.0.self_attn.o_proj.norm.weight has shape [256]", "implies [512]")


@pytest.mark.parametrize("remove,needle", [("modules.json", "modules.json: missing"),
                                           ("1_Pooling/config.json", "1_Pooling/config.json: missing")])
def test_a_missing_pooling_config_is_refused(fresh, remove, needle):
    model, out = fresh
    (model / remove).unlink()
    refused(model, out, needle, "Pooling")


def test_a_pooling_config_without_a_mode_is_refused(fresh):
    model, out = fresh
    path = model / "1_Pooling" / "config.json"
    path.write_text(json.dumps({k: False for k in json.loads(path.read_text()) if k.startswith("pooling_mode")}))
    refused(model, out, "none of pooling_mode_mean_tokens, pooling_mode_cls_token, pooling_mode_lasttoken")


def test_a_vocabulary_without_endoftext_is_refused(fresh):
    model, out = fresh
    if arch_of(model) != "qwen3":
        pytest.skip("only the Qwen3 row overrides EOS")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = model / name
        path.write_text(path.read_text().replace("<|endoftext|>", "<|notthere|>"))
    refused(model, out, "has no token <|endoftext|>")


def test_gemma_norms_of_an_f16_checkpoint_get_their_offset(tmp_path):
    """An F16 norm written F16 is otherwise the checkpoint's bytes, copied as they are: with Gemma3's
    + 1 it must be rewritten (and verify must expect that)."""
    from pipeline.gguf_file import read_gguf

    family = "bitnet-embedding-gemma3"
    model = write_checkpoint(tmp_path / family, family, **(SHAPES[family] | dict(num_layers=1)), dtype="f16")
    out = tmp_path / "o.gguf"
    convert(model, out, "--type", "tq2_0")
    _, tensors = load_checkpoint(model)
    raw = out.read_bytes()
    for t in read_gguf(out).tensors:
        if t.name in ("blk.0.attn_norm.weight", "blk.0.post_ffw_norm.weight", "blk.0.ffn_up_norm_in.weight"):
            hf = {"blk.0.attn_norm.weight": "layers.0.input_layernorm.weight",
                  "blk.0.post_ffw_norm.weight": "layers.0.post_feedforward_layernorm.weight",
                  "blk.0.ffn_up_norm_in.weight": "layers.0.mlp.up_proj.norm.weight"}[t.name]
            offset = np.float32(0.0 if t.name.endswith("_norm_in.weight") else 1.0)
            got = np.frombuffer(raw[t.offset:t.offset + t.nbytes], "<f2")
            np.testing.assert_array_equal(got, (tensors[hf].astype(np.float32) + offset).astype(np.float16), t.name)
    run_cli("verify", out, model)
