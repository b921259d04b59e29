"""extract: safetensors -> extract.zarr, an index of the checkpoint's tensors.

Every tensor of a safetensors file is a contiguous row-major array in a dtype the later
stages read as it is (bf16 as its uint16 bit pattern, attribute `source_dtype`; packed
uint8 projections 4 codes per byte, with their checked `weight_scale` in the tensor's
recipe). So extract copies no weights: each tensor becomes a zarr array whose only
attribute of note is `source_ref`, the file, byte offset and identity of its bytes
(pipeline/stores.py, "indexed arrays"), and `extract.refs.json` beside the store (a
kerchunk reference set) lets zarr open it with data. The later stages read rows from the
checkpoint through the reference, which refuses a file that is no longer the one indexed.

This pass reads every referenced byte once and records an xxh3 digest of each block of
them (pipeline/stores.py, "content of the referenced bytes"): every later read checks its bytes
against them, so bytes that change while the file's size and times do not are refused too.
What needs a pass over the values is also done here, beside each float tensor:

- master-weight projections: per-row float64 sums of |W| (`<name>.abs_sums`), from
  which quantize computes the absmean scale without reading the weights twice;
- other float tensors: per-row max |x| (`<name>.abs_max`), so a value that the chosen
  output type cannot hold (above F16's 65504) is refused before anything is packed;
- group-scaled ternary projections (float values already {-s, 0, +s} per group of columns):
  the magnitude s of every run of GROUP_COLUMNS values (`<name>.group_max`, rows x cols / 32),
  after checking that each run holds one magnitude at most, and the zeros of every row
  (`<name>.zeros`): a tensor without any is binary ({-s, +s}: 1-bit Bonsai), which Q1_0 holds;

and NaN or infinite weights are refused, naming the tensor. Packed projections are only
digested here: quantize refuses a 2-bit field holding 3 as it reads them. The index (every
array's metadata and the reference set) is written first; a rerun after a kill rewrites it
(the same bytes) and scans only the chunks whose digests or side chunk are not yet on disk.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import remote
from pipeline.codecs import (MAGNITUDE_BITS, absmean_row_sums, group_magnitudes, group_rows, row_abs_max,
                             row_abs_max_bits)
from pipeline.context import StageContext
from pipeline.errors import CheckpointError
from pipeline.families import GROUP_COLUMNS, GROUPED, TERNARY
from pipeline.plan import fetched_once_names, pinned, ternary_embedding_scan
from pipeline.remote import RemoteFile
from pipeline.safetensors_io import TensorSource, as_float32
from pipeline.scheduler import chunk_task, run_reading_ahead
from pipeline.stores import (MAX_SUFFIX, UNSCANNED, array_path, content_recorded, content_spec, damaged_values,
                             ensure_array, index_array, make_ref, open_store, record_content, refs_path,
                             row_ranges, write_refs, write_rows, written_chunks)
from stages.quantize import SUMS_SUFFIX, TERNARY_ROWS_SUFFIX, ZEROS_SUFFIX

GROUP_SUFFIX = ".group_max"


def scan_rows(source: TensorSource, side_path: str | None, start: int, stop: int, kind: str, content: dict | None,
              index: int, extras: dict[str, str] | None = None) -> None:
    """Rows [start, stop) (chunk `index`) of a tensor the later stages read from the checkpoint:
    record the digests of their bytes, refuse what the stages cannot take, and write into the side
    array the per-row |W| sums (kind "master"), maxima ("float") or the per-group magnitudes of a
    group-scaled tensor ("grouped"); a packed tensor has no side array. `extras` (suffix -> array
    path) are the further side arrays: the zeros per row of a group-scaled tensor; for the
    embedding and head of a group-scaled checkpoint (which may be ternary too: --embedding-type
    q2_0) their group magnitudes, zeros and whether each row is {-s, 0, +s} per group, never refused."""
    block = source.read_rows(start, stop)
    if content is not None:  # before the side chunk, which marks the task done
        record_content(content, index, block)
    if kind == "packed":
        return
    extras = extras or {}
    if kind == "grouped":
        values = as_float32(block, source.dtype)
        side, bad = group_magnitudes(values, GROUP_COLUMNS)
        if bad is not None:
            row, g = bad
            raise CheckpointError(f"{source.file}: tensor {source.name}, row {start + row}, columns "
                                  f"{g * GROUP_COLUMNS}..{(g + 1) * GROUP_COLUMNS - 1}: the values are not ternary "
                                  "(-s, 0 and +s for one s per group); only group-scaled ternary weights "
                                  "convert here, this checkpoint's are not")
        write_rows(side_path, start, stop, side)
        write_rows(extras[ZEROS_SUFFIX], start, stop, (values == 0).sum(axis=1, dtype=np.uint32))
        return
    if kind == "float" and source.dtype in MAGNITUDE_BITS:
        side, finite = row_abs_max_bits(block, source.dtype)
    else:
        values = as_float32(block, source.dtype)
        side = absmean_row_sums(values) if kind == "master" else row_abs_max(values)
        finite = bool(np.isfinite(side).all())
    if not finite:
        raise damaged_values(source.file, source.name, start, stop)
    if len(source.shape) == 1:  # a 1-D tensor is one row, in one chunk
        write_rows(side_path, 0, 1, side)
    else:
        write_rows(side_path, start, stop, side)
    if GROUP_SUFFIX in extras:
        values = as_float32(block, source.dtype)
        mags, ternary = group_rows(values, GROUP_COLUMNS)
        write_rows(extras[GROUP_SUFFIX], start, stop, mags)
        write_rows(extras[ZEROS_SUFFIX], start, stop, (values == 0).sum(axis=1, dtype=np.uint32))
        write_rows(extras[TERNARY_ROWS_SUFFIX], start, stop, ternary.astype(np.uint8))


def side_array_name(name: str, kind: str) -> str | None:
    return {"master": name + SUMS_SUFFIX, "float": name + MAX_SUFFIX, "grouped": name + GROUP_SUFFIX}.get(kind)


def file_identities(ckpt) -> dict[Path, list[int]]:
    """Checkpoint file -> [size, mtime_ns, ctime_ns, inode] as fingerprinted when it was opened."""
    return {Path(name) if Path(name).is_absolute() else ckpt.model_dir / name: ident
            for name, *ident in ckpt.fingerprint if not remote.is_url(name)}


def run(ctx: StageContext) -> None:
    ckpt = ctx.checkpoint
    plan = ckpt.plan
    group = open_store(ctx.output)
    group.update_attributes({  # one write of zarr.json (attrs.update writes it once per key)
        "stage": "extract",
        "family": plan.family.name,
        "arch": plan.arch,
        "model_dir": remote.label(ckpt.model_dir),
        "config": plan.config,
        "tensor_order": [t.gguf_name for t in plan.tensors],
        "data": f"tensors are byte ranges of the checkpoint's files (attribute source_ref); open "
                f"{refs_path(ctx.output).name} beside this store with zarr.open_group('reference://', "
                "storage_options={'fo': path}) to read them through zarr",
    })
    if plan.skipped:  # qwen35: the vision tower and the multi-token-prediction layers
        ctx.log(f"warning: {len(plan.skipped)} checkpoint tensors ({plan.skipped[0]}, ...) are not part of the text "
                "model and are not written (a vision tower converts with llama.cpp's convert_hf_to_gguf.py --mmproj; "
                "MTP layers are left out as its --no-mtp does)")
    identities = file_identities(ckpt)
    unread = fetched_once_names(ckpt)
    shown = remote.label(ckpt.model_dir)  # what a refusal names: the URL of a remote checkpoint
    ahead = []  # the byte range each task reads (a remote checkpoint's)
    names, tasks = [], []  # names, not zarr.Array objects: the peak stays flat in the number of tensors
    for t in plan.tensors:
        src = ckpt.sources[t.hf_name]
        is_remote = isinstance(src.file, RemoteFile)
        # a remote file's bytes are pinned by its version (If-Match on every request): no digests, and
        # what needs no value pass here is fetched once, by the stage that uses it (plan.fetched_once)
        kind = ("later" if t.hf_name in unread
                else "packed" if t.recipe.packed else "grouped" if t.recipe.weights == GROUPED
                else "master" if t.role == TERNARY else "float")
        rows = ctx.plan.tensor(t.gguf_name).chunk_rows["extract"]  # the plan's (pipeline/plan.py chunk_rows)
        row_bytes = src.row_elems * src.np_dtype.itemsize
        nbytes = src.shape[0] * row_bytes if src.shape else 0
        content = None if pinned(src.file) else content_spec(ctx.output / t.gguf_name, rows * row_bytes, nbytes,
                                                             t.hf_name)
        ident = src.file.identity() if is_remote else identities[src.file]
        ref = make_ref(src.file, src.offset, shown, ident, content)
        if kind == "later" and not t.recipe.packed:  # checked as the later stages read it
            ref[UNSCANNED] = {"dtype": src.dtype, "tensor": t.hf_name, "role": t.role}
        names.append(t.gguf_name)
        index_array(group, t.gguf_name, src.shape, rows, src.np_dtype, {
            "hf_name": t.hf_name, "role": t.role, "source_dtype": src.dtype,
            "source_file": src.file.name, "shape": list(t.shape), "recipe": t.recipe.as_json(),
        }, ref)
        side = side_array_name(t.gguf_name, kind)
        extras, side_array = {}, None
        if side and kind == "grouped":
            side_array = ensure_array(group, side, (src.shape[0], src.shape[1] // GROUP_COLUMNS), rows,
                                      np.float32, {"of": t.gguf_name})
            extras[ZEROS_SUFFIX] = ensure_array(group, t.gguf_name + ZEROS_SUFFIX, (src.shape[0],), rows,
                                                np.uint32, {"of": t.gguf_name})
        elif side:
            n_rows = src.shape[0] if len(src.shape) > 1 else 1
            side_array = ensure_array(group, side, (n_rows,), rows if len(src.shape) > 1 else 1,
                                      np.float64 if kind == "master" else np.float32, {"of": t.gguf_name})
            if ternary_embedding_scan(plan.family, t.role, src.shape):
                extras[GROUP_SUFFIX] = ensure_array(group, t.gguf_name + GROUP_SUFFIX,
                                                    (src.shape[0], src.shape[1] // GROUP_COLUMNS), rows, np.float32,
                                                    {"of": t.gguf_name})
                for suffix, dtype in ((ZEROS_SUFFIX, np.uint32), (TERNARY_ROWS_SUFFIX, np.uint8)):
                    extras[suffix] = ensure_array(group, t.gguf_name + suffix, (src.shape[0],), rows, dtype,
                                                  {"of": t.gguf_name})
        names += [side] if side else []
        names += [t.gguf_name + suffix for suffix in extras]
        if not nbytes or kind == "later":
            continue
        done = content_recorded(content) if content else set(range(len(row_ranges(src.shape[0], rows))))
        if side:
            done &= written_chunks(side_array)
        for arr in extras.values():  # a chunk is done when every side array holds it (a kill may fall between)
            done &= written_chunks(arr)
        paths = {suffix: array_path(ctx.output, t.gguf_name + suffix) for suffix in extras}
        for i, (r0, r1) in enumerate(row_ranges(src.shape[0], rows)):
            if i not in done:
                tasks.append(chunk_task(scan_rows, src, side and array_path(ctx.output, side), r0, r1, kind, content, i,
                                        paths))
                ahead.append((src.file.url, src.offset + r0 * row_bytes, (r1 - r0) * row_bytes, src.file.version)
                             if is_remote else None)
    write_refs(ctx.output, names)
    run_reading_ahead(ctx, tasks, ahead, "extract")
