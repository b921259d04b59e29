"""The GGUF container, written and read by our own small code: any tensor type id, split sets.

The `gguf` package cannot write or read bitnet.cpp's I2_S (type 36), so the container is
done here; the bytes are the ones `gguf.GGUFWriter` writes for the same key/values and tensors
(the tests compare them). GGUF v3, little-endian:

    "GGUF"  u32 version = 3  u64 n_tensors  u64 n_kv
    n_kv x      string key, u32 value type, value
    n_tensors x string name, u32 n_dims, u64 ne[n_dims] (ne[0] innermost), u32 ggml type, u64 offset
    zero padding to the alignment (`general.alignment`, default 32)
    tensor data, each tensor padded to the alignment; offsets count from the data start

A string is a u64 byte length and UTF-8 bytes; an array is a u32 item type, a u64 count and
the items. llama.cpp reads no nested arrays, tensor names of 64 bytes or more, more than 4
dimensions, duplicate keys or names, or offsets other than the running padded sum, so the
writer refuses to produce them and the reader refuses files that have them.

Split sets follow llama.cpp's gguf-split convention as gguf-py's `GGUFWriter` writes it: parts
`NAME-00001-of-0000N.gguf`; every part carries `split.no` (u16, from 0), `split.count` (u16)
and `split.tensors.count` (i32, tensors in the whole set) after its other keys; only the first
part carries the model's key/values.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType

from pipeline import portable
from pipeline.codecs import I2_S, I2_S_ARM, I2_S_TAIL, IK_CODECS, Q1_0, Q2_0, TL1, TL2
from pipeline.errors import GGUFFormatError
from pipeline.safe_files import create_exclusive, open_no_link

VT = GGUFValueType
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
READABLE_VERSIONS = (2, 3)          # v2 has the same layout; v1 (32-bit counts) is gone everywhere
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
ARCHITECTURE_KEY = "general.architecture"
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = "split.no", "split.count", "split.tensors.count"
MAX_NAME_BYTES = 63                 # llama.cpp: GGML_MAX_NAME (64) including the NUL
MAX_DIMS = 4                        # GGML_MAX_DIMS
MAX_SPLITS = 0xFFFF                 # split.count is a u16
INT64_MAX = 2**63 - 1

SCALAR_FORMATS: dict[GGUFValueType, str] = {
    VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
    VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d",
}
STRING_HEAD = 8                     # u64 length before every string
MIN_KV_BYTES = STRING_HEAD + 4 + 1  # empty key, type, one-byte value
MIN_TENSOR_INFO_BYTES = STRING_HEAD + 4 + 4 + 8


class GGUFWriterError(RuntimeError):
    """The writer was used wrongly (a bug in the caller, not a user error)."""


# -- tensor sizes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TypeSize:
    """How many bytes a tensor of one ggml type takes: whole blocks along ne[0], then a tail."""

    block_size: int   # values per block
    type_size: int    # bytes per block
    tail: int = 0     # bytes after the last block, once per tensor (I2_S: scale + 28 unused)
    row_meta: int = 0  # bytes before each row's blocks (ik_llama.cpp's IQ*_BN: the row's scale)

    def nbytes(self, shape: Sequence[int]) -> int:
        """Bytes of a tensor of this type; shape in numpy order (the last axis is ne[0])."""
        n = math.prod(shape)
        row = shape[-1] if shape else 1
        if row % self.block_size:
            raise ValueError(f"rows of {row} values are not whole blocks of {self.block_size}")
        rows = n // row if row else 0
        return rows * self.row_meta + n // self.block_size * self.type_size + self.tail


@dataclass(frozen=True)
class ShapeSize:
    """A type whose size is a function of the whole (m, k) shape (bitnet.cpp's TL1 / TL2)."""

    size_of: Any      # (rows, cols) -> bytes

    def nbytes(self, shape: Sequence[int]) -> int:
        if len(shape) != 2:
            raise ValueError(f"a lookup-table tensor is 2-D, not of shape {tuple(shape)}")
        return self.size_of(tuple(shape))


def default_type_sizes() -> dict[int, TypeSize]:
    """gguf-py's GGML_QUANT_SIZES plus bitnet.cpp's I2_S (n/4 bytes of codes, then 32; rows of
    whole 64-value blocks, the smaller of its x86 and ARM blocks) and TL1 (payload, then the
    32-byte scale slot); ids 36 and 38 are retired upstream."""
    sizes = {int(t): TypeSize(block, size) for t, (block, size) in GGML_QUANT_SIZES.items()}
    sizes[I2_S.ggml_type] = TypeSize(I2_S_ARM.block_size, I2_S_ARM.type_size, I2_S_TAIL)
    sizes[TL1.ggml_type] = ShapeSize(TL1.file_nbytes)
    # upstream llama.cpp's Q2_0, which older gguf packages do not list
    sizes.setdefault(Q2_0.ggml_type, TypeSize(Q2_0.block_size, Q2_0.type_size))
    sizes.setdefault(Q1_0.ggml_type, TypeSize(Q1_0.block_size, Q1_0.type_size))  # gguf 0.19 knows it; older do not
    # ik_llama.cpp's IQ1_BN / IQ2_BN / IQ2_BN_R4 (ids 134, 135, 335), which gguf-py does not list: a
    # row is its meta (the row's scale) then whole blocks; R4's groups of 4 rows are 4 rows' bytes
    for codec in IK_CODECS.values():
        sizes[int(codec.ggml_type)] = TypeSize(codec.block_size, codec.type_size, row_meta=codec.row_meta_size)
    return sizes


TYPE_SIZES: Mapping[int, TypeSize] = default_type_sizes()
# bitnet.cpp's TL2 is type 39, which upstream ggml gives to MXFP4: a file of ours that holds TL2
# tensors says so with this key (its kernel tiles), and is sized with TL2_TYPE_SIZES
TL_TILES_KEY = "bitnet_gguf.kernel_tiles"
TL2_TYPE_SIZES: Mapping[int, TypeSize] = {**TYPE_SIZES, TL2.ggml_type: ShapeSize(TL2.file_nbytes)}


def type_sizes_for(kvs: Iterable[KV]) -> Mapping[int, TypeSize]:
    """The type sizes a file with these key/values uses (TL2's for type 39 in a TL file of ours)."""
    return TL2_TYPE_SIZES if any(kv.key == TL_TILES_KEY for kv in kvs) else TYPE_SIZES


def align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# -- key/values ----------------------------------------------------------------------------------

class KV(NamedTuple):
    """One key/value; `sub_type` is the item type of an ARRAY (None: inferred like GGUFWriter)."""

    key: str
    type: GGUFValueType
    value: Any
    sub_type: GGUFValueType | None = None


def _value_type(t) -> GGUFValueType | None:
    if t is None:
        return None
    return VT[t] if isinstance(t, str) else VT(t)


def as_kv(record: KV | Mapping[str, Any]) -> KV:
    """A KV from a metadata record {"key", "type", "sub_type", "value"} (type names as strings)."""
    if isinstance(record, KV):
        return record
    return KV(record["key"], _value_type(record["type"]), record["value"], _value_type(record.get("sub_type")))


def model_kvs(arch: str, records: Iterable[KV | Mapping[str, Any]]) -> list[KV]:
    """`general.architecture` first (where GGUFWriter puts it), then the records in their order."""
    kvs = [as_kv(r) for r in records]
    for kv in kvs:
        if kv.key == ARCHITECTURE_KEY and kv.value != arch:
            raise GGUFWriterError(f"records name architecture {kv.value!r}, writer was given {arch!r}")
    return [KV(ARCHITECTURE_KEY, VT.STRING, arch)] + [kv for kv in kvs if kv.key != ARCHITECTURE_KEY]


def alignment_of(kvs: Iterable[KV]) -> int:
    """The data alignment the key/values declare (llama.cpp: a u32 power of two, default 32)."""
    for kv in kvs:
        if kv.key == ALIGNMENT_KEY:
            if kv.type != VT.UINT32 or isinstance(kv.value, bool) or not isinstance(kv.value, int) \
                    or kv.value <= 0 or kv.value & (kv.value - 1):
                raise GGUFWriterError(f"{ALIGNMENT_KEY} must be a UINT32 power of two, got {kv.type.name} {kv.value!r}")
            return kv.value
    return DEFAULT_ALIGNMENT


FLOAT32_MIN_NORMAL = 2.0 ** -126  # 1.18e-38: below it a float32 keeps only a few bits, then none
_INT_RANGES = {VT.UINT8: (0, 2**8), VT.INT8: (-2**7, 2**7), VT.UINT16: (0, 2**16), VT.INT16: (-2**15, 2**15),
               VT.UINT32: (0, 2**32), VT.INT32: (-2**31, 2**31), VT.UINT64: (0, 2**64), VT.INT64: (-2**63, 2**63)}


def _is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return _is_whole(value) or isinstance(value, (float, np.floating))


def float32_problem(value) -> str | None:
    """Why a GGUF FLOAT32 cannot hold `value` as the number it is (None: it can): not a number,
    or rounded to infinity, to zero, or to a subnormal that keeps only a few of its bits."""
    if not _is_number(value):
        return "is not a number"
    try:
        held = struct.unpack("<f", struct.pack("<f", float(value)))[0]
    except OverflowError:
        return "is beyond float32's largest value (3.4e38)"
    if math.isnan(held):
        return "is not a number (NaN)"
    if math.isinf(held):
        return "is infinite"
    if value and abs(held) < FLOAT32_MIN_NORMAL:
        return ("is below float32's smallest normal value (1.2e-38): the file would hold " +
                ("0" if held == 0 else "a subnormal number, a few bits of it"))
    return None


def _scalar_problem(vtype: GGUFValueType, value) -> str | None:
    if vtype in _INT_RANGES:
        lo, hi = _INT_RANGES[vtype]
        if not _is_whole(value):
            return "is not a whole number"
        return None if lo <= int(value) < hi else f"is outside {vtype.name}'s range ({lo} to {hi - 1})"
    if vtype == VT.FLOAT32:
        return float32_problem(value)
    if vtype == VT.FLOAT64:
        ok = _is_number(value) and math.isfinite(float(value))
        return None if ok else "is not a finite number"
    if vtype == VT.BOOL:
        return None if isinstance(value, (bool, np.bool_)) else "is not true or false"
    if vtype == VT.STRING:
        if not isinstance(value, (str, bytes)):
            return "is not a string"
        try:
            value.decode("utf-8") if isinstance(value, bytes) else value.encode("utf-8")
        except UnicodeError:
            return "is not valid UTF-8 text (GGUF strings are UTF-8; readers fail on it)"
        return None
    return f"has value type {vtype.name}, which cannot be an item"


def _first_bad_number(sub_type: GGUFValueType, value) -> int | None:
    """For a long list of numbers (a vocabulary's scores, token types), the index of the first item
    its type cannot hold, found at numpy speed; None when all fit, or when the items are not all
    plain numbers (then each is checked on its own)."""
    if sub_type not in _INT_RANGES and sub_type != VT.FLOAT32 or len(value) < 64:
        return None
    if not isinstance(value, np.ndarray) and any(isinstance(x, bool) for x in value):
        return None  # numpy would take True for 1
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError):
        return None
    if sub_type in _INT_RANGES and arr.dtype.kind in "iu":
        lo, hi = _INT_RANGES[sub_type]
        if int(arr.min()) >= lo and int(arr.max()) < hi:
            return len(value)
        bad = [not lo <= int(x) < hi for x in arr]
        return bad.index(True)
    elif sub_type == VT.FLOAT32 and arr.dtype.kind in "iuf":
        wide = arr.astype(np.float64)
        with np.errstate(over="ignore"):
            held = wide.astype(np.float32)
        bad = ~np.isfinite(held) | ((wide != 0) & (np.abs(held) < FLOAT32_MIN_NORMAL))
    else:
        return None
    return int(np.argmax(bad)) if bad.any() else len(value)  # len: all fit, nothing to check item by item


def value_problem(vtype: GGUFValueType, value, sub_type: GGUFValueType | None = None) -> str | None:
    """Why `value` is not a value of GGUF type `vtype` that reads back as itself (None: it is).
    Every key/value the converter decides passes this before anything is written: a value of
    another type would be packed into garbage bytes (a number as NUL bytes, a string's letters
    as an array), or fail after the conversion's work."""
    if vtype != VT.ARRAY:
        return _scalar_problem(vtype, value)
    if not isinstance(value, (list, tuple, np.ndarray)):
        return "is not a list"
    if sub_type is None:
        if not len(value):
            return "is an empty list without an item type"
        sub_type = VT.get_type(value[0])
    if sub_type == VT.ARRAY:
        return "is a list of lists (llama.cpp reads no nested arrays)"
    if sub_type == VT.STRING and all(type(x) is str for x in value):
        try:  # a vocabulary's tokens and merges: one encoding of them all, item by item only on failure
            "".join(value).encode("utf-8")
            return None
        except UnicodeEncodeError:
            pass
    first_bad = _first_bad_number(sub_type, value)
    if first_bad == len(value):
        return None
    items = enumerate(value) if first_bad is None else [(first_bad, value[first_bad])]
    for i, item in items:
        problem = _scalar_problem(sub_type, item)
        if problem:
            return f"item {i} ({str(item)[:40]!r}) {problem}"
    return None


def encode_string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(raw)) + raw


def _item_type(kv: KV) -> GGUFValueType:
    """An array's item type: given, else what GGUFWriter infers (bytes -> UINT8, else the first item)."""
    if kv.sub_type is not None:
        return kv.sub_type
    if isinstance(kv.value, (bytes, bytearray)):
        return VT.UINT8
    if len(kv.value) == 0:
        raise GGUFWriterError(f"key {kv.key}: an empty array needs its item type")
    first = VT.get_type(kv.value[0])
    if any(VT.get_type(v) is not first for v in kv.value[1:]):
        raise GGUFWriterError(f"key {kv.key}: array items are not all of one type")
    return first


def array_item_type(kv: KV) -> GGUFValueType:
    """The item type an ARRAY key/value is written with (given, or inferred as GGUFWriter does)."""
    return _item_type(kv)


def encode_value(kv: KV) -> bytes:
    """The value type and value of one key, as GGUFWriter packs them."""
    vtype, value = kv.type, kv.value
    head = struct.pack("<I", vtype)
    if vtype in SCALAR_FORMATS:
        return head + struct.pack("<" + SCALAR_FORMATS[vtype], value)
    if vtype == VT.STRING:
        return head + encode_string(value)
    if vtype != VT.ARRAY:
        raise GGUFWriterError(f"key {kv.key}: unknown value type {vtype!r}")
    items = list(value)
    sub = _item_type(kv)
    head += struct.pack("<IQ", sub, len(items))
    if sub in SCALAR_FORMATS:
        return head + struct.pack(f"<{len(items)}{SCALAR_FORMATS[sub]}", *items)
    if sub == VT.STRING:
        return head + b"".join(encode_string(s) for s in items)
    raise GGUFWriterError(f"key {kv.key}: arrays of {sub.name} cannot be read by llama.cpp")


def encode_kv(kv: KV) -> bytes:
    try:
        return encode_string(kv.key) + encode_value(kv)
    except (struct.error, OverflowError, TypeError, ValueError, AttributeError) as e:
        raise GGUFWriterError(f"key {kv.key}: cannot encode {kv.type.name} value: {e}") from e


def check_kvs(kvs: Sequence[KV]) -> None:
    seen = set()
    for kv in kvs:
        if not kv.key:
            raise GGUFWriterError("a key is empty")
        if kv.key in seen:
            raise GGUFWriterError(f"duplicate key {kv.key}")
        seen.add(kv.key)


# -- tensor infos --------------------------------------------------------------------------------

class TensorInfo(NamedTuple):
    """A tensor to write: shape in numpy order (rows first); nbytes of its data, unpadded."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    nbytes: int


def check_tensors(tensors: Sequence[TensorInfo], type_sizes: Mapping[int, TypeSize]) -> None:
    """What llama.cpp would refuse, and sizes that disagree with the type registry."""
    seen = set()
    for t in tensors:
        if len(t.name.encode("utf-8")) > MAX_NAME_BYTES or not t.name:
            raise GGUFWriterError(f"tensor name {t.name!r} is empty or longer than {MAX_NAME_BYTES} bytes")
        if t.name in seen:
            raise GGUFWriterError(f"duplicate tensor name {t.name}")
        seen.add(t.name)
        if len(t.shape) > MAX_DIMS or any(d < 0 for d in t.shape) or math.prod(t.shape) > INT64_MAX:
            raise GGUFWriterError(f"tensor {t.name}: shape {tuple(t.shape)} cannot be written")
        if t.nbytes < 0:
            raise GGUFWriterError(f"tensor {t.name}: negative nbytes")
        size = type_sizes.get(t.ggml_type)
        if size is not None:
            try:
                expected = size.nbytes(t.shape)
            except ValueError as e:
                raise GGUFWriterError(f"tensor {t.name} (type {t.ggml_type}): {e}") from e
            if expected != t.nbytes:
                raise GGUFWriterError(f"tensor {t.name} (type {t.ggml_type}, shape {tuple(t.shape)}) "
                                      f"takes {expected} bytes, not {t.nbytes}")


def data_offsets(tensors: Sequence[TensorInfo], alignment: int) -> list[int]:
    """Each tensor's offset from the data start: the running sum of padded sizes."""
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at += align(t.nbytes, alignment)
    return offsets


def encode_tensor_info(t: TensorInfo, offset: int) -> bytes:
    dims = tuple(reversed(t.shape))
    return (encode_string(t.name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
            + struct.pack("<IQ", t.ggml_type, offset))


def header_bytes(kvs: Sequence[KV], tensors: Sequence[TensorInfo], alignment: int) -> bytes:
    """Everything before the data, without the padding that aligns the data start."""
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs))]
    parts += [encode_kv(kv) for kv in kvs]
    parts += [encode_tensor_info(t, off) for t, off in zip(tensors, data_offsets(tensors, alignment))]
    return b"".join(parts)


def file_size(kvs: Sequence[KV], tensors: Sequence[TensorInfo], alignment: int | None = None) -> int:
    """The size of the file GGUFFileWriter writes for these key/values and tensors."""
    kvs = [as_kv(r) for r in kvs]
    alignment = alignment or alignment_of(kvs)
    return align(len(header_bytes(kvs, tensors, alignment)), alignment) \
        + sum(align(t.nbytes, alignment) for t in tensors)


# -- the streaming writer ------------------------------------------------------------------------

def _nbytes(chunk) -> tuple[Any, int]:
    if isinstance(chunk, np.ndarray):
        chunk = np.ascontiguousarray(chunk)
    view = memoryview(chunk)
    return chunk, view.nbytes


class GGUFFileWriter:
    """One GGUF file written front to back: header, then each tensor's data in chunks, in order.

        with GGUFFileWriter(path, kvs, tensors) as w:
            w.write_header()
            for i, t in enumerate(tensors):
                for chunk in chunks_of(t):
                    w.write_tensor_data(i, chunk)
                w.end_tensor()

    `close()` (or leaving the `with` block normally) checks every tensor was written, then
    flushes and fsyncs. Leaving the block on an exception only closes the file.
    """

    def __init__(self, path, kvs: Iterable[KV | Mapping[str, Any]], tensors: Sequence[TensorInfo],
                 alignment: int | None = None, type_sizes: Mapping[int, TypeSize] | None = None):
        self.path = Path(path)
        self.kvs = [as_kv(r) for r in kvs]
        type_sizes = type_sizes_for(self.kvs) if type_sizes is None else type_sizes
        self.tensors = [TensorInfo(t.name, tuple(int(d) for d in t.shape), int(t.ggml_type), int(t.nbytes))
                        for t in tensors]
        check_kvs(self.kvs)
        self.alignment = alignment_of(self.kvs)
        if alignment is not None and alignment != self.alignment:
            raise GGUFWriterError(f"alignment {alignment} given but the key/values declare {self.alignment}"
                                  f" (set {ALIGNMENT_KEY})")
        check_tensors(self.tensors, type_sizes)
        self.index = {t.name: i for i, t in enumerate(self.tensors)}
        self._file = None
        self._current = 0        # the tensor being written
        self._written = 0        # its bytes so far
        self._closed = False

    def __enter__(self) -> GGUFFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _index(self, which: int | str) -> int:
        if isinstance(which, str):
            if which not in self.index:
                raise GGUFWriterError(f"{self.path}: no tensor named {which}")
            return self.index[which]
        return int(which)

    def _open_file(self):
        if self._file is None:
            raise GGUFWriterError(f"{self.path}: header not written yet" if not self._closed else
                                  f"{self.path}: already closed")
        return self._file

    def write_header(self) -> None:
        if self._file is not None or self._closed:
            raise GGUFWriterError(f"{self.path}: header already written")
        head = header_bytes(self.kvs, self.tensors, self.alignment)
        self._file = create_exclusive(self.path)  # a temporary name: never written through a planted link
        self._file.write(head)
        self._file.write(bytes(align(len(head), self.alignment) - len(head)))

    def length_after(self, tensors: int) -> int:
        """The file's length once its header and the first `tensors` tensors (padded) are written."""
        head = len(header_bytes(self.kvs, self.tensors, self.alignment))
        return align(head, self.alignment) + sum(align(t.nbytes, self.alignment) for t in self.tensors[:tensors])

    def reopen(self, tensors: int, length: int) -> None:
        """Continue the file an earlier writer of the same header began, after its first `tensors`
        complete tensors (`length` bytes, as `sync` returned then): the header is checked, and what
        follows those tensors (a tensor cut short) is cut off."""
        if self._file is not None or self._closed:
            raise GGUFWriterError(f"{self.path}: already open")
        if not 0 <= tensors <= len(self.tensors) or length != self.length_after(tensors):
            raise GGUFWriterError(f"{self.path}: {length} bytes is not where tensor {tensors} ends")
        head = header_bytes(self.kvs, self.tensors, self.alignment)
        f = os.fdopen(open_no_link(self.path, os.O_RDWR), "r+b")
        try:
            if os.fstat(f.fileno()).st_size < length or f.read(len(head)) != head:
                raise GGUFWriterError(f"{self.path}: not the file this conversion began (header or length differ)")
            f.truncate(length)
            f.seek(length)
        except BaseException:
            f.close()
            raise
        self._file, self._current, self._written = f, tensors, 0

    def sync(self) -> int:
        """Flush and fsync what is written; the file's length."""
        f = self._open_file()
        f.flush()
        os.fsync(f.fileno())
        return f.tell()

    def write_tensor_data(self, which: int | str, chunk) -> None:
        """Append bytes (bytes, memoryview, or a numpy array's raw bytes) to the current tensor."""
        f = self._open_file()
        i = self._index(which)
        if i != self._current:
            expected = self.tensors[self._current].name if self._current < len(self.tensors) else "none"
            raise GGUFWriterError(f"{self.path}: data for tensor {i} out of order (writing {expected})")
        chunk, n = _nbytes(chunk)
        t = self.tensors[i]
        if self._written + n > t.nbytes:
            raise GGUFWriterError(f"{self.path}: tensor {t.name} gets more than its {t.nbytes} bytes")
        f.write(chunk)
        self._written += n

    def copy_tensor_data(self, which: int | str, source, offset: int, nbytes: int) -> None:
        """Append `nbytes` of file `source` from `offset` to the current tensor, copied in the
        kernel where the system can (portable.copy_range), else through one buffer."""
        f = self._open_file()
        i = self._index(which)
        if i != self._current:
            raise GGUFWriterError(f"{self.path}: data for tensor {i} out of order")
        t = self.tensors[i]
        if self._written + nbytes > t.nbytes:
            raise GGUFWriterError(f"{self.path}: tensor {t.name} gets more than its {t.nbytes} bytes")
        f.flush()
        pos = f.tell()
        with open(source, "rb") as src:
            done = portable.copy_range(src.fileno(), f.fileno(), nbytes, offset, pos)
        f.seek(pos + done)
        if done != nbytes:
            raise GGUFWriterError(f"{source}: ended after {done} of {nbytes} bytes for tensor {t.name}")
        self._written += nbytes

    def end_tensor(self, which: int | str | None = None) -> None:
        """The current tensor is complete: check its size and pad to the alignment."""
        f = self._open_file()
        if self._current >= len(self.tensors):
            raise GGUFWriterError(f"{self.path}: every tensor is already complete")
        if which is not None and self._index(which) != self._current:
            raise GGUFWriterError(f"{self.path}: end of tensor {which} while writing {self._current}")
        t = self.tensors[self._current]
        if self._written != t.nbytes:
            raise GGUFWriterError(f"{self.path}: tensor {t.name} got {self._written} of its {t.nbytes} bytes")
        f.write(bytes(align(t.nbytes, self.alignment) - t.nbytes))
        self._current += 1
        self._written = 0

    def write_tensor(self, which: int | str, data) -> None:
        self.write_tensor_data(which, data)
        self.end_tensor()

    def close(self) -> None:
        """Check the file is complete, then flush, fsync and close it."""
        if self._closed:
            return
        f = self._open_file()
        try:
            if self._current != len(self.tensors):
                raise GGUFWriterError(f"{self.path}: closed after {self._current} of {len(self.tensors)} tensors")
            f.flush()
            os.fsync(f.fileno())
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file without checks (what is written stays; the caller removes it)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._closed = True


# -- split sets ----------------------------------------------------------------------------------

def plan_split(tensors: Sequence[TensorInfo], max_size: int = 0, max_tensors: int = 0,
               metadata_only_first: bool = False) -> list[list[int]]:
    """Tensor indices per part, in order, as GGUFWriter splits (0 = no limit).

    A part is closed when it already holds `max_tensors` tensors, or when the next tensor would
    take the sum of its tensors' unpadded sizes past `max_size` (headers are not counted); a
    tensor larger than `max_size` goes alone in its part. `metadata_only_first` puts no tensor
    in the first part (gguf-split's --no-tensor-first-split, GGUFWriter's small_first_shard).
    (llama.cpp's gguf-split counts padded sizes and applies one limit at a time.)
    """
    if max_size < 0 or max_tensors < 0:
        raise GGUFWriterError("split limits must not be negative")
    parts: list[list[int]] = [[], []] if metadata_only_first else [[]]
    size = 0
    for i, t in enumerate(tensors):
        last = parts[-1]
        if last and ((max_tensors and len(last) >= max_tensors) or (max_size and size + t.nbytes > max_size)):
            parts.append([])
            size = 0
        parts[-1].append(i)
        size += t.nbytes
    return parts


def split_paths(path, n: int) -> list[Path]:
    """`NAME-00001-of-0000N.gguf` next to `path` (NAME = path without its suffix); one part: path."""
    path = Path(path)
    if not 1 <= n <= MAX_SPLITS:
        raise GGUFWriterError(f"{n} parts: a split set has 1 to {MAX_SPLITS}")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


def part_kvs(kvs: Sequence[KV], part: int, n_parts: int, n_tensors: int) -> list[KV]:
    """The key/values of one part: the model's in the first only, split.* keys last in every part.

    A non-default alignment is repeated in later parts (llama.cpp reads each part's own
    `general.alignment`; GGUFWriter leaves it out there).
    """
    kvs = [as_kv(r) for r in kvs]
    if n_parts == 1:
        return kvs
    own = kvs if part == 0 else [kv for kv in kvs if kv.key == ALIGNMENT_KEY]
    return own + [KV(SPLIT_NO, VT.UINT16, part), KV(SPLIT_COUNT, VT.UINT16, n_parts),
                  KV(SPLIT_TENSORS_COUNT, VT.INT32, n_tensors)]


def check_parts(parts: Sequence[Sequence[int]], n_tensors: int) -> None:
    flat = [i for p in parts for i in p]
    if flat != list(range(n_tensors)) or not parts or any(not p for p in parts[1:]):
        raise GGUFWriterError("split parts must hold every tensor once, in order; only the first may be empty")
    if len(parts) > MAX_SPLITS:
        raise GGUFWriterError(f"{len(parts)} parts: a split set has at most {MAX_SPLITS}")


class GGUFSplitWriter:
    """A split set written like one file: one GGUFFileWriter per part, tensors in global order.

    `paths` are the part files (usually `split_paths(out, len(parts))`), `parts` the tensor
    indices of each part (`plan_split`). With one part this writes a plain file.
    """

    def __init__(self, paths: Sequence, kvs: Iterable[KV | Mapping[str, Any]], tensors: Sequence[TensorInfo],
                 parts: Sequence[Sequence[int]], type_sizes: Mapping[int, TypeSize] | None = None):
        kvs = [as_kv(r) for r in kvs]
        type_sizes = type_sizes_for(kvs) if type_sizes is None else type_sizes  # the same for every part
        tensors = list(tensors)
        check_parts(parts, len(tensors))
        if len(paths) != len(parts):
            raise GGUFWriterError(f"{len(paths)} paths for {len(parts)} parts")
        for kv in kvs:
            if kv.key in (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT):
                raise GGUFWriterError(f"key {kv.key} is written by the split writer")
        self.writers = [GGUFFileWriter(p, part_kvs(kvs, k, len(parts), len(tensors)), [tensors[i] for i in idx],
                                       type_sizes=type_sizes)
                        for k, (p, idx) in enumerate(zip(paths, parts))]
        self.tensors = tensors
        self.index = {t.name: i for i, t in enumerate(tensors)}
        self.where = [(k, j) for k, idx in enumerate(parts) for j in range(len(idx))]
        self._current = 0

    def __enter__(self) -> GGUFSplitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def paths(self) -> list[Path]:
        return [w.path for w in self.writers]

    def _writer(self, which: int | str):
        i = self.index[which] if isinstance(which, str) and which in self.index else which
        if not isinstance(i, int) or i != self._current or i >= len(self.tensors):
            raise GGUFWriterError(f"data for tensor {which} out of order (expected tensor {self._current})")
        k, j = self.where[i]
        return self.writers[k], j

    def write_header(self) -> None:
        for w in self.writers:
            w.write_header()

    def reopen(self, tensors: int, lengths: Sequence[int]) -> None:
        """Continue every part after the first `tensors` tensors (GGUFFileWriter.reopen; `lengths`:
        of each part then, as `sync` returned them)."""
        if len(lengths) != len(self.writers):
            raise GGUFWriterError(f"{len(lengths)} lengths for {len(self.writers)} parts")
        for k, (w, length) in enumerate(zip(self.writers, lengths)):
            w.reopen(sum(1 for part, _ in self.where[:tensors] if part == k), length)
        self._current = tensors

    def sync(self) -> list[int]:
        """Flush and fsync every part; their lengths."""
        return [w.sync() for w in self.writers]

    def write_tensor_data(self, which: int | str, chunk) -> None:
        w, j = self._writer(which)
        w.write_tensor_data(j, chunk)

    def copy_tensor_data(self, which: int | str, source, offset: int, nbytes: int) -> None:
        w, j = self._writer(which)
        w.copy_tensor_data(j, source, offset, nbytes)

    def end_tensor(self, which: int | str | None = None) -> None:
        w, j = self._writer(self._current if which is None else which)
        w.end_tensor(j)
        self._current += 1

    def write_tensor(self, which: int | str, data) -> None:
        self.write_tensor_data(which, data)
        self.end_tensor()

    def close(self) -> None:
        try:
            for w in self.writers:
                w.close()
        finally:
            self.abort()

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


# -- the reader ----------------------------------------------------------------------------------

class ReadTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]     # numpy order (ne reversed)
    ggml_type: int
    offset: int                # absolute, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFContents:
    version: int
    kvs: list[KV]
    tensors: list[ReadTensor]
    alignment: int
    data_start: int
    file_size: int

    def kv(self, key: str, default=None):
        return next((kv.value for kv in self.kvs if kv.key == key), default)


class _Cursor:
    """Bounded reads from a mapped file: every read checks the bytes are there first."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: not a valid GGUF file: {what}; write it again")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return values[0] if len(values) == 1 else values

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"length of {what}")
        return self.raw(n, what).decode("utf-8", "surrogateescape")

    def count(self, n: int, min_bytes: int, what: str) -> int:
        """A count read from the file, refused before anything is allocated for it."""
        if n > (self.size - self.pos) // min_bytes:
            raise self.fail(f"{n} {what} cannot fit in the {self.size - self.pos} bytes left")
        return n

    def value_type(self, what: str) -> GGUFValueType:
        t = self.unpack("I", what)
        if t not in VT._value2member_map_:
            raise self.fail(f"{what} has unknown value type {t}")
        return VT(t)

    def scalar(self, vtype: GGUFValueType, what: str):
        return self.unpack(SCALAR_FORMATS[vtype], what)

    def array(self, key: str) -> tuple[list, GGUFValueType]:
        sub = self.value_type(f"item type of {key}")
        n = self.unpack("Q", f"length of {key}")
        if sub in SCALAR_FORMATS:
            size = struct.calcsize(SCALAR_FORMATS[sub])
            self.count(n, size, f"items of {key}")
            data = self.raw(n * size, key)
            dtype = np.dtype("<u1") if sub == VT.BOOL else np.dtype("<" + SCALAR_FORMATS[sub])
            items = np.frombuffer(data, dtype).tolist()
            return ([bool(x) for x in items] if sub == VT.BOOL else items), sub
        if sub == VT.STRING:
            self.count(n, STRING_HEAD, f"strings of {key}")
            return [self.string(key) for _ in range(n)], sub
        raise self.fail(f"key {key} is an array of {sub.name} (llama.cpp reads no nested arrays)")

    def kv(self, i: int) -> KV:
        key = self.string(f"key {i}")
        if not key:
            raise self.fail(f"key {i} is empty")
        vtype = self.value_type(f"key {key}")
        if vtype in SCALAR_FORMATS:
            value = self.scalar(vtype, key)
            return KV(key, vtype, bool(value) if vtype == VT.BOOL else value)
        if vtype == VT.STRING:
            return KV(key, vtype, self.string(key))
        items, sub = self.array(key)
        return KV(key, vtype, items, sub)

    def tensor_info(self, type_sizes: Mapping[int, TypeSize]) -> tuple[str, tuple[int, ...], int, int, int]:
        name = self.string("tensor name")
        if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise self.fail(f"tensor name {name[:80]!r} is longer than {MAX_NAME_BYTES} bytes")
        n_dims = self.unpack("I", f"dimensions of {name}")
        if n_dims > MAX_DIMS:
            raise self.fail(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = self.unpack(f"{n_dims}Q", f"shape of {name}") if n_dims else ()
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if any(d > INT64_MAX for d in dims) or math.prod(dims) > INT64_MAX:
            raise self.fail(f"tensor {name} has an impossible shape {dims}")
        ggml_type = self.unpack("I", f"type of {name}")
        if ggml_type not in type_sizes:
            raise self.fail(f"tensor {name} has tensor type id {ggml_type}, which this reader cannot size")
        shape = tuple(reversed(dims))
        try:
            nbytes = type_sizes[ggml_type].nbytes(shape)
        except ValueError as e:
            raise self.fail(f"tensor {name} (type {ggml_type}): {e}") from None
        offset = self.unpack("Q", f"offset of {name}")
        return name, shape, ggml_type, offset, nbytes


def read_gguf(path, type_sizes: Mapping[int, TypeSize] | None = None) -> GGUFContents:
    """The header of a GGUF file, checked as llama.cpp checks it; tensor data is not read.

    Raises GGUFFormatError for a truncated or corrupt file, and for tensor types missing from
    `type_sizes` (their sizes, so the data layout, are unknown; default: `type_sizes_for` the
    file's key/values).
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(GGUF_MAGIC) + 4 + 16:
            raise _Cursor(path, b"", size).fail(f"only {size} bytes")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(path, buf, size), type_sizes)


def _parse(cur: _Cursor, type_sizes: Mapping[int, TypeSize] | None) -> GGUFContents:
    if cur.raw(4, "magic") != GGUF_MAGIC:
        raise cur.fail("no GGUF magic")
    version = cur.unpack("I", "version")
    if version not in READABLE_VERSIONS:
        hint = " (big-endian files are not supported)" if version & 0xFFFF == 0 else ""
        raise cur.fail(f"version {version}{hint}")
    n_tensors, n_kv = cur.unpack("QQ", "counts")
    cur.count(n_kv, MIN_KV_BYTES, "key/values")
    kvs, seen = [], set()
    for i in range(n_kv):
        kv = cur.kv(i)
        if kv.key in seen:
            raise cur.fail(f"duplicate key {kv.key}")
        seen.add(kv.key)
        kvs.append(kv)
    if type_sizes is None:
        type_sizes = type_sizes_for(kvs)
    alignment = DEFAULT_ALIGNMENT
    for kv in kvs:
        if kv.key == ALIGNMENT_KEY:
            if kv.type != VT.UINT32 or kv.value == 0 or kv.value & (kv.value - 1):
                raise cur.fail(f"{ALIGNMENT_KEY} is {kv.type.name} {kv.value}, not a UINT32 power of two")
            alignment = kv.value
    cur.count(n_tensors, MIN_TENSOR_INFO_BYTES, "tensor infos")
    infos, names = [], set()
    for _ in range(n_tensors):
        info = cur.tensor_info(type_sizes)
        if info[0] in names:
            raise cur.fail(f"duplicate tensor name {info[0]}")
        names.add(info[0])
        infos.append(info)
    data_start = align(cur.pos, alignment) if infos else cur.pos
    tensors, expected = [], 0
    for name, shape, ggml_type, offset, nbytes in infos:
        if offset != expected:
            raise cur.fail(f"tensor {name} has offset {offset}, llama.cpp expects {expected}")
        if data_start + offset + nbytes > cur.size:
            raise cur.fail(f"the data of tensor {name} is cut short (file of {cur.size} bytes)")
        tensors.append(ReadTensor(name, shape, ggml_type, data_start + offset, nbytes))
        expected += align(nbytes, alignment)
    return GGUFContents(version, kvs, tensors, alignment, data_start, cur.size)
