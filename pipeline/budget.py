"""Turn the one `memory_limit` number into chunk sizes and a worker count.

Peak memory = interpreter and libraries (measured at start) + workers x the
working set of one chunk task. A task's working set is a number of bytes per
element that depends on its kernel: BYTES_PER_ELEMENT for float sources (input
in its source type, a float32 copy, temporaries, the encoded output), far fewer
for a packed ternary source, whose kernels never leave 2-bit and 8-bit data;
so the same memory holds larger chunks of it, and a low limit does not multiply
its chunks. We allow two tasks' worth per worker because a scheduler may have
read the next chunk while finishing the current one.
"""
from __future__ import annotations

import dataclasses
import os

import psutil

from pipeline.config import format_size
from pipeline.errors import OptionError

BYTES_PER_ELEMENT = 32          # working set of the heaviest kernel (quantize), per element
# The kernels of a packed ternary projection, per element of a chunk of GGUF rows, peak of numpy's
# allocations (tracemalloc, 512 x 4096 chunks): quantize's quarters_from_packed with the read copy and
# the q/k permutation 4.0; extract's digest of the packed bytes 1.0; assemble's TQ2_0 / I2_S encoding
# of the 2-bit codes 1.0. Half as much again for the allocator and zarr.
PACKED_BYTES_PER_ELEMENT = 6
# A float tensor whose values pass through (an embedding, a head, a norm; not rewritten, not scanned for
# ternary groups), measured as above: extract's row maxima from the bit patterns 4.0; pack's or assemble's
# encoding from BF16 / F16 / F32 into F16 / F32 / Q8_0 at most 8.8, into BF16 10.6 (through float32).
FLOAT_BYTES_PER_ELEMENT = 16
# pack's encoding of 2-bit codes into a ternary type (one scale per tensor or per row; no block scales,
# no kernel tiles), measured as above: TQ2_0 0.8, I2_S 2.5, IQ2_BN / IQ2_BN_R4 3.3, TQ1_0 3.5, Q2_0 3.6,
# IQ1_BN 6.6 (the float types of the codes' values, up to 9.8, are charged BYTES_PER_ELEMENT)
CODES_BYTES_PER_ELEMENT = 10
IN_FLIGHT_PER_WORKER = 2
MIN_CHUNK_BYTES = 4 * 1024**2   # on-disk chunk size range from the design (float32 elements)
MAX_CHUNK_BYTES = 64 * 1024**2
MIN_TASK_ELEMENTS = 256 * 256   # below this the conversion would crawl
CHUNK_QUANTUM = 1 << 20         # elements (4 MiB of float32)
HEADROOM = 96 * 1024**2         # zarr/dask bookkeeping, I/O buffers, allocator slack
# The least a conversion's process uses before any work: Python with numpy, zarr and dask imported
# (about 64 MiB measured, docs/notes/tokenizer-memory.md; kept below that so the bound is safe on
# any host). Every conversion, --vocab-only too, holds that and HEADROOM: a smaller limit is refused
# as an option, before anything is read.
INTERPRETER_FLOOR = 48 * 1024**2
MIN_MEMORY_LIMIT = INTERPRETER_FLOOR + HEADROOM


@dataclasses.dataclass(frozen=True)
class Budget:
    memory_limit: int
    baseline: int
    workers: int
    chunk_elements: int  # elements per chunk (before rounding to whole rows)

    def elements(self, per_element: int = BYTES_PER_ELEMENT) -> int:
        """Elements per chunk of a kernel whose working set is `per_element` bytes an element: the
        memory of chunk_elements of the heaviest kernel, up to the largest chunk, in whole multiples
        of CHUNK_QUANTUM when above it (a rerun measures another baseline, and resumes the same chunks)."""
        if per_element >= BYTES_PER_ELEMENT:
            return self.chunk_elements
        elements = min(self.chunk_elements * BYTES_PER_ELEMENT // per_element, MAX_CHUNK_BYTES // 4)
        return elements // CHUNK_QUANTUM * CHUNK_QUANTUM if elements >= CHUNK_QUANTUM else elements

    def rows_per_chunk(self, shape: tuple[int, ...], multiple: int = 1,
                       per_element: int = BYTES_PER_ELEMENT) -> int:
        """Rows per chunk for a tensor whose kernel's working set is `per_element` bytes an element:
        whole rows, at least one, at most all; a multiple of `multiple` (whole attention heads, say)
        unless the tensor has fewer rows."""
        if len(shape) < 2:
            return shape[0]
        row = max(1, shape[1])
        rows = max(1, min(shape[0], self.elements(per_element) // row))
        if multiple > 1 and rows < shape[0]:
            rows = min(shape[0], max(multiple, rows // multiple * multiple))
        return rows

    def describe(self) -> str:
        return (f"memory limit {format_size(self.memory_limit)}: {self.workers} worker(s), "
                f"chunks of up to {format_size(self.chunk_elements * 4)} (float32), "
                f"baseline {format_size(self.baseline)}")


# The limit a refusal suggests leaves this much above what the process measured, rounded up to a whole
# multiple of it: the baseline of the rerun differs by a MiB or so (allocator, page cache of imports),
# and the limit we name must then work.
SUGGESTION_MARGIN = 8 * 1024**2


def suggested_limit(needed: int) -> int:
    """A limit to name in a refusal: `needed` plus SUGGESTION_MARGIN, up to a whole multiple of it."""
    return -(-(needed + SUGGESTION_MARGIN) // SUGGESTION_MARGIN) * SUGGESTION_MARGIN


def check_memory_limit(memory_limit: int, option: str = "--memory-limit") -> int:
    """Refuse a limit below what any conversion needs (MIN_MEMORY_LIMIT), naming the minimum."""
    if memory_limit < MIN_MEMORY_LIMIT:
        raise OptionError(f"{option} {format_size(memory_limit)} is too small for any conversion (the interpreter "
                          f"and its libraries, plus working headroom); allow at least {format_size(MIN_MEMORY_LIMIT)}")
    return memory_limit


def minimum_task_bytes(workers: int = 1) -> int:
    """Memory of the smallest chunk work the conversion can do."""
    return workers * MIN_TASK_ELEMENTS * BYTES_PER_ELEMENT * IN_FLIGHT_PER_WORKER


def current_rss() -> int:
    return psutil.Process().memory_info().rss


WORKER_PROCESS_OVERHEAD = 160 * 1024**2  # an interpreter with dask.distributed, per worker process


def plan_budget(memory_limit: int, workers: int = 0, baseline: int | None = None,
                worker_processes: bool = False, reserve: int = 0, per_element: int = BYTES_PER_ELEMENT) -> Budget:
    """`worker_processes`: tasks run in separate processes (--cluster local), each costing
    WORKER_PROCESS_OVERHEAD on top of its chunks; `reserve`: memory some later step needs on top
    of what this process holds now (assemble reading the key/values back); `per_element`: the
    working set per element of the kernel that handles most of the conversion's elements, which
    decides how many workers still get chunks of at least MIN_CHUNK_BYTES."""
    baseline = (current_rss() if baseline is None else baseline) + reserve
    if worker_processes:
        if not workers:  # as many processes as fit beside their minimum chunk memory
            per_process = WORKER_PROCESS_OVERHEAD + MIN_TASK_ELEMENTS * BYTES_PER_ELEMENT * IN_FLIGHT_PER_WORKER
            workers = max(1, min(os.cpu_count() or 1, (memory_limit - baseline - HEADROOM) // per_process))
        baseline += workers * WORKER_PROCESS_OVERHEAD
    usable = memory_limit - baseline - HEADROOM
    per_task_min = MIN_TASK_ELEMENTS * BYTES_PER_ELEMENT * IN_FLIGHT_PER_WORKER
    minimum = suggested_limit(baseline + HEADROOM + per_task_min)
    if usable < per_task_min:
        raise OptionError(f"--memory-limit {format_size(memory_limit)} is too small: this process already uses "
                          f"{format_size(baseline)}; allow at least {format_size(minimum)}")
    if workers == 0:
        workers = os.cpu_count() or 1
        # more workers only while each still gets a chunk of at least the minimum size
        while workers > 1 and usable // (workers * min(per_element, BYTES_PER_ELEMENT) * IN_FLIGHT_PER_WORKER) * 4 \
                < MIN_CHUNK_BYTES:
            workers -= 1
    per_worker = usable // workers
    elements = per_worker // (BYTES_PER_ELEMENT * IN_FLIGHT_PER_WORKER)
    elements = min(elements, MAX_CHUNK_BYTES // 4)
    # whole multiples of 4 MiB of float32 when above the minimum, so the small differences in the measured
    # baseline between two runs do not change the chunk layout (a rerun resumes the same chunks)
    if elements >= CHUNK_QUANTUM:
        elements = elements // CHUNK_QUANTUM * CHUNK_QUANTUM
    if elements < MIN_TASK_ELEMENTS:
        raise OptionError(f"--memory-limit {format_size(memory_limit)} is too small for {workers} workers; "
                          f"use fewer --workers or a limit of at least {format_size(suggested_limit(baseline + HEADROOM + workers * per_task_min))}")
    return Budget(memory_limit, baseline, workers, elements)
