"""GGUF key/values: built once from the checkpoint, carried as JSON through the stores.

The gguf package's own writer methods and vocab helpers produce the key/values
(so key names and value types are theirs); we record `GGUFWriter.kv_data` as
plain JSON in each store's attributes and replay it in assemble.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf

from pipeline.errors import CheckpointError
from pipeline.families import TensorPlan, arch_metadata

_ADD = {"uint32": gguf.GGUFValueType.UINT32, "float32": gguf.GGUFValueType.FLOAT32,
        "string": gguf.GGUFValueType.STRING, "bool": gguf.GGUFValueType.BOOL}


def sentencepiece_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types the way llama.cpp's converter lays them out.

    The table has exactly `vocab_size` rows (the embedding's row count); rows the
    tokenizer does not cover become unused `[PAD{i}]` tokens. Added tokens from
    added_tokens.json and tokenizer_config.json's added_tokens_decoder overwrite
    their rows.
    """
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; this family needs its SentencePiece tokenizer.model")
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable SentencePiece model ({e})") from None

    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i)
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

    added = _read_json(model_dir / "added_tokens.json") or {}
    for text, tid in added.items():
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, int(T.USER_DEFINED)

    decoder = (_read_json(model_dir / "tokenizer_config.json") or {}).get("added_tokens_decoder", {})
    for tid_text, data in decoder.items():
        tid = int(tid_text)
        if tid >= vocab_size:
            continue
        text = data["content"]
        if data.get("special") or _looks_special(text):
            types[tid] = int(T.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[tid] = int(T.USER_DEFINED)
        tokens[tid], scores[tid] = text, -1000.0
    return tokens, scores, types


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<") and text.endswith(">")) \
        or (text.startswith("[") and text.endswith("]"))


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def build_kv(plan: TensorPlan, model_dir: Path, name: str | None = None,
             tokenizer_pre: str | None = None) -> list[dict]:
    """Every GGUF key/value except file type, as JSON-ready records."""
    w = gguf.GGUFWriter(None, plan.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or model_dir.resolve().name)
    for key, vtype, value in arch_metadata(plan, model_dir / "config.json"):
        w.add_key_value(key, value, _ADD[vtype])
    if (model_dir / "tokenizer.model").is_file() or not (model_dir / "tokenizer.json").is_file():
        tokens, scores, types = sentencepiece_vocab(model_dir, plan.config["vocab_size"])
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    return [kv_record(key, v) for key, v in w.kv_data[0].items()]


def kv_record(key: str, v: gguf.GGUFValue) -> dict:
    value = v.value
    if isinstance(value, (list, tuple)):
        value = [x.decode("utf-8") if isinstance(x, bytes) else x for x in value]
    elif isinstance(value, bytes):
        value = value.decode("utf-8")
    sub = v.sub_type
    if v.type == gguf.GGUFValueType.ARRAY and sub is None:
        sub = gguf.GGUFValueType.get_type(v.value[0])  # recorded, so JSON cannot change it
    return {"key": key, "type": v.type.name, "sub_type": sub.name if sub is not None else None, "value": value}


def apply_kv(writer: gguf.GGUFWriter, records: list[dict]) -> None:
    for r in records:
        if r["key"] == gguf.Keys.General.ARCHITECTURE:
            continue  # GGUFWriter adds it itself
        sub = gguf.GGUFValueType[r["sub_type"]] if r["sub_type"] is not None else None
        writer.add_key_value(r["key"], r["value"], gguf.GGUFValueType[r["type"]], sub_type=sub)
