"""Run the four stages in order, skipping what an earlier run already finished."""
from __future__ import annotations

import importlib
import math
import os
import shutil
import time
from pathlib import Path

from pipeline.budget import current_rss, plan_budget
from pipeline.checkpoint import open_checkpoint
from pipeline.config import Options, format_size
from pipeline.context import StageContext
from pipeline.errors import RunDirError
from pipeline.families import TERNARY
from pipeline.rundir import STAGES, RunDir, stage_key
from pipeline.scheduler import Scheduler

# Bump when a stage's output for the same input changes, so old stores are redone.
STAGE_VERSIONS = {"extract": 2, "quantize": 2, "pack": 2, "assemble": 2}


def stage_keys(opts: Options, ckpt) -> dict[str, str]:
    keys = {}
    # extract depends on the weight files and the tensor plan only: a tokenizer or metadata
    # change (the key/values) redoes assemble alone
    plan = [[t.hf_name, t.gguf_name, list(t.shape), t.recipe.as_json()] for t in ckpt.plan.tensors]
    keys["extract"] = stage_key("extract", STAGE_VERSIONS["extract"], ckpt.fingerprint, plan)
    keys["quantize"] = stage_key(keys["extract"], "quantize", STAGE_VERSIONS["quantize"])
    keys["pack"] = stage_key(keys["quantize"], "pack", STAGE_VERSIONS["pack"], opts.out_type)
    keys["assemble"] = stage_key(keys["pack"], "assemble", STAGE_VERSIONS["assemble"], str(opts.output), ckpt.kv)
    return keys


def _finished(stage: str, state: dict | None, key: str, opts: Options) -> bool:
    if not state or state.get("key") != key or state.get("state") != "done":
        return False
    if stage == "assemble":  # the product must still be there, unchanged
        out = opts.output
        return out.is_file() and out.stat().st_size == state.get("size") and out.stat().st_mtime_ns == state.get("mtime_ns")
    return True


def convert(opts: Options, log) -> Path:
    ckpt = open_checkpoint(opts.model_dir, name=opts.model_name or None, tokenizer_pre=opts.tokenizer_pre)
    for stage in STAGES:  # import everything first, so the budget's baseline includes it
        importlib.import_module(f"stages.{stage}")
    budget = plan_budget(opts.memory_limit, opts.workers, worker_processes=opts.scheduler == "local")
    plan = ckpt.plan
    log(f"model: {opts.model_dir} ({plan.family.description}, {len(plan.tensors)} tensors)")
    log(f"output: {opts.output} ({opts.out_type.upper()}, GGUF arch {plan.arch})")
    log(f"run directory: {opts.workdir}")
    log(budget.describe())
    keys = stage_keys(opts, ckpt)

    worker_memory = max(1, (opts.memory_limit - current_rss()) // budget.workers)
    scheduler = Scheduler(opts.scheduler, budget.workers, worker_memory, opts.progress)
    try:
        with RunDir(opts.workdir) as run:
            _run_stages(opts, ckpt, budget, scheduler, run, keys, log)
    finally:
        scheduler.close()
    size = opts.output.stat().st_size
    kept = RunDir(opts.workdir).stores_size()
    log(f"wrote {opts.output} ({format_size(size)})")
    log(f"run directory kept for inspection and reruns: {opts.workdir} ({format_size(kept)}); "
        "delete it when you no longer need it")
    return opts.output


def disk_needed(ckpt, out_type: str) -> tuple[int, int]:
    """(bytes the run directory will hold, bytes of the GGUF), estimated from the plan."""
    from stages.pack import choose_codec

    extract = codes = packed = 0
    for t in ckpt.plan.tensors:
        n = math.prod(t.shape)
        extract += math.prod(t.source_shape) * ckpt.sources[t.hf_name].np_dtype.itemsize
        if t.role == TERNARY:
            codes += n // 2  # int8 codes, compressed; generous
        else:
            codes += n * 4
        codec, _ = choose_codec(t.role, t.shape, out_type)
        packed += codec.row_bytes(t.shape[-1]) * (n // t.shape[-1])
    return extract + codes + packed, packed


def check_disk(opts: Options, ckpt, run: RunDir) -> None:
    """Refuse up front when the run directory's or the output's disk cannot hold the result."""
    work_bytes, out_bytes = disk_needed(ckpt, opts.out_type)
    have = run.stores_size()
    needs = {opts.workdir: max(0, work_bytes - have)}
    out_dev, work_dev = os.stat(opts.output.parent).st_dev, os.stat(opts.workdir).st_dev
    if out_dev == work_dev:
        needs[opts.workdir] += out_bytes
    else:
        needs[opts.output.parent] = out_bytes
    for where, need in needs.items():
        free = shutil.disk_usage(where).free
        if free < need:
            raise RunDirError(f"{where}: {format_size(free)} free, but this conversion needs about "
                              f"{format_size(need)} more; free some space or choose another --workdir / -o")


def _run_stages(opts, ckpt, budget, scheduler, run, keys, log) -> None:
    check_disk(opts, ckpt, run)
    manifest = run.load()
    if manifest.get("fingerprint") not in (None, ckpt.fingerprint):
        log("the checkpoint changed since this run directory was made: starting over")
        run.reset_from("extract", manifest)
    elif not manifest and run.has_stores():
        log("the run directory has stores but no readable manifest: starting over")
        run.reset_from("extract", manifest)
    manifest.update({"fingerprint": ckpt.fingerprint, "options": opts.as_json()})
    manifest.setdefault("stages", {})
    run.save(manifest)
    run.save_metadata({"arch": ckpt.plan.arch, "kv": ckpt.kv})
    if n := run.clean_partials():
        log(f"removed {n} unfinished chunk file(s) of an interrupted run")
    previous = None
    for stage in STAGES:
        state = manifest["stages"].get(stage)
        if _finished(stage, state, keys[stage], opts):
            log(f"{stage}: already done, skipped")
        elif state is not None and state.get("key") != keys[stage]:
            run.reset_from(stage, manifest)  # an option it depends on changed
        if not _finished(stage, manifest["stages"].get(stage), keys[stage], opts):
            _run_stage(stage, opts, budget, scheduler, run, previous, ckpt, manifest, keys[stage], log)
        previous = run.store(stage)


def _run_stage(stage, opts, budget, scheduler, run, previous, ckpt, manifest, key, log) -> None:
    started = time.monotonic()
    log(f"{stage}: running")
    manifest["stages"][stage] = {"key": key, "state": "running"}
    run.save(manifest)
    output = opts.output if stage == "assemble" else run.store(stage)
    ctx = StageContext(opts, budget, scheduler, previous, output, ckpt if stage == "extract" else None, log,
                       run.metadata_path)
    importlib.import_module(f"stages.{stage}").run(ctx)
    state = {"key": key, "state": "done", "seconds": round(time.monotonic() - started, 2)}
    if stage == "assemble":
        st = opts.output.stat()
        state.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    manifest["stages"][stage] = state
    run.save(manifest)
    log(f"{stage}: done in {state['seconds']} s")
