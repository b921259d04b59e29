"""What a fork server of llama.cpp's converter's Python imports besides torch and transformers.

tests/conftest.py `run_python_script` forks llama.cpp's convert_hf_to_gguf.py (directly or through
tests/reference_convert.py) from a server of that virtual environment's Python; importing the
converter's `conversion` package (every model class) and the gguf-py it ships took about 1.3 s of
CPU in each run. Here the server imports them once, from the source directory beside that
virtual environment (`make reference-converter`: DIR/venv/bin/python, DIR/src), then takes that
directory off sys.path again, so a child's sys.path is what its script makes it: the converter
puts gguf-py there itself, tests/reference_convert.py both. A Python without that layout imports
nothing here.
"""
import importlib
import pkgutil
import sys
from pathlib import Path

_SRC = Path(sys.executable).parent.parent.parent / "src"

if (_SRC / "conversion" / "base.py").is_file() and (_SRC / "gguf-py" / "gguf").is_dir():
    _added = [str(_SRC), str(_SRC / "gguf-py")]
    sys.path[:0] = _added
    try:
        import conversion
        import gguf  # noqa: F401

        for _module in pkgutil.iter_modules(conversion.__path__):
            importlib.import_module(f"conversion.{_module.name}")
    finally:
        for _path in _added:
            sys.path.remove(_path)
