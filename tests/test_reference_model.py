"""The numpy reference forward pass, checked against its own definition (no llama.cpp needed)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.numpy import save_file

from tests.synthetic import write_bitnet_checkpoint
from tests.conftest import absmean_reference
from tests.reference_model import PROJECTIONS, absmean_ternary, forward, load_checkpoint, rope_neox

TOKENS = [1, 7, 3, 42, 9, 7, 0, 30]


# -- tiny checkpoints whose tensors the test chooses ------------------------------------------------

def random_tensors(seed=0, hidden=32, ffn=48, layers=2, heads=4, kv_heads=4, vocab=50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.inner_attn_ln.weight": (hidden,), p + "mlp.ffn_layernorm.weight": (ffn,),
                   p + "self_attn.q_proj.weight": (hidden, hidden),
                   p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                   p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                   p + "mlp.down_proj.weight": (hidden, ffn)}
    return {name: (1.0 + 0.2 * rng.standard_normal(shape) if len(shape) == 1 else
                   0.05 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in shapes.items()}


def write_checkpoint(path, tensors: dict[str, np.ndarray], heads=4, kv_heads=4, rope_theta=10000.0):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    config = {"architectures": ["BitnetForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": tensors["model.layers.0.mlp.up_proj.weight"].shape[0],
              "num_hidden_layers": sum(n.endswith("input_layernorm.weight") for n in tensors),
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "rope_theta": rope_theta, "hidden_act": "silu"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def loop_forward(model_dir, tokens) -> np.ndarray:
    """The same model written token by token and head by head, from the architecture's definition."""
    config, t = load_checkpoint(model_dir)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config["hidden_size"] // heads
    eps, theta = config["rms_norm_eps"], config["rope_theta"]

    def norm(x, w):
        return x / math.sqrt(sum(x * x) / len(x) + eps) * w

    def rotate(vec, pos):
        out = vec.copy()
        for i in range(hd // 2):
            angle = pos * theta ** (-2 * i / hd)
            a, b = vec[i], vec[i + hd // 2]
            out[i], out[i + hd // 2] = a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)
        return out

    xs = [t["model.embed_tokens.weight"][tok].copy() for tok in tokens]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w = {name: absmean_ternary(t[p + name + ".weight"]) for name in PROJECTIONS}
        hs = [norm(x, t[p + "input_layernorm.weight"]) for x in xs]
        q, k, v = ([w[f"self_attn.{n}_proj"] @ h for h in hs] for n in "qkv")
        for pos in range(len(xs)):
            attn = []
            for head in range(heads):
                kvh = head // (heads // kv_heads)
                qh = rotate(q[pos][head * hd:(head + 1) * hd], pos)
                scores = [qh @ rotate(k[s][kvh * hd:(kvh + 1) * hd], s) / math.sqrt(hd) for s in range(pos + 1)]
                top = max(scores)
                weights = [math.exp(sc - top) for sc in scores]
                attn.append(sum(wt * v[s][kvh * hd:(kvh + 1) * hd] for s, wt in enumerate(weights)) / sum(weights))
            xs[pos] = xs[pos] + w["self_attn.o_proj"] @ norm(np.concatenate(attn), t[p + "self_attn.inner_attn_ln.weight"])
        for pos, x in enumerate(xs):
            h = norm(x, t[p + "post_attention_layernorm.weight"])
            gate, up = w["mlp.gate_proj"] @ h, w["mlp.up_proj"] @ h
            f = np.array([g / (1 + math.exp(-g)) * u for g, u in zip(gate, up)])
            xs[pos] = x + w["mlp.down_proj"] @ norm(f, t[p + "mlp.ffn_layernorm.weight"])
    embed = t["model.embed_tokens.weight"]
    return np.array([[row @ norm(x, t["model.norm.weight"]) for row in embed] for x in xs])


# -- absmean ------------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 40)),
              elements=st.floats(-4, 4, width=32)))
def test_absmean_ternary_is_one_scale_times_three_codes(w):
    out = absmean_ternary(w)
    s = max(np.abs(w.astype(np.float64)).mean(), 1e-5)
    assert len(np.unique(out)) <= 3
    assert set(np.unique(np.abs(out))) <= {0.0, np.float64(np.float32(1) / (np.float32(1) / np.float32(s)))}
    np.testing.assert_allclose(out, absmean_reference(w), rtol=1e-6)  # the paper's formula, W' = codes * s


def test_absmean_ternary_in_float16_keeps_a_float16_scale():
    w = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32) * 0.013
    out = absmean_ternary(w, np.float16)
    scale = np.abs(out).max()
    assert scale == np.float16(scale) and len(np.unique(out)) == 3
    assert not absmean_ternary(np.zeros((4, 4))).any()


# -- loading ------------------------------------------------------------------------------------------

def test_loads_sharded_bf16_like_single_file_f32(tmp_path):
    _, f32 = load_checkpoint(write_bitnet_checkpoint(tmp_path / "f32", dtype="f32"))
    _, bf16 = load_checkpoint(write_bitnet_checkpoint(tmp_path / "bf16", dtype="bf16", shards=3))
    assert f32.keys() == bf16.keys()
    for name, ref in f32.items():
        got = bf16[name]
        assert got.dtype == np.float64 and got.shape == ref.shape
        assert not (got.astype(np.float32).view(np.uint32) & 0xFFFF).any(), name  # bf16 values only
        np.testing.assert_allclose(got, ref, rtol=2.0 ** -8, err_msg=name)


# -- the forward pass ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_forward_matches_per_head_loop(tmp_path, kv_heads):
    model = write_checkpoint(tmp_path, random_tensors(kv_heads=kv_heads), kv_heads=kv_heads)
    np.testing.assert_allclose(forward(model, TOKENS), loop_forward(model, TOKENS), rtol=1e-9, atol=1e-9)


def test_gqa_equals_attention_with_repeated_kv_heads(tmp_path):
    tensors = random_tensors(kv_heads=2)
    gqa = write_checkpoint(tmp_path / "gqa", tensors, kv_heads=2)
    repeated = {}
    for name, w in tensors.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # kv head j serves query heads 2j and 2j+1
            w = np.repeat(w.reshape(2, -1, w.shape[1]), 2, axis=0).reshape(-1, w.shape[1])
        repeated[name] = w
    mha = write_checkpoint(tmp_path / "mha", repeated, kv_heads=4)
    np.testing.assert_allclose(forward(gqa, TOKENS), forward(mha, TOKENS), rtol=1e-12, atol=1e-12)


def test_is_causal(tmp_path):
    model = write_checkpoint(tmp_path, random_tensors())
    a = forward(model, TOKENS)
    b = forward(model, TOKENS[:-2] + [11, 12])
    np.testing.assert_allclose(a[:-2], b[:-2], rtol=1e-12, atol=1e-12)
    assert not np.allclose(a[-1], b[-1])


def test_output_is_tied_to_embedding(tmp_path):
    tensors = random_tensors()
    unused = 49
    assert unused not in TOKENS
    before = forward(write_checkpoint(tmp_path / "a", tensors), TOKENS)
    tensors["model.embed_tokens.weight"][unused] *= -3
    after = forward(write_checkpoint(tmp_path / "b", tensors), TOKENS)
    changed = ~np.isclose(before, after, rtol=1e-12, atol=1e-12).all(axis=0)
    assert changed.nonzero()[0].tolist() == [unused]


def test_embed_dtype_rounds_the_embedding(tmp_path):
    tensors = random_tensors()
    exact = write_checkpoint(tmp_path / "exact", tensors)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].astype(np.float16)
    stored_f16 = write_checkpoint(tmp_path / "f16", tensors)
    rounded = forward(exact, TOKENS, embed_dtype=np.float16)
    np.testing.assert_array_equal(rounded, forward(stored_f16, TOKENS))
    assert not np.array_equal(rounded, forward(exact, TOKENS))


def test_rope_is_identity_at_zero_and_depends_on_relative_position():
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 1, 3, 16))
    np.testing.assert_allclose(rope_neox(q, np.zeros(1), 10000.0), q)

    def score(m, n):
        return np.sum(rope_neox(q, np.array([m], float), 500.0) * rope_neox(k, np.array([n], float), 500.0))
    assert score(7, 3) == pytest.approx(score(14, 10), rel=1e-9)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
