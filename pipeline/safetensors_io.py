"""Row-range reads from safetensors files, without loading or mapping whole tensors.

The format: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. Reading a row range is
one `os.pread`; bf16 is kept as its uint16 bit pattern (numpy has no bfloat16).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import struct
from pathlib import Path

import numpy as np

from pipeline import portable, remote
from pipeline.errors import CheckpointError
from pipeline.remote import RemoteFile

# safetensors dtype name -> numpy dtype used to hold its bytes
NUMPY_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
}
MAX_HEADER = 100 * 1024**2
# Parsing a JSON header and keeping its entries takes about 12x its size in memory: a
# conversion reads at most 1/HEADER_MEMORY_SHARE of its --memory-limit of headers in all.
HEADER_MEMORY_SHARE = 32


def header_budget(memory_limit: int) -> int:
    """Bytes of safetensors headers a conversion under `memory_limit` may parse, over all shards."""
    return min(MAX_HEADER, memory_limit // HEADER_MEMORY_SHARE)


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """Where one tensor's bytes are, and how to read a range of its rows."""
    name: str
    file: Path | RemoteFile  # a local file, or one read by byte range where it lives (pipeline/remote.py)
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in `file`

    @property
    def np_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.dtype]

    @property
    def row_elems(self) -> int:
        return math.prod(self.shape[1:])

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a fresh array of the source representation."""
        itemsize = self.np_dtype.itemsize
        nbytes = (stop - start) * self.row_elems * itemsize
        buf = pread_exact(self.file, self.offset + start * self.row_elems * itemsize, nbytes,
                          f"{self.file}: file ends inside tensor {self.name}; the download is truncated")
        arr = np.frombuffer(buf, dtype=self.np_dtype)
        return arr.reshape((stop - start, *self.shape[1:]))


def pread_exact(path: Path, offset: int, nbytes: int, truncated_message: str) -> bytearray:
    """Exactly `nbytes` from `offset` with plain reads (no mmap, so no file pages in our RSS), or
    by range requests from a remote file."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    if isinstance(path, RemoteFile):
        if offset + nbytes > path.size:
            raise CheckpointError(truncated_message)
        remote.read_into(path.url, offset, view, path.version)
        return buf
    fd = portable.open_read(path)
    try:
        done = 0
        while done < nbytes:
            n = portable.read_into(fd, view[done:], offset + done)
            if n == 0:
                raise CheckpointError(truncated_message)
            done += n
    finally:
        os.close(fd)
    return buf


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class DuplicateKey(ValueError):
    """A JSON object names one key twice (json.loads would silently keep the last)."""


def _unique_keys(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def read_header(path: Path, max_bytes: int = MAX_HEADER) -> dict[str, TensorSource]:
    """Parse and check one safetensors file's header against the file size.

    Every field is checked as data before it is used: a header is a JSON object of
    {dtype: str, shape: [int >= 0], data_offsets: [int, int]} entries whose byte ranges
    match their shapes, lie inside the file and do not overlap.
    """
    if isinstance(path, RemoteFile):
        size, n, raw = _remote_header(path, max_bytes)
    else:
        size, n, raw = _local_header(path, max_bytes)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except DuplicateKey as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({str(e)[:80]!r} is listed twice)") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a valid JSON object)") from None

    data_start = 8 + n
    tensors = {}
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        bad = f"{path}: corrupt safetensors header entry for {name!r:.80}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{bad} (not an object)")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_is_count(d) for d in shape) \
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise CheckpointError(f"{bad} (dtype, shape and data_offsets must be a name, a list of sizes and "
                                  "two byte offsets)")
        if dtype not in NUMPY_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype!r:.40}")
        shape = tuple(shape)
        begin, end = offsets
        if end - begin != math.prod(shape) * NUMPY_DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path}: tensor {name}: byte range {begin}..{end} does not match shape "
                                  f"{list(shape)} {dtype}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: file is truncated: tensor {name} ends at byte {data_start + end}, "
                                  f"file has {size}; download it again")
        tensors[name] = TensorSource(name, path, dtype, shape, data_start + begin)
        if end > begin:
            ranges.append((begin, end, name))
    ranges.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(ranges, ranges[1:]):
        if begin < prev_end:
            raise CheckpointError(f"{path}: tensors {prev} and {name} overlap in the file (corrupt header); "
                                  "download it again")
    return tensors


def _check_header_length(path, head: bytes, size: int, max_bytes: int) -> int:
    if len(head) < 8:
        raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
    if n > max_bytes:
        raise CheckpointError(f"{path}: its safetensors header is {n} bytes, more than the {max_bytes} "
                              "this --memory-limit leaves for reading headers; raise --memory-limit")
    return n


def _local_header(path: Path, max_bytes: int) -> tuple[int, int, bytes]:
    """(file size, header length, header bytes) of a local safetensors file."""
    require_regular_file(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = _check_header_length(path, f.read(8), size, max_bytes)
            return size, n, f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def _remote_header(file: RemoteFile, max_bytes: int) -> tuple[int, int, bytes]:
    """The same of a remote file: two range requests, the length and then the header."""
    head = pread_exact(file, 0, min(8, file.size), "") if file.size else b""
    n = _check_header_length(file, bytes(head), file.size, max_bytes)
    return file.size, n, bytes(pread_exact(file, 8, n, f"{file}: shorter than its header; it changed on the server"))


def require_regular_file(path: Path) -> None:
    """Refuse a FIFO, device or socket where a file is expected (opening a FIFO would hang)."""
    try:
        st = path.stat()
    except OSError:
        return  # missing: the caller says what is missing
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file; replace it with the checkpoint's file")


def _header_length(path: Path | RemoteFile) -> int:
    if isinstance(path, RemoteFile):
        return 8 + int.from_bytes(pread_exact(path, 0, 8, ""), "little")
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def index_checkpoint(model_dir: Path, max_header_bytes: int = MAX_HEADER) -> dict[str, TensorSource]:
    """All tensors of a checkpoint: one model.safetensors, or shards listed in the index.
    `max_header_bytes`: the headers' total size allowed (see header_budget)."""
    index_path = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    where = remote.source_of(model_dir)  # a remote checkpoint: its weight files stay on the server

    def weight_file(fname: str) -> Path | RemoteFile:
        return where.weight_file(fname) if where else model_dir / fname

    def is_weight_file(fname: str) -> bool:
        return where.has(fname) if where else (model_dir / fname).is_file()

    for path in (index_path, single):
        refuse_dangling_link(path)
    if index_path.is_file():
        require_regular_file(index_path)
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (no weight_map)") from None
        except OSError as e:
            raise CheckpointError(f"{index_path}: cannot read ({e.strerror})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
        for fname in set(weight_map.values()):
            parts = Path(fname).parts
            if not parts or Path(fname).is_absolute() or ".." in parts:
                raise CheckpointError(f"{index_path}: shard name {fname!r:.80} must be a file inside the checkpoint")
        tensors: dict[str, TensorSource] = {}
        for fname in sorted(set(weight_map.values())):
            if where is None:
                refuse_dangling_link(model_dir / fname)
            if not is_weight_file(fname):
                raise CheckpointError(f"{weight_file(fname) if where is None else where.root + '/' + fname}: shard "
                                      f"listed in {index_path.name} is missing")
            shard = weight_file(fname)
            for name, src in read_header(shard, max_header_bytes).items():
                if name in tensors:
                    raise CheckpointError(f"{shard}: tensor {name} is also in {tensors[name].file.name}; a tensor "
                                          "must be in one shard only (corrupt checkpoint)")
                tensors[name] = src
            max_header_bytes -= _header_length(shard)
        wrong = [name for name, fname in weight_map.items()
                 if name not in tensors or tensors[name].file != weight_file(fname)]
        if wrong:
            name = wrong[0]
            raise CheckpointError(f"{index_path}: lists {name} in {weight_map[name]}, but that shard does not "
                                  "contain it")
        return tensors
    if is_weight_file(single.name):
        return read_header(weight_file(single.name), max_header_bytes)
    others = where.safetensors_names() if where else sorted(p.name for p in model_dir.glob("*.safetensors"))
    if len(others) == 1:
        return read_header(weight_file(others[0]), max_header_bytes)
    raise CheckpointError(f"{remote.label(model_dir)}: no model.safetensors or model.safetensors.index.json "
                          "(only safetensors checkpoints are supported)")


def refuse_dangling_link(path: Path) -> None:
    """A Hugging Face cache snapshot links its files into blobs/; a missing blob is an incomplete download."""
    try:
        dangling = path.is_symlink() and not path.exists()
        if not dangling:
            os.stat(path)
    except FileNotFoundError:
        return  # the caller says what is missing
    except OSError as e:  # a directory on the way that cannot be searched, a link loop
        raise CheckpointError(f"{path}: cannot reach this file ({e.strerror}); check the permissions of the "
                              "directories on its path") from None
    if dangling:
        raise CheckpointError(f"{path}: links to {os.readlink(path)}, which does not exist; "
                              "the download is incomplete: download the model again")


def files_fingerprint(model_dir: Path, files) -> list[list]:
    """Identity of every weight file the conversion reads: name (relative to the checkpoint,
    shards in subdirectories included), size, mtime, ctime and inode, read through symlinks.
    ctime changes on any rewrite, even one that restores size and mtime."""
    out = []
    remote_files = sorted({f for f in files if isinstance(f, RemoteFile)}, key=str)
    for p in sorted(set(Path(f) for f in files if not isinstance(f, RemoteFile))):
        st = p.stat()
        try:
            name = str(p.relative_to(model_dir))
        except ValueError:
            name = str(p)
        out.append([name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return out + [[f.url, *f.identity()] for f in remote_files]


def fingerprint_changes(model_dir: Path, fingerprint: list) -> tuple[str, str] | None:
    """None when every local file of a `files_fingerprint` record is as recorded; else ("gone" or
    "changed", the first such file)."""
    for name, *identity in fingerprint:
        if remote.is_url(name):
            continue  # remote.fingerprint_changes asks the servers
        p = Path(name) if Path(name).is_absolute() else Path(model_dir) / name
        try:
            st = p.stat()
        except OSError:
            return "gone", str(p)
        if [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] != identity:
            return "changed", str(p)
    return None


def as_float32(block: np.ndarray, dtype: str) -> np.ndarray:
    """A block in its source representation -> float32 values (bf16 is uint16 bits)."""
    if dtype == "BF16":  # the bits in the top half of a float32, shifted straight into a uint32 array
        out = np.empty(np.shape(block), dtype=np.uint32)  # (3.5x faster than astype(uint32) << 16)
        np.left_shift(block, 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    return block.astype(np.float32, copy=False)
