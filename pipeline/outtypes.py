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

Which runtimes and backends load each type (`runtimes`, and `traps`: what goes wrong silently,
per type and, `ARCH_TRAPS`, per architecture) is data here too, each fact with its source; `plan`, `inspect OUT.gguf` and the README's table
(`python -m pipeline.outtypes` prints it; tests/test_runtimes.py holds the README to it) read it.
A cell nobody here has a source for stays unknown ("?"), never guessed.
"""
from __future__ import annotations

import dataclasses
import math
import platform

import numpy as np

from pipeline.codecs import (BF16, CODECS, F16, F32, I2_S, I2_S_ARM, IQ1_BN, IQ2_BN, IQ2_BN_R4, Q1_0, Q2_0, Q8_0, TL1,
                             TL2, TQ1_0, TQ2_0, Codec)
from pipeline.errors import CheckpointError, OptionError
from pipeline.families import EMBEDDING, FLOAT, NORM, OUTPUT, TERNARY


TARGETS = ("x86", "arm")  # bitnet.cpp builds: x86 (AVX2/AVX512) and ARM (NEON)
TARGET_NAMES = {"x86": "x86", "arm": "ARM"}

# runtimes and backends whose loading of a file depends on its tensor types
RUNTIMES = ("llama.cpp CPU", "llama.cpp Metal", "llama.cpp Vulkan", "llama.cpp CUDA", "bitnet.cpp x86",
            "bitnet.cpp ARM", "ik_llama.cpp")
_CELLS = dict(zip(("cpu", "metal", "vulkan", "cuda", "x86", "arm", "ik"), RUNTIMES))


@dataclasses.dataclass(frozen=True)
class Support:
    """Whether one runtime (or backend) loads and runs a type: True, False (refuses it, or computes
    garbage: `note` says which), None (nobody here has a source either way)."""
    runs: bool | None
    note: str = ""
    source: str = ""


def support(**cells: Support) -> tuple[tuple[str, Support], ...]:
    """(runtime, Support) pairs in RUNTIMES order from cells named cpu, metal, vulkan, cuda (llama.cpp's
    backends), x86, arm (bitnet.cpp's builds) and ik; a runtime not given is unknown."""
    unknown = set(cells) - set(_CELLS)
    assert not unknown, unknown
    return tuple((name, cells.get(key, Support(None))) for key, name in _CELLS.items())


def _same(runs: bool, note: str, source: str, *keys: str) -> dict[str, Support]:
    return {k: Support(runs, note, source) for k in keys}


# sources, shared by several types (ECOSYSTEM: the project's survey of runtimes, FORMATS: of formats)
_LLAMA_RUN = "run here with llama-cpp-python 0.3.36 (tests/test_llamacpp*.py)"
_BITNET_RUN = "run with bitnet.cpp @16da220 x86 and ARM builds (docs/notes/bitnet-cpp.md)"
_IK_RUN = "loaded and run in ik_llama.cpp @8337e4c (docs/notes/ik-llama.md section 9)"
_IK_NO_TQ = "ik_llama.cpp @8337e4c has no TQ1_0/TQ2_0/Q2_0 in ggml.h (ECOSYSTEM 2c)"
_NOT_UPSTREAM = "not an upstream ggml type (ECOSYSTEM 2a; FORMATS: ids 36-38 retired, 39 is MXFP4)"
_FLOATS = "llama.cpp's README: every backend runs F16/F32/Q8_0 models"
_IK_FLOATS = "ik_llama.cpp @8337e4c loads our F16 embeddings and F32 norms, its llama-quantize writes Q8_0 (docs/notes/ik-llama.md section 9)"
_BITNET_FLOATS = "bitnet.cpp's own files hold F16/Q8_0 embeddings and F32 norms (FORMATS I2_S section)"
_NOT_BITNET = "not in bitnet.cpp's ggml fork (ECOSYSTEM 2a)"
_NOT_IK = "not in ik_llama.cpp's ggml.h @8337e4c (ECOSYSTEM 2a)"
_I2S_FIXES = "BitNet #585, #586, #598, #610 (open): ARM builds moving to the 128/32 layout; on Apple Metal (the default there) the 128/32 layout is read"

_TQ_CPU = {"cpu": Support(True, "", _LLAMA_RUN), "ik": Support(False, "no TQ types", _IK_NO_TQ)}
_UPSTREAM_NO = _same(False, "not an upstream type", _NOT_UPSTREAM, "cpu", "metal", "vulkan", "cuda")
_IK_ONLY = {**_same(False, "unknown type id", "ids 134/135/335 are ik_llama.cpp's own (ECOSYSTEM 2a)",
                    "cpu", "metal", "vulkan", "cuda", "x86", "arm")}
_FLOAT_CELLS = {**_same(True, "", _FLOATS, "cpu", "metal", "vulkan", "cuda"),
                **_same(True, "", _BITNET_FLOATS, "x86", "arm"), "ik": Support(True, "", _IK_FLOATS)}

RUNTIME_SUPPORT: dict[str, tuple] = {
    "tq2_0": support(**_TQ_CPU, **_same(True, "", _BITNET_RUN, "x86", "arm"),
                     metal=Support(True, "", "PrismML-Eng/llama.cpp#138: Metal and Vulkan support for TQ2_0 landed"),
                     vulkan=Support(True, "", "PrismML-Eng/llama.cpp#138"),
                     cuda=Support(False, "no TQ2_0 kernels: a GPU run asserts",
                                   "llama.cpp PR #11183 (open), PR #28769; PrismML-Eng/llama.cpp#138")),
    "tq1_0": support(**_TQ_CPU, **_same(True, "", "FORMATS I2_S section: bitnet.cpp runs TQ1_0 and TQ2_0 tensors",
                                        "x86", "arm"),
                     **_same(False, "TQ1_0 is CPU-only", "PrismML-Eng/llama.cpp#138: TQ1_0 is not implemented in "
                             "the CUDA backend, CPU-only", "metal", "vulkan", "cuda")),
    "i2_s": support(**_UPSTREAM_NO, x86=Support(True, "", _BITNET_RUN),
                    arm=Support(False, "garbage on today's NEON CPU builds, which read 64-value blocks; right on "
                                "Metal and on builds with the open 128/32 fixes", f"docs/notes/bitnet-cpp.md; {_I2S_FIXES}"),
                    ik=Support(False, "read only to requantize: llama-quantize --allow-requantize ... iq2_bn",
                               "ik #507; dequantize_row_ms_i2s reads the x86 layout (ECOSYSTEM 2b)")),
    "i2_s_arm": support(**_UPSTREAM_NO, x86=Support(False, "garbage: x86 builds read 128-value blocks", _BITNET_RUN),
                        arm=Support(True, "today's NEON CPU builds only: wrong on Metal and on ARM builds with the "
                                    "open 128/32 fixes", f"{_BITNET_RUN}; {_I2S_FIXES}"),
                        ik=Support(False, "ik reads the x86 I2_S layout only",
                                   "dequantize_row_ms_i2s, iqk_quantize.cpp l.8584 @8337e4c (ECOSYSTEM 2b)")),
    "tl1": support(**_UPSTREAM_NO, x86=Support(False, "TL1 kernels are ARM's", "FORMATS TL1/TL2"),
                   arm=Support(True, "a build generated for the model's shapes: --kernel-config", _BITNET_RUN),
                   ik=Support(False, "unknown type id", _NOT_IK)),
    "tl2": support(**_same(False, "id 39 is MXFP4 upstream", _NOT_UPSTREAM, "cpu", "metal", "vulkan", "cuda"),
                   x86=Support(True, "a build generated for the model's shapes: --kernel-config", _BITNET_RUN),
                   arm=Support(False, "TL2 kernels are x86's", "FORMATS TL1/TL2"),
                   ik=Support(False, "id 39 is MXFP4 in ik", _NOT_IK)),
    "q2_0": support(cpu=Support(True, "", f"{_LLAMA_RUN}; PR #24448"),
                    **_same(True, "", "Bonsai-demo README @70ae3e4: Metal #25419, Vulkan #25430, CUDA #25707 merged",
                            "metal", "vulkan", "cuda"),
                    **_same(False, "unknown type id 42", _NOT_BITNET, "x86", "arm"),
                    ik=Support(False, "no Q2_0", _IK_NO_TQ)),
    "q1_0": support(cpu=Support(True, "", f"{_LLAMA_RUN}; PR #21273"),
                    metal=Support(True, "", "llama.cpp #21528 (cited in PrismML-Eng/llama.cpp#22)"),
                    **_same(True, "", "ECOSYSTEM Q1 table: 1-bit Bonsai Q1_0 on mainline CPU/Metal/CUDA/Vulkan",
                            "vulkan", "cuda"),
                    **_same(False, "unknown type id 41", _NOT_BITNET, "x86", "arm"),
                    ik=Support(True, "as Q1_0_G128, id 41", "ik PRs #1570, #1571: GGML_TYPE_Q1_0_G128 = 41")),
    "iq2_bn": support(**_IK_ONLY, ik=Support(True, "rows of >= 512 values", _IK_RUN)),
    "iq1_bn": support(**_IK_ONLY, ik=Support(True, "rows of >= 512 values", _IK_RUN)),
    "iq2_bn_r4": support(**_IK_ONLY, ik=Support(True, "", _IK_RUN)),
    "f16": support(**_FLOAT_CELLS),
    "f32": support(**_FLOAT_CELLS),
    "q8_0": support(**_FLOAT_CELLS),
    "bf16": support(cpu=Support(True, "", "llama.cpp's convert_hf_to_gguf.py writes it: --outtype bf16 (ECOSYSTEM 1b)")),
}

# what goes wrong without an error message (a file that loads and answers garbage, an id read as another type)
TRAPS: dict[str, tuple[str, ...]] = {
    "i2_s": ("I2_S has two layouts with the same size and id 36 (x86: 128-value blocks, ARM NEON: 64): a file "
             "for one build loads on the other and answers garbage; ours names its build in bitnet_gguf.target "
             "(docs/notes/bitnet-cpp.md)",),
    "i2_s_arm": ("ARM-layout I2_S (64-value blocks) is right for today's NEON CPU builds only: bitnet.cpp on Apple "
                 "Metal reads the x86 layout, and ARM builds that take the open 128/32 fixes (BitNet #585, #586, "
                 "#598, #610) will too; ik_llama.cpp reads the x86 layout only",),
    "tl2": ("id 39 is MXFP4 in upstream llama.cpp and ik_llama.cpp",),
    "q2_0": ("ggml type 42 meant group 128 (34 bytes per 128 values) in PrismML's legacy *-Q2_0.gguf files; ours is "
             "upstream's group 64 (18 bytes per 64): a reader expecting the legacy layout misreads it "
             "(PrismML-Eng/llama.cpp README; tinygrad PR #17612)",),
    "q1_0": ("early PrismML-fork Q1_0 files used ids 40/41 for groups of 32/128 (LM Studio #1729, "
             "llama-turboquant PR #6); ours is upstream's id 41, group 128",),
}



def _ik_minicpm_assumes_other_scales(kv) -> bool:
    """ik_llama.cpp @8337e4c's build_minicpm (src/graphs/build_minicpm.cpp:13-16) never reads the file's
    scalings: it uses embedding scale 12, residual scale 1.4 / sqrt(layers) and logit scale
    hidden / 256. True unless the file's own key/values are those (or cannot be read)."""
    try:
        layers, hidden = kv("minicpm.block_count"), kv("minicpm.embedding_length")
        found = (kv("minicpm.embedding_scale"), kv("minicpm.residual_scale"), kv("minicpm.logit_scale"))
        assumed = (12.0, 1.4 / math.sqrt(layers), hidden / 256)
        return not all(math.isclose(float(f), a, rel_tol=1e-6) for f, a in zip(found, assumed))
    except (TypeError, ValueError, ZeroDivisionError):
        return True


# what goes wrong without an error message for one architecture, whatever the tensor types: per GGUF arch,
# (does it apply to a file with these key/values, what happens); `kv(key)` gives a key's value or None
ARCH_TRAPS: dict[str, tuple] = {
    "minicpm": ((_ik_minicpm_assumes_other_scales,
                 "ik_llama.cpp ignores minicpm.embedding_scale / residual_scale / logit_scale and assumes 12, "
                 "1.4 / sqrt(layers) and hidden / 256 (build_minicpm.cpp @8337e4c): this file's values differ, so "
                 "it runs there with wrong logits (measured: exactly 2x on a synthetic checkpoint; "
                 "docs/notes/ik-llama.md section 10); llama.cpp reads them"),),
}


def arch_traps(arch: str | None, kv) -> list[str]:
    """The ARCH_TRAPS of a file of `arch` whose key/values `kv(key)` gives."""
    return [text for applies, text in ARCH_TRAPS.get(arch or "", ()) if applies(kv)]

@dataclasses.dataclass(frozen=True)
class OutputType:
    name: str                  # registry key: "tq2_0", "i2_s_arm"
    codec: type[Codec]
    file_type: int | None      # general.file_type when this is the --type (llama.cpp's LlamaFileType)
    summary: str               # one phrase for --help (where it runs: from RUNTIME_SUPPORT)
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
    def runtimes(self) -> tuple[tuple[str, Support], ...]:
        """(runtime, Support) for every one of RUNTIMES (RUNTIME_SUPPORT)."""
        return RUNTIME_SUPPORT[self.name]

    @property
    def traps(self) -> tuple[str, ...]:
        return TRAPS.get(self.name, ())

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
    OutputType("tq2_0", TQ2_0, 37, "2.06 bits/weight", ternary_choice=True,
               embedding_choice=True, fallback="f16", from_codes=True),
    OutputType("tq1_0", TQ1_0, 36, "1.69 bits/weight, smallest", ternary_choice=True,
               fallback="f16"),
    OutputType("i2_s", I2_S, 40, "2 bits/weight, bitnet.cpp's fast CPU kernels, "
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
OUTPUT_TYPES["q2_0"] = OutputType("q2_0", Q2_0, 41, "2.25 bits/weight (one scale per "
                                  "64 values: group-scaled checkpoints)", ternary_choice=True, embedding_choice=True,
                                  fallback="f16")
# upstream llama.cpp's Q1_0 (file type MOSTLY_Q1_0 = 40): one fp16 scale and 128 sign bits per 128 values
OUTPUT_TYPES["q1_0"] = OutputType("q1_0", Q1_0, 40, "1.125 bits/weight (binary "
                                  "checkpoints: -s and +s, one s per 128 values; 1-bit Bonsai)", ternary_choice=True,
                                  embedding_choice=True, fallback="f16")
# ik_llama.cpp's own ternary types (docs/notes/ik-llama.md): one scale per row (row meta), blocks of 64
# values; llama ftypes MOSTLY_IQ1_BN = 136, MOSTLY_IQ2_BN = 137, MOSTLY_IQ2_BN_R4 = 337. R4 interleaves
# groups of 4 rows: a projection whose row count is not a multiple of 4 is IQ2_BN (as ik's llama-quantize)
OUTPUT_TYPES.update({t.name: t for t in (
    OutputType("iq2_bn", IQ2_BN, 137, "2 bits/weight + a float32 scale per row",
               ternary_choice=True, fallback="f16", runtime="ik_llama.cpp", run_min_cols=512),
    OutputType("iq1_bn", IQ1_BN, 136, "1.625 bits/weight + an fp16 scale per row",
               ternary_choice=True, fallback="f16", runtime="ik_llama.cpp", run_min_cols=512),
    OutputType("iq2_bn_r4", IQ2_BN_R4, 337, "IQ2_BN with 4 rows interleaved",
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


def runs_in(option: str) -> str:
    """Where a --type runs, short (any of its layouts): "llama.cpp CPU/Metal/Vulkan, bitnet.cpp x86/ARM"."""
    found: dict[str, list[str]] = {}
    for t in OUTPUT_TYPES.values():
        if t.type_option == option:
            for runtime, c in t.runtimes:
                product, _, backend = runtime.partition(" ")
                if c.runs and backend not in found.setdefault(product, []):
                    found[product].append(backend)
    return ", ".join(p + (f" {'/'.join(b for b in backends if b)}" if any(backends) else "")
                     for p, backends in found.items() if backends)


def choices_help(choices: tuple[str, ...]) -> str:
    return "; ".join(f"{n} ({OUTPUT_TYPES[n].summary}; runs in {runs_in(n) or 'no runtime checked'})" for n in choices)


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


def file_runtimes(types) -> dict[str, dict]:
    """Which runtimes load a file whose tensors have these registry entries: per runtime, "runs"
    True when every type runs there, False when one does not, None when one is unknown; "notes"
    the notes of the types that decide it (with the type's name)."""
    types = list(dict.fromkeys(types))
    found = {}
    for runtime in RUNTIMES:
        cells = [(t, dict(t.runtimes)[runtime]) for t in types]
        runs = False if any(c.runs is False for _, c in cells) else \
            None if any(c.runs is None for _, c in cells) else True
        deciding = [(t, c) for t, c in cells if c.runs is runs or (runs is None and c.runs is None)]
        found[runtime] = {"runs": runs, "notes": [f"{t.codec.name}: {c.note}" for t, c in deciding if c.note],
                          "sources": sorted({c.source for _, c in deciding if c.source})}
    return found


def registry_entry(ggml_type: int, target: str | None) -> OutputType | None:
    """The registry entry of a tensor's ggml type in a file laid out for `target` (I2_S's two layouts
    share type 36; a file without the key is taken as x86, the layout other converters write)."""
    found = [t for t in OUTPUT_TYPES.values() if t.ggml_type == ggml_type]
    return next((t for t in found if t.target in (None, target or "x86")), found[0] if found else None)


def runtimes_lines(types, more_traps=()) -> list[str]:
    """What `plan` and `inspect` say about the runtimes of a file of these types: where it runs,
    where not (and why), what nobody checked, and the traps (the types', then `more_traps`)."""
    return runtimes_report_lines(file_runtimes(types),
                                 [*(trap for t in dict.fromkeys(types) for trap in t.traps), *more_traps])


def runtimes_report_lines(found: dict, traps) -> list[str]:
    """The lines of `runtimes_lines` from `file_runtimes`' record and the traps."""
    def named(runs) -> list[str]:
        """The runtimes with this verdict, those with the same notes together: "a, b (why)"."""
        groups: dict[tuple, list[str]] = {}
        for r, v in found.items():
            if v["runs"] is runs:
                groups.setdefault(tuple(v["notes"]), []).append(r)
        return [", ".join(rs) + (f" ({'; '.join(notes)})" if notes else "") for notes, rs in groups.items()]
    lines = [f"runs in: {', '.join(named(True)) or 'none of the runtimes listed'}"]
    if not_in := named(False):
        lines.append(f"not in: {', '.join(not_in)}")
    if unknown := [r for r, v in found.items() if v["runs"] is None]:
        lines.append(f"not checked: {', '.join(unknown)}")
    return lines + [f"trap: {trap}" for trap in dict.fromkeys(traps)]


def runtimes_markdown() -> str:
    """The README's table of which runtime and backend loads each output type (from RUNTIME_SUPPORT
    and TRAPS); `python -m pipeline.outtypes` prints it."""
    def cell(c: Support) -> str:
        word = {True: "yes", False: "no", None: "?"}[c.runs]
        return f"{word} ({c.note})" if c.note else word

    rows = [f"| type | {' | '.join(RUNTIMES)} |", "|---" * (len(RUNTIMES) + 1) + "|"]
    for t in OUTPUT_TYPES.values():
        label = f"`{t.type_option}`" + (f" ({TARGET_NAMES[t.target]} layout)" if t.codec.name == "I2_S" else "")
        rows.append(f"| {label} | " + " | ".join(cell(c) for _, c in t.runtimes) + " |")
    rows.append("")
    rows.append("\"?\": not checked here, and no source found. Traps (a file that loads and answers garbage, or an id "
                "that means another type elsewhere):")
    rows.append("")
    rows += [f"- `{t.type_option}`{f' ({TARGET_NAMES[t.target]} layout)' if t.codec.name == 'I2_S' else ''}: {trap}"
             for t in OUTPUT_TYPES.values() for trap in t.traps]
    rows += [f"- any type, arch `{arch}` (when the file's key/values are not what it assumes): {text}"
             for arch, traps in ARCH_TRAPS.items() for _, text in traps]
    rows.append("")
    rows.append("Sources, per type:")
    rows.append("")
    for t in OUTPUT_TYPES.values():
        sources = "; ".join(dict.fromkeys(c.source for _, c in t.runtimes if c.source))
        rows.append(f"- {t.name}: {sources}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(runtimes_markdown())


def range_refusal(file, tensor: str, role: str, out: OutputType, biggest: float) -> CheckpointError | None:
    """The refusal of a float tensor whose largest magnitude `out` cannot hold (None when it can)."""
    if out.holds(biggest):
        return None
    roomier = [n for n in ("bf16", "f32") if OUTPUT_TYPES[n].holds(biggest)]
    option = "--embedding-type" if role != NORM else "the output type"
    return CheckpointError(f"{file}: tensor {tensor} has values up to {biggest:.6g}, beyond {out.codec.name}'s range "
                           f"({out.largest:.6g}); choose {option} {' or '.join(roomier)}")
