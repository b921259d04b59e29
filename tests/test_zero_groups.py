"""Group-scaled checkpoints with all-zero rows, groups and 64-value blocks (issue 21).

A group of zeros has no scale; the block it lands in stores d = 0, as gguf's and llama.cpp's own
quantizers write an all-zero block. Every file here is compared with the checkpoint read
independently (conftest.read_source_tensors): the bytes with gguf.quants (TQ) or the tests'
transcription of llama.cpp's quantize_row_q2_0_ref (Q2_0), the decoded values with the weights.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import convert, read_source_tensors, run_cli
from tests.synthetic import write_checkpoint
from tests.test_codecs import q2_0_reference_decode, q2_0_reference_quantize
from tests.test_group_scaled import SHAPE, edit_tensor, tensor_bytes

# (GGUF name, Hugging Face name) of the tensors given zeros, and what is zeroed in each
EDITED = {"blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",     # row 3
          "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",    # one whole group of row 5
          "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",     # columns 64..127 of row 7
          "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight"}    # the whole tensor


def zeroed_checkpoint(path, group: int):
    model = write_checkpoint(path, "bonsai", **SHAPE, group_size=group)

    def row(w):
        w[3] = 0
        return w

    def one_group(w):
        start = group if 2 * group <= w.shape[1] else 0
        w[5, start:start + group] = 0
        return w

    def block(w):
        w[7, 64:128] = 0
        return w
    for name, change in zip(EDITED.values(), (row, one_group, block, np.zeros_like)):
        edit_tensor(model, name, change)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeros")
    return {g: zeroed_checkpoint(root / f"g{g}", g) for g in (32, 64, 128, 256)}


@pytest.fixture(scope="module")
def weights(models):
    return {g: read_source_tensors(m) for g, m in models.items()}


def check_zeros_present(w: np.ndarray, hf_name: str) -> None:
    """The edit left zeros where the test says (and the rest of the tensor is not all zeros)."""
    if hf_name.endswith("k_proj.weight"):
        assert not w.any()
        return
    row = {"gate_proj": 3, "q_proj": 5, "down_proj": 7}[hf_name.split(".")[-2]]
    assert (w[row] == 0).sum() >= 64 and w.any()


LOSSLESS = [(64, "q2_0"), (128, "q2_0"), (256, "q2_0"), (256, "tq2_0"), (256, "tq1_0")]


@pytest.mark.parametrize("group,out_type", LOSSLESS)
def test_zero_rows_groups_and_blocks_convert_losslessly(models, weights, tmp_path, group, out_type):
    """Was: `CodecError: block scales must be finite and positive` in pack, on every rerun."""
    import gguf

    model = models[group]
    out = tmp_path / f"{out_type}.gguf"
    convert(model, out, "--type", out_type)
    for gguf_name, hf_name in EDITED.items():
        w = weights[group][hf_name]
        check_zeros_present(w, hf_name)
        raw, shape = tensor_bytes(out, gguf_name)
        if out_type == "q2_0":
            assert raw.tobytes() == q2_0_reference_quantize(w), gguf_name
            values = q2_0_reference_decode(raw.tobytes(), *shape)
        else:
            qtype = gguf.GGMLQuantizationType[out_type.upper()]
            np.testing.assert_array_equal(raw.reshape(shape[0], -1), gguf.quants.quantize(w, qtype), err_msg=gguf_name)
            values = gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype)
        np.testing.assert_array_equal(values, w, err_msg=gguf_name)
        assert not np.signbit(values[w == 0]).any(), gguf_name  # exact zeros, not -0
    assert "OK" in run_cli("verify", out, model).stdout


@pytest.mark.parametrize("group,out_type", [(32, "q2_0"), (64, "tq2_0"), (128, "tq1_0")])
def test_zero_groups_requantized_are_the_types_own_quantizer(models, weights, tmp_path, group, out_type):
    """--allow-requantize: the bytes are the type's reference quantizer of the checkpoint's values,
    zero blocks included (d = 0), and they decode to exact zeros where the checkpoint has zeros."""
    import gguf

    model = models[group]
    out = tmp_path / f"{out_type}.gguf"
    convert(model, out, "--type", out_type, "--allow-requantize")
    for gguf_name, hf_name in EDITED.items():
        w = weights[group][hf_name]
        raw, shape = tensor_bytes(out, gguf_name)
        if out_type == "q2_0":
            assert raw.tobytes() == q2_0_reference_quantize(w), gguf_name
            values = q2_0_reference_decode(raw.tobytes(), *shape)
        else:
            qtype = gguf.GGMLQuantizationType[out_type.upper()]
            np.testing.assert_array_equal(raw.reshape(shape[0], -1), gguf.quants.quantize(w, qtype), err_msg=gguf_name)
            values = gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype)
        assert (values[w == 0] == 0).all(), gguf_name
    assert "OK" in run_cli("verify", out, model).stdout


def test_zero_groups_requantized_to_i2_s(models, weights, tmp_path):
    """One scale per tensor (bitnet.cpp's quantize_i2_s: max |w|); zeros stay zeros; the all-zero
    tensor keeps its zeros too."""
    from tests.test_families import decode_i2s_reference

    out = tmp_path / "i2s.gguf"
    convert(models[128], out, "--type", "i2_s", "--target", "x86", "--allow-requantize")
    for gguf_name, hf_name in EDITED.items():
        w = weights[128][hf_name]
        raw, shape = tensor_bytes(out, gguf_name)
        values, scale, _ = decode_i2s_reference(raw.tobytes(), shape)
        if w.any():
            assert scale == np.abs(w).max(), gguf_name
        np.testing.assert_array_equal(values, np.sign(w) * scale, err_msg=gguf_name)
    assert "OK" in run_cli("verify", out, models[128]).stdout


# -- the codecs alone -----------------------------------------------------------------------------

@pytest.mark.parametrize("codec_name,block", [("tq2_0", 256), ("tq1_0", 256), ("q2_0", 64)])
def test_a_block_of_zeros_takes_any_block_scale(codec_name, block):
    """One scale per block where the scale of a zero block is 0, NaN or anything: the bytes are the
    reference quantizer's of the values (d = 0 there); a zero scale on a block with a non-zero code
    is still refused."""
    import gguf

    from pipeline.codecs import CODECS, CodecError

    codec = CODECS[codec_name]
    rng = np.random.default_rng(7)
    codes = rng.integers(-1, 2, size=(3, 4 * block)).astype(np.int8)
    codes[0] = 0
    codes[1, block:2 * block] = 0
    scales = np.float32(np.float16(rng.uniform(0.01, 0.1, size=(3, 4))))
    values = codes * np.repeat(scales, block, axis=1)
    if codec_name == "q2_0":
        want = q2_0_reference_quantize(values)
    else:
        want = gguf.quants.quantize(values, gguf.GGMLQuantizationType[codec_name.upper()]).tobytes()
    for stand_in in (0.0, np.nan, 5.0, -1.0):
        given = scales.copy()
        given[0] = stand_in
        given[1, 1] = stand_in
        assert codec.encode(codes, given).tobytes() == want, stand_in
    bad = scales.copy()
    bad[2, 0] = 0
    with pytest.raises(CodecError, match="non-zero code"):
        codec.encode(codes, bad)
