"""assemble: pack.zarr + the run's metadata.json -> model.gguf (or a split set of parts).

Our own container writer (pipeline/gguf_file.py) writes the header, the key/values
decided once per run (metadata.json, plus general.file_type from the output type
registry) and the tensor infos; the tensor data is then streamed chunk by chunk from
pack.zarr, each tensor followed by its type's tail (I2_S: the scale), so no tensor is
held whole; a tensor whose pack array indexes the checkpoint (bytes that no stage
changes) is read from the checkpoint file, after checking it is the one indexed, and its bytes
against the digests extract recorded; a TQ2_0 or
I2_S tensor's pack array is quantize's 2-bit codes (linked), encoded here as it is written.
What a chunk needs computed (the encoding, a float conversion, a checked read) is done `workers`
chunks ahead in assemble's threads while the main thread writes the file in order.
With --split-max-size / --split-max-tensors the tensors are spread over
`NAME-0000k-of-0000n.gguf` parts as llama.cpp's gguf-split does. Every file is
written to a temporary name, fsynced, and renamed into place only when all are
complete (pipeline/output.py).

With --low-disk the run directory gives its bytes up as the file grows: after each tensor the
temporary file is fsynced, (tensors written, file lengths) recorded in the manifest, and only
then that tensor's chunk files removed from pack.zarr and quantize.zarr (both names of a hard
link), so the disk holds the output plus one tensor's codes. A rerun continues the temporary
file after the last recorded tensor (cutting off what follows, and removing the chunk files a
kill left between the record and the removal). The stores are then consumed: the manifest
says so (CODES_CONSUMED), and what needs their codes again redoes quantize (pipeline/runner.py).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import json
import os
from pathlib import Path

import numpy as np

from pipeline import remote
from pipeline.context import StageContext
from pipeline.errors import RunDirError
from pipeline.gguf_file import GGUFSplitWriter, GGUFWriterError, TensorInfo
from pipeline.low_disk import remove_codes
from pipeline.output import OutputChanged, final_paths, identity, publish, temp_path
from pipeline.codecs import Tiles
from pipeline.outtypes import BY_GGML_TYPE, OUTPUT_TYPES
from pipeline.plan import file_kvs, gguf_tensors, stacked_info
from pipeline.stores import (CODES_FROM, ENCODED_FROM, DamagedStore, check_source_file, chunk_path, get_array, is_raw,
                             open_store, read_rows, remote_range, row_ranges, source_ref)


def array_layout(arr):
    """(output type, tiles or None) of a pack.zarr array."""
    out = OUTPUT_TYPES[arr.attrs["out_type"]] if "out_type" in arr.attrs else BY_GGML_TYPE[arr.attrs["ggml_type"]]
    tiles = arr.attrs.get("tiles")
    return out, (Tiles(*tiles) if tiles else None)


def tensor_infos(group) -> list[TensorInfo]:
    return [info for info, _ in gguf_tensors_of(group)]


def gguf_tensors_of(group) -> list[tuple[TensorInfo, list[str]]]:
    """(GGUF tensor info, pack.zarr arrays whose bytes it is, in order) of every GGUF tensor: one array
    each, or the experts of a stack (attribute `stack`), whose bytes follow one another."""
    arrays = []
    for name in group.attrs["tensor_order"]:
        arr = get_array(group, name)
        out, tiles = array_layout(arr)
        shape = tuple(arr.attrs["shape"])
        arrays.append(_Member(name, arr.attrs.get("stack"), (shape, out.ggml_type, out.nbytes(shape, tiles))))
    return [(stacked_info(name, [arrays[i].layout for i in members], arrays[members[0]].stack is not None),
             [arrays[i].name for i in members]) for name, members in gguf_tensors(arrays)]


class _Member:
    def __init__(self, name: str, stack, layout):
        self.name, self.stack, self.layout = name, stack, layout


def array_pieces(arr) -> list[tuple[int, object]]:
    """(bytes, what gives them) of one pack.zarr array, in the order they go into its GGUF tensor: a
    function computing the bytes (encoding, conversion, checked reads: run ahead in assemble's threads)
    or the path of a chunk file whose first bytes they are (copied in the kernel). A tensor's type tail
    is the caller's."""
    out, tiles = array_layout(arr)
    shape = tuple(arr.attrs["shape"])
    row_bytes = arr.nbytes // arr.shape[0] if arr.ndim > 1 else arr.nbytes
    ref = source_ref(arr)
    if ref is not None:
        check_source_file(ref)
    chunks = list(row_ranges(arr.shape[0], arr.chunks[0]) if arr.ndim > 1 else [(0, 1)])
    regions = out.codec.regions(shape[-1], tiles) if arr.ndim > 1 else [(0, row_bytes)]
    pieces = []
    for c0, c1 in regions:  # TL2: magnitudes, signs, tail of every chunk in turn
        for k, (r0, r1) in enumerate(chunks):
            nbytes = (r1 - r0) * (c1 - c0)
            if CODES_FROM in arr.attrs or (ref is not None and ENCODED_FROM in arr.attrs):
                # quantize's codes, or the checkpoint's rows: encoded here (read_rows)
                pieces.append((nbytes, functools.partial(read_rows, arr, r0, r1)))
            elif ref is not None and len(regions) == 1:
                # the checkpoint's bytes: read (not copied in the kernel) so that read_rows
                # checks them against the digests extract recorded (a 1-D tensor: all its bytes)
                pieces.append((nbytes, functools.partial(read_rows, arr, r0, r1) if arr.ndim > 1
                               else functools.partial(read_rows, arr, 0, arr.shape[0])))
            elif is_raw(arr) and len(regions) == 1:  # the chunk file is the bytes: copy it in the kernel
                pieces.append((nbytes, chunk_path(arr, k)))
            elif len(regions) == 1:
                pieces.append((nbytes, functools.partial(_zarr_rows, arr, r0, r1)))
            else:  # TL2's regions: the chunk read directly (read_rows), not through zarr's slicing
                pieces.append((nbytes, functools.partial(_region_rows, arr, r0, r1, c0, c1)))
    return pieces


def _zarr_rows(arr, r0: int, r1: int) -> np.ndarray:
    return np.ascontiguousarray(arr[r0:r1])


def _region_rows(arr, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    return np.ascontiguousarray(read_rows(arr, r0, r1)[:, c0:c1])


def write_piece(writer, i: int, nbytes: int, what) -> None:
    """Write one piece of tensor `i`: computed bytes (a future's result), or a chunk file's first
    `nbytes` bytes, copied in the kernel."""
    if isinstance(what, Path):
        if not what.is_file() or what.stat().st_size < nbytes:
            raise DamagedStore(f"{what}: chunk file missing or short")
        writer.copy_tensor_data(i, what, 0, nbytes)
    else:
        writer.write_tensor_data(i, what.result())


def ahead(pieces, pool, depth: int):
    """`pieces` (tensor, bytes, what) in order, each function among them submitted to `pool` (a future
    in its place) as soon as at most `depth` computed pieces wait to be written: the encoding of the
    next chunks runs while this one is written. A piece's error is raised when its turn comes, as if
    computed in order."""
    window, computed, pieces = collections.deque(), 0, iter(pieces)
    while True:
        try:
            i, nbytes, what = next(pieces)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - listing a later tensor failed: raised in its turn too
            failed = concurrent.futures.Future()
            failed.set_exception(e)
            window.append((None, 0, failed))
            break
        if callable(what):
            what, computed = pool.submit(what), computed + 1
        window.append((i, nbytes, what))
        while computed > depth:
            piece = window.popleft()
            computed -= isinstance(piece[2], concurrent.futures.Future)
            yield piece
    yield from window


def remote_reads(group, tensors) -> list[tuple[str, int, int, str]]:
    """The byte ranges of a remote checkpoint that write_gguf reads, in its order (its float tensors
    passed through), for the read-ahead; none for a local checkpoint."""
    if not remote.is_url(group.attrs.get("model_dir", "")):
        return []
    ranges = []
    for _, members in tensors:
        for name in members:
            arr = get_array(group, name)
            chunks = row_ranges(arr.shape[0], arr.chunks[0]) if arr.ndim > 1 else [(0, arr.shape[0])]
            for r0, r1 in chunks:
                where = remote_range(arr, r0, r1)
                if where is None:
                    break
                ranges.append(where)
    return ranges


def write_gguf(group, metadata: dict, paths: list, parts: list[list[int]], out_type: str, progress,
               read_ahead: int = 1, resume: tuple[int, list[int]] | None = None, after_tensor=None) -> None:
    """Write the GGUF (every part) to `paths`. `resume`: (tensors, lengths) of files a killed run
    left, continued after their first `tensors` tensors; `after_tensor(i, writer)`: called once
    tensor i is complete (--low-disk's record and removal)."""
    tensors = gguf_tensors_of(group)
    infos = [info for info, _ in tensors]
    kvs = file_kvs(metadata, out_type, [tuple(t) for t in group.attrs.get("kernel_tiles", [])])
    start = resume[0] if resume else 0
    # a remote checkpoint's tensors arrive while the ones before them are written
    with remote.prefetching(remote_reads(group, tensors[start:]), read_ahead), \
            GGUFSplitWriter(paths, kvs, infos, parts) as writer, \
            _encoders(read_ahead) as pool:
        if resume:
            writer.reopen(*resume)
        else:
            writer.write_header()
        with progress(sum(t.nbytes for t in infos), "assemble", unit="B", unit_scale=True,
                      unit_divisor=1024) as bar:
            bar.update(sum(t.nbytes for t in infos[:start]))
            for i, nbytes, what in ahead(_pieces(group, tensors, start), pool, max(1, read_ahead)):
                if nbytes is None:  # the end of tensor i: its type's tail, then --low-disk's step
                    info, arr = what
                    out, tiles = array_layout(arr)
                    tail = out.tail_bytes(info.shape, arr.attrs.get("scale"), tiles) \
                        if len(tensors[i][1]) == 1 else b""
                    if tail:
                        writer.write_tensor_data(i, tail)
                        bar.update(len(tail))
                    writer.end_tensor(i)
                    if after_tensor is not None:
                        after_tensor(i, writer)
                    continue
                write_piece(writer, i, nbytes, what)
                bar.update(nbytes)


def _pieces(group, tensors, start: int):
    """(tensor, bytes, function or path) of every piece from tensor `start` on, each tensor followed by
    (tensor, None, (info, its last array)): where its tail and --low-disk's step go."""
    for i, (info, members) in enumerate(tensors):
        if i < start:
            continue
        for name in members:  # a stack's experts one after another (plan refuses types with a tail)
            arr = get_array(group, name)
            for nbytes, what in array_pieces(arr):
                yield i, nbytes, what
        yield i, None, (info, arr)


@contextlib.contextmanager
def _encoders(workers: int):
    """assemble's threads for the pieces it computes: ended here, even when interrupted (a signal
    landing while the pool starts a thread must not leave one the interpreter waits for at exit)."""
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="bitnet-gguf-assemble")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def low_disk_steps(ctx: StageContext, group, temps: list[Path]):
    """(where a killed run's files continue or None, what follows each tensor or None, [whether a
    tensor is recorded: the files are then kept on failure]) of --low-disk, or of a rerun that
    continues its files (the runner removed what a kill between a record and its removal left)."""
    recorded = [ctx.resume is not None]
    if not ctx.options.low_disk and ctx.resume is None:
        return None, None, recorded
    tensors = gguf_tensors_of(group)
    resume = (ctx.resume["tensors"], ctx.resume["lengths"]) if ctx.resume is not None else None

    def after_tensor(i: int, writer) -> None:
        lengths = writer.sync()  # the tensor's bytes are on disk before its codes go
        ctx.record(i + 1, lengths, [os.stat(t).st_ino for t in temps])
        recorded[0] = True
        remove_codes(ctx.input, tensors[i][1])
    return resume, after_tensor, recorded


def run(ctx: StageContext) -> None:
    group = open_store(ctx.input, "r")
    opts = ctx.options
    metadata = json.loads(ctx.metadata.read_text(encoding="utf-8"))
    parts = ctx.plan.parts()  # which tensors go to which file, as the plan decided
    if tensor_infos(group) != ctx.plan.infos():
        raise DamagedStore(f"{ctx.input}: its tensors are not the ones the plan ({ctx.input.parent / 'plan.json'}) "
                           "lists")
    finals = final_paths(opts.output, len(parts))
    temps = [temp_path(f, opts.workdir) for f in finals]
    before = ctx.outputs_before
    if before is None or len(before) != len(finals):
        before = [identity(f) for f in finals]
    resume, after_tensor, recorded = low_disk_steps(ctx, group, temps)
    try:
        try:
            write_gguf(group, metadata, temps, parts, group.attrs["out_type"], ctx.scheduler.bar, ctx.budget.workers,
                       resume, after_tensor)
        except GGUFWriterError as e:
            if resume is None:
                raise
            raise RunDirError(f"{ctx.input.parent}: the run directory is damaged (--low-disk's unfinished output: "
                              f"{e}); delete it and convert again") from None
        if ctx.before_publish is not None:
            ctx.before_publish()
        publish(temps, finals, before)
    except OutputChanged:
        raise  # the finished files stay at their temporary names, which the message gives
    except BaseException:
        if not recorded[0]:  # --low-disk: the tensors recorded are in these files only, continued by a rerun
            for t in temps:
                t.unlink(missing_ok=True)
        raise
    ctx.outputs = finals
