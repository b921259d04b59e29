"""What `--low-disk` removes as assemble writes the output: the code chunk files of the tensors
the temporary GGUF already holds, in pack.zarr and the quantize.zarr it hard-links. The runner
(removing what a kill left between a record and its removal, checking pack.zarr without them)
and assemble share these, so they live here rather than in a stage."""
from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

from pipeline.plan import gguf_tensors
from pipeline.stores import get_array, open_store

_Member = namedtuple("_Member", "name stack")


def code_stores(pack: Path) -> list[Path]:
    """The stores whose chunk files --low-disk removes as the output grows: pack.zarr and the
    quantize.zarr beside it (pack's code arrays are hard links to its chunk files)."""
    return [Path(pack), Path(pack).parent / "quantize.zarr"]


def remove_codes(pack: Path, names: list[str]) -> None:
    """Remove the chunk files of the arrays `names` from pack.zarr and quantize.zarr (their
    records and zarr.json stay: a few bytes each)."""
    for store in code_stores(pack):
        for name in names:
            chunks = store / name / "c"
            if chunks.is_dir() and not chunks.is_symlink():
                shutil.rmtree(chunks)


def consumed_names(pack: Path, tensors: int) -> list[str]:
    """The pack.zarr arrays of the first `tensors` GGUF tensors: the ones --low-disk has removed."""
    group = open_store(pack, "r")
    members = [_Member(name, get_array(group, name).attrs.get("stack")) for name in group.attrs["tensor_order"]]
    return [members[i].name for _, indices in gguf_tensors(members)[:tensors] for i in indices]
