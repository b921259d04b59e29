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


@pytest.mark.parametrize("limit_mib", [256, 300, 1024, 4096])
@pytest.mark.parametrize("per_element", [6, 10, 16])
def test_a_lighter_kernel_gets_larger_chunks_in_the_same_memory(limit_mib, per_element):
    """A kernel of `per_element` bytes an element (a packed source's, pipeline/budget.py) gets chunks of
    the same memory as the heaviest kernel's: more elements, never more bytes, never past the largest
    chunk, and whole multiples of CHUNK_QUANTUM above it (a rerun resumes the same chunks)."""
    from pipeline.budget import CHUNK_QUANTUM

    for workers in (1, 2):
        b = plan_budget(limit_mib * MiB, workers, baseline=100 * MiB)
        n = b.elements(per_element)
        usable = limit_mib * MiB - 100 * MiB - HEADROOM
        assert b.workers * IN_FLIGHT_PER_WORKER * per_element * n <= usable
        assert b.chunk_elements <= n <= MAX_CHUNK_BYTES // 4
        assert n == MAX_CHUNK_BYTES // 4 or n >= b.chunk_elements * BYTES_PER_ELEMENT // per_element // 2
        assert n < CHUNK_QUANTUM or n % CHUNK_QUANTUM == 0
        assert b.elements(BYTES_PER_ELEMENT) == b.chunk_elements
        rows = b.rows_per_chunk((14336, 4096), per_element=per_element)
        assert rows == min(14336, n // 4096)


def test_the_worker_count_follows_the_kernel_doing_most_of_the_work():
    """256MiB: one worker when the conversion's elements go through the heaviest kernel (two would get
    chunks under MIN_CHUNK_BYTES), both cores for a packed checkpoint's, whose chunks stay large."""
    import os

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core")
    assert plan_budget(256 * MiB, 0, baseline=100 * MiB).workers == 1
    assert plan_budget(256 * MiB, 0, baseline=100 * MiB, per_element=6).workers == 2
