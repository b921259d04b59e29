"""llama.cpp runs the packed families' files: logits, tokenizer, split sets, Q8_0 embeddings.

The llama-arch checkpoints (HF1BitLLM Llama3-8B-1.58-like, Falcon3-1.58bit-like with a
head_dim that is not hidden / heads) are converted with the CLI and run in llama.cpp
(llama-cpp-python, CPU). The reference logits come from tests/reference_model.py
computed in Hugging Face's convention: unpermuted q/k rows with rotate-half rope and
the untied lm_head, so the q/k permutation in the file is checked, not assumed
(a file without it, or with the rope applied to the wrong pairs, is off by tens of
percent; see the measurements in tests/test_llamacpp.py, whose tolerances apply).
bitnet-b1.58-2B-4T files use arch `bitnet-b1.58`, which only bitnet.cpp runs: upstream
llama.cpp must refuse them rather than compute a SiLU graph.

Tolerance. These random packed models have heavy-tailed activations (silu(gate) * up of
unnormalized projections), so llama.cpp's 8-bit quantization of the activations inside
TQ1_0/TQ2_0 matmuls (Q8_K, see tests/test_llamacpp.py) costs far more here than on the
1bitLLM-style checkpoints: 6-7% relative RMS logit error on average, 15-25% at the worst
position, top-1 agreement 84-94% (measured). The same files with every ternary tensor
rewritten as F32 (the identical values, decoded with gguf.quants) run at 0.15-0.2% mean,
0.5% worst, top-1 everywhere: so the exact check is made on that F32 rewrite, with the
tight limits below, and the TQ files themselves must stay within the loose ones and give
identical logits for TQ1_0 and TQ2_0. A file whose q/k rows are left in Hugging Face's
order is off by far more than either limit (test_the_reference_tells_a_missing_permutation_apart).

Needs llama-cpp-python (`make test`); BITNET_GGUF_SKIP_LLAMA=1 skips.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.conftest import convert
from tests.reference_model import forward
from tests.synthetic import write_checkpoint
from tests.llama_runtime import LlamaRefused
from tests.test_llamacpp import N_TOKENS, TEXT, llama_logits, relative_rms_error

pytestmark = pytest.mark.llama

CHECKPOINTS = {
    "llama3": ("llama3-1.58", dict(hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8,
                                   num_kv_heads=2, tokenizer_vocab=700, vocab_size=1024, seed=5)),
    "falcon3": ("falcon3-1.58", dict(hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4,
                                     num_kv_heads=2, head_dim=128, tokenizer_vocab=600, seed=6)),
    # onebitllms quantize_to_1bit layout (Falcon-E main revision): weight_scale = 1 / absmean
    "falcon-e": ("falcon-e", dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=64, tokenizer_vocab=600, seed=12)),
    # Falcon-E prequantized revision: bf16 master weights, absmean here, arch llama (q/k permuted)
    "falcon-e-prequantized": ("falcon-e-prequantized", dict(hidden_size=256, intermediate_size=512, num_layers=2,
                                                            num_heads=4, num_kv_heads=1, tokenizer_vocab=600,
                                                            seed=13)),
}
# group-scaled ternary (PrismML Ternary-Bonsai-like Qwen3, one fp16 scale per 128 values): Q2_0 only
GROUPED_CHECKPOINTS = {
    "bonsai": ("bonsai", dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=64, tokenizer_vocab=600, seed=18)),
}

MIXED_TEXTS = [
    TEXT,
    "Digits 2024, 3.14159 and 1234567890; CAPITALS and MiXeD case!",
    "café naïve über — Zürich, привет мир, 你好世界, 東京 🚀🦙😀 👍🏽 ✅",
    "  leading spaces,\ttabs\nand new lines\n\n",
    "<|begin_of_text|>special tokens inside<|eot_id|> text<|end_of_text|>",
    "it's, don't, we'll, they've: contractions",
    "",
]


class Packed:
    def __init__(self, root: Path):
        self.root = root
        self._refs: dict = {}

    def checkpoint(self, name: str) -> Path:
        path = self.root / name
        if not (path / "config.json").is_file():
            family, kw = {**CHECKPOINTS, **GROUPED_CHECKPOINTS}[name]
            write_checkpoint(path, family, **kw)
        return path

    def gguf(self, name: str, out_type: str, *extra: str) -> Path:
        tag = "-".join([out_type, *[e.strip("-") for e in extra]])
        out = self.root / f"{name}-{tag}.gguf"
        if not out.is_file() and not list(self.root.glob(f"{name}-{tag}-00001-of-*.gguf")):
            convert(self.checkpoint(name), out, "--type", out_type, *extra)
        return out

    def tokens(self, name: str) -> list[int]:
        tok = Tokenizer.from_file(str(self.checkpoint(name) / "tokenizer.json"))
        ids = tok.encode(TEXT + " " + TEXT).ids  # the post-processor adds the BOS token
        assert len(ids) >= N_TOKENS
        return ids[:N_TOKENS]

    def tq2_0_logits(self, llama, name: str) -> np.ndarray:
        """llama.cpp's logits of the TQ2_0 file of `name` for its tokens, evaluated once (two tests read them)."""
        if ("tq2_0", name) not in self._refs:
            self._refs["tq2_0", name] = llama_logits(llama, self.gguf(name, "tq2_0"), self.tokens(name),
                                                     n_vocab=self.reference(name).shape[1])
        return self._refs["tq2_0", name]

    def reference(self, name: str) -> np.ndarray:
        if name not in self._refs:
            self._refs[name] = forward(self.checkpoint(name), self.tokens(name), embed_dtype=np.float16,
                                       ternary_dtype=np.float16)
        return self._refs[name]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return Packed(tmp_path_factory.mktemp("packed"))


EXACT_MAX, EXACT_MEAN = 0.01, 0.005          # F32 rewrite: measured 0.5% worst, 0.2% mean
TQ_MAX, TQ_MEAN, TQ_TOP1 = 0.4, 0.1, 0.75       # TQ files: measured 25% worst, 7% mean, top-1 84%


def check_logits(got: np.ndarray, want: np.ndarray, max_err: float, mean_err: float, top1: float) -> None:
    assert got.shape == want.shape and np.isfinite(got).all()
    err = relative_rms_error(got, want)
    agree = (got.argmax(axis=1) == want.argmax(axis=1)).mean()
    detail = f"relative RMS logit error per position: {np.array2string(err, precision=4)}; top-1 {agree:.0%}"
    assert err.max() <= max_err, detail
    assert err.mean() <= mean_err, detail
    assert agree >= top1, detail


def rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a GGUF with our container writer, passing each (tensor, bytes) through `change`,
    which returns (ggml type, bytes)."""
    from pipeline.gguf_file import KV, GGUFFileWriter, TensorInfo, read_gguf

    contents = read_gguf(src)
    raw = src.read_bytes()
    infos, datas = [], []
    for t in contents.tensors:
        ggml_type, data = change(t, raw[t.offset:t.offset + t.nbytes])
        infos.append(TensorInfo(t.name, t.shape, ggml_type, len(data)))
        datas.append(data)
    kvs = [KV(kv.key, kv.type, 0) if kv.key == "general.file_type" else kv for kv in contents.kvs]
    with GGUFFileWriter(dst, kvs, infos) as w:
        w.write_header()
        for i, data in enumerate(datas):
            w.write_tensor(i, data)
    return dst


def ternary_as_f32(t, data: bytes) -> tuple[int, bytes]:
    import gguf

    if t.ggml_type not in (gguf.GGMLQuantizationType.TQ1_0, gguf.GGMLQuantizationType.TQ2_0):
        return t.ggml_type, data
    values = gguf.quants.dequantize(np.frombuffer(data, np.uint8).reshape(t.shape[0], -1),
                                    gguf.GGMLQuantizationType(t.ggml_type))
    return int(gguf.GGMLQuantizationType.F32), values.astype("<f4").tobytes()


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_llama_arch_files_hold_the_hugging_face_model(llama, packed, name, tmp_path):
    """The exact check: our file's values, metadata and row order, run by llama.cpp in F32."""
    want = packed.reference(name)
    exact = rewrite(packed.gguf(name, "tq2_0"), tmp_path / "f32.gguf", ternary_as_f32)
    got = llama_logits(llama, exact, packed.tokens(name), n_vocab=want.shape[1])
    check_logits(got, want, EXACT_MAX, EXACT_MEAN, 1.0)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_llama_arch_tq_files_run_in_llamacpp(llama, packed, name):
    want = packed.reference(name)
    tq2 = packed.tq2_0_logits(llama, name)
    check_logits(tq2, want, TQ_MAX, TQ_MEAN, TQ_TOP1)
    tq1 = llama_logits(llama, packed.gguf(name, "tq1_0"), packed.tokens(name), n_vocab=want.shape[1])
    np.testing.assert_allclose(tq1, tq2, rtol=0, atol=1e-4 * np.abs(tq2).max())


@pytest.mark.parametrize("name", ["llama3", "falcon-e-prequantized"])
def test_q2_0_files_run_in_llamacpp(llama, packed, name):
    """Upstream llama.cpp's Q2_0 (one fp16 scale per 64 values) holds the same ternary values:
    within the TQ limits of the reference (its CPU kernel also quantizes activations to 8 bits)."""
    want = packed.reference(name)
    got = llama_logits(llama, packed.gguf(name, "q2_0"), packed.tokens(name), n_vocab=want.shape[1])
    check_logits(got, want, TQ_MAX, TQ_MEAN, TQ_TOP1)


def q2_0_as_f32(t, data: bytes) -> tuple[int, bytes]:
    from tests.test_codecs import q2_0_reference_decode

    if t.ggml_type != 42:
        return t.ggml_type, data
    rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
    return 0, q2_0_reference_decode(data, rows, t.shape[-1]).astype("<f4").tobytes()


def test_qwen3_group_scaled_q2_0_files_hold_the_model(llama, packed, tmp_path):
    """Qwen3 with q/k norms and one scale per 128 values: the Q2_0 file decoded to F32 (with the
    transcription of llama.cpp's dequantizer) runs in llama.cpp within the exact limits of the
    numpy reference (transformers' Qwen3 graph, tests/test_reference_model.py), and the Q2_0 file
    itself within the TQ limits."""
    name = "bonsai"
    want = packed.reference(name)
    q2 = packed.gguf(name, "q2_0")
    exact = rewrite(q2, tmp_path / "f32.gguf", q2_0_as_f32)
    check_logits(llama_logits(llama, exact, packed.tokens(name), n_vocab=want.shape[1]), want,
                 EXACT_MAX, EXACT_MEAN, 1.0)
    check_logits(llama_logits(llama, q2, packed.tokens(name), n_vocab=want.shape[1]), want,
                 TQ_MAX, TQ_MEAN, TQ_TOP1)


def test_the_reference_tells_a_missing_permutation_apart(llama, packed, tmp_path):
    """The checks above can fail: the same model with its q/k rows left in Hugging Face's order
    (what a converter that forgot the permutation writes) is far outside both limits."""
    from tests.test_families import llama_permute

    name = "llama3"
    config = json.loads((packed.checkpoint(name) / "config.json").read_text())

    def unpermute(t, data: bytes):
        ggml_type, data = ternary_as_f32(t, data)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"] if "attn_q" in t.name else config["num_key_value_heads"]
            rows = np.frombuffer(data, np.uint8).reshape(t.shape[0], -1)
            index = llama_permute(np.arange(t.shape[0])[:, None], heads)[:, 0]  # file row r = HF row index[r]
            hf_order = np.empty_like(rows)
            hf_order[index] = rows
            data = hf_order.tobytes()
        return ggml_type, data

    want = packed.reference(name)
    broken = rewrite(packed.gguf(name, "tq2_0"), tmp_path / "unpermuted.gguf", unpermute)
    err = relative_rms_error(llama_logits(llama, broken, packed.tokens(name), n_vocab=want.shape[1]), want)
    assert err.mean() > 2 * TQ_MEAN, err


def test_split_tq2_0_gives_the_logits_of_the_single_file(llama, packed):
    name = "llama3"
    tokens, n_vocab = packed.tokens(name), packed.reference(name).shape[1]
    single = packed.tq2_0_logits(llama, name)
    packed.gguf(name, "tq2_0", "--split-max-tensors", "5")
    parts = sorted(packed.root.glob(f"{name}-tq2_0-split-max-tensors-5-*-of-*.gguf"))
    assert len(parts) > 2
    split = llama_logits(llama, parts[0], tokens, n_vocab)
    np.testing.assert_array_equal(split, single)


def test_q8_0_embeddings_stay_within_the_tolerance(llama, packed):
    name = "falcon3"
    want = packed.reference(name)
    q8 = rewrite(packed.gguf(name, "tq2_0", "--embedding-type", "q8_0"), packed.root / "q8-f32.gguf", ternary_as_f32)
    got = llama_logits(llama, q8, packed.tokens(name), n_vocab=want.shape[1])
    # A Q8_0 output matrix makes llama.cpp quantize the last hidden state to 8 bits too (Q8_0
    # dot products): measured 3.4% mean, 6.9% worst, top-1 everywhere, so the TQ limits apply
    check_logits(got, want, TQ_MAX, TQ_MEAN, 1.0)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_llamacpp_tokenizes_like_the_tokenizers_package(llama, packed, name):
    tok = Tokenizer.from_file(str(packed.checkpoint(name) / "tokenizer.json"))
    got = llama.tokenize(packed.gguf(name, "tq2_0"), MIXED_TEXTS, add_bos=True, special=True)
    assert got["vocab_type"] == "bpe"
    for text, ids in zip(MIXED_TEXTS, got["tokens"]):
        assert ids == tok.encode(text).ids, repr(text)  # with the BOS token the post-processor adds


def test_falcon_e_pre_tokenizer_name_runs_in_llamacpp(llama, packed):
    """The name written for Falcon-E's tokenizer (falcon3, docs/notes/families.md) loads and splits
    text as the tokenizers package does (Falcon-E's split is Llama 3's)."""
    tok = Tokenizer.from_file(str(packed.checkpoint("falcon-e") / "tokenizer.json"))
    got = llama.tokenize(packed.gguf("falcon-e", "tq2_0", "--tokenizer-pre", "falcon3"), MIXED_TEXTS, add_bos=True,
                         special=True)
    assert got["vocab_type"] == "bpe"
    for text, ids in zip(MIXED_TEXTS, got["tokens"]):
        assert ids == tok.encode(text).ids, repr(text)


@pytest.mark.parametrize("family", ["2b4t", "2b4t-bf16"])
def test_upstream_llamacpp_refuses_2b4t_files_instead_of_computing_silu(llama, tmp_path, family):
    model = write_checkpoint(tmp_path / family, family, hidden_size=256, intermediate_size=512, num_layers=1,
                             num_heads=4, num_kv_heads=2)
    out = tmp_path / f"{family}.gguf"
    convert(model, out)
    with pytest.raises(LlamaRefused):
        llama.load(out)
