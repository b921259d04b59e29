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
(the same JSON keys, e.g. {"general.name": ..., "general.tags": [...]}, plus general.license)
and `--model-name`. A --metadata key llama.cpp's converter would drop, or a value of another
type than the key is written as, is refused naming the key; so is any key/value, wherever it
came from, that its GGUF type cannot hold as it is (gguf_file.value_problem).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import yaml

from pipeline.errors import CheckpointError, OptionError
from pipeline.families import TensorPlan, arch_metadata
from pipeline.gguf_file import value_problem
from pipeline.safe_files import read_option_file
from pipeline.vocab import add_tokenizer

_ADD = {"uint32": gguf.GGUFValueType.UINT32, "float32": gguf.GGUFValueType.FLOAT32,
        "string": gguf.GGUFValueType.STRING, "bool": gguf.GGUFValueType.BOOL, "int32": gguf.GGUFValueType.INT32}

# --metadata: the general.* keys llama.cpp's converter takes from its --metadata file (gguf-py's
# Metadata.load), each with the gguf.Metadata field it sets and the JSON type it must have, plus
# general.license, which gguf-py takes from the model card only (it would drop the key unread).
# Anything else is refused naming the key: a key the user wrote is written or refused, never dropped.
TEXT, WHOLE, NUMBER, TEXTS, ENTRIES = "a string", "a whole number", "a number", "a list of strings", \
    "a list of objects"
_G = gguf.Keys.General
METADATA_KEYS: dict[str, tuple[str, str]] = {
    _G.NAME: ("name", TEXT), _G.AUTHOR: ("author", TEXT), _G.VERSION: ("version", TEXT),
    _G.ORGANIZATION: ("organization", TEXT), _G.FINETUNE: ("finetune", TEXT), _G.BASENAME: ("basename", TEXT),
    _G.DESCRIPTION: ("description", TEXT), _G.QUANTIZED_BY: ("quantized_by", TEXT),
    _G.SIZE_LABEL: ("size_label", TEXT), _G.LICENSE: ("license", TEXT), _G.LICENSE_NAME: ("license_name", TEXT),
    _G.LICENSE_LINK: ("license_link", TEXT), _G.URL: ("url", TEXT), _G.DOI: ("doi", TEXT), _G.UUID: ("uuid", TEXT),
    _G.REPO_URL: ("repo_url", TEXT), _G.SOURCE_URL: ("source_url", TEXT), _G.SOURCE_DOI: ("source_doi", TEXT),
    _G.SOURCE_UUID: ("source_uuid", TEXT), _G.SOURCE_REPO_URL: ("source_repo_url", TEXT),
    _G.SAMPLING_SEQUENCE: ("sampling_sequence", TEXT), _G.SAMPLING_TOP_K: ("sampling_top_k", WHOLE),
    _G.SAMPLING_TOP_P: ("sampling_top_p", NUMBER), _G.SAMPLING_MIN_P: ("sampling_min_p", NUMBER),
    _G.SAMPLING_XTC_PROBABILITY: ("sampling_xtc_probability", NUMBER),
    _G.SAMPLING_XTC_THRESHOLD: ("sampling_xtc_threshold", NUMBER), _G.SAMPLING_TEMP: ("sampling_temp", NUMBER),
    _G.SAMPLING_PENALTY_LAST_N: ("sampling_penalty_last_n", WHOLE),
    _G.SAMPLING_PENALTY_REPEAT: ("sampling_penalty_repeat", NUMBER),
    _G.SAMPLING_MIROSTAT: ("sampling_mirostat", WHOLE), _G.SAMPLING_MIROSTAT_TAU: ("sampling_mirostat_tau", NUMBER),
    _G.SAMPLING_MIROSTAT_ETA: ("sampling_mirostat_eta", NUMBER),
    _G.TAGS: ("tags", TEXTS), _G.LANGUAGES: ("languages", TEXTS),
    "general.base_models": ("base_models", ENTRIES), "general.datasets": ("datasets", ENTRIES),
}
# the fields of one general.base_models / general.datasets entry (general.base_model.N.<field>)
ENTRY_FIELDS = ("name", "author", "version", "organization", "description", "url", "doi", "uuid", "repo_url")
# the GGUF value type each JSON type is written as (the writer methods gguf.Metadata calls)
_WRITTEN_AS = {TEXT: gguf.GGUFValueType.STRING, WHOLE: gguf.GGUFValueType.INT32,
               NUMBER: gguf.GGUFValueType.FLOAT32}
# a --metadata file is a few general.* keys; json holds up to about 27 bytes per byte (measured)
MAX_METADATA_BYTES = 1024**2
METADATA_BYTES_PER_BYTE = 32


def _no_repeated_keys(pairs):
    data = dict(pairs)
    if len(data) < len(pairs):  # json.loads would keep the last silently
        seen = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise OptionError(f"key {repeated!r:.80} is given twice; keep one")
    return data


def read_metadata_file(path: Path | None, memory_limit: int | None = None) -> dict:
    """The --metadata file's overrides {GGUF key: value}, every key one llama.cpp's converter takes
    and every value of the type it is written as; anything else is refused in one line naming the
    key and the type wanted. Sized before it is read (`memory_limit`)."""
    if path is None:
        return {}
    option = f"--metadata {path}"
    raw = read_option_file(path, "--metadata", "a JSON file of general.* keys", MAX_METADATA_BYTES,
                           METADATA_BYTES_PER_BYTE, memory_limit)
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeated_keys)
    except OptionError as e:
        raise OptionError(f"{option}: {e}") from None
    except RecursionError:
        raise OptionError(f"{option}: nested too deeply; give a JSON object of general.* keys") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise OptionError(f"{option}: not JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise OptionError(f"{option}: must be a JSON object of general.* keys, like llama.cpp's converter's")
    for key, value in data.items():
        if key not in METADATA_KEYS:
            hint = " (its key is general.base_models or general.datasets: a list of objects)" \
                if key.startswith(("general.base_model.", "general.dataset.")) else ""
            raise OptionError(f"{option}: {key!r:.80} is not a key --metadata sets{hint}; it sets general."
                              f"{{{', '.join(k.removeprefix('general.') for k in METADATA_KEYS)}}}")
        problem = _override_problem(METADATA_KEYS[key][1], value)
        if problem:
            raise OptionError(f"{option}: {key}{problem}")
    return data


def _override_problem(wanted: str, value) -> str | None:
    """Why `value` is not of the JSON type `wanted` (None: it is), as ' must be ...' or
    '[i].field must be ...' after the key."""
    if wanted == ENTRIES:
        if not isinstance(value, list):
            return f" must be {ENTRIES}, not {_json_type(value)}"
        for i, entry in enumerate(value):
            if not isinstance(entry, dict):
                return f"[{i}] must be an object with fields {', '.join(ENTRY_FIELDS)}, not {_json_type(entry)}"
            for field, item in entry.items():
                if field not in ENTRY_FIELDS:
                    return f"[{i}]: {field!r:.60} is not a field of an entry; the fields are {', '.join(ENTRY_FIELDS)}"
                problem = _override_problem(TEXT, item)
                if problem:
                    return f"[{i}].{field}{problem}"
        return None
    if wanted == TEXTS:
        if not isinstance(value, list):
            return f" must be {TEXTS}, not {_json_type(value)}"
        for i, item in enumerate(value):
            problem = _override_problem(TEXT, item)
            if problem:
                return f"[{i}]{problem}"
        return None
    vtype = _WRITTEN_AS[wanted]
    kind = {"is not a whole number", "is not a number", "is not a string"}
    problem = value_problem(vtype, value)
    if problem in kind:
        return f" must be {wanted}, not {_json_type(value)}"
    return f" is {value!r:.40}: it {problem}" if problem else None


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {str: "a string", int: "a whole number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def parameter_counts(tensors) -> tuple[int, int, int, int]:
    """(total, shared, per expert, experts) parameters of the planned tensors, as gguf-py's
    get_total_parameter_count counts them for the size label: a stack of experts counts one expert's
    size towards the per-expert parameters, and its number of experts."""
    total = sum(math.prod(t.shape) for t in tensors)
    expert_params = expert_sum = stacks = 0
    stacked = 0
    for t in tensors:
        if t.stack is not None:
            stacked += math.prod(t.shape)
            if t.stack[1] == 0:
                expert_params += math.prod(t.shape)
                expert_sum += t.stack[2]
                stacks += 1
    return total, total - stacked, expert_params, expert_sum // stacks if stacks else 0


def general_metadata(model_dir: Path, name_hint: str, total_params: int, model_name: str | None = None,
                     overrides: dict | None = None, counts: tuple[int, int, int, int] | None = None) -> gguf.Metadata:
    """The general.* facts, as llama.cpp's converter decides them. `name_hint`: the model's name
    when the directory's is not (a Hugging Face cache snapshot is named by its commit);
    `overrides`: read_metadata_file's, applied over what the model card and directory say."""
    check_card_files(model_dir)
    meta = gguf.Metadata.load(None, model_dir, None, total_params)
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
    for key, value in (overrides or {}).items():
        setattr(meta, METADATA_KEYS[key][0], value)
    for key in (_G.TAGS, _G.LANGUAGES):  # a card's list of numbers would be written as an INT32 array
        value = getattr(meta, METADATA_KEYS[key][0])
        problem = value is not None and _override_problem(TEXTS, value)
        if problem:
            raise CheckpointError(f"{model_dir / 'README.md'} (its front matter): {key}{problem}; correct the file")
    if model_name is not None:
        meta.name = model_name
    if meta.name is None:
        meta.name = name_hint or model_dir.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(*(counts or (total_params, total_params, 0, 0)))
    return meta


def check_card_files(model_dir: Path) -> None:
    """README.md's front matter and generation_config.json, read as gguf-py's Metadata reads them,
    refused in one line naming the file where that would fail (text that is not UTF-8, front matter
    that is not YAML, a generation config that is not an object). A generation_config.json that is
    not JSON is left out, as gguf-py and llama.cpp's converter leave it."""
    readme, generation = model_dir / "README.md", model_dir / "generation_config.json"
    try:
        gguf.Metadata.load_model_card(model_dir)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{readme}: not UTF-8 text ({e}); correct or remove the file") from None
    except (yaml.YAMLError, RecursionError) as e:
        shown = " ".join(str(e).split())[:160]
        raise CheckpointError(f"{readme}: its front matter is not YAML ({shown}); correct it or remove the file") \
            from None
    try:
        config = gguf.Metadata.load_generation_config(model_dir)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{generation}: not UTF-8 text ({e}); correct or remove the file") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{generation}: must hold a JSON object, not {_json_type(config)}; correct or remove "
                              "the file")


def check_model_name(model_name: str | None) -> None:
    """--model-name goes into the file as a GGUF string, which is UTF-8: bytes that are not (a
    name given as raw bytes in another encoding) are refused, not written for readers to fail on."""
    if model_name is None:
        return
    problem = value_problem(gguf.GGUFValueType.STRING, model_name)
    if problem:
        shown = model_name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise OptionError(f"--model-name {shown}: {problem.removeprefix('is ')}; give the name as UTF-8")


def build_kv(plan: TensorPlan, model_dir: Path, name: str | None = None, tokenizer_pre: str | None = None,
             model_name: str | None = None, metadata_file: Path | None = None, vocab_only: bool = False,
             memory_limit: int | None = None) -> list[dict]:
    """Every GGUF key/value except file type, as JSON-ready records. `name`: the model's name
    (a fallback for general.name, which README, --metadata and `model_name` decide first);
    `vocab_only`: for a file without tensors (no size label, as llama.cpp's converter);
    `memory_limit`: what reading the --metadata file must fit in. Every value is checked against
    its GGUF type before it is recorded (gguf_file.value_problem), naming where it came from."""
    counts = (0, 0, 0, 0) if vocab_only else parameter_counts(plan.tensors)
    total_params = counts[0]
    check_model_name(model_name)
    overrides = read_metadata_file(metadata_file, memory_limit)
    meta = general_metadata(model_dir, name or model_dir.resolve().name, total_params, model_name, overrides, counts)
    w = gguf.GGUFWriter(None, plan.arch)
    w.add_type(gguf.GGUFType.MODEL)
    try:
        meta.set_gguf_meta_model(w)
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # the overrides are checked: the model card
        raise CheckpointError(f"{model_dir / 'README.md'}: a general.* value of its front matter has the wrong "
                              f"type ({e})") from None
    for key in (_G.TAGS, _G.LANGUAGES):
        if overrides.get(key) == []:  # gguf's writer skips an empty list; the user asked for one
            w.add_key_value(key, [], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    for key, vtype, value in arch_metadata(plan, model_dir / "config.json"):
        if vtype.startswith("array:"):  # qwen35's rope sections (int32, as gguf-py types ints) and layer kinds
            w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, _ADD[vtype.removeprefix("array:")])
        else:
            w.add_key_value(key, value, _ADD[vtype])
    add_tokenizer(w, model_dir, plan.config["vocab_size"], tokenizer_pre, plan.family.tokenizer_style)
    family_tokenizer_keys(w, plan, model_dir)
    for key, v in w.kv_data[0].items():
        problem = value_problem(v.type, v.value, v.sub_type)
        if problem:
            raise _source_error(key, v.value, problem, model_dir, model_name, metadata_file, overrides)
    return [kv_record(key, v) for key, v in w.kv_data[0].items()]


def _source_error(key: str, value, problem: str, model_dir: Path, model_name: str | None,
                  metadata_file: Path | None, overrides: dict):
    """A key/value that is not of its GGUF type, refused naming where it came from."""
    if model_name is not None and key == _G.NAME:
        return OptionError(f"--model-name: {problem}")
    entry_list = {"base_model": "general.base_models", "dataset": "general.datasets"}.get(
        (key.split(".") + [""])[1], "")
    if key in overrides or entry_list in overrides:
        return OptionError(f"--metadata {metadata_file}: {key} {problem}")
    if key.startswith("general.sampling."):
        where = model_dir / "generation_config.json"
    elif key.startswith("general."):
        where = model_dir / "README.md (its front matter)"
    elif key.startswith("tokenizer."):
        where = model_dir / "the tokenizer's files"
    else:
        where = model_dir / "config.json"
    shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
    return CheckpointError(f"{where}: gives the GGUF key {key} the value {shown}, which {problem}; correct the file")


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
