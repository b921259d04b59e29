"""One registry of output types: what each GGUF tensor type is, and who may use it.

Every fact about an output type lives in its `OutputType` record: its codec (and so its
GGML type id, block size and bytes per block), `general.file_type` when it is the
conversion's `--type`, the bytes that follow a tensor's blocks (I2_S's scale), whether
it is a `--type` (ternary projections) or an `--embedding-type` choice, and what a
projection falls back to when its rows are not whole blocks. The CLI's choices and help,
the per-tensor type decision, the disk estimate, assemble and verify all read it.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from pipeline.codecs import BF16, CODECS, F16, F32, I2_S, I2_S_TAIL, Q2_0, Q8_0, TQ1_0, TQ2_0, Codec
from pipeline.errors import OptionError
from pipeline.families import EMBEDDING, NORM, OUTPUT, TERNARY


@dataclasses.dataclass(frozen=True)
class OutputType:
    name: str                  # as the options spell it: "tq2_0"
    codec: type[Codec]
    file_type: int | None      # general.file_type when this is the --type (llama.cpp's LlamaFileType)
    summary: str               # one phrase for --help
    ternary_choice: bool = False    # a --type choice for the projections
    embedding_choice: bool = False  # an --embedding-type choice for token_embd / output
    tail: int = 0              # bytes after a tensor's blocks (I2_S: float32 scale + 28 unused)
    fallback: str | None = None     # type of projections whose rows are not whole blocks

    @property
    def ggml_type(self) -> int:
        return int(self.codec.ggml_type)

    @property
    def block_size(self) -> int:
        return self.codec.block_size

    def supports(self, cols: int) -> bool:
        return self.codec.supports(cols)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of this type, tail included."""
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        return rows * self.codec.row_bytes(shape[-1]) + self.tail

    def tail_bytes(self, scale: float | None) -> bytes:
        if not self.tail:
            return b""
        return I2_S.i2s_tail(np.float32(scale))


OUTPUT_TYPES: dict[str, OutputType] = {t.name: t for t in (
    OutputType("tq2_0", TQ2_0, 37, "2.06 bits/weight, llama.cpp and bitnet.cpp", ternary_choice=True,
               fallback="f16"),
    OutputType("tq1_0", TQ1_0, 36, "1.69 bits/weight, smallest, llama.cpp and bitnet.cpp", ternary_choice=True,
               fallback="f16"),
    OutputType("i2_s", I2_S, 40, "2 bits/weight, bitnet.cpp's fast CPU kernels (not upstream llama.cpp)",
               ternary_choice=True, tail=I2_S_TAIL, fallback="f16"),
    OutputType("f16", F16, 1, "half precision", embedding_choice=True),
    OutputType("bf16", BF16, 32, "bfloat16", embedding_choice=True),
    OutputType("f32", F32, 0, "single precision", embedding_choice=True),
    OutputType("q8_0", Q8_0, 7, "8 bits, about half of F16 (rows must be a multiple of 32)", embedding_choice=True),
)}
# upstream llama.cpp's Q2_0 (file type MOSTLY_Q2_0 = 41): one fp16 scale per 64 values
OUTPUT_TYPES["q2_0"] = OutputType("q2_0", Q2_0, 41, "2.25 bits/weight, upstream llama.cpp only (one scale per "
                                  "64 values: group-scaled checkpoints)", ternary_choice=True, fallback="f16")
assert set(OUTPUT_TYPES) == set(CODECS), "every codec has a registry entry"
BY_GGML_TYPE = {t.ggml_type: t for t in OUTPUT_TYPES.values()}

TERNARY_CHOICES = tuple(n for n, t in OUTPUT_TYPES.items() if t.ternary_choice)
EMBEDDING_CHOICES = tuple(n for n, t in OUTPUT_TYPES.items() if t.embedding_choice)
DEFAULT_TYPE, DEFAULT_EMBEDDING_TYPE, NORM_TYPE = "tq2_0", "f16", "f32"


def choices_help(choices: tuple[str, ...]) -> str:
    return "; ".join(f"{n} ({OUTPUT_TYPES[n].summary})" for n in choices)


def check_choice(value, choices: tuple[str, ...], option: str) -> str:
    name = str(value).lower()
    if name not in choices:
        raise OptionError(f"{option}: unknown type {value!r}; choose one of {', '.join(choices)}")
    return name


def tensor_type(role: str, shape: tuple[int, ...], out_type: str, embedding_type: str,
                name: str = "") -> tuple[OutputType, str | None]:
    """(output type of one tensor, warning or None). Norms are F32; embeddings take the
    --embedding-type; projections the --type, or its fallback for rows that are not whole
    blocks (as llama.cpp's converter does for TQ types)."""
    if role == NORM or len(shape) < 2:
        return OUTPUT_TYPES[NORM_TYPE], None
    if role in (EMBEDDING, OUTPUT):
        t = OUTPUT_TYPES[embedding_type]
        if not t.supports(shape[-1]):
            raise OptionError(f"--embedding-type {embedding_type}: {name or role} has rows of {shape[-1]} values, "
                              f"not a multiple of {t.block_size}; choose f16, bf16 or f32")
        return t, None
    assert role == TERNARY, role
    t = OUTPUT_TYPES[out_type]
    if t.supports(shape[-1]):
        return t, None
    fb = OUTPUT_TYPES[t.fallback]
    return fb, (f"row length {shape[-1]} is not a multiple of {t.block_size}, so it cannot be {t.codec.name}; "
                f"writing {fb.codec.name}")
