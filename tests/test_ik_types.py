"""`--type iq2_bn | iq1_bn | iq2_bn_r4` (ik_llama.cpp's ternary types) end to end.

Synthetic checkpoints of the families are converted with the CLI; every ternary tensor is
decoded with tests/ik_layouts.py (ik's decoders transliterated, not the converter's encoder, run
on whole arrays: NUMPY_DECODERS, held equal to the loops by tests/test_ik_codecs.py)
and compared with the effective weights computed by tests/reference_model.py. A requantized
group-scaled tensor must be byte-identical to ik's own quantizer (tests/ik_layouts.py) of the
checkpoint's values. Then: verify, inspect, plan, resume after a kill, --memory-limit, refusals.
"""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from pipeline.gguf_file import read_gguf
from tests import ik_layouts
from tests import kill_points as kp
from tests.conftest import ROOT, convert, read_source_tensors, run_cli, shared_checkpoint, shared_outputs
from tests.reference_model import effective_weights
from tests.synthetic import write_checkpoint
from tests.test_families import CASES as FAMILIES_CASES
from tests.test_families import FAMILY_FACTS, case_outputs, gguf_name, llama_permute

IK_TYPES = ("iq2_bn", "iq1_bn", "iq2_bn_r4")
# ids and llama file types from ik_llama.cpp's ggml.h / llama.h (docs/notes/ik-llama.md section 1)
GGML_ID = {"iq1_bn": 134, "iq2_bn": 135, "iq2_bn_r4": 335}
FILE_TYPE = {"iq1_bn": 136, "iq2_bn": 137, "iq2_bn_r4": 337}
KIND_OF_ID = {v: k for k, v in GGML_ID.items()}
F16_ID = 1

CASES = {
    # name: (family, checkpoint arguments); widths are multiples of 64 unless said
    "1bitllm-f16": ("1bitllm", dict(num_heads=4, num_kv_heads=2, dtype="f16")),              # master, absmean
    "llama3": ("llama3-1.58", dict(num_heads=8, num_kv_heads=2, num_layers=2)),  # packed, 1 / ws, q/k permuted
    "2b4t": ("2b4t", dict(num_heads=4, num_kv_heads=1, seed=3)),                             # packed, ws
    "2b4t-bf16": ("2b4t-bf16", dict(num_heads=4, num_kv_heads=2, seed=4)),                  # master bf16
    "falcon-e": ("falcon-e", dict(num_heads=4, num_kv_heads=2, head_dim=128, seed=9)),
    "bonsai-uniform": ("bonsai", dict(num_heads=4, num_kv_heads=2, group_size=0, seed=17)),  # one scale per tensor
    # FFN 322: gate/up have 322 rows (not a multiple of 4: IQ2_BN_R4 -> IQ2_BN), down 322 columns
    # (not whole 64-value blocks: F16)
    "odd-ffn": ("1bitllm", dict(hidden_size=256, intermediate_size=322, num_heads=4, seed=5)),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ik")


# the cases of tests/test_families.py's CASES are read from its conversions (case_outputs: one
# `--type a,b,c` of every type a case is read at, once per run); the others to the three types here
OWN_CASES = [c for c in CASES if c not in FAMILIES_CASES or CASES[c] != FAMILIES_CASES[c]]


def ik_outputs(tmp_path_factory, case: str) -> tuple[Path, dict[str, tuple[Path, str]]]:
    """(checkpoint, type -> (GGUF, what its conversion printed)) of the case at every type here (and,
    for a case of tests/test_families.py, at the others that file reads)."""
    if case not in OWN_CASES:
        return case_outputs(tmp_path_factory, case)
    family, kw = CASES[case]
    model = shared_checkpoint(tmp_path_factory, family, **kw)
    return model, shared_outputs(tmp_path_factory, model, IK_TYPES)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    logs = {}

    def get(case: str, out_type: str):
        model, outputs = ik_outputs(tmp_path_factory, case)
        out, logs[out] = outputs[out_type]
        return model, out
    get.logs = logs  # the GGUF -> what its conversion printed
    return get


def expected_values(w: np.ndarray, kind: str) -> np.ndarray:
    """What ik's decoder must give for effective weights w: per row the code times the row's one
    magnitude, float32 (IQ2_BN's row meta) or fp16 (IQ1_BN's)."""
    w = w.astype(np.float32)
    mags = np.abs(w).max(axis=1, keepdims=True)
    nonzero = np.abs(w[w != 0])
    rows_of = np.nonzero(w)[0]
    assert np.array_equal(nonzero, mags[rows_of, 0]), "the effective weights are not ternary per row"
    d = mags.astype(np.float16).astype(np.float32) if kind == "iq1_bn" else mags
    return (np.sign(w) * d).astype(np.float32)


PARAMS = [(c, t) for c in CASES for t in IK_TYPES]


@pytest.mark.parametrize("case,out_type", PARAMS, ids=[f"{c}-{t}" for c, t in PARAMS])
def test_every_ternary_tensor_decodes_with_iks_decoder_to_the_effective_weights(converted, case, out_type):
    model, out = converted(case, out_type)
    family = CASES[case][0]
    arch, permuted, _ = FAMILY_FACTS[family]
    config = json.loads((model / "config.json").read_text())
    contents = read_gguf(out)
    assert contents.kv("general.architecture") == arch
    assert contents.kv("general.file_type") == FILE_TYPE[out_type]
    tensors = {t.name: t for t in contents.tensors}
    raw = out.read_bytes()
    seen = set()
    for hf, w in effective_weights(model).items():
        name = gguf_name(hf)
        t = tensors[name]
        if w.ndim != 2 or name in ("token_embd.weight", "output.weight"):
            assert t.ggml_type not in KIND_OF_ID, name
            continue
        if permuted and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = llama_permute(w, config["num_attention_heads"] if "attn_q" in name else config["num_key_value_heads"])
        rows, cols = w.shape
        data = raw[t.offset:t.offset + t.nbytes]
        if cols % 64:  # not whole blocks: F16 of the effective weights, as for every ternary type
            assert t.ggml_type == F16_ID, name
            np.testing.assert_array_equal(np.frombuffer(data, "<f2").reshape(w.shape),
                                          w.astype(np.float32).astype(np.float16), err_msg=name)
            seen.add("f16")
            continue
        kind = "iq2_bn" if out_type == "iq2_bn_r4" and rows % 4 else out_type
        assert t.ggml_type == GGML_ID[kind], (name, t.ggml_type)
        seen.add(kind)
        got = ik_layouts.NUMPY_DECODERS[kind](data, rows, cols)  # the loops' values (tests/test_ik_codecs.py)
        np.testing.assert_array_equal(got, expected_values(w, kind), err_msg=name)
    assert out_type in seen
    if case == "odd-ffn":  # both fallbacks happened
        assert "f16" in seen and (out_type != "iq2_bn_r4" or "iq2_bn" in seen), seen


@pytest.mark.parametrize("out_type", IK_TYPES)
def test_verify_passes_and_finds_one_flipped_byte(converted, root, out_type):
    model, out = converted("llama3", out_type)
    proc = run_cli("verify", out, model)
    assert "OK" in proc.stdout + proc.stderr
    t = next(t for t in read_gguf(out).tensors if t.name == "blk.1.ffn_up.weight")
    for where, offset in (("blocks", t.offset + t.nbytes // 2), ("row meta", t.offset + 1)):
        bad = root / f"bad-{out_type}-{where.replace(' ', '')}.gguf"
        data = bytearray(out.read_bytes())
        data[offset] ^= 0x04
        bad.write_bytes(bytes(data))
        proc = run_cli("verify", bad, model, check_exit=1)
        assert "blk.1.ffn_up.weight: bytes differ" in proc.stdout + proc.stderr, (where, proc.stdout, proc.stderr)


@pytest.mark.parametrize("case", ["1bitllm-f16", "2b4t-bf16", "bonsai-uniform", "odd-ffn"])
def test_verify_passes_on_other_families(converted, case):
    for out_type in IK_TYPES:
        model, out = converted(case, out_type)
        proc = run_cli("verify", out, model)
        assert "OK" in proc.stdout + proc.stderr, out_type


def test_verify_decodes_like_iks_decoders():
    """verify's own decoder (written from the notes) against ik's transliterated decoders, on random
    bytes with finite row scales (the converter's bytes would not catch a shared mistake)."""
    from pipeline.outtypes import OUTPUT_TYPES
    from pipeline.verify import decode_values

    rng = np.random.default_rng(24)
    rows, cols = 8, 192
    for kind in IK_TYPES:
        out = OUTPUT_TYPES[kind]
        row_bytes = out.codec.row_bytes(cols)
        data = rng.integers(0, 256, (rows, row_bytes), dtype=np.uint8)
        if kind != "iq1_bn":  # 2-bit fields 0..2 (field 3 is no code; ik's loop and ours round 2d differently)
            f = rng.integers(0, 3, (rows, row_bytes, 4)).astype(np.uint8)
            data = f[..., 0] | f[..., 1] << 2 | f[..., 2] << 4 | f[..., 3] << 6
        if kind == "iq1_bn":
            data[:, :2] = rng.uniform(0.01, 2, (rows, 1)).astype("<f2").view(np.uint8)
        elif kind == "iq2_bn":
            data[:, :4] = rng.uniform(0.01, 2, (rows, 1)).astype("<f4").view(np.uint8)
        else:
            groups = data.reshape(rows // 4, 4 * row_bytes)
            groups[:, :16] = rng.uniform(0.01, 2, (rows // 4, 4)).astype("<f4").view(np.uint8)
        want = ik_layouts.DECODERS[kind](data.tobytes(), rows, cols)
        np.testing.assert_array_equal(decode_values(out, data, None), want.astype(np.float64), err_msg=kind)


def test_rows_shorter_than_512_values_are_warned_about_once_for_iq2_bn_and_iq1_bn(converted):
    """ik's IQ1_BN / IQ2_BN matmul quantizes activations to Q8_K64, which needs rows of >= 512 values."""
    for out_type in IK_TYPES:
        _, out = converted("2b4t", out_type)  # hidden 256: every projection but ffn_down (512 columns)
        warnings = [x for x in converted.logs[out].splitlines() if "fewer than 512" in x]
        if out_type == "iq2_bn_r4":
            assert not warnings
        else:
            assert len(warnings) == 1 and "12 projection(s)" in warnings[0] and "ik_llama.cpp" in warnings[0], warnings


def test_inspect_and_plan_show_and_size_them(converted):
    model, out = converted("odd-ffn", "iq2_bn_r4")
    text = run_cli("inspect", out).stdout
    assert "general.file_type 337 (IQ2_BN_R4)" in text
    assert "blk.0.ffn_up.weight" in text and " IQ2_BN " in text and "IQ2_BN_R4" in text
    plan = json.loads(run_cli("plan", model, "--type", "iq2_bn_r4", "--json").stdout)
    assert plan["outputs"][0][1] == out.stat().st_size
    by_name = {t.name: t for t in read_gguf(out).tensors}
    for rec in plan["tensors"]:
        assert rec["nbytes"] == by_name[rec["name"]].nbytes, rec["name"]
    notes = {r["name"]: r["fallback"] for r in plan["tensors"]}
    assert "not a multiple of 4" in notes["blk.0.ffn_up.weight"] and "IQ2_BN" in notes["blk.0.ffn_up.weight"]
    assert "F16" in notes["blk.0.ffn_down.weight"]
    table = run_cli("plan", model, "--type", "iq2_bn_r4").stdout
    assert "not a multiple of 4" in table


# -- group-scaled checkpoints ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bonsai(root):
    """One scale per 128 values of a row (Ternary-Bonsai): the scale changes along every row."""
    return write_checkpoint(root / "bonsai", "bonsai", num_heads=4, num_kv_heads=2, head_dim=64, seed=15)


@pytest.mark.parametrize("out_type", IK_TYPES)
def test_a_scale_changing_along_a_row_is_refused_naming_the_tensor(bonsai, root, out_type):
    out = root / f"refused-{out_type}.gguf"
    proc = convert(bonsai, out, "--type", out_type, "--workdir", root / f"refused-{out_type}.work", check_exit=2)
    lines = proc.stderr.strip().splitlines()
    assert len([x for x in lines if "error" in x]) == 1, proc.stderr
    err = lines[-1]
    assert "model.layers.0.self_attn.q_proj.weight" in err and "one scale per row" in err, err
    assert "--allow-requantize" in err and "q2_0" in err, err
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("out_type", ["iq2_bn", "iq1_bn"])
def test_allow_requantize_is_iks_own_quantizer_of_the_checkpoints_values(bonsai, root, out_type):
    out = root / f"requantized-{out_type}.gguf"
    proc = convert(bonsai, out, "--type", out_type, "--allow-requantize",
                   "--workdir", root / f"requantized-{out_type}.work")
    warnings = [x for x in proc.stderr.splitlines() if "requantized to" in x]
    config = json.loads((bonsai / "config.json").read_text())
    assert len(warnings) == 7 * config["num_hidden_layers"], proc.stderr  # one per projection
    source = read_source_tensors(bonsai)
    contents = read_gguf(out)
    raw = out.read_bytes()
    for hf in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        t = next(t for t in contents.tensors if t.name == gguf_name(hf))
        assert t.ggml_type == GGML_ID[out_type]
        want = ik_layouts.quantize_tensor(source[hf], out_type)
        assert raw[t.offset:t.offset + t.nbytes] == want, hf
    assert "OK" in (lambda p: p.stdout + p.stderr)(run_cli("verify", out, bonsai))


# -- resume and memory limit -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def big(root):
    """Projections of 1024 and 2048 rows: several chunks per tensor at 200MiB."""
    return write_checkpoint(root / "big", "2b4t-bf16", hidden_size=1024, intermediate_size=2048, num_layers=1,
                            num_heads=8, num_kv_heads=2, vocab_size=512)


def pack_chunks(work, name: str) -> int:
    return sum(p.is_file() for p in (work / "pack.zarr" / name / "c").rglob("*"))


@pytest.mark.parametrize("out_type", ["iq2_bn_r4", "iq1_bn"])
def test_memory_limits_and_a_kill_then_rerun_give_the_same_bytes(big, tmp_path, out_type):
    files = {}
    for limit in ("4GiB", "200MiB"):
        out, work = tmp_path / f"{limit}.gguf", tmp_path / f"{limit}.work"
        convert(big, out, "--type", out_type, "--memory-limit", limit, "--workers", "1", "--workdir", work)
        files[limit] = out.read_bytes()
        chunks = pack_chunks(work, "blk.0.ffn_up.weight")
        assert chunks == 1 if limit == "4GiB" else chunks > 2, (limit, chunks)
    assert files["4GiB"] == files["200MiB"]
    ref = kp.Reference(0.0, {s: kp.count_chunks(tmp_path / "200MiB.work" / f"{s}.zarr") for s in kp.CHUNK_STAGES},
                       len(files["200MiB"]))
    shutil.rmtree(tmp_path / "200MiB.work")
    extra = ("--type", out_type, "--workers", "1")
    landed = []
    for i, (stage, fraction) in enumerate((("pack", 0.5), ("quantize", 0.5))):
        out, work = tmp_path / f"k{i}.gguf", tmp_path / f"k{i}.work"
        kill = kp.interrupt(ROOT, big, out, work, kp.KillPoint(stage, fraction, signal.SIGKILL, "200MiB"), ref,
                            tmp_path / "log", *extra)
        landed.append(kill.landed)
        convert(big, out, "--memory-limit", "200MiB", "--workdir", work, *extra)
        assert out.read_bytes() == files["4GiB"], kill
    assert "pack" in landed, landed
