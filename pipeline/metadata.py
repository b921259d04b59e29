"""GGUF key/values: decided once from the checkpoint, stored once in the run directory.

The gguf package's own writer methods and vocab helpers produce the key/values
(so key names and value types are theirs); we record `GGUFWriter.kv_data` as
plain JSON records in the run directory's metadata.json, which assemble writes
with our container writer. A tokenizer or config change therefore redoes
assemble only.

The general.* keys (name, basename, size label, finetune, version, organization, license,
tags, languages, base models, datasets, sampling defaults) are decided by gguf-py's
`Metadata`, as llama.cpp's converter does: README.md front matter, config.json's
`_name_or_path`, generation_config.json, the directory's name, then the `--metadata` file
(the same JSON keys, e.g. {"general.name": ..., "general.tags": [...]}) and `--model-name`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import gguf

from pipeline.errors import CheckpointError, OptionError
from pipeline.families import TensorPlan, arch_metadata
from pipeline.vocab import add_tokenizer

_ADD = {"uint32": gguf.GGUFValueType.UINT32, "float32": gguf.GGUFValueType.FLOAT32,
        "string": gguf.GGUFValueType.STRING, "bool": gguf.GGUFValueType.BOOL}


def read_metadata_file(path: Path | None) -> None:
    """Refuse a --metadata file that is not a JSON object (gguf-py would fail deep inside)."""
    if path is None:
        return
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise OptionError(f"--metadata {path}: cannot read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise OptionError(f"--metadata {path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise OptionError(f"--metadata {path}: must be a JSON object of general.* keys, like llama.cpp's converter's")


def general_metadata(model_dir: Path, name_hint: str, total_params: int, model_name: str | None = None,
                     metadata_file: Path | None = None) -> gguf.Metadata:
    """The general.* facts, as llama.cpp's converter decides them. `name_hint`: the model's name
    when the directory's is not (a Hugging Face cache snapshot is named by its commit)."""
    read_metadata_file(metadata_file)
    meta = gguf.Metadata.load(metadata_file, model_dir, model_name, total_params)
    if name_hint and name_hint != model_dir.name:
        # the directory-name guesses came from a commit hash: take them from the model's name instead
        from_dir = gguf.Metadata.get_model_id_components(model_dir.name, total_params)
        from_name = gguf.Metadata.get_model_id_components(name_hint, total_params)
        fields = ("name", "organization", "basename", "finetune", "version", "size_label")
        for field, bad, good in zip(fields, from_dir, from_name):
            if field in ("name", "organization"):
                bad, good = (gguf.Metadata.id_to_title(v) if v else v for v in (bad, good))
            if bad is not None and getattr(meta, field) == bad:
                setattr(meta, field, good)
    if meta.name is None:
        meta.name = name_hint or model_dir.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, total_params, 0, 0)
    return meta


def build_kv(plan: TensorPlan, model_dir: Path, name: str | None = None, tokenizer_pre: str | None = None,
             model_name: str | None = None, metadata_file: Path | None = None, vocab_only: bool = False) \
        -> list[dict]:
    """Every GGUF key/value except file type, as JSON-ready records. `name`: the model's name
    (a fallback for general.name, which README, --metadata and `model_name` decide first);
    `vocab_only`: for a file without tensors (no size label, as llama.cpp's converter)."""
    total_params = 0 if vocab_only else sum(math.prod(t.shape) for t in plan.tensors)
    meta = general_metadata(model_dir, name or model_dir.resolve().name, total_params, model_name, metadata_file)
    w = gguf.GGUFWriter(None, plan.arch)
    w.add_type(gguf.GGUFType.MODEL)
    try:
        meta.set_gguf_meta_model(w)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        where = f"--metadata {metadata_file}" if metadata_file else f"{model_dir / 'README.md'}"
        raise OptionError(f"{where}: a general.* value has the wrong type ({e})") from None
    for key, vtype, value in arch_metadata(plan, model_dir / "config.json"):
        w.add_key_value(key, value, _ADD[vtype])
    add_tokenizer(w, model_dir, plan.config["vocab_size"], tokenizer_pre, plan.family.tokenizer_style)
    family_tokenizer_keys(w, plan, model_dir)
    return [kv_record(key, v) for key, v in w.kv_data[0].items()]


def family_tokenizer_keys(w: gguf.GGUFWriter, plan: TensorPlan, model_dir: Path) -> None:
    """A family's tokenizer overrides (the BitNet embedding models: EOS is <|endoftext|>, appended
    to every input for last-token pooling), replacing the tokenizer's own value in place."""
    fam, kvs = plan.family, w.kv_data[0]
    if fam.eos_token is not None:
        tokens = kvs[gguf.Keys.Tokenizer.LIST].value
        if fam.eos_token not in tokens:
            raise CheckpointError(f"{model_dir / 'tokenizer.json'}: has no token {fam.eos_token}, which "
                                  f"{fam.description} uses as its end-of-sequence token")
        _set(w, gguf.Keys.Tokenizer.EOS_ID, tokens.index(fam.eos_token), gguf.GGUFValueType.UINT32)
    if fam.add_eos is not None:
        _set(w, gguf.Keys.Tokenizer.ADD_EOS, fam.add_eos, gguf.GGUFValueType.BOOL)


def _set(w: gguf.GGUFWriter, key: str, value, vtype) -> None:
    kvs = w.kv_data[0]
    if key in kvs:
        kvs[key] = gguf.GGUFValue(value, vtype)
    else:
        w.add_key_value(key, value, vtype)


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
