"""The memory ceiling holds by design: a tensor twice the limit converts under it."""
from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import ROOT
from tests.peak_rss import run_measuring_peak

MiB = 1024**2


@pytest.mark.slow
def test_one_gib_embedding_converts_under_512mib(checkpoint, tmp_path):
    # token_embd is 65536 x 4096 float32 = 1 GiB; the attention projections are 64 MiB each
    model = checkpoint(hidden_size=4096, intermediate_size=256, num_layers=1, num_heads=32,
                       vocab_size=65536, dtype="f32")
    assert (model / "model.safetensors").stat().st_size > 1024 * MiB
    out = tmp_path / "big.gguf"
    limit = 512 * MiB
    r = run_measuring_peak([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out),
                            "--memory-limit", "512MiB", "--no-progress"], env={**os.environ, "PYTHONPATH": str(ROOT)})
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
    r = run_measuring_peak([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out),
                            "--memory-limit", "512MiB", "--no-progress"], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r["exit"] == 0, r["stderr"]
    peak = r["peak"]
    print(f"peak RSS of the conversion: {peak / MiB:.0f} MiB (limit {limit / MiB:.0f} MiB)")
    assert peak <= limit, f"peak RSS {peak / MiB:.0f} MiB exceeds --memory-limit 512MiB"
    assert out.stat().st_size > 1024 * MiB  # the two F16 tensors alone are 1 GiB
