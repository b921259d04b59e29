"""What we know about each supported checkpoint family, as data.

One `Family` record per row of the supported-checkpoints table says everything
the stages need: which `config.json` it matches (architecture and quantization
config), which GGUF architecture it becomes, how its projections are stored
(full-precision master weights, or packed uint8 codes with a `weight_scale`),
how the scale applies, whether llama's q/k row permutation applies, whether the
output head is tied, and how every Hugging Face tensor is renamed.

`plan_tensors` turns a family and a config into a `TensorPlan`: one
`PlannedTensor` per GGUF tensor (per expert of a stacked mixture-of-experts
tensor: the stages convert each expert as a tensor of its own), each with its
`Recipe` (where its values come from and which rows move). Stages dispatch on
the recipe and never test the family by name.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pipeline.errors import CheckpointError
from pipeline.gguf_file import float32_problem

# Roles decide what quantize does with a tensor and which float type it keeps.
TERNARY = "ternary"      # projection -> ternary codes + one scale
EMBEDDING = "embedding"  # token embedding, kept as F16 (as llama.cpp does for TQ outputs)
OUTPUT = "output"        # untied output head (lm_head), kept as F16 like the embedding
NORM = "norm"            # 1-D, kept as F32
FLOAT = "float"          # another 2-D float tensor (qwen35 ssm_alpha/beta): a float --type, else F16

# How a ternary projection is stored in the checkpoint and what its scale is.
MASTER = "master"   # float master weights: absmean scale, codes = clip(round(W / s), -1, 1)
PACKED = "packed"   # uint8 (out/4, in), 4 codes per byte in quarter layout, plus <name>_scale
GROUPED = "grouped"  # float weights already ternary: {-s, 0, +s} with one s per group of columns
SCALE_RULES = {
    "absmean": MASTER,   # s = max(mean|W|, 1e-5) over the whole tensor
    "divide": PACKED,    # BitLinear: W = codes / weight_scale
    "multiply": PACKED,  # AutoBitLinear (offline): W = codes * weight_scale
    "group": GROUPED,    # read from the data: each group of GROUP_COLUMNS values of a row is {-s, 0, +s}
}
# The finest group the data is checked at (every group size in use, 64 and 128, is a multiple):
# each run of 32 values of a row must hold at most one non-zero magnitude.
GROUP_COLUMNS = 32


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf: str                 # Hugging Face name, "{bid}" for the block number
    gguf: str               # GGUF name
    role: str
    shape: tuple[str, ...]  # dimension names, resolved from the config
    permute: str | None = None  # llama q/k row permutation by heads: "heads" or "kv_heads"
    offset: float = 0.0         # added to a norm's values (Gemma3: the runtime's RMSNorm multiplies by w)
    layer: str | None = None    # only in layers of this kind (config layer_types: qwen35's two kinds)
    transform: str | None = None  # a value transform of a small float tensor (see TRANSFORMS)
    reorder: str | None = None    # qwen35 V-head reorder (see _reorder)
    source_shape: tuple[str, ...] | None = None  # the checkpoint's shape, when it differs (conv1d [C, 1, K])
    # one checkpoint tensor per expert ("{xid}" in hf): the GGUF tensor `gguf` stacks them as
    # [n_expert, rows, cols]; each expert is planned (and converted) as a tensor of its own
    experts: bool = False


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    description: str
    architectures: tuple[str, ...]
    quantization: str | None             # None, "bitlinear" or "autobitlinear" (see quantization_kind)
    gguf_arch: str
    scale_rule: str                      # a key of SCALE_RULES, for every ternary projection
    permute_qk: bool                     # apply the TensorRule.permute of q/k (GGUF arch llama)
    output: str                          # "none": no lm_head allowed; "tied": token_embd is the head
                                         # (an lm_head is ignored only when config ties it);
                                         # "untied": lm_head -> output (absent only if config ties)
    runtime: str                         # who runs the files (README table)
    global_tensors: tuple[TensorRule, ...]   # before the blocks in the GGUF
    block_tensors: tuple[TensorRule, ...]
    trailing_tensors: tuple[TensorRule, ...]  # after the blocks (a fixed order makes reruns byte-identical)
    # GGUF key suffix (after "{arch}.") -> (config key or derived dimension, GGUF value type)
    hparams: tuple[tuple[str, str, str], ...]
    constants: tuple[tuple[str, str, object], ...] = ()
    required_config: tuple[str, ...] = ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "vocab_size", "max_position_embeddings")
    # config.json keys that must be positive numbers (the scalings a family's key/values derive from)
    required_numbers: tuple[str, ...] = ()
    # checkpoint tensors that carry nothing the GGUF needs (recomputed by the runtime)
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    # config.json keys that must hold these values for the row to match (a checkpoint whose
    # architecture and quantization_config are those of plain float models says so this way)
    config_markers: tuple[tuple[str, object], ...] = ()
    # checkpoint tensor name endings of which at least one must be present for the row to match
    # (the embedding models' per-projection norms: nothing in config.json says so); such a row is
    # tried before the others when the tensor names are known, and after them when they are not
    tensor_markers: tuple[str, ...] = ()
    norm_type: str = "f32"               # output type of the norms (an OUTPUT_TYPES key)
    # sentence-transformers pooling: {arch}.pooling_type from modules.json / <Pooling>/config.json
    pooling: bool = False
    eos_token: str | None = None         # tokenizer.ggml.eos_token_id is this token's id (an override)
    add_eos: bool | None = None          # tokenizer.ggml.add_eos_token set to this
    tokenizer_style: str | None = None   # how the tokenizer is written, when not by its files (pipeline/vocab.py)
    # qwen35: hyperparameters of the hybrid layers (derived dimensions, arrays); see _hybrid_dims
    hybrid: bool = False
    # checkpoint tensor name prefixes that are not part of the text model (skipped with a warning)
    skipped_prefixes: tuple[str, ...] = ()
    # maple: a mixture of experts with sliding-window layers (see _maple_dims)
    moe: bool = False

    def matches(self, config: dict, archs: list[str], quant: str | None, present: set[str] | None = None) -> bool:
        if self.tensor_markers and present is not None and not any(n.endswith(self.tensor_markers) for n in present):
            return False
        return (any(a in self.architectures for a in archs) and self.quantization == quant
                and all(config.get(k) == v for k, v in self.config_markers))

    @property
    def weights(self) -> str:
        return SCALE_RULES[self.scale_rule]


def _block(attn_sub_norm: str | None, ffn_sub_norm: str | None, permute: bool,
           qk_norm: bool = False) -> tuple[TensorRule, ...]:
    p = "model.layers.{bid}."
    rules = [
        TensorRule(p + "input_layernorm.weight", "blk.{bid}.attn_norm.weight", NORM, ("hidden",)),
        TensorRule(p + "self_attn.q_proj.weight", "blk.{bid}.attn_q.weight", TERNARY, ("q_dim", "hidden"),
                   "heads" if permute else None),
        TensorRule(p + "self_attn.k_proj.weight", "blk.{bid}.attn_k.weight", TERNARY, ("kv_dim", "hidden"),
                   "kv_heads" if permute else None),
        TensorRule(p + "self_attn.v_proj.weight", "blk.{bid}.attn_v.weight", TERNARY, ("kv_dim", "hidden")),
        TensorRule(p + "self_attn.o_proj.weight", "blk.{bid}.attn_output.weight", TERNARY, ("hidden", "q_dim")),
    ]
    if qk_norm:  # Qwen3: an RMSNorm over each head's q and k, before rope
        rules += [
            TensorRule(p + "self_attn.q_norm.weight", "blk.{bid}.attn_q_norm.weight", NORM, ("head_dim",)),
            TensorRule(p + "self_attn.k_norm.weight", "blk.{bid}.attn_k_norm.weight", NORM, ("head_dim",)),
        ]
    if attn_sub_norm:
        rules.append(TensorRule(p + f"self_attn.{attn_sub_norm}.weight", "blk.{bid}.attn_sub_norm.weight",
                                NORM, ("hidden",)))
    rules += [
        TensorRule(p + "post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight", NORM, ("hidden",)),
        TensorRule(p + "mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight", TERNARY, ("intermediate", "hidden")),
        TensorRule(p + "mlp.up_proj.weight", "blk.{bid}.ffn_up.weight", TERNARY, ("intermediate", "hidden")),
        TensorRule(p + "mlp.down_proj.weight", "blk.{bid}.ffn_down.weight", TERNARY, ("hidden", "intermediate")),
    ]
    if ffn_sub_norm:
        rules.append(TensorRule(p + f"mlp.{ffn_sub_norm}.weight", "blk.{bid}.ffn_sub_norm.weight",
                                NORM, ("intermediate",)))
    return tuple(rules)


# microsoft BitNet embedding models (utils/convert-bitnet-embedding-to-gguf.py, build_tensor_name_map,
# lines 36-87): Hugging Face names without the "model." prefix, an RMSNorm before every projection
# (<proj>.norm.weight, shaped as the projection's input) written as blk.N.<proj>_norm_in.weight
_PROJ_NORMS = (("self_attn.q_proj", "attn_q", "hidden"), ("self_attn.k_proj", "attn_k", "hidden"),
               ("self_attn.v_proj", "attn_v", "hidden"), ("self_attn.o_proj", "attn_output", "q_dim"),
               ("mlp.gate_proj", "ffn_gate", "hidden"), ("mlp.up_proj", "ffn_up", "hidden"),
               ("mlp.down_proj", "ffn_down", "intermediate"))


def _embedding_block(gemma: bool = False) -> tuple[TensorRule, ...]:
    """A block of a BitNet embedding model: the Qwen3 tensors, then the seven input norms. Gemma3's
    own norms (its RMSNorm scales by 1 + w; the converter writes w + 1, lines 610-618; not the input
    norms) are input_layernorm -> attn_norm, q/k norms, post_attention_layernorm ->
    post_attention_norm, pre_feedforward_layernorm -> ffn_norm, post_feedforward_layernorm ->
    post_ffw_norm (lines 80-85)."""
    rules = [dataclasses.replace(r, hf=r.hf.removeprefix("model."), offset=1.0 if gemma and r.role == NORM else 0.0)
             for r in _block(None, None, False, qk_norm=True)]
    if gemma:
        p, b = "layers.{bid}.", "blk.{bid}."
        rules = [r for r in rules if not r.hf.endswith("post_attention_layernorm.weight")]
        at = next(i for i, r in enumerate(rules) if r.gguf.endswith("ffn_gate.weight"))
        rules[at:at] = [TensorRule(p + "post_attention_layernorm.weight", b + "post_attention_norm.weight", NORM,
                                   ("hidden",), offset=1.0),
                        TensorRule(p + "pre_feedforward_layernorm.weight", b + "ffn_norm.weight", NORM, ("hidden",),
                                   offset=1.0)]
        rules.append(TensorRule(p + "post_feedforward_layernorm.weight", b + "post_ffw_norm.weight", NORM,
                                ("hidden",), offset=1.0))
    rules += [TensorRule(f"layers.{{bid}}.{hf}.norm.weight", f"blk.{{bid}}.{gguf}_norm_in.weight", NORM, (dim,))
              for hf, gguf, dim in _PROJ_NORMS]
    return tuple(rules)


# set_gguf_parameters, lines 339-392: the same keys for both backbones (context_length 32768 when absent)
_EMBEDDING_HPARAMS = (
    ("block_count", "num_hidden_layers", "uint32"),
    ("context_length", "max_position_embeddings", "uint32"),
    ("embedding_length", "hidden_size", "uint32"),
    ("feed_forward_length", "intermediate_size", "uint32"),
    ("attention.head_count", "num_attention_heads", "uint32"),
    ("attention.head_count_kv", "@kv_heads", "uint32"),
    ("vocab_size", "vocab_size", "uint32"),
    ("rope.dimension_count", "@head_dim", "uint32"),
    ("attention.key_length", "@head_dim", "uint32"),
    ("attention.value_length", "@head_dim", "uint32"),
    ("rope.freq_base", "rope_theta", "float32"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps", "float32"),
)


_EMBED = TensorRule("model.embed_tokens.weight", "token_embd.weight", EMBEDDING, ("vocab", "hidden"))
_OUTPUT_NORM = TensorRule("model.norm.weight", "output_norm.weight", NORM, ("hidden",))
_LM_HEAD = TensorRule("lm_head.weight", "output.weight", OUTPUT, ("vocab", "hidden"))

# (GGUF key suffix, config key or derived dimension, value type); "@name" is a derived dimension.
_COMMON_HPARAMS = (
    ("context_length", "max_position_embeddings", "uint32"),
    ("embedding_length", "hidden_size", "uint32"),
    ("block_count", "num_hidden_layers", "uint32"),
    ("feed_forward_length", "intermediate_size", "uint32"),
    ("attention.head_count", "num_attention_heads", "uint32"),
    ("attention.head_count_kv", "@kv_heads", "uint32"),
    ("rope.freq_base", "rope_theta", "float32"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps", "float32"),
)
_HEAD_LENGTHS = (
    ("attention.key_length", "@head_dim", "uint32"),
    ("attention.value_length", "@head_dim", "uint32"),
)
# written by llama.cpp's LlamaModel and by microsoft/BitNet's converter for bitnet-b1.58
_VOCAB_AND_ROPE_DIM = (
    ("vocab_size", "vocab_size", "uint32"),
    ("rope.dimension_count", "@head_dim", "uint32"),
)

# MiniCPM (llama.cpp conversion/minicpm.py, MiniCPMModel.set_gguf_parameters): three scalings derived
# from config.json. "=name" in an hparams row is one of these, computed from the config.
DERIVED = {  # named by their formula: a refusal of the value names the config.json keys it comes from
    "scale_depth / num_hidden_layers ** 0.5": lambda c: c["scale_depth"] / c["num_hidden_layers"] ** 0.5,
    "hidden_size / dim_model_base": lambda c: c["hidden_size"] / c["dim_model_base"],
}
_MINICPM_HPARAMS = _COMMON_HPARAMS + (
    ("embedding_scale", "scale_emb", "float32"),
    ("residual_scale", "=scale_depth / num_hidden_layers ** 0.5", "float32"),
    ("logit_scale", "=hidden_size / dim_model_base", "float32"),
)

_LLAMA_TENSORS = dict(global_tensors=(_EMBED,), block_tensors=_block(None, None, True),
                      trailing_tensors=(_OUTPUT_NORM, _LM_HEAD))
_LLAMA_HPARAMS = _COMMON_HPARAMS + _HEAD_LENGTHS + _VOCAB_AND_ROPE_DIM

_BITNET_2B_TENSORS = dict(global_tensors=(_EMBED,), block_tensors=_block("attn_sub_norm", "ffn_sub_norm", False),
                          trailing_tensors=(_OUTPUT_NORM,))

# Qwen3.5 (llama.cpp arch qwen35; its converter: conversion/qwen.py Qwen3_5TextModel, from
# Qwen3NextModel and _LinearAttentionVReorderBase): gated delta-net layers ("linear_attention") and
# full-attention layers, told apart by config layer_types. Every RMSNorm but linear_attn.norm computes
# (1 + w) x and is written as w + 1; A_log as -exp(A_log); conv1d [C, 1, K] as [C, K];
# the value heads reordered from grouped by key head to tiled (see _reorder). docs/notes/families.md s5.
def _qwen35_block() -> tuple[TensorRule, ...]:
    p, b, lin, full = "model.layers.{bid}.", "blk.{bid}.", "linear_attention", "full_attention"
    a = p + "linear_attn."
    return (
        TensorRule(p + "input_layernorm.weight", b + "attn_norm.weight", NORM, ("hidden",), transform="plus_one"),
        TensorRule(a + "A_log", b + "ssm_a", NORM, ("v_heads",), layer=lin, transform="neg_exp", reorder="heads"),
        TensorRule(a + "conv1d.weight", b + "ssm_conv1d.weight", NORM, ("conv_dim", "conv_kernel"), layer=lin,
                   reorder="qkv", source_shape=("conv_dim", "one", "conv_kernel")),
        TensorRule(a + "dt_bias", b + "ssm_dt.bias", NORM, ("v_heads",), layer=lin, reorder="heads"),
        TensorRule(a + "in_proj_a.weight", b + "ssm_alpha.weight", FLOAT, ("v_heads", "hidden"), layer=lin,
                   reorder="heads"),
        TensorRule(a + "in_proj_b.weight", b + "ssm_beta.weight", FLOAT, ("v_heads", "hidden"), layer=lin,
                   reorder="heads"),
        TensorRule(a + "in_proj_qkv.weight", b + "attn_qkv.weight", TERNARY, ("conv_dim", "hidden"), layer=lin,
                   reorder="qkv"),
        TensorRule(a + "in_proj_z.weight", b + "attn_gate.weight", TERNARY, ("v_dim", "hidden"), layer=lin,
                   reorder="v_rows"),
        TensorRule(a + "norm.weight", b + "ssm_norm.weight", NORM, ("v_head_dim",), layer=lin),
        TensorRule(a + "out_proj.weight", b + "ssm_out.weight", TERNARY, ("hidden", "v_dim"), layer=lin,
                   reorder="v_cols"),
        # full attention: q_proj holds each head's query and its output gate (twice q_dim rows)
        TensorRule(p + "self_attn.q_proj.weight", b + "attn_q.weight", TERNARY, ("q_gate_dim", "hidden"), layer=full),
        TensorRule(p + "self_attn.k_proj.weight", b + "attn_k.weight", TERNARY, ("kv_dim", "hidden"), layer=full),
        TensorRule(p + "self_attn.v_proj.weight", b + "attn_v.weight", TERNARY, ("kv_dim", "hidden"), layer=full),
        TensorRule(p + "self_attn.o_proj.weight", b + "attn_output.weight", TERNARY, ("hidden", "q_dim"), layer=full),
        TensorRule(p + "self_attn.q_norm.weight", b + "attn_q_norm.weight", NORM, ("head_dim",), layer=full,
                   transform="plus_one"),
        TensorRule(p + "self_attn.k_norm.weight", b + "attn_k_norm.weight", NORM, ("head_dim",), layer=full,
                   transform="plus_one"),
        TensorRule(p + "post_attention_layernorm.weight", b + "post_attention_norm.weight", NORM, ("hidden",),
                   transform="plus_one"),
        TensorRule(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", TERNARY, ("intermediate", "hidden")),
        TensorRule(p + "mlp.up_proj.weight", b + "ffn_up.weight", TERNARY, ("intermediate", "hidden")),
        TensorRule(p + "mlp.down_proj.weight", b + "ffn_down.weight", TERNARY, ("hidden", "intermediate")),
    )


# the first key/values llama.cpp's TextModel.set_gguf_parameters writes
_TEXT_MODEL_HPARAMS = (
    ("block_count", "num_hidden_layers", "uint32"),
    ("context_length", "max_position_embeddings", "uint32"),
    ("embedding_length", "hidden_size", "uint32"),
    ("feed_forward_length", "intermediate_size", "uint32"),
    ("attention.head_count", "num_attention_heads", "uint32"),
    ("attention.head_count_kv", "num_key_value_heads", "uint32"),
)
# in the order llama.cpp's converter writes them (TextModel, Qwen3NextModel, _Qwen35MRopeMixin)
_QWEN35_HPARAMS = _TEXT_MODEL_HPARAMS + (
    ("rope.dimension_sections", "@rope_sections", "array:int32"),
    ("rope.freq_base", "@rope_theta", "float32"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps", "float32"),
    ("attention.key_length", "head_dim", "uint32"),
    ("attention.value_length", "head_dim", "uint32"),
    ("ssm.conv_kernel", "linear_conv_kernel_dim", "uint32"),
    ("ssm.state_size", "linear_key_head_dim", "uint32"),
    ("ssm.group_count", "linear_num_key_heads", "uint32"),
    ("ssm.time_step_rank", "linear_num_value_heads", "uint32"),
    ("ssm.inner_size", "@v_dim", "uint32"),
    ("attention.recurrent_layers", "@recurrent_layers", "array:bool"),
    ("full_attention_interval", "@full_attention_interval", "uint32"),
    ("rope.dimension_count", "@rope_dim", "uint32"),
)

# DeepGrove Maple (llama.cpp arch maple; its converter: conversion/maple.py MapleModel): every layer
# has q/k norms and a mixture of experts whose per-expert projections the GGUF stacks into one
# [n_expert, rows, cols] tensor each; the router (mlp.gate) stays F32, as llama.cpp's converter keeps
# every ffn_gate_inp. No q/k permutation (NEOX rope). docs/notes/families.md, section 7.
def _maple_block() -> tuple[TensorRule, ...]:
    p, b, x = "model.layers.{bid}.", "blk.{bid}.", "model.layers.{bid}.mlp.experts.{xid}."
    return (
        TensorRule(p + "input_layernorm.weight", b + "attn_norm.weight", NORM, ("hidden",)),
        TensorRule(p + "self_attn.q_proj.weight", b + "attn_q.weight", TERNARY, ("q_dim", "hidden")),
        TensorRule(p + "self_attn.k_proj.weight", b + "attn_k.weight", TERNARY, ("kv_dim", "hidden")),
        TensorRule(p + "self_attn.v_proj.weight", b + "attn_v.weight", TERNARY, ("kv_dim", "hidden")),
        TensorRule(p + "self_attn.o_proj.weight", b + "attn_output.weight", TERNARY, ("hidden", "q_dim")),
        TensorRule(p + "self_attn.q_norm.weight", b + "attn_q_norm.weight", NORM, ("head_dim",)),
        TensorRule(p + "self_attn.k_norm.weight", b + "attn_k_norm.weight", NORM, ("head_dim",)),
        TensorRule(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", NORM, ("hidden",)),
        TensorRule(p + "mlp.gate.weight", b + "ffn_gate_inp.weight", NORM, ("experts", "hidden")),
        TensorRule(x + "gate_proj.weight", b + "ffn_gate_exps.weight", TERNARY, ("expert_ff", "hidden"), experts=True),
        TensorRule(x + "down_proj.weight", b + "ffn_down_exps.weight", TERNARY, ("hidden", "expert_ff"), experts=True),
        TensorRule(x + "up_proj.weight", b + "ffn_up_exps.weight", TERNARY, ("expert_ff", "hidden"), experts=True),
    )


# in the order llama.cpp's converter writes them (TextModel.set_gguf_parameters, then MapleModel's)
_MAPLE_HPARAMS = _TEXT_MODEL_HPARAMS + (
    ("rope.freq_base", "@rope_theta", "float32"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps", "float32"),
    ("expert_count", "num_experts", "uint32"),
    ("expert_used_count", "num_experts_per_tok", "uint32"),
    ("attention.key_length", "head_dim", "uint32"),
    ("attention.value_length", "head_dim", "uint32"),
    ("vocab_size", "vocab_size", "uint32"),
    ("rope.dimension_count", "@rope_dim", "uint32"),
    ("attention.sliding_window", "sliding_window", "uint32"),
    ("attention.sliding_window_pattern", "@sliding_layers", "array:bool"),
    ("expert_feed_forward_length", "moe_intermediate_size", "uint32"),
    ("swiglu_clamp_exp", "@swiglu_clamp", "array:float32"),
)
# a float checkpoint whose projections are ternary-valued (scales read from the data), untied head
_TERNARY_VALUED = dict(quantization=None, scale_rule="group", output="untied", runtime="llama.cpp",
                       global_tensors=(_EMBED,), trailing_tensors=(_OUTPUT_NORM, _LM_HEAD))
# the clamp of the experts' SwiGLU (modeling_maple.py; llama.cpp's converter writes it as a constant)
MAPLE_SWIGLU_CLAMP = 7.0

FAMILIES = (
    Family(
        # microsoft bitnet-embedding-0.6b (Qwen3-0.6B backbone): bf16 master weights (absmean), an
        # RMSNorm before every projection, no lm_head; the key/values and types of microsoft/BitNet's
        # utils/convert-bitnet-embedding-to-gguf.py (docs/notes/families.md, section 4)
        name="bitnet-embedding-qwen3",
        description="microsoft BitNet embedding model on Qwen3 (bf16 master weights with an RMSNorm before "
                    "every projection: bitnet-embedding-0.6b)",
        architectures=("Qwen3ForCausalLM", "Qwen3Model"),
        quantization=None,
        gguf_arch="qwen3",
        scale_rule="absmean",
        permute_qk=False,
        output="tied",
        runtime="microsoft/BitNet's llama.cpp fork (isHuangXin/llama.cpp, release-bitnet-embedding-0.6b-270m; "
                "not run here)",
        global_tensors=(dataclasses.replace(_EMBED, hf="embed_tokens.weight"),),
        block_tensors=_embedding_block(),
        trailing_tensors=(TensorRule("norm.weight", "output_norm.weight", NORM, ("hidden",)),),
        hparams=_EMBEDDING_HPARAMS,
        tensor_markers=tuple(f".{hf}.norm.weight" for hf, _, _ in _PROJ_NORMS),
        norm_type="f16",    # lines 608-627: norms (and *_norm_in) as float16 with --outtype f16 / i2_s
        pooling=True,       # lines 368-392
        eos_token="<|endoftext|>",  # lines 235-245: eos 151643 (<|endoftext|> in Qwen3's vocabulary), add_eos true
        add_eos=True,
    ),
    Family(
        # microsoft bitnet-embedding-270m (Gemma3 backbone): as above, with Gemma3's norms (w + 1,
        # post-attention and post-FFW norms) and its tokenizer.json written as a SentencePiece
        # vocabulary (lines 248-332); EOS as the tokenizer says
        name="bitnet-embedding-gemma3",
        description="microsoft BitNet embedding model on Gemma3 (bf16 master weights with an RMSNorm before "
                    "every projection: bitnet-embedding-270m)",
        architectures=("Gemma3ForCausalLM", "Gemma3TextModel"),
        quantization=None,
        gguf_arch="gemma3",
        scale_rule="absmean",
        permute_qk=False,
        output="tied",
        runtime="microsoft/BitNet's llama.cpp fork (isHuangXin/llama.cpp, release-bitnet-embedding-0.6b-270m; "
                "not run here)",
        global_tensors=(dataclasses.replace(_EMBED, hf="embed_tokens.weight"),),
        block_tensors=_embedding_block(gemma=True),
        trailing_tensors=(TensorRule("norm.weight", "output_norm.weight", NORM, ("hidden",), offset=1.0),),
        hparams=_EMBEDDING_HPARAMS,
        tensor_markers=tuple(f".{hf}.norm.weight" for hf, _, _ in _PROJ_NORMS),
        norm_type="f16",
        pooling=True,
        tokenizer_style="bpe-json-as-spm",
    ),
    Family(
        name="1bitllm",
        description="1bitLLM bitnet_b1_58 (BitnetForCausalLM, full-precision master weights)",
        architectures=("BitnetForCausalLM",),
        quantization=None,
        gguf_arch="bitnet",
        scale_rule="absmean",
        permute_qk=False,
        output="none",
        runtime="llama.cpp, bitnet.cpp",
        global_tensors=(_EMBED,),
        block_tensors=_block("inner_attn_ln", "ffn_layernorm", False),
        trailing_tensors=(_OUTPUT_NORM,),
        hparams=_COMMON_HPARAMS + _HEAD_LENGTHS,
        constants=(("rope.scaling.type", "string", "linear"), ("rope.scaling.factor", "float32", 1.0)),
    ),
    Family(
        name="llama-bitnet",
        description="packed BitNet Llama (LlamaForCausalLM + quant_method bitnet: HF1BitLLM Llama3-8B-1.58, "
                    "Falcon3-1.58bit, Falcon-E main revision, onebitllms quantize_to_1bit output)",
        architectures=("LlamaForCausalLM",),
        quantization="bitlinear",
        gguf_arch="llama",
        scale_rule="divide",
        permute_qk=True,
        output="untied",
        runtime="llama.cpp, bitnet.cpp",
        hparams=_LLAMA_HPARAMS,
        **_LLAMA_TENSORS,
    ),
    Family(
        # tiiuae Falcon-E `prequantized` revision (what onebitllms fine-tunes start from): a plain
        # Llama checkpoint whose projections are BitNet master weights; only its config's
        # is_bitnet_config says so (docs/notes/families.md)
        name="llama-bitnet-master",
        description="BitNet Llama master weights (LlamaForCausalLM with is_bitnet_config: true and no "
                    "quantization_config: Falcon-E prequantized revision)",
        architectures=("LlamaForCausalLM",),
        quantization=None,
        gguf_arch="llama",
        scale_rule="absmean",
        permute_qk=True,
        output="untied",
        runtime="llama.cpp, bitnet.cpp",
        hparams=_LLAMA_HPARAMS,
        config_markers=(("is_bitnet_config", True),),
        **_LLAMA_TENSORS,
    ),
    Family(
        # PrismML Ternary-Bonsai (Qwen3, "unpacked" fp16): every projection's values are {-s, 0, +s}
        # with one s per group of 128 columns; nothing in config.json says so, the data does
        # (docs/notes/families.md, section 3)
        name="qwen3-ternary",
        description="group-scaled ternary Qwen3 (Qwen3ForCausalLM with ternary float projections, one scale "
                    "per group of columns: PrismML Ternary-Bonsai unpacked)",
        architectures=("Qwen3ForCausalLM",),
        quantization=None,
        gguf_arch="qwen3",
        scale_rule="group",
        permute_qk=False,
        output="untied",
        runtime="llama.cpp",
        global_tensors=(_EMBED,),
        block_tensors=_block(None, None, False, qk_norm=True),
        trailing_tensors=(_OUTPUT_NORM, _LM_HEAD),
        hparams=_COMMON_HPARAMS + _HEAD_LENGTHS,
    ),
    Family(
        # PrismML Ternary-Bonsai-27B (Qwen3.5, unpacked): group-scaled ternary projections as for
        # qwen3-ternary, in the hybrid gated delta-net / full-attention architecture
        name="qwen35-ternary",
        description="group-scaled ternary Qwen3.5 (Qwen3_5ForCausalLM or the text model of "
                    "Qwen3_5ForConditionalGeneration, ternary float projections with one scale per group: "
                    "PrismML Ternary-Bonsai-27B unpacked)",
        architectures=("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"),
        quantization=None,
        gguf_arch="qwen35",
        scale_rule="group",
        permute_qk=False,
        output="untied",
        runtime="llama.cpp",
        global_tensors=(_EMBED,),
        block_tensors=_qwen35_block(),
        trailing_tensors=(dataclasses.replace(_OUTPUT_NORM, transform="plus_one"), _LM_HEAD),
        hparams=_QWEN35_HPARAMS,
        required_config=("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                         "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                         "linear_num_key_heads", "linear_num_value_heads"),
        hybrid=True,
        # the vision tower (llama.cpp's mmproj route) and the multi-token-prediction layers (its --no-mtp)
        skipped_prefixes=("model.visual.", "visual.", "mtp.", "model.mtp."),
    ),
    Family(
        # OpenBMB BitCPM4 / BitCPM-CANN (MiniCPM4 architecture): bf16 projections whose values are
        # ternary, with one scale per tensor, per row or per group of columns, read from the data as
        # for Ternary-Bonsai; names, key/values and q/k permutation as llama.cpp's MiniCPMModel
        # (docs/notes/families.md, section 6)
        name="minicpm-ternary",
        description="ternary-valued MiniCPM (MiniCPMForCausalLM whose float projections are {-s, 0, +s} per "
                    "tensor, row or group: OpenBMB BitCPM4, BitCPM-CANN)",
        architectures=("MiniCPMForCausalLM",),
        quantization=None,
        gguf_arch="minicpm",
        scale_rule="group",
        permute_qk=True,
        output="untied",
        runtime="llama.cpp",
        global_tensors=(_EMBED,),
        block_tensors=_block(None, None, True),
        trailing_tensors=(_OUTPUT_NORM, _LM_HEAD),
        hparams=_MINICPM_HPARAMS,
        required_numbers=("scale_emb", "scale_depth", "dim_model_base"),
    ),
    Family(
        # DeepGrove Maple 20B-A1B: bf16 projections (attention and every expert's) whose values are
        # {-s, 0, +s} with one s per row, read from the data; 256 experts per layer stacked per GGUF tensor
        name="maple-ternary",
        description="ternary-valued Maple mixture of experts (MapleForCausalLM whose float projections are "
                    "{-s, 0, +s} per row: DeepGrove Maple 20B-A1B)",
        architectures=("MapleForCausalLM",),
        gguf_arch="maple",
        permute_qk=False,
        block_tensors=_maple_block(),
        **_TERNARY_VALUED,
        hparams=_MAPLE_HPARAMS,
        required_config=("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                         "max_position_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                         "sliding_window"),
        moe=True,
    ),
    Family(
        name="bitnet-2b4t",
        description="microsoft bitnet-b1.58-2B-4T (BitNetForCausalLM, packed, AutoBitLinear)",
        architectures=("BitNetForCausalLM",),
        quantization="autobitlinear",
        gguf_arch="bitnet-b1.58",
        scale_rule="multiply",
        permute_qk=False,
        output="tied",
        runtime="bitnet.cpp only (relu² FFN; upstream llama.cpp refuses the arch)",
        hparams=_COMMON_HPARAMS + _VOCAB_AND_ROPE_DIM,
        **_BITNET_2B_TENSORS,
    ),
    Family(
        name="bitnet-2b4t-bf16",
        description="microsoft bitnet-b1.58-2B-4T-bf16 (BitNetForCausalLM, bf16 master weights)",
        architectures=("BitNetForCausalLM",),
        quantization=None,
        gguf_arch="bitnet-b1.58",
        scale_rule="absmean",
        permute_qk=False,
        output="tied",
        runtime="bitnet.cpp only (relu² FFN; upstream llama.cpp refuses the arch)",
        hparams=_COMMON_HPARAMS + _VOCAB_AND_ROPE_DIM,
        **_BITNET_2B_TENSORS,
    ),
)


# -- per-tensor recipes -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Recipe:
    """Where one tensor's values come from and which rows move, as plain data (stored in the
    extract store's attributes, so quantize and verify read the same recipe)."""
    role: str
    weights: str = MASTER          # MASTER or PACKED (ternary tensors only)
    scale_rule: str | None = None  # a key of SCALE_RULES for ternary tensors
    permute_heads: int = 0         # llama q/k permutation over this many heads (0: none)
    row_multiple: int = 1          # a chunk of output rows must hold whole multiples of this
    weight_scale: float | None = None  # packed: the checkpoint's weight_scale (float32 value)
    offset: float = 0.0            # norms: added to the values (Gemma3's RMSNorm scales by 1 + w)
    transform: str | None = None   # a key of TRANSFORMS (small float tensors, done whole in quantize)
    # qwen35 V-head reorder: (axis, first index, key heads, value heads per key head, head size); the
    # indices from `first` on go from grouped by key head to tiled order (apply_reorder)
    reorder: tuple[int, ...] | None = None
    source_shape: tuple[int, ...] | None = None  # the checkpoint's shape when it is not the GGUF's

    def as_json(self) -> dict:
        # what dataclasses.asdict gives (every field is a number, text, None or a tuple of numbers),
        # without its recursive deep copy: asked several times a tensor by every stage
        return {name: getattr(self, name) for name in _RECIPE_FIELDS}

    @classmethod
    def from_json(cls, data: dict) -> "Recipe":
        data = {k: tuple(v) if k in ("reorder", "source_shape") and v is not None else v for k, v in data.items()}
        return cls(**data)

    @property
    def rewritten(self) -> bool:
        """Whether a float tensor's values are not the checkpoint's bytes in their order (quantize
        writes them whole: every such tensor is small, a norm, conv1d, A_log, dt_bias, ssm_alpha/beta)."""
        return self.transform is not None or self.reorder is not None or self.source_shape is not None

    @property
    def packed(self) -> bool:
        return self.weights == PACKED


_RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    gguf_name: str
    role: str
    shape: tuple[int, ...]          # the GGUF tensor's shape (numpy order, rows first)
    recipe: Recipe
    # an expert of a stacked GGUF tensor: (its name, this expert's index, number of experts); the
    # stack's shape is (number of experts, *shape) and its bytes the experts' in order
    stack: tuple[str, int, int] | None = None

    @property
    def source_shape(self) -> tuple[int, ...]:
        """Shape of the tensor as stored in the checkpoint."""
        if self.recipe.packed:
            return (self.shape[0] // 4, *self.shape[1:])
        return self.recipe.source_shape or self.shape

    @property
    def scale_hf_name(self) -> str | None:
        """The checkpoint tensor holding a packed projection's weight_scale."""
        return self.hf_name.removesuffix(".weight") + ".weight_scale" if self.recipe.packed else None


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    family: Family
    config: dict
    dims: dict[str, int]
    tensors: tuple[PlannedTensor, ...]
    skipped: tuple[str, ...] = ()   # checkpoint tensors left out on purpose (family skipped_prefixes)

    @property
    def arch(self) -> str:
        return self.family.gguf_arch


# Value transforms of small float tensors, as llama.cpp's converter makes them: it computes in the
# checkpoint's dtype when that is F16 (torch keeps float16) and in float32 otherwise (it casts BF16 up
# first), so an F16 source's result is rounded to float16 once.
TRANSFORMS = {
    "plus_one": lambda x: x + np.float32(1),      # RMSNorm computing (1 + w) x
    "neg_exp": lambda x: -np.exp(x),              # gated delta-net decay: A = -exp(A_log)
}


def apply_transform(name: str | None, values: np.ndarray, source_dtype: str) -> np.ndarray:
    """float32 values after TRANSFORMS[name] (`values`: float32 from the checkpoint)."""
    if name is None:
        return values
    out = TRANSFORMS[name](values.astype(np.float32))
    if source_dtype == "F16":
        out = out.astype(np.float16).astype(np.float32)
    return out.astype(np.float32)


def reorder_index(reorder: tuple[int, ...], n: int) -> np.ndarray:
    """Source index of each output index along the reordered axis (length n): from `first` on, the
    value heads go from grouped by key head (k, r) to tiled (r, k), each `head` values long."""
    _axis, first, n_k, per_k, head = reorder
    tail = np.arange(n - first).reshape(n_k, per_k, head).transpose(1, 0, 2).reshape(-1)
    return np.concatenate([np.arange(first), first + tail])


def apply_reorder(reorder: tuple[int, ...] | None, values: np.ndarray) -> np.ndarray:
    if reorder is None:
        return values
    axis = reorder[0] if values.ndim > 1 else 0
    return np.take(values, reorder_index(reorder, values.shape[axis]), axis=axis)


def source_row_runs(reorder: tuple[int, ...] | None, start: int, stop: int, n_rows: int) -> list[tuple[int, int]]:
    """Contiguous source row ranges holding output rows [start, stop) of a row-reordered tensor, in
    output order (each value head is contiguous in the source, so a run is at least a head long)."""
    if reorder is None or reorder[0] != 0:
        return [(start, stop)]
    idx = reorder_index(reorder, n_rows)[start:stop]
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(idx, breaks)]


# -- reading and checking config.json ----------------------------------------------------------

MAX_CONFIG_BYTES = 4 * 1024**2


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory; pass the checkpoint directory (with config.json)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a Hugging Face checkpoint directory needs its config.json")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:  # parsed whole, at about 12x its size
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes; a model's config.json is a few kilobytes "
                                  f"(at most {MAX_CONFIG_BYTES // 1024**2} MiB are read); this is not one")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def supported_summary() -> str:
    return "; ".join(f.description for f in FAMILIES)


def quantization_kind(config: dict, config_path: Path) -> str | None:
    """None (master weights), "bitlinear" or "autobitlinear", from `quantization_config`.

    Anything else (another quant_method, online AutoBitLinear, an RMSNorm inside each
    BitLinear, modules left unconverted other than lm_head) has no GGUF mapping here.
    """
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{config_path}: quantization_config must be a JSON object, not {q!r:.60}")
    method = q.get("quant_method")
    if method != "bitnet":
        raise CheckpointError(f"{config_path}: quantization_config.quant_method {method!r} is not supported; "
                              "only BitNet checkpoints (quant_method \"bitnet\") convert")
    if q.get("use_rms_norm"):
        raise CheckpointError(f"{config_path}: quantization_config.use_rms_norm is true (an RMSNorm inside every "
                              "BitLinear); GGUF runtimes have no slot for it, so this checkpoint cannot convert")
    skipped = q.get("modules_to_not_convert")
    if skipped is not None and (not isinstance(skipped, list) or any(m != "lm_head" for m in skipped)):
        raise CheckpointError(f"{config_path}: quantization_config.modules_to_not_convert {skipped!r}: only "
                              "lm_head may stay unquantized; other full-precision projections are not supported")
    linear = q.get("linear_class", "bitlinear")
    if linear in (None, "bitlinear"):
        return "bitlinear"
    if linear == "autobitlinear":
        mode = q.get("quantization_mode", "offline")
        if mode != "offline":
            raise CheckpointError(f"{config_path}: quantization_config.quantization_mode {mode!r} is not supported; "
                                  "only \"offline\" (packed ternary weights) converts")
        return "autobitlinear"
    raise CheckpointError(f"{config_path}: quantization_config.linear_class {linear!r} is not supported "
                          "(known: bitlinear, autobitlinear)")


# Architectures we know and do not convert, with why (one line each); checked before the rows.
_QWEN35MOE = "Qwen3.5 MoE (GGUF arch qwen35moe) is not supported (dense Qwen3.5, arch qwen35, is)"
KNOWN_UNSUPPORTED = {"Qwen3_5MoeForCausalLM": _QWEN35MOE, "Qwen3_5MoeForConditionalGeneration": _QWEN35MOE}

# A checkpoint whose weights live in a rotated basis (Ternary Bonsai 2: Walsh-Hadamard): no GGUF
# runtime applies the rotation, so its projections would be used as if unrotated.
_ROTATION_WORDS = ("hadamard",)


def _rotation_marker(config, present: set[str] | None) -> str | None:
    """The first config key or string value, or tensor name, that marks a rotated basis."""
    stack = [("", config)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if any(w in str(k).lower() for w in _ROTATION_WORDS):
                    return f"config key {where + str(k)!r}"
                stack.append((f"{where}{k}.", v))
        elif isinstance(value, list):
            stack.extend((where, v) for v in value)
        elif isinstance(value, str) and any(w in value.lower() for w in _ROTATION_WORDS):
            return f"config value {value[:60]!r} (under {where.rstrip('.') or 'the top level'})"
    for name in sorted(present or ()):
        if any(w in name.lower() for w in _ROTATION_WORDS):
            return f"tensor {name!r}"
    return None


def detect_family(config: dict, config_path: Path, present: set[str] | None = None) -> Family:
    archs = config.get("architectures")
    if archs is None:
        archs = []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"{config_path}: 'architectures' must be a list of names, not {archs!r:.60}")
    if (marker := _rotation_marker(config, present)) is not None:
        raise CheckpointError(f"{config_path}: {marker} marks weights in a Hadamard-rotated basis (Ternary "
                              "Bonsai 2); no GGUF runtime undoes the rotation, so this checkpoint is not supported")
    for a in archs:
        if a in KNOWN_UNSUPPORTED:
            raise CheckpointError(f"{config_path}: {KNOWN_UNSUPPORTED[a]}; supported: {supported_summary()}")
    quant = quantization_kind(config, config_path)
    known_arch = False
    marked = [f for f in FAMILIES if f.tensor_markers]
    unmarked = [f for f in FAMILIES if not f.tensor_markers]
    for fam in (marked + unmarked if present is not None else unmarked + marked):
        if any(a in fam.architectures for a in archs):
            known_arch = True
            if fam.matches(config, archs, quant, present):
                return fam
    shown = ", ".join(archs) if archs else "no 'architectures' entry"
    if known_arch:
        what = f"with quantization {quant}" if quant else "without a BitNet quantization_config"
        if archs == ["LlamaForCausalLM"] and quant is None:
            raise CheckpointError(f"{config_path}: a LlamaForCausalLM checkpoint without quantization_config "
                                  "(quant_method \"bitnet\") or \"is_bitnet_config\": true is not a BitNet model "
                                  "(if its projections are BitNet master weights, such as Falcon-E's prequantized "
                                  "revision, add \"is_bitnet_config\": true to config.json); supported: "
                                  f"{supported_summary()}")
        raise CheckpointError(f"{config_path}: architecture {shown} {what} is not supported; "
                              f"supported: {supported_summary()}")
    raise CheckpointError(f"{config_path}: architecture {shown} is not supported; supported: {supported_summary()}")


# what config.json calls each dimension, for messages
_DIM_KEYS = {"hidden": "hidden_size", "intermediate": "intermediate_size", "vocab": "vocab_size",
             "q_dim": "num_attention_heads x head_dim", "kv_dim": "num_key_value_heads x head_dim",
             "layers": "num_hidden_layers", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
             "head_dim": "head_dim"}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# Far beyond any real model, small enough that planning stays cheap (the plan lists every tensor).
MAX_LAYERS = 10_000
MAX_DIM = 1 << 24


def _dims(config: dict, fam: Family, config_path: Path) -> dict[str, int]:
    bad = [k for k in fam.required_config if not _positive_int(config.get(k))]
    if bad:
        raise CheckpointError(f"{config_path}: {', '.join(bad)} must be positive integers "
                              f"(found {', '.join(repr(config.get(k)) for k in bad)})")
    bad = [k for k in fam.required_numbers
           if not (isinstance(config.get(k), (int, float)) and not isinstance(config[k], bool)
                   and 0 < config[k] < float("inf"))]
    if bad:
        raise CheckpointError(f"{config_path}: {', '.join(bad)} must be positive numbers "
                              f"(found {', '.join(repr(config.get(k)) for k in bad)}); {fam.name} derives its "
                              "scalings from them")
    for key in ("num_key_value_heads", "head_dim"):
        if config.get(key) is not None and not _positive_int(config[key]):
            raise CheckpointError(f"{config_path}: {key} must be a positive integer, not {config[key]!r}")
    if config["num_hidden_layers"] > MAX_LAYERS:
        raise CheckpointError(f"{config_path}: num_hidden_layers {config['num_hidden_layers']} is not plausible "
                              f"(more than {MAX_LAYERS})")
    hidden = config["hidden_size"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or hidden // n_head
    if (config.get("head_dim") is None and hidden % n_head) or n_head % n_kv:
        raise CheckpointError(f"{config_path}: hidden_size {hidden}, num_attention_heads {n_head} and "
                              f"num_key_value_heads {n_kv} are inconsistent")
    dims = {"hidden": hidden, "intermediate": config.get("intermediate_size") or 0, "vocab": config["vocab_size"],
            "q_dim": n_head * head_dim, "kv_dim": n_kv * head_dim, "layers": config["num_hidden_layers"],
            "heads": n_head, "kv_heads": n_kv, "head_dim": head_dim}
    too_big = [k for k, v in dims.items() if v > MAX_DIM]
    if too_big:
        raise CheckpointError(f"{config_path}: {_DIM_KEYS[too_big[0]]} {dims[too_big[0]]} is not plausible "
                              f"(more than {MAX_DIM})")
    if fam.permute_qk and head_dim % 2:
        raise CheckpointError(f"{config_path}: head dimension {head_dim} is odd; rotary embeddings need an even one")
    return dims


def _check_rope_scaling(config: dict, config_path: Path) -> None:
    scaling = config.get("rope_scaling")
    if scaling is None:
        return
    if isinstance(scaling, dict) and scaling.get("type", scaling.get("rope_type")) == "linear" \
            and scaling.get("factor") == 1.0:
        return  # the identity
    raise CheckpointError(f"{config_path}: rope_scaling {json.dumps(scaling)[:80]} is not supported "
                          "(only checkpoints without rope scaling convert)")


def _check_flags(config: dict, config_path: Path) -> None:
    tied = config.get("tie_word_embeddings")
    if tied is not None and not isinstance(tied, bool):
        raise CheckpointError(f"{config_path}: tie_word_embeddings must be true or false, not {tied!r:.40}")


def _tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", False))


LAYER_KINDS = ("linear_attention", "full_attention")


def _hybrid_dims(config: dict, dims: dict, config_path: Path) -> dict:
    """qwen35's further dimensions and key values: the layer kinds (config layer_types, else every
    full_attention_interval-th layer full, as transformers' Qwen3.5 config does), the gated delta-net
    sizes, rope (only the default rope type: interleaved MRoPE sections, partial rotary factor)."""
    n_k, n_v = config["linear_num_key_heads"], config["linear_num_value_heads"]
    dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
    if n_v % n_k:
        raise CheckpointError(f"{config_path}: linear_num_value_heads {n_v} is not a multiple of "
                              f"linear_num_key_heads {n_k}")
    interval = config.get("full_attention_interval", 4)
    if not _positive_int(interval):
        raise CheckpointError(f"{config_path}: full_attention_interval must be a positive integer, not {interval!r}")
    kinds = config.get("layer_types")
    n_layer = dims["layers"]
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != n_layer
                              or any(k not in LAYER_KINDS for k in kinds)):
        raise CheckpointError(f"{config_path}: layer_types must list {n_layer} entries, each one of "
                              f"{', '.join(LAYER_KINDS)}")
    layer_kinds = kinds or [LAYER_KINDS[(i + 1) % interval == 0] for i in range(n_layer)]
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{config_path}: rope_parameters {json.dumps(rope)[:80]} is not supported (only the "
                              "default rope type converts)")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25))
    sections = rope.get("mrope_section", [11, 11, 10])
    if not isinstance(sections, list) or not all(_positive_int(v) or v == 0 for v in sections):
        raise CheckpointError(f"{config_path}: rope_parameters.mrope_section must be a list of whole numbers")
    if not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise CheckpointError(f"{config_path}: partial_rotary_factor must be in (0, 1], not {partial!r}")
    if dv % GROUP_COLUMNS:  # out_proj's columns move by whole value heads: whole groups of the scan
        raise CheckpointError(f"{config_path}: linear_value_head_dim {dv} is not a multiple of {GROUP_COLUMNS}")
    return {"v_heads": n_v, "v_head_dim": dv, "v_dim": n_v * dv, "conv_dim": 2 * n_k * dk + n_v * dv,
            "conv_kernel": config["linear_conv_kernel_dim"], "one": 1, "q_gate_dim": 2 * dims["q_dim"],
            "layer_kinds": layer_kinds, "full_attention_interval": interval,
            "recurrent_layers": [k == "linear_attention" for k in kinds] if kinds is not None else None,
            "rope_sections": (list(sections) + [0, 0, 0, 0])[:4],
            "rope_theta": rope.get("rope_theta", config.get("rope_theta")),
            "rope_dim": int(dims["head_dim"] * partial),
            "reorder": {"qkv": (0, 2 * n_k * dk, n_k, n_v // n_k, dv), "v_rows": (0, 0, n_k, n_v // n_k, dv),
                        "heads": (0, 0, n_k, n_v // n_k, 1), "v_cols": (1, 0, n_k, n_v // n_k, dv)}
            if n_k != n_v else {}}


MAPLE_LAYER_KINDS = ("sliding_attention", "full_attention")
# config.json keys of a separate rope base for the sliding-window layers (llama.cpp's converter writes
# rope.freq_base_swa from them); not written here yet, so refused rather than dropped
_LOCAL_ROPE_KEYS = ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                    "rope_local_base_freq")


def _maple_dims(config: dict, dims: dict, config_path: Path) -> dict:
    """Maple's further dimensions and key values, refusing what llama.cpp's converter asserts against
    (conversion/maple.py: silu, no shared experts, normalized top-k, NoPE on the global layers)."""
    checks = (("hidden_act", "silu"), ("num_shared_experts", 0), ("norm_topk_prob", True),
              ("nope_on_global_attention", True))
    defaults = {"num_shared_experts": 0, "norm_topk_prob": True, "nope_on_global_attention": False}
    for key, want in checks:
        if config.get(key, defaults.get(key)) != want:
            raise CheckpointError(f"{config_path}: {key} is {config.get(key, defaults.get(key))!r:.40}; GGUF arch maple "
                                  f"(llama.cpp) implements only {json.dumps(want)}, so this checkpoint is not supported")
    n_layer, n_expert, used = dims["layers"], config["num_experts"], config["num_experts_per_tok"]
    if used > n_expert:
        raise CheckpointError(f"{config_path}: num_experts_per_tok {used} is more than num_experts {n_expert}")
    kinds = config.get("layer_types")
    if not isinstance(kinds, list) or len(kinds) != n_layer or any(k not in MAPLE_LAYER_KINDS for k in kinds):
        raise CheckpointError(f"{config_path}: layer_types must list {n_layer} entries, each one of "
                              f"{', '.join(MAPLE_LAYER_KINDS)}")
    local = [k for k in _LOCAL_ROPE_KEYS if k in config]
    rope = config.get("rope_parameters") or {}
    if local or not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" \
            or "sliding_attention" in rope or "full_attention" in rope:
        shown = local[0] if local else f"rope_parameters {json.dumps(rope)[:80]}"
        raise CheckpointError(f"{config_path}: {shown} is not supported (only the default rope type, one rope "
                              "base for every layer, converts)")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise CheckpointError(f"{config_path}: partial_rotary_factor must be in (0, 1], not {partial!r}")
    return {"experts": n_expert, "expert_ff": config["moe_intermediate_size"],
            "rope_theta": rope.get("rope_theta", config.get("rope_theta")),
            "rope_dim": int(dims["head_dim"] * partial),
            "sliding_layers": [k == "sliding_attention" for k in kinds],
            "swiglu_clamp": [MAPLE_SWIGLU_CLAMP] * n_layer}


def plan_tensors(model_dir: Path, present: set[str] | None = None) -> TensorPlan:
    """Read config.json, detect the family and list every tensor the GGUF will hold.

    `present`: names of the checkpoint's tensors, when known, to decide whether an
    untied family's output head comes from lm_head.weight.
    """
    config = read_config(model_dir)
    config_path = model_dir / "config.json"
    fam = detect_family(config, config_path, present)
    prefix = "model."
    if fam.hybrid and isinstance(config.get("text_config"), dict):
        # Qwen3_5ForConditionalGeneration: the text model's config and tensors (llama.cpp's converter
        # lifts text_config to the top and drops "language_model." from the names)
        config, prefix = {**config, **config["text_config"]}, "model.language_model."
    dims = _dims(config, fam, config_path)
    if fam.hybrid:
        dims = {**dims, **_hybrid_dims(config, dims, config_path)}
    if fam.moe:
        dims = {**dims, **_maple_dims(config, dims, config_path)}
    _check_rope_scaling(config, config_path)
    _check_flags(config, config_path)
    tensors: list[PlannedTensor] = []

    def add(rule: TensorRule, bid: int | None = None) -> None:
        fmt = {"bid": bid} if bid is not None else {}
        shape = tuple(dims[d] for d in rule.shape)
        extra = dict(transform=rule.transform, reorder=dims.get("reorder", {}).get(rule.reorder),
                     source_shape=tuple(dims[d] for d in rule.source_shape) if rule.source_shape else None)
        recipe = Recipe(rule.role, offset=rule.offset, **extra)
        if rule.role == TERNARY:
            heads = dims[rule.permute] if rule.permute and fam.permute_qk else 0
            row_multiple = shape[0] // heads if heads else 1
            recipe = Recipe(TERNARY, fam.weights, fam.scale_rule, heads, row_multiple, reorder=extra["reorder"])
        if rule.experts:  # one tensor per expert, each a slice of the stacked GGUF tensor
            stack, n = rule.gguf.format(**fmt), dims["experts"]
            tensors.extend(PlannedTensor(rule.hf.format(**fmt, xid=x), expert_name(stack, x), rule.role, shape, recipe,
                                         (stack, x, n)) for x in range(n))
            return
        hf = rule.hf.format(**fmt)
        if hf.startswith("model."):
            hf = prefix + hf.removeprefix("model.")
        tensors.append(PlannedTensor(hf, rule.gguf.format(**fmt), rule.role, shape, recipe))

    for rule in fam.global_tensors:
        add(rule)
    for bid in range(dims["layers"]):
        for rule in fam.block_tensors:
            if rule.layer is None or rule.layer == dims["layer_kinds"][bid]:
                add(rule, bid)
    for rule in fam.trailing_tensors:
        if rule.role == OUTPUT and _tied(config) and (present is None or rule.hf not in present):
            continue  # tied: the runtime uses token_embd as the head
        add(rule)
    skipped = tuple(sorted(n for n in present or () if n.startswith(fam.skipped_prefixes))) \
        if fam.skipped_prefixes else ()
    return TensorPlan(fam, config, dims, tuple(tensors), skipped)


def expert_name(stack: str, expert: int) -> str:
    """The name an expert's tensor has in the run directory's stores (its GGUF tensor is `stack`)."""
    return f"{stack}.{expert}"


def _config_value(plan: TensorPlan, key: str):
    if key.startswith("@"):
        return plan.dims[key[1:]]
    if key.startswith("="):
        return DERIVED[key[1:]](plan.config)
    return plan.config.get(key)


def arch_metadata(plan: TensorPlan, config_path: Path) -> list[tuple[str, str, object]]:
    """(GGUF key, value type, value) for the architecture hyperparameters, checked so that
    nothing unrepresentable or meaningless reaches the file."""
    arch = plan.arch
    out = []
    for suffix, cfg_key, vtype in plan.family.hparams:
        value = _config_value(plan, cfg_key)
        if value is None:
            continue
        cfg_key = cfg_key.lstrip("@=")  # as config.json names it (a dimension, or a formula of its keys)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if vtype.startswith("array:"):
            pass  # derived and checked by the family (_hybrid_dims)
        elif vtype == "uint32":
            if not numeric or not isinstance(value, int) or not 0 <= value < 2**32:
                raise CheckpointError(f"{config_path}: {cfg_key} is {value!r}; expected a whole number "
                                      "from 0 to 4294967295")
        elif vtype == "float32":
            # the file holds a float32: a value it rounds to 0, a subnormal or infinity would be
            # written as another number than config.json's (rms_norm_eps 1e-60 as 0.0)
            problem = float32_problem(value) if numeric else "is not a number"
            if problem is None and not value > 0:
                problem = "is not positive"
            if problem:
                raise CheckpointError(f"{config_path}: {cfg_key} is {value!r:.40}: it {problem}; GGUF stores it as a "
                                      "float32: give a positive number from 1.2e-38 to 3.4e38")
        out.append((f"{arch}.{suffix}", vtype, value))
    for suffix, vtype, value in plan.family.constants:
        out.append((f"{arch}.{suffix}", vtype, value))
    if plan.family.pooling:
        out.append((f"{arch}.pooling_type", "uint32", pooling_type(config_path.parent)))
    return out


# sentence-transformers' Pooling config key -> llama.cpp's LLAMA_POOLING_TYPE (gguf.PoolingType), checked
# in this order as microsoft/BitNet's embedding converter does (set_gguf_parameters, lines 381-386)
POOLING_MODES = (("pooling_mode_mean_tokens", 1), ("pooling_mode_cls_token", 2), ("pooling_mode_lasttoken", 3))


def pooling_type(model_dir: Path) -> int:
    """The pooling of a sentence-transformers model directory: modules.json's first *Pooling module's
    config.json. Refused when absent or unknown (the converter it follows would guess MEAN, which
    is wrong for last-token models: the embeddings would silently differ)."""
    path = model_dir / "modules.json"
    advice = "an embedding model needs sentence-transformers' modules.json and its Pooling module's config.json"
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {advice} to tell its pooling") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({str(e).splitlines()[0][:120]})") from None
    pooling = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")] \
        if isinstance(modules, list) else []
    if not pooling or not isinstance(pooling[0].get("path"), str):
        raise CheckpointError(f"{path}: no Pooling module (with a path); {advice}")
    sub = model_dir / pooling[0]["path"]
    if model_dir.resolve() not in (sub / "config.json").resolve().parents:
        raise CheckpointError(f"{path}: the Pooling module's path {pooling[0]['path']!r} leaves the model directory")
    try:
        config = json.loads((sub / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{sub / 'config.json'}: missing; {advice}") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{sub / 'config.json'}: cannot read it as JSON ({str(e).splitlines()[0][:120]})") \
            from None
    for key, value in POOLING_MODES:
        if isinstance(config, dict) and config.get(key):
            return value
    raise CheckpointError(f"{sub / 'config.json'}: none of {', '.join(k for k, _ in POOLING_MODES)} is true; "
                          "the pooling cannot be written")
