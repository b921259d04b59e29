"""Run the four stages in order, skipping what an earlier run already finished.

Everything that can be refused is checked before the first log line: the checkpoint
and its metadata, the memory budget, every tensor's output type, the run directory,
the lock and the disk. A refusal is therefore one line, and nothing has been written.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import stat
import time
from pathlib import Path

from pipeline import remote, spool
from pipeline.budget import current_rss, plan_budget
from pipeline.checkpoint import open_checkpoint, open_vocabulary
from pipeline.config import Options, format_size
from pipeline.context import StageContext
from pipeline.errors import RunDirError, UserError
from pipeline.families import GROUPED, TERNARY
from pipeline.gguf_file import GGUFSplitWriter
from pipeline.low_disk import consumed_names, remove_codes
from pipeline.output import (OutputChanged, check_output_side, final_paths, identity, publish, remove_stale_temps,
                             temp_path, written_identity)
from pipeline.outtypes import OUTPUT_TYPES, TARGET_NAMES, range_refusal
from pipeline.plan import conversion_bytes_per_element, fetched_once_names, file_kvs, make_plan, save_plan
from pipeline.rundir import CODES_CONSUMED, OUTPUT_STAGES, STAGES, RunDir, stage_key
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
STAGE_VERSIONS = {"extract": 8, "quantize": 6, "pack": 5, "assemble": 3}


def stage_inputs(opts: Options, ckpt) -> dict[str, dict]:
    """What each stage's output depends on besides the stage before it, labelled as the user
    knows it (an option, the checkpoint): its key hashes these, and a rerun names the ones that
    changed."""
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
        "extract": {"the weight files": stage_key(ckpt.fingerprint), "the tensor plan": tensor_plan_key(ckpt.plan.tensors)},
        "quantize": {},
        "pack": pack,
        "assemble": {"-o": str(opts.output), "the key/values (config, tokenizer, metadata)": stage_key(ckpt.kv),
                     "--split-max-size": opts.split_max_size, "--split-max-tensors": opts.split_max_tensors},
    }


def tensor_plan_key(tensors) -> str:
    """stage_key([[hf_name, gguf_name, shape, recipe] of every tensor]), the same key, hashed a tensor at
    a time: the list and its JSON text for every tensor at once were a part of a run's peak for a
    model of tens of thousands of tensors."""
    h = hashlib.sha256(b"[[")
    for i, t in enumerate(tensors):
        entry = json.dumps([t.hf_name, t.gguf_name, list(t.shape), t.recipe.as_json()], sort_keys=True, default=str)
        h.update(((", " if i else "") + entry).encode())
    h.update(b"]]")
    return h.hexdigest()[:16]


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
    ckpt = _open(opts)  # as convert does, so the budget's baseline is the same
    plan = make_plan(opts, ckpt, conversion_budget(opts, ckpt))
    preflight(opts, RunDir(opts.workdir), plan)
    return plan


def preflight(opts: Options, run: RunDir, plan, *more) -> None:
    """What convert refuses about the run directory, the output side and the disk, checked
    before anything is created (plan refuses the same); `more`: (options, plan) of the other
    outputs of a run with several --type."""
    run.check_is_ours()
    for o, p in ((opts, plan), *more):
        check_output_side(final_paths(o.output, len(p.outputs)), o.workdir)
    check_disk(opts, run, plan, *(p for _, p in more))


def _output_refused(opts: Options, e: UserError) -> UserError:
    """A refusal of one output of several, naming it (same class, so the same exit status)."""
    return type(e)(f"output {opts.output.name} (--type {opts.out_type}): {e}")


def plan_many(many: list[Options]) -> list:
    """The plans of a conversion to several --type (`convert_many`), refusing what it would refuse."""
    return _checked_plans(many)[2]


def _checked_plans(many: list[Options]) -> tuple:
    """(checkpoint, budget, plans) of the outputs of several --type, after every check that refuses
    one of them (naming it) or the run directory, the output side and the disk."""
    first = many[0]
    ckpt = _open(first)
    budget = conversion_budget(first, ckpt)
    plans = []
    for opts in many:
        try:
            plans.append(make_plan(opts, ckpt, budget))
        except UserError as e:
            raise _output_refused(opts, e) from None
    preflight(first, RunDir(first.workdir), plans[0], *zip(many[1:], plans[1:]))
    return ckpt, budget, plans


def _open(opts: Options):
    """The checkpoint, opened after the scheduler is probed (a wrong address is one line, before
    anything is read), with every stage imported (so the budget's baseline includes them)."""
    if opts.scheduler.startswith("tcp://"):
        probe_scheduler(opts.scheduler)
    ckpt = open_checkpoint(opts.model_dir, name=opts.model_name or None, tokenizer_pre=opts.tokenizer_pre,
                           max_header_bytes=header_budget(opts.memory_limit), model_name=opts.name_override,
                           metadata_file=opts.metadata_file, memory_limit=opts.memory_limit)
    for stage in STAGES:
        importlib.import_module(f"stages.{stage}")
    return ckpt


def convert_many(many: list[Options], log) -> list[Path]:
    """Several outputs from one read (`--type tq2_0,i2_s,iq2_bn`): extract and quantize once into
    the shared run directory, then pack and assemble each output with its own pack store and
    manifest record, so each resumes on its own. What plan refuses for any output is refused
    before anything is written; an output refused while it is packed (its data: a group scale its
    type cannot hold) is named, the others are still written, and the command fails at the end."""
    first = many[0]
    ckpt, budget, plans = _checked_plans(many)
    run = RunDir(first.workdir)
    outputs_before = [[identity(p) for p in final_paths(o.output, len(pl.outputs))] for o, pl in zip(many, plans)]
    keys = [stage_keys(o, ckpt) for o in many]
    scheduler = _scheduler(first, budget, log)
    written, failed = [], []
    try:
        with run:
            _log_outputs(many, ckpt, log)
            log(f"run directory: {first.workdir} (extract and quantize once for the {len(many)} outputs)")
            log(budget.describe())
            options = {**first.as_json(), "out_type": [o.out_type for o in many],
                       "output": [str(o.output) for o in many]}
            manifest = _prepare(first, ckpt, plans[0], run, log, options)
            # the shared stages (tag "": not one output's, and no output's float ranges checked yet)
            _run_stages(first, ckpt, plans[0], budget, scheduler, run, keys[0], log, stages=STAGES[:2],
                        tag="", manifest=manifest)
            for o, plan, key, before in zip(many, plans, keys, outputs_before):
                tag = o.layout.name
                save_plan(run, plan, tag)
                try:
                    check_float_ranges(run.store("extract"), ckpt, plan)
                    written += _run_stages(o, ckpt, plan, budget, scheduler, run, key, log, before,
                                           stages=OUTPUT_STAGES, tag=tag, manifest=manifest)
                except UserError as e:
                    # a damaged run directory or a checkpoint changed under the run is every output's
                    # problem: the conversion stops; anything else (the data refused by this output's
                    # type, its path taken by another process) is this output's alone
                    if isinstance(e, SourceContentChanged) or (isinstance(e, RunDirError)
                                                               and not isinstance(e, OutputChanged)):
                        raise
                    _source_unchanged(ckpt)()
                    refused = _output_refused(o, e)
                    failed.append(refused)
                    log(f"{refused}; the other outputs go on")
    finally:
        scheduler.close()
    for path in written:
        log(f"wrote {path} ({format_size(path.stat().st_size)})")
    log(f"run directory kept for inspection and reruns: {first.workdir} ({format_size(run.stores_size())}); "
        "delete it when you no longer need it")
    if failed:
        names = ", ".join(str(p.name) for p in written) or "none"
        raise type(failed[0])(f"{len(failed)} of {len(many)} outputs failed ({failed[0]}"
                              + (f"; and {len(failed) - 1} more, named above" if len(failed) > 1 else "")
                              + f"); written: {names}")
    return written


def conversion_budget(opts: Options, ckpt):
    """The memory budget: assemble reads the key/values back beside the checkpoint's own copy,
    so rows of the token table are reserved."""
    reserve = KV_READBACK_BYTES_PER_ROW * ckpt.plan.config["vocab_size"]
    if remote.source_of(ckpt.model_dir):  # the range requests' buffers of every reading task
        reserve += remote.buffer_reserve(opts.workers or os.cpu_count() or 1) + spool.buffer_reserve()
    return plan_budget(opts.memory_limit, opts.workers, worker_processes=opts.scheduler == "local",
                       reserve=reserve, per_element=conversion_bytes_per_element(ckpt))


def convert(opts: Options, log) -> list[Path]:
    ckpt = _open(opts)
    budget = conversion_budget(opts, ckpt)
    plan = make_plan(opts, ckpt, budget)
    run = RunDir(opts.workdir)
    preflight(opts, run, plan)  # a refusal leaves nothing behind: nothing is created before it
    # what is at the output path(s) now: anything written there from here on is another
    # process's, and assemble does not replace it
    outputs_before = [identity(p) for p in final_paths(opts.output, len(plan.outputs))]
    keys = stage_keys(opts, ckpt)
    # the scheduler before the run directory: one that cannot be reached is refused with nothing made
    scheduler = _scheduler(opts, budget, log)
    try:
        with run:
            _log_outputs([opts], ckpt, log)
            log(f"run directory: {opts.workdir}")
            log(budget.describe())
            manifest = _prepare(opts, ckpt, plan, run, log)
            with _spooling(run, manifest, ckpt, plan, keys):
                outputs = _run_stages(opts, ckpt, plan, budget, scheduler, run, keys, log, outputs_before,
                                      manifest=manifest)
    finally:
        scheduler.close()
        remote.end_fetching()
    size = sum(p.stat().st_size for p in outputs)
    kept = run.stores_size()
    shown = outputs[0] if len(outputs) == 1 else f"{outputs[0]} (+ {len(outputs) - 1} more parts)"
    log(f"wrote {shown} ({format_size(size)})")
    log(f"run directory kept for inspection and reruns: {opts.workdir} ({format_size(kept)}); "
        "delete it when you no longer need it")
    return outputs


@contextlib.contextmanager
def _spooling(run: RunDir, manifest: dict, ckpt, plan, keys: dict):
    """A remote checkpoint's float tensors fetched into the run directory while the stages before
    assemble run (pipeline/spool.py), unless the output is already written; the spool's directory
    is removed when the conversion succeeds, kept for the rerun otherwise."""
    done = _finished("assemble", manifest.get("stages", {}).get("assemble"), keys["assemble"])
    running = None if done else spool.start(run.path, ckpt, plan)
    finished = False
    try:
        yield
        finished = True
    finally:
        spool.stop(running, run.path, finished or done)


def _scheduler(opts: Options, budget, log) -> Scheduler:
    worker_memory = max(1, (opts.memory_limit - current_rss()) // budget.workers)
    return Scheduler(opts.scheduler, budget.workers, worker_memory, opts.progress,
                     worker_timeout=opts.worker_timeout, log=log)


def _log_outputs(many: list[Options], ckpt, log) -> None:
    """The first lines of a conversion's log: the model, each output and its type."""
    log(f"model: {remote.label(many[0].model_dir)} ({ckpt.plan.family.description}, {len(ckpt.plan.tensors)} tensors)")
    for o in many:
        built = f" for bitnet.cpp's {TARGET_NAMES[o.target]} builds" if o.layout.target else ""
        log(f"output: {o.output} ({o.out_type.upper()}{built}, embeddings {o.embedding_type.upper()}, "
            f"GGUF arch {ckpt.plan.arch})")
        if o.type_reason:
            log(f"type: {o.out_type.upper()}, chosen by --type auto: {o.type_reason}")


def _nearest_existing(path: Path) -> Path:
    """`path`, or the closest of its parents that exists: the run directory is not made before the
    disk is checked, and its disk is the one it will be made on."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_disk(opts: Options, run: RunDir, plan, *more) -> None:
    """Refuse up front when the run directory's or the output's disk cannot hold the result
    (before the run directory is made: a refusal leaves nothing); `more`: the plans of the other
    outputs of a run with several --type (their own pack stores and files, in the same places)."""
    work_bytes = plan.run_dir_bytes + sum(p.stores["pack"] for p in more)
    out_bytes = plan.output_bytes + sum(p.output_bytes for p in more)
    have = run.stores_size()
    work_at = _nearest_existing(opts.workdir)
    needs = {opts.workdir: max(0, work_bytes - have)}
    out_dev, work_dev = os.stat(opts.output.parent).st_dev, os.stat(work_at).st_dev
    if out_dev == work_dev and opts.low_disk and not more:
        # the codes go as the output grows: the stores at their largest, or the output beside what stays of them
        kept = work_bytes - plan.stores.get("quantize", 0) - plan.stores.get("pack", 0)
        needs[opts.workdir] = max(0, max(work_bytes, kept + out_bytes) - have)
    elif out_dev == work_dev:
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
    unread = fetched_once_names(ckpt)  # checked as they are read (stores.check_unscanned)
    for t in plan.tensors:
        if t.role == TERNARY:
            continue  # ternary values are codes times the scale, which pack checks
        out = OUTPUT_TYPES[t.out_type]
        if out.codec.ternary:  # a ternary --embedding-type: pack checks its scales
            continue
        if t.hf_name in unread:
            continue
        refusal = range_refusal(t.source_file, t.hf_name, t.role, out, largest_values(store, t.name))
        if refusal:
            raise refusal


def _prepare(opts, ckpt, plan, run, log, options: dict | None = None) -> dict:
    """The manifest of the run directory, made ready for this conversion: started over if the
    checkpoint changed, the options, plan and key/values saved, leftovers of a killed run removed."""
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
    manifest.update({"fingerprint": ckpt.fingerprint, "options": options or opts.as_json()})
    manifest.setdefault("stages", {})
    # the manifest is the first file of a new run directory: only it (or a store of ours) makes a
    # directory ours, so a kill before the next write leaves one a rerun takes up (rundir.check_is_ours)
    run.save(manifest)
    save_plan(run, plan)
    run.save_metadata({"arch": ckpt.plan.arch, "kv": ckpt.kv})
    if n := run.clean_partials():
        log(f"removed {n} unfinished chunk file(s) of an interrupted run")
    return manifest


def _states(manifest: dict, stage: str, tag: str | None, opts) -> dict:
    """Where the manifest keeps `stage`'s state: "stages", or one output's own (several --type)."""
    if tag is None or stage not in OUTPUT_STAGES:
        return manifest["stages"]
    record = manifest.setdefault("outputs", {}).setdefault(tag, {"output": str(opts.output), "stages": {}})
    record["output"] = str(opts.output)
    return record.setdefault("stages", {})


def _run_stages(opts, ckpt, plan, budget, scheduler, run, keys, log, outputs_before=None, stages=STAGES,
                tag=None, manifest=None) -> list[Path]:
    """Run `stages` (all four, or the shared or one output's own ones with several --type), skipping
    what is done; `tag`: the output type whose pack and assemble these are (its own store)."""
    if manifest is None:
        manifest = _prepare(opts, ckpt, plan, run, log)
    resume = _consumed_codes(opts, plan, manifest, keys, run, log, stages, tag)
    if "pack" in stages and not resume and (n := remove_stale_temps(opts.output, opts.workdir)):
        log(f"removed {n} unfinished output file(s) of an interrupted run")
    first = STAGES.index(stages[0])
    previous = run.store(STAGES[first - 1]) if first else None
    check_source = _source_unchanged(ckpt)
    inputs = stage_inputs(opts, ckpt)
    for stage in stages:
        own = tag if stage in OUTPUT_STAGES else None
        named = f" ({opts.output.name})" if own else ""
        states = _states(manifest, stage, tag, opts)
        state = states.get(stage)
        if stage != "assemble" and _finished(stage, state, keys[stage]) and not run.store(stage, own).is_dir():
            log(f"{stage}{named}: its store {run.store(stage, own)} is gone: redoing {stage} and the stages after it")
            run.reset_from(stage, manifest, own)
            state = None
        if _finished(stage, state, keys[stage]):
            log(f"{stage}{named}: already done, skipped")
        elif state is not None and state.get("key") != keys[stage]:
            later = STAGES[STAGES.index(stage):]
            kept = STAGES[:STAGES.index(stage)]
            log(f"{stage}{named}: {what_changed(state.get('inputs'), inputs[stage])} changed since it was done: redoing "
                f"{', '.join(later)}" + (f"; {', '.join(kept)} reused" if kept else ""))
            run.reset_from(stage, manifest, own)
        if not _finished(stage, states.get(stage), keys[stage]):
            try:
                _run_stage(stage, opts, plan, budget, scheduler, run, previous, ckpt, manifest, keys[stage], log,
                           check_source, outputs_before, inputs[stage], tag, resume if stage == "assemble" else None)
            except SourceContentChanged as e:
                # the file's identity is as recorded, so only this mark makes the rerun start over
                manifest[CONTENT_CHANGED] = e.file or remote.label(ckpt.model_dir)
                run.save(manifest)
                raise
        elif stage == "extract":  # its row maxima are read next: the store must be the one sealed
            run.check_sealed("extract")
        if stage == "extract" and tag is None:  # several --type: each output checks its own types
            check_float_ranges(run.store("extract"), ckpt, plan)
        previous = run.store(stage, own)
    if "assemble" not in stages:
        return []
    return [Path(p) for p, *_ in _states(manifest, "assemble", tag, opts)["assemble"]["outputs"]]


def _low_disk_record(run, manifest: dict, state: dict):
    """assemble --low-disk's record of a tensor on disk, made before its codes are removed: the
    stores are consumed from then on."""
    def record(tensors: int, lengths: list[int], files: list[int]) -> None:
        manifest[CODES_CONSUMED] = True
        state["low_disk"] = {"tensors": tensors, "lengths": lengths, "files": files}
        run.save(manifest)
    return record


def _consumed_codes(opts, plan, manifest, keys, run, log, stages, tag) -> dict | None:
    """After an assemble with --low-disk (the codes it wrote are gone): the progress of this
    command's own unfinished output, which assemble continues; else, unless this command's output
    is finished, redo quantize (and what follows), which a run needing the codes must."""
    if not manifest.get(CODES_CONSUMED):
        return None
    state = manifest.get("stages", {}).get("assemble")
    if tag is None and "assemble" in stages:
        if _finished("assemble", state, keys["assemble"]):
            return None
        progress = state.get("low_disk") if state and state.get("key") == keys["assemble"] else None
        if _unfinished_output_intact(opts, plan, progress):
            return progress
        finals = _published(opts, plan, progress)
        if finals:  # killed after the rename into place, before the manifest said so
            state.pop("low_disk")
            state.update(state="done", outputs=[[str(p), *written_identity(p)] for p in finals])
            run.save(manifest)
            return None
    log("quantize: its codes were removed as an earlier --low-disk run wrote its output: redoing quantize"
        + (" (fetching the checkpoint again)" if remote.source_of(opts.model_dir) else "")
        + ", pack and assemble")
    run.reset_from("quantize", manifest)
    return None


def _unfinished_output_intact(opts, plan, progress) -> bool:
    """The temporary files --low-disk recorded are there, the same files, at least as long."""
    temps = [temp_path(f, opts.workdir) for f in final_paths(opts.output, len(plan.outputs))]
    return _recorded_files(temps, progress, exact=False)


def _published(opts, plan, progress) -> list[Path] | None:
    """The final files, when they are the temporary files --low-disk recorded complete, renamed."""
    finals = final_paths(opts.output, len(plan.outputs))
    if not isinstance(progress, dict) or progress.get("tensors") != len(plan.infos()):
        return None
    return finals if _recorded_files(finals, progress, exact=True) else None


def _recorded_files(paths: list[Path], progress, exact: bool) -> bool:
    """`paths` are the files of --low-disk's record (`progress`): regular, the inodes recorded, the
    lengths recorded (`exact`) or longer (a tensor begun after the record)."""
    if not isinstance(progress, dict):
        return False
    lengths, files, tensors = progress.get("lengths"), progress.get("files"), progress.get("tensors")
    if not isinstance(tensors, int) or not isinstance(lengths, list) or not isinstance(files, list) \
            or not len(paths) == len(lengths) == len(files):
        return False
    for path, length, ino in zip(paths, lengths, files):
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_ino != ino or not isinstance(length, int) \
                or st.st_size < length or (exact and st.st_size != length):
            return False
    return True


def _run_stage(stage, opts, plan, budget, scheduler, run, previous, ckpt, manifest, key, log, check_source,
               outputs_before=None, inputs=None, tag=None, resume=None) -> None:
    own = tag if stage in OUTPUT_STAGES else None
    if stage != "extract":
        before = STAGES[STAGES.index(stage) - 1]
        consumed = set()
        if resume:  # --low-disk continued: the chunk files of the tensors written are gone (or go now)
            consumed = set(consumed_names(previous, resume["tensors"]))
            remove_codes(previous, sorted(consumed))  # what a kill between a record and its removal left
        run.check_sealed(before, tag if before in OUTPUT_STAGES else None, consumed)  # its input is what was written
    started, since_ns = time.monotonic(), time.time_ns()
    log(f"{stage}: running" + (f" ({opts.output.name})" if own else "")
        + (f", continuing the unfinished output after {resume['tensors']} of {len(plan.infos())} tensors "
           "(--low-disk)" if resume else ""))
    states = _states(manifest, stage, tag, opts)
    states[stage] = {"key": key, "state": "running", **({"low_disk": resume} if resume else {})}
    run.save(manifest)
    output = opts.output if stage == "assemble" else run.store(stage, own)
    ctx = StageContext(opts, budget, scheduler, previous, output, ckpt if stage == "extract" else None, log,
                       run.metadata_path, before_publish=check_source, outputs_before=outputs_before, plan=plan,
                       resume=resume, record=_low_disk_record(run, manifest, states[stage]))
    importlib.import_module(f"stages.{stage}").run(ctx)
    if stage != "assemble":  # assemble checks before it publishes
        check_source()  # a file rewritten while it was read would mix old and new weights
        run.seal(stage, own, since_ns)  # what this run recorded is sealed from its records
    state = {"key": key, "state": "done", "seconds": round(time.monotonic() - started, 2), "inputs": inputs or {}}
    if stage == "assemble":
        state["outputs"] = [[str(p), *(written_identity(p) or [])] for p in ctx.outputs]
    states[stage] = state
    run.save(manifest)
    log(f"{stage}: done in {state['seconds']} s")
