"""assemble: pack.zarr -> model.gguf.

`gguf.GGUFWriter` writes the header, key/values and tensor infos; the tensor
data is then streamed chunk by chunk from pack.zarr with the writer's own
alignment padding, so no tensor is held whole. The file is written next to the
output as `<name>.partial`, fsynced, and renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np

from pipeline.context import StageContext
from pipeline.metadata import apply_kv
from pipeline.stores import open_store, row_ranges

FILE_TYPES = {"tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0, "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0}


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def write_gguf(group, metadata: dict, path: Path, out_type: str, progress) -> None:
    names = group.attrs["tensor_order"]
    arrays = [group[n] for n in names]
    writer = gguf.GGUFWriter(path, metadata["arch"])
    apply_kv(writer, metadata["kv"])
    writer.add_file_type(int(FILE_TYPES[out_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, arr in zip(names, arrays):
        writer.add_tensor_info(name, arr.shape, np.dtype(np.uint8), arr.nbytes,
                               raw_dtype=gguf.GGMLQuantizationType(arr.attrs["ggml_type"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    with progress(sum(a.nbytes for a in arrays), "assemble", unit="B", unit_scale=True, unit_divisor=1024) as bar:
        for arr in arrays:
            writer.write_padding(fout, fout.tell())
            for r0, r1 in row_ranges(arr.shape[0], arr.chunks[0]):
                chunk = np.ascontiguousarray(arr[r0:r1])
                fout.write(chunk.data)
                bar.update(chunk.nbytes)
            writer.write_padding(fout, arr.nbytes)
    fout.flush()
    os.fsync(fout.fileno())
    writer.close()


def run(ctx: StageContext) -> None:
    group = open_store(ctx.input, "r")
    output = ctx.output
    tmp = partial_path(output)
    try:
        metadata = json.loads(ctx.metadata.read_text(encoding="utf-8"))
        write_gguf(group, metadata, tmp, group.attrs["out_type"], ctx.scheduler.bar)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
