"""config.json that is not an object, fields of the wrong type, and absurd sizes.

Each is refused before any work in one line naming config.json (and the field), exit 2, nothing
written; absurd dimensions are refused quickly and in bounded memory (the peak RSS of the command
is measured), never by trying to plan them.
"""
from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import ROOT
from tests.hostile import ERROR, assert_same, refuse, tree
from tests.test_bad_input import rewrite_config
from tests.hostile import fresh, model, out, pristine  # noqa: F401 (fixtures)


@pytest.mark.parametrize("content", [
    b"[1, 2, 3]", b'"BitnetForCausalLM"', b"null", b'{"hidden_size": "\xff\xfe"}', b"\xef\xbb\xbf\xff{}",
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"[" * 100_000 + b"]" * 100_000, b"", b"{" ,
])
def test_config_json_that_is_not_an_object_is_refused(model, out, content):
    (model / "config.json").write_bytes(content)
    refuse(model, out, "config.json")


@pytest.mark.parametrize("field,value", [
    ("architectures", "BitnetForCausalLM"), ("architectures", [["BitnetForCausalLM"]]), ("architectures", [None]),
    ("hidden_size", 256.0), ("hidden_size", True), ("num_key_value_heads", 3), ("vocab_size", -1),
    ("tie_word_embeddings", "false"), ("rope_scaling", "linear"),
])
def test_config_fields_of_the_wrong_type_are_refused(model, out, field, value):
    rewrite_config(model, **{field: value})
    refuse(model, out, "config.json")


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 1_000_000_000), ("num_hidden_layers", 10**7),
                                         ("intermediate_size", 10**12), ("vocab_size", 10**11),
                                         ("num_attention_heads", 2**40), ("hidden_size", 2**62)])
def test_absurd_sizes_are_refused_quickly_in_bounded_memory(model, out, field, value):
    from tests.peak_rss import run_measuring_peak

    rewrite_config(model, **{field: value})
    before = tree(model, out.parent)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = run_measuring_peak([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out), "--no-progress"],
                           env=env)
    assert r["exit"] == 2, r
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR) and field in lines[0] and "config.json" in lines[0], \
        r["stderr"]
    assert r["cpu"] < 10, r
    assert r["peak"] < 300 * 1024**2, r
    assert_same(before, tree(model, out.parent))


@pytest.mark.parametrize("kind", ["spm", "bpe"])
@pytest.mark.parametrize("value", [[1, 2], "gemma", 3, True])
def test_a_text_config_that_is_not_an_object_is_refused(fresh, out, kind, value):
    model = fresh(kind)
    rewrite_config(model, text_config=value)
    refuse(model, out, "config.json", "text_config")
