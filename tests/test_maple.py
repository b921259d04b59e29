"""DeepGrove Maple (MapleForCausalLM, GGUF arch maple): a ternary mixture of experts whose bf16
projections are {-s_r, 0, +s_r} per output row, against llama.cpp's own converter and runtime.

llama.cpp's converter (conversion/maple.py, run through tests/reference_convert.py, which names the BPE
pre-tokenizer) stacks each layer's experts into one [n_expert, rows, cols] tensor per projection. Our
`--type f32 --embedding-type f32` file must be its `--outtype f32` file (every key/value, every
tensor's bytes); our TQ2_0 / TQ1_0 / Q2_0 files must decode, expert by expert, to the checkpoint's
values exactly (gguf's dequantizer; the transcription of llama.cpp's Q2_0 one), and run in llama.cpp
near the f32 file. Each expert is converted as a tensor of its own, so a kill in pack in the middle of
a stack resumes to the same bytes; a missing or misshapen expert is refused before any work.
"""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from tests.conftest import ROOT, convert, read_source_tensors, run_cli, run_python_script
from tests.synthetic import MAPLE_ATTENTION, MAPLE_EXPERT, maple_layer_types, write_maple_checkpoint
from tests.test_llamacpp import N_CTX
from tests.test_llamacpp_families import EXACT_MAX, EXACT_MEAN, check_logits
from tests.test_minicpm import file_values
from tests.test_reference_converter import compare_with_llama_cpp, llama_convert  # noqa: F401

SHAPE = dict(num_layers=4, num_experts=4, experts_per_tok=2)
ATTENTION = dict(zip(MAPLE_ATTENTION, ("attn_q", "attn_k", "attn_v", "attn_output")))
EXPERTS = dict(zip(MAPLE_EXPERT, ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")))


def reference_convert(llama_convert, model, out, out_type: str):  # noqa: F811
    """llama.cpp's converter through tests/reference_convert.py (it names the BPE pre-tokenizer)."""
    python, script = llama_convert
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    proc = run_python_script(python, ROOT / "tests" / "reference_convert.py", script.parent, "llama-bpe", model,
                             "--outtype", out_type, "--outfile", out, env=env)
    assert proc.returncode == 0, f"llama.cpp's converter failed:\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_maple_checkpoint(tmp_path_factory.mktemp("maple") / "maple", **SHAPE)


@pytest.fixture(scope="module")
def converted(model):
    """out_type -> our file of the checkpoint in that type (made once per module)."""
    files = {}

    def get(out_type: str):
        if out_type not in files:
            files[out_type] = model.parent / f"{out_type}.gguf"
            convert(model, files[out_type], "--type", out_type)
        return files[out_type]
    return get


@pytest.fixture(scope="module")
def maple(model, llama_convert):  # noqa: F811
    """(checkpoint, llama.cpp's f32 file of it)."""
    return model, reference_convert(llama_convert, model, model.parent / "reference-f32.gguf", "f32")


def expected_projections(model) -> dict[str, np.ndarray]:
    """GGUF name -> the checkpoint's values of every ternary projection, experts stacked in order
    (written here from the converter: torch.stack of experts 0..n-1 of each layer and projection)."""
    src = read_source_tensors(model)
    out = {}
    for b in range(SHAPE["num_layers"]):
        p = f"model.layers.{b}."
        out |= {f"blk.{b}.{g}.weight": src[p + hf + ".weight"] for hf, g in ATTENTION.items()}
        out |= {f"blk.{b}.{g}.weight": np.stack([src[f"{p}mlp.experts.{x}.{hf}.weight"]
                                                 for x in range(SHAPE["num_experts"])])
                for hf, g in EXPERTS.items()}
    return out


def test_f32_is_llama_cpps_file(maple, tmp_path):
    """Every key/value (sliding window and its pattern, expert counts and lengths, swiglu_clamp_exp,
    the partial rope dimension) and every tensor's bytes, the stacked experts among them."""
    model, reference = maple
    ours = tmp_path / "ours.gguf"
    convert(model, ours, "--type", "f32", "--embedding-type", "f32")
    compare_with_llama_cpp(ours, reference)
    from pipeline.gguf_file import read_gguf

    contents = read_gguf(ours)
    config = json.loads((model / "config.json").read_text())
    # what llama.cpp's loader reads (src/models/maple.cpp), from config.json as the modeling code means it
    assert contents.kv("maple.attention.sliding_window_pattern") == [k == "sliding_attention"
                                                                      for k in maple_layer_types(4)]
    assert contents.kv("maple.attention.sliding_window_pattern") == [True, True, True, False]
    assert contents.kv("maple.expert_count") == 4 and contents.kv("maple.expert_used_count") == 2
    assert contents.kv("maple.rope.dimension_count") == 32  # head_dim 64 x partial_rotary_factor 0.5
    assert contents.kv("maple.swiglu_clamp_exp") == [7.0] * 4
    assert contents.kv("maple.expert_feed_forward_length") == config["moe_intermediate_size"]
    stacked = next(t for t in contents.tensors if t.name == "blk.1.ffn_down_exps.weight")
    assert stacked.shape == (4, 256, 256)
    # llama.cpp's experts are the checkpoint's, stacked in order (as ours: compared above)
    theirs = file_values(reference)
    for name, values in expected_projections(model).items():
        np.testing.assert_array_equal(theirs[name][1], values, err_msg=name)


def test_tq2_0_is_llama_cpps_tq2_0_file(model, converted, llama_convert, tmp_path):  # noqa: F811
    """Row scales are exact in TQ2_0, so llama.cpp's own `--outtype tq2_0` (gguf.quants of the
    values: d = max |x| per 256-value block) writes the very bytes we do, stacks included."""
    compare_with_llama_cpp(converted("tq2_0"), reference_convert(llama_convert, model, tmp_path / "t.gguf", "tq2_0"))


@pytest.mark.parametrize("out_type", ["tq2_0", "tq1_0", "q2_0"])
def test_ternary_types_hold_every_expert_exactly(model, converted, out_type):
    ours = converted(out_type)
    want, got = expected_projections(model), file_values(ours)
    type_name = {"tq2_0": "TQ2_0", "tq1_0": "TQ1_0", "q2_0": "Q2_0"}[out_type]
    assert len(want) == SHAPE["num_layers"] * 7
    for name, values in want.items():
        assert got[name][0] == type_name, name
        rows = np.abs(values.reshape(-1, values.shape[-1]))
        top = rows.max(axis=1, keepdims=True)
        assert ((rows == top) | (rows == 0)).all() and len(np.unique(top)) > 16, f"{name}: one scale per row"
        np.testing.assert_array_equal(got[name][1], values, err_msg=name)
    checked = run_cli("verify", ours, model)
    assert "blk.3.ffn_up_exps.weight: ok" in checked.stdout + checked.stderr
    assert "OK: key/values, tensors and length" in checked.stdout + checked.stderr


# against the f32 file, measured: TQ2_0 and TQ1_0 0.34% worst, 0.24% mean; Q2_0 2.0% worst (one position,
# where its 8-bit activations flip the router's top-2 choice: a mixture of experts is not continuous
# there), 0.26% mean; top-1 100% for all three
MOE_MAX = 0.05


TOKENS = [int(t) for t in np.random.default_rng(0).integers(3, 300, 24)]


@pytest.fixture(scope="module")
def reference_logits(maple, llama):
    """llama.cpp's logits of llama.cpp's f32 file for TOKENS, evaluated once for the tests that read them."""
    return llama.logits(maple[1], TOKENS, n_ctx=N_CTX)


@pytest.mark.llama
@pytest.mark.parametrize("out_type, limits", [("q2_0", (MOE_MAX, EXACT_MEAN, 0.9)),
                                               ("tq2_0", (EXACT_MAX, EXACT_MEAN, 0.9)),
                                               ("tq1_0", (EXACT_MAX, EXACT_MEAN, 0.9))])
def test_runs_in_llama_cpp_near_llama_cpps_f32_file(maple, llama, reference_logits, converted, out_type, limits):
    """llama.cpp runs llama.cpp's f32 file and ours (8-bit activations in the ternary kernels, and an
    F16 embedding and head: the tests' quantization noise)."""
    model, reference = maple
    ours = converted(out_type)
    n_vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    tokens, want = TOKENS, reference_logits
    assert want.shape == (len(tokens), n_vocab) and want.std() > 0.5  # not a flat output
    check_logits(llama.logits(ours, tokens, n_ctx=N_CTX), want, *limits)


def test_inspect_shows_every_expert_of_a_stack(converted):
    out = converted("q2_0")
    shown = run_cli("inspect", str(out) + ".work", "blk.2.ffn_gate_exps.weight").stdout
    assert "a stack of 4 experts" in shown
    for x in range(4):
        assert f"model.layers.2.mlp.experts.{x}.gate_proj.weight" in shown
    assert shown.count("scale per row") == 4


def test_plot_draws_every_experts_row_scales_from_the_checkpoint(model, converted, tmp_path):
    """`inspect --plot` of a mixture of experts: a PNG whose expert panels hold each expert's median
    row scale by layer and, for the middle layer, the scale of every row of every expert; the
    values drawn are the checkpoint's (the magnitude of each {-s_r, 0, +s_r} row), read back from
    the figure's images."""
    from matplotlib.image import imread

    from pipeline.inspect_run import collect_layer_stats, draw
    from pipeline.rundir import RunDir

    work = str(converted("q2_0")) + ".work"
    png = tmp_path / "maple.png"
    proc = run_cli("inspect", work, "--plot", png)
    assert f"{SHAPE['num_experts']} experts a stack" in proc.stderr, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(png).shape  # the whole file decodes
    assert width >= 800 and height >= 1000, (width, height)

    src = read_source_tensors(model)
    n_layers, n_experts, middle = SHAPE["num_layers"], SHAPE["num_experts"], SHAPE["num_layers"] // 2
    images = {ax.get_title(): ax.images[0].get_array() for ax in draw(collect_layer_stats(RunDir(work)), "t").axes
              if ax.images}
    for hf, stack in EXPERTS.items():
        rows = {(b, x): np.abs(src[f"model.layers.{b}.mlp.experts.{x}.{hf}.weight"]).max(axis=1)
                for b in range(n_layers) for x in range(n_experts)}
        medians = images[f"{stack}: median row scale of each expert (grey: not written)"]
        want = np.array([[np.median(rows[b, x][rows[b, x] > 0]) for b in range(n_layers)] for x in range(n_experts)])
        np.testing.assert_allclose(np.ma.getdata(medians), want, rtol=1e-6)
        picture = images[f"blk.{middle}.{stack}: scale of each row of each expert"]
        want = np.stack([rows[middle, x] for x in range(n_experts)])
        assert not np.ma.getmaskarray(picture).any() and (want > 0).all()
        np.testing.assert_allclose(np.ma.getdata(picture), want, rtol=1e-6)


def test_a_split_set_counts_a_stack_as_one_tensor(model, tmp_path):
    """--split-max-tensors counts GGUF tensors: a stack of experts is one, never cut between parts."""
    from pipeline.gguf_file import read_gguf

    out = tmp_path / "s.gguf"
    convert(model, out, "--type", "tq2_0", "--split-max-tensors", "10")
    parts = sorted(tmp_path.glob("s-*-of-*.gguf"))
    n_tensors = 1 + 4 * (9 + 3) + 2  # token_embd; per layer 9 tensors and 3 stacks; output_norm, output
    assert len(parts) == -(-n_tensors // 10)
    names = [t.name for p in parts for t in read_gguf(p).tensors]
    assert len(names) == n_tensors and "blk.3.ffn_up_exps.weight" in names
    checked = run_cli("verify", parts[0], model)
    assert "OK: key/values, tensors and length" in checked.stdout + checked.stderr


def test_a_kill_in_pack_inside_a_stack_resumes_to_the_same_bytes(tmp_path):
    from tests import kill_points as kp

    model = write_maple_checkpoint(tmp_path / "m", num_layers=2, num_experts=12)
    extra = ("--type", "q2_0", "--workers", "1")
    clean, clean_work = tmp_path / "clean.gguf", tmp_path / "clean.work"
    convert(model, clean, "--memory-limit", "256MiB", "--workdir", clean_work, *extra)
    ref = kp.Reference(0.0, {s: kp.count_chunks(clean_work / f"{s}.zarr") for s in kp.CHUNK_STAGES},
                       clean.stat().st_size)
    for i, fraction in enumerate((0.5, 0.3, 0.7)):  # until a kill falls inside a stack (most do)
        out, work = tmp_path / f"k{i}.gguf", tmp_path / f"k{i}.work"
        kill = kp.interrupt(ROOT, model, out, work, kp.KillPoint("pack", fraction, signal.SIGKILL, "256MiB"), ref,
                            tmp_path / "log", *extra)
        assert kill.landed == "pack", kill
        written = {p.parent.parent.name for p in (work / "pack.zarr").glob("*/digests/0")}
        experts_done = [sum(f"blk.{b}.{g}.weight.{x}" in written for x in range(12))
                        for b in range(2) for g in EXPERTS.values()]
        if any(0 < n < 12 for n in experts_done):
            break
    else:
        pytest.fail(f"no kill fell between two experts of one stack: {experts_done}")
    convert(model, out, "--memory-limit", "256MiB", "--workdir", work, *extra)
    assert out.read_bytes() == clean.read_bytes(), kill


# -- refusals: one line, exit 2, before any work ----------------------------------------------------

@pytest.mark.parametrize("change, needles", [
    (dict(leave_out="model.layers.1.mlp.experts.2.up_proj.weight"),
     ("model.layers.1.mlp.experts.2.up_proj.weight", "expert 2 of the 4", "blk.1.ffn_up_exps.weight", "missing")),
    (dict(reshape="model.layers.2.mlp.experts.3.down_proj.weight"),
     ("model.layers.2.mlp.experts.3.down_proj.weight", "[255, 256]", "expert 3 of blk.2.ffn_down_exps.weight",
      "[256, 256]")),
])
def test_a_missing_or_misshapen_expert_is_refused_before_any_work(tmp_path, change, needles):
    from tests.test_bad_input import expect_refusal

    model = write_maple_checkpoint(tmp_path / "m", **SHAPE, **change)
    out = tmp_path / "out"
    out.mkdir()
    expect_refusal(model, out / "m.gguf", *needles)
    assert not (out / "m.gguf.work").exists()  # refused before any work


def rewrite_config(model, change) -> None:
    path = model / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_maple_checkpoint(tmp_path_factory.mktemp("small") / "m", num_layers=4, num_experts=2)


@pytest.mark.parametrize("change, needles", [
    (lambda c: c.update(nope_on_global_attention=False), ("nope_on_global_attention",)),
    (lambda c: c.update(num_shared_experts=1), ("num_shared_experts",)),
    (lambda c: c.update(layer_types=c["layer_types"][:-1]), ("layer_types",)),
    (lambda c: c.update(num_experts_per_tok=3), ("num_experts_per_tok",)),
    (lambda c: c["rope_parameters"].update(rope_type="yarn", factor=4.0), ("rope_parameters", "not supported")),
    (lambda c: c.update(rope_local_base_freq=10000.0), ("rope_local_base_freq", "not supported")),
])
def test_config_refusals_are_one_line(small, tmp_path, change, needles):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(small, model)
    rewrite_config(model, change)
    proc = run_cli("plan", model, check_exit=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0] and all(n in lines[0] for n in needles), proc.stderr


@pytest.mark.parametrize("out_type", ["i2_s", "tl2"])
def test_a_type_with_one_scale_per_tensor_is_refused_for_stacks(small, out_type):
    proc = run_cli("plan", small, "--type", out_type, "--allow-requantize", "-o", str(small.parent / "x.gguf"),
                   check_exit=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "one scale per tensor" in lines[0] and "blk.0.ffn_gate_exps.weight" in lines[0], proc.stderr


# run here on the Maple checkpoint (the `small` fixture above): every --type plans or is refused in one line
from tests.test_qwen35 import test_plan_of_every_type_is_a_plan_or_one_line  # noqa: E402, F401
