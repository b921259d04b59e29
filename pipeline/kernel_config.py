"""--kernel-config: the kernel_config.ini that bitnet.cpp's code generator wrote for a build.

bitnet.cpp's lookup-table kernels (TL1 on ARM, TL2 on x86) are generated for exact matrix
shapes: `utils/codegen_tl1.py` / `codegen_tl2.py` (run by `setup_env.py`) write the kernel
header and `include/kernel_config.ini`, one section per (m, k) shape with its tiles:

    [Kernels_0]
    m = 3200        rows (output features)
    k = 8640        columns (input features)
    bm = 160        BM, rows per tile
    bk = 96         BK, columns per K block
    bmm = 32        bm, rows per SIMD tile

A TL file's bytes depend on these tiles, and the build can only run the shapes it was
generated for. So every ternary projection's shape must be in the file, once, with tiles
that divide it; anything else is refused before any work, naming the file and the section
(or the missing shapes and the tiles the code generator needs for them).
"""
from __future__ import annotations

import configparser
from pathlib import Path

from pipeline.codecs import Tiles
from pipeline.errors import OptionError
from pipeline.safe_files import read_option_file

KEYS = ("m", "k", "bm", "bk", "bmm")
# a build's file has a section per projection shape (a few hundred bytes); ConfigParser holds
# about 52 bytes per byte of a file of sections (measured), so the cap keeps it near 64 MiB
MAX_BYTES = 1024**2
BYTES_PER_BYTE = 64
# tiles bitnet.cpp's setup_env uses, tried in this order when suggesting tiles for a shape
SUGGESTED_BM = (256, 160, 128, 320, 64, 32)
SUGGESTED = {"tl1": ((128, 32), (64, 32), (64, 64), (128, 64)), "tl2": ((96, 32), (192, 32))}  # (BK, bm)


def read_kernel_config(path: Path, codec, memory_limit: int | None = None) \
        -> tuple[tuple[int, int, int, int, int], ...]:
    """The (m, k, BM, BK, bm) of every section, checked for `codec` (TL1 or TL2); the file is refused
    unread when parsing it would not fit in `memory_limit`."""
    option = f"--kernel-config {path}"
    kind = "the include/kernel_config.ini your bitnet.cpp build was generated with"
    data = read_option_file(path, "--kernel-config", kind, MAX_BYTES, BYTES_PER_BYTE, memory_limit)
    # strict: a section or key given twice is refused; no interpolation: '%' is only a character
    # here (the value is then refused as not a whole number), not a reference to another key
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(data.decode("utf-8"), source=str(path))
    except UnicodeDecodeError:
        raise OptionError(f"{option}: not a text file; give bitnet.cpp's include/kernel_config.ini") from None
    except configparser.Error as e:
        first = " ".join(str(e).split())
        raise OptionError(f"{option}: not a kernel config ({first[:200]})") from None
    if not parser.sections():
        raise OptionError(f"{option}: no [Kernels_N] sections; give the include/kernel_config.ini bitnet.cpp's "
                          "code generator wrote")
    entries, seen = [], {}
    for section in parser.sections():
        where = f"{option}: [{section}]"
        values = {}
        for key in KEYS:
            text = parser.get(section, key, fallback=None)
            if text is None:
                raise OptionError(f"{where} has no {key} (each section needs {', '.join(KEYS)})")
            try:
                values[key] = int(text)
            except ValueError:
                raise OptionError(f"{where}: {key} = {text!r} is not a whole number") from None
            if values[key] <= 0:
                raise OptionError(f"{where}: {key} = {values[key]} must be positive")
        shape = (values["m"], values["k"])
        if shape in seen:
            raise OptionError(f"{where} names (m, k) = {shape} again (first in [{seen[shape]}]); bitnet.cpp would "
                              "use only the first: keep one")
        seen[shape] = section
        tiles = Tiles(values["bm"], values["bk"], values["bmm"])
        problem = codec.tile_problem(*shape, tiles)
        if problem:
            raise OptionError(f"{where}: {problem}, so (m, k) = {shape} cannot be {codec.name} with these tiles; "
                              f"regenerate the kernels with tiles that divide the shape")
        entries.append((*shape, *tiles))
    return tuple(entries)


def tiles_of(kernel_tiles, shape) -> Tiles | None:
    for m, k, BM, BK, bm in kernel_tiles:
        if (m, k) == tuple(shape):
            return Tiles(BM, BK, bm)
    return None


def suggest_tiles(codec, m: int, k: int) -> Tiles | None:
    """Tiles bitnet.cpp's code generator would accept for (m, k), if any."""
    for BK, bm in SUGGESTED[codec.name.lower()]:
        for BM in SUGGESTED_BM:
            tiles = Tiles(BM, BK, bm)
            if codec.tile_problem(m, k, tiles) is None:
                return tiles
    return None


def missing_shapes_message(path: Path | None, codec, missing: dict[tuple[int, int], list[str]]) -> str:
    """One line: which shapes a build needs kernels for, and tiles bitnet.cpp's code generator accepts."""
    shapes, usable = [], []
    for (m, k), names in missing.items():
        tiles = suggest_tiles(codec, m, k)
        shapes.append(f"({m}, {k}) [{names[0]}{' ...' if len(names) > 1 else ''}]")
        usable.append(f"({m}, {k}): bm {tiles.BM} bk {tiles.BK} bmm {tiles.bm}" if tiles else
                      f"({m}, {k}): none (cannot be {codec.name})")
    script = f"utils/codegen_{codec.name.lower()}.py"
    head = f"--kernel-config {path}: no section for" if path else \
        f"--type {codec.name.lower()} needs --kernel-config PATH (the include/kernel_config.ini of your bitnet.cpp " \
        "build); this model needs kernels for"
    return (f"{head} (m, k) = {', '.join(shapes)}; generate them with bitnet.cpp's {script} (--BM/--BK/--bm per "
            f"shape; tiles that fit: {'; '.join(usable)}) and give its kernel_config.ini")
