"""Key/values the user or the checkpoint hands us: --metadata, --model-name, config.json floats.

Every value must reach the file as the value it is, read back by gguf-py's GGUFReader (not our
reader), or be refused in one line naming the key and the type wanted, with nothing written.
Header values no GGUF reader can use (a context length beyond uint32, a rope_theta or
rms_norm_eps that is not a positive finite float32, a string or a bool for a number) are refused
before any work, naming config.json and the key. `verify` recomputes the key/values through the same code, so it must refuse the same inputs and
report a file whose key/values differ from what a correct conversion writes.
"""
from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.hostile import refuse
from tests.test_bad_input import expect_refusal, rewrite_config
from tests.hostile import fresh, out, pristine  # noqa: F401 (fixtures)

F32, STR, U32, I32 = (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32,
                      gguf.GGUFValueType.INT32)
ARR = gguf.GGUFValueType.ARRAY

# one value of every kind --metadata takes, and what GGUFReader must find for it (written out here,
# from gguf's key names and llama.cpp's value types, not from the converter's tables)
GOOD = {"general.name": "Named Model", "general.license": "mit", "general.license.link": "https://x.org/l",
        "general.tags": ["one", "two"], "general.languages": [],
        "general.base_models": [{"name": "Base", "organization": "Org", "repo_url": "https://x.org/b"}],
        "general.datasets": [{"name": "Data"}],
        "general.sampling.top_k": 40, "general.sampling.temp": 0.7, "general.sampling.min_p": 0}
EXPECTED = {"general.name": (STR, "Named Model"), "general.license": (STR, "mit"),
            "general.license.link": (STR, "https://x.org/l"), "general.tags": ((ARR, STR), ["one", "two"]),
            "general.languages": ((ARR, STR), []), "general.base_model.count": (U32, 1),
            "general.base_model.0.name": (STR, "Base"), "general.base_model.0.organization": (STR, "Org"),
            "general.base_model.0.repo_url": (STR, "https://x.org/b"), "general.dataset.count": (U32, 1),
            "general.dataset.0.name": (STR, "Data"), "general.sampling.top_k": (I32, 40),
            "general.sampling.temp": (F32, float(np.float32(0.7))), "general.sampling.min_p": (F32, 0.0)}


def read_kv(path) -> dict:
    """{key: (type or (ARRAY, item type), value)} as gguf-py's reader decodes them."""
    out = {}
    for field in gguf.GGUFReader(path).fields.values():
        if field.name.startswith("GGUF."):
            continue
        types = field.types
        if types[0] == ARR:
            item_type = gguf.GGUFValueType(int(field.parts[3][0]))  # parts: key length, key, type, item type, ...
            items = [field.parts[i] for i in field.data]
            value = [bytes(p).decode("utf-8") for p in items] if item_type == STR else [p.tolist()[0] for p in items]
            out[field.name] = ((ARR, item_type), value)
        elif types[0] == STR:
            out[field.name] = (STR, bytes(field.parts[-1]).decode("utf-8"))
        else:
            out[field.name] = (types[0], field.parts[-1].tolist()[0])
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.synthetic import write_bitnet_checkpoint

    return write_bitnet_checkpoint(tmp_path_factory.mktemp("src") / "tiny", hidden_size=256, intermediate_size=512,
                                   num_layers=1, num_heads=4)


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory):
    """One conversion with every kind of --metadata value: (file, metadata file)."""
    d = tmp_path_factory.mktemp("good")
    meta = d / "meta.json"
    meta.write_text(json.dumps(GOOD))
    out = d / "m.gguf"
    convert(model, out, "--metadata", meta, "--workdir", d / "work")
    return out, meta


def test_every_kind_of_metadata_value_is_written_as_given(converted):
    """general.license included (gguf-py's Metadata drops it from --metadata); an empty list too."""
    kv = read_kv(converted[0])
    assert {k: kv.get(k) for k in EXPECTED} == EXPECTED


def test_verify_agrees_with_a_correct_file_and_finds_a_changed_value(converted, model, tmp_path):
    out, meta = converted
    assert "OK" in run_cli("verify", out, model, "--metadata", meta).stdout
    # the same file with one byte of general.license's value changed ("mit" -> "mix")
    data = bytearray(out.read_bytes())
    at = data.index(b"general.license" + b"\x08\x00\x00\x00" + (3).to_bytes(8, "little") + b"mit")
    data[at + len(b"general.license") + 4 + 8 + 2] = ord("x")
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(bytes(data))
    assert read_kv(changed)["general.license"] == (STR, "mix")  # the patch hit the value
    proc = run_cli("verify", changed, model, "--metadata", meta, check_exit=1)
    assert "MISMATCH" in proc.stdout and "general.license is 'mix'" in proc.stdout, proc.stdout


def test_verify_finds_a_key_the_file_lacks(converted, model, tmp_path):
    """A file converted without a key the --metadata asks for (the README example's general.license
    was dropped before): verify reports it missing instead of agreeing."""
    out, _ = converted
    meta = tmp_path / "more.json"
    meta.write_text(json.dumps({**GOOD, "general.url": "https://x.org"}))
    proc = run_cli("verify", out, model, "--metadata", meta, check_exit=1)
    assert "missing: general.url" in proc.stdout, proc.stdout


WRONG = [
    ({"general.name": 5}, "general.name must be a string, not a whole number"),
    ({"general.name": True}, "general.name must be a string"),
    ({"general.license": ["mit"]}, "general.license must be a string, not a list"),
    ({"general.tags": ["a", 2]}, "general.tags[1] must be a string"),
    ({"general.tags": "abc"}, "general.tags must be a list of strings, not a string"),
    ({"general.languages": None}, "general.languages must be a list of strings, not null"),
    ({"general.base_models": [{"name": 5}]}, "general.base_models[0].name must be a string"),
    ({"general.base_models": [{"name": "a", "nmae": "b"}]}, "general.base_models[0]: 'nmae' is not a field"),
    ({"general.datasets": [["x"]]}, "general.datasets[0] must be an object"),
    ({"general.datasets": {"name": "x"}}, "general.datasets must be a list of objects"),
    ({"general.sampling.top_k": 1.5}, "general.sampling.top_k must be a whole number"),
    ({"general.sampling.top_k": 2**31}, "general.sampling.top_k is 2147483648"),
    ({"general.sampling.temp": "hot"}, "general.sampling.temp must be a number, not a string"),
    ({"general.sampling.temp": 1e-50}, "general.sampling.temp is 1e-50"),
    ({"general.sampling.top_p": 1e39}, "general.sampling.top_p is 1e+39"),
    ({"general.name": "ab\ud800"}, "general.name is 'ab\\ud800': it is not valid UTF-8"),
    ({"general.foo": "x"}, "'general.foo' is not a key --metadata sets"),
    ({"general.architecture": "llama"}, "'general.architecture' is not a key --metadata sets"),
    ({"tokenizer.ggml.pre": "x"}, "'tokenizer.ggml.pre' is not a key --metadata sets"),
    ({"general.base_model.0.name": "x"}, "its key is general.base_models"),
]


@pytest.mark.parametrize("content,needle", WRONG, ids=[str(i) for i in range(len(WRONG))])
def test_wrong_metadata_values_are_refused_naming_the_key(model, tmp_path, content, needle):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(content))  # ensure_ascii: a lone surrogate stays a \ud800 escape
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    line = expect_refusal(model, out, f"--metadata {meta}", needle, extra=("--metadata", meta))
    assert not any(tmp_path.glob("out/*")), line


def test_json_quirks_are_refused(model, tmp_path):
    """A key given twice (json would keep the last silently) and nesting past the parser's stack."""
    meta = tmp_path / "meta.json"
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    meta.write_text('{"general.name": "a", "general.name": "b"}')
    expect_refusal(model, out, "--metadata", "'general.name' is given twice", extra=("--metadata", meta))
    meta.write_text("[" * 100_000 + "]" * 100_000)
    expect_refusal(model, out, "--metadata", "nested too deeply", extra=("--metadata", meta))


@pytest.mark.parametrize("content,needle", [({"general.name": 5}, "general.name must be a string"),
                                            ({"general.tags": "abc"}, "general.tags must be a list")])
def test_verify_refuses_the_metadata_convert_refuses(converted, model, tmp_path, content, needle):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(content))
    proc = run_cli("verify", converted[0], model, "--metadata", meta, check_exit=2)
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert "MISMATCH" not in proc.stdout and "OK" not in proc.stdout


NOT_UTF8 = os.fsdecode(b"ab\xffcd")  # what Python makes of such bytes in argv (surrogateescape)


def test_a_model_name_that_is_not_utf8_is_refused(model, converted, tmp_path):
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    expect_refusal(model, out, "--model-name", "not valid UTF-8", extra=("--model-name", NOT_UTF8))
    proc = run_cli("verify", converted[0], model, "--model-name", NOT_UTF8, check_exit=2)
    assert proc.stderr.count("\n") == 1 and "--model-name" in proc.stderr, proc.stderr


def test_values_from_the_checkpoints_other_files_are_checked_too(tmp_path):
    """generation_config.json's sampling values and README front matter go through gguf-py's Metadata;
    a value of the wrong type (or one float32 cannot hold) is refused naming the file."""
    from tests.synthetic import write_bitnet_checkpoint

    model = write_bitnet_checkpoint(tmp_path / "m", hidden_size=256, intermediate_size=512, num_layers=1,
                                    num_heads=4)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"temperature": 1e-50}))
    expect_refusal(model, out, "generation_config.json", "general.sampling.temp")
    (model / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    expect_refusal(model, out, "generation_config.json", "general.sampling.temp", "not a number")
    (model / "generation_config.json").unlink()
    (model / "README.md").write_text("---\nlicense: 5\n---\n# card\n")
    expect_refusal(model, out, "README.md", "general.license", "not a string")


# the model card and generation_config.json as gguf-py's Metadata reads them (exit 1 with a
# UnicodeDecodeError, a YAML ParserError or an AttributeError before), or a list of numbers it
# writes as an INT32 array where readers expect strings
CARD_FILES = [
    ("README.md", b"---\nlicense: mit\n---\n# card \xff\n", "README.md: not UTF-8 text"),
    ("README.md", b"---\nlicense: [unclosed\n---\n", "README.md: its front matter is not YAML"),
    ("README.md", b"---\nlanguage: [1, 2]\n---\n", "general.languages[0] must be a string"),
    ("README.md", b"---\ntags: [a, [b]]\n---\n", "general.tags[1] must be a string"),
    ("generation_config.json", b'{"temperature": 0.5, "x": "\xff"}', "generation_config.json: not UTF-8 text"),
    ("generation_config.json", b"[0.5]", "generation_config.json: must hold a JSON object, not a list"),
]


@pytest.mark.parametrize("name,content,needle", CARD_FILES, ids=[str(i) for i in range(len(CARD_FILES))])
def test_a_model_card_or_generation_config_that_cannot_be_read_is_refused_naming_it(fresh, out, name, content,
                                                                                    needle):
    model = fresh("1bitllm")
    (model / name).write_bytes(content)
    refuse(model, out, needle)


# -- config.json floats: GGUF stores them as float32 ------------------------------------------------

@pytest.mark.parametrize("key,value", [("rope_theta", 1e-50), ("rms_norm_eps", 1e-60), ("rms_norm_eps", 1e-40),
                                       ("rope_theta", 3.5e38), ("rope_theta", 2**200)])
def test_config_floats_a_float32_cannot_hold_are_refused(checkpoint, tmp_path, key, value):
    """Underflow to 0 or to a subnormal, overflow to inf: the file would hold another number."""
    model = checkpoint(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4)
    rewrite_config(model, **{key: value})
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    expect_refusal(model, out, "config.json", key, "float32")


def test_config_floats_at_float32s_edges_are_written_exactly(checkpoint, tmp_path):
    """The smallest normal float32 and a value near the largest are kept (a vocab-only file: same key/values)."""
    model = checkpoint(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4)
    rewrite_config(model, rms_norm_eps=1.2e-38, rope_theta=3.4e38)
    out = tmp_path / "v.gguf"
    convert(model, out, "--vocab-only")
    kv = read_kv(out)
    assert kv["bitnet.attention.layer_norm_rms_epsilon"] == (F32, float(np.float32(1.2e-38)))
    assert kv["bitnet.rope.freq_base"] == (F32, float(np.float32(3.4e38)))


@pytest.mark.parametrize("family,field,value", [
    ("1bitllm", "max_position_embeddings", 2**32),
    ("1bitllm", "max_position_embeddings", -1),
    ("1bitllm", "max_position_embeddings", 2048.5),
    ("1bitllm", "rope_theta", 1e39),
    ("1bitllm", "rope_theta", float("nan")),
    ("1bitllm", "rope_theta", float("inf")),
    ("1bitllm", "rope_theta", -10000.0),
    ("1bitllm", "rope_theta", 0),
    ("1bitllm", "rope_theta", "10000"),
    ("1bitllm", "rms_norm_eps", -1e-5),
    ("1bitllm", "rms_norm_eps", 0.0),
    ("1bitllm", "rms_norm_eps", float("nan")),
    ("1bitllm", "rms_norm_eps", True),
    ("llama3-1.58", "rope_theta", 1e39),
    ("llama3-1.58", "max_position_embeddings", 2**32),
    ("2b4t", "rms_norm_eps", -1e-6),
    ("2b4t", "rope_theta", float("-inf")),
])
def test_header_values_that_cannot_be_written_are_refused_before_any_work(fresh, out, family, field, value):
    model = fresh(family)
    rewrite_config(model, **{field: value})  # json.dumps writes NaN / Infinity as JSON5-style literals
    refuse(model, out, "config.json", field)


@pytest.mark.parametrize("key,value,named", [("scale_depth", 1e-50, "scale_depth / num_hidden_layers ** 0.5"),
                                             ("dim_model_base", 1e-300, "hidden_size / dim_model_base")])
def test_a_float_derived_from_config_json_is_refused_naming_its_keys(tmp_path, key, value, named):
    """MiniCPM's residual and logit scales are computed from config.json; the refusal named them by
    the converter's internal names ('=minicpm_residual_scale')."""
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "m", "minicpm", hidden_size=256, intermediate_size=512, num_layers=1,
                             num_heads=4)
    rewrite_config(model, **{key: value})
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    line = expect_refusal(model, out, "config.json", f": {named} is ", "float32")
    assert "=" not in line.split("config.json")[1].split(" is ")[0], line
