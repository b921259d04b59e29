"""The synthetic checkpoints (tests/synthetic.py) are well-formed: a safetensors reader,
the tokenizer libraries and the converter's own checkpoint loader accept them, config.json
agrees with the tensors, and packed families follow FORMATS.md section 2 (quarter layout,
field values 0-2, one weight_scale per projection). Also the reference's reading of packed
weights (tests/reference_model.py), on hand-made bytes."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from tests import synthetic
from tests.conftest import absmean_reference
from tests.reference_model import effective_weights, unpack_ternary
from tests.synthetic import DEMO_DEFAULTS, FAMILIES, write_bitnet_checkpoint, write_checkpoint

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)
ST_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
NP_DTYPE = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "U8": "u1"}


def expected_tensors(hidden, intermediate, layers, heads, kv_heads, vocab) -> dict[str, tuple[int, ...]]:
    kv_dim = kv_heads * (hidden // heads)
    out = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "self_attn.inner_attn_ln.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "mlp.ffn_layernorm.weight": (intermediate,),
        }
    return out


def parse_safetensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (dtype, shape, stored array), checking the file layout on the way."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0, "header must be padded to a multiple of 8"
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    assert header.pop("__metadata__") == {"format": "pt"}
    data = raw[8 + n:]
    out, ranges = {}, []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        dt = np.dtype(NP_DTYPE[info["dtype"]])
        assert end - begin == int(np.prod(shape)) * dt.itemsize, name
        ranges.append((begin, end))
        out[name] = (info["dtype"], shape, np.frombuffer(data[begin:end], dt).reshape(shape))
    ranges.sort()
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data), "data region must be exactly the tensors"
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), "tensors must not overlap or leave gaps"
    return out


def read_checkpoint(model_dir: Path) -> tuple[dict, dict[str, str]]:
    """All tensors plus the file each one lives in."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors, where = {}, {}
    for fname in files:
        for name, entry in parse_safetensors(model_dir / fname).items():
            assert name not in tensors, f"{name} stored twice"
            tensors[name], where[name] = entry, fname
    return tensors, where


def as_float32(dtype: str, stored: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def nearest_even_bf16(x: np.ndarray) -> np.ndarray:
    """Reference bf16 rounding, by comparing the two neighbouring bf16 values."""
    bits = x.astype(np.float32).view(np.uint32)
    lo = bits & np.uint32(0xFFFF0000)
    hi = lo + np.uint32(0x10000)
    x64 = x.astype(np.float64)
    d_lo = np.abs(x64 - lo.view(np.float32).astype(np.float64))
    d_hi = np.abs(hi.view(np.float32).astype(np.float64) - x64)
    lo_is_even = ((lo >> 16) & 1) == 0
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ~lo_is_even)
    return np.where(pick_hi, hi, lo).view(np.float32)


@pytest.fixture(scope="module")
def f32_reference(tmp_path_factory):
    """The same checkpoint in float32: the values the f16 and bf16 files must round."""
    d = write_bitnet_checkpoint(tmp_path_factory.mktemp("ref") / "model", **SHAPE, dtype="f32")
    tensors, _ = read_checkpoint(d)
    return {name: stored for name, (_, _, stored) in tensors.items()}


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_checkpoint_is_well_formed(tmp_path, dtype, shards, f32_reference):
    d = write_bitnet_checkpoint(tmp_path / "model", **SHAPE, dtype=dtype, shards=shards)
    assert d == tmp_path / "model"
    config = json.loads((d / "config.json").read_text())
    tensors, where = read_checkpoint(d)

    # files: one model.safetensors, or N shards and an index that agrees with them
    st_files = sorted(p.name for p in d.glob("*.safetensors"))
    if shards == 1:
        assert st_files == ["model.safetensors"]
        assert not (d / "model.safetensors.index.json").exists()
    else:
        assert st_files == [f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)]
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == where
        assert set(where.values()) == set(st_files), "every shard holds something"
        assert index["metadata"]["total_size"] == sum(t[2].nbytes for t in tensors.values())

    # names, shapes and dtypes follow config.json
    vocab = config["vocab_size"]
    want = expected_tensors(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                            config["num_attention_heads"], config["num_key_value_heads"], vocab)
    assert {name: t[1] for name, t in tensors.items()} == want
    assert {t[0] for t in tensors.values()} == {ST_DTYPE[dtype]}
    assert "lm_head.weight" not in tensors

    # a standard reader sees the same values (numpy cannot hold bf16, so not for bf16)
    if dtype != "bf16":
        for fname in st_files:
            with safe_open(str(d / fname), framework="np") as f:
                for name in f.keys():
                    np.testing.assert_array_equal(f.get_tensor(name), tensors[name][2])

    # values: the f32 checkpoint rounded to this dtype
    for name, (st_dtype, _, stored) in tensors.items():
        ref = f32_reference[name]
        got = as_float32(st_dtype, stored)
        if dtype == "f32":
            np.testing.assert_array_equal(got, ref)
        elif dtype == "f16":
            np.testing.assert_array_equal(got, ref.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_allclose(got, ref, rtol=2.0**-8, atol=0)
            np.testing.assert_array_equal(got, nearest_even_bf16(ref))


def test_config_and_values_look_like_a_bitnet_model(tmp_path):
    d = write_bitnet_checkpoint(tmp_path / "m", **SHAPE, dtype="bf16", seed=3, rope_theta=500000.0,
                                rms_norm_eps=1e-6, max_position_embeddings=4096)
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["BitnetForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["torch_dtype"] == "bfloat16"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"]) == (256, 512, 2, 4, 2)
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (500000.0, 1e-6, 4096)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert (config["weight_bits"], config["input_bits"], config["hidden_act"]) == (1, 8, "silu")

    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert sp.vocab_size() == 320
    # more embedding rows than pieces, as in the real model (32000 pieces, 32002 rows)
    assert config["vocab_size"] > sp.vocab_size() and config["vocab_size"] % 64 == 0

    tensors, _ = read_checkpoint(d)
    values = {name: as_float32(*t[::2]).astype(np.float64) for name, t in tensors.items()}
    projections = [n for n in values if n.endswith("_proj.weight")]
    norms = [n for n in values if n.endswith("norm.weight") or n.endswith("_ln.weight")]
    assert len(projections) == 14 and len(norms) == 9
    for name in norms:
        assert abs(values[name].mean() - 1.0) < 0.05 and 0.03 < values[name].std() < 0.2, name
    scales = [np.abs(values[n]).mean() for n in projections]
    assert all(0.01 < s < 0.06 for s in scales)
    assert len({round(s, 5) for s in scales}) == len(scales), "every projection has its own absmean scale"
    assert 0.9 < values["model.embed_tokens.weight"].std() < 1.1


def test_tokenizer_files(tmp_path):
    d = write_bitnet_checkpoint(tmp_path / "m", **SHAPE)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256
    text = "The old farmer visits the bridge in 1984."
    ids = sp.encode(text)
    assert 0 not in ids, "byte fallback: nothing is unknown"
    assert any(sp.is_byte(i) for i in ids), "digits are not in the corpus, so they become bytes"
    assert any(len(sp.id_to_piece(i)) > 2 for i in ids), "some merges were learned"
    assert sp.decode(ids) == text

    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is True and tok_config["add_eos_token"] is False
    assert tok_config["tokenizer_class"] == "LlamaTokenizer"
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["unk_token"]) == ("<s>", "</s>", "<unk>")
    special = json.loads((d / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def test_same_seed_same_bytes_other_seed_other_values(tmp_path):
    a = write_bitnet_checkpoint(tmp_path / "a", **SHAPE, dtype="f16", shards=2)
    b = write_bitnet_checkpoint(tmp_path / "b", **SHAPE, dtype="f16", shards=2)
    c = write_bitnet_checkpoint(tmp_path / "c", **SHAPE, dtype="f16", shards=2, seed=1)
    for p in sorted(a.iterdir()):
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    ta, _ = read_checkpoint(a)
    tc, _ = read_checkpoint(c)
    assert not np.array_equal(ta["model.layers.0.mlp.up_proj.weight"][2], tc["model.layers.0.mlp.up_proj.weight"][2])


def test_small_chunks_write_the_same_file(tmp_path, monkeypatch):
    whole = write_bitnet_checkpoint(tmp_path / "whole", **SHAPE, vocab_size=1000)
    monkeypatch.setattr(synthetic, "CHUNK_ELEMS", 3 * 256 + 5)  # 3 rows of the embedding per block
    chunked = write_bitnet_checkpoint(tmp_path / "chunked", **SHAPE, vocab_size=1000)
    tensors, _ = read_checkpoint(chunked)
    assert tensors["model.embed_tokens.weight"][1] == (1000, 256)
    # values are a stream per tensor, so the block size does not change them
    assert (whole / "model.safetensors").read_bytes() == (chunked / "model.safetensors").read_bytes()


def test_rewriting_a_directory_replaces_the_old_layout(tmp_path):
    d = write_bitnet_checkpoint(tmp_path / "m", **SHAPE, shards=3)
    write_bitnet_checkpoint(d, **SHAPE, shards=1)
    assert sorted(p.name for p in d.glob("*.safetensors*")) == ["model.safetensors"]
    assert not list(d.glob("*.partial"))


def test_bf16_rounding_ties_go_to_even():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF818000, 0x7F7FFFFF], dtype=np.uint32)
    assert synthetic.bf16_bits(bits.view(np.float32)).tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0xBF82, 0x7F80]


def test_the_converter_accepts_the_demo_checkpoint(tmp_path):
    from pipeline.checkpoint import open_checkpoint

    assert DEMO_DEFAULTS["hidden_size"] % 256 == 0 and DEMO_DEFAULTS["intermediate_size"] % 256 == 0
    d = write_bitnet_checkpoint(tmp_path / "demo", **DEMO_DEFAULTS)
    ckpt = open_checkpoint(d)
    assert ckpt.plan.arch == "bitnet"
    assert len(ckpt.sources) == 2 + 11 * DEMO_DEFAULTS["num_layers"]
    kv = {r["key"]: r["value"] for r in ckpt.kv}
    assert len(kv["tokenizer.ggml.tokens"]) == json.loads((d / "config.json").read_text())["vocab_size"]
    assert kv["tokenizer.ggml.tokens"][-1].startswith("[PAD")


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli-model"
    assert synthetic.main([str(out), "--dtype", "bf16", "--shards", "2", "--layers", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert (out / "model.safetensors.index.json").exists()

    assert synthetic.main([str(tmp_path / "bad"), "--heads", "3"]) == 2
    assert "heads" in capsys.readouterr().err


# -- every family ---------------------------------------------------------------------------------

ATTN_SUB, FFN_SUB = "self_attn.attn_sub_norm", "mlp.ffn_sub_norm"
# family -> what FORMATS.md section 2 and packed-families.md section 0 say its checkpoints hold
FAMILY_FACTS = {
    "llama3-1.58": dict(arch="LlamaForCausalLM", model_type="llama", packed=True, sub_norms=False, lm_head=True,
                        quantization_config={"quant_method": "bitnet", "modules_to_not_convert": None},
                        eos_token="<|eot_id|>"),
    "falcon3-1.58": dict(arch="LlamaForCausalLM", model_type="llama", packed=True, sub_norms=False, lm_head=True,
                         quantization_config={"quant_method": "bitnet", "modules_to_not_convert": ["lm_head"]},
                         eos_token="<|begin_of_text|>"),
    "2b4t": dict(arch="BitNetForCausalLM", model_type="bitnet", packed=True, sub_norms=True, lm_head=False,
                 quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear",
                                      "quantization_mode": "offline"},
                 eos_token="<|end_of_text|>"),
    "2b4t-bf16": dict(arch="BitNetForCausalLM", model_type="bitnet", packed=False, sub_norms=True, lm_head=False,
                      quantization_config=None, eos_token="<|end_of_text|>"),
    # onebitllms' quantize_to_1bit: weight_scale = 1 / absmean (tiiuae/onebitllms quantization_utils.py)
    "falcon-e": dict(arch="LlamaForCausalLM", model_type="llama", packed=True, sub_norms=False, lm_head=True,
                     quantization_config={"quant_method": "bitnet", "modules_to_not_convert": ["lm_head"]},
                     eos_token="<|end_of_text|>", weight_scale=(16.0, 64.0)),
    "falcon-e-prequantized": dict(arch="LlamaForCausalLM", model_type="llama", packed=False, sub_norms=False,
                                  lm_head=True, quantization_config=None, eos_token="<|end_of_text|>"),
}
HEAD_DIM_KEY = ("falcon3-1.58", "falcon-e", "falcon-e-prequantized")
PACKED_SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)
FAMILY_SHAPE = {family: PACKED_SHAPE | (dict(head_dim=96) if family in HEAD_DIM_KEY else {})
                for family in FAMILY_FACTS}


def test_the_registry_has_every_family():
    assert set(FAMILIES) == {"1bitllm", "bonsai", "minicpm", "bitnet-embedding-qwen3", "bitnet-embedding-gemma3",
                             *FAMILY_FACTS}


@pytest.mark.parametrize("group_size", [128, 64, 0])
def test_bonsai_checkpoint_is_group_scaled_ternary(tmp_path, group_size):
    """Qwen3ForCausalLM with q/k norms; fp16 projections whose every run of `group_size` values of a
    row is {-s, 0, +s} for one fp16 s, the scales differing between groups (0: one s per tensor)."""
    d = write_checkpoint(tmp_path / "m", "bonsai", **PACKED_SHAPE, head_dim=64, group_size=group_size, seed=3)
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["head_dim"] == 64 and config["torch_dtype"] == "float16" and "quantization_config" not in config
    tensors, _ = read_checkpoint(d)
    assert tensors["model.layers.1.self_attn.q_norm.weight"][:2] == ("F16", (64,))
    assert tensors["model.layers.0.self_attn.k_norm.weight"][:2] == ("F16", (64,))
    assert tensors["model.layers.0.self_attn.q_proj.weight"][:2] == ("F16", (256, 256))
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        dtype, shape, stored = tensors[name]
        w = np.abs(as_float32(dtype, stored).reshape(shape))
        groups = w.reshape(shape[0], -1, group_size) if group_size else w.reshape(1, 1, -1)
        mags = [set(g[g > 0].tolist()) for row in groups for g in row]
        assert all(len(m) == 1 for m in mags), name
        distinct = {m.pop() for m in mags}
        assert (len(distinct) > len(mags) // 2) if group_size else len(distinct) == 1, name


def expected_family_tensors(config: dict, facts: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape), from config.json and the family's facts."""
    hidden, ff, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv, vocab = config["num_key_value_heads"], config["vocab_size"]
    head_dim = config.get("head_dim", hidden // heads)
    proj = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
            "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
            "mlp.gate_proj": (ff, hidden), "mlp.up_proj": (ff, hidden), "mlp.down_proj": (hidden, ff)}
    out = {"model.embed_tokens.weight": ("BF16", (vocab, hidden)), "model.norm.weight": ("BF16", (hidden,))}
    if facts["lm_head"]:
        out["lm_head.weight"] = ("BF16", (vocab, hidden))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = ("BF16", (hidden,))
        out[p + "post_attention_layernorm.weight"] = ("BF16", (hidden,))
        if facts["sub_norms"]:
            out[p + ATTN_SUB + ".weight"] = ("BF16", (heads * head_dim,))
            out[p + FFN_SUB + ".weight"] = ("BF16", (ff,))
        for name, (rows, cols) in proj.items():
            if facts["packed"]:
                out[p + name + ".weight"] = ("U8", (rows // 4, cols))
                out[p + name + ".weight_scale"] = ("BF16", (1,))
            else:
                out[p + name + ".weight"] = ("BF16", (rows, cols))
    return out


def fields_of(packed: np.ndarray) -> np.ndarray:
    """The four 2-bit fields of every byte, (4, *packed.shape)."""
    return np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)])


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("family", list(FAMILY_FACTS))
def test_family_checkpoint_is_well_formed(tmp_path, family, shards):
    facts = FAMILY_FACTS[family]
    d = write_checkpoint(tmp_path / "m", family, **FAMILY_SHAPE[family], shards=shards, seed=5)
    config = json.loads((d / "config.json").read_text())
    tensors, where = read_checkpoint(d)

    st_files = sorted(p.name for p in d.glob("*.safetensors"))
    if shards == 1:
        assert st_files == ["model.safetensors"] and not (d / "model.safetensors.index.json").exists()
    else:
        assert st_files == [f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)]
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == where and set(where.values()) == set(st_files)
        assert index["metadata"]["total_size"] == sum(t[2].nbytes for t in tensors.values())

    # config.json: the family's identity
    assert config["architectures"] == [facts["arch"]] and config["model_type"] == facts["model_type"]
    assert config.get("quantization_config") == facts["quantization_config"]
    assert config["tie_word_embeddings"] is (not facts["lm_head"])
    assert config["torch_dtype"] == "bfloat16"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"]) == (256, 512, 2, 4, 2)
    if family in HEAD_DIM_KEY:
        assert config["head_dim"] == 96 != config["hidden_size"] // config["num_attention_heads"]
        assert type(config["rope_theta"]) is int and config["rms_norm_eps"] == 1e-6
        assert (config["eos_token_id"] == config["bos_token_id"]) is (family == "falcon3-1.58")
        assert config["is_bitnet_config"] is True
    else:
        assert "head_dim" not in config
        assert config["rope_theta"] == 500000.0 and type(config["rope_theta"]) is float
    if family == "llama3-1.58":
        assert config["rope_scaling"] is None
    if facts["arch"] == "BitNetForCausalLM":
        assert config["hidden_act"] == "relu2"

    # tensors: names, dtypes and shapes follow config.json
    assert {name: t[:2] for name, t in tensors.items()} == expected_family_tensors(config, facts)

    # packed bytes: fields 0, 1, 2 only, all of them used; weight_scale a bf16 in about [2, 8]
    # (falcon-e: 1 / absmean, tens)
    low, high = facts.get("weight_scale", (2.0, 8.0))
    scales = []
    for name, (dtype, _, stored) in tensors.items():
        if dtype == "U8":
            counts = np.bincount(fields_of(stored).ravel(), minlength=4)
            assert counts[3] == 0, f"{name} holds field value 3"
            assert (counts[:3] > 0.2 * stored.size).all(), name
            (scale,) = as_float32(*tensors[name + "_scale"][::2])
            assert low * 0.99 <= scale <= high * 1.01, name
            scales.append(scale)
    assert len(scales) == (14 if facts["packed"] else 0)
    assert len(set(scales)) >= len(scales) // 2, "every projection draws its own scale (bf16 values may repeat)"

    # tokenizer: a byte-level BPE tokenizer.json whose specials config.json names
    assert not (d / "tokenizer.model").exists()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == facts["eos_token"]
    assert config["bos_token_id"] == tok.token_to_id(tok_config["bos_token"]) is not None
    assert config["eos_token_id"] == tok.token_to_id(tok_config["eos_token"]) is not None
    assert config["vocab_size"] > tok.get_vocab_size(with_added_tokens=True)
    text = "the old farmer visits the bridge in 1984."
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("family", ["llama3-1.58", "2b4t"])
def test_packed_families_same_arguments_same_bytes(tmp_path, family):
    a = write_checkpoint(tmp_path / "a", family, **PACKED_SHAPE, shards=2)
    b = write_checkpoint(tmp_path / "b", family, **PACKED_SHAPE, shards=2)
    c = write_checkpoint(tmp_path / "c", family, **PACKED_SHAPE, shards=2, seed=1)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in sorted(a.iterdir()):
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    ta, _ = read_checkpoint(a)
    tc, _ = read_checkpoint(c)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not np.array_equal(ta[name][2], tc[name][2])
    assert not np.array_equal(ta[name + "_scale"][2], tc[name + "_scale"][2])


def test_packed_writer_gives_the_same_bytes_in_tiny_chunks(tmp_path, monkeypatch):
    kw = dict(PACKED_SHAPE, vocab_size=700)
    whole = write_checkpoint(tmp_path / "whole", "2b4t", **kw)
    # 1 packed row (4 * 256 values) or 2 embedding rows per block; down_proj (4 * 512 per row) 1 row
    monkeypatch.setattr(synthetic, "CHUNK_ELEMS", 2 * 256 + 3)
    chunked = write_checkpoint(tmp_path / "chunked", "2b4t", **kw)
    assert (whole / "model.safetensors").read_bytes() == (chunked / "model.safetensors").read_bytes()


def test_packed_chunks_are_row_blocks(monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_ELEMS", 3 * 4 * 16)
    blocks = list(synthetic.packed_chunks("w", (7, 16), seed=0))
    assert [b.shape for b in blocks] == [(3, 16), (3, 16), (1, 16)] and all(b.dtype == np.uint8 for b in blocks)


def test_8b_shaped_tensors_are_written_without_holding_them(tmp_path):
    """The bench's Llama3-8B-shaped checkpoint: every block stays within CHUNK_ELEMS values."""
    sizes = [b.size for b in synthetic.packed_chunks("w", (14336 // 4, 4096), seed=0)]
    assert sum(sizes) == 14336 // 4 * 4096 and max(sizes) * 4 <= synthetic.CHUNK_ELEMS


@pytest.mark.parametrize("bad, message", [
    (dict(family="nope"), "family"),
    (dict(family="llama3-1.58", head_dim=96), "head_dim"),
    (dict(family="falcon3-1.58", head_dim=33), "head_dim"),
    (dict(family="2b4t", intermediate_size=514), "multiple of 4"),
    (dict(family="2b4t", added_tokens=True), "added_tokens"),
    (dict(family="llama3-1.58", dtype="f8"), "dtype"),
    (dict(family="llama3-1.58", vocab_size=100), "vocab_size"),
])
def test_bad_options_are_option_errors(tmp_path, bad, message):
    from pipeline.errors import OptionError

    kw = dict(PACKED_SHAPE) | bad
    family = kw.pop("family")
    with pytest.raises(OptionError, match=message):
        write_checkpoint(tmp_path / "m", family, **kw)


def test_cli_family(tmp_path, capsys):
    out = tmp_path / "falcon"
    assert synthetic.main([str(out), "--family", "falcon3-1.58", "--head-dim", "128", "--kv-heads", "2",
                           "--layers", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["head_dim"] == 128 and config["rope_theta"] == 1000042 and config["num_hidden_layers"] == 1
    tensors, _ = read_checkpoint(out)
    assert tensors["model.layers.0.self_attn.q_proj.weight"][:2] == ("U8", (4 * 128 // 4, 256))


def test_a_family_can_replace_another_in_the_same_directory(tmp_path):
    d = write_bitnet_checkpoint(tmp_path / "m", **SHAPE, shards=3)
    write_checkpoint(d, "2b4t", **PACKED_SHAPE)
    assert not (d / "tokenizer.model").exists() and not (d / "special_tokens_map.json").exists()
    assert sorted(p.name for p in d.glob("*.safetensors*")) == ["model.safetensors"]
    write_bitnet_checkpoint(d, **SHAPE)
    assert not (d / "tokenizer.json").exists() and (d / "tokenizer.model").exists()


# -- the reference's reading of packed weights -----------------------------------------------------

# An (8, 4) ternary weight and its packing by hand: packed row r holds rows r, r+2, r+4, r+6
# (n = 8/4 = 2) in bits 1-0, 3-2, 5-4, 7-6, each as code + 1.
HAND_WEIGHT = np.array([
    [1, 0, -1, 0],     # row 0: packed row 0, bits 1-0
    [0, 1, 1, -1],     # row 1: packed row 1, bits 1-0
    [-1, -1, 0, 1],    # row 2: packed row 0, bits 3-2
    [1, 1, 1, 1],      # row 3: packed row 1, bits 3-2
    [0, 0, 0, 0],      # row 4: packed row 0, bits 5-4
    [-1, 0, 1, -1],    # row 5: packed row 1, bits 5-4
    [1, -1, 0, 0],     # row 6: packed row 0, bits 7-6
    [0, 0, -1, 1],     # row 7: packed row 1, bits 7-6
])
HAND_PACKED = np.array([
    # fields (bits 7-6, 5-4, 3-2, 1-0) of column 0..3
    [0b10_01_00_10, 0b00_01_00_01, 0b01_01_01_00, 0b01_01_10_01],   # rows 6, 4, 2, 0
    [0b01_00_10_01, 0b01_01_10_10, 0b00_10_10_10, 0b10_00_10_00],   # rows 7, 5, 3, 1
], dtype=np.uint8)


def test_unpack_a_hand_packed_weight():
    assert HAND_PACKED.tolist() == [[146, 17, 84, 89], [73, 90, 42, 136]]
    got = unpack_ternary(HAND_PACKED)
    assert got.shape == (8, 4)
    np.testing.assert_array_equal(got, HAND_WEIGHT)


def test_unpack_refuses_field_value_3():
    with pytest.raises(ValueError, match="3"):
        unpack_ternary(np.array([[0b11_01_01_01]], dtype=np.uint8))


def hand_checkpoint(path: Path, quantization_config: dict, scale: float) -> Path:
    path.mkdir(parents=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    save_file({name: HAND_PACKED, name + "_scale": np.array([scale], np.float32),
               "model.norm.weight": np.ones(4, np.float32)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                  "quantization_config": quantization_config}))
    return path


@pytest.mark.parametrize("quantization_config, expected", [
    ({"quant_method": "bitnet", "modules_to_not_convert": None}, HAND_WEIGHT / 4.0),    # BitLinear
    ({"quant_method": "bitnet", "linear_class": "bitlinear"}, HAND_WEIGHT / 4.0),
    ({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
     HAND_WEIGHT * 4.0),                                                                  # AutoBitLinear
])
def test_effective_weight_of_a_hand_packed_tensor(tmp_path, quantization_config, expected):
    weights = effective_weights(hand_checkpoint(tmp_path / "m", quantization_config, 4.0), np.float64)
    assert set(weights) == {"model.layers.0.self_attn.q_proj.weight", "model.norm.weight"}
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.weight"], expected)


def test_packed_weights_need_a_bitnet_quantization_config(tmp_path):
    with pytest.raises(ValueError, match="quant_method"):
        effective_weights(hand_checkpoint(tmp_path / "m", None, 4.0))


@pytest.mark.parametrize("family, direction", [("llama3-1.58", "divide"), ("falcon3-1.58", "divide"),
                                               ("2b4t", "multiply")])
def test_effective_weights_apply_the_scale_in_the_family_direction(tmp_path, family, direction):
    d = write_checkpoint(tmp_path / "m", family, **(FAMILY_SHAPE[family] | dict(num_layers=1)))
    tensors, _ = read_checkpoint(d)
    weights = effective_weights(d, np.float64)
    assert not [n for n in weights if n.endswith("weight_scale")]
    for name, (dtype, shape, stored) in tensors.items():
        if dtype != "U8":
            continue
        (scale,) = as_float32(*tensors[name + "_scale"][::2]).astype(np.float64)
        w = weights[name]
        assert w.shape == (4 * shape[0], shape[1])
        magnitude = 1 / scale if direction == "divide" else scale
        assert set(np.unique(np.abs(w))) == {0.0, magnitude}, name
        # as many non-zero weights as non-1 fields, and each quarter of the rows from its own bit pair
        fields = fields_of(stored)
        for k in range(4):
            np.testing.assert_array_equal(np.sign(w[k * shape[0]:(k + 1) * shape[0]]), fields[k].astype(int) - 1)
    # float32 like llama.cpp's converter by default, and fp16 when asked
    name = "model.layers.0.self_attn.q_proj.weight"
    (scale,) = as_float32(*tensors[name + "_scale"][::2])
    f16 = effective_weights(d, np.float16)[name]
    value = np.float32(1) / scale if direction == "divide" else np.float32(scale)
    assert set(np.unique(np.abs(f16))) == {0.0, float(np.float16(value))}


def test_master_projections_become_absmean_ternary(tmp_path):
    d = write_checkpoint(tmp_path / "m", "2b4t-bf16", **(PACKED_SHAPE | dict(num_layers=1)))
    tensors, _ = read_checkpoint(d)
    weights = effective_weights(d)
    for name, (dtype, _, stored) in tensors.items():
        values = as_float32(dtype, stored)
        if name.endswith("_proj.weight"):
            np.testing.assert_allclose(weights[name], absmean_reference(values), rtol=1e-6)
        else:
            np.testing.assert_array_equal(weights[name], values.astype(np.float64))
