"""Small Llama-3-style BPE tokenizers, trained on the spot with the `tokenizers` package.

The shape is Llama 3's tokenizer.json: a BPE model that ignores merges for words
already in the vocabulary, a pre-tokenizer that splits with Llama 3's regex and then
maps bytes to printable characters (ByteLevel without its own regex), a ByteLevel
decoder and a post-processor that puts <|begin_of_text|> first. Unlike Llama 3 the
special tokens get the first ids (the trainer puts them there).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

# Llama 3's pre-tokenizer regex, as its tokenizer.json has it (llama.cpp quotes it in
# src/llama-vocab.cpp as the original of its LLAMA3 pre-tokenizer).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_EXTRA_WORDS = ("café naïve über façade señor crème brûlée jalapeño smörgåsbord Zürich "
                "привет мир 你好 世界 東京 ☕ 🚀 🦙 😀 👍🏽 ✅").split()
_PUNCT = list(".,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`")


def _corpus(seed: int, lines: int) -> list[str]:
    from tests.synthetic import demo_corpus

    rng = random.Random(seed)
    out = demo_corpus(seed, lines=lines)
    for i in range(lines // 2):
        words = rng.sample(_EXTRA_WORDS, 3)
        number = str(rng.randint(0, 10 ** rng.randint(1, 9)))
        out.append(f"{out[i][:-1]} {words[0]} {number}{rng.choice(_PUNCT)} {words[1]}{rng.choice(_PUNCT)} "
                   f"it's {words[2]}\t{rng.randint(0, 99)}.{rng.randint(0, 99)}\n")
    return out


def train_bpe_tokenizer(out_dir: Path, vocab_size: int = 600, seed: int = 0, specials=SPECIALS,
                        chat_template=CHAT_TEMPLATE) -> Path:
    """Train a byte-level BPE tokenizer; write out_dir/tokenizer.json and
    tokenizer_config.json; return the tokenizer.json path.

    `specials[0]` is the BOS token (added in front of every encoding), `specials[1]`
    the EOS token; all of them are special added tokens with ids 0.. in order. The
    result depends only on the arguments (same bytes for the same seed).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if len(specials) < 2:
        raise ValueError("specials needs at least a BOS and an EOS token")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed, lines=max(2000, 4 * vocab_size)), trainer=trainer)
    bos = specials[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    path = out / "tokenizer.json"
    tok.save(str(path))
    decoder = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True} for s in specials}
    config = {
        "added_tokens_decoder": decoder,
        "add_bos_token": True,
        "bos_token": specials[0],
        "eos_token": specials[1],
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return path


GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")


def train_gemma_style_tokenizer(out_dir: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    """A SentencePiece-style BPE tokenizer.json as Gemma's (spaces as U+2581, byte fallback
    <0xHH> tokens in the vocabulary, <pad> <eos> <bos> <unk> first), plus an added token that is
    not special and one that is not in model.vocab; tokenizer_config.json names bos/eos."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(GEMMA_SPECIALS), show_progress=False)
    tok.train_from_iterator(_corpus(seed, lines=max(2000, 4 * vocab_size)), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    plain = next(t for t, i in sorted(vocab.items(), key=lambda kv: -kv[1]) if len(t) > 3 and not t.startswith("<"))
    data["added_tokens"] += [
        {"id": vocab[plain], "content": plain, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": True, "special": False},
        {"id": len(vocab), "content": "<image_soft_token>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
    ]
    path = out / "tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 32768,
        "tokenizer_class": "GemmaTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path
