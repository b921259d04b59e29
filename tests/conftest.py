"""Shared helpers: build synthetic checkpoints, run the CLI as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_cli(*args, check_exit: int | None = 0, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = {**kw.pop("env", os.environ), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=kw.pop("cwd", None), timeout=timeout, **kw)
    if check_exit is not None and proc.returncode != check_exit:
        raise AssertionError(f"exit {proc.returncode} (wanted {check_exit})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def convert(model_dir: Path, out: Path, *extra, **kw) -> subprocess.CompletedProcess:
    return run_cli("convert", model_dir, "-o", out, "--no-progress", *extra, **kw)


# -- an independent reading of the source checkpoint (whole tensors: test-sized models only)
def read_source_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors as float32 numpy arrays, parsed from the safetensors bytes directly."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for fname in files:
        raw = (model_dir / fname).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            data = raw[8 + n + b: 8 + n + e]
            if info["dtype"] == "BF16":
                arr = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(data, {"F32": "<f4", "F16": "<f2"}[info["dtype"]]).astype(np.float32)
            out[name] = arr.reshape(info["shape"])
    return out


def absmean_reference(w: np.ndarray) -> np.ndarray:
    """BitNet b1.58 weight quantization (s = mean|W|, W' = clip(round(W/s), -1, 1) * s),
    in float32 the way llama.cpp's converter evaluates it: iscale = 1/s, W' = codes / iscale."""
    s = np.float32(max(np.abs(w.astype(np.float64)).mean(), 1e-5))
    iscale = np.float32(1) / s
    codes = np.clip(np.rint(w.astype(np.float32) * iscale), -1, 1).astype(np.float32)
    return codes / iscale


@pytest.fixture
def checkpoint(tmp_path):
    """Factory: checkpoint(**shape) -> directory of a fresh synthetic 1bitLLM checkpoint."""
    from tests.synthetic import write_bitnet_checkpoint

    counter = iter(range(1000))

    def make(**kw) -> Path:
        return write_bitnet_checkpoint(tmp_path / f"model{next(counter)}", **kw)
    return make


@pytest.fixture(scope="session")
def llama():
    """llama.cpp, the real client of our files (`make test` installs llama-cpp-python), run in a
    child process per evaluation (tests/llama_runtime.py: a native crash fails one test)."""
    import importlib.util

    from tests.llama_runtime import LlamaRuntime

    if os.environ.get("BITNET_GGUF_SKIP_LLAMA") == "1":
        pytest.skip("BITNET_GGUF_SKIP_LLAMA=1")
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed; `make test` installs it "
                    "(pip install -e '.[llama]'), or set BITNET_GGUF_SKIP_LLAMA=1 to skip these tests",
                    pytrace=False)
    return LlamaRuntime()
