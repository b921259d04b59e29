"""The memory budget: what one --memory-limit turns into."""
from __future__ import annotations

import pytest

from pipeline.budget import (BYTES_PER_ELEMENT, HEADROOM, IN_FLIGHT_PER_WORKER, MAX_CHUNK_BYTES, plan_budget)
from pipeline.errors import OptionError

MiB = 1024**2


@pytest.mark.parametrize("limit_mib", [300, 512, 1024, 4096, 16384])
@pytest.mark.parametrize("workers", [0, 1, 2, 8])
def test_workers_times_chunk_working_set_fits_the_limit(limit_mib, workers):
    baseline = 120 * MiB
    try:
        b = plan_budget(limit_mib * MiB, workers, baseline=baseline)
    except OptionError:
        assert limit_mib <= 512  # only small limits may be refused
        return
    working = b.workers * IN_FLIGHT_PER_WORKER * BYTES_PER_ELEMENT * b.chunk_elements
    assert baseline + HEADROOM + working <= limit_mib * MiB
    assert b.chunk_elements * 4 <= MAX_CHUNK_BYTES
    if workers:
        assert b.workers == workers


def test_rows_per_chunk_are_whole_rows_within_the_chunk():
    b = plan_budget(512 * MiB, 1, baseline=100 * MiB)
    for shape in [(128256, 4096), (14336, 4096), (4096, 14336), (10, 3), (3, 10**7)]:
        rows = b.rows_per_chunk(shape)
        assert 1 <= rows <= shape[0]
        assert rows == 1 or rows * shape[1] <= b.chunk_elements
    assert b.rows_per_chunk((4096,)) == 4096  # 1-D tensors are one chunk


def test_a_limit_below_the_baseline_is_refused_with_the_minimum():
    with pytest.raises(OptionError, match="allow at least"):
        plan_budget(200 * MiB, 0, baseline=180 * MiB)
