"""Float64 numpy forward passes of BitNet b1.58 checkpoints, for checking converted files.

Reads a checkpoint (config.json, safetensors) whole, so it is meant for test-sized models.
Written from the format descriptions (FORMATS.md section 2, docs/notes/packed-families.md
sections 3 and 5), not from the converter's code.

Weights (`effective_weights`): the float value every projection stands for.
- master weights (1bitLLM, 2B-4T-bf16): absmean ternary, as llama.cpp's converter makes it;
- packed uint8 (`quantization_config.quant_method == "bitnet"`): a (out/4, in) byte tensor,
  unpacked row k * (out/4) + r = bits 2k..2k+1 of packed row r, code = field - 1, then the
  `<name>_scale` tensor applied in the layer class's direction: BitLinear (HF1BitLLM,
  Falcon3) W = codes / weight_scale, AutoBitLinear offline (2B-4T) W = codes * weight_scale.

Graph (`forward`), chosen by config.json's architecture, always on the rows as the
checkpoint stores them (Hugging Face's rotary layout, no q/k permutation):

    x = embed[tokens]
    per layer:  h = rmsnorm(x) * input_layernorm
                q, k, v = h @ Wq.T, h @ Wk.T, h @ Wv.T
                q, k = rope(q), rope(k)        rotate-half: pairs (i, i + head_dim/2), per head
                a = causal GQA softmax(q k^T / sqrt(head_dim)) v    (query head h reads kv head h // group)
                a = rmsnorm(a) * attn_sub_norm                       (bitnet archs only)
                x = x + a @ Wo.T
                h = rmsnorm(x) * post_attention_layernorm
                f = act(h @ Wgate.T) * (h @ Wup.T)                   act: silu, or relu(x)^2 for 2B-4T
                f = rmsnorm(f) * ffn_sub_norm                        (bitnet archs only)
                x = x + f @ Wdown.T
    logits = (rmsnorm(x) * final_norm) @ W_out.T   W_out = lm_head.weight, or the embedding when absent

- `BitnetForCausalLM` (1bitLLM): llama.cpp's `bitnet` graph (src/models/bitnet.cpp): silu,
  sub-norms `inner_attn_ln` / `ffn_layernorm`, output tied to the embedding.
- `BitNetForCausalLM` (2B-4T): transformers' modeling_bitnet: relu2, sub-norms `attn_sub_norm`
  / `ffn_sub_norm`, tied output.
- `LlamaForCausalLM` (HF1BitLLM, Falcon3): transformers' modeling_llama: silu, no sub-norms,
  untied lm_head when the checkpoint has one, head_dim from config.json when it names one.
- `Qwen3ForCausalLM` (PrismML Ternary-Bonsai): transformers' modeling_qwen3: as Llama, plus an
  RMSNorm over each head of q and of k (`self_attn.q_norm` / `k_norm`, weight of head_dim)
  before rope. Its projections are stored already ternary, {-s, 0, +s} with one s per group of
  columns: `effective_weights` checks that (every run of 32 values of a row holds one non-zero
  magnitude at most) and returns them as stored.

The options mirror what a GGUF stores: `embed_dtype=np.float16` for an F16 `token_embd`
(and `output`), `ternary_dtype=np.float16` for TQ1_0/TQ2_0 blocks (their scale is an fp16,
so a weight is code * fp16(|W|)) and for the F16 fallback of rows that are not a multiple of
256; the default float32 matches an F32 or I2_S tensor (the converter computes the ternary
values in float32); np.float64 keeps packed weights exact.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "U8": "u1"}

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Float tensors as float64; U8 tensors (packed ternary codes) as the stored uint8."""
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
        if info["dtype"] != "U8":
            values = values.astype(np.float64)
        out[name] = values.reshape(info["shape"])
    return out


def load_checkpoint(model_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, tensors by HF name) of a single-file or sharded safetensors checkpoint:
    float64 for float tensors, uint8 for packed ones."""
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


# -- weights ---------------------------------------------------------------------------------------

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


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """(n, cols) uint8 -> (4n, cols) int8 codes in {-1, 0, 1}.

    Row k * n + r of the result is bits 2k..2k+1 of packed row r, minus 1: the four
    fields of a byte are four contiguous quarters of the rows, not neighbouring rows."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(f"packed ternary weights are 2-D uint8, not {packed.ndim}-D {packed.dtype}")
    fields = np.concatenate([(packed >> (2 * k)) & 3 for k in range(4)], axis=0)
    if (fields == 3).any():
        raise ValueError("packed ternary weights hold the unused field value 3")
    return fields.astype(np.int8) - 1


# quantization_config (linear_class, quantization_mode) -> how weight_scale applies; absent
# keys take transformers' BitNetQuantConfig defaults ("bitlinear", "offline")
SCALE_DIRECTIONS: dict[tuple[str, str], str] = {
    ("bitlinear", "offline"): "divide",        # BitLinear: y = x W^T / (input_scale * weight_scale)
    ("autobitlinear", "offline"): "multiply",  # AutoBitLinear: y = (x W^T) * weight_scale
}


def scale_direction(config: dict) -> str | None:
    """"divide" (BitLinear: W = codes / weight_scale), "multiply" (AutoBitLinear offline:
    W = codes * weight_scale), or None when the checkpoint holds master weights."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "bitnet":
        return None
    key = (q.get("linear_class") or "bitlinear", q.get("quantization_mode") or "offline")
    if key not in SCALE_DIRECTIONS:
        raise ValueError(f"quantization_config {q}: no known weight_scale direction")
    return SCALE_DIRECTIONS[key]


def packed_weight(packed: np.ndarray, weight_scale, direction: str, ternary_dtype=np.float32) -> np.ndarray:
    """The float64 weight a packed tensor and its weight_scale stand for.

    Computed in float32 like llama.cpp's converter (codes / float32(scale)) unless
    `ternary_dtype` is float64, then rounded through `ternary_dtype`."""
    work = np.float64 if ternary_dtype == np.float64 else np.float32
    codes = unpack_ternary(packed).astype(work)
    scale = work(np.asarray(weight_scale, dtype=np.float64).reshape(-1)[0])
    w = codes / scale if direction == "divide" else codes * scale
    return w.astype(ternary_dtype).astype(np.float64)


GROUP_CHECK = 32  # every group size in use (64, 128) is a multiple


def group_ternary(w: np.ndarray, name: str) -> np.ndarray:
    """The stored weight, after checking it is {-s, 0, +s} with one s per run of GROUP_CHECK values."""
    a = np.abs(np.asarray(w, dtype=np.float64))
    rows, cols = a.shape
    for r in range(rows):
        for g in range(0, cols, GROUP_CHECK):
            mags = set(a[r, g:g + GROUP_CHECK].tolist()) - {0.0}
            if len(mags) > 1:
                raise ValueError(f"{name}: row {r}, columns {g}..{g + GROUP_CHECK - 1} are not ternary")
    return np.asarray(w, dtype=np.float64)


# architectures whose float projections are stored already ternary (one scale per group)
GROUP_SCALED = ("Qwen3ForCausalLM",)


def _is_projection(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(tuple(p + ".weight" for p in PROJECTIONS))


def effective_weights(model_dir, ternary_dtype=np.float32) -> dict[str, np.ndarray]:
    """Every tensor as the float64 values the model computes with, by HF name.

    Projections become ternary values times one scale (packed: unpacked and scaled by
    their weight_scale in the config's direction; master: absmean ternary); the
    `weight_scale` tensors are folded in and not returned; everything else is returned
    as stored."""
    config, tensors = load_checkpoint(model_dir)
    direction = scale_direction(config)
    grouped = config["architectures"][0] in GROUP_SCALED
    out = {}
    for name, w in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        if w.dtype == np.uint8:
            if direction is None or name + "_scale" not in tensors:
                raise ValueError(f"{name}: packed uint8 weights need quant_method bitnet and a {name}_scale tensor")
            out[name] = packed_weight(w, tensors[name + "_scale"], direction, ternary_dtype)
        elif _is_projection(name) and grouped:
            out[name] = group_ternary(w, name)
        elif _is_projection(name):
            if name + "_scale" in tensors:
                raise ValueError(f"{name}: a float weight with a weight_scale is not a known layout")
            out[name] = absmean_ternary(w, ternary_dtype)
        else:
            out[name] = w
    return out


# -- graph pieces ----------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_neox(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate (T, heads, head_dim) by position: pairs (i, i + head_dim/2), angle pos * theta^(-2i/head_dim)."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_rotate_half(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Hugging Face's form of the same rotation: inv_freq = theta^(-arange(0, d, 2)/d),
    cos/sin = cat(angle, angle), x * cos + rotate_half(x) * sin."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.outer(positions, inv_freq)
    emb = np.concatenate([angles, angles], axis=-1)[:, None, :]
    return x * np.cos(emb) + rotate_half(x) * np.sin(emb)


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


def relu2(x: np.ndarray) -> np.ndarray:
    return np.square(np.maximum(x, 0.0))


# architecture -> (MLP activation, (attention sub-norm, MLP sub-norm) or None)
ARCHITECTURES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], tuple[str, str] | None]] = {
    "BitnetForCausalLM": (silu, ("self_attn.inner_attn_ln", "mlp.ffn_layernorm")),
    "BitNetForCausalLM": (relu2, ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")),
    "LlamaForCausalLM": (silu, None),
    "Qwen3ForCausalLM": (silu, None),
}
QK_NORM = ("Qwen3ForCausalLM",)  # RMSNorm over each head of q and k before rope


# -- forward -----------------------------------------------------------------------------------------

def forward(model_dir, tokens: list[int], embed_dtype=None, ternary_dtype=np.float32) -> np.ndarray:
    """Logits (len(tokens), vocab_size) as float64 for one causal sequence starting at position 0."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    arch = config["architectures"][0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{arch}: no reference graph (known: {', '.join(ARCHITECTURES)})")
    act, sub_norms = ARCHITECTURES[arch]
    t = effective_weights(model_dir, ternary_dtype)

    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    eps, theta = config["rms_norm_eps"], config.get("rope_theta", 10000.0)

    def rounded(w):  # the precision of token_embd / output in the file
        return w if embed_dtype is None else w.astype(embed_dtype).astype(np.float64)

    embed = rounded(t["model.embed_tokens.weight"])
    head = rounded(t["lm_head.weight"]) if "lm_head.weight" in t else embed
    norms = {name: w.astype(np.float32).astype(np.float64) for name, w in t.items() if w.ndim == 1}

    positions = np.arange(len(tokens), dtype=np.float64)
    x = embed[np.asarray(tokens)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w = {name: t[p + name + ".weight"] for name in PROJECTIONS}

        h = rms_norm(x, norms[p + "input_layernorm.weight"], eps)
        q = (h @ w["self_attn.q_proj"].T).reshape(len(tokens), n_head, head_dim)
        k = (h @ w["self_attn.k_proj"].T).reshape(len(tokens), n_head_kv, head_dim)
        v = (h @ w["self_attn.v_proj"].T).reshape(len(tokens), n_head_kv, head_dim)
        if arch in QK_NORM:
            q = rms_norm(q, norms[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, norms[p + "self_attn.k_norm.weight"], eps)
        a = causal_attention(rope_neox(q, positions, theta), rope_neox(k, positions, theta), v)
        if sub_norms:
            a = rms_norm(a, norms[p + sub_norms[0] + ".weight"], eps)
        x = x + a @ w["self_attn.o_proj"].T

        h = rms_norm(x, norms[p + "post_attention_layernorm.weight"], eps)
        f = act(h @ w["mlp.gate_proj"].T) * (h @ w["mlp.up_proj"].T)
        if sub_norms:
            f = rms_norm(f, norms[p + sub_norms[1] + ".weight"], eps)
        x = x + f @ w["mlp.down_proj"].T

    return rms_norm(x, norms["model.norm.weight"], eps) @ head.T
