"""One registry of output types: what each GGUF tensor type is, and who may use it.

Every fact about an output type lives in its `OutputType` record: its codec (and so its
GGML type id, block size and bytes per block), `general.file_type` when it is the
conversion's `--type`, the bytes that follow a tensor's blocks (I2_S's scale), whether
it is a `--type` (ternary projections) or an `--embedding-type` choice, what a
projection falls back to when its rows are not whole blocks, and the bitnet.cpp build
(`--target`) its byte layout is for. The CLI's choices and help, the per-tensor type
decision, the disk estimate, assemble and verify all read it.

One `--type` can have a layout per target: `--type i2_s` is the entry `i2_s` (x86 builds,
blocks of 128 values) or `i2_s_arm` (ARM builds, blocks of 64); `resolve` picks it.
TL1 and TL2 exist for one target each.
"""
from __future__ import annotations

import dataclasses
import math
import platform

import numpy as np

from pipeline.codecs import (BF16, CODECS, F16, F32, I2_S, I2_S_ARM, IQ1_BN, IQ2_BN, IQ2_BN_R4, Q1_0, Q2_0, Q8_0, TL1,
                             TL2, TQ1_0, TQ2_0, Codec)
from pipeline.errors import OptionError
from pipeline.families import EMBEDDING, FLOAT, NORM, OUTPUT, TERNARY


TARGETS = ("x86", "arm")  # bitnet.cpp builds: x86 (AVX2/AVX512) and ARM (NEON)
TARGET_NAMES = {"x86": "x86", "arm": "ARM"}


@dataclasses.dataclass(frozen=True)
class OutputType:
    name: str                  # registry key: "tq2_0", "i2_s_arm"
    codec: type[Codec]
    file_type: int | None      # general.file_type when this is the --type (llama.cpp's LlamaFileType)
    summary: str               # one phrase for --help
    ternary_choice: bool = False    # a --type choice for the projections (a float type: their effective
                                    # weights, the ternary values times the scale, as llama.cpp's --outtype)
    embedding_choice: bool = False  # an --embedding-type choice for token_embd / output
    fallback: str | None = None     # type of projections whose rows are not whole blocks
    option: str | None = None       # the --type spelling when it is not `name` ("i2_s" for i2_s_arm)
    target: str | None = None       # the bitnet.cpp build these bytes are laid out for (None: any)
    needs_tiles: bool = False       # TL1/TL2: tile sizes per shape from --kernel-config
    largest: float | None = None    # float types: the largest magnitude they store (for messages; see holds)
    from_codes: bool = False        # its bytes are a cheap rewrite of quantize.zarr's 2-bit codes (a copy plus
                                    # block scales, a byte lookup): pack links the codes, assemble encodes them
    runtime: str | None = None      # the one runtime that reads this type (None: as `summary` says)
    rows_fallback: str | None = None  # type of projections whose row count is not a multiple of codec.row_multiple()
    run_min_cols: int = 0           # shorter rows load but abort the runtime's matmul (ik: Q8_K64 needs >= 512)

    @property
    def type_option(self) -> str:
        return self.option or self.name

    @property
    def ggml_type(self) -> int:
        return int(self.codec.ggml_type)

    @property
    def block_size(self) -> int:
        return self.codec.block_size

    def supports(self, cols: int) -> bool:
        return self.codec.supports(cols)

    def nbytes(self, shape: tuple[int, ...], tiles=None) -> int:
        """Bytes of a tensor of this type, tail included."""
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        return rows * self.codec.row_bytes(shape[-1], tiles) + self.codec.tail_size(tuple(shape), tiles)

    def holds(self, magnitude: float) -> bool:
        """Whether a float type stores values up to `magnitude` as finite numbers: a block of
        that value is encoded with the type's own codec and read back (F16 rounds below 65520 to
        65504, BF16 rounds the top of float32's range to infinity, Q8_0's fp16 block scale is
        max / 127). Ternary types hold codes and a scale, which `pipeline.plan.check_scale` checks."""
        assert not self.codec.ternary, self.name
        block = np.full((1, self.block_size), magnitude, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            back = self.codec.decode(self.codec.encode(block))
        return bool(np.isfinite(back).all())

    def tail_bytes(self, shape: tuple[int, ...], scale: float | None, tiles=None) -> bytes:
        """What follows a tensor's rows: I2_S's and TL's scale slot (TL2: after zero padding)."""
        return self.codec.tail_bytes(tuple(shape), scale, tiles) if self.codec.tail_size(tuple(shape), tiles) else b""


OUTPUT_TYPES: dict[str, OutputType] = {t.name: t for t in (
    OutputType("tq2_0", TQ2_0, 37, "2.06 bits/weight, llama.cpp and bitnet.cpp", ternary_choice=True,
               embedding_choice=True, fallback="f16", from_codes=True),
    OutputType("tq1_0", TQ1_0, 36, "1.69 bits/weight, smallest, llama.cpp and bitnet.cpp", ternary_choice=True,
               fallback="f16"),
    OutputType("i2_s", I2_S, 40, "2 bits/weight, bitnet.cpp's fast CPU kernels (not upstream llama.cpp), "
               "laid out for the --target build", ternary_choice=True, fallback="f16", target="x86", from_codes=True),
    OutputType("i2_s_arm", I2_S_ARM, 40, "I2_S for bitnet.cpp's ARM builds", ternary_choice=True, fallback="f16",
               option="i2_s", target="arm", from_codes=True),
    OutputType("tl1", TL1, 38, "2 bits/weight, bitnet.cpp's lookup-table kernels for ARM; needs --kernel-config",
               ternary_choice=True, target="arm", needs_tiles=True),
    OutputType("tl2", TL2, 39, "1.67 bits/weight, bitnet.cpp's lookup-table kernels for x86; needs --kernel-config",
               ternary_choice=True, target="x86", needs_tiles=True),
    OutputType("f16", F16, 1, "half precision", ternary_choice=True, embedding_choice=True, largest=65504.0),
    OutputType("bf16", BF16, 32, "bfloat16", ternary_choice=True, embedding_choice=True, largest=3.3895314e38),
    OutputType("f32", F32, 0, "single precision", ternary_choice=True, embedding_choice=True,
               largest=float(np.finfo(np.float32).max)),
    OutputType("q8_0", Q8_0, 7, "8 bits, about half of F16 (rows must be a multiple of 32)", ternary_choice=True,
               embedding_choice=True, fallback="f16", largest=65504.0 * 127),
)}
# upstream llama.cpp's Q2_0 (file type MOSTLY_Q2_0 = 41): one fp16 scale per 64 values
OUTPUT_TYPES["q2_0"] = OutputType("q2_0", Q2_0, 41, "2.25 bits/weight, upstream llama.cpp only (one scale per "
                                  "64 values: group-scaled checkpoints)", ternary_choice=True, embedding_choice=True,
                                  fallback="f16")
# upstream llama.cpp's Q1_0 (file type MOSTLY_Q1_0 = 40): one fp16 scale and 128 sign bits per 128 values
OUTPUT_TYPES["q1_0"] = OutputType("q1_0", Q1_0, 40, "1.125 bits/weight, upstream llama.cpp only (binary "
                                  "checkpoints: -s and +s, one s per 128 values; 1-bit Bonsai)", ternary_choice=True,
                                  embedding_choice=True, fallback="f16")
# ik_llama.cpp's own ternary types (docs/notes/ik-llama.md): one scale per row (row meta), blocks of 64
# values; llama ftypes MOSTLY_IQ1_BN = 136, MOSTLY_IQ2_BN = 137, MOSTLY_IQ2_BN_R4 = 337. R4 interleaves
# groups of 4 rows: a projection whose row count is not a multiple of 4 is IQ2_BN (as ik's llama-quantize)
OUTPUT_TYPES.update({t.name: t for t in (
    OutputType("iq2_bn", IQ2_BN, 137, "2 bits/weight + a float32 scale per row, ik_llama.cpp only",
               ternary_choice=True, fallback="f16", runtime="ik_llama.cpp", run_min_cols=512),
    OutputType("iq1_bn", IQ1_BN, 136, "1.625 bits/weight + an fp16 scale per row, ik_llama.cpp only",
               ternary_choice=True, fallback="f16", runtime="ik_llama.cpp", run_min_cols=512),
    OutputType("iq2_bn_r4", IQ2_BN_R4, 337, "IQ2_BN with 4 rows interleaved, ik_llama.cpp only",
               ternary_choice=True, fallback="f16", runtime="ik_llama.cpp", rows_fallback="iq2_bn"),
)})
assert set(OUTPUT_TYPES) == set(CODECS), "every codec has a registry entry"
# a ggml type id names one registry entry for what is target-independent about it (sizes)
BY_GGML_TYPE = {t.ggml_type: t for t in reversed(OUTPUT_TYPES.values())}


def type_of_file(file_type, tensor_types) -> OutputType | None:
    """The --type a file of ours was written with, from its general.file_type and the ggml types of
    its tensors: file type 40 is both bitnet.cpp's I2_S and upstream llama.cpp's Q1_0, told apart by
    the tensors (a Q1_0 file holds type 41 tensors)."""
    found = [t for t in OUTPUT_TYPES.values() if t.ternary_choice and t.file_type == file_type]
    types = set(tensor_types)
    return next((t for t in found if t.ggml_type in types), found[0] if found else None)


def host_target() -> str:
    """The bitnet.cpp build of the machine the conversion runs on."""
    return "arm" if platform.machine().lower() in ("aarch64", "arm64", "armv8l", "armv7l") else "x86"


def targets_of(option: str) -> tuple[str, ...]:
    """The targets a --type has a layout for (empty: it runs on every build)."""
    return tuple(t.target for t in OUTPUT_TYPES.values() if t.type_option == option and t.target)


def resolve(option: str, target: str | None) -> OutputType:
    """The registry entry of `--type option` for `--target target` (a target-free type ignores it)."""
    for t in OUTPUT_TYPES.values():
        if t.type_option == option and t.ternary_choice and t.target in (None, target):
            return t
    names = " and ".join(TARGET_NAMES[x] for x in targets_of(option))
    raise OptionError(f"--type {option} runs on bitnet.cpp's {names} builds only, not --target {target}; "
                      f"choose --target {targets_of(option)[0]} or another --type")


TERNARY_CHOICES = tuple(dict.fromkeys(t.type_option for t in OUTPUT_TYPES.values() if t.ternary_choice))
# float types first; the ternary ones hold the ternary (or binary) embeddings of group-scaled checkpoints
EMBEDDING_CHOICES = tuple(sorted((n for n, t in OUTPUT_TYPES.items() if t.embedding_choice),
                                 key=lambda n: OUTPUT_TYPES[n].codec.ternary))
DEFAULT_TYPE, DEFAULT_EMBEDDING_TYPE, NORM_TYPE = "auto", "f16", "f32"
AUTO_TYPE = "auto"  # --type auto (pipeline/auto_type.py): decided from the family, or a sample of the data
TYPE_OPTIONS = (AUTO_TYPE, *TERNARY_CHOICES)


def choices_help(choices: tuple[str, ...]) -> str:
    return "; ".join(f"{n} ({OUTPUT_TYPES[n].summary})" for n in choices)


def target_of(option: str, target: str | None) -> str:
    """The target a conversion to `--type option` is for: the one given, else the type's only
    one (TL1: arm, TL2: x86), else the machine's."""
    own = targets_of(option)
    if target is None:
        return own[0] if len(own) == 1 else host_target()
    name = str(target).lower()
    if name not in TARGETS:
        raise OptionError(f"--target: unknown bitnet.cpp build {target!r}; choose one of {', '.join(TARGETS)}")
    resolve(option, name)  # refuses a type that has no layout for it
    return name


def check_choice(value, choices: tuple[str, ...], option: str) -> str:
    name = str(value).lower()
    if name not in choices:
        raise OptionError(f"{option}: unknown type {value!r}; choose one of {', '.join(choices)}")
    return name


def tensor_type(role: str, shape: tuple[int, ...], out_type: str, embedding_type: str,
                name: str = "", norm_type: str = NORM_TYPE) -> tuple[OutputType, str | None]:
    """(output type of one tensor, warning or None). Norms are F32 (or the family's norm type);
    embeddings take the --embedding-type; projections the --type, or its fallback for rows that
    are not whole blocks (as llama.cpp's converter does for TQ types)."""
    if role == NORM or len(shape) < 2:
        return OUTPUT_TYPES[norm_type], None
    if role in (EMBEDDING, OUTPUT):
        t = OUTPUT_TYPES[embedding_type]
        if not t.supports(shape[-1]):
            raise OptionError(f"--embedding-type {embedding_type}: {name or role} has rows of {shape[-1]} values, "
                              f"not a multiple of {t.block_size}; choose f16, bf16 or f32")
        return t, None
    if role == FLOAT:  # a float matrix that is not ternary (qwen35 ssm_alpha/beta): as llama.cpp's --outtype
        t = OUTPUT_TYPES[out_type]
        return (t if not t.codec.ternary and t.supports(shape[-1]) else OUTPUT_TYPES["f16"]), None
    assert role == TERNARY, role
    t = OUTPUT_TYPES[out_type]
    if t.supports(shape[-1]) and t.rows_fallback and shape[0] % t.codec.row_multiple():
        fb = OUTPUT_TYPES[t.rows_fallback]
        return fb, (f"{shape[0]} rows are not a multiple of {t.codec.row_multiple()}, so it cannot be {t.codec.name}; "
                    f"writing {fb.codec.name}")
    if t.supports(shape[-1]):
        return t, None
    fb = OUTPUT_TYPES[t.fallback]
    return fb, (f"row length {shape[-1]} is not a multiple of {t.block_size}, so it cannot be {t.codec.name}; "
                f"writing {fb.codec.name}")
