"""Small synthetic checkpoints of every BitNet b1.58 family, for tests, the demo and the bench.

`write_checkpoint(out_dir, family, ...)` lays out a directory the way the family's
published checkpoints do (config.json, safetensors, tokenizer), with random weights of
a chosen shape and shard count (FORMATS.md section 2, docs/notes/packed-families.md
sections 0 and 4):

    1bitllm      1bitLLM/bitnet_b1_58-*: BitnetForCausalLM, master weights (f32/f16/bf16),
                 SentencePiece tokenizer.model
    llama3-1.58  HF1BitLLM/Llama3-8B-1.58-*: LlamaForCausalLM + quant_method bitnet, packed
                 uint8 projections + bf16 weight_scale (BitLinear: W = codes / scale),
                 untied lm_head, byte-level BPE tokenizer.json
    falcon3-1.58 tiiuae/Falcon3-*-1.58bit: as llama3-1.58 plus an explicit head_dim
    2b4t         microsoft/bitnet-b1.58-2B-4T: BitNetForCausalLM, packed projections
                 (AutoBitLinear offline: W = codes * scale), relu2, sub-norms, tied
    2b4t-bf16    microsoft/bitnet-b1.58-2B-4T-bf16: the same with bf16 master weights
    falcon-e     tiiuae/Falcon-E-*: packed like falcon3-1.58 as onebitllms' quantize_to_1bit writes it
                 (weight_scale = 1 / absmean, so tens; modules_to_not_convert ["lm_head"])
    falcon-e-prequantized
                 tiiuae/Falcon-E-* revision "prequantized": LlamaForCausalLM, bf16 master weights,
                 no quantization_config, is_bitnet_config true
    bonsai       prism-ml/Ternary-Bonsai-*-unpacked: Qwen3ForCausalLM (q/k norms), fp16 projections
                 already ternary, {-s, 0, +s} with one s per group of 128 values of a row
                 (`group_size`; 0: one s per tensor); `binary` (--binary): {-s, +s}, prism-ml/Bonsai-*-unpacked

Every tensor is generated and written a row chunk at a time (packed ones too), so a
1 GiB embedding costs a few MiB of memory. The same arguments give the same bytes.

    python -m tests.synthetic OUT_DIR [--family 2b4t] [--dtype bf16] [--shards 3] [--hidden-size 512] ...
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.errors import OptionError

# The shape `make convert` (no MODEL) converts. Hidden and intermediate sizes are
# multiples of 256 so every projection can be TQ1_0/TQ2_0 (other row lengths fall
# back to F16); f32 on disk like the real bitnet_b1_58-large.
DEMO_DEFAULTS = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_layers": 2,
    "num_heads": 4,
    "dtype": "f32",
}

DTYPES = ("f32", "f16", "bf16")  # the float types a checkpoint's float tensors can have
SAFETENSORS_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "u8": "U8"}
TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "u8": 1}

CHUNK_ELEMS = 1 << 22  # values generated at once (16 MiB of float32)
VOCAB_MULTIPLE = 64


# -- values -----------------------------------------------------------------------------

# Role of a tensor -> (mean, base std). Projections get a small std so the absmean
# scale (~0.8 std) is far from 1 and a missing or misplaced scale shows up; norms
# scatter around 1 so a dropped or swapped norm changes the output. An untied lm_head
# gets a std that keeps the logits of a unit-RMS hidden state near 1.
VALUE_PROFILE = {
    "embedding": (0.0, 1.0),
    "head": (0.0, 0.06),
    "norm": (1.0, 0.1),
    "attn": (0.0, 0.03),
    "ffn_in": (0.0, 0.04),
    "ffn_out": (0.0, 0.02),
}

# Packed projections: the weight_scale of each tensor is drawn from this range, far
# from 1 so dividing instead of multiplying (or dropping it) changes every value a lot.
WEIGHT_SCALE_RANGE = (2.0, 8.0)
# ... and the fraction of zero codes from this one (trained BitNet weights: about a third to a half).
ZERO_FRACTION_RANGE = (0.3, 0.5)


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    # Seeded by name, so a tensor's values do not depend on the order tensors are written in.
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def tensor_chunks(name: str, shape: tuple[int, ...], role: str, seed: int) -> Iterator[np.ndarray]:
    """The float32 values of one tensor, as consecutive row blocks of at most CHUNK_ELEMS."""
    rng = _tensor_rng(seed, name)
    mean, std = VALUE_PROFILE[role]
    if role != "embedding":
        std *= 0.75 + 0.5 * rng.random()  # every tensor gets its own scale
    row_elems = math.prod(shape[1:])
    rows_per_chunk = max(1, CHUNK_ELEMS // max(row_elems, 1))
    for start in range(0, shape[0], rows_per_chunk):
        rows = min(rows_per_chunk, shape[0] - start)
        block = rng.standard_normal((rows, *shape[1:]), dtype=np.float32)
        block *= np.float32(std)
        if mean:
            block += np.float32(mean)
        yield block


def packed_chunks(name: str, shape: tuple[int, int], seed: int) -> Iterator[np.ndarray]:
    """Random ternary codes of a (4 * shape[0], shape[1]) weight, packed: uint8 row blocks of `shape`.

    Packed row r holds unpacked rows r, r + n, r + 2n, r + 3n (n = shape[0]) in bits
    0-1, 2-3, 4-5, 6-7, each as code + 1 (0, 1, 2 for -1, 0, +1; never 3). The codes are
    drawn packed row by packed row from one stream per tensor (float32 uniforms, whose
    stream does not depend on how it is cut), so the chunk size does not change them.
    """
    rng = _tensor_rng(seed, name)
    low, high = ZERO_FRACTION_RANGE
    zeros = low + (high - low) * rng.random()
    below_zero, below_plus = np.float32((1 - zeros) / 2), np.float32((1 + zeros) / 2)
    n_rows, n_cols = shape
    rows_per_chunk = max(1, CHUNK_ELEMS // max(4 * n_cols, 1))
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]
    for start in range(0, n_rows, rows_per_chunk):
        rows = min(rows_per_chunk, n_rows - start)
        u = rng.random((rows, 4, n_cols), dtype=np.float32)  # [packed row, quarter k, column]
        fields = (u >= below_zero).astype(np.uint8) + (u >= below_plus).astype(np.uint8)
        yield np.bitwise_or.reduce(fields << shifts, axis=1)


def weight_scale_chunks(name: str, seed: int, value_range=WEIGHT_SCALE_RANGE) -> Iterator[np.ndarray]:
    """The one value of a `<proj>.weight_scale` tensor, in `value_range`."""
    low, high = value_range
    yield np.array([low + (high - low) * _tensor_rng(seed, name).random()], dtype=np.float32)


# Group-scaled projections: each group's scale from this range (fp16-exact), the codes as packed ones.
GROUP_SCALE_RANGE = (0.01, 0.05)
ROW_SCALES = -1  # a group_size: one scale per row (BitCPM), the group being the whole row


def grouped_chunks(name: str, shape: tuple[int, int], seed: int, group: int,
                   binary: bool = False) -> Iterator[np.ndarray]:
    """float32 rows of a group-scaled ternary weight: codes in {-1, 0, +1} (`binary`: {-1, +1}, as
    1-bit Bonsai) times one fp16-exact scale per `group` values of a row (0: one scale for the whole
    tensor; ROW_SCALES: one per row). A bf16 checkpoint rounds
    each scale once, so its values stay ternary."""
    rng = _tensor_rng(seed, name)
    low, high = ZERO_FRACTION_RANGE
    zeros = 0.0 if binary else low + (high - low) * rng.random()
    n_rows, n_cols = shape
    slow, shigh = GROUP_SCALE_RANGE
    whole = np.float32(np.float16(slow + (shigh - slow) * rng.random()))
    rows_per_chunk = max(1, CHUNK_ELEMS // max(n_cols, 1))
    for start in range(0, n_rows, rows_per_chunk):
        rows = min(rows_per_chunk, n_rows - start)
        u = rng.random((rows, n_cols), dtype=np.float32)
        codes = (u >= (1 - zeros) / 2).astype(np.float32) + (u >= (1 + zeros) / 2).astype(np.float32) - 1
        if group == ROW_SCALES:
            group = n_cols
        if group:
            scales = rng.uniform(slow, shigh, (rows, n_cols // group)).astype(np.float16).astype(np.float32)
            yield (codes.reshape(rows, -1, group) * scales[..., None]).reshape(rows, n_cols)
        else:
            yield codes * whole


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    round_bias = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + round_bias) >> 16).astype(np.uint16)


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """Generated values -> the little-endian array whose bytes are stored for `dtype`
    (float32 values for the float types, uint8 bytes for "u8")."""
    if dtype == "u8":
        if values.dtype != np.uint8:
            raise TypeError(f"u8 tensors are generated as uint8, not {values.dtype}")
        return values
    if dtype == "bf16":
        return bf16_bits(values).astype("<u2", copy=False)
    return values.astype({"f32": "<f4", "f16": "<f2"}[dtype], copy=False)


# -- safetensors writer -------------------------------------------------------------------

# (name, shape, chunks) stored as the file's dtype, or (name, shape, chunks, dtype)
TensorSpec = tuple[str, tuple[int, ...], Callable[[], Iterator[np.ndarray]]]


def write_safetensors(path: Path, tensors: list, dtype: str) -> int:
    """Write one safetensors file, streaming each tensor's row blocks as they are made.

    `tensors` are (name, shape, chunks) with `chunks()` yielding row blocks (float32 for
    float types, uint8 for "u8"); they are stored as `dtype` unless an entry carries its
    own dtype as a fourth item. Returns the number of data bytes. The file is written
    under a temporary name and renamed, so an interrupted run leaves no file that looks
    complete.
    """
    entries = [(t[0], tuple(t[1]), t[2], t[3] if len(t) > 3 else dtype) for t in tensors]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _, dt in entries:
        nbytes = math.prod(shape) * ITEMSIZE[dt]
        header[name] = {"dtype": SAFETENSORS_DTYPE[dt], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, chunks, dt in entries:
            written = 0
            for block in chunks():
                data = encode(block, dt)
                f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                written += data.nbytes
            begin, end = header[name]["data_offsets"]
            if written != end - begin:  # a bug here would silently shift every later tensor
                raise RuntimeError(f"{name}: generated {written} bytes, the header promised {end - begin}")
    os.replace(partial, path)
    return offset


# -- families -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Hparams:
    """Everything config.json and the tensor list are derived from."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    dtype: str
    bos_token_id: int
    eos_token_id: int


def _bitnet_1bitllm_config(h: Hparams) -> dict:
    # Keys and values as in 1bitLLM/bitnet_b1_58-large's config.json. That file says
    # "tie_word_embeddings": false yet ships no lm_head.weight (its remote code and
    # llama.cpp's `bitnet` arch use the embedding as the output), so we copy the flag
    # as it is: a converter must not rely on it for this family. Its pad_token_id
    # (32000) names a row past the SentencePiece pieces; our tokenizer has no pad
    # piece, so it is null here.
    return {
        "architectures": ["BitnetForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": h.bos_token_id,
        "eos_token_id": h.eos_token_id,
        "pad_token_id": None,
        "hidden_act": "silu",
        "hidden_size": h.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": h.intermediate_size,
        "max_position_embeddings": h.max_position_embeddings,
        "num_attention_heads": h.num_heads,
        "num_hidden_layers": h.num_layers,
        "num_key_value_heads": h.num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": h.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": h.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": TORCH_DTYPE[h.dtype],
        "transformers_version": "4.39.0",
        "use_cache": True,
        "vocab_size": h.vocab_size,
        "weight_bits": 1,
        "input_bits": 8,
    }


def _llama_bitnet_config(h: Hparams) -> dict:
    # HF1BitLLM/Llama3-8B-1.58-100B-tokens (Llama 3, not 3.1: no rope_scaling; no head_dim key)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": h.bos_token_id,
        "eos_token_id": h.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": h.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": h.intermediate_size,
        "is_bitnet_config": True,
        "max_position_embeddings": h.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": h.num_heads,
        "num_hidden_layers": h.num_layers,
        "num_key_value_heads": h.num_kv_heads,
        "pretraining_tp": 1,
        "quantization_config": {"quant_method": "bitnet", "modules_to_not_convert": None},
        "rms_norm_eps": h.rms_norm_eps,
        "rope_interleaved": False,
        "rope_scaling": None,
        "rope_theta": h.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": TORCH_DTYPE[h.dtype],
        "transformers_version": "4.44.0",
        "use_cache": True,
        "vocab_size": h.vocab_size,
    }


def _falcon3_bitnet_config(h: Hparams) -> dict:
    # tiiuae/Falcon3-*-1.58bit: explicit head_dim, rope_theta a JSON int, lm_head kept unquantized
    config = _llama_bitnet_config(h)
    del config["rope_interleaved"]
    config |= {
        "head_dim": h.head_dim,
        "quantization_config": {"modules_to_not_convert": ["lm_head"], "quant_method": "bitnet"},
        "rope_theta": int(round(h.rope_theta)),
    }
    return dict(sorted(config.items()))


def _falcon_e_config(h: Hparams, packed: bool) -> dict:
    # tiiuae/Falcon-E-*: what onebitllms' quantize_to_1bit writes over the source Llama config
    # (is_bitnet_config, pretraining_tp 1, quantization_config with modules_to_not_convert
    # from transformers' get_keys_to_not_convert: ["lm_head"] for an untied head). The
    # prequantized revision is the same Llama config without quantization_config (whether
    # it carries is_bitnet_config is unverified; the converter needs it, see families.md).
    config = _falcon3_bitnet_config(h)
    if not packed:
        del config["quantization_config"]
    return config


def _qwen3_config(h: Hparams) -> dict:
    # Qwen3-8B's config.json keys (prism-ml/Ternary-Bonsai-8B: Qwen3-8B, 36 layers, 32/8 heads);
    # no rope scaling, untied head
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": h.bos_token_id,
        "eos_token_id": h.eos_token_id,
        "head_dim": h.head_dim,
        "hidden_act": "silu",
        "hidden_size": h.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": h.intermediate_size,
        "max_position_embeddings": h.max_position_embeddings,
        "max_window_layers": h.num_layers,
        "num_attention_heads": h.num_heads,
        "num_hidden_layers": h.num_layers,
        "num_key_value_heads": h.num_kv_heads,
        "rms_norm_eps": h.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": h.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": TORCH_DTYPE[h.dtype],
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": h.vocab_size,
    }


def _minicpm_config(h: Hparams) -> dict:
    # openbmb MiniCPM4-0.5B / BitCPM4's config.json keys (MiniCPMForCausalLM through auto_map, which
    # we never run): the muP scalings scale_emb, scale_depth and dim_model_base; no rope scaling
    return {
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                     "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
        "model_type": "minicpm",
        "bos_token_id": h.bos_token_id,
        "eos_token_id": h.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": h.hidden_size,
        "initializer_range": 0.1,
        "intermediate_size": h.intermediate_size,
        "max_position_embeddings": h.max_position_embeddings,
        "num_attention_heads": h.num_heads,
        "num_hidden_layers": h.num_layers,
        "num_key_value_heads": h.num_kv_heads,
        "rms_norm_eps": h.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": h.rope_theta,
        "torch_dtype": TORCH_DTYPE[h.dtype],
        "transformers_version": "4.46.3",
        "use_cache": True,
        "vocab_size": h.vocab_size,
        "scale_emb": 12,
        "scale_depth": 1.4,
        "dim_model_base": h.hidden_size // 4,  # logit scale 4, as MiniCPM4-0.5B's 1024 / 256
        "tie_word_embeddings": False,
    }


def _gemma3_config(h: Hparams) -> dict:
    # google gemma-3-270m's text config keys (Gemma3TextModel, as a sentence-transformers backbone)
    return {
        "architectures": ["Gemma3TextModel"],
        "model_type": "gemma3_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": h.bos_token_id,
        "eos_token_id": h.eos_token_id,
        "final_logit_softcapping": None,
        "head_dim": h.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": h.hidden_size,
        "intermediate_size": h.intermediate_size,
        "max_position_embeddings": h.max_position_embeddings,
        "num_attention_heads": h.num_heads,
        "num_hidden_layers": h.num_layers,
        "num_key_value_heads": h.num_kv_heads,
        "query_pre_attn_scalar": h.head_dim,
        "rms_norm_eps": h.rms_norm_eps,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "rope_theta": h.rope_theta,
        "sliding_window": 512,
        "tie_word_embeddings": True,
        "torch_dtype": TORCH_DTYPE[h.dtype],
        "transformers_version": "4.55.0",
        "use_cache": True,
        "vocab_size": h.vocab_size,
    }


def _bitnet_2b4t_config(h: Hparams, packed: bool) -> dict:
    # microsoft/bitnet-b1.58-2B-4T(-bf16); its auto_map (remote code) is left out
    config = {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": h.bos_token_id,
        "eos_token_id": h.eos_token_id,
        "hidden_act": "relu2",
        "hidden_size": h.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": h.intermediate_size,
        "max_position_embeddings": h.max_position_embeddings,
        "num_attention_heads": h.num_heads,
        "num_hidden_layers": h.num_layers,
        "num_key_value_heads": h.num_kv_heads,
        "rms_norm_eps": h.rms_norm_eps,
        "rope_theta": h.rope_theta,
        "tie_word_embeddings": True,
        "torch_dtype": TORCH_DTYPE[h.dtype],
        "transformers_version": "4.40.0",
        "use_cache": True,
        "vocab_size": h.vocab_size,
    }
    if packed:
        config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                         "quantization_mode": "offline"}
    return config


@dataclass(frozen=True)
class Family:
    """What a checkpoint family's directory looks like."""
    config: Callable[[Hparams], dict]
    packed: bool                           # projections as packed uint8 + <proj>.weight_scale
    sub_norms: tuple[str, str] | None      # (after attention, inside the MLP), or none
    lm_head: bool                          # an lm_head.weight tensor (untied output)
    tokenizer: str                         # "sentencepiece" (tokenizer.model) or "bpe" (tokenizer.json)
    head_dim_key: bool                     # config.json has head_dim (which may differ from hidden/heads)
    special_tokens: tuple[str, str] = ("<s>", "</s>")  # (bos, eos) token strings
    weight_scale_range: tuple[float, float] = WEIGHT_SCALE_RANGE  # packed: where weight_scale values lie
    grouped: bool = False                  # float projections already ternary, one scale per group
    qk_norm: bool = False                  # self_attn.q_norm / k_norm (Qwen3)
    proj_norms: bool = False               # <proj>.norm.weight before every projection (BitNet embedding models)
    prefix: str = "model."                 # of every tensor name but lm_head
    pooling: str | None = None             # sentence-transformers modules.json + 1_Pooling/config.json mode
    specials: tuple[str, ...] | None = None  # the BPE tokenizer's special tokens (default: Llama 3's)
    gemma_norms: bool = False              # pre_feedforward_layernorm and post_feedforward_layernorm (Gemma3)
    defaults: dict = field(default_factory=dict)        # rope_theta, rms_norm_eps, max_position_embeddings, dtype


_BITNET_SUB_NORMS = ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")

FAMILIES: dict[str, Family] = {
    "1bitllm": Family(
        config=_bitnet_1bitllm_config, packed=False,
        sub_norms=("self_attn.inner_attn_ln", "mlp.ffn_layernorm"), lm_head=False,
        tokenizer="sentencepiece", head_dim_key=False,
        defaults=dict(rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048, dtype="f32",
                      tokenizer_vocab=320)),
    "llama3-1.58": Family(
        config=_llama_bitnet_config, packed=True, sub_norms=None, lm_head=True,
        tokenizer="bpe", head_dim_key=False, special_tokens=("<|begin_of_text|>", "<|eot_id|>"),
        defaults=dict(rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, dtype="bf16",
                      tokenizer_vocab=400)),
    "falcon3-1.58": Family(
        config=_falcon3_bitnet_config, packed=True, sub_norms=None, lm_head=True,
        tokenizer="bpe", head_dim_key=True, special_tokens=("<|begin_of_text|>", "<|begin_of_text|>"),
        defaults=dict(rope_theta=1000042, rms_norm_eps=1e-6, max_position_embeddings=32768, dtype="bf16",
                      tokenizer_vocab=400)),
    "2b4t": Family(
        config=lambda h: _bitnet_2b4t_config(h, packed=True), packed=True, sub_norms=_BITNET_SUB_NORMS,
        lm_head=False, tokenizer="bpe", head_dim_key=False,
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>"),
        defaults=dict(rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096, dtype="bf16",
                      tokenizer_vocab=400)),
    "2b4t-bf16": Family(
        config=lambda h: _bitnet_2b4t_config(h, packed=False), packed=False, sub_norms=_BITNET_SUB_NORMS,
        lm_head=False, tokenizer="bpe", head_dim_key=False,
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>"),
        defaults=dict(rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096, dtype="bf16",
                      tokenizer_vocab=400)),
    "falcon-e": Family(
        config=lambda h: _falcon_e_config(h, packed=True), packed=True, sub_norms=None, lm_head=True,
        tokenizer="bpe", head_dim_key=True, special_tokens=("<|begin_of_text|>", "<|end_of_text|>"),
        weight_scale_range=(16.0, 64.0),  # 1 / absmean of weights of std 0.02-0.05
        defaults=dict(rope_theta=1000042, rms_norm_eps=1e-6, max_position_embeddings=32768, dtype="bf16",
                      tokenizer_vocab=400)),
    "falcon-e-prequantized": Family(
        config=lambda h: _falcon_e_config(h, packed=False), packed=False, sub_norms=None, lm_head=True,
        tokenizer="bpe", head_dim_key=True, special_tokens=("<|begin_of_text|>", "<|end_of_text|>"),
        defaults=dict(rope_theta=1000042, rms_norm_eps=1e-6, max_position_embeddings=32768, dtype="bf16",
                      tokenizer_vocab=400)),
    # microsoft bitnet-embedding-0.6b (Qwen3 backbone; docs/bitnet-embeddings-i2s-guide.md of
    # microsoft/BitNet): bf16, names without "model.", per-projection norms, tied, last-token pooling
    "bitnet-embedding-qwen3": Family(
        config=lambda h: _qwen3_config(h) | {"tie_word_embeddings": True, "architectures": ["Qwen3Model"]},
        packed=False, sub_norms=None, lm_head=False, tokenizer="bpe", head_dim_key=True,
        special_tokens=("<|im_start|>", "<|im_end|>"), qk_norm=True, proj_norms=True, prefix="",
        pooling="pooling_mode_lasttoken", specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
        defaults=dict(rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, dtype="bf16",
                      tokenizer_vocab=400)),
    # microsoft bitnet-embedding-270m (Gemma3 backbone): as above with Gemma3's norms and tokenizer
    "bitnet-embedding-gemma3": Family(
        config=lambda h: _gemma3_config(h), packed=False, sub_norms=None, lm_head=False, tokenizer="gemma-bpe",
        head_dim_key=True, special_tokens=("<bos>", "<eos>"), qk_norm=True, proj_norms=True, prefix="",
        pooling="pooling_mode_lasttoken", gemma_norms=True,
        defaults=dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, dtype="bf16",
                      tokenizer_vocab=400)),
    "bonsai": Family(
        config=_qwen3_config, packed=False, sub_norms=None, lm_head=True, tokenizer="bpe", head_dim_key=True,
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>"), grouped=True, qk_norm=True,
        defaults=dict(rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=65536, dtype="f16",
                      tokenizer_vocab=400, group_size=128)),
    # OpenBMB BitCPM4 (MiniCPM4 with ternary-valued bf16 projections; one scale per row by default)
    "minicpm": Family(
        config=_minicpm_config, packed=False, sub_norms=None, lm_head=True, tokenizer="sentencepiece",
        head_dim_key=False, grouped=True,
        defaults=dict(rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=32768, dtype="bf16",
                      tokenizer_vocab=320, group_size=ROW_SCALES)),
}

PROJECTION_ROLES = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
                    "self_attn.o_proj": "attn", "mlp.gate_proj": "ffn_in", "mlp.up_proj": "ffn_in",
                    "mlp.down_proj": "ffn_out"}


# -- checkpoint layout --------------------------------------------------------------------

def family_tensor_specs(family: Family, h: Hparams, group_size: int = 0, binary: bool = False,
                        ternary_embeddings: bool = False,
                        float_projections: bool = False) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(name, shape, role, stored dtype) of every tensor, in the order transformers saves them.

    role is a VALUE_PROFILE key, "packed" (uint8 codes, shape (out/4, in)), "weight_scale" or
    "grouped:G" (ternary floats, one scale per G values of a row; "grouped:G:binary": no zeros).
    """
    q_dim, kv_dim = h.num_heads * h.head_dim, h.num_kv_heads * h.head_dim
    proj_shapes = {"self_attn.q_proj": (q_dim, h.hidden_size), "self_attn.k_proj": (kv_dim, h.hidden_size),
                   "self_attn.v_proj": (kv_dim, h.hidden_size), "self_attn.o_proj": (h.hidden_size, q_dim),
                   "mlp.gate_proj": (h.intermediate_size, h.hidden_size),
                   "mlp.up_proj": (h.intermediate_size, h.hidden_size),
                   "mlp.down_proj": (h.hidden_size, h.intermediate_size)}
    attn_sub, ffn_sub = family.sub_norms or (None, None)

    def projection(p: str, proj: str) -> list:
        (out_dim, in_dim), name = proj_shapes[proj], p + proj + ".weight"
        if family.grouped and not float_projections:
            return [(name, (out_dim, in_dim), f"grouped:{group_size}" + (":binary" if binary else ""), h.dtype)]
        if not family.packed:
            norm = [(p + proj + ".norm.weight", (in_dim,), "norm", h.dtype)] if family.proj_norms else []
            return [(name, (out_dim, in_dim), PROJECTION_ROLES[proj], h.dtype)] + norm
        return [(name, (out_dim // 4, in_dim), "packed", "u8"), (name + "_scale", (1,), "weight_scale", h.dtype)]

    grouped = f"grouped:{group_size}" + (":binary" if binary else "")
    specs = [(family.prefix + "embed_tokens.weight", (h.vocab_size, h.hidden_size),
              grouped if ternary_embeddings else "embedding", h.dtype)]
    for i in range(h.num_layers):
        p = f"{family.prefix}layers.{i}."
        specs.append((p + "input_layernorm.weight", (h.hidden_size,), "norm", h.dtype))
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            specs += projection(p, proj)
        if family.qk_norm:
            specs += [(p + "self_attn.q_norm.weight", (h.head_dim,), "norm", h.dtype),
                      (p + "self_attn.k_norm.weight", (h.head_dim,), "norm", h.dtype)]
        if attn_sub:
            specs.append((p + attn_sub + ".weight", (q_dim,), "norm", h.dtype))
        specs.append((p + "post_attention_layernorm.weight", (h.hidden_size,), "norm", h.dtype))
        if family.gemma_norms:
            specs.append((p + "pre_feedforward_layernorm.weight", (h.hidden_size,), "norm", h.dtype))
        for proj in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            specs += projection(p, proj)
        if family.gemma_norms:
            specs.append((p + "post_feedforward_layernorm.weight", (h.hidden_size,), "norm", h.dtype))
        if ffn_sub:
            specs.append((p + ffn_sub + ".weight", (h.intermediate_size,), "norm", h.dtype))
    specs.append((family.prefix + "norm.weight", (h.hidden_size,), "norm", h.dtype))
    if family.lm_head:
        specs.append(("lm_head.weight", (h.vocab_size, h.hidden_size), grouped if ternary_embeddings else "head",
                      h.dtype))
    return specs


def split_into_shards(sizes: list[int], shards: int) -> list[int]:
    """Shard index of each tensor: contiguous, balanced by bytes, no shard empty."""
    total = sum(sizes) or 1
    n = len(sizes)
    out, done, prev = [], 0, 0
    for i, size in enumerate(sizes):
        ideal = min(shards - 1, done * shards // total)
        shard = 0 if i == 0 else min(max(ideal, prev, shards - (n - i)), prev + 1)
        out.append(shard)
        prev, done = shard, done + size
    return out


def _positive_int(label: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OptionError(f"{label} must be a positive integer, not {value!r}")


def _check_shape(family_name: str, family: Family, *, hidden_size, intermediate_size, num_heads,
                 num_kv_heads, head_dim) -> int:
    """The head dimension, after checking that the shape options fit together and the family."""
    if num_heads % num_kv_heads:
        raise OptionError(f"num_heads {num_heads} and num_kv_heads {num_kv_heads}: kv heads must divide heads")
    if head_dim is None:
        if hidden_size % num_heads:
            raise OptionError(f"hidden_size {hidden_size}, num_heads {num_heads} and num_kv_heads {num_kv_heads}: "
                              "heads must divide hidden_size and kv heads must divide heads")
        head_dim = hidden_size // num_heads
    elif not family.head_dim_key and head_dim * num_heads != hidden_size:
        raise OptionError(f"head_dim {head_dim}: family {family_name} has no head_dim in config.json, "
                          f"so it must be hidden_size / num_heads = {hidden_size / num_heads:g}")
    if head_dim % 2:
        raise OptionError(f"head_dim {head_dim}: rope needs an even head dimension")
    if family.packed:
        rows = {"hidden_size": hidden_size, "intermediate_size": intermediate_size,
                "num_heads * head_dim": num_heads * head_dim, "num_kv_heads * head_dim": num_kv_heads * head_dim}
        for label, value in rows.items():
            if value % 4:
                raise OptionError(f"{label} = {value}: packed weights hold 4 rows per byte, "
                                  "so it must be a multiple of 4")
    return head_dim


def write_checkpoint(out_dir, family: str = "1bitllm", *, hidden_size=256, intermediate_size=512,
                     num_layers=2, num_heads=4, num_kv_heads=None, head_dim=None, vocab_size=None,
                     tokenizer_vocab=None, dtype=None, shards=1, seed=0, rope_theta=None, rms_norm_eps=None,
                     max_position_embeddings=None, added_tokens=False, group_size=None, binary=False,
                     ternary_embeddings=False, float_projections=False) -> Path:
    """Write a random checkpoint of `family` (a FAMILIES key) into `out_dir` and return its path.

    `dtype` is the stored type of every float tensor (master projections, embedding,
    lm_head, norms, weight_scale); packed projections are always uint8. `head_dim`
    (default hidden_size / num_heads) may differ from that only for families whose
    config.json names it (falcon3-1.58). `vocab_size` (the embedding's row count)
    defaults to the tokenizer's size rounded up to the next multiple of 64 above it, so
    there are always rows the tokenizer does not cover. `rope_theta`, `rms_norm_eps`,
    `max_position_embeddings`, `dtype` and `tokenizer_vocab` default to the family's
    values. Safetensors files of an earlier run in `out_dir` are replaced.
    `added_tokens` (1bitllm only) also writes added_tokens.json and tokenizer_config.json's
    added_tokens_decoder (special and plain tokens, one beyond vocab_size) and a
    pad_token_id, the way fine-tuned checkpoints extend a SentencePiece vocabulary.
    `group_size` (group-scaled families, default the family's): values per scale along a row,
    0 for one scale per tensor; `binary`: their values are {-s, +s}, no zeros (1-bit Bonsai);
    `ternary_embeddings`: the embedding and lm_head are group-scaled like the projections (Ternary-Bonsai).
    `group_size` ROW_SCALES: one scale per row. `float_projections` (group-scaled families): ordinary
    float projections instead, a model of that architecture that is not ternary.
    """
    if family not in FAMILIES:
        raise OptionError(f"family {family!r}: choose one of {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    d = fam.defaults
    dtype = d["dtype"] if dtype is None else dtype
    tokenizer_vocab = d["tokenizer_vocab"] if tokenizer_vocab is None else tokenizer_vocab
    rope_theta = d["rope_theta"] if rope_theta is None else rope_theta
    rms_norm_eps = d["rms_norm_eps"] if rms_norm_eps is None else rms_norm_eps
    max_position_embeddings = d["max_position_embeddings"] if max_position_embeddings is None \
        else max_position_embeddings
    if dtype not in DTYPES:
        raise OptionError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for label, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                         ("num_layers", num_layers), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                         ("shards", shards), ("tokenizer_vocab", tokenizer_vocab)):
        _positive_int(label, value)
    for label, value in (("vocab_size", vocab_size), ("head_dim", head_dim)):
        if value is not None:
            _positive_int(label, value)
    head_dim = _check_shape(family, fam, hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    group_size = d.get("group_size", 0) if group_size is None else group_size
    if group_size and not fam.grouped:
        raise OptionError(f"group_size: only group-scaled families take it, not {family}")
    if (binary or ternary_embeddings or float_projections) and not fam.grouped:
        raise OptionError(f"binary, ternary_embeddings, float_projections: only group-scaled families take them, not {family}")
    if fam.grouped and group_size > 0 and (hidden_size % group_size or intermediate_size % group_size
                                       or (num_heads * head_dim) % group_size):
        raise OptionError(f"group_size {group_size} must divide every projection's row length")
    if added_tokens and fam.tokenizer != "sentencepiece":
        raise OptionError(f"added_tokens: only SentencePiece families take them, not {family}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = TOKENIZERS[fam.tokenizer]
    n_tokens, (bos_id, eos_id) = tokenizer(out, fam, tokenizer_vocab, seed, max_position_embeddings)
    if vocab_size is None:
        vocab_size = (n_tokens // VOCAB_MULTIPLE + 1) * VOCAB_MULTIPLE
    elif vocab_size < n_tokens:
        raise OptionError(f"vocab_size {vocab_size}: the tokenizer has {n_tokens} tokens, so it needs at least that")
    added = _added_tokens(n_tokens, vocab_size) if added_tokens else None
    if fam.tokenizer == "sentencepiece":
        _write_tokenizer_configs(out, max_position_embeddings, added)

    hp = Hparams(hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size,
                 max_position_embeddings, rms_norm_eps, rope_theta, dtype, bos_id, eos_id)
    specs = family_tensor_specs(fam, hp, group_size, binary, ternary_embeddings, float_projections)
    if shards > len(specs):
        raise OptionError(f"shards {shards}: the checkpoint has only {len(specs)} tensors")

    stale_files = [*out.glob("model*.safetensors"), *out.glob("model*.safetensors.partial"),
                   out / "model.safetensors.index.json"]
    for stale in stale_files:
        stale.unlink(missing_ok=True)

    sizes = [math.prod(shape) * ITEMSIZE[dt] for _, shape, _, dt in specs]
    shard_of = split_into_shards(sizes, shards)
    files = (["model.safetensors"] if shards == 1 else
             [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)])
    weight_map, total = {}, 0
    for k, fname in enumerate(files):
        # Within a file, safetensors orders tensors by name ("layers.10" before "layers.2").
        members = sorted((s for s, sh in zip(specs, shard_of) if sh == k), key=lambda s: s[0])
        entries = [(name, shape, _chunk_source(name, shape, role, seed, fam), dt) for name, shape, role, dt in members]
        total += write_safetensors(out / fname, entries, dtype)
        weight_map.update({name: fname for name, *_ in members})
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / "model.safetensors.index.json", index)

    if fam.pooling:  # sentence-transformers: the transformer, then the pooling module
        _write_json(out / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
        (out / "1_Pooling").mkdir(exist_ok=True)
        modes = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                 "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
        _write_json(out / "1_Pooling" / "config.json",
                    {"word_embedding_dimension": hidden_size, **{m: m == fam.pooling for m in modes},
                     "include_prompt": True})
    config = fam.config(hp)
    if added:
        config["pad_token_id"] = added["pad_token_id"]
    _write_json(out / "config.json", config)
    return out


def write_bitnet_checkpoint(out_dir, *, hidden_size=256, intermediate_size=512, num_layers=2,
                            num_heads=4, num_kv_heads=None, vocab_size=None, tokenizer_vocab=320,
                            dtype="f32", shards=1, seed=0, rope_theta=10000.0, rms_norm_eps=1e-5,
                            max_position_embeddings=2048, added_tokens=False) -> Path:
    """A 1bitLLM-style checkpoint (BitnetForCausalLM, master weights, SentencePiece): see write_checkpoint."""
    return write_checkpoint(out_dir, "1bitllm", hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                            vocab_size=vocab_size, tokenizer_vocab=tokenizer_vocab, dtype=dtype, shards=shards,
                            seed=seed, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
                            max_position_embeddings=max_position_embeddings, added_tokens=added_tokens)


def write_llama3_checkpoint(out_dir, **kw) -> Path:
    """An HF1BitLLM/Llama3-8B-1.58-style checkpoint: see write_checkpoint."""
    return write_checkpoint(out_dir, "llama3-1.58", **kw)


def write_falcon3_checkpoint(out_dir, **kw) -> Path:
    """A tiiuae/Falcon3-*-1.58bit-style checkpoint: see write_checkpoint."""
    return write_checkpoint(out_dir, "falcon3-1.58", **kw)


def write_2b4t_checkpoint(out_dir, **kw) -> Path:
    """A microsoft/bitnet-b1.58-2B-4T-style checkpoint (packed): see write_checkpoint."""
    return write_checkpoint(out_dir, "2b4t", **kw)


def write_2b4t_bf16_checkpoint(out_dir, **kw) -> Path:
    """A microsoft/bitnet-b1.58-2B-4T-bf16-style checkpoint (master weights): see write_checkpoint."""
    return write_checkpoint(out_dir, "2b4t-bf16", **kw)


def _chunk_source(name, shape, role, seed, family: Family) -> Callable[[], Iterator[np.ndarray]]:
    if role == "packed":
        return lambda: packed_chunks(name, shape, seed)
    if role == "weight_scale":
        return lambda: weight_scale_chunks(name, seed, family.weight_scale_range)
    if role.startswith("grouped:"):
        return lambda: grouped_chunks(name, shape, seed, int(role.split(":")[1]), role.endswith(":binary"))
    return lambda: tensor_chunks(name, shape, role, seed)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# -- tokenizer ----------------------------------------------------------------------------

_DETERMINERS = "the a this that every some one no each".split()
_ADJECTIVES = ("small red old quiet bright green cold warm long short happy busy slow quick dark "
               "heavy light young clever gentle strange simple early late round narrow wide").split()
_NOUNS = ("cat dog river house garden teacher window city road tree bird child letter market "
          "mountain boat story friend kitchen lamp morning evening table door forest village "
          "farmer painter song cloud stone bridge island train station book paper").split()
_VERBS = ("sees finds likes keeps opens carries follows watches builds paints reads writes "
          "brings holds moves visits remembers needs makes loves").split()
_INTRANSITIVE = "sleeps waits sings runs falls rests stays smiles listens wanders".split()
_PREPOSITIONS = "near under behind beside across through over into from with".split()
_ADVERBS = "slowly often quietly today again never always there soon suddenly".split()
_SYLLABLES = ("ka lo mir an ta ve ri son del bar en is or ul tha qua zen po fi gu "
              "nor sel vi dra mon ket bel wy xo jan").split()


def _noun_phrase(rng: random.Random, names: list[str]) -> str:
    if rng.random() < 0.15:
        return rng.choice(names)
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    return " ".join(words)


def demo_corpus(seed: int = 0, lines: int = 3000, names: int = 400) -> list[str]:
    """Generated English-like sentences. Nearly all lower case, so a small vocabulary
    still has room for merges; capitals other than a sentence's first determiner,
    digits and other characters are absent and reach the model through byte fallback.
    Made-up names (from syllables) give larger vocabularies something to learn."""
    # random.Random, not numpy: this is many small scalar draws, where numpy's
    # per-call overhead made corpus generation 20x slower.
    rng = random.Random(seed)
    name_list = ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(names)]
    out = []
    for _ in range(lines):
        subject = _noun_phrase(rng, name_list)
        if rng.random() < 0.6:
            words = [subject, rng.choice(_VERBS), _noun_phrase(rng, name_list)]
        else:
            words = [subject, rng.choice(_INTRANSITIVE)]
        if rng.random() < 0.4:
            words += [rng.choice(_PREPOSITIONS), _noun_phrase(rng, name_list)]
        if rng.random() < 0.3:
            words.append(rng.choice(_ADVERBS))
        sentence = " ".join(words)
        if rng.random() < 0.3 and subject.split()[0] in _DETERMINERS:
            sentence = sentence[0].upper() + sentence[1:]
        out.append(sentence + ("." if rng.random() < 0.9 else ", and then nothing."))
    return out


def train_sentencepiece_tokenizer(out_dir, vocab_size=320, seed=0) -> Path:
    """Train a llama-style SentencePiece BPE model on `demo_corpus` -> out_dir/tokenizer.model.

    Ids as in Llama/1bitLLM: <unk> 0, <s> 1, </s> 2, no pad; byte fallback (256
    <0xNN> pieces), so `vocab_size` must be at least 300. The corpus grows with
    `vocab_size`; up to about 50000 pieces can be learned (32000 takes ~1 s).
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise OptionError(f"tokenizer vocab_size {vocab_size}: needs at least 300 "
                          "(3 special and 256 byte pieces plus the corpus characters)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = demo_corpus(seed, lines=max(3000, 4 * vocab_size), names=max(400, 3 * vocab_size))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise OptionError(f"tokenizer vocab_size {vocab_size}: SentencePiece training failed ({e})") from None
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def _added_tokens(n_pieces: int, vocab_size: int) -> dict:
    """Extra tokens past the SentencePiece pieces: added_tokens.json entries and
    added_tokens_decoder entries (id -> content, special)."""
    if vocab_size < n_pieces + 4:
        raise OptionError(f"added_tokens needs vocab_size >= {n_pieces + 4} (the pieces plus 4 added tokens)")
    return {
        "json": {"<pad>": n_pieces, "extra\u2581word": n_pieces + 1},
        "decoder": {
            str(n_pieces): {"content": "<pad>", "special": True},
            str(n_pieces + 2): {"content": "<|im_start|>", "special": False},   # looks special
            str(n_pieces + 3): {"content": "two\u2581words", "special": False},  # plain, user-defined
            str(vocab_size + 5): {"content": "<beyond>", "special": True},      # outside the table
        },
        "pad_token_id": n_pieces,
    }


def _write_tokenizer_configs(out: Path, max_length: int, added: dict | None = None) -> None:
    for stale in (out / "added_tokens.json",):
        stale.unlink(missing_ok=True)
    if added:
        _write_json(out / "added_tokens.json", added["json"])
    _write_json(out / "tokenizer_config.json", {
        **({"added_tokens_decoder": {k: {**v, "lstrip": False, "rstrip": False, "normalized": False,
                                         "single_word": False} for k, v in added["decoder"].items()}}
           if added else {}),
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": max_length,
        "tokenizer_class": "LlamaTokenizer",
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})



def _sentencepiece_tokenizer(out: Path, family: Family, vocab_size: int, seed: int,
                             max_length: int) -> tuple[int, tuple[int, int]]:
    """tokenizer.model; returns (piece count, (bos id, eos id)). The JSON configs come later
    (they depend on vocab_size when there are added tokens)."""
    (out / "tokenizer.json").unlink(missing_ok=True)
    path = train_sentencepiece_tokenizer(out, vocab_size=vocab_size, seed=seed)
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    return sp.vocab_size(), (sp.bos_id(), sp.eos_id())


def _bpe_tokenizer(out: Path, family: Family, vocab_size: int, seed: int,
                   max_length: int) -> tuple[int, tuple[int, int]]:
    """tokenizer.json and tokenizer_config.json (bos/eos set to the family's special tokens);
    returns (token count including added tokens, (bos id, eos id))."""
    from tokenizers import Tokenizer

    from tests.bpe_tokenizer import train_bpe_tokenizer

    for stale in ("tokenizer.model", "special_tokens_map.json", "added_tokens.json"):
        (out / stale).unlink(missing_ok=True)
    train_bpe_tokenizer(out, vocab_size=vocab_size, seed=seed, **({"specials": family.specials}
                                                                   if family.specials else {}))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos, eos = family.special_tokens
    ids = tok.token_to_id(bos), tok.token_to_id(eos)
    if None in ids:
        raise RuntimeError(f"the BPE tokenizer has no {bos} or {eos} token")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    config |= {"bos_token": bos, "eos_token": eos, "model_max_length": max_length}
    _write_json(config_path, config)
    return tok.get_vocab_size(with_added_tokens=True), ids


def _gemma_tokenizer(out: Path, family: Family, vocab_size: int, seed: int,
                     max_length: int) -> tuple[int, tuple[int, int]]:
    """Gemma-style tokenizer.json (tests/bpe_tokenizer.py); returns (token count, (bos id, eos id))."""
    from tests.bpe_tokenizer import train_gemma_style_tokenizer

    for stale in ("tokenizer.model", "special_tokens_map.json", "added_tokens.json"):
        (out / stale).unlink(missing_ok=True)
    path = train_gemma_style_tokenizer(out, vocab_size=vocab_size, seed=seed)
    data = json.loads(path.read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    return max(ids.values()) + 1, (ids["<bos>"], ids["<eos>"])


TOKENIZERS = {"sentencepiece": _sentencepiece_tokenizer, "bpe": _bpe_tokenizer, "gemma-bpe": _gemma_tokenizer}


# -- command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = DEMO_DEFAULTS
    p = argparse.ArgumentParser(prog="python -m tests.synthetic",
                                description="Write a small random BitNet b1.58 checkpoint of one family "
                                            "(config.json, safetensors, tokenizer) into OUT_DIR.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--family", choices=list(FAMILIES), default="1bitllm")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help=f"float tensors (default: the family's; {d['dtype']} for 1bitllm, bf16 otherwise)")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--hidden-size", type=int, default=d["hidden_size"])
    p.add_argument("--intermediate-size", type=int, default=d["intermediate_size"])
    p.add_argument("--layers", dest="num_layers", type=int, default=d["num_layers"])
    p.add_argument("--heads", dest="num_heads", type=int, default=d["num_heads"])
    p.add_argument("--kv-heads", dest="num_kv_heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=None,
                   help="default: hidden size / heads (only falcon3-1.58 may differ)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="embedding rows (default: tokenizer size rounded up past a multiple of 64)")
    p.add_argument("--tokenizer-vocab", type=int, default=None,
                   help="tokenizer size (default: 320 SentencePiece pieces, 400 BPE tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope-theta", type=float, default=None, help="default: the family's")
    p.add_argument("--rms-norm-eps", type=float, default=None, help="default: the family's")
    p.add_argument("--max-position-embeddings", type=int, default=None, help="default: the family's")
    p.add_argument("--group-size", type=int, default=None,
                   help="bonsai, minicpm: values per scale along a row (default 128 / -1; 0: one scale per "
                        "tensor, -1: one per row)")
    p.add_argument("--binary", action="store_true",
                   help="bonsai: projections {-s, +s} with no zeros (1-bit Bonsai) instead of ternary")
    p.add_argument("--ternary-embeddings", action="store_true",
                   help="bonsai: the embedding and lm_head group-scaled like the projections (Ternary-Bonsai)")
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    out_dir, family = args.pop("out_dir"), args.pop("family")
    try:
        path = write_checkpoint(out_dir, family, **args)
    except OptionError as e:
        print(f"tests.synthetic: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- Qwen3.5 (llama.cpp arch qwen35): gated delta-net and full-attention layers ---------------------

# The projections a group-scaled ternary Qwen3.5 (Ternary-Bonsai-27B) holds as {-s, 0, +s} per group;
# in_proj_a / in_proj_b (one row per value head) are written as plain floats.
QWEN35_LINEAR_PROJECTIONS = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj")
QWEN35_ATTENTION_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
QWEN35_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_qwen35_checkpoint(out_dir, *, hidden_size=256, intermediate_size=512, num_layers=4,
                            full_attention_interval=4, num_heads=4, num_kv_heads=2, head_dim=64,
                            linear_key_heads=2, linear_value_heads=4, linear_key_head_dim=64,
                            linear_value_head_dim=64, conv_kernel=4, tied=False, conditional=False,
                            group_size=128, seed=0, tokenizer_vocab=400, vocab_size=None,
                            ternary_embeddings=False) -> Path:
    """A random Qwen3.5 text checkpoint (fp16) with the config keys and tensor names of Qwen/Qwen3.5-*:
    every `full_attention_interval`-th layer is full attention (q_proj twice as tall: query and its
    output gate, q/k norms), the others gated delta-net (`linear_attn.*`). Norms are stored as w with
    the model computing (1 + w) x, except linear_attn.norm. `conditional`: Qwen3_5ForConditionalGeneration
    layout (text config under `text_config`, tensors under `model.language_model.`, one vision tensor).
    `vocab_size`: the embedding's rows (default: the tokenizer's size rounded up past a multiple of 64);
    `ternary_embeddings`: the embedding and lm_head group-scaled like the projections (Ternary-Bonsai)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fam = FAMILIES["bonsai"]
    n_tokens, (bos_id, eos_id) = _bpe_tokenizer(out, fam, tokenizer_vocab, seed, 4096)
    vocab = vocab_size or (n_tokens // VOCAB_MULTIPLE + 1) * VOCAB_MULTIPLE
    if vocab < n_tokens:
        raise OptionError(f"vocab_size {vocab} is below the tokenizer's {n_tokens} tokens")
    h = hidden_size
    kinds = ["full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
             for i in range(num_layers)]
    text = {
        "model_type": "qwen3_5_text", "hidden_size": h, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "full_attention_interval": full_attention_interval, "layer_types": kinds,
        "linear_conv_kernel_dim": conv_kernel, "linear_key_head_dim": linear_key_head_dim,
        "linear_value_head_dim": linear_value_head_dim, "linear_num_key_heads": linear_key_heads,
        "linear_num_value_heads": linear_value_heads, "attn_output_gate": True, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        "tie_word_embeddings": tied, "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float16",
    }
    if conditional:
        config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
                  "text_config": text, "vision_config": {"hidden_size": 64, "depth": 1},
                  "tie_word_embeddings": tied}
    else:
        config = {"architectures": ["Qwen3_5ForCausalLM"], **text}
    prefix = "model.language_model." if conditional else "model."
    qk, v = linear_key_heads * linear_key_head_dim, linear_value_heads * linear_value_head_dim
    specs = [(prefix + "embed_tokens.weight", (vocab, h), "grouped" if ternary_embeddings else "embedding")]
    for b, kind in enumerate(kinds):
        p = f"{prefix}layers.{b}."
        specs += [(p + "input_layernorm.weight", (h,), "norm0"), (p + "post_attention_layernorm.weight", (h,), "norm0"),
                  (p + "mlp.gate_proj.weight", (intermediate_size, h), "grouped"),
                  (p + "mlp.up_proj.weight", (intermediate_size, h), "grouped"),
                  (p + "mlp.down_proj.weight", (h, intermediate_size), "grouped")]
        if kind == "linear_attention":
            a = p + "linear_attn."
            specs += [(a + "in_proj_qkv.weight", (2 * qk + v, h), "grouped"), (a + "in_proj_z.weight", (v, h), "grouped"),
                      (a + "in_proj_a.weight", (linear_value_heads, h), "attn"),
                      (a + "in_proj_b.weight", (linear_value_heads, h), "attn"),
                      (a + "conv1d.weight", (2 * qk + v, 1, conv_kernel), "attn"),
                      (a + "A_log", (linear_value_heads,), "attn"), (a + "dt_bias", (linear_value_heads,), "norm"),
                      (a + "norm.weight", (linear_value_head_dim,), "norm"),
                      (a + "out_proj.weight", (h, v), "grouped")]
        else:
            a = p + "self_attn."
            specs += [(a + "q_proj.weight", (2 * num_heads * head_dim, h), "grouped"),
                      (a + "k_proj.weight", (num_kv_heads * head_dim, h), "grouped"),
                      (a + "v_proj.weight", (num_kv_heads * head_dim, h), "grouped"),
                      (a + "o_proj.weight", (h, num_heads * head_dim), "grouped"),
                      (a + "q_norm.weight", (head_dim,), "norm0"), (a + "k_norm.weight", (head_dim,), "norm0")]
    specs.append((prefix + "norm.weight", (h,), "norm0"))
    if not tied:
        specs.append(("lm_head.weight", (vocab, h), "grouped" if ternary_embeddings else "head"))
    if conditional:  # what llama.cpp's text converter skips (its mmproj route converts it)
        specs.append(("model.visual.patch_embed.proj.weight", (64, 3 * 2 * 16 * 16), "attn"))

    def source(name, shape, role):
        if role == "grouped":
            return lambda: grouped_chunks(name, shape, seed, group_size)
        # (1 + w) norms hold small w; "norm" (a plain multiplier or a bias) stays near 1
        base = "attn" if role == "norm0" else role
        return lambda: tensor_chunks(name, shape, base, seed)

    for stale in out.glob("model*.safetensors"):
        stale.unlink()
    write_safetensors(out / "model.safetensors",
                      [(n, s, source(n, s, r)) for n, s, r in sorted(specs)], "f16")
    _write_json(out / "config.json", config)
    return out


# -- Maple (llama.cpp arch maple): a ternary mixture of experts with sliding-window layers ----------

MAPLE_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MAPLE_EXPERT = ("gate_proj", "up_proj", "down_proj")


def maple_layer_types(num_layers: int) -> list[str]:
    """Maple's 3:1 pattern: three sliding-window layers, then one global (full) attention layer."""
    return ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(num_layers)]


def write_maple_checkpoint(out_dir, *, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                           num_experts=4, experts_per_tok=2, moe_intermediate_size=256, sliding_window=8,
                           partial_rotary_factor=0.5, seed=0, tokenizer_vocab=400, shards=1,
                           leave_out: str | None = None, reshape: str | None = None) -> Path:
    """A random DeepGrove Maple-shaped checkpoint (MapleForCausalLM, bf16) with the config keys llama.cpp's
    converter reads (conversion/maple.py): `num_layers` layers in the 3:1 sliding / global pattern, q/k
    norms, a router (mlp.gate) and `num_experts` experts per layer, each its own gate/up/down tensors.
    Every linear weight (attention and experts) is {-s_r, 0, +s_r} with one scale per output row, as
    Maple's are; the embedding, router, norms and lm_head are ordinary floats.
    `leave_out`: a tensor name not written; `reshape`: a tensor written one row short (the refusals)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fam = FAMILIES["bonsai"]  # its BPE tokenizer
    n_tokens, (bos_id, eos_id) = _bpe_tokenizer(out, fam, tokenizer_vocab, seed, 4096)
    vocab = (n_tokens // VOCAB_MULTIPLE + 1) * VOCAB_MULTIPLE
    h, q_dim, kv_dim, ff = hidden_size, num_heads * head_dim, num_kv_heads * head_dim, moe_intermediate_size
    config = {
        "architectures": ["MapleForCausalLM"], "model_type": "maple", "hidden_size": h,
        "intermediate_size": ff, "moe_intermediate_size": ff, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "num_experts": num_experts, "num_experts_per_tok": experts_per_tok, "num_shared_experts": 0,
        "norm_topk_prob": True, "sliding_window": sliding_window, "layer_types": maple_layer_types(num_layers),
        "nope_on_global_attention": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial_rotary_factor},
        "tie_word_embeddings": False, "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "bfloat16",
    }
    shapes = {"self_attn.q_proj": (q_dim, h), "self_attn.k_proj": (kv_dim, h), "self_attn.v_proj": (kv_dim, h),
              "self_attn.o_proj": (h, q_dim), "gate_proj": (ff, h), "up_proj": (ff, h), "down_proj": (h, ff)}
    specs = [("model.embed_tokens.weight", (vocab, h), "embedding")]
    for b in range(num_layers):
        p = f"model.layers.{b}."
        specs += [(p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm"),
                  (p + "self_attn.q_norm.weight", (head_dim,), "norm"), (p + "self_attn.k_norm.weight", (head_dim,), "norm"),
                  (p + "mlp.gate.weight", (num_experts, h), "head")]
        specs += [(p + proj + ".weight", shapes[proj], "rows") for proj in MAPLE_ATTENTION]
        specs += [(f"{p}mlp.experts.{x}.{proj}.weight", shapes[proj], "rows")
                  for x in range(num_experts) for proj in MAPLE_EXPERT]
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (vocab, h), "head")]
    specs = [(n, (s[0] - 1, *s[1:]) if n == reshape else s, r) for n, s, r in specs if n != leave_out]

    def source(name, shape, role):
        if role == "rows":
            return lambda: grouped_chunks(name, shape, seed, ROW_SCALES)
        return lambda: tensor_chunks(name, shape, role, seed)

    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    specs.sort()
    sizes = [math.prod(s) * 2 for _, s, _ in specs]
    shard_of = split_into_shards(sizes, shards)
    files = ["model.safetensors"] if shards == 1 else [f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
                                                      for k in range(shards)]
    weight_map, total = {}, 0
    for k, fname in enumerate(files):
        members = [s for s, sh in zip(specs, shard_of) if sh == k]
        total += write_safetensors(out / fname, [(n, s, source(n, s, r)) for n, s, r in members], "bf16")
        weight_map.update({n: fname for n, *_ in members})
    if shards > 1:
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out / "config.json", config)
    return out
