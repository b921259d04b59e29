"""Small synthetic checkpoints of the 1bitLLM BitNet family, for tests and the demo.

`write_bitnet_checkpoint` lays out a directory the way 1bitLLM/bitnet_b1_58-large
does (config.json, safetensors master weights, SentencePiece tokenizer.model),
with random weights of a chosen shape, dtype (f32, f16, bf16) and shard count.
Every tensor is generated and written a row chunk at a time, so a 1 GiB
embedding costs a few MiB of memory. The same arguments give the same bytes.

    python -m tests.synthetic OUT_DIR [--dtype bf16] [--shards 3] [--hidden-size 512] ...
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

DTYPES = ("f32", "f16", "bf16")
SAFETENSORS_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}

CHUNK_ELEMS = 1 << 22  # float32 values generated at once (16 MiB)
VOCAB_MULTIPLE = 64


# -- values -----------------------------------------------------------------------------

# Role of a tensor -> (mean, base std). Projections get a small std so the absmean
# scale (~0.8 std) is far from 1 and a missing or misplaced scale shows up; norms
# scatter around 1 so a dropped or swapped norm changes the output.
VALUE_PROFILE = {
    "embedding": (0.0, 1.0),
    "norm": (1.0, 0.1),
    "attn": (0.0, 0.03),
    "ffn_in": (0.0, 0.04),
    "ffn_out": (0.0, 0.02),
}


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


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    round_bias = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + round_bias) >> 16).astype(np.uint16)


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the little-endian array whose bytes are stored for `dtype`."""
    if dtype == "bf16":
        return bf16_bits(values).astype("<u2", copy=False)
    return values.astype({"f32": "<f4", "f16": "<f2"}[dtype], copy=False)


# -- safetensors writer -------------------------------------------------------------------

TensorSpec = tuple[str, tuple[int, ...], Callable[[], Iterator[np.ndarray]]]


def write_safetensors(path: Path, tensors: list[TensorSpec], dtype: str) -> int:
    """Write one safetensors file, streaming each tensor's row blocks as they are made.

    `tensors` are (name, shape, chunks) with `chunks()` yielding float32 row blocks;
    everything is stored as `dtype`. Returns the number of data bytes. The file is
    written under a temporary name and renamed, so an interrupted run leaves no
    file that looks complete.
    """
    itemsize = ITEMSIZE[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, chunks in tensors:
            written = 0
            for block in chunks():
                data = encode(block, dtype)
                f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                written += data.nbytes
            begin, end = header[name]["data_offsets"]
            if written != end - begin:  # a bug here would silently shift every later tensor
                raise RuntimeError(f"{name}: generated {written} bytes, the header promised {end - begin}")
    os.replace(partial, path)
    return offset


# -- checkpoint layout --------------------------------------------------------------------

def bitnet_tensor_specs(hidden: int, intermediate: int, layers: int, kv_dim: int,
                        vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, role) of every tensor, in the order transformers saves them."""
    specs = [("model.embed_tokens.weight", (vocab, hidden), "embedding")]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,), "norm"),
            (p + "self_attn.q_proj.weight", (hidden, hidden), "attn"),
            (p + "self_attn.k_proj.weight", (kv_dim, hidden), "attn"),
            (p + "self_attn.v_proj.weight", (kv_dim, hidden), "attn"),
            (p + "self_attn.o_proj.weight", (hidden, hidden), "attn"),
            (p + "self_attn.inner_attn_ln.weight", (hidden,), "norm"),
            (p + "post_attention_layernorm.weight", (hidden,), "norm"),
            (p + "mlp.gate_proj.weight", (intermediate, hidden), "ffn_in"),
            (p + "mlp.up_proj.weight", (intermediate, hidden), "ffn_in"),
            (p + "mlp.down_proj.weight", (hidden, intermediate), "ffn_out"),
            (p + "mlp.ffn_layernorm.weight", (intermediate,), "norm"),
        ]
    specs.append(("model.norm.weight", (hidden,), "norm"))
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


def _llama_config(*, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, vocab_size,
                  max_position_embeddings, rms_norm_eps, rope_theta, dtype) -> dict:
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
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": TORCH_DTYPE[dtype],
        "transformers_version": "4.39.0",
        "use_cache": True,
        "vocab_size": vocab_size,
        "weight_bits": 1,
        "input_bits": 8,
    }


def write_bitnet_checkpoint(out_dir, *, hidden_size=256, intermediate_size=512, num_layers=2,
                            num_heads=4, num_kv_heads=None, vocab_size=None, tokenizer_vocab=320,
                            dtype="f32", shards=1, seed=0, rope_theta=10000.0, rms_norm_eps=1e-5,
                            max_position_embeddings=2048, added_tokens=False) -> Path:
    """Write a random 1bitLLM-style checkpoint into `out_dir` and return its path.

    `vocab_size` (the embedding's row count) defaults to the tokenizer's piece
    count rounded up to the next multiple of 64 above it, so there are always
    rows the tokenizer does not cover (the real model has 32000 pieces and 32002
    rows). Safetensors files of an earlier run in `out_dir` are replaced.
    `added_tokens` also writes added_tokens.json and tokenizer_config.json's
    added_tokens_decoder (special and plain tokens, one beyond vocab_size) and a
    pad_token_id, the way fine-tuned checkpoints extend a SentencePiece vocabulary.
    """
    if dtype not in DTYPES:
        raise OptionError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for label, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                         ("num_layers", num_layers), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                         ("shards", shards), ("tokenizer_vocab", tokenizer_vocab)):
        if not isinstance(value, int) or value < 1:
            raise OptionError(f"{label} must be a positive integer, not {value!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise OptionError(f"hidden_size {hidden_size}, num_heads {num_heads} and num_kv_heads {num_kv_heads}: "
                          "heads must divide hidden_size and kv heads must divide heads")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
        raise OptionError(f"vocab_size must be a positive integer, not {vocab_size!r}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = train_sentencepiece_tokenizer(out, vocab_size=tokenizer_vocab, seed=seed)
    n_pieces = _piece_count(tokenizer_path)
    if vocab_size is None:
        vocab_size = (n_pieces // VOCAB_MULTIPLE + 1) * VOCAB_MULTIPLE
    added = _added_tokens(n_pieces, vocab_size) if added_tokens else None
    _write_tokenizer_configs(out, max_position_embeddings, added)

    kv_dim = num_kv_heads * (hidden_size // num_heads)
    specs = bitnet_tensor_specs(hidden_size, intermediate_size, num_layers, kv_dim, vocab_size)
    if shards > len(specs):
        raise OptionError(f"shards {shards}: the checkpoint has only {len(specs)} tensors")

    stale_files = [*out.glob("model*.safetensors"), *out.glob("model*.safetensors.partial"),
                   out / "model.safetensors.index.json"]
    for stale in stale_files:
        stale.unlink(missing_ok=True)

    sizes = [math.prod(shape) * ITEMSIZE[dtype] for _, shape, _ in specs]
    shard_of = split_into_shards(sizes, shards)
    files = (["model.safetensors"] if shards == 1 else
             [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)])
    weight_map, total = {}, 0
    for k, fname in enumerate(files):
        # Within a file, safetensors orders tensors by name ("layers.10" before "layers.2").
        members = sorted((s for s, sh in zip(specs, shard_of) if sh == k), key=lambda s: s[0])
        entries = [(name, shape, _chunk_source(name, shape, role, seed)) for name, shape, role in members]
        total += write_safetensors(out / fname, entries, dtype)
        weight_map.update({name: fname for name, _, _ in members})
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / "model.safetensors.index.json", index)

    config = _llama_config(hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                           num_heads=num_heads, num_kv_heads=num_kv_heads, vocab_size=vocab_size,
                           max_position_embeddings=max_position_embeddings, rms_norm_eps=rms_norm_eps,
                           rope_theta=rope_theta, dtype=dtype)
    if added:
        config["pad_token_id"] = added["pad_token_id"]
    _write_json(out / "config.json", config)
    return out


def _chunk_source(name, shape, role, seed) -> Callable[[], Iterator[np.ndarray]]:
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


def _piece_count(path: Path) -> int:
    from sentencepiece import SentencePieceProcessor

    return SentencePieceProcessor(model_file=str(path)).vocab_size()


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


# -- command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = DEMO_DEFAULTS
    p = argparse.ArgumentParser(prog="python -m tests.synthetic",
                                description="Write a small random 1bitLLM BitNet b1.58 checkpoint "
                                            "(config.json, safetensors, tokenizer.model) into OUT_DIR.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--dtype", choices=DTYPES, default=d["dtype"])
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--hidden-size", type=int, default=d["hidden_size"])
    p.add_argument("--intermediate-size", type=int, default=d["intermediate_size"])
    p.add_argument("--layers", dest="num_layers", type=int, default=d["num_layers"])
    p.add_argument("--heads", dest="num_heads", type=int, default=d["num_heads"])
    p.add_argument("--kv-heads", dest="num_kv_heads", type=int, default=None, help="default: --heads")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="embedding rows (default: tokenizer pieces rounded up past a multiple of 64)")
    p.add_argument("--tokenizer-vocab", type=int, default=320, help="SentencePiece pieces")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--rms-norm-eps", type=float, default=1e-5)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    out_dir = args.pop("out_dir")
    try:
        path = write_bitnet_checkpoint(out_dir, **args)
    except OptionError as e:
        print(f"tests.synthetic: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
