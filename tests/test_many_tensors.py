"""Per-tensor cost is constant (issue 23: a model with many experts has tens of thousands of
tensors). Timings are not asserted: the work a conversion does, counted in function calls of the
process that plans, records and schedules, must grow linearly with the number of tensors. A cost
per tensor that itself grows with the tensor count (a walk over every file of a store for each
array, a scan of the whole plan for each tensor) makes the calls per added tensor grow with N."""
from __future__ import annotations

import cProfile
import pstats

from pipeline.cli import main
from tests.synthetic import write_checkpoint


def calls_of_a_conversion(tmp_path, layers: int, tag: str = "") -> tuple[int, int]:
    """(function calls of `convert` in this process, tensors) for a 1bitLLM checkpoint of tiny
    projections (11 tensors a layer)."""
    model = write_checkpoint(tmp_path / f"m{layers}{tag}", "1bitllm", hidden_size=256, intermediate_size=256,
                             num_layers=layers, num_heads=2)
    out = tmp_path / f"m{layers}{tag}.gguf"
    profile = cProfile.Profile()
    profile.enable()
    code = main(["convert", str(model), "-o", str(out), "--workers", "1", "--no-progress"])
    profile.disable()
    assert code == 0
    return pstats.Stats(profile).total_calls, 11 * layers + 2


def test_calls_per_tensor_do_not_grow_with_the_tensor_count(tmp_path):
    # a first conversion in this process does once what no later one does (imports, compiled
    # expressions, zarr's parsed layouts): hundreds of thousands of calls, as many as ~100 tensors
    # cost, which would make the first increment below look small. Not measured.
    calls_of_a_conversion(tmp_path, 2, "-warm-up")
    (a, na), (b, nb), (c, nc) = (calls_of_a_conversion(tmp_path, n) for n in (4, 12, 36))
    small, large = (b - a) / (nb - na), (c - b) / (nc - nb)
    print(f"function calls per added tensor: {small:.0f} ({na} -> {nb} tensors), {large:.0f} ({nb} -> {nc})")
    # linear: both increments equal but for noise (the threads' waits); a quadratic term of the
    # size of the ones fixed for issue 23 made the second one several times the first
    assert large <= 1.25 * small, (small, large)
