"""The memory ceiling holds by design: a tensor twice the limit converts under it."""
from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import ROOT
from tests.peak_rss import run_measuring_peak

MiB = 1024**2


def convert_measuring_peak(model, out, *options) -> dict:
    """`bitnet-gguf convert` as a user runs it, with the peak RSS of its whole process tree."""
    return run_measuring_peak([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out),
                               *map(str, options), "--no-progress"], env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_one_gib_embedding_converts_under_512mib(checkpoint, tmp_path):
    # token_embd is 65536 x 4096 float32 = 1 GiB; the attention projections are 64 MiB each
    model = checkpoint(hidden_size=4096, intermediate_size=256, num_layers=1, num_heads=32,
                       vocab_size=65536, dtype="f32")
    assert (model / "model.safetensors").stat().st_size > 1024 * MiB
    out = tmp_path / "big.gguf"
    limit = 512 * MiB
    r = convert_measuring_peak(model, out, "--memory-limit", "512MiB")
    assert r["exit"] == 0, r["stderr"]
    peak = r["peak"]
    print(f"peak RSS of the conversion: {peak / MiB:.0f} MiB (limit {limit / MiB:.0f} MiB)")
    assert peak <= limit, f"peak RSS {peak / MiB:.0f} MiB exceeds --memory-limit 512MiB"
    assert out.stat().st_size > 512 * MiB  # the F16 embedding alone is 512 MiB


@pytest.mark.slow
def test_packed_checkpoint_with_embedding_and_head_twice_the_limit(tmp_path):
    """Llama3-8B-1.58's largest tensors are its bf16 embedding and lm_head: here each is
    65536 x 4096 bf16 = 512 MiB, together twice --memory-limit 512MiB."""
    from tests.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "packed", "llama3-1.58", hidden_size=4096, intermediate_size=1024,
                             num_layers=1, num_heads=32, num_kv_heads=8, vocab_size=65536)
    assert (model / "model.safetensors").stat().st_size > 1024 * MiB
    out = tmp_path / "packed.gguf"
    limit = 512 * MiB
    r = convert_measuring_peak(model, out, "--memory-limit", "512MiB")
    assert r["exit"] == 0, r["stderr"]
    peak = r["peak"]
    print(f"peak RSS of the conversion: {peak / MiB:.0f} MiB (limit {limit / MiB:.0f} MiB)")
    assert peak <= limit, f"peak RSS {peak / MiB:.0f} MiB exceeds --memory-limit 512MiB"
    assert out.stat().st_size > 1024 * MiB  # the two F16 tensors alone are 1 GiB


@pytest.mark.slow
def test_a_rerun_under_a_smaller_limit_honours_it(checkpoint, tmp_path):
    """extract ran under 4GiB (64 MiB chunks); the rerun under 256MiB must not work in those chunks."""
    import json

    model = checkpoint(hidden_size=4096, intermediate_size=256, num_layers=1, num_heads=32,
                       vocab_size=65536, dtype="f32")
    out, work = tmp_path / "big.gguf", tmp_path / "work"
    first = convert_measuring_peak(model, out, "--workdir", work, "--memory-limit", "4GiB")
    assert first["exit"] == 0, first["stderr"]
    expected = out.read_bytes()
    out.unlink()
    manifest = json.loads((work / "manifest.json").read_text())
    for stage in ("quantize", "pack", "assemble"):  # as if it had been stopped after extract
        manifest["stages"].pop(stage)
    (work / "manifest.json").write_text(json.dumps(manifest))
    r = convert_measuring_peak(model, out, "--workdir", work, "--memory-limit", "256MiB")
    assert r["exit"] == 0, r["stderr"]
    print(f"peak RSS: {first['peak'] / MiB:.0f} MiB under 4GiB, then {r['peak'] / MiB:.0f} MiB under 256MiB")
    assert r["peak"] <= 256 * MiB
    assert out.read_bytes() == expected
    # the stages after extract work in chunks of the new budget, not in extract's
    chunk_rows = {s: json.loads((work / f"{s}.zarr" / "token_embd.weight" / "zarr.json").read_text())
                  ["chunk_grid"]["configuration"]["chunk_shape"][0] for s in ("extract", "quantize", "pack")}
    assert chunk_rows["quantize"] < chunk_rows["extract"] and chunk_rows["pack"] < chunk_rows["extract"], chunk_rows


@pytest.mark.slow
def test_packed_projections_in_large_chunks_stay_under_256mib(tmp_path):
    """A packed checkpoint's kernels need a few bytes an element, so under --memory-limit 256MiB its
    projections are chunked several times larger than a float tensor's (pipeline/budget.py
    PACKED_BYTES_PER_ELEMENT): the peak of the whole process tree must still stay under the limit,
    the chunks must be the plan's in extract and quantize, and the file the same bytes as under 1GiB."""
    import json

    from tests.synthetic import write_checkpoint

    # one Llama3-8B-1.58 layer: FFN projections of 14336 x 4096, packed 2 bits a value
    model = write_checkpoint(tmp_path / "packed", "llama3-1.58", hidden_size=4096, intermediate_size=14336,
                             num_layers=1, num_heads=32, num_kv_heads=8, vocab_size=1024)
    out, work = tmp_path / "packed.gguf", tmp_path / "work"
    r = convert_measuring_peak(model, out, "--workdir", work, "--memory-limit", "256MiB")
    assert r["exit"] == 0, r["stderr"]
    print(f"peak RSS of the conversion: {r['peak'] / MiB:.0f} MiB (limit 256 MiB)")
    assert r["peak"] <= 256 * MiB - 32 * MiB, f"peak RSS {r['peak'] / MiB:.0f} MiB: less than 32 MiB of margin"
    record = json.loads((work / "plan.json").read_text())
    plan = {t["name"]: t for t in record["tensors"]}
    gate = plan["blk.0.ffn_gate.weight"]["chunk_rows"]

    def chunk_rows(stage: str, name: str) -> int:
        meta = json.loads((work / f"{stage}.zarr" / name / "zarr.json").read_text())
        return meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    for name, t in plan.items():
        if len(t["shape"]) > 1:
            assert [chunk_rows(s, name) for s in ("extract", "quantize")] == \
                [t["chunk_rows"]["extract"], t["chunk_rows"]["quantize"]], name
    # a chunk of the heaviest kernel under the same budget (chunk_elements) is at least 2x smaller
    assert gate["quantize"] * 4096 >= 2 * record["chunk_elements"], (gate, record["chunk_elements"])
    reference = tmp_path / "reference.gguf"
    r = convert_measuring_peak(model, reference, "--memory-limit", "1GiB")
    assert r["exit"] == 0, r["stderr"]
    assert out.read_bytes() == reference.read_bytes()
