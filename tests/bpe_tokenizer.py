"""PLACEHOLDER (helper `synth`): a small Llama-3-style byte-level BPE tokenizer for synthetic
checkpoints. Another branch writes the real version of this file; the lead reconciles the two.
Only `train_bpe_tokenizer(out_dir, vocab_size=..., seed=...)` is relied on by tests/synthetic.py.

The tokenizer follows the shape of Llama 3's tokenizer.json: BPE with ignore_merges, the
Llama 3 split regex followed by a ByteLevel step without its own regex, a ByteLevel decoder,
the specials <|begin_of_text|>, <|end_of_text|>, <|eot_id|>, and a post-processor that puts
<|begin_of_text|> in front of every sequence.
"""
from __future__ import annotations

import json
from pathlib import Path

# Llama 3's pre-tokenizer split pattern (its tokenizer.json, `Split` with behavior "Isolated").
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIALS = (BOS, EOS, EOT)


def train_bpe_tokenizer(out_dir, vocab_size: int = 400, seed: int = 0) -> Path:
    """Train on tests.synthetic.demo_corpus; write tokenizer.json and tokenizer_config.json.

    Returns the path of tokenizer.json. `vocab_size` counts the 256 byte tokens, the merges and
    the 3 specials (which the trainer puts at ids 0, 1, 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from tests.synthetic import demo_corpus

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(demo_corpus(seed, lines=max(3000, 4 * vocab_size)), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    path = out / "tokenizer.json"
    tok.save(str(path))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "clean_up_tokenization_spaces": True,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2) + "\n", encoding="utf-8")
    return path
