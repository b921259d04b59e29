"""Open and check a checkpoint directory before any work starts.

Everything a user can get wrong in the input is found here, with the file named:
config, family, tensor names, shapes and dtypes, packed scales, shards, tokenizer.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from pipeline import remote
from pipeline.errors import CheckpointError
from pipeline.families import FAMILIES, GROUPED, TensorPlan, plan_tensors
from pipeline.metadata import build_kv
from pipeline.vocab import tokenizer_memory
from pipeline.safetensors_io import (MAX_HEADER, TensorSource, as_float32, files_fingerprint, header_budget,
                                     index_checkpoint, require_regular_file)

MASTER_DTYPES = ("F32", "F16", "BF16")
GROUP_BLOCK = 64  # the smallest block that holds one scale (Q2_0): group-scaled rows are whole blocks
PACKED_DTYPES = ("U8",)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    model_dir: Path
    plan: TensorPlan
    sources: dict[str, TensorSource]   # by Hugging Face name, only the planned tensors
    kv: list[dict]
    fingerprint: list                  # identity of the weight files (see files_fingerprint)
    name: str = ""
    scale_bytes: int = 0               # bytes of the packed projections' weight_scale tensors (read here)


SCALE_READS = 16  # weight_scale requests of a remote checkpoint in flight at once (each a round trip)


def scale_ranges(plan, found: dict) -> list[tuple[str, int, int, str]]:
    """(URL, offset, bytes, version) of the packed projections' weight_scale tensors of a remote
    checkpoint, in the order they are read (what remote.prefetching takes); none for a local one."""
    ranges = []
    for t in plan.tensors:
        src = found.get(t.scale_hf_name) if t.recipe.packed else None
        if src is not None and isinstance(src.file, remote.RemoteFile) and src.dtype in MASTER_DTYPES \
                and math.prod(src.shape) == 1:
            ranges.append((src.file.url, src.offset, src.np_dtype.itemsize, src.file.version))
    return ranges


def read_weight_scale(src: TensorSource, weight: str) -> float:
    """A packed projection's weight_scale as a float32 value; it must be one finite, non-zero number."""
    if src.dtype not in MASTER_DTYPES or math.prod(src.shape) != 1:
        raise CheckpointError(f"{src.file}: {src.name} is {src.dtype} {list(src.shape)}; a weight_scale must be "
                              "one float (shape [1])")
    value = as_float32(src.read_rows(0, 1), src.dtype).reshape(-1)[0]
    if not np.isfinite(value) or value <= 0:
        raise CheckpointError(f"{src.file}: {src.name} is {float(value)!r}; the scale of {weight} must be a positive "
                              "finite number")
    return float(value)


def refuse_special_files(model_dir: Path) -> None:
    """A FIFO, socket or device among the checkpoint's files would hang or mislead a reader."""
    if not model_dir.is_dir():
        return  # read_config says what is wrong
    try:
        entries = list(model_dir.iterdir())
    except OSError as e:
        raise CheckpointError(f"{model_dir}: cannot list the checkpoint directory ({e.strerror})") from None
    for p in sorted(entries):
        if p.is_symlink() and not p.exists():
            continue  # a dangling link: the reader of that file reports it
        if not p.is_dir():
            require_regular_file(p)


def open_vocabulary(model_dir: Path, name: str | None = None, tokenizer_pre: str | None = None,
                    model_name: str | None = None, metadata_file: Path | None = None,
                    memory_limit: int | None = None) -> tuple[TensorPlan, list[dict]]:
    """(plan, key/values) of a file without tensors, from config.json and the tokenizer alone;
    `memory_limit`: refuse a tokenizer that cannot be read under it (check_tokenizer_fits)."""
    model_dir = Path(model_dir)
    refuse_special_files(model_dir)
    plan = plan_tensors(model_dir)
    if any(f.tensor_markers for f in FAMILIES):  # a row told apart by its tensor names needs the headers
        try:
            headers = MAX_HEADER if memory_limit is None else header_budget(memory_limit)
            plan = plan_tensors(model_dir, present=set(index_checkpoint(model_dir, headers)))
        except CheckpointError:
            pass  # no readable weights: the row config.json alone names
    if memory_limit is not None:
        check_tokenizer_fits(model_dir, plan.config["vocab_size"], memory_limit, chunk_work=False)
    name = name or model_dir.resolve().name
    return plan, build_kv(plan, model_dir, name=name, tokenizer_pre=tokenizer_pre, model_name=model_name,
                          metadata_file=metadata_file, vocab_only=True, memory_limit=memory_limit)


def _check_source(t, src: TensorSource, plan: TensorPlan) -> None:
    fam = plan.family
    if t.recipe.packed:
        if t.shape[0] % 4:
            raise CheckpointError(f"{src.file}: {t.hf_name}: {t.shape[0]} output rows cannot be packed 4 per byte")
        if src.dtype not in PACKED_DTYPES or src.shape != t.source_shape:
            raise CheckpointError(f"{src.file}: tensor {t.hf_name} is {src.dtype} {list(src.shape)}, but "
                                  f"{fam.description} packs it as U8 {list(t.source_shape)} (4 ternary codes per "
                                  f"byte for {list(t.shape)}); config and weights disagree")
        return
    if src.dtype not in MASTER_DTYPES:  # before the shape: packed codes are a quarter of the rows
        raise CheckpointError(f"{src.file}: tensor {t.hf_name} is {src.dtype}; {fam.description} "
                              f"needs float weights ({', '.join(MASTER_DTYPES)}) there")
    if src.shape != t.source_shape:
        raise CheckpointError(f"{src.file}: tensor {t.hf_name} has shape {list(src.shape)}, but config.json "
                              f"implies {list(t.source_shape)}; config and weights disagree")
    if t.recipe.weights == GROUPED and t.shape[-1] % GROUP_BLOCK:
        raise CheckpointError(f"{src.file}: tensor {t.hf_name} has rows of {t.shape[-1]} values; group-scaled "
                              f"ternary projections convert only with rows that are a multiple of {GROUP_BLOCK}")


def check_tokenizer_fits(model_dir: Path, vocab_size: int, memory_limit: int, chunk_work: bool = True) -> None:
    """Refuse, before reading it, a tokenizer whose reading the memory limit cannot hold beside
    what this process already uses, the budget's headroom and (`chunk_work`: not for --vocab-only)
    the smallest chunk work; name the file and the limit that would do."""
    from pipeline.budget import HEADROOM, current_rss, minimum_task_bytes, suggested_limit
    from pipeline.config import format_size
    from pipeline.errors import OptionError
    from pipeline.vocab import tokenizer_file

    need, worst = tokenizer_memory(model_dir, vocab_size)
    used = current_rss()
    rest = used + HEADROOM + (minimum_task_bytes() if chunk_work else 0)
    total = rest + need
    if total <= memory_limit:
        return
    at_least = f"allow at least {suggested_limit(total) // 2**20}MiB"
    if rest > memory_limit:  # too small for any work, whatever the tokenizer
        raise OptionError(f"--memory-limit {format_size(memory_limit)} is too small: this process already uses "
                          f"{format_size(used)}, and reading the tokenizer takes about {format_size(need)}; "
                          f"{at_least}")
    if worst.name == "config.json":
        source = tokenizer_file(model_dir)
        what = f"vocab_size {vocab_size} (rows of the token table{f' of {source.name}' if source else ''})"
    else:
        what = format_size(worst.stat().st_size)
    raise CheckpointError(f"{worst}: {what}: reading the tokenizer takes about {format_size(need)}, more than "
                          f"--memory-limit {format_size(memory_limit)} holds beside the rest of the conversion; "
                          f"{at_least}")


def open_checkpoint(model_dir: Path, name: str | None = None, tokenizer_pre: str | None = None,
                    max_header_bytes: int = MAX_HEADER, model_name: str | None = None,
                    metadata_file: Path | None = None, memory_limit: int | None = None) -> Checkpoint:
    """Check everything about the checkpoint that can be checked without reading the weights.

    `name`: the model's name, general.name's last fallback (default: the directory's name);
    `model_name`, `metadata_file`: --model-name and --metadata (pipeline.metadata);
    `max_header_bytes`: the safetensors headers' total size allowed (safetensors_io.header_budget);
    `memory_limit`: refuse a tokenizer that cannot be read under it (check_tokenizer_fits).
    """
    model_dir = Path(model_dir)
    refuse_special_files(model_dir)
    plan_tensors(model_dir)  # config errors first, before any safetensors file is read
    found = index_checkpoint(model_dir, max_header_bytes)
    plan = plan_tensors(model_dir, present=set(found))
    fam = plan.family
    sources, used, planned, scale_bytes = {}, set(), [], 0
    # a remote checkpoint's weight_scale values: many tiny reads, made SCALE_READS at a time
    with remote.prefetching(scale_ranges(plan, found), SCALE_READS):
        for t in plan.tensors:
            src = found.get(t.hf_name)
            if src is None and t.stack is not None:
                raise CheckpointError(f"{model_dir}: tensor {t.hf_name} is missing from the safetensors files: "
                                      f"expert {t.stack[1]} of the {t.stack[2]} (num_experts in config.json) that "
                                      f"{t.stack[0]} stacks; the checkpoint is incomplete")
            if src is None:
                raise CheckpointError(f"{model_dir}: tensor {t.hf_name} is missing from the safetensors files "
                                      f"(needed for {t.gguf_name}); the checkpoint is incomplete or not "
                                      f"{fam.description}")
            if t.stack is not None and src.shape != t.source_shape:
                raise CheckpointError(f"{src.file}: tensor {t.hf_name} has shape {list(src.shape)}, but expert "
                                      f"{t.stack[1]} of {t.stack[0]} must be {list(t.source_shape)} like every expert "
                                      "(moe_intermediate_size and hidden_size in config.json); config and weights "
                                      "disagree")
            _check_source(t, src, plan)
            sources[t.hf_name] = src
            used.add(t.hf_name)
            if t.recipe.packed:
                scale_src = found.get(t.scale_hf_name)
                if scale_src is None:
                    raise CheckpointError(f"{model_dir}: {t.scale_hf_name} is missing; the packed projection "
                                          f"{t.hf_name} needs its weight_scale")
                used.add(t.scale_hf_name)
                scale_bytes += scale_src.np_dtype.itemsize * math.prod(scale_src.shape)
                recipe = dataclasses.replace(t.recipe, weight_scale=read_weight_scale(scale_src, t.hf_name))
                t = dataclasses.replace(t, recipe=recipe)
            planned.append(t)
    plan = dataclasses.replace(plan, tensors=tuple(planned))
    lm_head = "lm_head.weight"
    if lm_head in found and lm_head not in used:
        if fam.output == "none":
            raise CheckpointError(f"{found[lm_head].file}: has an untied lm_head.weight, but GGUF arch "
                                  f"{fam.gguf_arch} ties the output to token_embd; this checkpoint is not "
                                  f"{fam.description}")
        if fam.output == "tied" and not plan.config.get("tie_word_embeddings", False):
            raise CheckpointError(f"{model_dir / 'config.json'}: tie_word_embeddings is false and the checkpoint has "
                                  f"an lm_head.weight, but GGUF arch {fam.gguf_arch} always uses token_embd as the "
                                  "output head; this checkpoint cannot convert faithfully")
        used.add(lm_head)  # tied: the runtime uses token_embd, which the config says is the same
    unexpected = sorted(n for n in found if n not in used and not n.endswith(fam.ignored_suffixes)
                        and n not in plan.skipped)
    if unexpected:
        raise CheckpointError(f"{found[unexpected[0]].file}: tensor {unexpected[0]}"
                              f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''} is not part of "
                              f"{fam.description} as config.json describes it; config and weights disagree")
    name = name or model_dir.resolve().name
    if memory_limit is not None:
        check_tokenizer_fits(model_dir, plan.config["vocab_size"], memory_limit)
    kv = build_kv(plan, model_dir, name=name, tokenizer_pre=tokenizer_pre, model_name=model_name,
                  metadata_file=metadata_file, memory_limit=memory_limit)
    files = {src.file for src in found.values()}
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():  # a remote checkpoint's: the file on the server, not the staged copy
        where = remote.source_of(model_dir)
        files.add(where.original(index) if where else index)
    return Checkpoint(model_dir, plan, sources, kv, files_fingerprint(model_dir, files), name, scale_bytes)

