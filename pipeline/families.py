"""What we know about each supported checkpoint family, as data.

A family says which `config.json` it matches, which GGUF architecture it becomes,
how every Hugging Face tensor is renamed, which tensors are ternary projections,
and how the hyperparameters become GGUF metadata. Stages consult the `TensorPlan`
built from this table and never test the family by name.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.errors import CheckpointError

# Roles decide what quantize does with a tensor and which float type it keeps.
TERNARY = "ternary"      # absmean-quantized projection -> codes + one scale
EMBEDDING = "embedding"  # kept as F16 (llama.cpp does the same for TQ outputs)
NORM = "norm"            # 1-D, kept as F32

FLOAT_TYPE = {EMBEDDING: "f16", NORM: "f32"}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf: str                 # Hugging Face name, "{bid}" for the block number
    gguf: str               # GGUF name
    role: str
    shape: tuple[str, ...]  # dimension names, resolved from the config


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    description: str
    architectures: tuple[str, ...]
    gguf_arch: str
    tokenizer: str                       # "spm": SentencePiece tokenizer.model
    global_tensors: tuple[TensorRule, ...]   # before the blocks in the GGUF
    block_tensors: tuple[TensorRule, ...]
    trailing_tensors: tuple[TensorRule, ...]  # after the blocks (llama.cpp does not care about
                                              # order; a fixed one makes reruns byte-identical)
    # GGUF key suffix (after "{arch}.") -> (config key, GGUF value type)
    hparams: tuple[tuple[str, str, str], ...]
    # extra constant metadata (key suffix, value type, value)
    constants: tuple[tuple[str, str, object], ...] = ()
    required_config: tuple[str, ...] = ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "vocab_size", "max_position_embeddings")
    # checkpoint tensors that carry nothing the GGUF needs (recomputed by llama.cpp)
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    # tensors that mean the checkpoint is not this family, with the reason
    rejected: tuple[tuple[str, str], ...] = ()


_BITNET_BLOCK = (
    TensorRule("model.layers.{bid}.input_layernorm.weight", "blk.{bid}.attn_norm.weight", NORM, ("hidden",)),
    TensorRule("model.layers.{bid}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight", TERNARY, ("q_dim", "hidden")),
    TensorRule("model.layers.{bid}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight", TERNARY, ("kv_dim", "hidden")),
    TensorRule("model.layers.{bid}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight", TERNARY, ("kv_dim", "hidden")),
    TensorRule("model.layers.{bid}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight", TERNARY, ("hidden", "q_dim")),
    TensorRule("model.layers.{bid}.self_attn.inner_attn_ln.weight", "blk.{bid}.attn_sub_norm.weight", NORM, ("hidden",)),
    TensorRule("model.layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight", NORM, ("hidden",)),
    TensorRule("model.layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight", TERNARY, ("intermediate", "hidden")),
    TensorRule("model.layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight", TERNARY, ("intermediate", "hidden")),
    TensorRule("model.layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight", TERNARY, ("hidden", "intermediate")),
    TensorRule("model.layers.{bid}.mlp.ffn_layernorm.weight", "blk.{bid}.ffn_sub_norm.weight", NORM, ("intermediate",)),
)

_LLAMA_HPARAMS = (
    ("context_length", "max_position_embeddings", "uint32"),
    ("embedding_length", "hidden_size", "uint32"),
    ("block_count", "num_hidden_layers", "uint32"),
    ("feed_forward_length", "intermediate_size", "uint32"),
    ("attention.head_count", "num_attention_heads", "uint32"),
    ("attention.head_count_kv", "num_key_value_heads", "uint32"),
    ("rope.freq_base", "rope_theta", "float32"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps", "float32"),
    ("attention.key_length", "head_dim", "uint32"),
    ("attention.value_length", "head_dim", "uint32"),
)

FAMILIES = (
    Family(
        name="1bitllm",
        description="1bitLLM bitnet_b1_58 (BitnetForCausalLM, full-precision master weights)",
        architectures=("BitnetForCausalLM",),
        gguf_arch="bitnet",
        tokenizer="spm",
        global_tensors=(
            TensorRule("model.embed_tokens.weight", "token_embd.weight", EMBEDDING, ("vocab", "hidden")),
        ),
        block_tensors=_BITNET_BLOCK,
        trailing_tensors=(TensorRule("model.norm.weight", "output_norm.weight", NORM, ("hidden",)),),
        hparams=_LLAMA_HPARAMS,
        constants=(("rope.scaling.type", "string", "linear"), ("rope.scaling.factor", "float32", 1.0)),
        rejected=(("lm_head.weight", "an untied lm_head.weight, but GGUF arch bitnet ties the output to token_embd"),),
    ),
)


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    gguf_name: str
    role: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    family: Family
    config: dict
    tensors: tuple[PlannedTensor, ...]

    @property
    def arch(self) -> str:
        return self.family.gguf_arch


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory; pass the checkpoint directory (with config.json)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a Hugging Face checkpoint directory needs its config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def supported_summary() -> str:
    return "; ".join(f"{', '.join(f.architectures)} ({f.description})" for f in FAMILIES)


def detect_family(config: dict, config_path: Path) -> Family:
    archs = config.get("architectures") or []
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    shown = ", ".join(archs) if archs else "no 'architectures' entry"
    raise CheckpointError(f"{config_path}: architecture {shown} is not supported; supported: {supported_summary()}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _dims(config: dict, fam: Family, config_path: Path) -> dict[str, int]:
    bad = [k for k in fam.required_config if not _positive_int(config.get(k))]
    if bad:
        raise CheckpointError(f"{config_path}: {', '.join(bad)} must be positive integers "
                              f"(found {', '.join(repr(config.get(k)) for k in bad)})")
    if config.get("num_key_value_heads") is not None and not _positive_int(config["num_key_value_heads"]):
        raise CheckpointError(f"{config_path}: num_key_value_heads must be a positive integer")
    hidden = config["hidden_size"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or hidden // n_head
    if hidden % n_head or n_head % n_kv:
        raise CheckpointError(f"{config_path}: hidden_size {hidden}, num_attention_heads {n_head} and "
                              f"num_key_value_heads {n_kv} are inconsistent")
    return {"hidden": hidden, "intermediate": config["intermediate_size"], "vocab": config["vocab_size"],
            "q_dim": n_head * head_dim, "kv_dim": n_kv * head_dim, "layers": config["num_hidden_layers"]}


def plan_tensors(model_dir: Path) -> TensorPlan:
    """Read config.json, detect the family and list every tensor the GGUF will hold."""
    config = read_config(model_dir)
    config_path = model_dir / "config.json"
    fam = detect_family(config, config_path)
    dims = _dims(config, fam, config_path)
    tensors: list[PlannedTensor] = []

    def add(rule: TensorRule, bid: int | None = None) -> None:
        fmt = {"bid": bid} if bid is not None else {}
        tensors.append(PlannedTensor(rule.hf.format(**fmt), rule.gguf.format(**fmt), rule.role,
                                     tuple(dims[d] for d in rule.shape)))

    for rule in fam.global_tensors:
        add(rule)
    for bid in range(dims["layers"]):
        for rule in fam.block_tensors:
            add(rule, bid)
    for rule in fam.trailing_tensors:
        add(rule)
    return TensorPlan(fam, config, tuple(tensors))


def arch_metadata(plan: TensorPlan, config_path: Path) -> list[tuple[str, str, object]]:
    """(GGUF key, value type, value) for the architecture hyperparameters."""
    arch, config = plan.arch, plan.config
    out = []
    for suffix, cfg_key, vtype in plan.family.hparams:
        value = config.get(cfg_key)
        if value is None and cfg_key == "num_key_value_heads":
            value = config["num_attention_heads"]
        if value is None and cfg_key == "head_dim":  # transformers' LlamaConfig default
            value = config["hidden_size"] // config["num_attention_heads"]
        if value is None:
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (vtype == "uint32" and (not isinstance(value, int) or value < 0)):
            raise CheckpointError(f"{config_path}: {cfg_key} is {value!r}; expected "
                                  f"{'a non-negative integer' if vtype == 'uint32' else 'a number'}")
        out.append((f"{arch}.{suffix}", vtype, value))
    for suffix, vtype, value in plan.family.constants:
        out.append((f"{arch}.{suffix}", vtype, value))
    return out
