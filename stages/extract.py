"""extract: safetensors -> extract.zarr, one array per tensor in its source representation.

bf16 is stored as its uint16 bit pattern (attribute `source_dtype` says so); packed
uint8 projections stay packed (4 codes per byte), with their checked `weight_scale`
in the tensor's recipe. Rows are copied in chunks with `os.pread`; no tensor is ever
read whole. Packed bytes are checked here, in the first pass that reads them: a
2-bit field holding 3 is not a ternary code. The store's attributes record the
family, config, tensor order and each tensor's recipe.
"""
from __future__ import annotations

import numpy as np

from pipeline.context import StageContext
from pipeline.errors import CheckpointError
from pipeline.safetensors_io import TensorSource
from pipeline.scheduler import chunk_task
from pipeline.stores import array_path, ensure_array, open_array, open_store, row_ranges, written_chunks


def invalid_packed_fields(block: np.ndarray) -> int:
    """How many 2-bit fields of a packed uint8 block hold 3 (only 0, 1, 2 are codes)."""
    both_bits = (block >> 1) & block & np.uint8(0x55)
    if not both_bits.any():
        return 0
    return int(np.unpackbits(both_bits).sum())


def copy_rows(source: TensorSource, out: str, start: int, stop: int, packed: bool) -> None:
    block = source.read_rows(start, stop)
    if packed and (bad := invalid_packed_fields(block)):
        raise CheckpointError(f"{source.file}: tensor {source.name} holds {bad} packed 2-bit field(s) of value 3 "
                              f"in rows {start}..{stop}; only 0, 1 and 2 are ternary codes, the file is corrupt")
    open_array(out)[start:stop] = block


def run(ctx: StageContext) -> None:
    ckpt = ctx.checkpoint
    plan = ckpt.plan
    group = open_store(ctx.output)
    group.attrs.update({
        "stage": "extract",
        "family": plan.family.name,
        "arch": plan.arch,
        "model_dir": str(ckpt.model_dir),
        "config": plan.config,
        "tensor_order": [t.gguf_name for t in plan.tensors],
    })
    tasks = []
    for t in plan.tensors:
        src = ckpt.sources[t.hf_name]
        rows = ctx.budget.rows_per_chunk(src.shape)
        arr = ensure_array(group, t.gguf_name, src.shape, rows, src.np_dtype, {
            "hf_name": t.hf_name, "role": t.role, "source_dtype": src.dtype,
            "source_file": src.file.name, "shape": list(t.shape), "recipe": t.recipe.as_json(),
        })
        done = written_chunks(arr)
        out = array_path(ctx.output, t.gguf_name)
        for i, (r0, r1) in enumerate(row_ranges(src.shape[0], rows)):
            if i not in done:
                tasks.append(chunk_task(copy_rows, src, out, r0, r1, t.recipe.packed))
    ctx.scheduler.run(tasks, "extract")
