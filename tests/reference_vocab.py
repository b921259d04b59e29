"""Run by llama.cpp's converter venv (tests/test_vocab.py): what llama.cpp's converter
makes of a BPE tokenizer directory, as JSON on stdout.

usage: python reference_vocab.py LLAMA_CPP_CONVERT_SRC MODEL_DIR VOCAB_SIZE

Calls the converter's own TextModel.get_vocab_base (tokens and types, through
transformers' AutoTokenizer) and get_vocab_base_pre (its chkhsh, read from its debug
log; None as the name when its table does not know the hash), and its gguf-py's
SpecialVocab(load_merges=True), on a stand-in object holding only what they read.
"""
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

src, model, vocab_size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, str(src))
sys.path.insert(1, str(src / "gguf-py"))

import gguf  # noqa: E402  (llama.cpp's gguf-py)
from conversion.base import TextModel  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

messages = []


class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())


log = logging.getLogger("hf-to-gguf")
log.setLevel(logging.DEBUG)
log.addHandler(Keep())

m = SimpleNamespace(dir_model=model, hparams={"vocab_size": vocab_size})
m.does_token_look_special = lambda t: TextModel.does_token_look_special(m, t)
try:
    pre = TextModel.get_vocab_base_pre(m, AutoTokenizer.from_pretrained(model))
except NotImplementedError:
    pre = None
chkhsh = next(msg.split(": ", 1)[1] for msg in messages if msg.startswith("chkhsh: "))
m.get_vocab_base_pre = lambda tokenizer: pre
tokens, types, _ = TextModel.get_vocab_base(m)
special = gguf.SpecialVocab(model, load_merges=True)
print(json.dumps({"chkhsh": chkhsh, "pre": pre, "tokens": tokens, "types": [int(t) for t in types],
                  "merges": special.merges, "special_ids": special.special_token_ids,
                  "add_special": special.add_special_token, "chat_template": special.chat_template}))
