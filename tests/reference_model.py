"""A float64 numpy forward pass of llama.cpp's `bitnet` graph, for checking converted files.

Reads a 1bitLLM-family checkpoint (config.json, safetensors master weights) whole, so
it is meant for test-sized models. The graph follows llama.cpp `src/models/bitnet.cpp`:

    x = embed[tokens]
    per layer:  h = rmsnorm(x) * attn_norm
                q, k, v = h @ Wq'.T, h @ Wk'.T, h @ Wv'.T      W' = absmean_ternary(W)
                q, k = NEOX rope(q), NEOX rope(k)               per head
                a = causal GQA softmax(q k^T / sqrt(head_dim)) v
                x = x + (rmsnorm(a) * attn_sub_norm) @ Wo'.T
                h = rmsnorm(x) * ffn_norm
                x = x + (rmsnorm(silu(h @ Wgate'.T) * (h @ Wup'.T)) * ffn_sub_norm) @ Wdown'.T
    logits = (rmsnorm(x) * final_norm) @ embed.T                 tied, like llama.cpp

The options mirror what a GGUF stores: `embed_dtype=np.float16` for an F16
`token_embd`, `ternary_dtype=np.float16` for TQ1_0/TQ2_0 blocks (their scale is an
fp16, so a weight is code * fp16(s)) and for the F16 fallback of rows that are not a
multiple of 256; the default float32 matches an F32 or I2_S tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        values = np.frombuffer(raw[8 + n + begin:8 + n + end], _SAFETENSORS_DTYPES[info["dtype"]])
        if info["dtype"] == "BF16":  # bf16 is the top half of a float32
            values = (values.astype(np.uint32) << 16).view(np.float32)
        out[name] = values.astype(np.float64).reshape(info["shape"])
    return out


def load_checkpoint(model_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, float64 tensors by HF name) of a single-file or sharded safetensors checkpoint."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for fname in files:
        tensors.update(_read_safetensors(model_dir / fname))
    return config, tensors


def absmean_ternary(w, ternary_dtype=np.float32) -> np.ndarray:
    """BitNet b1.58 weights as llama.cpp's converter makes them, as float64.

    s = max(mean|w|, 1e-5) and iscale = 1/s in float32; W' = clip(rint(w * iscale), -1, 1)
    / iscale in float32 (llama.cpp divides by iscale rather than multiplying by s), then
    rounded through `ternary_dtype`, the precision the output file keeps the scale in.
    """
    w32 = np.asarray(w, dtype=np.float32)
    s = np.float32(max(np.abs(w32).mean(dtype=np.float64), 1e-5))
    iscale = np.float32(1) / s
    codes = np.clip(np.rint(w32 * iscale), -1, 1)
    return (codes / iscale).astype(ternary_dtype).astype(np.float64)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_neox(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate (T, heads, head_dim) by position: pairs (i, i + head_dim/2), angle pos * theta^(-2i/head_dim)."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q (T, heads, d), k and v (T, kv_heads, d) -> (T, heads * d); query head h reads kv head h // group."""
    n_tokens, n_head, head_dim = q.shape
    group = n_head // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(head_dim)
    scores[:, np.triu(np.ones((n_tokens, n_tokens), dtype=bool), k=1)] = -np.inf
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, v).reshape(n_tokens, n_head * head_dim)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def forward(model_dir, tokens: list[int], embed_dtype=None, ternary_dtype=np.float32) -> np.ndarray:
    """Logits (len(tokens), vocab_size) as float64 for one causal sequence starting at position 0."""
    config, t = load_checkpoint(model_dir)
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    head_dim = config["hidden_size"] // n_head
    eps, theta = config["rms_norm_eps"], config.get("rope_theta", 10000.0)

    embed = t["model.embed_tokens.weight"]
    if embed_dtype is not None:
        embed = embed.astype(embed_dtype).astype(np.float64)
    norms = {name: w.astype(np.float32).astype(np.float64) for name, w in t.items() if w.ndim == 1}

    positions = np.arange(len(tokens), dtype=np.float64)
    x = embed[np.asarray(tokens)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w = {name: absmean_ternary(t[p + name + ".weight"], ternary_dtype) for name in PROJECTIONS}

        h = rms_norm(x, norms[p + "input_layernorm.weight"], eps)
        q = (h @ w["self_attn.q_proj"].T).reshape(len(tokens), n_head, head_dim)
        k = (h @ w["self_attn.k_proj"].T).reshape(len(tokens), n_head_kv, head_dim)
        v = (h @ w["self_attn.v_proj"].T).reshape(len(tokens), n_head_kv, head_dim)
        a = causal_attention(rope_neox(q, positions, theta), rope_neox(k, positions, theta), v)
        x = x + rms_norm(a, norms[p + "self_attn.inner_attn_ln.weight"], eps) @ w["self_attn.o_proj"].T

        h = rms_norm(x, norms[p + "post_attention_layernorm.weight"], eps)
        f = silu(h @ w["mlp.gate_proj"].T) * (h @ w["mlp.up_proj"].T)
        x = x + rms_norm(f, norms[p + "mlp.ffn_layernorm.weight"], eps) @ w["mlp.down_proj"].T

    return rms_norm(x, norms["model.norm.weight"], eps) @ embed.T
