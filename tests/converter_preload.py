"""What a fork server of llama.cpp's converter's Python imports besides torch and transformers.

tests/conftest.py `run_python_script` forks llama.cpp's convert_hf_to_gguf.py (directly or through
tests/reference_convert.py) from a server of that virtual environment's Python; importing the
converter's `conversion` package (conversion/base.py) and the gguf-py it ships took about 1.0 s of
CPU in each run. Here the server imports them once, from the source directory beside that
virtual environment (`make reference-converter`: DIR/venv/bin/python, DIR/src), then takes that
directory off sys.path again, so a child's sys.path is what its script makes it: the converter
puts gguf-py there itself, tests/reference_convert.py both. A Python without that layout imports
nothing here. The model modules (conversion/llama.py, ...) are left to the run, which imports the one
its architecture names, as it does on its own: importing all of them would register every model
class, in an order a run never sees.
"""
import sys
from pathlib import Path

_SRC = Path(sys.executable).parent.parent.parent / "src"

if (_SRC / "conversion" / "base.py").is_file() and (_SRC / "gguf-py" / "gguf").is_dir():
    _added = [str(_SRC), str(_SRC / "gguf-py")]
    sys.path[:0] = _added
    try:
        import conversion  # noqa: F401
        import gguf  # noqa: F401
    finally:
        for _path in _added:
            sys.path.remove(_path)
    import torch._dynamo  # noqa: F401
