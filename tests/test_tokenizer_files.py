"""Tokenizer files whose JSON has the wrong type somewhere a reader looks (issue 21): a stray
tokenizer.json of `[1, 2]` beside a SentencePiece tokenizer.model, added_tokens as strings, a
post_processor that is a list... Each is refused before anything is written, in one line naming
the file and the field; was an AttributeError (exit 1) from gguf.SpecialVocab or our reader.

Likewise, one line naming the file, nothing written: malformed added tokens (added_tokens.json,
added_tokens_decoder, tokenizer.json's added_tokens), a BPE tokenizer without merges (merges.txt
is enough), a tokenizer file that links to nothing, chat templates of the wrong type, malformed or
not UTF-8, and deeply nested JSON in any tokenizer file.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import convert
from tests.hostile import refuse, set_json_keys
from tests.synthetic import write_checkpoint
from tests.hostile import fresh, out, pristine  # noqa: F401 (fixtures)

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"spm": write_checkpoint(root / "spm", "1bitllm", **SHAPE),
            "bpe": write_checkpoint(root / "bpe", "llama3-1.58", **SHAPE, num_kv_heads=2)}


def run(argv, capsys) -> tuple[int, str, str]:
    from pipeline.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(model, out_dir, capsys, *needles, command=("plan",)) -> str:
    argv = [*command, model, "-o", out_dir / "m.gguf"]
    code, out, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("bitnet-gguf: error: "), (code, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert list(out_dir.iterdir()) == [], "a refusal wrote something"
    return lines[0]


@pytest.fixture
def copy(originals, tmp_path):
    def make(kind: str):
        model = shutil.copytree(originals[kind], tmp_path / kind)
        (tmp_path / "out").mkdir(exist_ok=True)
        return model, tmp_path / "out"
    return make


def test_the_unchanged_checkpoints_plan(originals, tmp_path, capsys):
    """The baseline: without the damage both plan (so the refusals below are the damage's)."""
    for model in originals.values():
        code, out, err = run(["plan", model, "-o", tmp_path / "m.gguf"], capsys)
        assert code == 0, err


# (JSON written as tokenizer.json beside tokenizer.model, the field the refusal names)
STRAY = [
    ([1, 2], "tokenizer.json: not a tokenizer.json (the file must hold a JSON object"),
    ("tokenizer", "tokenizer.json: not a tokenizer.json (the file must hold a JSON object"),
    ({"added_tokens": ["<s>", "</s>"]}, "tokenizer.json: added_tokens[0] must be an object, not a string"),
    ({"added_tokens": "<s>"}, "tokenizer.json: added_tokens must be a list"),
    ({"added_tokens": None}, "tokenizer.json: added_tokens must be a list"),
    ({"added_tokens": [{"id": 1}]}, "tokenizer.json: added_tokens[0].content must be a string"),
    ({"added_tokens": [{"id": "1", "content": "<s>"}]}, "added token '<s>' has id '1'"),
    ({"added_tokens": [{"id": 1, "content": "<s>", "special": "yes"}]}, "added_tokens[0].special must be true or false"),
    ({"post_processor": [1]}, "tokenizer.json: post_processor must be an object or null, not a list"),
    ({"post_processor": {"processors": {"a": 1}}}, "tokenizer.json: post_processor.processors must be a list"),
    ({"post_processor": {"type": "Sequence", "processors": ["x"]}}, "post_processor.processors[0] must be an object"),
    ({"post_processor": {"type": "TemplateProcessing", "single": "ab"}}, "post_processor.single must be a list"),
    ({"post_processor": {"type": "TemplateProcessing", "pair": [{"SpecialToken": "<s>"}, {"Sequence": {}}]}},
     "post_processor.pair[0].SpecialToken must be an object"),
    ({"post_processor": {"type": "TemplateProcessing", "single": [{}, 3]}}, "post_processor.single[1] must be an object"),
    ({"post_processor": {"type": "RobertaProcessing", "cls": []}}, "post_processor.cls must be a non-empty list"),
    ({"model": "BPE"}, "tokenizer.json: model must be an object, not a string"),
    ({"model": {"merges": ["a b", 3]}}, "tokenizer.json: model.merges[1] must be a string or a pair of strings"),
    ({"model": {"merges": {"a": "b"}}}, "tokenizer.json: model.merges must be a list"),
]


@pytest.mark.parametrize("content,needle", STRAY, ids=[n.split(": ")[-1][:40] for _, n in STRAY])
def test_a_malformed_stray_tokenizer_json_beside_a_sentencepiece_model_is_one_line(copy, capsys, content, needle):
    model, out_dir = copy("spm")
    (model / "tokenizer.json").write_text(json.dumps(content))
    refused(model, out_dir, capsys, str(model / "tokenizer.json"), needle)


def test_vocab_only_refuses_it_too(copy, capsys):
    model, out_dir = copy("spm")
    (model / "tokenizer.json").write_text("[1, 2]")
    refused(model, out_dir, capsys, "tokenizer.json: not a tokenizer.json (the file must hold a JSON object",
            command=("convert", "--vocab-only", "--no-progress"))


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# (file, change to its JSON, the field the refusal names) on the BPE checkpoint's own files
BPE = [
    ("tokenizer.json", lambda d: d.update(post_processor=[d["post_processor"]]), "post_processor must be an object"),
    ("tokenizer.json", lambda d: d.update(added_tokens=[t["content"] for t in d["added_tokens"]]),
     "added_tokens[0] must be an object"),
    ("tokenizer.json", lambda d: d.update(added_tokens={"<|begin_of_text|>": 1}), "added_tokens must be a list"),
    ("tokenizer.json", lambda d: d["model"]["merges"].append(7), "model.merges["),
    ("tokenizer_config.json", lambda d: d.update(bos_token=5), "bos_token must be a string"),
    ("tokenizer_config.json", lambda d: d.update(eos_token={"content": 5}), "eos_token must be a string"),
    ("tokenizer_config.json", lambda d: d.update(add_bos_token="yes"), "add_bos_token must be true, false or null"),
    ("tokenizer_config.json", lambda d: d.update(added_tokens_decoder=[1]), "added_tokens_decoder must be an object"),
    ("tokenizer_config.json", lambda d: d.update(chat_template=5), "chat_template must be a string"),
    ("tokenizer_config.json", lambda d: next(iter(d["added_tokens_decoder"].values())).update(special="no"),
     "special must be true or false"),
]


@pytest.mark.parametrize("name,change,needle", BPE, ids=[f"{n}-{x[:30]}" for n, _, x in BPE])
def test_a_malformed_field_of_a_bpe_tokenizer_is_one_line(copy, capsys, name, change, needle):
    model, out_dir = copy("bpe")
    edit_json(model / name, change)
    refused(model, out_dir, capsys, f"{model / name}: ", needle)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                  "chat_template.json"])
@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_a_side_file_that_is_not_an_object_is_one_line(copy, capsys, kind, name):
    model, out_dir = copy(kind)
    (model / name).write_text('["not", "an", "object"]')
    refused(model, out_dir, capsys, f"{model / name}: must hold a JSON object, not a list")


@pytest.mark.parametrize("tokens,needle", [
    ({"<extra>": "384"}, "added_tokens.json"),
    ({"<extra>": -1}, "added_tokens.json"),
    ({"<extra>": 3.0}, "added_tokens.json"),
    ({"<extra>": True}, "added_tokens.json"),
    ({"<extra>": None}, "added_tokens.json"),
    (["<extra>", 384], "added_tokens.json"),
    ("<extra>", "added_tokens.json"),
])
def test_malformed_added_tokens_are_refused(fresh, out, tokens, needle):
    model = fresh("added")
    (model / "added_tokens.json").write_text(json.dumps(tokens))
    refuse(model, out, needle)


def test_a_bpe_added_token_beyond_the_vocabulary_is_refused(fresh, out):
    model = fresh("llama3-1.58")
    (model / "added_tokens.json").write_text(json.dumps({"<extra>": 10**30}))
    refuse(model, out, "added_tokens.json", "vocab_size")


@pytest.mark.parametrize("decoder", [
    {"-1": {"content": "<x>"}},
    {"abc": {"content": "<x>"}},
    {"5": "<x>"},
    {"5": {"content": 7}},
    [{"content": "<x>"}],
])
def test_malformed_added_tokens_decoder_is_refused(fresh, out, decoder):
    model = fresh("added")
    path = model / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["added_tokens_decoder"] = decoder
    path.write_text(json.dumps(config))
    refuse(model, out, "tokenizer_config.json")


@pytest.mark.parametrize("family", ["llama3-1.58", "2b4t"])
@pytest.mark.parametrize("entry", [{"id": "5", "content": "<x>"}, {"id": -3, "content": "<x>"},
                                   {"id": 1.5, "content": "<x>"}, {"content": "<x>"}, "<x>"])
def test_malformed_bpe_added_tokens_are_refused(fresh, out, family, entry):
    model = fresh(family)
    path = model / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["added_tokens"] = [*tok.get("added_tokens", []), entry]
    path.write_text(json.dumps(tok))
    refuse(model, out, "tokenizer.json")


@pytest.mark.parametrize("merges", ["empty", "missing"])
def test_a_bpe_tokenizer_without_merges_is_refused(fresh, out, merges):
    """llama.cpp stops on a gpt2 vocabulary without tokenizer.ggml.merges; the file must not be written."""
    model = fresh("bpe")
    data = json.loads((model / "tokenizer.json").read_text())
    if merges == "empty":
        data["model"]["merges"] = []
    else:
        del data["model"]["merges"]
    (model / "tokenizer.json").write_text(json.dumps(data))
    refuse(model, out, "tokenizer.json", "merges")


def test_a_bpe_tokenizer_whose_merges_come_from_merges_txt_converts(fresh, out):
    """The refusal is about having no merges at all: merges.txt (gguf.SpecialVocab's fallback) is enough."""
    model = fresh("bpe")
    data = json.loads((model / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (model / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    data["model"]["merges"] = []
    (model / "tokenizer.json").write_text(json.dumps(data))
    # the tokenizers package itself still needs merges for the pre-tokenizer hash: name it
    convert(model, out, "--tokenizer-pre", "llama-bpe")
    import gguf

    reader = gguf.GGUFReader(out)
    field = reader.fields["tokenizer.ggml.merges"]
    assert len(field.data) == len(lines)


@pytest.mark.parametrize("kind,name", [
    ("bpe", "tokenizer_config.json"),   # BOS flag, chat template: silently gone
    ("spm", "tokenizer_config.json"),
    ("spm", "added_tokens.json"),
    ("bpe", "chat_template.jinja"),
    ("bpe", "tokenizer.model"),         # was: converted as BPE from tokenizer.json, silently
])
@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_a_tokenizer_file_that_links_to_nothing_is_refused(fresh, out, kind, name, link):
    """A cache snapshot whose blob is missing: the file looks absent to is_file(), and the keys it
    would have given were silently left out."""
    model = fresh(kind)
    path = model / name
    path.unlink(missing_ok=True)
    if name == "chat_template.jinja":  # read only when tokenizer_config.json has no chat_template
        set_json_keys(model / "tokenizer_config.json", chat_template=...)
    os.symlink(Path("..", "..", "blobs", "0" * 64) if link == "dangling" else name, path)
    refuse(model, out, name)


@pytest.mark.parametrize("template", [5, 1.5, True, {"default": "{{ x }}"}, ["{{ x }}"], [{"name": "a"}],
                                      [{"name": "default", "template": 7}], [{"name": 3, "template": "x"}]])
def test_a_chat_template_of_the_wrong_json_type_is_refused(fresh, out, template):
    model = fresh("bpe")
    set_json_keys(model / "tokenizer_config.json", chat_template=template)
    refuse(model, out, "tokenizer_config.json", "chat_template")


@pytest.mark.parametrize("template", ["{% if %}", "{{ messages[0] ", "{% for m in messages %}{{ m }}",
                                      "{% endif %}", "{{ '\ud800' }}", "{{ x | }}"])
def test_a_malformed_chat_template_is_refused(fresh, out, template):
    model = fresh("bpe")
    set_json_keys(model / "tokenizer_config.json", chat_template=template)
    refuse(model, out, "tokenizer_config.json", "chat_template")


def test_a_chat_template_with_transformers_generation_blocks_converts(fresh, out):
    """Templates that mark the assistant's part with {% generation %} (transformers' extension) are fine."""
    model = fresh("bpe")
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    set_json_keys(model / "tokenizer_config.json", chat_template=template)
    convert(model, out)


@pytest.mark.parametrize("content,needle", [(b"\xff\xfe{{ x }}", "UTF-8"), (b"{% for %}", "parse"),
                                            (b"{{ messages", "parse")])
def test_a_malformed_or_non_utf8_chat_template_jinja_is_refused(fresh, out, content, needle):
    model = fresh("bpe")
    set_json_keys(model / "tokenizer_config.json", chat_template=...)
    (model / "chat_template.jinja").write_bytes(content)
    refuse(model, out, "chat_template.jinja", needle)


@pytest.mark.parametrize("content", [b'{"chat_template": "\xff"}', b"[1, 2]", b'"x"'])
def test_a_chat_template_json_that_is_not_a_utf8_object_is_refused(fresh, out, content):
    model = fresh("bpe")
    set_json_keys(model / "tokenizer_config.json", chat_template=...)
    (model / "chat_template.json").write_bytes(content)
    refuse(model, out, "chat_template.json")


def nested(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("kind,name,where", [
    ("bpe", "tokenizer.json", "whole"), ("bpe", "tokenizer.json", "inside"),
    ("spm", "tokenizer.json", "whole"),  # beside a tokenizer.model, gguf.SpecialVocab still reads it
    ("bpe", "tokenizer_config.json", "inside"), ("spm", "added_tokens.json", "whole"),
    ("bpe", "chat_template.json", "inside"),
])
def test_deeply_nested_json_in_a_tokenizer_file_is_refused(fresh, out, kind, name, where):
    model = fresh(kind)
    path = model / name
    if where == "whole":
        path.write_text(nested())
    else:
        text = path.read_text() if path.exists() else "{}"
        path.write_text(text.rstrip()[:-1] + (", " if text.strip() != "{}" else "") + f'"deep": {nested()}}}')
    if name == "chat_template.json":
        set_json_keys(model / "tokenizer_config.json", chat_template=...)
    refuse(model, out, name, "nested")


def test_a_sentencepiece_piece_that_is_not_utf8_is_one_line(copy, capsys):
    """sentencepiece loads such a model and raises UnicodeDecodeError when the piece is asked for
    (exit 1 before). The piece's bytes are found in the file as protobuf writes a string field:
    tag 0x0a, its length, the text."""
    from sentencepiece import SentencePieceProcessor

    model, out_dir = copy("spm")
    path = model / "tokenizer.model"
    sp = SentencePieceProcessor(model_file=str(path))
    piece = next(p for p in map(sp.IdToPiece, range(sp.vocab_size())) if p.isascii() and p.isalpha() and len(p) > 2)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x0a" + bytes([len(piece)]) + piece.encode()) + 2
    raw[at] = 0xFF
    path.write_bytes(bytes(raw))
    refused(model, out_dir, capsys, f"{path}: piece ", "not UTF-8")


def test_a_merges_txt_that_is_not_utf8_is_refused_naming_it(fresh, out):
    """gguf.SpecialVocab's UnicodeDecodeError was reported against tokenizer.json."""
    model = fresh("bpe")
    data = json.loads((model / "tokenizer.json").read_text())
    lines = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (model / "merges.txt").write_bytes(("#version: 0.2\n" + "\n".join(lines) + "\n").encode() + b"\xff \xfe\n")
    data["model"]["merges"] = []
    (model / "tokenizer.json").write_text(json.dumps(data))
    refuse(model, out, f"{model / 'merges.txt'}: not UTF-8", extra=("--tokenizer-pre", "llama-bpe"))
