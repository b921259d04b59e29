"""Qwen3.5 (GGUF arch qwen35: gated delta-net and full-attention layers), group-scaled ternary
(Ternary-Bonsai-27B's architecture), against llama.cpp's own converter and runtime.

llama.cpp's converter (conversion/qwen.py, Qwen3_5TextModel) is run with `--no-mtp` (the synthetic
checkpoints have no MTP layers, and it stops without them otherwise) through tests/reference_convert.py
(it names the BPE pre-tokenizer). Its `--outtype f32` / `f16` files and ours must hold the same
key/values and the same bytes. Q2_0 projections are decoded by tests/test_codecs.py's transcription of
llama.cpp's dequantizer and compared with the checkpoint's values put in llama.cpp's order by the
rule written here from the converter (value heads from grouped by key head to tiled).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import ROOT, convert, read_source_tensors, run_cli, run_python_script
from tests.synthetic import write_qwen35_checkpoint

CASES = {
    # 2 key heads, 4 value heads: the V reorder moves rows of in_proj_qkv / z / a / b, conv1d, A_log,
    # dt_bias and the columns of out_proj; untied head
    "causal": dict(linear_key_heads=2, linear_value_heads=4, seed=1),
    # the multimodal layout (text_config, model.language_model.*, a vision tensor), tied embeddings
    "conditional-tied": dict(conditional=True, tied=True, linear_key_heads=2, linear_value_heads=6, seed=2),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, write_qwen35_checkpoint(root / "m", **CASES[request.param])


@pytest.fixture(scope="module")
def ours(case):
    """out_type -> (our file of the case's checkpoint, the command's stderr), each converted once
    (tests only read them)."""
    _, model = case
    made = {}

    def get(out_type: str):
        if out_type not in made:
            out = model.parent / f"ours-{out_type}.gguf"
            made[out_type] = out, convert(model, out, "--type", out_type).stderr
        return made[out_type]
    return get


def reference(model_dir, out, out_type):
    base = ROOT / "build" / "llama.cpp-convert"
    python, src = base / "venv" / "bin" / "python", base / "src"
    if os.environ.get("BITNET_GGUF_SKIP_LLAMA") == "1":
        pytest.skip("BITNET_GGUF_SKIP_LLAMA=1")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    proc = run_python_script(python, ROOT / "tests" / "reference_convert.py", src, "llama-bpe", model_dir,
                             "--outtype", out_type, "--no-mtp", "--outfile", out, env=env)
    assert proc.returncode == 0, f"llama.cpp's converter failed:\n{proc.stderr[-4000:]}"
    return out


@pytest.mark.llama
@pytest.mark.parametrize("out_type", ["f32", "f16"])
def test_float_files_equal_llama_cpps(case, ours, out_type, tmp_path):
    from tests.test_reference_converter import compare_with_llama_cpp

    name, model = case
    path, stderr = ours(out_type)
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    if name.startswith("conditional"):  # the vision tower: one line, naming llama.cpp's mmproj route
        assert len(warnings) == 1 and "model.visual." in warnings[0] and "--mmproj" in warnings[0], stderr
    theirs = reference(model, tmp_path / f"theirs-{out_type}.gguf", out_type)
    compare_with_llama_cpp(path, theirs)


def to_llama_order(values: np.ndarray, axis: int, first: int, n_k: int, n_v: int, head: int) -> np.ndarray:
    """Value heads after index `first` along `axis`: HF keeps them grouped by key head (head j of key
    head k at k * n_v/n_k + j); llama.cpp's converter writes them tiled (at j * n_k + k)."""
    moved = np.moveaxis(values, axis, 0)
    tail = moved[first:].reshape(n_k, n_v // n_k, head, *moved.shape[1:]).swapaxes(0, 1).reshape(moved[first:].shape)
    return np.moveaxis(np.concatenate([moved[:first], tail]), 0, axis)


def expected_projections(model) -> dict[str, np.ndarray]:
    """GGUF name -> the checkpoint's values of every ternary projection, in llama.cpp's order."""
    cfg = json.loads((model / "config.json").read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}
    n_k, n_v = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    src = read_source_tensors(model)
    p = "model.language_model.layers." if "text_config" in json.loads((model / "config.json").read_text()) \
        else "model.layers."
    out = {}
    for b, kind in enumerate(cfg["layer_types"]):
        w = {k.removeprefix(f"{p}{b}."): v for k, v in src.items() if k.startswith(f"{p}{b}.")}
        names = {"ffn_gate": w["mlp.gate_proj.weight"], "ffn_up": w["mlp.up_proj.weight"],
                 "ffn_down": w["mlp.down_proj.weight"]}
        if kind == "linear_attention":
            names |= {"attn_qkv": to_llama_order(w["linear_attn.in_proj_qkv.weight"], 0, 2 * n_k * dk, n_k, n_v, dv),
                      "attn_gate": to_llama_order(w["linear_attn.in_proj_z.weight"], 0, 0, n_k, n_v, dv),
                      "ssm_out": to_llama_order(w["linear_attn.out_proj.weight"], 1, 0, n_k, n_v, dv)}
        else:
            names |= {"attn_q": w["self_attn.q_proj.weight"], "attn_k": w["self_attn.k_proj.weight"],
                      "attn_v": w["self_attn.v_proj.weight"], "attn_output": w["self_attn.o_proj.weight"]}
        out |= {f"blk.{b}.{k}.weight": v for k, v in names.items()}
    return out


@pytest.mark.parametrize("out_type", ["q2_0", "auto"])
def test_ternary_tensors_decode_to_the_checkpoints_values(case, ours, out_type, tmp_path):
    from pipeline.gguf_file import read_gguf
    from tests.test_codecs import q2_0_reference_decode
    from tests.test_group_scaled import tensor_bytes

    _, model = case
    out, _ = ours(out_type)
    types = {t.name: t.ggml_type for t in read_gguf(out).tensors}
    want = expected_projections(model)
    assert len(want) == 3 * 6 + 7  # 3 gated delta-net layers (6 projections) and 1 full (7)
    for name, values in want.items():
        assert types[name] == 42, name  # Q2_0
        raw, shape = tensor_bytes(out, name)
        assert len(np.unique(np.abs(values))) > 10, name  # many group scales
        np.testing.assert_array_equal(q2_0_reference_decode(raw.tobytes(), *shape), values, err_msg=name)
    # verify knows the reorders and transforms: the file is ok, one changed byte of a reordered tensor is not
    ok = run_cli("verify", out, model)
    assert "blk.0.ssm_out.weight: ok" in ok.stdout + ok.stderr
    t = next(t for t in read_gguf(out).tensors if t.name == "blk.0.ssm_out.weight")
    raw = bytearray(out.read_bytes())
    raw[t.offset + 18 * 3 + 5] ^= 0x04
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    proc = run_cli("verify", bad, model, check_exit=1)
    assert "blk.0.ssm_out.weight" in proc.stdout + proc.stderr


@pytest.mark.llama
def test_q2_0_file_runs_like_the_f32_file_in_llamacpp(llama, case, ours):
    """llama.cpp runs both; the Q2_0 file (its Q2_0 x Q8_0 kernel: 8-bit activations) stays within the
    limits the F32 rewrites of other tests use (measured on "causal": 0.17% worst, 0.12% mean, top-1 100%)."""
    from tokenizers import Tokenizer

    from tests.test_llamacpp import N_TOKENS, TEXT, llama_logits
    from tests.test_llamacpp_families import EXACT_MAX, EXACT_MEAN, check_logits

    _, model = case
    (f32, _), (q2, _) = ours("f32"), ours("q2_0")
    tokens = Tokenizer.from_file(str(model / "tokenizer.json")).encode(TEXT + " " + TEXT).ids[:N_TOKENS]
    n_vocab = json.loads((model / "config.json").read_text()).get("vocab_size") or \
        json.loads((model / "config.json").read_text())["text_config"]["vocab_size"]
    want = llama_logits(llama, f32, tokens, n_vocab)
    assert want.std() > 0.5  # not a flat output: the comparison below means something
    check_logits(llama_logits(llama, q2, tokens, n_vocab), want, EXACT_MAX, EXACT_MEAN, 0.9)


# -- refusals: one line, exit 2 -------------------------------------------------------------------

def rewrite_config(model, change) -> None:
    path = model / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, needles", [
    (lambda c: c.update(architectures=["Qwen3_5MoeForCausalLM"]), ("qwen35moe", "not supported")),
    (lambda c: c.update(quantization_config={"quant_method": "prism", "rotation": "hadamard"}),
     ("hadamard", "Hadamard-rotated")),
    (lambda c: c.update(prism={"hadamard": True}), ("prism.hadamard", "Hadamard-rotated")),
    (lambda c: c["rope_parameters"].update(rope_type="yarn", factor=4.0), ("rope_parameters", "not supported")),
    (lambda c: c.update(layer_types=c["layer_types"][:-1]), ("layer_types",)),
    (lambda c: c.update(linear_num_value_heads=3), ("linear_num_value_heads",)),
])
def test_refusals_are_one_line(tmp_path, change, needles):
    from tests.test_bad_input import expect_refusal

    model = write_qwen35_checkpoint(tmp_path / "m", num_layers=4)
    rewrite_config(model, change)
    out = tmp_path / "out"
    out.mkdir()
    line = expect_refusal(model, out / "m.gguf", *needles)
    assert "config.json" in line


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_qwen35_checkpoint(tmp_path_factory.mktemp("plan") / "m", num_layers=4)


@pytest.mark.parametrize("requantize", [False, True], ids=["", "allow-requantize"])
@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0", "auto", "q2_0", "q1_0", "tq2_0", "tq1_0", "i2_s",
                                      "tl1", "tl2"])
def test_plan_of_every_type_is_a_plan_or_one_line(small, out_type, requantize, capsys):
    """As tests/test_type_family_matrix.py for the other families (qwen35 has a writer of its own)."""
    from pipeline.cli import main

    argv = ["plan", str(small), "--type", out_type, "-o", str(small.parent / "x.gguf")]
    code = main(argv + (["--allow-requantize"] if requantize else []))
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code == 0:
        assert out.strip() and not err.strip(), err
    else:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bitnet-gguf: error: "), err
