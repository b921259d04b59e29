"""Ternary and binary embeddings and heads (Ternary-Bonsai: its token embedding and lm_head are
{-s, 0, +s} per group of 128 too): `--embedding-type q2_0 | q1_0 | tq2_0` writes them exactly when
the data allows, and is refused naming the tensor and rows otherwise.

Files are decoded by decoders written from the formats (Q2_0 and Q1_0 transcriptions in the tests,
gguf's TQ2_0 dequantizer) and compared with the checkpoint's values; llama.cpp runs them (its CPU
get_rows reads Q1_0, Q2_0 and TQ2_0 token embeddings).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.synthetic import write_checkpoint
from tests.test_binary_q1_0 import decode_q1_0
from tests.test_codecs import q2_0_reference_decode
from tests.test_group_scaled import SHAPE, refused, tensor_bytes

LLAMA_SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                   tokenizer_vocab=600, seed=23)
EMBED_MAX, EMBED_MEAN = 0.06, 0.04  # a file with ternary embeddings itself in llama.cpp (see the test)
EMBEDDINGS = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}


def decoded(path, name: str, out_type: str) -> np.ndarray:
    import gguf

    raw, shape = tensor_bytes(path, name)
    if out_type == "q2_0":
        return q2_0_reference_decode(raw.tobytes(), *shape)
    if out_type == "q1_0":
        return decode_q1_0(raw.tobytes(), *shape)
    return gguf.quants.dequantize(raw.reshape(shape[0], -1), gguf.GGMLQuantizationType.TQ2_0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Ternary (Ternary-Bonsai-like) and binary (1-bit Bonsai-like) checkpoints whose embedding and
    head are group-scaled like their projections (groups of 128), and their files with the
    embeddings in Q2_0 and Q1_0."""
    root = tmp_path_factory.mktemp("embeddings")
    ternary = write_checkpoint(root / "ternary", "bonsai", **LLAMA_SHAPE, ternary_embeddings=True)
    binary = write_checkpoint(root / "binary", "bonsai", **LLAMA_SHAPE, ternary_embeddings=True, binary=True)
    files = {"ternary": root / "ternary.gguf", "binary": root / "binary.gguf"}
    convert(ternary, files["ternary"], "--type", "q2_0", "--embedding-type", "q2_0")
    convert(binary, files["binary"], "--type", "q1_0", "--embedding-type", "q1_0")
    return {"ternary": ternary, "binary": binary}, files


@pytest.mark.parametrize("kind,out_type", [("ternary", "q2_0"), ("binary", "q1_0")])
def test_embeddings_decode_exactly_to_the_checkpoints_values(models, kind, out_type):
    from pipeline.gguf_file import read_gguf
    from tests.reference_model import load_checkpoint

    checkpoints, files = models
    types = {t.name: t.ggml_type for t in read_gguf(files[kind]).tensors}
    _, tensors = load_checkpoint(checkpoints[kind])
    for name, hf in EMBEDDINGS.items():
        assert types[name] == {"q2_0": 42, "q1_0": 41}[out_type], name
        w = tensors[hf]
        assert len(np.unique(np.abs(w[w != 0]))) > 10 and ((w == 0).any() == (kind == "ternary")), name
        np.testing.assert_array_equal(decoded(files[kind], name, out_type), w, err_msg=name)
    ok = run_cli("verify", files[kind], checkpoints[kind])
    assert "token_embd.weight: ok" in ok.stdout + ok.stderr and f"embeddings {out_type.upper()}" in ok.stdout + ok.stderr


@pytest.mark.llama
@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_ternary_embeddings_run_in_llamacpp(llama, models, kind, tmp_path):
    """llama.cpp looks the tokens up in the Q2_0 / Q1_0 token_embd (CPU get_rows) and multiplies by the
    Q2_0 / Q1_0 output: the file with every ternary tensor decoded to F32 here runs within the exact
    limits of the numpy reference, the file itself within EMBED_MAX / EMBED_MEAN (measured: Q2_0 1.6%
    worst, 1.4% mean; Q1_0 1.8%, 1.5%; top-1 97-100%: 8-bit activations against ternary embeddings)."""
    from tokenizers import Tokenizer

    from tests.reference_model import forward
    from tests.test_binary_q1_0 import q1_0_as_f32
    from tests.test_llamacpp import N_TOKENS, TEXT, llama_logits
    from tests.test_llamacpp_families import EXACT_MAX, EXACT_MEAN, check_logits, q2_0_as_f32, rewrite

    checkpoints, files = models
    model = checkpoints[kind]
    tokens = Tokenizer.from_file(str(model / "tokenizer.json")).encode(TEXT + " " + TEXT).ids[:N_TOKENS]
    want = forward(model, tokens, embed_dtype=np.float16, ternary_dtype=np.float16)
    exact = rewrite(files[kind], tmp_path / "f32.gguf", q2_0_as_f32 if kind == "ternary" else q1_0_as_f32)
    check_logits(llama_logits(llama, exact, tokens, n_vocab=want.shape[1]), want, EXACT_MAX, EXACT_MEAN, 1.0)
    check_logits(llama_logits(llama, files[kind], tokens, n_vocab=want.shape[1]), want, EMBED_MAX, EMBED_MEAN, 0.85)


def test_one_scale_per_256_takes_tq2_0_embeddings(tmp_path):
    from tests.reference_model import load_checkpoint

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, group_size=256, ternary_embeddings=True)
    out = tmp_path / "o.gguf"
    convert(model, out, "--type", "tq2_0", "--embedding-type", "tq2_0")
    _, tensors = load_checkpoint(model)
    for name, hf in EMBEDDINGS.items():
        np.testing.assert_array_equal(decoded(out, name, "tq2_0"), tensors[hf], err_msg=name)
    ok = run_cli("verify", out, model)
    assert "output.weight: ok" in ok.stdout + ok.stderr


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d / "m.gguf"


def test_groups_of_128_are_refused_for_tq2_0_naming_row_and_columns(tmp_path, out):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, ternary_embeddings=True)
    refused(model, out, "tensor model.embed_tokens.weight: --embedding-type tq2_0",
            "changes inside a block of 256 values (row 0, columns 0..255)", "--embedding-type q2_0",
            extra=("--type", "q2_0", "--embedding-type", "tq2_0"), in_data=True)


def test_a_ternary_embedding_is_refused_for_q1_0(tmp_path, out):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, ternary_embeddings=True)
    refused(model, out, "tensor model.embed_tokens.weight: --embedding-type q1_0", "value(s) of 0",
            "Q1_0 holds -d and +d only", extra=("--type", "q2_0", "--embedding-type", "q1_0"), in_data=True)


def test_float_embeddings_are_refused_naming_the_rows(tmp_path, out):
    """An ordinary Bonsai-like checkpoint (float embedding): not ternary from row 0 on."""
    from tests.test_group_scaled import edit_tensor

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, ternary_embeddings=True)

    def spoil(w):  # one value of row 5 gets a second magnitude in its group
        w[5, 3] = np.float16(0.3)
        return w
    edit_tensor(model, "model.embed_tokens.weight", spoil)
    refused(model, out, "tensor model.embed_tokens.weight: --embedding-type q2_0", "1 of its",
            "(the first: row 5) are not ternary", "choose --embedding-type f16",
            extra=("--type", "q2_0", "--embedding-type", "q2_0"), in_data=True)


def test_rows_that_are_not_whole_blocks_are_refused_before_any_work(tmp_path, out):
    model = write_checkpoint(tmp_path / "m", "bonsai", **(SHAPE | dict(hidden_size=320, num_heads=5, num_kv_heads=1)),
                             group_size=64, ternary_embeddings=True)
    refused(model, out, "--embedding-type q1_0", "rows of 320 values, not a multiple of 128",
            extra=("--type", "q2_0", "--embedding-type", "q1_0"))


def test_other_families_are_refused_before_any_work(tmp_path, out):
    model = write_checkpoint(tmp_path / "m", "1bitllm", num_layers=1)
    refused(model, out, "--embedding-type q2_0 holds ternary or binary embeddings", "choose f16",
            extra=("--embedding-type", "q2_0"))


def test_a_ternary_type_keeps_f16_embeddings_by_default_and_help_lists_the_new_choices(models):
    checkpoints, _ = models
    plan = run_cli("plan", checkpoints["ternary"], "--type", "q2_0").stdout
    line = next(x for x in plan.splitlines() if x.startswith("token_embd.weight"))
    assert " F16 " in line, line
    text = " ".join(run_cli("convert", "--help").stdout.split())
    assert "type of token_embd and output: f16 (" in text and "q2_0 (2.25 bits/weight" in text
