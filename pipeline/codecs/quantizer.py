"""The absmean ternary quantizer of BitNet b1.58 (`absmean_row_sums`, `absmean_total`,
`absmean_scale`, `effective_scale`, `ternary_codes`) and the reading of group-scaled ternary
weights (`group_magnitudes`, `scale_granularity`), used by extract, quantize and verify. A ternary
tensor then travels to the codecs as int8 `codes` in {-1, 0, +1} plus a float32 `scale`
(W' = codes * scale).
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.codecs.base import CodecError
from pipeline.errors import CheckpointError

ABSMEAN_FLOOR = 1e-5


class NonFiniteWeights(CheckpointError):
    """A tensor that should be ternary-quantized holds NaN or infinite values."""


# -- row maxima of float tensors ---------------------------------------------------------------

# source dtype -> (its bits as an unsigned integer, the mask that clears the sign, infinity's bits):
# with the sign cleared, the bit patterns of finite values order as their magnitudes, and every
# pattern from infinity's up is infinite or NaN, so a row's max |x| is an integer max
MAGNITUDE_BITS = {"BF16": (np.uint16, 0x7FFF, 0x7F80), "F16": (np.uint16, 0x7FFF, 0x7C00),
                  "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000)}


def row_abs_max(values: np.ndarray) -> np.ndarray:
    """float32 max |x| of each row (a 1-D tensor is one row)."""
    a = np.abs(values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1))
    return a.max(axis=1) if a.size else np.zeros(a.shape[0], np.float32)


def row_abs_max_bits(block: np.ndarray, dtype: str) -> tuple[np.ndarray, bool]:
    """(float32 max |x| of each row, whether every value is finite) of a block in its source
    representation, from the bit patterns (a quarter of the float path's memory traffic)."""
    uint, mask, inf = MAGNITUDE_BITS[dtype]
    bits = block.view(uint)
    bits = bits.reshape(bits.shape[0], -1) if bits.ndim > 1 else bits.reshape(1, -1)
    if not bits.size:
        return np.zeros(bits.shape[0], np.float32), True
    top = np.bitwise_and(bits, uint(mask)).max(axis=1)
    finite = bool((top < uint(inf)).all())
    if dtype == "BF16":
        return (top.astype(np.uint32) << 16).view(np.float32), finite
    return (top.view(np.float16).astype(np.float32) if dtype == "F16" else top.view(np.float32)), finite


# -- absmean ternary quantization (BitNet b1.58) ----------------------------------------------

def absmean_row_sums(block: np.ndarray) -> np.ndarray:
    """float64 sum of |x| over each row of a block (a 1-D block is one row).

    Values are widened to float32 first (what the reference converters see). A row is
    never split between chunks, so the per-row sums, and `absmean_total` of them, do
    not depend on how a tensor was chunked.
    """
    values = np.abs(np.asarray(block, dtype=np.float32))
    return np.atleast_1d(values.reshape(values.shape[0] if values.ndim > 1 else 1, -1).sum(axis=1, dtype=np.float64))


def absmean_total(row_sums) -> float:
    """Exactly rounded total of per-row sums (math.fsum), whatever their order."""
    return math.fsum(np.concatenate([np.atleast_1d(r) for r in row_sums]).tolist())


def absmean_scale(total_abs_sum: float, n: int) -> np.float32:
    """The tensor's scale s = max(mean|W|, 1e-5), rounded once to float32."""
    total = float(total_abs_sum)
    if not np.isfinite(total):
        raise NonFiniteWeights(f"sum of |W| is {total}: the weights contain NaN or Inf")
    if n <= 0:
        raise CodecError(f"absmean of an empty tensor (n = {n})")
    return np.float32(max(total / n, ABSMEAN_FLOOR))


def effective_scale(absmean: np.float32) -> np.float32:
    """The magnitude a code of +-1 stands for: float32(1 / float32(1 / absmean)).

    llama.cpp's converter writes codes / iscale (iscale = 1 / absmean in float32), which
    differs from codes * absmean in the last bit for some scales; we match its bytes.
    """
    return np.float32(1) / (np.float32(1) / np.float32(absmean))


def ternary_codes(block: np.ndarray, scale: np.float32) -> np.ndarray:
    """int8 codes clip(round(x / scale), -1, 1) for one block of weights.

    Computed exactly as llama.cpp's converter does it in torch, so our codes equal its codes
    bit for bit: in float32, x is multiplied by iscale = float32(1) / scale (not divided by
    scale; x * fl(1/s) and x / s differ in the last bit for some x, which moves values lying
    next to +-0.5 across the rounding boundary), then rounded half to even (torch.round and
    np.rint both do that, so +-0.5 -> 0 and +-1.5 -> +-2 -> +-1), then clamped.
    """
    iscale = np.float32(1) / np.float32(scale)
    values = np.array(block, dtype=np.float32, copy=True)
    values *= iscale
    np.rint(values, out=values)
    np.clip(values, -1, 1, out=values)
    return values.astype(np.int8)


# -- group-scaled ternary weights (read from the data) ------------------------------------------

def group_magnitudes(block: np.ndarray, group: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """(float32 (rows, cols / group) magnitudes, first non-ternary (row, group) or None) of float
    weights that should hold {-s, 0, +s} in every run of `group` values of a row: each group's s
    is its max |x| (0 for an all-zero group), and every value's |x| must be 0 or s (NaN and
    infinities never are)."""
    values = np.asarray(block, dtype=np.float32)
    rows, cols = values.shape
    a = np.abs(values).reshape(rows, cols // group, group)
    m = a.max(axis=2)
    ok = ((a == 0) | (a == m[..., None])).all(axis=2) & np.isfinite(m)
    if ok.all():
        return m, None
    r, g = np.argwhere(~ok)[0]
    return m, (int(r), int(g))


def group_rows(block: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (rows, cols / group) magnitudes, bool per row: every run of `group` values of the row
    is {-s, 0, +s}) of float weights that may or may not be ternary (an embedding)."""
    values = np.asarray(block, dtype=np.float32)
    rows, cols = values.shape
    a = np.abs(values).reshape(rows, cols // group, group)
    m = a.max(axis=2)
    ok = ((a == 0) | (a == m[..., None])).all(axis=2) & np.isfinite(m)
    return m, ok.all(axis=1)


def constant_over(mags: np.ndarray, values: int, group: int) -> bool:
    """Whether the non-zero magnitudes (one per `group` values, rows x groups) agree inside every run
    of `values` values of a row (a group of zeros takes any scale)."""
    rows, groups = mags.shape
    if values % group or groups * group % values:
        return False
    m = mags.reshape(rows, -1, values // group)
    top = m.max(axis=2, keepdims=True)
    return not ((m != top) & (m > 0)).any()


def scale_granularity(mags: np.ndarray, group: int) -> str:
    """How finely a ternary tensor's scale changes, from its magnitudes per `group` values:
    "tensor" (one non-zero magnitude), "row" (one per row: the group is the whole row) or
    "group N" (N: the largest power-of-two multiple of `group` the scale is constant over)."""
    nonzero = mags[mags > 0]
    if nonzero.size == 0 or (nonzero == nonzero[0]).all():
        return "tensor"
    cols = mags.shape[1] * group
    if constant_over(mags, cols, group):
        return "row"
    n = group
    while n * 2 < cols and constant_over(mags, n * 2, group):
        n *= 2
    return f"group {n}"


def sign_fields(block: np.ndarray) -> np.ndarray:
    """Fields (code + 1, uint8) of ternary float values: the sign of each value."""
    codes = np.sign(np.asarray(block, dtype=np.float32)).astype(np.int8)
    return codes.view(np.uint8) + np.uint8(1)
