"""Our GGUF against the one llama.cpp's own converter writes for the same checkpoint.

llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and the gguf-py
it ships) comes from the llama-cpp-python sdist of the release the `llama` extra
pins; `make test` (target `reference-converter`) unpacks it into
build/llama.cpp-convert/src and installs what it imports (torch 2.13.0 CPU,
transformers 4.57.6, sentencepiece, pyyaml) into build/llama.cpp-convert/venv.

What must be the same: tensor names, shapes and ggml types; every tensor's bytes
(ternary blocks, the F16 embedding, the F32 norms, the F16 fallback of rows that are
not a multiple of 256); every metadata key and value, with their GGUF value types,
except the naming keys listed in NAMING_KEYS. Not compared: the order of tensors and
of keys (llama.cpp looks both up by name). llama.cpp's converter writes tensors in
safetensors order (alphabetical inside each shard: blk.0.ffn_down before
blk.0.attn_q); we write them block by block.

Why f16 and bf16 sources give the same bytes too: llama.cpp computes W' = codes /
iscale in float32 and, for an f16 checkpoint, casts W' back to f16 before packing
(a bf16 checkpoint is upcast to f32 first and stays f32). A TQ block stores
d = fp16(max|W'|) and codes round(W'/d): rounding W' to f16 first changes neither
(fp16 of an fp16 value is itself, and W'/d stays exactly -1, 0 or +1). The F16
fallback is f16(W') on both sides, with one difference in bits, not in value: the sign
of zero (see assert_same_f16_ternary).

Needs build/llama.cpp-convert (`make reference-converter`, part of `make test`):
without it these tests fail; BITNET_GGUF_SKIP_LLAMA=1 skips them instead. Set
BITNET_GGUF_LLAMA_CONVERT to use another directory laid out the same way.
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.conftest import ROOT, convert, run_python_script

pytestmark = pytest.mark.llama

# Keys that may differ: none but the header's count (kept so a known difference can be named here
# with its reason, as docs/notes/llamacpp-converter.md does). general.* keys are decided by
# gguf-py's Metadata on both sides (README front matter, config.json, the directory's name).
NAMING_KEYS = {"GGUF.kv_count"}


@pytest.fixture(scope="session")
def llama_convert() -> tuple[Path, Path]:
    """(python, convert_hf_to_gguf.py) of llama.cpp's converter."""
    if os.environ.get("BITNET_GGUF_SKIP_LLAMA") == "1":
        pytest.skip("BITNET_GGUF_SKIP_LLAMA=1")
    base = Path(os.environ.get("BITNET_GGUF_LLAMA_CONVERT", ROOT / "build" / "llama.cpp-convert"))
    python, script = base / "venv" / "bin" / "python", base / "src" / "convert_hf_to_gguf.py"
    if not (python.is_file() and script.is_file()):
        pytest.fail(f"llama.cpp's converter is not set up in {base}: run `make reference-converter` "
                    "(part of `make test`), or set BITNET_GGUF_SKIP_LLAMA=1 to skip these tests", pytrace=False)
    return python, script


def test_the_converter_comes_from_the_llama_cpp_python_release_we_run(llama_convert):
    _, script = llama_convert
    version = (script.parent / "VERSION").read_text().strip()
    try:
        installed = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("llama-cpp-python is not installed; `make test` installs it", pytrace=False)
    assert version == installed, "rerun `make reference-converter` after changing the llama extra's pin"


def llama_cpp_convert(llama_convert, model_dir: Path, out: Path, out_type: str, *extra: str) -> None:
    python, script = llama_convert
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py it ships
    proc = run_python_script(python, script, model_dir, "--outtype", out_type, "--outfile", out, *extra, env=env)
    assert proc.returncode == 0, f"llama.cpp's converter failed:\n{proc.stderr[-4000:]}"


def metadata(reader: gguf.GGUFReader) -> dict[str, tuple]:
    """key -> (GGUF value types, value) for every key/value, GGUF.* header fields included."""
    return {key: (tuple(f.types), f.contents()) for key, f in reader.fields.items()}


def short(value) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


def compare_with_llama_cpp(ours_path: Path, theirs_path: Path, explained: tuple[str, ...] = ()) -> None:
    """`explained`: keys the caller has already compared (they may differ)."""
    ours, theirs = gguf.GGUFReader(ours_path), gguf.GGUFReader(theirs_path)

    kv_ours, kv_theirs = metadata(ours), metadata(theirs)
    differing = sorted(k for k in kv_ours.keys() | kv_theirs.keys() if kv_ours.get(k) != kv_theirs.get(k))
    unexplained = [k for k in differing if k not in NAMING_KEYS and k not in explained]
    assert not unexplained, "metadata differs from llama.cpp's:\n" + "\n".join(
        f"  {k}: ours {short(kv_ours.get(k))}, llama.cpp {short(kv_theirs.get(k))}" for k in unexplained)
    assert "general.name" in kv_ours and "general.name" in kv_theirs

    t_ours = {t.name: t for t in ours.tensors}
    t_theirs = {t.name: t for t in theirs.tensors}
    assert sorted(t_ours) == sorted(t_theirs)
    for name, a in t_ours.items():
        b = t_theirs[name]
        assert (a.tensor_type.name, list(a.shape)) == (b.tensor_type.name, list(b.shape)), name
        if a.tensor_type == gguf.GGMLQuantizationType.F16 and name != "token_embd.weight":
            assert_same_f16_ternary(name, np.asarray(a.data), np.asarray(b.data))
            continue
        same = np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8))
        assert same, f"{name} ({a.tensor_type.name}): bytes differ from llama.cpp's"


def assert_same_f16_ternary(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    """A ternary projection written as F16 (rows not a multiple of 256): the same values,
    but llama.cpp's zeros keep the sign of the weight they came from.

    llama.cpp computes (w * iscale).round().clamp(-1, 1) / iscale on floats, so a small
    negative weight becomes -0.0 (bits 0x8000); we keep the codes as int8, where zero has
    no sign, and write +0.0. Both are the same number to llama.cpp; every other value
    must be bit-identical.
    """
    ours_bits, theirs_bits = ours.view(np.uint16), theirs.view(np.uint16)
    differ = ours_bits != theirs_bits
    assert np.array_equal(ours, theirs), f"{name} (F16 fallback): values differ from llama.cpp's"
    assert (ours_bits[differ] == 0x0000).all() and (theirs_bits[differ] == 0x8000).all(), \
        f"{name} (F16 fallback): bits differ from llama.cpp's other than in the sign of zero"


CASES = {
    # name: (checkpoint shape, output types)
    "f32": (dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, dtype="f32"),
            ("tq2_0", "tq1_0")),
    # f16 master weights, grouped-query attention, vocabulary far above the tokenizer's
    "f16-gqa": (dict(hidden_size=512, intermediate_size=768, num_layers=2, num_heads=8, num_kv_heads=2,
                     vocab_size=1000, dtype="f16", seed=1), ("tq2_0",)),
    # bf16 in two shards
    "bf16-sharded": (dict(hidden_size=256, intermediate_size=768, num_layers=3, num_heads=4, num_kv_heads=1,
                          dtype="bf16", shards=2, seed=2, rope_theta=500000.0), ("tq1_0",)),
    # rows of 384 and 640 values cannot be TQ: every projection falls back to F16 on both
    # sides (like bitnet_b1_58-3B's 3200 and 8640), and file_type still says TQ2_0
    "f32-f16-fallback": (dict(hidden_size=384, intermediate_size=640, num_layers=1, num_heads=6, num_kv_heads=3,
                              dtype="f32", seed=3), ("tq2_0",)),
    # added tokens (added_tokens.json, added_tokens_decoder) and a pad id in config.json
    "f32-added-tokens": (dict(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4, dtype="f32",
                              seed=4, added_tokens=True), ("tq2_0",)),
}
PARAMS = [(name, out_type) for name, (_, types) in CASES.items() for out_type in types]


@pytest.mark.parametrize("name,out_type", PARAMS, ids=[f"{n}-{t}" for n, t in PARAMS])
def test_same_file_as_llama_cpp_converter(llama_convert, checkpoint, tmp_path, name, out_type):
    shape, _ = CASES[name]
    model = checkpoint(**shape)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.cpp.gguf"
    convert(model, ours, "--type", out_type)
    llama_cpp_convert(llama_convert, model, theirs, out_type)
    compare_with_llama_cpp(ours, theirs)


MODEL_CARD = """---
license: mit
language:
- en
- fr
tags:
- bitnet
- ternary
pipeline_tag: text-generation
base_model: 1bitLLM/bitnet_b1_58-large
datasets:
- togethercomputer/RedPajama-Data-1T
---
# A model card
"""
OVERRIDES = {"general.author": "Someone", "general.version": "v2", "general.license": "apache-2.0",
             "general.tags": ["one", "two"], "general.description": "a test model",
             "general.base_models": [{"name": "Base", "organization": "Org", "repo_url": "https://example.org/base"}]}
GENERAL_CASES = {"card": [], "overrides": ["--metadata", "{metadata}", "--model-name", "My Model"],
                 "vocab-only": ["--vocab-only"], "vocab-only-overrides": ["--vocab-only", "--metadata", "{metadata}"]}


@pytest.mark.parametrize("case", GENERAL_CASES)
def test_general_keys_and_vocab_only_equal_llama_cpp_converters(llama_convert, tmp_path, case):
    """general.* from README front matter and a directory name llama.cpp's heuristics read
    (size label, basename, finetune, version), --metadata and --model-name overrides, and
    --vocab-only files (no tensors): every key and value the same as llama.cpp's converter's."""
    import json

    from tests.synthetic import write_bitnet_checkpoint

    model = write_bitnet_checkpoint(tmp_path / "bitnet_b1_58-tiny-instruct-v1.2", hidden_size=256,
                                    intermediate_size=512, num_layers=1, num_heads=4)
    (model / "README.md").write_text(MODEL_CARD)
    overrides = tmp_path / "metadata.json"
    overrides.write_text(json.dumps(OVERRIDES))
    args = [a.format(metadata=overrides) for a in GENERAL_CASES[case]]
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.cpp.gguf"
    if "--vocab-only" in args:  # from config.json and the tokenizer alone: no weights needed
        for p in model.glob("*.safetensors"):
            p.rename(tmp_path / p.name)
    convert(model, ours, "--type", "tq2_0", *args)
    if "--vocab-only" in args:
        for p in tmp_path.glob("*.safetensors"):
            p.rename(model / p.name)
    llama_cpp_convert(llama_convert, model, theirs, "tq2_0", *args)
    kv_ours, kv_theirs = metadata(gguf.GGUFReader(ours)), metadata(gguf.GGUFReader(theirs))
    if "--metadata" in args:
        # llama.cpp's converter drops --metadata's general.license unread (gguf-py's Metadata takes
        # it from the model card only) and keeps the card's; we write the one the user gave
        assert kv_ours["general.license"][1] == OVERRIDES["general.license"], kv_ours["general.license"]
        assert kv_theirs["general.license"][1] == "mit", kv_theirs["general.license"]
        kv_ours["general.license"] = kv_theirs["general.license"]
    differing = sorted(k for k in kv_ours.keys() | kv_theirs.keys() if kv_ours.get(k) != kv_theirs.get(k))
    assert differing == [], "\n".join(f"  {k}: ours {short(kv_ours.get(k))}, llama.cpp {short(kv_theirs.get(k))}"
                                      for k in differing)
    general = {k: v for k, (_, v) in kv_ours.items() if k.startswith("general.")}
    assert general["general.basename"] == "bitnet_b1_58-tiny" and general["general.license"] in ("mit", "apache-2.0")
    if "--metadata" in args:
        assert general["general.author"] == "Someone" and general["general.tags"] == ["one", "two"]
    if "--model-name" in args:
        assert general["general.name"] == "My Model"
    if "--vocab-only" in args:
        assert not gguf.GGUFReader(ours).tensors and "general.size_label" not in general
    else:
        compare_with_llama_cpp(ours, theirs, explained=("general.license",) if "--metadata" in args else ())


# -- packed llama-arch families (HF1BitLLM Llama3-8B-1.58, Falcon3-1.58bit) -------------------------

def llama_cpp_convert_packed(llama_convert, model_dir: Path, out: Path, out_type: str, pre: str) -> None:
    """llama.cpp's converter on a packed checkpoint: `--no-lazy` (its lazy mode crashes on packed
    weights), and through tests/reference_convert.py, which names the BPE pre-tokenizer for it
    (it refuses the hash of a tokenizer trained in a test)."""
    python, script = llama_convert
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    proc = run_python_script(python, ROOT / "tests" / "reference_convert.py", script.parent, pre, model_dir,
                             "--outtype", out_type, "--outfile", out, "--no-lazy", env=env)
    assert proc.returncode == 0, f"llama.cpp's converter failed:\n{proc.stderr[-4000:]}"


PACKED_CASES = {
    "llama3-1.58": dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2),
    "llama3-1.58-sharded": dict(hidden_size=512, intermediate_size=768, num_layers=2, num_heads=4, num_kv_heads=4,
                                shards=3, seed=7),
    "falcon3-1.58": dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=1,
                         head_dim=128, seed=8),
    # Falcon-E main revision / onebitllms quantize_to_1bit output (weight_scale = 1 / absmean)
    "falcon-e": dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=64, seed=14),
}
PACKED_PARAMS = [(c, t) for c in PACKED_CASES for t in ("tq2_0", "tq1_0")]


@pytest.mark.parametrize("case,out_type", PACKED_PARAMS, ids=[f"{c}-{t}" for c, t in PACKED_PARAMS])
def test_packed_llama_files_equal_llama_cpp_converters(llama_convert, tmp_path, case, out_type):
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / case, case.removesuffix("-sharded"), **PACKED_CASES[case])
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.cpp.gguf"
    proc = convert(model, ours, "--type", out_type)
    pre = gguf.GGUFReader(ours).fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == "llama-bpe", proc.stderr
    llama_cpp_convert_packed(llama_convert, model, theirs, out_type, "llama-bpe")
    compare_with_llama_cpp(ours, theirs)


# -- full-precision outputs of the effective weights (--type f32 / f16 / bf16 / q8_0) --------------
FLOAT_VIEWS = {"F32": "<u4", "F16": "<u2", "BF16": "<u2"}
SIGN_BIT = {"<u4": 0x80000000, "<u2": 0x8000}


def assert_same_up_to_the_sign_of_zero(ours_path: Path, theirs_path: Path, scale_ulps: int = 0) -> None:
    """Every tensor of the same type; Q8_0 and F32 norms byte-identical; the float projections the
    same values, their bits differing only where llama.cpp's zero keeps the sign of the weight it
    came from (see assert_same_f16_ternary): ours +0, theirs -0. `scale_ulps`: for F32 projections
    of master weights, how far (in F32 ulps) the value of a nonzero code may be from llama.cpp's:
    its absmean is torch's float32 mean (rounded along its summation order), ours the exact mean
    rounded once, which can differ in the last bit; every other output type rounds that away."""
    ours, theirs = gguf.GGUFReader(ours_path), gguf.GGUFReader(theirs_path)
    kv_ours, kv_theirs = metadata(ours), metadata(theirs)
    assert {k for k in kv_ours.keys() | kv_theirs.keys() if kv_ours.get(k) != kv_theirs.get(k)} <= NAMING_KEYS
    t_theirs = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(t_theirs)
    for a in ours.tensors:
        b = t_theirs[a.name]
        assert (a.tensor_type.name, list(a.shape)) == (b.tensor_type.name, list(b.shape)), a.name
        x, y = np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)
        view = FLOAT_VIEWS.get(a.tensor_type.name)
        if view is None or np.array_equal(x, y):
            assert np.array_equal(x, y), f"{a.name} ({a.tensor_type.name}): bytes differ from llama.cpp's"
            continue
        xb, yb = x.view(view), y.view(view)
        differ = xb != yb
        zero = xb == 0
        assert (yb[differ & zero] == SIGN_BIT[view]).all(), f"{a.name}: a zero differs from llama.cpp's"
        off = (xb.astype(np.int64) - yb.astype(np.int64))[differ & ~zero]
        assert (np.abs(off) <= (scale_ulps if view == "<u4" else 0)).all(), \
            f"{a.name} ({a.tensor_type.name}): differs from llama.cpp's other than in the sign of zero"


FLOAT_CASES = [("f16", "f32"), ("f16", "f16"), ("f16", "bf16"), ("f16", "q8_0"), ("bf16", "f32"), ("f32", "bf16"),
               ("llama3-1.58", "f16"), ("llama3-1.58", "q8_0")]


@pytest.mark.parametrize("source,out_type", FLOAT_CASES, ids=[f"{s}-{t}" for s, t in FLOAT_CASES])
def test_float_types_equal_llama_cpp_converters_outtype(llama_convert, tmp_path, source, out_type):
    """--type X (embeddings following it) against llama.cpp's --outtype X: master weights of each
    dtype (llama.cpp casts W' back to an fp16 checkpoint's dtype) and a packed checkpoint."""
    from tests.synthetic import write_bitnet_checkpoint, write_checkpoint

    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.cpp.gguf"
    if source == "llama3-1.58":
        model = write_checkpoint(tmp_path / source, source, **PACKED_CASES[source])
        llama_cpp_convert_packed(llama_convert, model, theirs, out_type, "llama-bpe")
    else:
        model = write_bitnet_checkpoint(tmp_path / f"model-{source}", hidden_size=256, intermediate_size=512,
                                        num_layers=1, num_heads=4, dtype=source, seed=5)
        llama_cpp_convert(llama_convert, model, theirs, out_type)
    convert(model, ours, "--type", out_type)
    assert_same_up_to_the_sign_of_zero(ours, theirs, scale_ulps=0 if source == "llama3-1.58" else 1)
    if out_type == "q8_0":  # the format without a sign of zero: the whole file's tensors are identical
        a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
        assert {t.name: bytes(t.data) for t in a.tensors} == {t.name: bytes(t.data) for t in b.tensors}


# -- group-scaled Qwen3 (PrismML Ternary-Bonsai-like) ---------------------------------------------

@pytest.mark.parametrize("embedding_type", ["f16", "q8_0"])
def test_qwen3_group_scaled_float_tensors_equal_llama_cpp_converters(llama_convert, tmp_path, embedding_type):
    """llama.cpp's converter reads the unpacked checkpoint as a float Qwen3. At --outtype f16 its
    file holds every projection as F16 (exact: the values are fp16), at q8_0 as Q8_0; ours holds
    them as Q2_0. Everything else must be the same bytes: metadata (but the file type), the
    embedding and head at the same type, the F32 norms (q/k norms included); and at f16 our Q2_0
    projections decode to exactly their F16 values."""
    from pipeline.gguf_file import read_gguf
    from tests.synthetic import write_checkpoint
    from tests.test_codecs import q2_0_reference_decode

    model = write_checkpoint(tmp_path / "bonsai", "bonsai", hidden_size=256, intermediate_size=512, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=64, seed=19)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.cpp.gguf"
    convert(model, ours, "--type", "q2_0", "--embedding-type", embedding_type)
    python, script = llama_convert
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    proc = run_python_script(python, ROOT / "tests" / "reference_convert.py", script.parent, "llama-bpe", model,
                             "--outtype", embedding_type, "--outfile", theirs, env=env)
    assert proc.returncode == 0, f"llama.cpp's converter failed:\n{proc.stderr[-4000:]}"

    theirs_reader = gguf.GGUFReader(theirs)
    kv_theirs = metadata(theirs_reader)
    kv_ours = {kv.key: kv.value for kv in read_gguf(ours).kvs}
    for key, (types, value) in kv_theirs.items():
        if key.startswith("GGUF.") or key in NAMING_KEYS or key == "general.file_type":
            continue
        assert key in kv_ours, key
        got = kv_ours[key]
        if isinstance(value, float):
            assert np.float32(got) == np.float32(value), key
        else:
            assert got == value, key
    assert set(kv_ours) - set(kv_theirs) <= NAMING_KEYS | {"general.file_type"}
    assert kv_ours["general.file_type"] == 41

    raw = ours.read_bytes()
    mine = {t.name: t for t in read_gguf(ours).tensors}
    assert sorted(mine) == sorted(t.name for t in theirs_reader.tensors)
    projections = 0
    for t in theirs_reader.tensors:
        m = mine[t.name]
        data = raw[m.offset:m.offset + m.nbytes]
        if m.ggml_type == 42:
            projections += 1
            if embedding_type == "f16":
                assert t.tensor_type == gguf.GGMLQuantizationType.F16, t.name
                values = q2_0_reference_decode(data, *m.shape)
                np.testing.assert_array_equal(values, np.asarray(t.data).astype(np.float32), err_msg=t.name)
            continue
        assert (m.ggml_type, tuple(m.shape)) == (int(t.tensor_type), tuple(int(x) for x in reversed(t.shape))), t.name
        assert data == np.asarray(t.data).tobytes(), f"{t.name}: bytes differ from llama.cpp's"
    assert projections == 2 * 7

    # --type f16 / q8_0 (the effective weights of the group-scaled projections): every tensor is
    # llama.cpp's, byte for byte, and the file type too
    floats = tmp_path / "ours-float.gguf"
    convert(model, floats, "--type", embedding_type)
    got = {t.name: bytes(t.data) for t in gguf.GGUFReader(floats).tensors}
    assert got == {t.name: bytes(t.data) for t in theirs_reader.tensors}
    assert metadata(gguf.GGUFReader(floats))["general.file_type"] == kv_theirs["general.file_type"]
