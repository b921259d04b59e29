"""The tests' llama.cpp runner (tests/llama_runtime.py) isolates native crashes and loads
every model without extra buffer types (the AMX Q8_0 crash, ggml-org/llama.cpp #20824)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT, convert
from tests.llama_runtime import LlamaCrashed, LlamaRuntime

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.synthetic import write_bitnet_checkpoint

    root = tmp_path_factory.mktemp("runtime")
    model = write_bitnet_checkpoint(root / "model", hidden_size=256, intermediate_size=512, num_layers=1,
                                    num_heads=2)
    out = root / "tiny.gguf"
    convert(model, out, "--embedding-type", "q8_0")
    return out


def test_models_load_without_extra_buffer_types(llama, tiny_gguf):
    """What keeps Q8_0 matrices off llama.cpp's AMX buffer type on CPUs that have AMX."""
    assert llama.load(tiny_gguf) == {"use_extra_bufts": False}
    assert llama.logits(tiny_gguf, [1, 2, 3]).shape[0] == 3


def test_a_native_crash_fails_the_call_naming_the_signal(llama, tiny_gguf, monkeypatch):
    monkeypatch.setenv("BITNET_GGUF_TEST_LLAMA_CRASH", "logits")
    with pytest.raises(LlamaCrashed, match=r"killed by SIGSEGV during logits of .*tiny\.gguf"):
        llama.logits(tiny_gguf, [1, 2, 3])


def test_a_crashing_test_fails_alone_and_the_suite_ends_with_its_summary(llama, tiny_gguf, tmp_path):
    """What `make test` does when llama.cpp segfaults: one failed test, then pytest's summary line."""
    (tmp_path / "test_crash.py").write_text(textwrap.dedent(f"""
        import os
        from pathlib import Path
        from tests.llama_runtime import LlamaRuntime

        def test_crashes():
            os.environ["BITNET_GGUF_TEST_LLAMA_CRASH"] = "logits"
            try:
                LlamaRuntime().logits(Path({str(tiny_gguf)!r}), [1, 2, 3])
            finally:
                del os.environ["BITNET_GGUF_TEST_LLAMA_CRASH"]

        def test_runs_after_it():
            assert LlamaRuntime().logits(Path({str(tiny_gguf)!r}), [1, 2]).shape[0] == 2
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT),
                                                                             "PATH": "/usr/bin:/bin"},
                          timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert "1 failed, 1 passed" in last, proc.stdout
    assert "LlamaCrashed" in proc.stdout and "SIGSEGV" in proc.stdout, proc.stdout


def test_a_native_crash_in_a_forked_evaluation_ends_only_that_child(llama, tiny_gguf, tmp_path):
    """Evaluations are forked from a server with llama_cpp imported (tests/conftest.py
    `run_python_script`): a crash there ends the child, not the server, which serves the next one."""
    import json
    import os
    import signal

    from tests.conftest import ForkServers

    env = {**os.environ, "PYTHONPATH": str(ROOT), "BITNET_GGUF_TEST_LLAMA_CRASH": "logits"}
    servers = ForkServers(sys.executable, "numpy,llama_cpp", env)
    script, request, result = ROOT / "tests" / "llama_runtime.py", tmp_path / "request.json", tmp_path / "result.json"
    try:
        request.write_text(json.dumps({"op": "logits", "path": str(tiny_gguf), "tokens": [1, 2, 3], "n_ctx": 64}))
        crashed = servers.run([str(request), str(tmp_path)], env, ROOT, 300, script=str(script))
        assert crashed.returncode == -signal.SIGSEGV and not result.exists(), crashed
        assert "Fatal Python error: Segmentation fault" in crashed.stderr, crashed.stderr
        request.write_text(json.dumps({"op": "load", "path": str(tiny_gguf), "n_ctx": 64}))
        loaded = servers.run([str(request), str(tmp_path)], env, ROOT, 300, script=str(script))
        assert loaded.returncode == 0, loaded.stderr
        assert json.loads(result.read_text()) == {"use_extra_bufts": False}
    finally:
        servers.stop()
