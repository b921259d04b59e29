"""Small helpers over zarr v3 local stores, shared by the stages.

Every array is chunked along rows only, with the same row ranges in every
store, so a task reads and writes whole chunks (no two tasks touch one chunk).
`write_empty_chunks` is on: an all-zero chunk must still appear on disk, because
resume treats a missing chunk as not yet written.

An *indexed* array has no chunk files: its attribute `source_ref` says where its bytes
already are, contiguous and row-major, in a checkpoint file (extract writes one for every
safetensors tensor, and the later stages pass it on for tensors whose bytes they do not
change). `read_rows` reads those bytes directly, after checking that the file is still the
one the reference was made for (size, mtime, ctime, inode); `write_refs` writes the
whole store as a kerchunk/fsspec reference file (`extract.refs.json` beside the store), so
that zarr itself opens it with data.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import stat as stat_module
import threading
from pathlib import Path

import numpy as np
import zarr

from pipeline import portable, remote
from pipeline.codecs import CODECS, encode_floats
from pipeline.errors import CheckpointError, RunDirError
from pipeline.safe_files import create_exclusive, make_directory, write_whole
from zarr.codecs import BloscCodec

ARRAY_CONFIG = {"write_empty_chunks": True}
# zarr 3.1's open_array ignores a per-handle config, so set it for the whole process (every
# process that imports this module, dask workers included)
zarr.config.set({"array.write_empty_chunks": True})


def row_ranges(n_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    return [(r, min(r + rows_per_chunk, n_rows)) for r in range(0, n_rows, rows_per_chunk)]


def local_store(path, mode: str) -> zarr.storage.LocalStore:
    """The directory at `path` as a zarr store. Given as text, zarr would take "::" or "://" in
    it for an fsspec URL, and a run directory may be named anything."""
    return zarr.storage.LocalStore(str(path), read_only=mode == "r")


def open_store(path: Path, mode: str = "a") -> zarr.Group:
    return zarr.open_group(local_store(path, mode), mode=mode, zarr_format=3)


def _array_from_json(store: zarr.storage.LocalStore, path: str) -> zarr.Array | None:
    """The array at `path` in `store`, made from its zarr.json as zarr's own open makes it (the
    parsed metadata, codec pipeline and config, and the store path), but without a trip through
    zarr's event loop and without parsing a layout zarr already parsed: both cost a fraction of a
    millisecond per array, which adds up over the hundreds of thousands of arrays the stages of a
    model with many experts open. None when there is no array's zarr.json there (a group, a
    damaged or missing file): the caller asks zarr, which says what is wrong as it always has."""
    try:
        with open(os.path.join(str(store.root), path, "zarr.json"), "rb") as f:
            return _array_from_text(store, path, f.read())
    except Exception:  # noqa: BLE001 - unreadable: let zarr refuse it, in its words
        return None


def _array_from_text(store: zarr.storage.LocalStore, path: str, text) -> zarr.Array | None:
    """The array at `path` whose zarr.json is `text` (read already); None as _array_from_json."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("node_type") != "array" or data.get("zarr_format") != 3:
            return None
        return _array_from_data(store, path, data)
    except Exception:  # noqa: BLE001 - anything zarr would refuse: let zarr refuse it, in its words
        return None


def _array_from_data(store: zarr.storage.LocalStore, path: str, data: dict) -> zarr.Array:
    """The array at `path` whose zarr.json holds `data` (parsed, or just written)."""
    from zarr.core.array import AsyncArray
    from zarr.storage import StorePath

    layout, pipeline, config = _layout(data)
    # this array's own attributes (a fresh dict: nothing zarr could change is shared); copy.copy of
    # the frozen dataclass, without copy's generic path
    metadata = object.__new__(type(layout))
    metadata.__dict__.update(layout.__dict__)
    attributes = data.get("attributes")
    object.__setattr__(metadata, "attributes", attributes if attributes is not None else {})
    arr = AsyncArray.__new__(AsyncArray)  # the four fields AsyncArray.__init__ sets, already parsed
    object.__setattr__(arr, "metadata", metadata)
    store_path = StorePath.__new__(StorePath)  # StorePath(store, path), its path normalized only if it needs it
    store_path.store, store_path.path = store, path if _normal_path(path) else _normalize_path(path)
    object.__setattr__(arr, "store_path", store_path)
    object.__setattr__(arr, "config", config)
    object.__setattr__(arr, "codec_pipeline", pipeline)
    return zarr.Array(arr)


def _normal_path(path: str) -> bool:
    """Whether zarr's normalize_path would give `path` back unchanged."""
    if not path:
        return True
    parts = path.split("/")
    return "\\" not in path and "" not in parts and "." not in parts and ".." not in parts


def _normalize_path(path: str) -> str:
    from zarr.storage._utils import normalize_path

    return normalize_path(path)


# Parsed layouts (a zarr.json without its attributes): zarr's parsing was most of the cost of
# opening an array, and a model's thousands of arrays have a handful of layouts. Bounded, so a
# model of any size keeps a few hundred entries at most.
_LAYOUTS: collections.OrderedDict = collections.OrderedDict()
_LAYOUTS_MAX = 256
_LAYOUTS_LOCK = threading.Lock()


def _layout(data: dict) -> tuple:
    """(ArrayV3Metadata without attributes, codec pipeline, array config) of a zarr.json's content,
    made by zarr as its AsyncArray makes them, once per layout. The pipeline is made from the
    codecs alone (zarr's local stores have no pipeline of their own) and holds no state."""
    from zarr.core.array import create_codec_pipeline, parse_array_config
    from zarr.core.metadata.v3 import ArrayV3Metadata

    fields = {k: v for k, v in data.items() if k != "attributes"}
    key = repr(fields)
    with _LAYOUTS_LOCK:
        hit = _LAYOUTS.get(key)
        if hit is not None:
            _LAYOUTS.move_to_end(key)
            return hit
    layout = ArrayV3Metadata.from_dict(fields)
    if layout.storage_transformers:  # as zarr's parse_array_metadata: not supported
        raise ValueError("storage transformers are not supported")
    hit = (layout, create_codec_pipeline(metadata=layout), parse_array_config(None))
    with _LAYOUTS_LOCK:
        _LAYOUTS[key] = hit
        while len(_LAYOUTS) > _LAYOUTS_MAX:
            _LAYOUTS.popitem(last=False)
    return hit


def member_path(group: zarr.Group, name: str) -> str:
    return f"{group.path}/{name}" if group.path else name


def get_array(group: zarr.Group, name: str) -> zarr.Array:
    """`group[name]` for an array of a local store, without zarr's per-call event loop trip."""
    arr = _array_from_json(group.store_path.store, member_path(group, name))
    return arr if arr is not None else group[name]


def has_member(group: zarr.Group, name: str) -> bool:
    """`name in group` for a zarr v3 local store (a member is a directory with a zarr.json)."""
    return os.path.isfile(os.path.join(str(group.store_path.store.root), member_path(group, name), "zarr.json"))


def ensure_array(group: zarr.Group, name: str, shape: tuple[int, ...], rows_per_chunk: int,
                 dtype, attrs: dict, compress: bool = False) -> zarr.Array:
    """Open `name` if it exists with this layout (resume), else create it."""
    chunks = (rows_per_chunk, *shape[1:])
    if has_member(group, name):
        arr = get_array(group, name)
        if isinstance(arr, zarr.Array) and arr.shape == tuple(shape) and arr.chunks == chunks \
                and arr.dtype == np.dtype(dtype):
            merged = {**arr.attrs.asdict(), **attrs}
            if merged != arr.attrs.asdict() and not compress:
                return write_array_metadata(group, name, shape, chunks, dtype, merged)
            if merged != arr.attrs.asdict():
                arr.attrs.update(attrs)
            return arr
        remove_tree(Path(str(group.store_path.store.root)) / group.path / name)
    if not compress:
        return write_array_metadata(group, name, shape, chunks, dtype, attrs)
    compressors = (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),)
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, attributes=attrs,
                              compressors=compressors, fill_value=0, config=ARRAY_CONFIG)


_TEMPLATES: dict[tuple[str, int], dict] = {}


def _metadata_template(dtype, ndim: int) -> dict:
    """zarr's own zarr.json of an uncompressed array of `dtype` and `ndim` dimensions (made once,
    in memory, by zarr itself)."""
    key = (np.dtype(dtype).str, ndim)
    if key not in _TEMPLATES:
        from zarr.core.buffer import default_buffer_prototype

        scratch = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
        arr = scratch.create_array("t", shape=(1,) * ndim, chunks=(1,) * ndim, dtype=dtype, fill_value=0,
                                   compressors=None, config=ARRAY_CONFIG)
        _TEMPLATES[key] = json.loads(arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())
    return _TEMPLATES[key]


def write_array_metadata(group: zarr.Group, name: str, shape, chunks, dtype, attrs: dict) -> zarr.Array:
    """An uncompressed array's zarr.json, as zarr writes it (its template with this shape, chunks and
    attributes) but without indentation, whole or not at all; the array, made from what was written
    (not read back). zarr's create_array costs several times more per array, which adds up over the
    hundreds of arrays of an 8B model's stores, and the tens of thousands of a model with many experts."""
    meta = dict(_metadata_template(dtype, len(shape)))
    meta["shape"] = [int(n) for n in shape]
    meta["chunk_grid"] = {**meta["chunk_grid"], "configuration": {
        **meta["chunk_grid"]["configuration"], "chunk_shape": [int(n) for n in chunks]}}
    meta["attributes"] = attrs
    directory = os.path.join(str(group.store_path.store.root), group.path, name)
    make_directory(directory)
    text = json.dumps(meta, separators=(",", ":"))  # C-encoded; with indent=2 json encodes in pure Python
    write_whole(os.path.join(directory, "zarr.json"), text)
    return _array_from_data(group.store_path.store, member_path(group, name), json.loads(text))


def array_path(store: Path, name: str) -> str:
    return str(Path(store) / name)


# Arrays opened lately, by (path, mode): every chunk task opens its source and output, and parsing a
# zarr.json again for each of thousands of small chunks was a third of a task's time. An entry is
# used only while the zarr.json is the same file (inode, size, mtime): rewritten metadata is reread.
_OPENED: collections.OrderedDict = collections.OrderedDict()
_OPENED_MAX = 64
_OPENED_LOCK = threading.Lock()


def open_array(path: str, mode: str = "r+") -> zarr.Array:
    key = (str(path), mode)
    try:
        st = os.stat(os.path.join(str(path), "zarr.json"))
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_dev)
    except OSError:
        stamp = None
    if stamp is not None:
        with _OPENED_LOCK:
            hit = _OPENED.get(key)
            if hit is not None and hit[0] == stamp:
                _OPENED.move_to_end(key)
                return hit[1]
    store = local_store(path, mode)
    arr = _array_from_json(store, "")
    if arr is None:
        return zarr.open_array(store, mode=mode, zarr_format=3)
    if stamp is not None:
        with _OPENED_LOCK:
            _OPENED[key] = (stamp, arr)
            _OPENED.move_to_end(key)
            while len(_OPENED) > _OPENED_MAX:
                _OPENED.popitem(last=False)
    return arr


def remove_tree(path: Path) -> None:
    """Delete a store or array directory so that a crash midway leaves nothing that looks valid:
    rename it aside first (one atomic step), then delete the renamed copy."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    trash = path.with_name(f".{path.name}.deleting")
    _remove(trash)
    os.replace(path, trash)
    _remove(trash)


def _remove(path: Path) -> None:
    """Delete a directory tree, or a file or link where a store should have been."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def written_chunks(arr: zarr.Array) -> set[int]:
    """Row-chunk indices written whole and recorded: the chunk file is on disk and so is its digest
    record (see `write_rows`). A chunk file without a record was being written when the run
    stopped: it is written again. Every chunk of an indexed array (its bytes are in the
    checkpoint)."""
    if is_indexed(arr):
        return set(range(-(-arr.shape[0] // arr.chunks[0]) if arr.shape and arr.shape[0] else 0))
    base = os.path.join(str(arr.store_path.store.root), arr.path)  # text paths: asked for every array of a stage
    root, records = os.path.join(base, "c"), os.path.join(base, DIGESTS)
    if not os.path.isdir(root) or not os.path.isdir(records):
        return set()
    recorded = {int(n) for n in os.listdir(records) if n.isdigit()}
    inner = "" if arr.ndim == 1 else "0"  # c/<i>, or c/<i>/0 for a matrix
    return {int(n) for n in os.listdir(root) if n.isdigit() and int(n) in recorded
            and os.path.isfile(os.path.join(root, n, inner) if inner else os.path.join(root, n))}


# -- chunk files -------------------------------------------------------------------------------------
# An uncompressed array's chunk file is the chunk's raw little-endian bytes in C order (an edge
# chunk padded to the full chunk shape). Where no byte changes between stores, chunk files are
# hard-linked (or copied in the kernel) instead of being read and written through Python.

def is_raw(arr: zarr.Array) -> bool:
    """True when the array's chunk files are its raw bytes (no filters or compressors)."""
    from zarr.codecs import BytesCodec

    codecs = arr.metadata.codecs
    return len(codecs) == 1 and isinstance(codecs[0], BytesCodec) and \
        (arr.dtype.itemsize == 1 or codecs[0].endian is None or codecs[0].endian.value == "little")


def chunk_path(arr: zarr.Array, index: int) -> Path:
    """Path of row-chunk `index` of an array in a local store."""
    return Path(chunk_file(arr, index))


def chunk_file(arr: zarr.Array, index: int) -> str:
    """chunk_path as text (no Path objects: made for every chunk written)."""
    key = arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))
    return os.path.join(str(arr.store_path.store.root), arr.path, key)


def chunk_nbytes(arr: zarr.Array) -> int:
    """Size of every chunk file of a raw array (edge chunks are padded to it)."""
    n = arr.dtype.itemsize
    for c in arr.chunks:
        n *= c
    return n


def link_chunk(src: zarr.Array, dst: zarr.Array, index: int) -> None:
    """Make row-chunk `index` of `dst` the same file as `src`'s (both raw, same chunk bytes):
    a hard link, or an in-kernel copy where links are impossible; whole or absent, like zarr's
    own writes (a temporary name, then a rename)."""
    source, target = chunk_path(src, index), chunk_path(dst, index)
    target.parent.mkdir(parents=True, exist_ok=True)

    def make(tmp: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            with open(source, "rb") as fin, create_exclusive(tmp) as fout:
                size = os.fstat(fin.fileno()).st_size
                if portable.copy_range(fin.fileno(), fout.fileno(), size, 0, 0) != size:
                    raise DamagedStore(f"{source}: chunk file changed size while being copied")
        # a link an interrupted run made (no record yet) is the same file as tmp, and rename()
        # between two links of one file does nothing, leaving tmp behind: remove it first
        target.unlink(missing_ok=True)

    write_whole(target, make)
    record_chunk(dst, index)


def source_range(arr: zarr.Array, start: int, stop: int) -> tuple[str, int, int, list] | None:
    """(checkpoint file, absolute byte offset, bytes, identity) that `read_rows` reads for rows
    [start, stop) of an indexed array (None for an array with bytes of its own)."""
    ref = source_ref(arr)
    if ref is None or CODES_FROM in arr.attrs:
        return None
    if ENCODED_FROM in arr.attrs:
        encoded = arr.attrs[ENCODED_FROM]
        row_bytes = np.dtype(encoded["dtype"]).itemsize * encoded["columns"]
    else:
        row_bytes = np.dtype(arr.dtype).itemsize * math.prod(arr.shape[1:])
    return ref["file"], ref["offset"] + start * row_bytes, (stop - start) * row_bytes, ref["identity"]


def remote_range(arr: zarr.Array, start: int, stop: int) -> tuple[str, int, int, str] | None:
    """(URL, offset, bytes, version) that `read_rows` fetches for rows [start, stop) of an indexed
    array of a remote checkpoint (what remote.prefetching takes), None for any other array."""
    where = source_range(arr, start, stop)
    if where is None or not remote.is_url(where[0]):
        return None
    return where[0], where[1], where[2], where[3][1]


def read_rows(arr: zarr.Array, start: int, stop: int, out_type: str | None = None) -> np.ndarray:
    """Rows [start, stop) of an array. A raw array's chunk files are read directly (one
    pread per chunk, about five times faster than zarr's read path); others through zarr.
    A chunk file that is missing or short means a damaged store, not zeros. An indexed
    array's rows are one pread from the checkpoint file (checked as extract would have, if it
    did not read them: `check_unscanned`, against `out_type` or the array's own)."""
    if CODES_FROM in arr.attrs:  # pack.zarr: quantize's 2-bit codes (linked chunk files), encoded here
        scale = arr.attrs.get("scale")
        return CODECS[arr.attrs["out_type"]].encode_codes(_read_raw_rows(arr, start, stop),
                                                          None if scale is None else np.float32(scale))
    ref = source_ref(arr)
    if ref is not None and ENCODED_FROM in arr.attrs:  # a float matrix in another float type: convert
        encoded = arr.attrs[ENCODED_FROM]
        block = np.empty((stop - start, encoded["columns"]), dtype=np.dtype(encoded["dtype"]))
        read_source(ref, start * block.itemsize * encoded["columns"], block.reshape(-1).view(np.uint8))
        check_unscanned(ref, block, arr.attrs["out_type"], start, stop)
        return encode_floats(block, encoded["source_dtype"], arr.attrs["out_type"])
    if ref is not None:
        out = np.empty((stop - start, *arr.shape[1:]), dtype=arr.dtype)
        row_bytes = out.itemsize * math.prod(arr.shape[1:])
        read_source(ref, start * row_bytes, out.reshape(-1).view(np.uint8))
        check_unscanned(ref, out, out_type or arr.attrs.get("out_type"), start, stop)
        return out
    if not is_raw(arr):
        return arr[start:stop]
    return _read_raw_rows(arr, start, stop)


def _read_raw_rows(arr: zarr.Array, start: int, stop: int) -> np.ndarray:
    rows_per_chunk = arr.chunks[0]
    row_bytes = chunk_nbytes(arr) // rows_per_chunk
    out = np.empty((stop - start, *arr.shape[1:]), dtype=arr.dtype)
    view = out.reshape(-1).view(np.uint8)
    done = 0
    for index in range(start // rows_per_chunk, (stop - 1) // rows_per_chunk + 1 if stop > start else 0):
        c0 = index * rows_per_chunk
        r0, r1 = max(start, c0), min(stop, c0 + rows_per_chunk)
        nbytes = (r1 - r0) * row_bytes
        path = chunk_path(arr, index)
        try:
            fd = portable.open_read(path)
        except FileNotFoundError:
            raise DamagedStore(f"{path}: chunk file missing") from None
        try:
            got = portable.read_into(fd, view[done:done + nbytes], (r0 - c0) * row_bytes)
        finally:
            os.close(fd)
        if got != nbytes:
            raise DamagedStore(f"{path}: chunk file is short ({got} of {nbytes} bytes)")
        done += nbytes
    return out


# -- indexed arrays: bytes that are in the checkpoint -------------------------------------------------

SOURCE_REF = "source_ref"


class SourceContentChanged(CheckpointError):
    """Bytes of a checkpoint file differ from the ones extract read, its size, times and inode
    unchanged: the runner marks the run directory so that a rerun starts over."""

    def __init__(self, message: str, file: str = ""):
        super().__init__(message)
        self.file = file

    def __reduce__(self):  # raised in a dask worker process too: travels back whole
        return type(self), (str(self), self.file)


def source_changed(model_dir) -> CheckpointError:
    """The refusal when a checkpoint file is not the one the run started from."""
    return CheckpointError(f"{model_dir}: the checkpoint's files changed during the conversion; nothing was "
                           "written; rerun the same command to start over from the new files")


def file_identity(st: os.stat_result) -> list[int]:
    """What says a file is unchanged (as in safetensors_io.files_fingerprint)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


# pack.zarr: an indexed array whose rows assemble converts from the checkpoint's (source dtype,
# numpy dtype and columns of the rows there); its bytes are `encode_floats` of those rows
ENCODED_FROM = "encoded_from"
# pack.zarr: an array whose chunk files are quantize.zarr's 2-bit codes (hard links; output types
# marked `from_codes`); its bytes are the output type's `encode_codes` of them, which `read_rows`
# returns and assemble writes (value: the code layout)
CODES_FROM = "codes_from"


# source_ref of a remote float tensor that extract did not read (plan.fetched_once): what its
# readers need to check its values as extract would have (source dtype, tensor name, role)
UNSCANNED = "unscanned"


def damaged_values(file, tensor: str, start: int, stop: int) -> CheckpointError:
    return CheckpointError(f"{file}: tensor {tensor} holds NaN or infinite values in rows {start}..{stop}; the "
                           "checkpoint is damaged")


def check_unscanned(ref: dict, block: np.ndarray, out_type: str | None, start: int, stop: int) -> None:
    """Refuse rows of a tensor extract did not read that hold NaN or infinite values, or values
    `out_type` (when known: the pack stage's) cannot hold, as extract and the runner's range
    check refuse a local checkpoint's. `block`: the rows' bytes, in any integer or byte view."""
    scan = ref.get(UNSCANNED)
    if scan is None or not block.size:
        return
    from pipeline.codecs import MAGNITUDE_BITS, row_abs_max_bits
    from pipeline.outtypes import OUTPUT_TYPES, range_refusal

    bits = np.ascontiguousarray(block).reshape(block.shape[0] if block.ndim > 1 else 1, -1)
    maxima, finite = row_abs_max_bits(bits.view(MAGNITUDE_BITS[scan["dtype"]][0]), scan["dtype"])
    if not finite:
        raise damaged_values(ref["file"], scan["tensor"], start, stop)
    out = OUTPUT_TYPES.get(out_type) if out_type else None
    if out is not None and not out.codec.ternary:
        refusal = range_refusal(ref["file"], scan["tensor"], scan["role"], out, float(maxima.max(initial=0.0)))
        if refusal:
            raise refusal


def make_ref(path: Path, offset: int, model_dir: Path, identity: list[int], content: dict | None = None) -> dict:
    """`source_ref` of an array whose bytes start at `offset` in checkpoint file `path` (`content`:
    where the digests of those bytes are recorded, see content_spec)."""
    ref = {"file": str(path), "offset": int(offset), "identity": list(identity), "model_dir": str(model_dir)}
    if content is not None:
        ref[CONTENT] = content
    return ref


def source_ref(arr: zarr.Array) -> dict | None:
    return arr.attrs.get(SOURCE_REF)


def is_indexed(arr: zarr.Array) -> bool:
    return source_ref(arr) is not None


def index_array(group: zarr.Group, name: str, shape: tuple[int, ...], rows_per_chunk: int, dtype, attrs: dict,
                ref: dict) -> zarr.Array:
    """An array whose bytes are `ref`'s, in the checkpoint: only its metadata is written."""
    return ensure_array(group, name, shape, rows_per_chunk, dtype, {**attrs, SOURCE_REF: ref})


def check_source_file(ref: dict, st: os.stat_result | None = None) -> None:
    """Refuse (the one-line message) when the referenced file is gone or not the one indexed."""
    if remote.is_url(ref["file"]):  # each read names the version it expects (remote.read_into)
        return
    try:
        st = os.stat(ref["file"]) if st is None else st
    except OSError:
        raise source_changed(ref["model_dir"]) from None
    if file_identity(st) != ref["identity"]:
        raise source_changed(ref["model_dir"])


def read_source(ref: dict, offset: int, view: memoryview | np.ndarray, check: bool = True) -> None:
    """Fill `view` (bytes) from `offset` bytes into the referenced tensor, checking the file first
    and then (unless `check` is false) the bytes against the digests extract recorded: the parts of
    the first and last block outside the range are read too, so that whole blocks are digested."""
    content = ref.get(CONTENT) if check else None
    if content is None or not len(view):
        _read_exact(ref, offset, view)
        return
    out = view if isinstance(view, np.ndarray) else np.frombuffer(view, dtype=np.uint8)
    end = offset + len(out)
    blocks = content_blocks(content, offset, end)
    _read_exact(ref, offset, out)
    # the edges apart: reading the whole span into a buffer would cost a copy of every byte
    head = np.empty(offset - blocks[0][2], dtype=np.uint8)
    tail = np.empty(blocks[-1][3] - end, dtype=np.uint8)
    if len(head):
        _read_exact(ref, blocks[0][2], head)
    if len(tail):
        _read_exact(ref, end, tail)
    check_content(ref, blocks, out, offset, head, tail)


def _read_exact(ref: dict, offset: int, view: memoryview | np.ndarray) -> None:
    if remote.is_url(ref["file"]):
        size, version = ref["identity"]
        if ref["offset"] + offset + len(view) > size:
            raise source_changed(ref["model_dir"])
        try:
            remote.read_into(ref["file"], ref["offset"] + offset, view.reshape(-1) if isinstance(view, np.ndarray)
                             else view, version)
        except remote.SourceChanged:
            raise source_changed(ref["model_dir"]) from None
        return
    try:
        fd = portable.open_read(ref["file"])
    except OSError:
        raise source_changed(ref["model_dir"]) from None
    try:
        check_source_file(ref, os.fstat(fd))
        done, nbytes = 0, len(view)
        while done < nbytes:
            n = portable.read_into(fd, view[done:], ref["offset"] + offset + done)
            if n == 0:  # shorter than when it was indexed: changed under us
                raise source_changed(ref["model_dir"])
            done += n
    finally:
        os.close(fd)


def copy_ref(arr: zarr.Array) -> dict:
    """The `source_ref` of an indexed array, to index another array with the same bytes."""
    return dict(source_ref(arr))


def refs_path(store: Path) -> Path:
    """Where a store's reference file is: beside it (`extract.refs.json` for `extract.zarr`), not
    inside, where zarr would take it for a member of the group."""
    store = Path(store)
    return store.with_name(store.stem + ".refs.json")


def write_refs(store: Path, names) -> None:
    """Write the store as a kerchunk (version 1) reference set to `refs_path(store)`, whole or not at
    all: metadata inline, an indexed array's
    chunks as [file, offset, length] (a full chunk: an edge chunk runs on into the bytes that
    follow it; one that would run past the end of its file is a padded copy in the store),
    other chunks as their files in the store (written by the time the stage is done). Open it with
    zarr.open_group("reference://", storage_options={"fo": "<workdir>/extract.refs.json"}) (open_with_refs).

    Every target is a plain absolute path, never a template: fsspec renders a "{{" in a template
    value or a target as template syntax, and a checkpoint or run directory may be named anything.

    `names`: the arrays, each opened here in turn and written out as it is: holding a zarr.Array,
    or the reference entries, for every array of a store until the end would grow the peak with
    the number of tensors. Compact JSON, each entry encoded by json's C encoder."""
    store = Path(store).resolve()
    path = refs_path(store)

    def make(tmp: str) -> None:  # written as it goes: the entries of every array are never held together
        with create_exclusive(tmp, "w") as f:  # never through a link planted at the temporary name
            f.write('{"version":1,"refs":{"zarr.json":' + json.dumps((store / "zarr.json").read_text()))
            zstore = local_store(store, "r")
            for name in sorted(set(names)):
                for key, value in _array_refs(store, name, zstore):
                    f.write(f",{json.dumps(key)}:{json.dumps(value, separators=(',', ':'))}")
            f.write("}}")
            f.flush()
            os.fsync(f.fileno())

    write_whole(path, make, suffix=".tmp")


def _array_refs(store: Path, name: str, zstore: zarr.storage.LocalStore):
    """The reference entries (key, value) of the array `name` of `store` (see write_refs; `zstore`:
    the store opened once for every array). Its zarr.json is read once, for the entry and the array."""
    text = (store / name / "zarr.json").read_text(encoding="utf-8")
    arr = _array_from_text(zstore, name, text)
    arr = arr if arr is not None else open_store(store, "r")[name]
    yield f"{name}/zarr.json", text
    ref = source_ref(arr)
    n_chunks = -(-arr.shape[0] // arr.chunks[0]) if arr.shape and arr.shape[0] else 0
    tail = [0] * (arr.ndim - 1)
    if ref is None:  # chunk files of the store (written by the time the stage is done)
        for i in range(n_chunks):
            key = arr.metadata.encode_chunk_key((i, *tail))
            yield f"{name}/{key}", [str(store / name / key)]
        return
    size = ref["identity"][0]
    nbytes = chunk_nbytes(arr)
    for i in range(n_chunks):
        key = arr.metadata.encode_chunk_key((i, *tail))
        offset = ref["offset"] + i * nbytes
        if offset + nbytes <= size:
            yield f"{name}/{key}", [str(ref["file"]), offset, nbytes]
        elif not remote.is_url(ref["file"]):  # a remote tensor's last chunk is left out: a padded copy
            # would put weights on disk
            yield f"{name}/{key}", [str(store / name / write_padded_tail(store / name, ref, arr, i))]


def write_padded_tail(array_dir: Path, ref: dict, arr: zarr.Array, index: int) -> str:
    """A copy of an indexed array's last chunk padded with zeros to the full chunk (its file
    ends inside the chunk), for the reference view only; the stages read the checkpoint."""
    name = f"padded-chunk.{index}"
    path = array_dir / name
    nbytes = chunk_nbytes(arr)
    if path.is_file() and path.stat().st_size == nbytes:
        return name
    row_bytes = nbytes // arr.chunks[0]
    buf = np.zeros(nbytes, dtype=np.uint8)
    have = (arr.shape[0] - index * arr.chunks[0]) * row_bytes
    # unchecked: extract writes the reference set before its pass records the digests; the
    # stages never read this copy
    read_source(ref, index * nbytes, buf[:have], check=False)
    write_whole(path, memoryview(buf))
    return name


def open_with_refs(store: Path) -> zarr.Group:
    """A store opened through its reference file: indexed arrays read from the checkpoint. The file
    is read here and handed over as data: fsspec would parse its path as a URL ("::" chains
    filesystems, "%" escapes), and a run directory may be named anything."""
    references = json.loads(refs_path(store).read_text(encoding="utf-8"))
    return zarr.open_group("reference://", mode="r", zarr_format=3,
                           storage_options={"fo": references, "remote_protocol": "file"})


# -- content of the referenced bytes -------------------------------------------------------------
# A file's size, times and inode miss a change that keeps them all: a write through a page of a
# writable mapping that is already dirty updates no time, and a filesystem snapshot rolled back
# brings other bytes with the same inode and times. So extract, whose pass reads every byte an
# indexed array refers to, records an xxh3 digest of each block of them: a tensor's bytes are cut
# at its chunks (the indexed array's row chunks), and each chunk into CONTENT_BLOCK-byte blocks, the
# last one shorter. Chunk i's digests are `<array>/digests/<i>` of extract's array, as
# {"nbytes": chunk bytes, "xxh3": [hex digest per block]}; the reference carries where they are
# (`content`), so quantize's and pack's arrays that pass it on are checked against the same record.
# Every later read digests the blocks it covers (a read that starts or ends inside a block reads
# it whole: small blocks keep that extra read small) and refuses other bytes.

CONTENT = "content"
CONTENT_BLOCK = 64 * 1024  # a read off the block boundaries reads at most 2 x 64 KiB more


def content_spec(array_dir: Path, chunk_bytes: int, nbytes: int, tensor: str) -> dict | None:
    """The `content` of a reference to a tensor of `nbytes` bytes indexed by the array at
    `array_dir`, in chunks of `chunk_bytes` bytes (None for an empty tensor: nothing to read)."""
    if nbytes <= 0:
        return None
    return {"records": str(Path(array_dir).absolute() / DIGESTS), "chunk_bytes": int(chunk_bytes),
            "block": CONTENT_BLOCK, "nbytes": int(nbytes), "tensor": tensor}


def content_blocks(content: dict, start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """(chunk, block within it, first byte, end byte) of the blocks that bytes [start, stop) of
    the tensor touch (positions in the tensor's bytes)."""
    cb, block, n = content["chunk_bytes"], content["block"], content["nbytes"]
    blocks = []
    i = start // cb
    pos = i * cb + (start - i * cb) // block * block
    while pos < min(stop, n):
        i = pos // cb
        end = min(pos + block, (i + 1) * cb, n)
        blocks.append((i, (pos - i * cb) // block, pos, end))
        pos = end
    return blocks


def chunk_content_digests(content: dict, data: np.ndarray) -> list[str]:
    """Digests of the blocks of one chunk of the tensor (`data`: its bytes)."""
    import xxhash

    data = data.reshape(-1).view(np.uint8)
    return [xxhash.xxh3_64_hexdigest(data[a:a + content["block"]]) for a in range(0, len(data), content["block"])]


def record_content(content: dict, index: int, data: np.ndarray) -> None:
    """Record the digests of chunk `index` of the referenced tensor, whose bytes extract read."""
    write_whole(os.path.join(content["records"], str(index)),
                json.dumps({"nbytes": int(data.nbytes), "xxh3": chunk_content_digests(content, data)}), parents=True)


def content_recorded(content: dict | None) -> set[int]:
    """Chunks of the referenced tensor whose digests are recorded."""
    records = Path(content["records"]) if content else None
    if records is None or not records.is_dir():
        return set()
    return {int(p.name) for p in records.iterdir() if p.name.isdigit() and p.is_file()}


_CONTENT_CACHE: dict[str, tuple[tuple, tuple[str, ...]]] = {}


def _chunk_digests(content: dict, index: int) -> tuple[str, ...]:
    """The recorded digests of chunk `index` (kept while the record file is the same file: a task
    reads a chunk in several pieces)."""
    record = Path(content["records"]) / str(index)
    try:
        st = os.stat(record)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _CONTENT_CACHE.get(str(record))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        data = json.loads(record.read_text(encoding="utf-8"))
        digests = tuple(data["xxh3"])
        size = min(content["chunk_bytes"], content["nbytes"] - index * content["chunk_bytes"])
        if data["nbytes"] != size or len(digests) != -(-size // content["block"]) \
                or not all(isinstance(d, str) for d in digests):
            raise ValueError
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError):
        raise DamagedStore(f"{record}: the digests of checkpoint bytes extract read are missing or unreadable") \
            from None
    if len(_CONTENT_CACHE) > 256:
        _CONTENT_CACHE.clear()
    _CONTENT_CACHE[str(record)] = (stamp, digests)
    return digests


def check_content(ref: dict, blocks: list, data: np.ndarray, start: int, head: np.ndarray, tail: np.ndarray) -> None:
    """Refuse bytes whose blocks differ from extract's digests: `data` from tensor byte `start`,
    `head` the bytes of the first block before it and `tail` those of the last block after it."""
    import xxhash

    content = ref[CONTENT]
    end = start + len(data)
    index, digests = None, ()
    for i, j, a, b in blocks:
        if i != index:
            index, digests = i, _chunk_digests(content, i)
        if a >= start and b <= end:
            got = xxhash.xxh3_64_hexdigest(data[a - start:b - start])
        else:  # an edge block: the same digest, fed in pieces
            h = xxhash.xxh3_64()
            if a < start:
                h.update(head)
            h.update(data[max(a, start) - start:min(b, end) - start])
            if b > end:
                h.update(tail)
            got = h.hexdigest()
        if got != digests[j]:
            offset = ref["offset"] + a
            raise SourceContentChanged(
                f"{ref['file']}: bytes {offset}..{offset + b - a} (tensor {content['tensor']}) are not the ones this run "
                "read earlier, though the file's size and times are unchanged; nothing was written; rerun the same "
                "command to start over from the new files", ref["file"])


class DamagedStore(RunDirError):
    """A store lacks a chunk it must have, or holds other bytes than were written: the run
    directory was damaged (the message says to delete it)."""

    def __init__(self, what: str):
        super().__init__(f"the run directory is damaged ({what}); delete it and convert again")
        self.what = what


# -- chunk digests ------------------------------------------------------------------------------
# Every chunk is recorded when it is written, not when its store is finished: right after a task
# writes a chunk file (zarr renames it into place whole), its size and xxh3 digest go into
# `<array>/digests/<row-chunk index>` (a temporary name, then a rename). A chunk counts as
# written only with its record, so a rerun redoes a chunk whose record a kill prevented, and a
# chunk of an interrupted store that changed while no conversion ran (flipped, truncated,
# replaced, added) no longer matches its record when the store is sealed: the run stops there,
# before anything reads it.

DIGESTS = "digests"


def digest_path(arr: zarr.Array, index: int) -> Path:
    """Where the record of row-chunk `index` of an array lives."""
    return Path(digest_file(arr, index))


def digest_file(arr: zarr.Array, index: int) -> str:
    """digest_path as text."""
    return os.path.join(str(arr.store_path.store.root), arr.path, DIGESTS, str(index))


def record_chunk(arr: zarr.Array, index: int, content: memoryview | None = None) -> None:
    """Record row-chunk `index` of `arr` as just written: [size, xxh3 digest] of its chunk file
    (`content`: the bytes just written to it, hashed instead of reading the file back)."""
    if content is None:
        entry = sized_digest(chunk_file(arr, index))
    else:
        import xxhash

        entry = [content.nbytes, xxhash.xxh3_64(content).hexdigest()]
    write_whole(digest_file(arr, index), json.dumps(entry), parents=True)


def write_rows(path: str, start: int, stop: int, data: np.ndarray) -> None:
    """Rows [start, stop) of the array at `path` (whole chunks) = `data`, each chunk recorded.
    A raw array's chunks are written as files directly (a temporary name, then a rename), the
    bytes zarr would write: zarr's write path costs a few ms of event-loop round trips a chunk,
    which at a low --memory-limit (small chunks, thousands of them) was most of a stage's time."""
    arr = open_array(path)
    rows_per_chunk = arr.chunks[0]
    if not (is_raw(arr) and start % rows_per_chunk == 0 and tuple(arr.chunks[1:]) == tuple(arr.shape[1:])
            and stop <= arr.shape[0] and data.shape == (stop - start, *arr.shape[1:])):
        arr[start:stop] = data
        for index in range(start // rows_per_chunk, -(-stop // rows_per_chunk)):
            record_chunk(arr, index)
        return
    rows = np.ascontiguousarray(data, dtype=arr.dtype.newbyteorder("<"))
    for r0 in range(start, stop, rows_per_chunk):
        index = r0 // rows_per_chunk
        block = rows[r0 - start:min(stop, r0 + rows_per_chunk) - start]
        if block.shape[0] < rows_per_chunk:  # an edge chunk: zarr pads it to the full chunk with the fill value
            full = np.full((rows_per_chunk, *block.shape[1:]), arr.metadata.fill_value, dtype=rows.dtype)
            full[:block.shape[0]] = block
            block = full
        content = memoryview(block.reshape(-1).view(np.uint8))
        write_whole(chunk_file(arr, index), content, parents=True)
        record_chunk(arr, index, content)


class _Layout:
    """What the seal reads of an array: its path, shape, row chunks, attributes and chunk keys."""
    __slots__ = ("path", "shape", "chunks", "ndim", "attrs", "_key")

    def __init__(self, path: str, shape, chunks, attrs: dict, key):
        self.path, self.shape, self.chunks, self.ndim = path, tuple(shape), tuple(chunks), len(shape)
        self.attrs, self._key = attrs, key

    def chunk_key(self, index: int) -> str:
        return self._key((index,) + (0,) * (self.ndim - 1))


def _plain_layout(store: str, name: str, text: bytes | None = None) -> _Layout | None:
    """The layout of an array whose zarr.json is one this converter writes (a regular grid, chunk
    keys c/<i>/<j>...), read as JSON alone: making a zarr array of each of the tens of thousands of
    arrays of a store was most of a seal's time. None for anything else. `text`: the zarr.json's
    bytes, when they were read already (the seal digests them)."""
    try:
        if text is None:
            with open(os.path.join(store, name, "zarr.json"), "rb") as f:
                text = f.read()
        data = json.loads(text)
        grid, encoding = data["chunk_grid"], data["chunk_key_encoding"]
        if data.get("node_type") != "array" or data.get("zarr_format") != 3 or grid.get("name") != "regular" \
                or encoding != {"name": "default", "configuration": {"separator": "/"}}:
            return None
        shape, chunks = data["shape"], grid["configuration"]["chunk_shape"]
        attrs = data.get("attributes") or {}
        if not (isinstance(shape, list) and isinstance(chunks, list) and len(shape) == len(chunks)
                and all(type(n) is int and n >= 0 for n in shape) and all(type(n) is int and n > 0 for n in chunks)
                and isinstance(attrs, dict)):
            return None
    except Exception:  # noqa: BLE001 - unreadable or another layout: zarr says what it is
        return None
    return _Layout(name, shape, chunks, attrs, lambda coords: "c/" + "/".join(map(str, coords)))


def _store_arrays(store: Path, digests: dict[str, list], texts: dict[str, bytes] | None = None):
    """The arrays of a store's root group (as `group.arrays()`), found among the files of `digests`,
    as _Layout: read from their zarr.json directly (`texts`: the bytes of those the seal read), or
    else asked of zarr, which makes an array of it or refuses it in its own words if it is damaged."""
    group, root = None, str(store)
    for name in sorted(k[:-len("/zarr.json")] for k in digests if k.endswith("/zarr.json") and k.count("/") == 1):
        layout = _plain_layout(root, name, texts.get(f"{name}/zarr.json") if texts else None)
        if layout is None:
            group = group if group is not None else open_store(store, "r")
            node = group[name]
            if not isinstance(node, zarr.Array):
                continue
            layout = _Layout(node.path, node.shape, node.chunks, node.attrs.asdict(), node.metadata.encode_chunk_key)
        yield layout


def chunk_records(store: Path, digests: dict[str, list], checked=frozenset(),
                  resolved: dict[str, Path] | None = None, texts: dict[str, bytes] | None = None) -> str | None:
    """Check a store's chunks against the records written with them, before it is sealed.

    `digests`: {relative path: [size, digest]} of the files of the store now (all of them, or one
    top-level entry's: seal_store checks a store entry by entry); `checked`: the chunk files whose
    entry is already their record's (seal_digests); `resolved`: real paths of directories, kept
    between calls; `texts`: the bytes of arrays' zarr.json the seal read. Every row chunk of every array must be on disk and match its record: raises
    DamagedStore naming the first chunk file that does not. Nothing else may be there but zarr's
    metadata: returns the first file that is (for the caller to refuse once every chunk is checked),
    else None."""
    store = store if isinstance(store, Path) else Path(store)  # once per entry of a seal: no parse again
    expected = {"zarr.json"}
    padded: dict[str, list[str]] = {}  # array -> its padded copies: one pass, not one per array
    for k in digests:
        head, _, tail = k.rpartition("/")
        if tail.startswith("padded-chunk."):
            padded.setdefault(head, []).append(k)
    resolved = {} if resolved is None else resolved  # a directory -> its real path, resolved once (not once per array)

    def real(directory: str) -> Path:
        if directory not in resolved:
            resolved[directory] = Path(directory).resolve()
        return resolved[directory]

    for arr in _store_arrays(store, digests, texts):
        base = arr.path
        expected.add(f"{base}/zarr.json")
        ref = arr.attrs.get(SOURCE_REF)
        if ref is not None:  # indexed: no chunk files, its bytes are in the checkpoint (see read_source),
            # but for the reference view's padded copy of a last chunk the file ends inside
            expected.update(padded.get(base, ()))
            content = ref.get(CONTENT)
            records = Path(content["records"]) if content else None
            if records is not None and records.name == DIGESTS and records.parent.name == Path(base).name \
                    and real(str(records.parent.parent)) == real(str(store)):
                for index in range(-(-content["nbytes"] // content["chunk_bytes"])):  # extract's digests
                    record = f"{base}/{DIGESTS}/{index}"
                    if record not in digests:
                        raise DamagedStore(f"{store / record}: missing")
                    expected.add(record)
            continue
        for index in range(-(-arr.shape[0] // arr.chunks[0]) if arr.ndim else 1):
            chunk = f"{arr.path}/{arr.chunk_key(index)}"  # as chunk_path, digest_path
            record = f"{arr.path}/{DIGESTS}/{index}"
            expected |= {chunk, record}
            if chunk not in digests:
                raise DamagedStore(f"{store / chunk}: missing")
            if chunk in checked:
                continue
            try:
                recorded = json.loads((store / record).read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError):
                raise DamagedStore(f"{store / chunk}: its record ({store / record}) is missing or unreadable") \
                    from None
            if recorded != digests[chunk]:
                raise DamagedStore(f"{store / chunk}: its bytes changed after it was written")
    extra = sorted(set(digests) - expected)
    return extra[0] if extra else None


# -- integrity of finished stores -----------------------------------------------------------------
# When a stage finishes, the size and xxh3 digest of every file of its store go into
# `<stage>.checksums.json` beside the store (seal_store: a chunk this process wrote takes the
# digest recorded as it was written, every other file is hashed); the next stage hashes every
# file of its input store and checks it against that record before reading it (check_store). A
# chunk deleted, truncated, flipped or added after it was written is found there (or at the seal,
# for a chunk an earlier run wrote), and the run stops with one line instead of reading zeros.
#
# The record is one JSON document written and read a line at a time, one file a line, in the order
# store_walk gives (the store's top-level entries by name, each one's files by path): neither the
# seal nor the check holds the entries of every file of a store, which for a model of tens of
# thousands of tensors made the peak grow with their number. Its lines:
#     {"version":2,"files":[
#     ["<relative path>",<size>,"<xxh3>"],
#     ...
#     ]}

CHECKSUMS_HEAD = '{"version":2,"files":['
CHECKSUMS_TAIL = "]}"


def store_files(store: Path) -> list[str]:
    """The files of a store (paths relative to it, sorted), but for temporary `.partial` ones. A
    scandir walk: a store of tens of thousands of arrays has hundreds of thousands of files, and
    rglob's Path objects and stat calls (os.walk's too) made the walk the slowest step of a seal.
    Links to directories are not followed (as Path.rglob), links to files are listed."""
    found, pending = [], [("", str(store))]
    while pending:
        rel, path = pending.pop()
        with os.scandir(path) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    pending.append((f"{rel}{e.name}/", e.path))
                elif not e.name.endswith(".partial") and e.is_file():
                    found.append(rel + e.name)
    found.sort()
    return found


def store_walk(store: str):
    """(top-level entry, its files as paths relative to the store, sorted) of a store, entry by
    entry in name order: the files store_files lists, without a list of them all (only the
    top-level names are held: an array's handful of files at a time). The order of the
    checksum record (walk_order)."""
    with os.scandir(store) as entries:
        names = sorted(e.name for e in entries)
    for name in names:
        path = os.path.join(store, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat_module.S_ISDIR(st.st_mode):
            yield name, [f"{name}/{rel}" for rel in store_files(path)]
        elif not name.endswith(".partial") and os.path.isfile(path):
            yield name, [name]


def walk_order(rel: str) -> tuple[str, str]:
    """The key store_walk's order sorts by."""
    return rel.split("/", 1)[0], rel


def file_digest(path: Path) -> str:
    return sized_digest(path)[1]


def sized_digest(path) -> list:
    """[size, xxh3 digest] of a file (the size of the file opened, not a second stat). Unbuffered:
    a seal and an input check digest every small file of a store, and a buffered reader's set-up
    cost more than the read."""
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 1 << 24:  # sized by its fstat, not a 16 MiB buffer for a few bytes
            h.update(f.readall())
        else:
            while block := f.read(1 << 24):
                h.update(block)
    return [size, h.hexdigest()]


def _chunk_record(rel: str) -> str | None:
    """Where the record of the row-chunk file `rel` is (<array>/c/<index>[/0...] -> <array>/digests/<index>,
    as chunk_path and digest_path lay them out); None for any other file."""
    head, sep, tail = rel.rpartition("/c/")
    index = tail.split("/", 1)[0]
    return f"{head}/{DIGESTS}/{index}" if sep and index.isdigit() else None


def _recent_record(path: str, since_ns: int) -> tuple[list, list] | None:
    """(the record file's own [size, digest], the [size, digest] it records) of a chunk record
    written at or after `since_ns` (time.time_ns()); None for an older or malformed one."""
    import xxhash

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_mtime_ns < since_ns or st.st_size > 256:
            return None
        data = os.read(fd, 257)
    finally:
        os.close(fd)
    try:
        recorded = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not (isinstance(recorded, list) and len(recorded) == 2 and type(recorded[0]) is int
            and isinstance(recorded[1], str)):
        return None
    return [len(data), xxhash.xxh3_64_hexdigest(data)], recorded


def seal_digests(store: Path, files: list[str], since_ns: int | None = None) \
        -> tuple[dict[str, list], set[str], dict[str, bytes]]:
    """({relative path: [size, xxh3 digest]} of `files` of a store (an entry's, from store_walk),
    the chunk files whose entry is their record's, the bytes of the arrays' zarr.json: read once,
    for their digest and their layout). With `since_ns` (when this process started the
    stage, time.time_ns()), a chunk file whose record was written since then is not read again:
    its entry is the digest recorded as it was written (its size checked against the file). Every
    other file is hashed, so a chunk an earlier, interrupted run wrote is compared with its record
    here (chunk_records); a chunk this run wrote and something changed before the seal differs
    from the sealed entry, which the next stage's check of its input (check_store) finds before it
    reads the store."""
    store = str(store)
    present = set(files) if since_ns is not None else ()
    digests, checked, records, texts = {}, set(), {}, {}  # records: the entries of records read for their chunk
    for rel in files:  # sorted: an array's chunk files (c/...) before its records (digests/...)
        path = os.path.join(store, rel)
        if rel.endswith("/zarr.json") and rel.count("/") == 1:
            digests[rel], texts[rel] = _sized_digest_and_bytes(path)
            continue
        if rel in records:
            digests[rel] = records.pop(rel)
            continue
        record = _chunk_record(rel) if since_ns is not None else None
        if record is not None and record in present:
            recent = _recent_record(os.path.join(store, record), since_ns)
            if recent is not None:
                records[record], (size, digest) = recent
                if os.stat(path).st_size == size:
                    digests[rel] = [size, digest]
                    checked.add(rel)
                    continue
        digests[rel] = sized_digest(path)
    return digests, checked, texts


def _sized_digest_and_bytes(path: str) -> tuple[list, bytes]:
    """sized_digest of a small file, and its bytes."""
    import xxhash

    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.readall()
    return [size, xxhash.xxh3_64_hexdigest(data)], data


def seal_store(store: Path, since_ns: int | None, write) -> None:
    """Check a finished store entry by entry (chunk_records) and hand `write(rel, [size, digest])`
    each of its files in store_walk's order; raise DamagedStore naming the first chunk that does
    not match its record, or else the first file the conversion did not write."""
    store = Path(store)
    resolved: dict[str, Path] = {}
    extra = None
    for _, files in store_walk(str(store)):
        digests, checked, texts = seal_digests(store, files, since_ns)
        found = chunk_records(store, digests, checked, resolved, texts)
        extra = extra or found
        for rel in files:
            write(rel, digests[rel])
    if extra:
        raise DamagedStore(f"{store / extra}: not written by the conversion")


def write_checksums(path: Path, store: Path, since_ns: int | None = None) -> None:
    """Seal `store` (seal_store) into its checksum record at `path`, whole or not at all."""
    def make(tmp: str) -> None:
        with create_exclusive(tmp, "w") as f:
            f.write(CHECKSUMS_HEAD)
            sep = "\n"

            def write(rel: str, entry: list) -> None:
                nonlocal sep
                f.write(sep + _ENCODE_ENTRY([rel, *entry]))
                sep = ",\n"

            seal_store(store, since_ns, write)
            f.write(f"\n{CHECKSUMS_TAIL}\n")
            f.flush()
            os.fsync(f.fileno())

    write_whole(path, make, suffix=".tmp")


_ENCODE_ENTRY = json.JSONEncoder(separators=(",", ":")).encode  # made once, not by each json.dumps
_DECODE_ENTRY = json.JSONDecoder().raw_decode


def read_checksums(path: Path):
    """The entries (relative path, size, digest) of a checksum record, as they are read; ValueError
    (or OSError, UnicodeDecodeError) for a record that is not one the seal writes: not its head or
    tail, an entry of other types, entries out of store_walk's order or repeated."""
    with open(path, encoding="utf-8") as f:
        if f.readline() != CHECKSUMS_HEAD + "\n":
            raise ValueError("not a checksum record")
        previous, ended = None, False
        for line in f:
            if line == CHECKSUMS_TAIL + "\n":
                ended = True
                break
            text = line[:-2] if line.endswith(",\n") else line[:-1] if line.endswith("\n") else line
            entry, end = _DECODE_ENTRY(text)
            if end != len(text) or not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                                        and type(entry[1]) is int and isinstance(entry[2], str)):
                raise ValueError("not a [path, size, digest] entry")
            key = (entry[0].split("/", 1)[0], entry[0])  # walk_order
            if previous is not None and key <= previous:
                raise ValueError("entries out of order")
            previous = key
            yield entry
        if not ended or f.read():
            raise ValueError("cut short, or more after its end")


def check_store(store: Path, recorded, skip=None) -> None:
    """Raise DamagedStore naming the first file that differs from the record: `recorded`, its
    entries (relative path, size, digest) in store_walk's order (read_checksums), compared with the
    store's files as they are walked; `skip(rel)`: entries not to check (and their files not to
    expect)."""
    store = Path(store)
    walk = (rel for _, files in (store_walk(str(store)) if store.is_dir() else ()) for rel in files)
    now = next(walk, None)
    extra = None
    for rel, size, digest in recorded:
        if skip is not None and skip(rel):
            continue
        while now is not None and now != rel and walk_order(now) < walk_order(rel):
            extra = extra or now
            now = next(walk, None)
        if now != rel:
            raise DamagedStore(f"{store / rel}: missing")
        now = next(walk, None)
        found, digest_now = sized_digest(os.path.join(store, rel))
        if found != size:
            raise DamagedStore(f"{store / rel}: {found} bytes, {size} when it was written")
        if digest_now != digest:
            raise DamagedStore(f"{store / rel}: its bytes changed after it was written")
    extra = extra or now
    if extra is not None:
        raise DamagedStore(f"{store / extra}: not written by the conversion")


MAX_SUFFIX = ".abs_max"  # extract.zarr: per-row float32 max |x| beside a float tensor


def largest_values(store, name: str) -> float:
    """max |x| of a float tensor, from the row maxima extract recorded (`store`: its path, or the
    store opened once for every tensor)."""
    group = store if isinstance(store, zarr.Group) else open_store(store, "r")
    maxima = get_array(group, name + MAX_SUFFIX)
    check_recorded(maxima)
    return float(read_rows(maxima, 0, maxima.shape[0]).max(initial=0.0))


def check_recorded(arr: zarr.Array) -> None:
    """Raise DamagedStore naming the first chunk file of `arr` that differs from the record written
    with it. For what is read right after its store is sealed, before the next stage checks that
    store: the seal takes the digests this run recorded as they were written (seal_digests)."""
    for index in range(-(-arr.shape[0] // arr.chunks[0]) if arr.ndim and arr.shape[0] else 0):
        path, record = chunk_path(arr, index), digest_path(arr, index)
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
            now = [path.stat().st_size, file_digest(path)]
        except (OSError, ValueError, UnicodeDecodeError):
            raise DamagedStore(f"{path}: missing, or its record ({record}) is missing or unreadable") from None
        if recorded != now:
            raise DamagedStore(f"{path}: its bytes changed after it was written")
