"""What the runner hands to a stage's `run(ctx)`."""
from __future__ import annotations

import dataclasses
from typing import Callable
from pathlib import Path

from pipeline.budget import Budget
from pipeline.checkpoint import Checkpoint
from pipeline.config import Options
from pipeline.plan import Plan
from pipeline.scheduler import Scheduler


@dataclasses.dataclass
class StageContext:
    options: Options
    budget: Budget
    scheduler: Scheduler
    input: Path | None          # previous stage's store (None for extract)
    output: Path                # this stage's store, or the GGUF path for assemble
    checkpoint: Checkpoint | None = None  # extract only
    log: Callable[[str], None] = print
    metadata: Path | None = None  # the run directory's metadata.json (GGUF key/values), for assemble
    before_publish: Callable[[], None] | None = None  # assemble: last check before the files appear
    outputs_before: list | None = None  # assemble: what was at the output path(s) when the conversion started
    outputs: list[Path] = dataclasses.field(default_factory=list)  # assemble: the files it wrote
    plan: "Plan | None" = None  # the run's plan (plan.json): every tensor's output type, part and offset
    # assemble with --low-disk: the progress a killed run recorded ({"tensors", "lengths", "files"}, continued),
    # and record(tensors, lengths, inodes), called once a tensor is on disk, before its codes are removed
    resume: dict | None = None
    record: Callable[[int, list[int], list[int]], None] | None = None
