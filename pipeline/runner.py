"""Run the four stages in order, skipping what an earlier run already finished.

Everything that can be refused is checked before the first log line: the checkpoint
and its metadata, the memory budget, every tensor's output type, the run directory,
the lock and the disk. A refusal is therefore one line, and nothing has been written.
"""
from __future__ import annotations

import importlib
import os
import shutil
import time
from pathlib import Path

from pipeline import remote
from pipeline.budget import current_rss, plan_budget
from pipeline.checkpoint import open_checkpoint, open_vocabulary
from pipeline.config import Options, format_size
from pipeline.context import StageContext
from pipeline.errors import CheckpointError, RunDirError
from pipeline.families import GROUPED, TERNARY
from pipeline.gguf_file import GGUFSplitWriter
from pipeline.output import (OutputChanged, check_output_side, final_paths, identity, publish, remove_stale_temps,
                             temp_path, written_identity)
from pipeline.outtypes import OUTPUT_TYPES, TARGET_NAMES
from pipeline.plan import file_kvs, make_plan, save_plan
from pipeline.rundir import STAGES, RunDir, stage_key
from pipeline.safetensors_io import files_fingerprint, header_budget
from pipeline.scheduler import Scheduler, probe_scheduler
from pipeline.stores import SourceContentChanged, largest_values, open_store, source_changed

# Memory assemble takes to read the key/values back from metadata.json and build the header,
# per row of the token table (measured with a 1M-row table; docs/notes/tokenizer-memory.md).
KV_READBACK_BYTES_PER_ROW = 160

# manifest.json: the checkpoint file whose bytes a stage found changed though its size and times
# were not (stores.SourceContentChanged); the next run starts over
CONTENT_CHANGED = "source_content_changed"

# Bump when a stage's output for the same input changes, so old stores are redone.
STAGE_VERSIONS = {"extract": 5, "quantize": 3, "pack": 3, "assemble": 3}


def stage_inputs(opts: Options, ckpt) -> dict[str, dict]:
    """What each stage's output depends on besides the stage before it, labelled as the user
    knows it (an option, the checkpoint): its key hashes these, and a rerun names the ones that
    changed."""
    plan = [[t.hf_name, t.gguf_name, list(t.shape), t.recipe.as_json()] for t in ckpt.plan.tensors]
    # extract depends on the weight files and the tensor plan only: a tokenizer or metadata
    # change (the key/values) redoes assemble alone
    pack = {"--type": opts.out_type, "--embedding-type": opts.embedding_type}
    if opts.layout.target:
        pack["--target"] = opts.target
    if opts.layout.needs_tiles:
        pack["--kernel-config"] = stage_key(opts.kernel_tiles)
    if any(t.recipe.weights == GROUPED for t in ckpt.plan.tensors):  # the option changes nothing else's bytes
        pack["--allow-requantize"] = opts.allow_requantize
    return {
        "extract": {"the weight files": stage_key(ckpt.fingerprint), "the tensor plan": stage_key(plan)},
        "quantize": {},
        "pack": pack,
        "assemble": {"-o": str(opts.output), "the key/values (config, tokenizer, metadata)": stage_key(ckpt.kv),
                     "--split-max-size": opts.split_max_size, "--split-max-tensors": opts.split_max_tensors},
    }


def stage_keys(opts: Options, ckpt) -> dict[str, str]:
    inputs, keys, previous = stage_inputs(opts, ckpt), {}, None
    for stage in STAGES:
        keys[stage] = stage_key(previous, stage, STAGE_VERSIONS[stage], inputs[stage])
        previous = keys[stage]
    return keys


def what_changed(before: dict | None, now: dict) -> str:
    """The inputs of a stage that differ from the ones recorded when it was done, for a person."""
    if not isinstance(before, dict):
        return "its inputs"
    changed = []
    for label, value in now.items():
        if before.get(label, value) != value:
            old = before[label]
            shown = f" ({old} -> {value})" if label.startswith("-") and label != "--kernel-config" else ""
            changed.append(label + shown)
    return ", ".join(changed) or "its inputs (or this version of bitnet-gguf)"


def _finished(stage: str, state: dict | None, key: str) -> bool:
    if not state or state.get("key") != key or state.get("state") != "done":
        return False
    if stage == "assemble":  # the product must still be there, the very file that was renamed into place
        outputs = state.get("outputs")
        if not isinstance(outputs, list) or not outputs:
            return False
        for record in outputs:
            if not isinstance(record, list) or not record or not isinstance(record[0], str) \
                    or written_identity(Path(record[0])) != record[1:]:
                return False
    return True


def convert_vocab_only(opts: Options, log) -> list[Path]:
    """--vocab-only: the key/values and tokenizer, no tensors, from config.json and the tokenizer
    alone (no run directory); written to a temporary name and renamed into place."""
    plan, kv = open_vocabulary(opts.model_dir, name=opts.model_name or None, tokenizer_pre=opts.tokenizer_pre,
                               model_name=opts.name_override, metadata_file=opts.metadata_file,
                               memory_limit=opts.memory_limit)
    check_output_side([opts.output], opts.workdir)
    before = [identity(opts.output)]
    temp = temp_path(opts.output, opts.workdir)
    try:
        kvs = file_kvs({"arch": plan.arch, "kv": kv}, opts.layout.name, opts.kernel_tiles)
        with GGUFSplitWriter([temp], kvs, [], [[]]) as writer:
            writer.write_header()
        publish([temp], [opts.output], before)
    except OutputChanged:
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    log(f"wrote {opts.output} ({format_size(opts.output.stat().st_size)}; vocabulary and key/values, no tensors)")
    return [opts.output]


def plan_conversion(opts: Options):
    """The plan of `convert(opts)` (pipeline/plan.py), refusing what it would refuse; writes nothing."""
    if opts.scheduler.startswith("tcp://"):
        probe_scheduler(opts.scheduler)
    ckpt = open_checkpoint(opts.model_dir, name=opts.model_name or None, tokenizer_pre=opts.tokenizer_pre,
                           max_header_bytes=header_budget(opts.memory_limit), model_name=opts.name_override,
                           metadata_file=opts.metadata_file, memory_limit=opts.memory_limit)
    for stage in STAGES:  # as convert does, so the budget's baseline is the same
        importlib.import_module(f"stages.{stage}")
    plan = make_plan(opts, ckpt, conversion_budget(opts, ckpt))
    preflight(opts, RunDir(opts.workdir), plan)
    return plan


def preflight(opts: Options, run: RunDir, plan) -> None:
    """What convert refuses about the run directory, the output side and the disk, checked
    before anything is created (plan refuses the same)."""
    run.check_is_ours()
    check_output_side(final_paths(opts.output, len(plan.outputs)), opts.workdir)
    check_disk(opts, run, plan)


def conversion_budget(opts: Options, ckpt):
    """The memory budget: assemble reads the key/values back beside the checkpoint's own copy,
    so rows of the token table are reserved."""
    reserve = KV_READBACK_BYTES_PER_ROW * ckpt.plan.config["vocab_size"]
    if remote.source_of(ckpt.model_dir):  # the range requests' buffers of every reading task
        reserve += remote.buffer_reserve(opts.workers or os.cpu_count() or 1)
    return plan_budget(opts.memory_limit, opts.workers, worker_processes=opts.scheduler == "local",
                       reserve=reserve)


def convert(opts: Options, log) -> list[Path]:
    if opts.scheduler.startswith("tcp://"):
        probe_scheduler(opts.scheduler)  # before anything is read or written: a wrong address is one line
    ckpt = open_checkpoint(opts.model_dir, name=opts.model_name or None, tokenizer_pre=opts.tokenizer_pre,
                           max_header_bytes=header_budget(opts.memory_limit), model_name=opts.name_override,
                           metadata_file=opts.metadata_file, memory_limit=opts.memory_limit)
    for stage in STAGES:  # import everything first, so the budget's baseline includes it
        importlib.import_module(f"stages.{stage}")
    budget = conversion_budget(opts, ckpt)
    plan = make_plan(opts, ckpt, budget)
    run = RunDir(opts.workdir)
    preflight(opts, run, plan)  # a refusal leaves nothing behind: nothing is created before it
    # what is at the output path(s) now: anything written there from here on is another
    # process's, and assemble does not replace it
    outputs_before = [identity(p) for p in final_paths(opts.output, len(plan.outputs))]
    keys = stage_keys(opts, ckpt)
    worker_memory = max(1, (opts.memory_limit - current_rss()) // budget.workers)
    # the scheduler before the run directory: one that cannot be reached is refused with nothing made
    scheduler = Scheduler(opts.scheduler, budget.workers, worker_memory, opts.progress,
                          worker_timeout=opts.worker_timeout, log=log)
    try:
        with run:
            log(f"model: {remote.label(opts.model_dir)} ({ckpt.plan.family.description}, {len(ckpt.plan.tensors)} tensors)")
            built = f" for bitnet.cpp's {TARGET_NAMES[opts.target]} builds" if opts.layout.target else ""
            log(f"output: {opts.output} ({opts.out_type.upper()}{built}, embeddings {opts.embedding_type.upper()}, "
                f"GGUF arch {ckpt.plan.arch})")
            if opts.type_reason:
                log(f"type: {opts.out_type.upper()}, chosen by --type auto: {opts.type_reason}")
            log(f"run directory: {opts.workdir}")
            log(budget.describe())
            outputs = _run_stages(opts, ckpt, plan, budget, scheduler, run, keys, log, outputs_before)
    finally:
        scheduler.close()
    size = sum(p.stat().st_size for p in outputs)
    kept = run.stores_size()
    shown = outputs[0] if len(outputs) == 1 else f"{outputs[0]} (+ {len(outputs) - 1} more parts)"
    log(f"wrote {shown} ({format_size(size)})")
    log(f"run directory kept for inspection and reruns: {opts.workdir} ({format_size(kept)}); "
        "delete it when you no longer need it")
    return outputs


def _nearest_existing(path: Path) -> Path:
    """`path`, or the closest of its parents that exists: the run directory is not made before the
    disk is checked, and its disk is the one it will be made on."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_disk(opts: Options, run: RunDir, plan) -> None:
    """Refuse up front when the run directory's or the output's disk cannot hold the result
    (before the run directory is made: a refusal leaves nothing)."""
    work_bytes, out_bytes = plan.run_dir_bytes, plan.output_bytes
    have = run.stores_size()
    work_at = _nearest_existing(opts.workdir)
    needs = {opts.workdir: max(0, work_bytes - have)}
    out_dev, work_dev = os.stat(opts.output.parent).st_dev, os.stat(work_at).st_dev
    if out_dev == work_dev:
        needs[opts.workdir] += out_bytes
    else:
        needs[opts.output.parent] = out_bytes
    for where, need in needs.items():
        free = shutil.disk_usage(_nearest_existing(where)).free
        if free < need:
            raise RunDirError(f"{where}: {format_size(free)} free, but this conversion needs about "
                              f"{format_size(need)} more; free some space or choose another --workdir / -o")


def _source_unchanged(ckpt):
    """A check that the weight files are still the ones the run started from (every stage reads
    them: extract's arrays index their bytes)."""
    def check() -> None:
        local = [Path(p) if Path(p).is_absolute() else ckpt.model_dir / p for p, *_ in ckpt.fingerprint
                 if not remote.is_url(p)]
        try:
            now = files_fingerprint(ckpt.model_dir, local)
        except OSError:
            now = None
        if now != [e for e in ckpt.fingerprint if not remote.is_url(e[0])] \
                or remote.fingerprint_changes(ckpt.model_dir, ckpt.fingerprint):
            raise source_changed(remote.label(ckpt.model_dir))
    return check


def check_float_ranges(store: Path, ckpt, plan) -> None:
    """Refuse a float tensor whose values its planned output type cannot hold as finite numbers
    (F16 tops out at 65504, BF16 below float32's largest values, Q8_0's block scale is an fp16),
    from the row maxima extract recorded: before anything is packed, naming the tensor."""
    store = open_store(store, "r")  # once: opening it per tensor costs more than the check
    for t in plan.tensors:
        if t.role == TERNARY:
            continue  # ternary values are codes times the scale, which pack checks
        out = OUTPUT_TYPES[t.out_type]
        if out.codec.ternary:  # a ternary --embedding-type: pack checks its scales
            continue
        biggest = largest_values(store, t.name)
        if not out.holds(biggest):
            roomier = [n for n in ("bf16", "f32") if OUTPUT_TYPES[n].holds(biggest)]
            option = "--embedding-type" if t.role != "norm" else "the output type"
            raise CheckpointError(f"{t.source_file}: tensor {t.hf_name} has values up to {biggest:.6g}, "
                                  f"beyond {out.codec.name}'s range ({out.largest:.6g}); choose {option} "
                                  f"{' or '.join(roomier)}")


def _run_stages(opts, ckpt, plan, budget, scheduler, run, keys, log, outputs_before=None) -> list[Path]:
    manifest = run.load()
    if manifest.get("fingerprint") not in (None, ckpt.fingerprint) or manifest.get(CONTENT_CHANGED):
        log("the checkpoint changed since this run directory was made: starting over")
        run.reset_from("extract", manifest)
    elif not manifest and run.has_stores():
        log("the run directory has stores but no readable manifest: starting over")
        # a manifest first, naming those stores as stale: a kill while they are deleted then leaves
        # a directory that is still provably ours (rundir.check_is_ours), whose rerun deletes them
        manifest = {"stages": {s: {"key": "", "state": "running"} for s in STAGES if os.path.lexists(run.store(s))}}
        run.save(manifest)
        run.reset_from("extract", manifest)
    manifest.pop(CONTENT_CHANGED, None)
    manifest.update({"fingerprint": ckpt.fingerprint, "options": opts.as_json()})
    manifest.setdefault("stages", {})
    # the manifest is the first file of a new run directory: only it (or a store of ours) makes a
    # directory ours, so a kill before the next write leaves one a rerun takes up (rundir.check_is_ours)
    run.save(manifest)
    save_plan(run, plan)
    run.save_metadata({"arch": ckpt.plan.arch, "kv": ckpt.kv})
    if n := run.clean_partials():
        log(f"removed {n} unfinished chunk file(s) of an interrupted run")
    if n := remove_stale_temps(opts.output, opts.workdir):
        log(f"removed {n} unfinished output file(s) of an interrupted run")
    previous = None
    check_source = _source_unchanged(ckpt)
    inputs = stage_inputs(opts, ckpt)
    for stage in STAGES:
        state = manifest["stages"].get(stage)
        if stage != "assemble" and _finished(stage, state, keys[stage]) and not run.store(stage).is_dir():
            log(f"{stage}: its store {run.store(stage)} is gone: redoing {stage} and the stages after it")
            run.reset_from(stage, manifest)
            state = None
        if _finished(stage, state, keys[stage]):
            log(f"{stage}: already done, skipped")
        elif state is not None and state.get("key") != keys[stage]:
            later = STAGES[STAGES.index(stage):]
            kept = STAGES[:STAGES.index(stage)]
            log(f"{stage}: {what_changed(state.get('inputs'), inputs[stage])} changed since it was done: redoing "
                f"{', '.join(later)}" + (f"; {', '.join(kept)} reused" if kept else ""))
            run.reset_from(stage, manifest)
        if not _finished(stage, manifest["stages"].get(stage), keys[stage]):
            try:
                _run_stage(stage, opts, plan, budget, scheduler, run, previous, ckpt, manifest, keys[stage], log,
                           check_source, outputs_before, inputs[stage])
            except SourceContentChanged as e:
                # the file's identity is as recorded, so only this mark makes the rerun start over
                manifest[CONTENT_CHANGED] = e.file or remote.label(ckpt.model_dir)
                run.save(manifest)
                raise
        elif stage == "extract":  # its row maxima are read next: the store must be the one sealed
            run.check_sealed("extract")
        if stage == "extract":
            check_float_ranges(run.store("extract"), ckpt, plan)
        previous = run.store(stage)
    return [Path(p) for p, *_ in manifest["stages"]["assemble"]["outputs"]]


def _run_stage(stage, opts, plan, budget, scheduler, run, previous, ckpt, manifest, key, log, check_source,
               outputs_before=None, inputs=None) -> None:
    if stage != "extract":
        run.check_sealed(STAGES[STAGES.index(stage) - 1])  # its input is what was written
    started = time.monotonic()
    log(f"{stage}: running")
    manifest["stages"][stage] = {"key": key, "state": "running"}
    run.save(manifest)
    output = opts.output if stage == "assemble" else run.store(stage)
    ctx = StageContext(opts, budget, scheduler, previous, output, ckpt if stage == "extract" else None, log,
                       run.metadata_path, before_publish=check_source, outputs_before=outputs_before, plan=plan)
    importlib.import_module(f"stages.{stage}").run(ctx)
    if stage != "assemble":  # assemble checks before it publishes
        check_source()  # a file rewritten while it was read would mix old and new weights
        run.seal(stage)
    state = {"key": key, "state": "done", "seconds": round(time.monotonic() - started, 2), "inputs": inputs or {}}
    if stage == "assemble":
        state["outputs"] = [[str(p), *(written_identity(p) or [])] for p in ctx.outputs]
    manifest["stages"][stage] = state
    run.save(manifest)
    log(f"{stage}: done in {state['seconds']} s")
