"""The one place the tests run llama.cpp: each evaluation in a child process of its own.

llama.cpp (llama-cpp-python, built from its sdist on the machine) is the real client our
files must work in, and it is native code: when it crashes, it takes its process with it.
Run in the pytest process, one segmentation fault ended the whole suite without a summary
line. Here every load runs in `python -m tests.llama_runtime`, so a crash fails the one test
that caused it, naming the signal and the file, and the suite goes on.

Every model is loaded with `use_extra_bufts = False` (llama.cpp's `--no-repack`): with extra
buffer types on, llama.cpp moves Q8_0 matrices to its AMX buffer type on CPUs with AMX
(Sapphire Rapids and later), whose mat-mul segfaults there (ggml-org/llama.cpp issue #20824,
"segfault in ggml_backend_amx_mul_mat"; a Q8_0 file from llama.cpp's own converter crashes
the same way). Repacking changes the layout llama.cpp computes from, never the values in the
file, so the logits checks keep their tolerances.

    python tests/llama_runtime.py REQUEST.json RESULT_DIR     (what the parent runs)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
N_CTX = 64
TIMEOUT = 600  # seconds for one child: loading and evaluating a test model takes one or two


class LlamaCrashed(Exception):
    """llama.cpp ended its process (a signal or an exit without a result)."""


class LlamaRefused(Exception):
    """llama.cpp refused to load the file (llama-cpp-python's ValueError)."""


class LlamaRuntime:
    """llama.cpp as the tests use it; every method runs one child process (forked from a server that
    has numpy and llama_cpp imported, tests/conftest.py `run_python_script`: still a process of its
    own, so a crash ends only it)."""

    def logits(self, path: Path, tokens: list[int], n_ctx: int = N_CTX) -> np.ndarray:
        """Logits at every position of `tokens` (float64, n_tokens x n_vocab)."""
        out = self._run({"op": "logits", "path": str(path), "tokens": [int(t) for t in tokens], "n_ctx": n_ctx})
        return out["logits"]

    def tokenize(self, path: Path, texts: list[str], add_bos: bool, special: bool) -> dict:
        """The vocabulary alone (vocab_only): its type ("spm", "bpe", ...), BOS/EOS ids and the
        token ids of each text."""
        return self._run({"op": "tokenize", "path": str(path), "texts": list(texts), "add_bos": add_bos,
                          "special": special})

    def load(self, path: Path) -> dict:
        """Load the model and make a context; raises LlamaRefused when llama.cpp refuses it.
        Returns the model parameters it was loaded with that the tests rely on."""
        return self._run({"op": "load", "path": str(path), "n_ctx": N_CTX})

    def quantize(self, path: Path, out: Path, ftype: int) -> None:
        """llama.cpp's own quantizer (llama-quantize's llama_model_quantize) of a GGUF file to
        file type `ftype` (LLAMA_FTYPE_MOSTLY_*, e.g. 41 = Q2_0), one thread."""
        result = self._run({"op": "quantize", "path": str(path), "out": str(out), "ftype": int(ftype)})
        if result["status"] != 0:
            raise LlamaRefused(f"llama_model_quantize of {path} to file type {ftype} returned {result['status']}")

    def _run(self, request: dict) -> dict:
        from tests.conftest import run_python_script

        with tempfile.TemporaryDirectory(prefix="llama-runtime-") as tmp:
            req = Path(tmp) / "request.json"
            req.write_text(json.dumps(request))
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            try:
                proc = run_python_script(sys.executable, Path(__file__), req, tmp, env=env, timeout=TIMEOUT, cwd=ROOT,
                                         preload="numpy,llama_cpp")
            except subprocess.TimeoutExpired:
                raise LlamaCrashed(f"llama.cpp did not finish {request['op']} of {request['path']} "
                                   f"within {TIMEOUT} s") from None
            result = Path(tmp) / "result.json"
            if proc.returncode != 0 or not result.is_file():
                raise LlamaCrashed(f"llama.cpp {describe_exit(proc.returncode)} during {request['op']} of "
                                   f"{request['path']}\n--- its stderr (last lines) ---\n{tail(proc.stderr)}")
            out = json.loads(result.read_text())
            if "refused" in out:
                raise LlamaRefused(out["refused"])
            if request["op"] == "logits":
                out["logits"] = np.load(Path(tmp) / "logits.npy")
            return out


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code} and no result"


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# -- the child ----------------------------------------------------------------------------------

def _llama_cpp():
    import llama_cpp
    import llama_cpp.llama_cpp as capi

    # See the module docstring: no extra buffer types (no weight repacking), whatever the CPU.
    default_params = capi.llama_model_default_params
    if not getattr(default_params, "without_extra_bufts", False):
        def model_params():
            params = default_params()
            params.use_extra_bufts = False
            return params
        model_params.without_extra_bufts = True
        capi.llama_model_default_params = model_params
    return llama_cpp


def _open(llama_cpp, request: dict, **kw):
    return llama_cpp.Llama(model_path=request["path"], n_threads=2, verbose=False, **kw)


def _serve(request: dict, out_dir: Path) -> dict:
    if os.environ.get("BITNET_GGUF_TEST_LLAMA_CRASH") == request["op"]:
        # for showing the isolation by hand (and its own test): die as a native crash would
        os.kill(os.getpid(), signal.SIGSEGV)
    llama_cpp = _llama_cpp()
    op = request["op"]
    if op == "quantize":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = request["ftype"], 1
        status = llama_cpp.llama_model_quantize(request["path"].encode(), request["out"].encode(), params)
        return {"status": int(status)}
    try:
        if op == "tokenize":
            llm = _open(llama_cpp, request, vocab_only=True)
        else:
            llm = _open(llama_cpp, request, n_ctx=request["n_ctx"], logits_all=(op == "logits"))
    except ValueError as e:
        return {"refused": str(e)}
    try:
        if op == "load":
            return {"use_extra_bufts": bool(llm.model_params.use_extra_bufts)}
        if op == "logits":
            llm.eval(request["tokens"])
            np.save(out_dir / "logits.npy", np.array(llm.scores[:llm.n_tokens], dtype=np.float64))
            return {"n_vocab": llm.n_vocab()}
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        kinds = {llama_cpp.LLAMA_VOCAB_TYPE_SPM: "spm", llama_cpp.LLAMA_VOCAB_TYPE_BPE: "bpe"}
        vocab_type = llama_cpp.llama_vocab_type(vocab)
        return {"vocab_type": kinds.get(vocab_type, str(vocab_type)), "bos": llm.token_bos(),
                "eos": llm.token_eos(),
                "tokens": [llm.tokenize(t.encode("utf-8"), add_bos=request["add_bos"], special=request["special"])
                           for t in request["texts"]]}
    finally:
        llm.close()


def main(argv: list[str]) -> int:
    import faulthandler

    faulthandler.enable()  # a native crash prints the Python stack to stderr for the parent's message
    request = json.loads(Path(argv[0]).read_text())
    out_dir = Path(argv[1])
    result = _serve(request, out_dir)
    (out_dir / "result.json.tmp").write_text(json.dumps(result))
    os.replace(out_dir / "result.json.tmp", out_dir / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
