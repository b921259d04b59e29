"""GGUF key/values: decided once from the checkpoint, stored once in the run directory.

The gguf package's own writer methods and vocab helpers produce the key/values
(so key names and value types are theirs); we record `GGUFWriter.kv_data` as
plain JSON records in the run directory's metadata.json, which assemble writes
with our container writer. A tokenizer or config change therefore redoes
assemble only.
"""
from __future__ import annotations

from pathlib import Path

import gguf

from pipeline.families import TensorPlan, arch_metadata
from pipeline.vocab import add_tokenizer

_ADD = {"uint32": gguf.GGUFValueType.UINT32, "float32": gguf.GGUFValueType.FLOAT32,
        "string": gguf.GGUFValueType.STRING, "bool": gguf.GGUFValueType.BOOL}


def build_kv(plan: TensorPlan, model_dir: Path, name: str | None = None,
             tokenizer_pre: str | None = None) -> list[dict]:
    """Every GGUF key/value except file type, as JSON-ready records."""
    w = gguf.GGUFWriter(None, plan.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or model_dir.resolve().name)
    for key, vtype, value in arch_metadata(plan, model_dir / "config.json"):
        w.add_key_value(key, value, _ADD[vtype])
    add_tokenizer(w, model_dir, plan.config["vocab_size"], tokenizer_pre)
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
