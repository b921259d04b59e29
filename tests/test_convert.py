"""End to end: build a 1bitLLM-family checkpoint, convert it with the CLI, read the GGUF back."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import sentencepiece as spm

from tests.conftest import absmean_reference, convert, read_source_tensors

Q = gguf.GGMLQuantizationType

# HF name -> GGUF name for the bitnet arch, as FORMATS.md lists them
BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.inner_attn_ln": "attn_sub_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "mlp.ffn_layernorm": "ffn_sub_norm",
}
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def hf_to_gguf(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, bid, rest = hf.split(".", 3)
    return f"blk.{bid}.{BLOCK_NAMES[rest.removesuffix('.weight')]}.weight"


def field(reader: gguf.GGUFReader, key: str):
    return reader.get_field(key).contents()


def check_gguf(path, model_dir, out_type: str, config_overrides=None):
    """Everything a user would check in the file, against the source checkpoint."""
    reader = gguf.GGUFReader(path)
    source = read_source_tensors(model_dir)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {hf_to_gguf(n) for n in source}, "tensor names differ (no 'output' for bitnet)"
    qtype = Q[out_type.upper()]
    for hf, w in source.items():
        t = tensors[hf_to_gguf(hf)]
        assert tuple(int(x) for x in reversed(t.shape)) == w.shape, t.name  # GGUF lists ne[0] first
        is_proj = hf.split(".")[-2] in PROJECTIONS
        if is_proj:
            expected_q = absmean_reference(w)
            if w.shape[-1] % 256 == 0:
                assert t.tensor_type == qtype, t.name
                want = gguf.quants.quantize(expected_q, qtype)
                assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), f"{t.name}: bytes differ"
            else:
                assert t.tensor_type == Q.F16, f"{t.name}: row length {w.shape[-1]} must fall back to F16"
                assert np.array_equal(np.asarray(t.data).reshape(w.shape), expected_q.astype(np.float16)), t.name
        elif w.ndim == 1:
            assert t.tensor_type == Q.F32, t.name
            assert np.array_equal(np.asarray(t.data), w), t.name
        else:
            assert t.tensor_type == Q.F16, t.name
            assert np.array_equal(np.asarray(t.data).reshape(w.shape), w.astype(np.float16)), t.name
    return reader


def check_metadata(reader, model_dir, out_type):
    import json
    cfg = json.loads((model_dir / "config.json").read_text())
    assert field(reader, "general.architecture") == "bitnet"
    assert field(reader, "general.file_type") == {"tq1_0": 36, "tq2_0": 37}[out_type]
    assert field(reader, "general.quantization_version") == 2
    expect = {
        "bitnet.context_length": cfg["max_position_embeddings"], "bitnet.embedding_length": cfg["hidden_size"],
        "bitnet.block_count": cfg["num_hidden_layers"], "bitnet.feed_forward_length": cfg["intermediate_size"],
        "bitnet.attention.head_count": cfg["num_attention_heads"],
        "bitnet.attention.head_count_kv": cfg["num_key_value_heads"],
        "bitnet.rope.scaling.type": "linear",
    }
    for key, value in expect.items():
        assert field(reader, key) == value, key
    assert field(reader, "bitnet.rope.freq_base") == pytest.approx(cfg["rope_theta"])
    assert field(reader, "bitnet.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert field(reader, "bitnet.rope.scaling.factor") == 1.0
    # tokenizer: SentencePiece pieces, then [PAD] rows up to the embedding's vocab_size
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == cfg["vocab_size"] > sp.vocab_size()
    assert tokens[:sp.vocab_size()] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert tokens[sp.vocab_size():] == [f"[PAD{i}]" for i in range(sp.vocab_size(), cfg["vocab_size"])]
    scores = field(reader, "tokenizer.ggml.scores")
    assert scores[:sp.vocab_size()] == pytest.approx([sp.get_score(i) for i in range(sp.vocab_size())])
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN and types[sp.bos_id()] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED
    assert field(reader, "tokenizer.ggml.bos_token_id") == sp.bos_id()
    assert field(reader, "tokenizer.ggml.eos_token_id") == sp.eos_id()


@pytest.mark.parametrize("dtype,shards,out_type", [
    ("f32", 1, "tq2_0"),
    ("f16", 3, "tq1_0"),
    ("bf16", 1, "tq1_0"),
    ("bf16", 2, "tq2_0"),
])
def test_convert_matches_independent_reference(checkpoint, tmp_path, dtype, shards, out_type):
    model = checkpoint(dtype=dtype, shards=shards, num_heads=4, num_kv_heads=2)
    out = tmp_path / f"model-{out_type}.gguf"
    proc = convert(model, out, "--type", out_type, "--memory-limit", "1GiB")
    assert out.is_file() and not out.with_name(out.name + ".partial").exists()
    assert "run directory" in proc.stderr
    reader = check_gguf(out, model, out_type)
    check_metadata(reader, model, out_type)


def test_row_length_not_multiple_of_256_falls_back_to_f16(checkpoint, tmp_path):
    model = checkpoint(hidden_size=256, intermediate_size=320, num_heads=4)
    out = tmp_path / "m.gguf"
    proc = convert(model, out)
    assert "ffn_down" in proc.stderr and "F16" in proc.stderr  # the warning names tensor and type
    check_gguf(out, model, "tq2_0")


def test_rerun_skips_finished_stages_and_new_type_redoes_only_pack(checkpoint, tmp_path):
    model = checkpoint()
    out = tmp_path / "m.gguf"
    convert(model, out)
    first = out.read_bytes()
    again = convert(model, out)
    for stage in ("extract", "quantize", "pack", "assemble"):
        assert f"{stage}: already done" in again.stderr
    assert out.read_bytes() == first
    out1 = tmp_path / "m1.gguf"
    switched = convert(model, out1, "--type", "tq1_0", "--workdir", str(tmp_path / "m.gguf.work"))
    assert "extract: already done" in switched.stderr and "quantize: already done" in switched.stderr
    assert "pack: already done" not in switched.stderr
    # and it says why, and which stages it redoes
    assert "pack: --type (tq2_0 -> tq1_0) changed since it was done: redoing pack, assemble; extract, quantize " \
           "reused" in switched.stderr, switched.stderr
    check_gguf(out1, model, "tq1_0")


@pytest.mark.parametrize("change, expected", [
    (["--embedding-type", "bf16"], "pack: --embedding-type (f16 -> bf16) changed"),
    (["--type", "i2_s", "--target", "arm"], "pack: --type (tq2_0 -> i2_s) changed"),
    (["--split-max-tensors", "7"], "assemble: --split-max-tensors (0 -> 7) changed"),
    (["-o", "{tmp}/elsewhere.gguf"], "assemble: -o ({tmp}/m.gguf -> {tmp}/elsewhere.gguf) changed"),
])
def test_a_rerun_with_other_options_names_what_changed_and_redoes_only_what_it_touches(checkpoint, tmp_path, change,
                                                                                         expected):
    model = checkpoint()
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    convert(model, out, "--workdir", str(work))
    change = [c.format(tmp=tmp_path) for c in change]
    expected = expected.format(tmp=tmp_path)
    rerun = convert(model, out, "--workdir", str(work), *change)
    stage = expected.split(":")[0]
    assert expected in rerun.stderr, rerun.stderr
    for before in ("extract", "quantize", "pack", "assemble")[:("extract", "quantize", "pack", "assemble").index(stage)]:
        assert f"{before}: already done" in rerun.stderr, rerun.stderr
    assert f"{stage}: already done" not in rerun.stderr
    again = convert(model, out, "--workdir", str(work), *change)
    assert again.stderr.count("already done") == 4 and "changed since" not in again.stderr


def test_local_cluster_writes_the_same_bytes(checkpoint, tmp_path):
    model = checkpoint(num_kv_heads=2)
    threads, cluster = tmp_path / "threads.gguf", tmp_path / "cluster.gguf"
    convert(model, threads)
    convert(model, cluster, "--cluster", "local", "--workers", "2", "--memory-limit", "2GiB")
    assert threads.read_bytes() == cluster.read_bytes()


def test_existing_dask_cluster_writes_the_same_bytes(checkpoint, tmp_path):
    from distributed import LocalCluster

    model = checkpoint()
    threads, remote = tmp_path / "threads.gguf", tmp_path / "remote.gguf"
    convert(model, threads)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        convert(model, remote, "--scheduler", cluster.scheduler_address)
    assert threads.read_bytes() == remote.read_bytes()


def test_tensors_split_into_several_chunks_match_the_reference(checkpoint, tmp_path):
    """The out-of-core path proper: projections and embedding span several row chunks, so the
    absmean scale is reduced across chunks and the packed bytes are written chunk by chunk."""
    import json

    from tests.conftest import run_cli

    model = checkpoint(hidden_size=1024, intermediate_size=4096, num_layers=1, num_heads=8, num_kv_heads=2,
                       vocab_size=8192, dtype="bf16")
    out = tmp_path / "m.gguf"
    convert(model, out, "--memory-limit", "512MiB")
    report = json.loads(run_cli("inspect", tmp_path / "m.gguf.work", "--json").stdout)
    chunks = {name: int(t["chunks"].split("/")[1]) for name, t in report["stores"]["quantize"]["tensors"].items()}
    assert chunks["blk.0.ffn_gate.weight"] >= 2 and chunks["token_embd.weight"] >= 2, chunks
    check_gguf(out, model, "tq2_0")


def test_added_tokens_take_their_rows_with_the_right_types(checkpoint, tmp_path):
    """Added tokens, as FORMATS.md and llama.cpp's converter describe them: added_tokens.json
    entries are user-defined; added_tokens_decoder entries are control tokens when marked
    special or when they look like <...> / <|...|> / [...], else user-defined with '\u2581'
    shown as a space; all score -1000; ids past vocab_size are ignored."""
    import json

    model = checkpoint(added_tokens=True)
    out = tmp_path / "m.gguf"
    convert(model, out)
    reader = gguf.GGUFReader(out)
    n = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model")).vocab_size()
    cfg = json.loads((model / "config.json").read_text())
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    T = gguf.TokenType
    assert (tokens[n], types[n]) == ("<pad>", T.CONTROL)              # special in the decoder
    assert (tokens[n + 1], types[n + 1]) == ("extra\u2581word", T.USER_DEFINED)  # added_tokens.json only
    assert (tokens[n + 2], types[n + 2]) == ("<|im_start|>", T.CONTROL)  # looks special
    assert (tokens[n + 3], types[n + 3]) == ("two words", T.USER_DEFINED)
    assert scores[n:n + 4] == [-1000.0] * 4
    assert len(tokens) == cfg["vocab_size"] and "<beyond>" not in tokens
    assert field(reader, "tokenizer.ggml.padding_token_id") == n
