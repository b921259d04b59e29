"""Tokenizer files whose JSON has the wrong type somewhere a reader looks (issue 21): a stray
tokenizer.json of `[1, 2]` beside a SentencePiece tokenizer.model, added_tokens as strings, a
post_processor that is a list... Each is refused before anything is written, in one line naming
the file and the field; was an AttributeError (exit 1) from gguf.SpecialVocab or our reader.
"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.synthetic import write_checkpoint

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
