"""Small helpers over zarr v3 local stores, shared by the stages.

Every array is chunked along rows only, with the same row ranges in every
store, so a task reads and writes whole chunks (no two tasks touch one chunk).
`write_empty_chunks` is on: an all-zero chunk must still appear on disk, because
resume treats a missing chunk as not yet written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import RunDirError
from pipeline.safe_files import create_exclusive
from zarr.codecs import BloscCodec

ARRAY_CONFIG = {"write_empty_chunks": True}
# zarr 3.1's open_array ignores a per-handle config, so set it for the whole process (every
# process that imports this module, dask workers included)
zarr.config.set({"array.write_empty_chunks": True})


def row_ranges(n_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    return [(r, min(r + rows_per_chunk, n_rows)) for r in range(0, n_rows, rows_per_chunk)]


def open_store(path: Path, mode: str = "a") -> zarr.Group:
    return zarr.open_group(str(path), mode=mode, zarr_format=3)


def ensure_array(group: zarr.Group, name: str, shape: tuple[int, ...], rows_per_chunk: int,
                 dtype, attrs: dict, compress: bool = False) -> zarr.Array:
    """Open `name` if it exists with this layout (resume), else create it."""
    chunks = (rows_per_chunk, *shape[1:])
    if name in group:
        arr = group[name]
        if isinstance(arr, zarr.Array) and arr.shape == tuple(shape) and arr.chunks == chunks \
                and arr.dtype == np.dtype(dtype):
            arr.attrs.update(attrs)
            return arr
        remove_tree(Path(str(group.store_path.store.root)) / group.path / name)
    compressors = (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),) if compress else None
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, attributes=attrs,
                              compressors=compressors, fill_value=0, config=ARRAY_CONFIG)


def array_path(store: Path, name: str) -> str:
    return str(Path(store) / name)


def open_array(path: str, mode: str = "r+") -> zarr.Array:
    return zarr.open_array(path, mode=mode, zarr_format=3)


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
    stopped: it is written again."""
    base = Path(str(arr.store_path.store.root)) / arr.path
    root, records = base / "c", base / DIGESTS
    if not root.is_dir() or not records.is_dir():
        return set()
    recorded = {int(p.name) for p in records.iterdir() if p.name.isdigit()}
    if arr.ndim == 1:
        return {int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_file()} & recorded
    return {int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "0").is_file()} & recorded


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
    key = arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))
    return Path(str(arr.store_path.store.root)) / arr.path / key


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
    tmp = target.with_name(target.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as fin, create_exclusive(tmp) as fout:
            size = os.fstat(fin.fileno()).st_size
            done = 0
            while done < size:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done, done, done)
                if n == 0:
                    break
                done += n
            if done < size:  # copy_file_range unsupported here: plain copy
                fin.seek(done)
                fout.seek(done)
                shutil.copyfileobj(fin, fout)
    os.replace(tmp, target)
    record_chunk(dst, index)


def read_rows(arr: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of an array. A raw array's chunk files are read directly (one
    pread per chunk, about five times faster than zarr's read path); others through zarr.
    A chunk file that is missing or short means a damaged store, not zeros."""
    if not is_raw(arr):
        return arr[start:stop]
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
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DamagedStore(f"{path}: chunk file missing") from None
        try:
            got = os.preadv(fd, [view[done:done + nbytes]], (r0 - c0) * row_bytes)
        finally:
            os.close(fd)
        if got != nbytes:
            raise DamagedStore(f"{path}: chunk file is short ({got} of {nbytes} bytes)")
        done += nbytes
    return out


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
    return Path(str(arr.store_path.store.root)) / arr.path / DIGESTS / str(index)


def record_chunk(arr: zarr.Array, index: int) -> None:
    """Record row-chunk `index` of `arr` as just written: [size, xxh3 digest] of its chunk file."""
    path = chunk_path(arr, index)
    record = digest_path(arr, index)
    record.parent.mkdir(exist_ok=True)
    tmp = record.with_name(record.name + ".partial")
    with create_exclusive(tmp, "w") as f:  # never through a link planted at the name
        f.write(json.dumps([path.stat().st_size, file_digest(path)]))
    os.replace(tmp, record)


def write_rows(path: str, start: int, stop: int, data: np.ndarray) -> None:
    """Rows [start, stop) of the array at `path` (whole chunks) = `data`, each chunk recorded."""
    arr = open_array(path)
    arr[start:stop] = data
    rows_per_chunk = arr.chunks[0]
    for index in range(start // rows_per_chunk, -(-stop // rows_per_chunk)):
        record_chunk(arr, index)


def chunk_records(store: Path, digests: dict[str, list]) -> None:
    """Check a store's chunks against the records written with them, before it is sealed.

    `digests`: {relative path: [size, digest]} of every file of the store now. Every row chunk of
    every array must be on disk and match its record, and nothing else may be there but zarr's
    metadata. Raises DamagedStore naming the first chunk file that does not."""
    store = Path(store)
    expected = {"zarr.json"}
    for _name, arr in open_store(store, "r").arrays():
        base = Path(arr.path)
        expected.add(str(base / "zarr.json"))
        for index in range(-(-arr.shape[0] // arr.chunks[0]) if arr.ndim else 1):
            chunk = str(chunk_path(arr, index).relative_to(store))
            record = str(digest_path(arr, index).relative_to(store))
            expected |= {chunk, record}
            if chunk not in digests:
                raise DamagedStore(f"{store / chunk}: missing")
            try:
                recorded = json.loads((store / record).read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError):
                raise DamagedStore(f"{store / chunk}: its record ({store / record}) is missing or unreadable") \
                    from None
            if recorded != digests[chunk]:
                raise DamagedStore(f"{store / chunk}: its bytes changed after it was written")
    extra = sorted(set(digests) - expected)
    if extra:
        raise DamagedStore(f"{store / extra[0]}: not written by the conversion")


# -- integrity of finished stores -----------------------------------------------------------------
# When a stage finishes, every file of its store is hashed (xxh3, at memory speed) into
# `<stage>.checksums.json` beside the store; the next stage checks its input store against
# that record before reading it. A chunk deleted, truncated, flipped or added after the
# stage finished is found there, and the run stops with one line instead of reading zeros.

def store_files(store: Path) -> list[Path]:
    return sorted(p for p in Path(store).rglob("*") if p.is_file() and not p.name.endswith(".partial"))


def file_digest(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def store_digests(store: Path) -> dict[str, list]:
    """{relative path: [size, xxh3 digest]} of every file of a store."""
    store = Path(store)
    return {str(p.relative_to(store)): [p.stat().st_size, file_digest(p)] for p in store_files(store)}


def check_store(store: Path, recorded: dict[str, list]) -> None:
    """Raise DamagedStore naming the first file that differs from the record."""
    store = Path(store)
    present = {str(p.relative_to(store)): p for p in store_files(store)} if store.is_dir() else {}
    for rel, (size, digest) in recorded.items():
        p = present.get(rel)
        if p is None:
            raise DamagedStore(f"{store / rel}: missing")
        if p.stat().st_size != size:
            raise DamagedStore(f"{store / rel}: {p.stat().st_size} bytes, {size} when it was written")
        if file_digest(p) != digest:
            raise DamagedStore(f"{store / rel}: its bytes changed after it was written")
    extra = sorted(set(present) - set(recorded))
    if extra:
        raise DamagedStore(f"{store / extra[0]}: not written by the conversion")
