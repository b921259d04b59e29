"""Every --type on every synthetic checkpoint family, through `plan` (which writes nothing): exit
0, or one line on stderr and exit 2 (issue 21: `--type tl2` on a Qwen3 checkpoint was a TypeError).
TL1/TL2 get a kernel_config.ini with tiles for the model's shapes, so their planning runs through.
"""
from __future__ import annotations

import pytest

from pipeline.outtypes import TERNARY_CHOICES
from tests.bitnet_layouts import kernel_config_text, test_tiles
from tests.synthetic import FAMILIES, write_checkpoint

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    return {family: write_checkpoint(root / family, family, **SHAPE) for family in FAMILIES}


def model_tiles(model, kind: str) -> list[tuple[int, int, int, int, int]]:
    """(m, k, BM, BK, bm) for every projection shape of the model."""
    from pipeline.checkpoint import open_checkpoint
    from pipeline.families import TERNARY

    return test_tiles(kind, [t.shape for t in open_checkpoint(model).plan.tensors if t.role == TERNARY])


def kernel_config(model, kind: str):
    ini = model.parent / f"{model.name}-{kind}.ini"
    if not ini.exists():
        ini.write_text(kernel_config_text(model_tiles(model, kind)))
    return ini


@pytest.mark.parametrize("requantize", [False, True], ids=["", "allow-requantize"])
@pytest.mark.parametrize("out_type", TERNARY_CHOICES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_of_every_type_and_family_is_a_plan_or_one_line(models, family, out_type, requantize, capsys):
    from pipeline.cli import main

    model = models[family]
    argv = ["plan", str(model), "--type", out_type, "-o", str(model.parent / f"{family}-{out_type}.gguf")]
    if out_type in ("tl1", "tl2"):
        argv += ["--kernel-config", str(kernel_config(model, out_type))]
    if requantize:
        argv.append("--allow-requantize")
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code == 0:
        assert out.strip() and not err.strip(), err
    else:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bitnet-gguf: error: "), err
        assert not out.strip()
    assert sorted(p.name for p in model.parent.iterdir() if p.suffix not in (".ini",)) == sorted(FAMILIES), \
        "plan wrote something"


@pytest.mark.parametrize("kind", ["tl1", "tl2"])
def test_a_group_scaled_checkpoint_to_tl_is_refused_in_one_line_or_requantized(models, tmp_path, kind):
    """The conversion behind the plan: without --allow-requantize one line naming the types that
    hold the groups; with it, bitnet.cpp's quantize_i2_s rule (sign times max |w| of the tensor),
    read back with the tests' TL readers and compared with the checkpoint's own values."""
    import numpy as np

    from pipeline.gguf_file import read_gguf
    from tests.bitnet_layouts import decode_tl1, decode_tl2
    from tests.conftest import convert, read_source_tensors

    model, ini = models["bonsai"], kernel_config(models["bonsai"], kind)
    out = tmp_path / f"{kind}.gguf"
    proc = convert(model, out, "--type", kind, "--kernel-config", ini, check_exit=2)
    assert proc.stderr.strip().splitlines()[-1].startswith("bitnet-gguf: error: tensor ")
    assert f"--type {kind}: {kind.upper()} keeps one scale per tensor" in proc.stderr and "q2_0" in proc.stderr
    assert not out.exists()
    convert(model, out, "--type", kind, "--kernel-config", ini, "--allow-requantize")
    weights = read_source_tensors(model)
    tiles = {(m, k): (BM, BK, bm) for m, k, BM, BK, bm in model_tiles(model, kind)}
    data = out.read_bytes()
    projections = {"blk.0.attn_q.weight": "self_attn.q_proj", "blk.0.ffn_gate.weight": "mlp.gate_proj"}
    for t in read_gguf(out).tensors:
        hf = projections.get(t.name)
        if hf is None:
            continue
        shape = tuple(t.shape)
        BM, BK, bm = tiles[shape]
        raw = data[t.offset:t.offset + t.nbytes]
        codes, scale = decode_tl1(raw, shape, BM, BK, bm) if kind == "tl1" else decode_tl2(raw, shape, BM, BK)
        w = weights[f"model.layers.0.{hf}.weight"]
        assert scale == np.abs(w).max(), t.name
        np.testing.assert_array_equal(codes * scale, np.sign(w) * scale, err_msg=t.name)
