"""`--type auto` (the default): the smallest output type that holds the checkpoint's projections
exactly and that its family's runtime runs, decided before any work.

- One ternary scale per tensor (every family but the group-scaled one; config.json says so):
  TQ2_0, which llama.cpp and bitnet.cpp both run (as before `auto` existed).
- Group-scaled checkpoints (Ternary-Bonsai, 1-bit Bonsai: nothing in config.json tells them apart):
  the first and last rows of every projection are read (a few KiB each) and decide: binary with one
  scale per 128 values or more -> Q1_0; ternary with one scale per 256 or more -> TQ2_0; per 64 or
  128 -> Q2_0; a scale changing every 32 values -> refused (no type holds it). One scale per row
  (BitCPM) is a scale constant over every block of a row: TQ2_0. A sample that is not ternary is
  refused here, before any work (a float Qwen3 or MiniCPM is not a BitNet model). Extract and pack
  then check the whole data as they read it, as for an explicit --type.
I2_S and TL1/TL2 are never chosen: they run only in bitnet.cpp's builds and need --target.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.codecs import group_magnitudes, scale_granularity
from pipeline.errors import CheckpointError, OptionError
from pipeline.families import GROUP_COLUMNS, GROUPED, TERNARY, plan_tensors
from pipeline.safetensors_io import as_float32, header_budget, index_checkpoint

AUTO = "auto"
PER_TENSOR_TYPE = "tq2_0"
SCALE_BLOCKS = (256, 128, 64)  # the block sizes of the candidate types, largest first


def constant_within(mags: np.ndarray, block: int) -> bool:
    """Whether the non-zero magnitudes (one per 32 values) agree inside every block of `block` values."""
    rows, groups = mags.shape
    if groups * GROUP_COLUMNS % block:
        return False
    m = mags.reshape(rows, -1, block // GROUP_COLUMNS)
    top = m.max(axis=2, keepdims=True)
    return not ((m != top) & (m > 0)).any()


def sampled_layout(src) -> tuple[bool, int, str]:
    """(no zero in the sample, values per scale: the largest of SCALE_BLOCKS the scale is constant
    over, else 32, and the sample's scale granularity) from the first and last rows of a
    group-scaled projection; refused, naming the row and columns, when the sample is not ternary."""
    read = sorted({0, src.shape[0] - 1})
    values = np.concatenate([as_float32(src.read_rows(r, r + 1), src.dtype) for r in read])
    mags, bad = group_magnitudes(values, GROUP_COLUMNS)
    if bad is not None:
        row, g = read[bad[0]], bad[1]
        raise NotTernary(f"{src.file}: tensor {src.name}, row {row}, columns {g * GROUP_COLUMNS}.."
                         f"{(g + 1) * GROUP_COLUMNS - 1}: the values are not ternary (-s, 0 and +s for one s per "
                         "tensor, row or group)")
    per = next((b for b in SCALE_BLOCKS if constant_within(mags, b)), GROUP_COLUMNS)
    return bool((values != 0).all()), per, scale_granularity(mags, GROUP_COLUMNS)


class NotTernary(CheckpointError):
    """A sampled projection of a family whose ternary values are read from the data is not ternary."""


def choose(model_dir: Path, memory_limit: int, vocab_only: bool = False) -> tuple[str, str]:
    """(registry name of the type, why) for --type auto. A checkpoint that cannot be read is given
    the per-tensor type here: opening it for the conversion refuses it with its own message."""
    from pipeline.checkpoint import refuse_special_files

    unreadable = (CheckpointError, OptionError, OSError, ValueError)
    try:
        refuse_special_files(model_dir)  # nothing is read through a FIFO or device
        plan = plan_tensors(model_dir)
    except unreadable:
        return PER_TENSOR_TYPE, "the checkpoint could not be read"
    fam = plan.family
    if fam.weights != GROUPED:
        return PER_TENSOR_TYPE, (f"one ternary scale per tensor ({fam.name}): TQ2_0 holds it exactly and runs in "
                                 f"{fam.runtime}")
    if vocab_only:
        return "q2_0", "a group-scaled checkpoint, whose weights --vocab-only does not read: Q2_0"
    try:
        found = index_checkpoint(model_dir, header_budget(memory_limit))
    except unreadable:
        return PER_TENSOR_TYPE, "the checkpoint could not be read"
    binary, per, cols, finest, rows_only = True, SCALE_BLOCKS[0], [], None, True
    for t in plan.tensors:
        src = found.get(t.hf_name)
        if t.role != TERNARY or src is None or tuple(src.shape) != tuple(t.shape) or len(t.shape) != 2 \
                or t.shape[1] % GROUP_COLUMNS:
            continue  # opening the checkpoint for the conversion refuses these, naming them
        try:
            layout = sampled_layout(src)
        except NotTernary as e:  # as a float Llama is refused by its config: before any work
            raise CheckpointError(f"{e}; only ternary-valued projections convert ({fam.description}), so this "
                                  "checkpoint is not a BitNet model") from None
        except unreadable:  # a truncated file: extract refuses it, naming it
            continue
        binary &= layout[0]
        rows_only &= layout[2] in ("row", "tensor")
        if layout[1] < per:
            per, finest = layout[1], t.hf_name
        cols.append(t.shape[1])
    if not cols:  # nothing could be sampled: opening the checkpoint (or extract) refuses it, naming why
        return "q2_0", "no projection could be sampled"
    whole = lambda block: all(c % block == 0 for c in cols)  # noqa: E731  (no projection falls back to F16)
    kind = "binary (-s, +s)" if binary else "ternary"
    why = (f"the first and last rows of every projection are {kind} with one scale per "
           + ("row (or tensor)" if rows_only else f"{per if per < SCALE_BLOCKS[0] else '256 or more'} values"))
    if binary and per >= 128 and whole(128):
        return "q1_0", why + ": Q1_0 (1.125 bits/weight) holds them exactly; upstream llama.cpp runs it"
    if per >= 256 and whole(256):
        return "tq2_0", why + ": TQ2_0 holds them exactly; llama.cpp runs it"
    if per >= 64 and whole(64):
        return "q2_0", why + ": Q2_0 (one scale per 64 values) holds them exactly; upstream llama.cpp runs it"
    raise OptionError(f"--type auto: the scale of {finest} changes every {per} values, which no ternary type holds; "
                      "give --type q2_0 --allow-requantize (lossy) or --type f16 (exact)")
