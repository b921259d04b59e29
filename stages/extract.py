"""extract: safetensors -> extract.zarr, one array per tensor in its source representation.

bf16 is stored as its uint16 bit pattern (attribute `source_dtype` says so). Rows
are copied in chunks with `os.pread`; no tensor is ever read whole. The store's
attributes record the family, config, tensor order and GGUF key/values.
"""
from __future__ import annotations

from pipeline.context import StageContext
from pipeline.safetensors_io import TensorSource
from pipeline.scheduler import chunk_task
from pipeline.stores import array_path, ensure_array, open_array, open_store, row_ranges, written_chunks


def copy_rows(source: TensorSource, out: str, start: int, stop: int) -> None:
    open_array(out)[start:stop] = source.read_rows(start, stop)


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
        "gguf_kv": ckpt.kv,
    })
    tasks = []
    for t in plan.tensors:
        src = ckpt.sources[t.hf_name]
        rows = ctx.budget.rows_per_chunk(t.shape)
        arr = ensure_array(group, t.gguf_name, t.shape, rows, src.np_dtype, {
            "hf_name": t.hf_name, "role": t.role, "source_dtype": src.dtype,
            "source_file": src.file.name,
        })
        done = written_chunks(arr)
        out = array_path(ctx.output, t.gguf_name)
        for i, (r0, r1) in enumerate(row_ranges(t.shape[0], rows)):
            if i not in done:
                tasks.append(chunk_task(copy_rows, src, out, r0, r1))
    ctx.scheduler.run(tasks, "extract")
