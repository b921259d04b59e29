"""Tokenizer key/values: SentencePiece (`tokenizer.model`) or BPE (`tokenizer.json`).

Both are laid out the way llama.cpp's converter lays them out, so its runtime reads
them as it reads the converter's files:

- SentencePiece: model "llama", pre "default", pieces with scores and types, then
  added_tokens.json and tokenizer_config.json's added_tokens_decoder over their rows.
- BPE (`_set_vocab_gpt2`): model "gpt2", a pre-tokenizer name, the byte-level token
  strings of tokenizer.json with their types (no scores), merges.

Both have exactly `vocab_size` rows (the embedding's row count): ids no token uses
become unused `[PAD{i}]` rows. gguf.SpecialVocab adds merges, special token ids,
add_*_token flags and the chat template.

Ids, checked before anything is written (CheckpointError naming the file):
- the tokenizer's own tokens must fit in `vocab_size`, or pieces would be dropped;
- added tokens must be well formed with integer ids >= 0. An id >= vocab_size in
  added_tokens.json or added_tokens_decoder is skipped for SentencePiece (llama.cpp's
  converter skips it) and refused for BPE (llama.cpp's converter stops on it: every
  tokenizer id must be a row). For BPE, tokenizer_config.json and added_tokens.json
  must name the tokens tokenizer.json has at those ids, and tokenizer.json's
  added_tokens ids must be the ids the `tokenizers` package gives them (it silently
  renumbers them otherwise);
- special token ids in config.json (`{kind}_token_id`, also lists of ids and those
  under text_config) must be rows of the table.

Every field of the tokenizer files that we or gguf.SpecialVocab read has its JSON type checked
before any reader runs (check_tokenizer_json, check_tokenizer_config, check_tokenizer_files): a
malformed file is one line naming the file and the field.

The BPE pre-tokenizer name: `pre` if given (checked against the names llama.cpp's
runtime accepts); else the name llama.cpp's converter finds by hashing the ids of a
fixed text; else the name whose runtime regex equals the pre_tokenizer's own Split
pattern(s), if the tokenizer has no normalizer and ignores merges the way that
runtime pre-tokenizer does.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import gguf

from pipeline.errors import CheckpointError, OptionError
from pipeline.tokenizer_tables import CHKTXT, KNOWN_HASHES, PORTABLE_HASH_NAMES, RUNTIME_PRE_NAMES, SPLIT_PATTERNS

T = gguf.TokenType

# The converter's does_token_look_special (conversion/base.py): added tokens that are
# CONTROL even when not flagged special.
_SPECIAL_LOOKING = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
_SPECIAL_BRACKETS = (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">"))

# Special token kinds gguf.SpecialVocab reads from config.json as `{kind}_token_id`.
_SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask", "eot", "eom")


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, pre: str | None = None,
                  style: str | None = None) -> str:
    """Add every tokenizer.* key/value to `writer`; return the tokenizer kind ("spm" or "bpe", or
    the family's `style`, a key of _WRITERS)."""
    model_dir = Path(model_dir)
    kind = style or tokenizer_kind(model_dir)
    check_tokenizer_files(model_dir, read_elsewhere=("tokenizer.json",) if kind != "spm" else ())
    if pre is not None:
        if kind != "bpe":
            raise OptionError(f"--tokenizer-pre {pre}: {model_dir} has a SentencePiece tokenizer.model, "
                              "which has no pre-tokenizer; leave the option out")
        check_pre_name(pre)
    _WRITERS[kind](writer, model_dir, vocab_size, pre)
    return kind


def tokenizer_file(model_dir: Path) -> Path | None:
    """The file the token table is read from (tokenizer.model before tokenizer.json, as llama.cpp's
    converter tries them), or None; for messages, so a dangling link is not an error here."""
    return next((model_dir / name for name, _ in _KIND_BY_FILE if os.path.lexists(model_dir / name)), None)


def tokenizer_kind(model_dir: Path) -> str:
    for name, kind in _KIND_BY_FILE:
        if is_present(model_dir / name):
            return kind
    raise CheckpointError(f"{model_dir}: tokenizer missing (needs a SentencePiece tokenizer.model or a BPE tokenizer.json)")


# Files gguf.SpecialVocab opens (with the keys it reads from them): each is read here first,
# so that a file it would stop on (unreadable, not UTF-8, not JSON, nested past the parser's
# depth, of the wrong JSON type) is refused naming it, and a dangling link is not skipped
# silently (gguf's is_file() takes a link to a missing blob for an absent file).
_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "added_tokens.json",
               "special_tokens_map.json", "chat_template.json")


def check_tokenizer_files(model_dir: Path, read_elsewhere: tuple[str, ...] = ()) -> None:
    """Every tokenizer and config file is readable and of the right JSON type, and the chat
    template gguf.SpecialVocab would take is text jinja2 can parse (llama-cpp-python compiles
    it with jinja2 when it loads the file). `read_elsewhere`: files the caller reads and checks."""
    data = {name: read_json(model_dir / name) for name in _JSON_FILES if name not in read_elsewhere}
    for name in ("tokenizer_config.json", "chat_template.json", "added_tokens.json", "special_tokens_map.json"):
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise CheckpointError(f"{model_dir / name}: must hold a JSON object, not {_json_type(data[name])}")
    if data.get("tokenizer.json") is not None:  # gguf.SpecialVocab reads it beside a tokenizer.model too
        check_tokenizer_json(model_dir / "tokenizer.json", data["tokenizer.json"])
    config = data.get("config.json") or {}
    if "text_config" in config and not isinstance(config["text_config"], dict):
        raise CheckpointError(f"{model_dir / 'config.json'}: text_config must be a JSON object, "
                              f"not {type(config['text_config']).__name__}")
    tokenizer_config = data.get("tokenizer_config.json")
    if not tokenizer_config:
        return  # gguf.SpecialVocab reads no chat template without a tokenizer_config.json
    check_tokenizer_config(model_dir / "tokenizer_config.json", tokenizer_config)
    jinja = model_dir / "chat_template.jinja"
    files = [jinja, *sorted((model_dir / "additional_chat_templates").glob("*.jinja"))] if is_present(jinja) else []
    templates = {path: read_text(path) for path in files}
    if "chat_template" in tokenizer_config:
        where, template = f"{model_dir / 'tokenizer_config.json'}: chat_template", tokenizer_config["chat_template"]
    elif templates:
        for path, text in templates.items():
            check_chat_template(str(path), text)
        return
    else:
        where = f"{model_dir / 'chat_template.json'}: chat_template"
        template = (data.get("chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):
        for i, entry in enumerate(template):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise CheckpointError(f"{where}[{i}] must be an object with a string 'name' and 'template'")
            check_chat_template(f"{where}[{i}]", entry["template"])
    elif isinstance(template, str):
        check_chat_template(where, template)
    elif template is not None:
        raise CheckpointError(f"{where} must be a string (or a list of named templates), "
                              f"not {type(template).__name__}")


def check_chat_template(where: str, template: str) -> None:
    """A chat template is UTF-8 text that jinja2 parses (transformers' extensions allowed)."""
    import jinja2
    import jinja2.ext

    try:
        template.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{where}: the chat template is not valid UTF-8 text (a lone surrogate); "
                              "fix or remove it") from None
    env = jinja2.Environment(extensions=[jinja2.ext.loopcontrols, _generation_tag()])
    try:
        env.parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"{where}: the chat template does not parse (line {e.lineno}: {_one_line(e)}); "
                              "fix or remove it") from None
    except RecursionError:
        raise CheckpointError(f"{where}: the chat template is nested too deeply to parse; fix or remove it") from None


def _generation_tag():
    import jinja2.ext
    from jinja2 import nodes

    class GenerationTag(jinja2.ext.Extension):
        """transformers' `{% generation %}...{% endgeneration %}` block, parsed as its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)
    return GenerationTag


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _expect(path: Path, field: str, value, kind: type, what: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{path}: {field} must be {what}, not {_json_type(value)}; fix or remove the file")


def _optional(path: Path, parent: dict, key: str, field: str, kind: type, what: str):
    """parent[key] when present (checked to be `kind`), else None."""
    if key not in parent:
        return None
    _expect(path, field, parent[key], kind, what)
    return parent[key]


def check_tokenizer_json(path: Path, data) -> None:
    """Every field of tokenizer.json that this converter or gguf.SpecialVocab reads has the JSON type
    it is read as, so that a malformed file is one line naming the file and the field, not an
    AttributeError deep in a reader: the object itself; model (object) and its merges (a list of
    strings or pairs of strings); added_tokens (list of objects with a string content and an
    integer id >= 0, special true or false); post_processor (object or null) and its processors (list of objects), their
    single and pair templates (lists of objects whose SpecialToken and Sequence are objects) and
    their cls and sep (non-empty lists). pre_tokenizer and normalizer are read defensively (an
    unexpected shape is "not recognised"); model.vocab is checked by its readers (the tokenizers
    package for BPE, _add_bpe_json_as_spm)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a tokenizer.json (the file must hold a JSON object, not "
                              f"{_json_type(data)}); fix or remove the file")
    model = _optional(path, data, "model", "model", dict, "an object")
    if model is not None:
        merges = _optional(path, model, "merges", "model.merges", list, "a list")
        for i, merge in enumerate(merges or []):
            if not (isinstance(merge, str) or isinstance(merge, list) and len(merge) == 2
                    and all(isinstance(m, str) for m in merge)):
                raise CheckpointError(f"{path}: model.merges[{i}] must be a string or a pair of strings, not "
                                      f"{_json_type(merge)}; fix or remove the file")
    added = _optional(path, data, "added_tokens", "added_tokens", list, "a list of token objects")
    for i, entry in enumerate(added or []):
        _expect(path, f"added_tokens[{i}]", entry, dict, "an object")
        _expect(path, f"added_tokens[{i}].content", entry.get("content"), str, "a string")
        _token_id(path, entry.get("id"), entry["content"])
        _optional(path, entry, "special", f"added_tokens[{i}].special", bool, "true or false")
    post = data.get("post_processor")
    if post is None:
        return
    _expect(path, "post_processor", post, dict, "an object or null")
    processors = _optional(path, post, "processors", "post_processor.processors", list, "a list of objects")
    for i, processor in enumerate(post["processors"] if processors is not None else [post]):
        where = f"post_processor.processors[{i}]" if processors is not None else "post_processor"
        _expect(path, where, processor, dict, "an object")
        for key in ("single", "pair"):
            for j, item in enumerate(_optional(path, processor, key, f"{where}.{key}", list, "a list") or []):
                _expect(path, f"{where}.{key}[{j}]", item, dict, "an object")
                for part in ("SpecialToken", "Sequence"):
                    _optional(path, item, part, f"{where}.{key}[{j}].{part}", dict, "an object")
        for key in ("cls", "sep"):
            if key in processor and not (isinstance(processor[key], list) and processor[key]):
                got = "an empty list" if processor[key] == [] else _json_type(processor[key])
                raise CheckpointError(f"{path}: {where}.{key} must be a non-empty list ([token, id]), not {got}; "
                                      "fix or remove the file")


def check_tokenizer_config(path: Path, data: dict) -> None:
    """The special-token fields of tokenizer_config.json that gguf.SpecialVocab reads: `{kind}_token`
    is a string, an object with a string content (transformers' AddedToken) or null, and
    `add_{kind}_token` true, false or null (SpecialVocab would ignore any other value silently)."""
    for kind in _SPECIAL_KINDS:
        token = data.get(f"{kind}_token")
        if token is not None and not isinstance(token, str) and \
                not (isinstance(token, dict) and isinstance(token.get("content"), str)):
            raise CheckpointError(f"{path}: {kind}_token must be a string, an object with a string 'content' or "
                                  f"null, not {_json_type(token)}; fix or remove the file")
        flag = data.get(f"add_{kind}_token")
        if flag is not None and not isinstance(flag, bool):
            raise CheckpointError(f"{path}: add_{kind}_token must be true, false or null, not {_json_type(flag)}; "
                                  "fix or remove the file")


# Memory of reading a tokenizer and keeping its key/values until assemble has written them
# (measured, docs/notes/tokenizer-memory.md): per row of the token table (text, type, score as
# Python objects, their JSON record, the copy assemble reads back and the header it builds), and
# per byte of the files parsed whole (tokenizer.json is parsed by json, by the tokenizers package
# and by gguf.SpecialVocab: about 35x its size at the peak; other JSON files about 12x).
ROW_BYTES = 384
FILE_BYTES_PER_BYTE = {"tokenizer.json": 40, "tokenizer.model": 8}
JSON_BYTES_PER_BYTE = 12


def tokenizer_memory(model_dir: Path, vocab_size: int) -> tuple[int, Path]:
    """(bytes of memory reading the tokenizer takes at its peak, the file that costs most) --
    from the files' sizes and the table's rows, before anything is read."""
    costs = {model_dir / "config.json": ROW_BYTES * vocab_size}  # the rows: vocab_size names them
    for name in dict.fromkeys(_JSON_FILES + tuple(n for n, _ in _KIND_BY_FILE)):
        path = model_dir / name
        try:
            size = path.stat().st_size if path.is_file() else 0
        except OSError:
            size = 0  # unreadable: the reader says so
        costs[path] = costs.get(path, 0) + size * FILE_BYTES_PER_BYTE.get(name, JSON_BYTES_PER_BYTE)
    return sum(costs.values()), max(costs, key=costs.get)


def check_pre_name(pre: str) -> None:
    if pre not in RUNTIME_PRE_NAMES:
        raise OptionError(f"--tokenizer-pre {pre!r}: llama.cpp does not know this pre-tokenizer; "
                          f"use one it accepts, such as llama-bpe or falcon3")


def looks_special(text: str) -> bool:
    return text in _SPECIAL_LOOKING or any(text.startswith(a) and text.endswith(b) for a, b in _SPECIAL_BRACKETS)


# -- SentencePiece ------------------------------------------------------------------------------

def _add_spm(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, pre: str | None) -> None:
    tokens, scores, types = sentencepiece_vocab(model_dir, vocab_size)
    _add_spm_tables(writer, model_dir, vocab_size, tokens, scores, types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _add_spm_tables(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, tokens: list, scores: list,
                    types: list) -> None:
    """A SentencePiece ("llama") token table, from a tokenizer.model or a tokenizer.json alike."""
    check_special_ids(model_dir, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def sentencepiece_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types of a `vocab_size`-row table, as llama.cpp's converter
    makes them from tokenizer.model, added_tokens.json and added_tokens_decoder."""
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable SentencePiece model ({e})") from None
    if sp.vocab_size() > vocab_size:
        raise CheckpointError(f"{path}: has {sp.vocab_size()} pieces, but config.json vocab_size is {vocab_size}; "
                              "the embedding must have a row for every piece")

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    for i in range(sp.vocab_size()):
        try:
            tokens[i] = sp.IdToPiece(i)
        except UnicodeDecodeError as e:  # sentencepiece loads the model and fails here
            raise CheckpointError(f"{path}: piece {i} is not UTF-8 text ({e}); the file is damaged, download it "
                                  "again") from None
        scores[i] = sp.GetScore(i)
        kind = T.NORMAL
        if sp.IsUnknown(i):
            kind = T.UNKNOWN
        elif sp.IsControl(i):
            kind = T.CONTROL
        elif sp.IsUnused(i):
            kind = T.UNUSED
        elif sp.IsByte(i):
            kind = T.BYTE
        types[i] = int(kind)

    for tid, text in added_tokens_json(model_dir):
        if tid < vocab_size:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, int(T.USER_DEFINED)
    for tid, entry in added_tokens_decoder(model_dir):
        if tid >= vocab_size:
            continue
        text = entry["content"]
        if entry.get("special") or looks_special(text):
            types[tid] = int(T.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[tid] = int(T.USER_DEFINED)
        tokens[tid], scores[tid] = text, -1000.0
    return tokens, scores, types


# -- BPE ----------------------------------------------------------------------------------------

def _add_bpe(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, pre: str | None) -> None:
    tok, data = load_tokenizer_json(model_dir / "tokenizer.json")
    tokens, types = bpe_vocab(model_dir, tok, vocab_size)
    check_special_ids(model_dir, vocab_size)
    pre = pre if pre is not None else pre_tokenizer_name(model_dir / "tokenizer.json", tok, data)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if is_present(model_dir / "merges.txt"):  # SpecialVocab's fallback for merges: its decode error named here
        read_text(model_dir / "merges.txt")
    try:
        with _quiet(logging.getLogger("gguf.vocab")):  # e.g. Llama 3's pair template: "Unknown separator token"
            special = gguf.SpecialVocab(model_dir, load_merges=True)
    except ValueError as e:
        raise CheckpointError(f"{model_dir / 'tokenizer.json'}: merges or special tokens unreadable ({e})") from None
    if not special.merges or not all(isinstance(m, str) for m in special.merges):
        # llama.cpp refuses a BPE vocabulary without tokenizer.ggml.merges ("cannot find tokenizer merges")
        raise CheckpointError(f"{model_dir / 'tokenizer.json'}: the BPE tokenizer has no usable merges (model.merges "
                              "is empty, missing or not strings, and there is no merges.txt); llama.cpp cannot load "
                              "such a file")
    # llama.cpp's converter ships a newer gguf-py whose SpecialVocab reads a ByteLevel
    # post-processor as "add neither BOS nor EOS" unless a template says otherwise; the PyPI
    # release lacks that branch. Same runtime behaviour (BPE defaults to no EOS), but the
    # explicit keys keep our file identical to theirs.
    post = data.get("post_processor") or {}
    processors = post.get("processors", [post]) if isinstance(post, dict) else []
    if any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in processors):
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_tokenizer_json(path: Path):
    """(tokenizers.Tokenizer, the parsed JSON) of a BPE tokenizer.json."""
    from tokenizers import Tokenizer

    data = read_json(path)
    check_tokenizer_json(path, data)
    if not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: not a tokenizer.json (no 'model' object)")
    model_type = data["model"].get("type")
    if model_type != "BPE":
        raise CheckpointError(f"{path}: the tokenizer model is {model_type!r:.60}; only BPE tokenizers "
                              "(or a SentencePiece tokenizer.model) can be converted")
    added = data.get("added_tokens", [])
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers package raises plain Exception
        raise CheckpointError(f"{path}: the tokenizers package cannot load it ({_one_line(e)})") from None
    tok.no_truncation()  # as transformers encodes by default (and so the converter's hash)
    tok.no_padding()
    for entry in added:
        if tok.token_to_id(entry["content"]) != entry["id"]:
            raise CheckpointError(f"{path}: added token {entry['content']!r} has id {entry['id']}, but the "
                                  f"tokenizer gives it id {tok.token_to_id(entry['content'])}; the file is inconsistent")
    return tok, data


def bpe_vocab(model_dir: Path, tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types of a `vocab_size`-row table, as llama.cpp's get_vocab_base makes them."""
    path = model_dir / "tokenizer.json"
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    by_id = {tid: text for text, tid in vocab.items()}
    top = max(by_id, default=-1)
    if top >= vocab_size:
        raise CheckpointError(f"{path}: has {len(vocab)} tokens with ids up to {top} ({by_id[top]!r}), but "
                              f"config.json vocab_size is {vocab_size}; the embedding must have a row for every token")
    _check_added_agree(model_dir, by_id, vocab_size)

    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
            continue
        kind = T.NORMAL
        entry = added.get(i)
        if entry is not None and entry.content == text:
            if not entry.normalized:
                # llama.cpp's runtime expects added tokens pre-normalized: round-trip them.
                ids = tok.encode(text, add_special_tokens=False).ids
                text = tok.decode(ids, skip_special_tokens=False)
            if entry.special or looks_special(text):
                kind = T.CONTROL
            else:
                text = text.replace("\u2581", " ")
                kind = T.USER_DEFINED
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def chkhsh(tok) -> str:
    """llama.cpp's converter's fingerprint of a BPE tokenizer (special tokens included)."""
    ids = tok.encode(CHKTXT).ids
    return hashlib.sha256(str(ids).encode()).hexdigest()


def pre_name_for_hash(digest: str) -> str | None:
    """The `tokenizer.ggml.pre` to write for a tokenizer llama.cpp's converter knows by its hash:
    the converter's name, or one every target runtime accepts where some runtime lacks it."""
    return PORTABLE_HASH_NAMES.get(digest) or KNOWN_HASHES.get(digest)


def pre_tokenizer_name(path: Path, tok, data: dict) -> str:
    name = pre_name_for_hash(chkhsh(tok))
    if name is not None:
        return name
    name = SPLIT_PATTERNS.get(_split_patterns(data))
    if name is not None and data.get("normalizer") is None and data["model"].get("ignore_merges") is True:
        return name
    raise CheckpointError(f"{path}: the pre-tokenizer is not recognised (neither llama.cpp's tokenizer "
                          "hashes nor a Split pattern its runtime implements, with no normalizer and "
                          "ignore_merges); pass --tokenizer-pre NAME")


def _split_patterns(data: dict) -> tuple[str, ...] | None:
    """The Regex patterns of a pre_tokenizer made of isolated Splits then one ByteLevel
    without its own regex (the shape of Llama 3's), in order; None for any other shape."""
    pre = data.get("pre_tokenizer")
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        return None
    *splits, last = steps
    if last.get("type") != "ByteLevel" or last.get("use_regex", True) or last.get("add_prefix_space", True):
        return None
    patterns = []
    for s in splits:
        pattern = s.get("pattern")
        if (s.get("type") != "Split" or s.get("behavior") != "Isolated" or s.get("invert")
                or not isinstance(pattern, dict) or not isinstance(pattern.get("Regex"), str)):
            return None
        patterns.append(pattern["Regex"])
    return tuple(patterns) or None


# -- ids ----------------------------------------------------------------------------------------

def added_tokens_json(model_dir: Path) -> list[tuple[int, str]]:
    """(id, text) of added_tokens.json, every id an integer >= 0."""
    path = model_dir / "added_tokens.json"
    data = read_json(path)
    if data is None:
        return []
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must be a JSON object of token text to id")
    return [(_token_id(path, tid, text), text) for text, tid in data.items()]


def added_tokens_decoder(model_dir: Path) -> list[tuple[int, dict]]:
    """(id, entry) of tokenizer_config.json's added_tokens_decoder, every id an integer
    >= 0 and every entry an object with a string "content"."""
    path = model_dir / "tokenizer_config.json"
    decoder = read_json_object(path).get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{path}: added_tokens_decoder must be an object of id to token")
    out = []
    for key, entry in decoder.items():
        digits = key.strip()
        tid = _token_id(path, int(digits) if digits.isascii() and digits.isdigit() else key, key)
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise CheckpointError(f"{path}: added_tokens_decoder entry {key} must be an object with a "
                                  "string 'content'")
        if not isinstance(entry.get("special", False), bool):
            raise CheckpointError(f"{path}: added_tokens_decoder entry {key}: special must be true or false, not "
                                  f"{_json_type(entry['special'])}; fix or remove the file")
        out.append((tid, entry))
    return out


def _check_added_agree(model_dir: Path, text_at: dict[int, str], vocab_size: int) -> None:
    """added_tokens.json and added_tokens_decoder must name tokenizer.json's tokens."""
    entries = [(model_dir / "added_tokens.json", tid, text) for tid, text in added_tokens_json(model_dir)]
    entries += [(model_dir / "tokenizer_config.json", tid, e["content"]) for tid, e in added_tokens_decoder(model_dir)]
    for path, tid, text in entries:
        if tid >= vocab_size:
            raise CheckpointError(f"{path}: added token {text!r} has id {tid}, past config.json vocab_size "
                                  f"{vocab_size}; the embedding has no row for it")
        if text_at.get(tid) != text:
            there = repr(text_at[tid]) if tid in text_at else "no token"
            raise CheckpointError(f"{path}: added token {text!r} has id {tid}, but tokenizer.json has "
                                  f"{there} there; the tokenizer files disagree")


def check_special_ids(model_dir: Path, vocab_size: int) -> None:
    """config.json's `{kind}_token_id` values (ints, lists of ints or null) must be rows."""
    path = model_dir / "config.json"
    config = read_json_object(path)
    scopes = [config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}]
    for scope in scopes:
        for kind in _SPECIAL_KINDS:
            value = scope.get(f"{kind}_token_id")
            for tid in value if isinstance(value, list) else [] if value is None else [value]:
                if not _is_int(tid) or not 0 <= tid < vocab_size:
                    raise CheckpointError(f"{path}: {kind}_token_id {tid!r} is not a token id in "
                                          f"[0, {vocab_size}) (vocab_size)")


def _token_id(path: Path, tid, text) -> int:
    if not _is_int(tid) or tid < 0:
        raise CheckpointError(f"{path}: added token {text!r} has id {tid!r}; ids must be integers >= 0")
    return tid


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; {} when the file is absent."""
    data = read_json(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return data


def is_present(path: Path) -> bool:
    """Whether a checkpoint file is there; a link to nothing (an incomplete download, a link loop)
    or something that is not a file is refused, not taken for an absent file."""
    if not os.path.lexists(path):
        return False
    if not path.exists():
        raise CheckpointError(f"{path}: a link to a missing file (an incomplete download?); download it again "
                              "or remove the link")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file; remove it or put the file there")
    return True


def read_text(path: Path, what: str = "UTF-8 text") -> str:
    """A checkpoint text file, or a one-line refusal naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror}); check the file and its permissions") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not {what} ({e})") from None


def read_json(path: Path):
    if not is_present(path):
        return None
    text = read_text(path, "valid JSON (JSON is UTF-8 text)")
    try:
        return json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply to read (a damaged or hostile file)") from None


_KIND_BY_FILE = (("tokenizer.model", "spm"), ("tokenizer.json", "bpe"))   # llama.cpp tries SentencePiece first
def _add_bpe_json_as_spm(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, pre: str | None) -> None:
    """tokenizer.json's BPE vocabulary written as a SentencePiece ("llama") one, as microsoft/BitNet's
    embedding converter writes Gemma3's (_set_vocab_gemma3, lines 248-332 of
    utils/convert-bitnet-embedding-to-gguf.py): ids missing from model.vocab are [PAD<id>] (UNUSED,
    -10000); tokenizer.json's added tokens are CONTROL when special or bracketed (<...>, [...]),
    else USER_DEFINED, score -1000; <0xHH> are BYTE (0); <unk> UNKNOWN (0); every other token NORMAL
    with score -rank of the first merge that makes it (0 when none does); no space prefix."""
    path = model_dir / "tokenizer.json"
    data = read_json_object(path)
    check_tokenizer_json(path, data)
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    merges = model.get("merges", []) if isinstance(model, dict) else None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()) \
            or not isinstance(merges, list):
        raise CheckpointError(f"{path}: model.vocab (token -> id) and model.merges of a BPE tokenizer are needed")
    scores_by_token: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        if isinstance(merge, list) and all(isinstance(m, str) for m in merge):
            made = "".join(merge)
        elif isinstance(merge, str):
            made = merge.replace(" ", "", 1)
        else:
            raise CheckpointError(f"{path}: merge {rank} is {merge!r:.40}; merges are pairs of strings")
        scores_by_token.setdefault(made, -float(rank))
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    token_at = {i: t for t, i in vocab.items()}
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = token_at.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]"), scores.append(-10000.0), types.append(gguf.TokenType.UNUSED)
            continue
        if i in added:
            bracketed = text[:1] in ("<", "[") and text[-1:] in (">", "]")
            types.append(gguf.TokenType.CONTROL if added[i].get("special") or bracketed
                         else gguf.TokenType.USER_DEFINED)
            scores.append(-1000.0)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(gguf.TokenType.BYTE), scores.append(0.0)
        elif text == "<unk>":
            types.append(gguf.TokenType.UNKNOWN), scores.append(0.0)
        else:
            types.append(gguf.TokenType.NORMAL), scores.append(scores_by_token.get(text, 0.0))
        tokens.append(text)
    _add_spm_tables(writer, model_dir, vocab_size, tokens, scores, types)
    writer.add_add_space_prefix(False)
    gguf.SpecialVocab(model_dir, load_merges=False).add_to_gguf(writer, quiet=True)


_WRITERS = {"spm": _add_spm, "bpe": _add_bpe, "bpe-json-as-spm": _add_bpe_json_as_spm}
