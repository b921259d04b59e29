"""Run llama.cpp's convert_hf_to_gguf.py, naming the BPE pre-tokenizer for it.

llama.cpp's converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a
fixed text, and stops on a hash it does not know, which every tokenizer trained in a
test has. This wrapper (run with the converter's own Python) replaces that one lookup
with the name given on the command line and runs the converter unchanged otherwise:

    python tests/reference_convert.py SRC_DIR PRE_NAME convert-args...

SRC_DIR holds convert_hf_to_gguf.py, conversion/ and gguf-py/.
"""
import runpy
import sys
from pathlib import Path

src, pre, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
sys.path[:0] = [str(src), str(src / "gguf-py")]

import conversion.base  # noqa: E402  (after the path is set)

if pre != "-":
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [str(src / "convert_hf_to_gguf.py"), *args]
runpy.run_path(sys.argv[0], run_name="__main__")
