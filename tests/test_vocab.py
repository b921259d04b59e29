"""pipeline/vocab.py: tokenizer key/values for SentencePiece and BPE checkpoints.

BPE expectations are read from tokenizer.json / tokenizer_config.json here, with
the layout llama.cpp's converter uses (get_vocab_base, _set_vocab_gpt2): one row per
id up to vocab_size, ids no token has are "[PAD{i}]" UNUSED rows, added tokens
CONTROL when special or when they look special (`<|...|>`), other added tokens
USER_DEFINED with "\u2581" shown as a space, everything else NORMAL; merges as
"left right" strings; special ids resolved from tokenizer_config.json's token
strings. The pre-tokenizer name comes from llama.cpp's hash of the ids of a fixed
text (checked against the real Llama 3 vocabulary when llama.cpp's test vocabulary
is available), else from the pre-tokenizer's Split pattern.

The llama-marked test loads our keys into llama.cpp (vocab only) and checks that it
tokenizes like the `tokenizers` package.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import gguf
import pytest

from pipeline import vocab
from pipeline.errors import CheckpointError, OptionError
from pipeline.tokenizer_tables import CHKTXT
from tests.bpe_tokenizer import LLAMA3_REGEX, SPECIALS, train_bpe_tokenizer

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5     # GGUF token types (FORMATS.md / llama.h)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


# -- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(out)
    return out


@pytest.fixture
def bpe_dir(trained, tmp_path) -> Path:
    """A fresh copy of the trained tokenizer, free to be edited by the test."""
    return Path(shutil.copytree(trained, tmp_path / "model"))


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def save(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def edit(path: Path, fn) -> None:
    obj = load(path) if path.exists() else {}
    fn(obj)
    save(path, obj)


def tokenizer_fields(model_dir: Path, vocab_size: int, tmp_path: Path, pre=None, arch="llama") -> tuple[str, dict]:
    """Run add_tokenizer into a real GGUF file; read it back with gguf's reader."""
    path = tmp_path / f"vocab-{random.random()}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    kind = vocab.add_tokenizer(w, model_dir, vocab_size, pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    return kind, {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def expected_bpe(model_dir: Path, vocab_size: int) -> dict:
    """What llama.cpp's converter writes, derived from the JSON files alone."""
    tj = load(model_dir / "tokenizer.json")
    tc = load(model_dir / "tokenizer_config.json")
    tokens = {i: t for t, i in tj["model"]["vocab"].items()}
    types = {i: NORMAL for i in tokens}
    for a in tj["added_tokens"]:
        text = a["content"]
        tokens[a["id"]] = text
        if a["special"] or (text.startswith("<|") and text.endswith("|>")):
            types[a["id"]] = CONTROL
        else:
            tokens[a["id"]] = text.replace("\u2581", " ")
            types[a["id"]] = USER_DEFINED
    by_content = {a["content"]: a["id"] for a in tj["added_tokens"]}
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
        "tokenizer.ggml.token_type": [types.get(i, UNUSED) for i in range(vocab_size)],
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": by_content[tc["bos_token"]],
        "tokenizer.ggml.eos_token_id": by_content[tc["eos_token"]],
        "tokenizer.ggml.add_bos_token": tc["add_bos_token"],
        "tokenizer.chat_template": tc["chat_template"],
    }


def hash_of(model_dir: Path) -> str:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(CHKTXT).ids
    return hashlib.sha256(str(ids).encode()).hexdigest()


def refused(model_dir: Path, vocab_size: int, *needles, pre=None, error=CheckpointError) -> str:
    w = gguf.GGUFWriter(None, "llama")
    with pytest.raises(error) as info:
        vocab.add_tokenizer(w, model_dir, vocab_size, pre)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def n_tokens(model_dir: Path) -> int:
    tj = load(model_dir / "tokenizer.json")
    return max([*tj["model"]["vocab"].values(), *(a["id"] for a in tj["added_tokens"])]) + 1


# -- BPE layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("extra_rows", [0, 1, 77])
def test_bpe_tokens_types_merges_specials(bpe_dir, tmp_path, extra_rows):
    vocab_size = n_tokens(bpe_dir) + extra_rows
    kind, fields = tokenizer_fields(bpe_dir, vocab_size, tmp_path)
    assert kind == "bpe"
    want = expected_bpe(bpe_dir, vocab_size)
    for key, value in want.items():
        assert fields[key] == value, key
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert "tokenizer.ggml.scores" not in fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == vocab_size
    assert tokens[vocab_size - extra_rows:] == [f"[PAD{i}]" for i in range(vocab_size - extra_rows, vocab_size)]
    assert set(types[vocab_size - extra_rows:]) <= {UNUSED}
    assert {tokens[i] for i, t in enumerate(types) if t == CONTROL} == set(SPECIALS)
    assert "\u0120the" in tokens and len(fields["tokenizer.ggml.merges"]) > 100   # byte-level strings, real merges


def test_bpe_holes_in_ids_become_pad_rows(bpe_dir, tmp_path):
    """Ids no token has (here: two tokens moved far up) are [PAD{i}] rows."""
    n = n_tokens(bpe_dir)

    def move(tj):
        for a in tj["added_tokens"]:
            if a["content"] == "<|eot_id|>":
                a["id"] = n + 10
        tj["model"]["vocab"]["<|eot_id|>"] = n + 10    # the trainer puts specials in the vocabulary too
    edit(bpe_dir / "tokenizer.json", move)
    edit(bpe_dir / "tokenizer_config.json",
         lambda tc: tc["added_tokens_decoder"].update({str(n + 10): tc["added_tokens_decoder"].pop("2")}))
    _, fields = tokenizer_fields(bpe_dir, n + 12, tmp_path)
    want = expected_bpe(bpe_dir, n + 12)
    assert fields["tokenizer.ggml.tokens"] == want["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.token_type"] == want["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.tokens"][2] == "[PAD2]" and fields["tokenizer.ggml.token_type"][2] == UNUSED
    assert fields["tokenizer.ggml.tokens"][n + 10] == "<|eot_id|>"


def test_bpe_added_token_types(bpe_dir, tmp_path):
    """Not-special added tokens: CONTROL when they look special (<|...|>), otherwise
    USER_DEFINED with U+2581 shown as a space; <b> does not look special to llama.cpp."""
    n = n_tokens(bpe_dir)
    extra = [("<|tool|>", False), ("<b>", False), ("two\u2581words", False), ("[MASK]", False), ("<sep>", True)]

    def add(tj):
        for k, (text, special) in enumerate(extra):
            tj["added_tokens"].append({"id": n + k, "content": text, "single_word": False, "lstrip": False,
                                       "rstrip": False, "normalized": False, "special": special})
    edit(bpe_dir / "tokenizer.json", add)
    _, fields = tokenizer_fields(bpe_dir, n + len(extra), tmp_path)
    got = list(zip(fields["tokenizer.ggml.tokens"][n:], fields["tokenizer.ggml.token_type"][n:]))
    assert got == [("<|tool|>", CONTROL), ("<b>", USER_DEFINED), ("two words", USER_DEFINED),
                   ("[MASK]", USER_DEFINED), ("<sep>", CONTROL)]
    want = expected_bpe(bpe_dir, n + len(extra))
    assert fields["tokenizer.ggml.token_type"] == want["tokenizer.ggml.token_type"]


def test_bpe_merges_as_pairs_and_no_chat_template(tmp_path):
    """Merges stored as [left, right] pairs (tokenizers' format) are written "left right"
    (gguf's SpecialVocab); no chat template in tokenizer_config.json -> no key."""
    model = tmp_path / "m"
    train_bpe_tokenizer(model, vocab_size=400, seed=3, chat_template=None)
    _, fields = tokenizer_fields(model, n_tokens(model), tmp_path)
    assert "tokenizer.chat_template" not in fields
    merges = load(model / "tokenizer.json")["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in merges]


def test_train_bpe_tokenizer_is_deterministic(tmp_path):
    a = train_bpe_tokenizer(tmp_path / "a", vocab_size=450, seed=5)
    b = train_bpe_tokenizer(tmp_path / "b", vocab_size=450, seed=5)
    c = train_bpe_tokenizer(tmp_path / "c", vocab_size=450, seed=6)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert (tmp_path / "a/tokenizer_config.json").read_bytes() == (tmp_path / "b/tokenizer_config.json").read_bytes()


def test_special_token_ids_from_config_json(bpe_dir, tmp_path):
    """Without *_token strings in tokenizer_config.json, config.json's ids are used."""
    edit(bpe_dir / "tokenizer_config.json", lambda tc: (tc.pop("bos_token"), tc.pop("eos_token")))
    save(bpe_dir / "config.json", {"bos_token_id": 3, "eos_token_id": 2, "pad_token_id": None})
    _, fields = tokenizer_fields(bpe_dir, n_tokens(bpe_dir), tmp_path)
    assert fields["tokenizer.ggml.bos_token_id"] == 3
    assert fields["tokenizer.ggml.eos_token_id"] == 2


# -- pre-tokenizer name -------------------------------------------------------------------------

def test_known_hash_gives_its_name(bpe_dir, tmp_path, monkeypatch):
    """The hash is sha256 of str(ids) of the check text encoded with the BOS token."""
    monkeypatch.setattr(vocab, "KNOWN_HASHES", {hash_of(bpe_dir): "falcon3"})
    _, fields = tokenizer_fields(bpe_dir, n_tokens(bpe_dir), tmp_path)
    assert fields["tokenizer.ggml.pre"] == "falcon3"


FALCON_E_HASH = "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6"


def test_falcon_e_tokenizer_gets_a_name_every_runtime_accepts(bpe_dir, tmp_path, monkeypatch):
    """tiiuae Falcon-E's tokenizer hash (microsoft/BitNet's converter calls it falcon_e, which upstream
    llama.cpp refuses; llama.cpp's converter calls it falcon-h1, which bitnet.cpp's fork refuses) is
    written as falcon3, which both accept (docs/notes/families.md)."""
    from pipeline.tokenizer_tables import KNOWN_HASHES, RUNTIME_PRE_NAMES

    assert KNOWN_HASHES[FALCON_E_HASH] == "falcon-h1"  # llama.cpp's converter's own table
    assert "falcon3" in RUNTIME_PRE_NAMES and "falcon_e" not in RUNTIME_PRE_NAMES
    monkeypatch.setattr(vocab, "chkhsh", lambda tok: FALCON_E_HASH)
    _, fields = tokenizer_fields(bpe_dir, n_tokens(bpe_dir), tmp_path)
    assert fields["tokenizer.ggml.pre"] == "falcon3"


def test_hash_includes_the_post_processor(bpe_dir, monkeypatch):
    """Without the BOS template the ids (and the hash) differ, so the table does not match."""
    monkeypatch.setattr(vocab, "KNOWN_HASHES", {hash_of(bpe_dir): "falcon3"})
    monkeypatch.setattr(vocab, "SPLIT_PATTERNS", {})
    edit(bpe_dir / "tokenizer.json", lambda tj: tj.update(post_processor=None))
    refused(bpe_dir, n_tokens(bpe_dir), "tokenizer.json", "not recognised", "--tokenizer-pre")


@pytest.mark.parametrize("pattern", [
    LLAMA3_REGEX,
    # the form llama.cpp runs (src/llama-vocab.cpp), case-insensitivity spelled out
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
])
def test_unknown_hash_with_llama3_split_is_llama_bpe(bpe_dir, tmp_path, monkeypatch, pattern):
    monkeypatch.setattr(vocab, "KNOWN_HASHES", {})
    edit(bpe_dir / "tokenizer.json", lambda tj: tj["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=pattern))
    _, fields = tokenizer_fields(bpe_dir, n_tokens(bpe_dir), tmp_path)
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"


def _gpt2_pre(tj):
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _other_split(tj):
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = GPT2_REGEX


def _llama3_twice(tj):
    steps = tj["pre_tokenizer"]["pretokenizers"]
    steps.insert(0, json.loads(json.dumps(steps[0])))


def _split_removed(tj):
    tj["pre_tokenizer"]["pretokenizers"].pop(0)


def _bytelevel_with_regex(tj):
    tj["pre_tokenizer"]["pretokenizers"][1]["use_regex"] = True


def _merged_behavior(tj):
    tj["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithPrevious"


def _normalizer(tj):
    tj["normalizer"] = {"type": "NFC"}


def _merges_not_ignored(tj):
    tj["model"]["ignore_merges"] = False


@pytest.mark.parametrize("change", [_gpt2_pre, _other_split, _llama3_twice, _split_removed, _bytelevel_with_regex,
                                    _merged_behavior, _normalizer, _merges_not_ignored])
def test_unknown_hash_other_pre_tokenizer_is_refused(bpe_dir, monkeypatch, change):
    monkeypatch.setattr(vocab, "KNOWN_HASHES", {})
    edit(bpe_dir / "tokenizer.json", change)
    refused(bpe_dir, n_tokens(bpe_dir), str(bpe_dir / "tokenizer.json"), "not recognised", "--tokenizer-pre NAME")


@pytest.mark.parametrize("name", ["llama-bpe", "falcon3", "default", "gpt-2", "qwen2"])
def test_tokenizer_pre_option_overrides(bpe_dir, tmp_path, monkeypatch, name):
    monkeypatch.setattr(vocab, "KNOWN_HASHES", {})
    edit(bpe_dir / "tokenizer.json", _other_split)   # would be refused without the option
    _, fields = tokenizer_fields(bpe_dir, n_tokens(bpe_dir), tmp_path, pre=name)
    assert fields["tokenizer.ggml.pre"] == name


@pytest.mark.parametrize("name", ["llama", "Llama-bpe", "llama-bpe ", "", "falcon-3", "bert-bge-large"])
def test_tokenizer_pre_option_unknown_name(bpe_dir, name):
    refused(bpe_dir, n_tokens(bpe_dir), "--tokenizer-pre", pre=name, error=OptionError)


def test_tokenizer_pre_option_with_sentencepiece(spm_dir):
    refused(spm_dir, 400, "--tokenizer-pre", "tokenizer.model", pre="llama-bpe", error=OptionError)


# -- the real Llama 3 vocabulary (llama.cpp's test vocabulary, when available) ----------------

def _llama3_vocab_gguf() -> Path | None:
    """llama.cpp's Llama 3 test vocabulary (models/ in the llama.cpp sources), if the
    converter's copy of the sources has it."""
    from tests.conftest import ROOT

    base = Path(os.environ.get("BITNET_GGUF_LLAMA_CONVERT", ROOT / "build" / "llama.cpp-convert"))
    path = base / "src" / "models" / "ggml-vocab-llama-bpe.gguf"
    return path if path.is_file() else None


def _rebuild_llama3_tokenizer(src: Path, out: Path) -> dict:
    """Llama 3's tokenizer.json (its pre-tokenizer, BOS template, ignore_merges) around the
    tokens and merges of llama.cpp's test vocabulary; returns that GGUF's tokenizer fields."""
    from tests.gguf_kv import read_kv

    # gguf-py's reading (tests/gguf_kv.py, held equal to GGUFReader's, which takes 22 s of CPU on this file)
    f = {k: v for k, v in read_kv(src).items() if k.startswith("tokenizer.")}
    toks, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    bos = toks[f["tokenizer.ggml.bos_token_id"]]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, ty) in enumerate(zip(toks, types)) if ty != NORMAL]
    seq = [{"Sequence": {"id": "A", "type_id": 0}}]
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, *seq],
                           "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, *seq,
                                    {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [f["tokenizer.ggml.bos_token_id"]], "tokens": [bos]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {t: i for i, (t, ty) in enumerate(zip(toks, types)) if ty == NORMAL},
                  "merges": f["tokenizer.ggml.merges"]},
    }
    out.mkdir()
    save(out / "tokenizer.json", tj)
    save(out / "tokenizer_config.json", {"bos_token": bos, "eos_token": toks[f["tokenizer.ggml.eos_token_id"]]})
    return f


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> tuple[Path, dict]:
    src = _llama3_vocab_gguf()
    if src is None:
        pytest.skip("llama.cpp's models/ggml-vocab-llama-bpe.gguf not found under $BITNET_GGUF_LLAMA_CONVERT/src")
    out = tmp_path_factory.mktemp("llama3") / "l3"
    return out, _rebuild_llama3_tokenizer(src, out)


@pytest.mark.slow
def test_real_llama3_vocabulary_hashes_to_llama_bpe(llama3, monkeypatch):
    """128256 tokens and 280147 merges."""
    model, ref = llama3
    monkeypatch.setattr(vocab, "SPLIT_PATTERNS", {})    # the name must come from the hash
    w = gguf.GGUFWriter(None, "llama")
    vocab.add_tokenizer(w, model, len(ref["tokenizer.ggml.tokens"]))
    fields = {k: v.value for k, v in w.kv_data[0].items()}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert fields[key] == ref[key], key
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"


# -- validation: BPE ----------------------------------------------------------------------------

def test_vocab_size_smaller_than_tokenizer(bpe_dir):
    n = n_tokens(bpe_dir)
    for size in (n - 1, n // 2, 1):
        refused(bpe_dir, size, "tokenizer.json", f"{n} tokens", f"up to {n - 1}", f"vocab_size is {size}")


def test_tokenizer_json_added_token_id_inconsistent(bpe_dir):
    """tokenizers ignores an added token's id when the vocabulary has the token (or
    gives it the next free id when it does not): such files are refused."""
    edit(bpe_dir / "tokenizer.json", lambda tj: tj["added_tokens"][2].update(id=599))
    refused(bpe_dir, 650, "tokenizer.json", "<|eot_id|>", "599", "inconsistent")
    edit(bpe_dir / "tokenizer.json", lambda tj: (tj["model"]["vocab"].pop("<|eot_id|>"), tj["added_tokens"][2].update(id=2)))
    refused(bpe_dir, 650, "tokenizer.json", "<|eot_id|>", "inconsistent")


def test_added_token_past_vocab_size(bpe_dir):
    """An added token (not in the BPE vocabulary) past the table: llama.cpp's converter stops too."""
    n = n_tokens(bpe_dir)
    for k, text in enumerate(["<|far|>", "<|farther|>"]):
        edit(bpe_dir / "tokenizer.json", lambda tj: tj["added_tokens"].append(
            {"id": n + k, "content": text, "special": True, "normalized": False, "single_word": False,
             "lstrip": False, "rstrip": False}))
    refused(bpe_dir, n, "tokenizer.json", "<|farther|>", f"up to {n + 1}", f"vocab_size is {n}")
    refused(bpe_dir, n + 1, "tokenizer.json", "<|farther|>", f"up to {n + 1}", f"vocab_size is {n + 1}")


@pytest.mark.parametrize("bad_id", [-1, -100, "3", 2.0, None, True])
def test_tokenizer_json_added_token_bad_id(bpe_dir, bad_id):
    edit(bpe_dir / "tokenizer.json", lambda tj: tj["added_tokens"][2].update(id=bad_id))
    refused(bpe_dir, 1000, "tokenizer.json", "<|eot_id|>", "integers >= 0")


@pytest.mark.parametrize("entry", ["<|x|>", 5, None, {"id": 7}, {"id": 7, "content": 12}])
def test_tokenizer_json_added_token_malformed(bpe_dir, entry):
    edit(bpe_dir / "tokenizer.json", lambda tj: tj["added_tokens"].append(entry))
    refused(bpe_dir, 1000, "tokenizer.json", "added_tokens")


@pytest.mark.parametrize("key,entry,needles", [
    ("-1", {"content": "<|x|>"}, ("integers >= 0",)),
    ("x", {"content": "<|x|>"}, ("integers >= 0",)),
    ("1.5", {"content": "<|x|>"}, ("integers >= 0",)),
    ("2", "<|eot_id|>", ("content",)),
    ("2", {"special": True}, ("content",)),
    ("2", {"content": None}, ("content",)),
    ("2", {"content": "<|other|>"}, ("<|eot_id|>", "disagree")),
    ("700", {"content": "<|far|>"}, ("700", "vocab_size")),
    ("630", {"content": "<|nowhere|>"}, ("630", "disagree")),   # in range, but tokenizer.json has no such id
])
def test_added_tokens_decoder_bad_entries(bpe_dir, key, entry, needles):
    edit(bpe_dir / "tokenizer_config.json", lambda tc: tc["added_tokens_decoder"].update({key: entry}))
    refused(bpe_dir, 650, "tokenizer_config.json", *needles)


def test_added_tokens_decoder_not_an_object(bpe_dir):
    edit(bpe_dir / "tokenizer_config.json", lambda tc: tc.update(added_tokens_decoder=[1, 2]))
    refused(bpe_dir, 650, "tokenizer_config.json", "added_tokens_decoder")


@pytest.mark.parametrize("content,needles", [
    ({"<|eot_id|>": -2}, ("integers >= 0",)),
    ({"<|eot_id|>": "2"}, ("integers >= 0",)),
    ({"<|eot_id|>": 2.5}, ("integers >= 0",)),
    ({"<|eot_id|>": 9999}, ("9999", "vocab_size")),
    ({"<|eot_id|>": 3}, ("disagree",)),
    (["<|eot_id|>", 2], ("JSON object",)),
])
def test_added_tokens_json_bad_entries(bpe_dir, content, needles):
    save(bpe_dir / "added_tokens.json", content)
    refused(bpe_dir, 650, "added_tokens.json", *needles)


def test_added_tokens_json_consistent_is_accepted(bpe_dir, tmp_path):
    save(bpe_dir / "added_tokens.json", {"<|eot_id|>": 2, "<|end_of_text|>": 1})
    kind, _ = tokenizer_fields(bpe_dir, 650, tmp_path)
    assert kind == "bpe"


@pytest.mark.parametrize("config,needle", [
    ({"bos_token_id": 650}, "bos_token_id 650"),
    ({"eos_token_id": -1}, "eos_token_id -1"),
    ({"pad_token_id": 10 ** 9}, "pad_token_id"),
    ({"eos_token_id": [1, 2, 651]}, "eos_token_id 651"),
    ({"unk_token_id": "0"}, "unk_token_id '0'"),
    ({"bos_token_id": True}, "bos_token_id True"),
    ({"text_config": {"eos_token_id": 700}}, "eos_token_id 700"),
])
def test_special_token_id_out_of_range(bpe_dir, config, needle):
    save(bpe_dir / "config.json", {"vocab_size": 650, **config})
    refused(bpe_dir, 650, "config.json", needle)


def test_special_token_ids_in_range_are_accepted(bpe_dir, tmp_path):
    save(bpe_dir / "config.json", {"bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": None})
    _, fields = tokenizer_fields(bpe_dir, 650, tmp_path)
    assert fields["tokenizer.ggml.bos_token_id"] == 0


@pytest.mark.parametrize("text,needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a tokenizer.json"),
    ("\"text\"", "not a tokenizer.json"),
    ('{"model": {"type": "BPE", "vocab": [1, 2], "merges": []}}', "cannot load"),
    ('{"model": {"type": "WordPiece", "vocab": {}}}', "'WordPiece'"),
])
def test_tokenizer_json_unreadable(bpe_dir, text, needle):
    (bpe_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    refused(bpe_dir, 650, "tokenizer.json", needle)


def test_tokenizer_json_not_utf8(bpe_dir):
    (bpe_dir / "tokenizer.json").write_bytes(b"\xff\xfe{}")
    refused(bpe_dir, 650, "tokenizer.json", "not valid JSON")


@pytest.mark.parametrize("name", ["tokenizer_config.json", "config.json", "added_tokens.json"])
def test_other_json_unreadable(bpe_dir, name):
    (bpe_dir / name).write_text("{oops", encoding="utf-8")
    refused(bpe_dir, 650, name, "not valid JSON")


def test_no_tokenizer(tmp_path):
    (tmp_path / "m").mkdir()
    refused(tmp_path / "m", 100, str(tmp_path / "m"), "tokenizer.model", "tokenizer.json")


# -- SentencePiece ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spm_trained(tmp_path_factory) -> Path:
    from tests.synthetic import train_sentencepiece_tokenizer

    out = tmp_path_factory.mktemp("spm")
    train_sentencepiece_tokenizer(out, vocab_size=320)
    return out


@pytest.fixture
def spm_dir(spm_trained, tmp_path) -> Path:
    return Path(shutil.copytree(spm_trained, tmp_path / "spm"))


def test_spm_wins_over_tokenizer_json(spm_dir, trained, tmp_path):
    """Both files present: SentencePiece, as llama.cpp's converter tries it first."""
    shutil.copy(trained / "tokenizer.json", spm_dir / "tokenizer.json")
    kind, fields = tokenizer_fields(spm_dir, 384, tmp_path)
    assert kind == "spm" and fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"


def test_spm_vocab_size_smaller_than_pieces(spm_dir):
    for size in (319, 100):
        refused(spm_dir, size, "tokenizer.model", "320 pieces", f"vocab_size is {size}")


def test_spm_out_of_range_added_tokens_are_skipped(spm_dir, tmp_path):
    """As llama.cpp's converter does: ids past vocab_size in added_tokens.json and
    added_tokens_decoder are ignored (test_reference_converter compares the bytes)."""
    save(spm_dir / "added_tokens.json", {"<far>": 500, "<near>": 330})
    save(spm_dir / "tokenizer_config.json", {"added_tokens_decoder": {"400": {"content": "<|far|>", "special": True},
                                                                     "331": {"content": "<b>"}}})
    _, fields = tokenizer_fields(spm_dir, 384, tmp_path)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 384 and "<far>" not in tokens and "<|far|>" not in tokens
    assert (tokens[330], types[330]) == ("<near>", USER_DEFINED)
    assert (tokens[331], types[331]) == ("<b>", USER_DEFINED)   # llama.cpp: <b> does not look special
    assert fields["tokenizer.ggml.scores"][330] == fields["tokenizer.ggml.scores"][331] == -1000.0


@pytest.mark.parametrize("name,content,needles", [
    ("added_tokens.json", {"<x>": -1}, ("integers >= 0",)),
    ("added_tokens.json", {"<x>": "330"}, ("integers >= 0",)),
    ("added_tokens.json", {"<x>": None}, ("integers >= 0",)),
    ("added_tokens.json", [["<x>", 330]], ("JSON object",)),
    ("tokenizer_config.json", {"added_tokens_decoder": {"-5": {"content": "<x>"}}}, ("integers >= 0",)),
    ("tokenizer_config.json", {"added_tokens_decoder": {"abc": {"content": "<x>"}}}, ("integers >= 0",)),
    ("tokenizer_config.json", {"added_tokens_decoder": {"330": "<x>"}}, ("content",)),
    ("tokenizer_config.json", {"added_tokens_decoder": {"330": {"special": True}}}, ("content",)),
    ("tokenizer_config.json", {"added_tokens_decoder": "none"}, ("added_tokens_decoder",)),
    ("tokenizer_config.json", [], ("JSON object",)),
    ("config.json", {"bos_token_id": 384}, ("bos_token_id 384",)),
    ("config.json", {"pad_token_id": -1}, ("pad_token_id -1",)),
])
def test_spm_malformed_added_and_special_tokens(spm_dir, name, content, needles):
    save(spm_dir / name, content)
    refused(spm_dir, 384, name, *needles)


def test_spm_unreadable_model(spm_dir):
    (spm_dir / "tokenizer.model").write_bytes(b"not a model")
    refused(spm_dir, 384, "tokenizer.model", "SentencePiece")


# -- llama.cpp tokenizes our BPE keys like `tokenizers` -----------------------------------------

def write_vocab_only_gguf(model_dir: Path, vocab_size: int, path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab.add_tokenizer(w, model_dir, vocab_size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def mixed_texts(seed: int, count: int) -> list[str]:
    from tests.synthetic import demo_corpus

    rng = random.Random(seed)
    pieces = [*demo_corpus(seed, lines=50), "café", "naïve", "Zürich", "привет", "你好", "🦙", "😀👍🏽", "✅",
              "12345", "3.14159", "1,000,000", "it's", "I'LL", "we've", "?!", "...", "--", "(x)", "\t", "\n",
              "\n\n", "   ", "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>"]
    out = ["Hello, wörld! 42 apples cost $3.50 🍎🦙 — naïve café <|eot_id|>\n\tdone 2024-01-01 it's <|end_of_text|>"]
    for _ in range(count):
        out.append("".join(rng.choice(pieces) + rng.choice(["", " ", "  ", "\n"]) for _ in range(rng.randint(1, 8))))
    return out


@pytest.mark.llama
def test_llama_cpp_tokenizes_like_tokenizers(llama, trained, tmp_path):
    from tokenizers import Tokenizer

    vocab_size = n_tokens(trained) + 13            # with [PAD] rows
    path = tmp_path / "vocab.gguf"
    write_vocab_only_gguf(trained, vocab_size, path)
    tok = Tokenizer.from_file(str(trained / "tokenizer.json"))
    texts = mixed_texts(0, 300)
    for text, got in zip(texts, llama.tokenize(path, texts, add_bos=True, special=True)["tokens"]):
        assert got == tok.encode(text).ids, text


@pytest.mark.llama
@pytest.mark.slow
def test_llama_cpp_tokenizes_real_llama3_vocabulary_like_tokenizers(llama, llama3, tmp_path):
    """With Llama 3's merges the pre-tokenizer matters (a wrong `pre` changes most
    tokenizations of such text), so this checks the name we write."""
    from tokenizers import Tokenizer

    model, ref = llama3
    path = tmp_path / "vocab.gguf"
    write_vocab_only_gguf(model, len(ref["tokenizer.ggml.tokens"]), path)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    texts = mixed_texts(1, 300)
    for text, got in zip(texts, llama.tokenize(path, texts, add_bos=True, special=True)["tokens"]):
        assert got == tok.encode(text).ids, text


# -- llama.cpp's converter (its own get_vocab_base, through transformers) -----------------------

@pytest.fixture(scope="module")
def llama_convert_src() -> tuple[Path, Path]:
    """(python, src) of llama.cpp's converter set up by `make reference-converter`."""
    from tests.conftest import ROOT

    if os.environ.get("BITNET_GGUF_SKIP_LLAMA") == "1":
        pytest.skip("BITNET_GGUF_SKIP_LLAMA=1")
    base = Path(os.environ.get("BITNET_GGUF_LLAMA_CONVERT", ROOT / "build" / "llama.cpp-convert"))
    python, src = base / "venv" / "bin" / "python", base / "src"
    if not (python.is_file() and (src / "conversion" / "base.py").is_file()):
        pytest.fail(f"llama.cpp's converter is not set up in {base}: run `make reference-converter` "
                    "(part of `make test`), or set BITNET_GGUF_SKIP_LLAMA=1 to skip these tests", pytrace=False)
    return python, src


def _with_added_tokens(model: Path) -> int:
    """Added tokens of every kind get_vocab_base distinguishes; returns the token count."""
    n = n_tokens(model)
    extra = [("<|tool|>", False, False), ("<b>", False, False), ("two\u2581words", False, False),
             ("[MASK]", False, False), ("<sep>", True, False), ("plain added", False, True),
             ("\u2581lead", False, False)]

    def add(tj):
        for k, (text, special, normalized) in enumerate(extra):
            tj["added_tokens"].append({"id": n + k, "content": text, "single_word": False, "lstrip": False,
                                       "rstrip": False, "normalized": normalized, "special": special})
    edit(model / "tokenizer.json", add)
    return n + len(extra)


@pytest.mark.llama
@pytest.mark.parametrize("variant", ["trained", "added-tokens"])
def test_same_vocab_as_llama_cpp_converter(llama_convert_src, bpe_dir, variant):
    from tests.conftest import run_python_script

    n = _with_added_tokens(bpe_dir) if variant == "added-tokens" else n_tokens(bpe_dir)
    vocab_size = n + 9
    python, src = llama_convert_src
    proc = run_python_script(python, Path(__file__).with_name("reference_vocab.py"), src, bpe_dir, vocab_size,
                             timeout=300)
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(proc.stdout)

    w = gguf.GGUFWriter(None, "llama")
    vocab.add_tokenizer(w, bpe_dir, vocab_size, pre="llama-bpe")   # the converter does not know our hash
    ours = {k: v.value for k, v in w.kv_data[0].items()}
    assert ours["tokenizer.ggml.tokens"] == ref["tokens"]
    assert ours["tokenizer.ggml.token_type"] == ref["types"]
    assert ours["tokenizer.ggml.merges"] == ref["merges"]
    for kind, tid in ref["special_ids"].items():
        assert ours[f"tokenizer.ggml.{kind}_token_id"] == tid
    assert ours["tokenizer.ggml.add_bos_token"] == ref["add_special"]["bos"]
    assert ours["tokenizer.chat_template"] == ref["chat_template"]
    from tokenizers import Tokenizer
    assert vocab.chkhsh(Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))) == ref["chkhsh"]
    assert ref["pre"] is None
