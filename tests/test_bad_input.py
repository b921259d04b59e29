"""Every input mistake a user can make: one line naming the file, exit 2, nothing written."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import convert, run_cli


def snapshot(*dirs):
    """Every file under the given directories with its size and mtime."""
    out = {}
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                p = os.path.join(root, f)
                st = os.stat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


def expect_refusal(model, out, *needles, extra=()):
    before = snapshot(model, out.parent)
    proc = convert(model, out, *extra, check_exit=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bitnet-gguf: error:"), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert snapshot(model, out.parent) == before, "a refused conversion touched files"
    return lines[0]


def rewrite_config(model, **changes):
    path = model / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.fixture
def model(checkpoint):
    return checkpoint(hidden_size=256, intermediate_size=512, num_layers=1)


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d / "m.gguf"


def test_missing_config(model, out):
    (model / "config.json").unlink()
    expect_refusal(model, out, "config.json", "missing")


def test_model_dir_does_not_exist(tmp_path, out):
    expect_refusal(tmp_path / "nope", out, "nope")


def test_unsupported_architecture_names_supported_ones(model, out):
    rewrite_config(model, architectures=["MistralForCausalLM"])
    line = expect_refusal(model, out, "config.json", "MistralForCausalLM", "not supported")
    assert "BitnetForCausalLM" in line


def test_missing_tensor(model, out):
    from tests.conftest import read_source_tensors  # noqa: F401 (documents the layout used)
    # drop one projection by renaming it in the safetensors header (same length, so offsets stay valid)
    path = model / "model.safetensors"
    raw = bytearray(path.read_bytes())
    old = b"model.layers.0.mlp.up_proj.weight"
    i = raw.index(old)
    raw[i:i + len(old)] = b"model.layers.0.mlp.up_proj.wEIGHT"
    path.write_bytes(bytes(raw))
    expect_refusal(model, out, "model.layers.0.mlp.up_proj.weight", "missing")


def test_shape_disagrees_with_config(model, out):
    rewrite_config(model, intermediate_size=768)
    expect_refusal(model, out, "model.safetensors", "shape", "config")


def test_truncated_safetensors(model, out):
    path = model / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1000)
    expect_refusal(model, out, "model.safetensors", "truncated")


def test_corrupt_safetensors_header(model, out):
    path = model / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\x00\xff{{"
    path.write_bytes(bytes(raw))
    expect_refusal(model, out, "model.safetensors", "corrupt")


def test_missing_shard(checkpoint, out):
    model = checkpoint(hidden_size=256, intermediate_size=512, num_layers=1, shards=2)
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.unlink()
    expect_refusal(model, out, shard.name, "missing")


def test_missing_tokenizer(model, out):
    (model / "tokenizer.model").unlink()
    expect_refusal(model, out, "tokenizer.model", "missing")


def test_output_in_missing_directory(model, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "m.gguf"
    proc = convert(model, out, check_exit=2)
    assert "does not exist" in proc.stderr and str(out.parent) in proc.stderr
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--type", "q4_0", "--type"),
    ("--memory-limit", "lots", "--memory-limit"),
    ("--memory-limit", "10MiB", "too small"),
])
def test_bad_options(model, out, flag, value, needle):
    expect_refusal(model, out, needle, extra=(flag, value))


def test_help_explains_every_option():
    text = run_cli("convert", "--help").stdout
    for opt in ("--output", "--type", "--memory-limit", "--workdir", "--workers", "--cluster", "--config"):
        assert opt in text
    assert "tq1_0" in text and "tq2_0" in text


def test_nan_in_a_projection_names_the_tensor(model, out):
    path = model / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = "model.layers.0.self_attn.k_proj.weight"
    begin = 8 + n + header[name]["data_offsets"][0]
    raw[begin:begin + 4] = b"\x00\x00\xc0\x7f"  # float32 NaN
    path.write_bytes(bytes(raw))
    proc = convert(model, out, check_exit=2)
    assert name in proc.stderr and "NaN" in proc.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize("changes,needle", [
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"max_position_embeddings": None}, "max_position_embeddings"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
])
def test_config_values_of_the_wrong_type_are_refused_before_any_work(model, out, changes, needle):
    rewrite_config(model, **changes)
    expect_refusal(model, out, "config.json", needle)


def test_tensors_the_config_does_not_describe_are_refused(checkpoint, out):
    model = checkpoint(hidden_size=256, intermediate_size=512, num_layers=2)
    rewrite_config(model, num_hidden_layers=1)  # layer 1 would silently vanish
    expect_refusal(model, out, "model.layers.1.", "not part of")


def test_unknown_scheduler_is_refused(model, out):
    expect_refusal(model, out, "--scheduler", extra=("--scheduler", "localhost:8786"))


def test_workdir_holding_other_files_is_refused_and_left_alone(model, out, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "download.iso.partial").write_bytes(b"precious")
    proc = convert(model, out, "--workdir", home, check_exit=2)
    assert "not a bitnet-gguf run directory" in proc.stderr
    assert (home / "download.iso.partial").read_bytes() == b"precious"
    assert not out.exists()


def test_not_enough_disk_is_refused_before_any_work(model, out, monkeypatch, capsys):
    from collections import namedtuple

    from pipeline import runner
    from pipeline.cli import main

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 4096, 4096))
    code = main(["convert", str(model), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "free, but this conversion needs about" in err and "--workdir" in err
    assert not out.exists()
    assert not list((out.parent / "m.gguf.work").glob("*.zarr"))


def test_existing_output_that_is_not_gguf_needs_force(model, out):
    out.write_bytes(b"my notes, not a model")
    proc = convert(model, out, check_exit=2)
    assert "--force" in proc.stderr and "not a GGUF file" in proc.stderr
    assert out.read_bytes() == b"my notes, not a model"
    convert(model, out, "--force")
    assert out.read_bytes()[:4] == b"GGUF"


def test_output_inside_the_checkpoint_is_refused(model):
    before = snapshot(model)
    proc = convert(model, model / "model.safetensors", check_exit=2)
    assert "inside the checkpoint directory" in proc.stderr
    assert snapshot(model) == before


# -- packed families ------------------------------------------------------------------------------

def packed_model(tmp_path, family="llama3-1.58", **kw):
    from tests.synthetic import write_checkpoint

    return write_checkpoint(tmp_path / f"packed-{family}", family, **{
        "hidden_size": 256, "intermediate_size": 512, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, **kw})


def edit_safetensors(path, edit):
    """Rewrite a safetensors file: edit(header dict, data bytearray) -> (header, data)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = edit(json.loads(raw[8:8 + n]), bytearray(raw[8 + n:]))
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + bytes(data))


@pytest.mark.parametrize("quant,needle", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
    ({"quant_method": "bitnet", "use_rms_norm": True}, "use_rms_norm"),
    ({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}, "quantization_mode"),
    ({"quant_method": "bitnet", "linear_class": "fancylinear"}, "linear_class"),
    ({"quant_method": "bitnet", "modules_to_not_convert": ["lm_head", "model.layers.0.mlp"]}, "modules_to_not_convert"),
    ("bitnet", "quantization_config must be a JSON object"),
])
def test_unknown_quantization_configs_are_refused(tmp_path, out, quant, needle):
    model = packed_model(tmp_path)
    rewrite_config(model, quantization_config=quant)
    expect_refusal(model, out, "config.json", needle)


def test_llama_without_a_bitnet_quantization_config_is_not_a_bitnet_model(tmp_path, out):
    model = packed_model(tmp_path)
    rewrite_config(model, quantization_config=None, is_bitnet_config=None)
    expect_refusal(model, out, "config.json", "not a BitNet model", "is_bitnet_config")


def test_packed_weights_under_a_master_weight_config_are_refused(tmp_path, out):
    """is_bitnet_config without quantization_config means master weights (Falcon-E prequantized):
    uint8 projections there are named, not unpacked as floats."""
    model = packed_model(tmp_path)
    rewrite_config(model, quantization_config=None)
    expect_refusal(model, out, "model.safetensors", "q_proj.weight is U8", "needs float weights")


def test_prequantized_llama_without_the_marker_is_refused(tmp_path, out):
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "m", "falcon-e-prequantized", hidden_size=256, intermediate_size=512,
                             num_layers=1)
    rewrite_config(model, is_bitnet_config=False)
    expect_refusal(model, out, "config.json", "not a BitNet model", "add \"is_bitnet_config\": true")


def test_prequantized_llama_missing_a_norm_is_refused(tmp_path, out):
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "m", "falcon-e-prequantized", hidden_size=256, intermediate_size=512,
                             num_layers=1)
    name = "model.layers.0.post_attention_layernorm.weight"

    def drop(header, data):
        del header[name]
        return header, data
    edit_safetensors(model / "model.safetensors", drop)
    expect_refusal(model, out, name, "missing")


@pytest.mark.parametrize("family", ["llama3-1.58", "2b4t"])
def test_missing_weight_scale(tmp_path, out, family):
    model = packed_model(tmp_path, family)
    name = "model.layers.0.mlp.up_proj.weight_scale"

    def drop(header, data):
        del header[name]
        return header, data
    edit_safetensors(model / "model.safetensors", drop)
    expect_refusal(model, out, name, "missing")


@pytest.mark.parametrize("value,needle", [(0.0, "positive finite"), (float("nan"), "positive finite"),
                                          (-2.0, "positive finite"), (float("inf"), "positive finite")])
def test_weight_scale_that_is_not_a_positive_number(tmp_path, out, value, needle):
    import numpy as np

    model = packed_model(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight_scale"

    def set_value(header, data):
        begin, end = header[name]["data_offsets"]
        bits = (np.array([value], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        data[begin:end] = bits
        return header, data
    edit_safetensors(model / "model.safetensors", set_value)
    expect_refusal(model, out, name, needle)


def test_weight_scale_of_the_wrong_shape(tmp_path, out):
    model = packed_model(tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight_scale"

    def widen(header, data):
        header[name]["shape"] = [2]
        header[name]["data_offsets"][1] += 2
        for other in header.values():  # shift every later tensor by the 2 bytes inserted
            if isinstance(other, dict) and "data_offsets" in other and other is not header[name] \
                    and other["data_offsets"][0] >= header[name]["data_offsets"][1] - 2:
                other["data_offsets"] = [o + 2 for o in other["data_offsets"]]
        end = header[name]["data_offsets"][1] - 2
        return header, data[:end] + b"\0\0" + data[end:]
    edit_safetensors(model / "model.safetensors", widen)
    expect_refusal(model, out, name, "shape [1]")


@pytest.mark.parametrize("change,needle", [
    ({"intermediate_size": 768}, "U8"),       # packed (128, 256) but the config implies (192, 256)
    ({"num_key_value_heads": 4}, "U8"),
    ({"hidden_size": 512}, "shape"),
])
def test_packed_shape_that_does_not_match_the_config(tmp_path, out, change, needle):
    model = packed_model(tmp_path)
    rewrite_config(model, **change)
    expect_refusal(model, out, needle, "config")


def test_packed_weights_stored_as_floats_are_refused(tmp_path, out):
    model = packed_model(tmp_path)
    name = "model.layers.0.mlp.gate_proj.weight"

    def as_int8(header, data):
        header[name]["dtype"] = "I8"
        return header, data
    edit_safetensors(model / "model.safetensors", as_int8)
    expect_refusal(model, out, name, "U8")


def test_a_code_value_of_3_in_a_packed_byte(tmp_path, out):
    model = packed_model(tmp_path)
    name = "model.layers.0.self_attn.v_proj.weight"

    def corrupt(header, data):
        begin, _ = header[name]["data_offsets"]
        data[begin + 100] = 0b11_01_00_10  # the field in bits 6..7 holds 3
        return header, data
    edit_safetensors(model / "model.safetensors", corrupt)
    before = snapshot(model)
    proc = convert(model, out, check_exit=2)
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and name in error[0] and "value 3" in error[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == error[0]
    assert not out.exists() and not list(out.parent.glob("*.partial"))
    assert snapshot(model) == before


def test_2b4t_with_an_untied_lm_head_is_refused(tmp_path, out):
    model = packed_model(tmp_path, "2b4t")

    def add_head(header, data):
        size = 2 * header["model.embed_tokens.weight"]["shape"][0] * 256
        header["lm_head.weight"] = {"dtype": "BF16", "shape": header["model.embed_tokens.weight"]["shape"],
                                    "data_offsets": [len(data), len(data) + size]}
        return header, data + bytes(size)
    edit_safetensors(model / "model.safetensors", add_head)
    rewrite_config(model, tie_word_embeddings=False)
    expect_refusal(model, out, "tie_word_embeddings", "token_embd")


def test_llama_with_rope_scaling_is_refused(tmp_path, out):
    model = packed_model(tmp_path)
    rewrite_config(model, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    expect_refusal(model, out, "config.json", "rope_scaling")


@pytest.mark.parametrize("flag,value,needle", [
    ("--type", "i2_t", "--type"),
    ("--embedding-type", "q4_0", "--embedding-type"),
    ("--split-max-size", "12 parsecs", "--split-max-size"),
    ("--split-max-tensors", "-3", "--split-max-tensors"),
    ("--split-max-tensors", "many", "--split-max-tensors"),
    ("--tokenizer-pre", "no-such-pre", "--tokenizer-pre"),
])
def test_bad_options_of_the_new_outputs(tmp_path, out, flag, value, needle):
    model = packed_model(tmp_path)
    expect_refusal(model, out, needle, extra=(flag, value))


def test_q8_0_embedding_rows_must_be_multiples_of_32(tmp_path, out):
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "odd", "1bitllm", hidden_size=272, intermediate_size=512, num_layers=1,
                             num_heads=4)
    expect_refusal(model, out, "--embedding-type q8_0", "272", "multiple of 32", extra=("--embedding-type", "q8_0"))


def test_a_split_size_below_one_byte(tmp_path, out):
    model = packed_model(tmp_path)
    expect_refusal(model, out, "--split-max-size", "less than one byte", extra=("--split-max-size", "0.0001K"))


@pytest.mark.parametrize("content,needle", [("[1]", "JSON object"), ("{not json", "not JSON"),
                                            ('{"general.tags": 5}', "general.tags must be a list of strings"), (None, "does not exist")])
def test_a_bad_metadata_file_is_refused(checkpoint, tmp_path, content, needle):
    model = checkpoint()
    meta = tmp_path / "meta.json"
    if content is not None:
        meta.write_text(content)
    (tmp_path / "out").mkdir()  # the output's directory holds nothing but what a conversion would write
    expect_refusal(model, tmp_path / "out" / "m.gguf", "--metadata", needle, extra=("--metadata", meta))


def test_vocab_only_cannot_be_split(checkpoint, tmp_path):
    expect_refusal(checkpoint(), tmp_path / "m.gguf", "--vocab-only", "split",
                   extra=("--vocab-only", "--split-max-tensors", "3"))
