"""`--type auto`, the default: the smallest output type that holds the checkpoint's projections
exactly and that the family's runtime runs, said in the plan, `plan --json` and the log.

One scale per tensor (every family but the group-scaled one) gives TQ2_0, so default output names
stay `-TQ2_0`; group-scaled checkpoints are decided from the first and last rows of every projection
(Q1_0 for binary, TQ2_0 for a scale per 256, Q2_0 per 64 or 128), and the whole data is still
checked as it is read. The chosen files are checked against the checkpoint with decoders written
from the formats.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.synthetic import write_checkpoint
from tests.test_binary_q1_0 import decode_q1_0
from tests.test_codecs import q2_0_reference_decode
from tests.test_group_scaled import SHAPE, edit_tensor, refused, tensor_bytes


def planned(model, *extra) -> dict:
    return json.loads(run_cli("plan", model, "--json", *extra).stdout)


@pytest.mark.parametrize("family", ["1bitllm", "llama3-1.58", "2b4t"])
def test_one_scale_per_tensor_is_tq2_0(tmp_path, family):
    model = write_checkpoint(tmp_path / "m", family, num_layers=1)
    plan = planned(model)
    assert plan["out_type"] == "tq2_0" and plan["type_choice"].startswith("one ternary scale per tensor"), plan
    assert plan["outputs"][0][0].endswith("m-TQ2_0.gguf")
    assert {t["out_type"] for t in plan["tensors"] if t["role"] == "ternary"} == {"tq2_0"}
    text = run_cli("plan", model).stdout
    assert "type: TQ2_0 (--type auto: one ternary scale per tensor" in text, text


@pytest.mark.parametrize("kw,want", [(dict(binary=True), "q1_0"), (dict(binary=True, group_size=256), "q1_0"),
                                     (dict(), "q2_0"), (dict(group_size=64), "q2_0"), (dict(group_size=256), "tq2_0"),
                                     (dict(group_size=0), "tq2_0")])
def test_group_scaled_checkpoints_are_decided_from_the_data(tmp_path, kw, want):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, **kw)
    plan = planned(model)
    assert plan["out_type"] == want, plan["type_choice"]
    assert ("binary (-s, +s)" if kw.get("binary") else "ternary") in plan["type_choice"]


def test_the_default_conversion_writes_the_chosen_type_exactly_and_a_rerun_resumes(tmp_path):
    """A binary checkpoint with no --type and no -o: m-Q1_0.gguf, every projection exactly the
    checkpoint's values; the log says which type and why; a rerun skips every stage."""
    from tests.reference_model import load_checkpoint

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, binary=True)
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run_cli("convert", model, "--no-progress", cwd=work)
    assert "type: Q1_0, chosen by --type auto: the first and last rows of every projection are binary" in proc.stderr
    out = work / "m-Q1_0.gguf"
    _, tensors = load_checkpoint(model)
    raw, shape = tensor_bytes(out, "blk.0.ffn_down.weight")
    np.testing.assert_array_equal(decode_q1_0(raw.tobytes(), *shape), tensors["model.layers.0.mlp.down_proj.weight"])
    again = run_cli("convert", model, "--no-progress", cwd=work)
    for stage in ("extract", "quantize", "pack", "assemble"):
        assert f"{stage}: already done, skipped" in again.stderr, again.stderr
    ok = run_cli("verify", out, model)
    assert "OK" in ok.stdout + ok.stderr


def test_ternary_groups_of_128_convert_to_q2_0_exactly(tmp_path):
    from tests.reference_model import load_checkpoint

    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE)
    out = tmp_path / "o.gguf"
    proc = run_cli("convert", model, "-o", out, "--no-progress")
    assert "type: Q2_0, chosen by --type auto" in proc.stderr
    _, tensors = load_checkpoint(model)
    raw, shape = tensor_bytes(out, "blk.0.attn_q.weight")
    np.testing.assert_array_equal(q2_0_reference_decode(raw.tobytes(), *shape),
                                  tensors["model.layers.0.self_attn.q_proj.weight"])


def test_an_explicit_type_is_used_as_given(tmp_path):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, binary=True)
    plan = planned(model, "--type", "q2_0")
    assert plan["out_type"] == "q2_0" and plan["type_choice"] == "given"
    assert "type: Q2_0 (given with --type)" in run_cli("plan", model, "--type", "q2_0").stdout


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d / "m.gguf"


def test_a_scale_changing_every_32_values_is_refused_before_any_work(tmp_path, out):
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, group_size=32)
    refused(model, out, "--type auto: the scale of model.layers.0.", "changes every 32 values",
            "--type q2_0 --allow-requantize", "--type f16")


def test_a_zero_the_sample_did_not_see_is_refused_naming_tensor_and_row(tmp_path, out):
    """The rows read to decide are a sample: a binary-looking checkpoint with a 0 in a middle row
    is chosen Q1_0, and the full read refuses it naming the tensor, the row and the type that holds it."""
    model = write_checkpoint(tmp_path / "m", "bonsai", **SHAPE, binary=True)

    def zero(w):
        w[100, 9] = 0
        return w
    edit_tensor(model, "model.layers.0.mlp.up_proj.weight", zero)
    assert planned(model)["out_type"] == "q1_0"
    refused(model, out, "tensor model.layers.0.mlp.up_proj.weight", "(the first in row 100)", "--type q2_0",
            in_data=True)


def test_help_names_auto(tmp_path):
    text = " ".join(run_cli("convert", "--help").stdout.split())
    assert "type of the ternary projections: auto (the smallest type that holds them exactly" in text
    assert "[preset: auto]" in text
