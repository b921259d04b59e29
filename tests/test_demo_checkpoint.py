"""The synthetic 1bitLLM checkpoints are well-formed: a safetensors reader, SentencePiece
and the converter's own checkpoint loader all accept them, and config.json agrees with
the tensors."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from safetensors import safe_open

from tests import synthetic as demo
from tests.synthetic import DEMO_DEFAULTS, write_bitnet_checkpoint

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)
ST_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
NP_DTYPE = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


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
    monkeypatch.setattr(demo, "CHUNK_ELEMS", 3 * 256 + 5)  # 3 rows of the embedding per block
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
    assert demo.bf16_bits(bits.view(np.float32)).tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0xBF82, 0x7F80]


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
    assert demo.main([str(out), "--dtype", "bf16", "--shards", "2", "--layers", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert (out / "model.safetensors.index.json").exists()

    assert demo.main([str(tmp_path / "bad"), "--heads", "3"]) == 2
    assert "heads" in capsys.readouterr().err
