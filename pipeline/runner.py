"""Run the four stages in order, skipping what an earlier run already finished.

Everything that can be refused is checked before the first log line: the checkpoint
and its metadata, the memory budget, every tensor's output type, the run directory,
the lock and the disk. A refusal is therefore one line, and nothing has been written.
"""
from __future__ import annotations

import importlib
import math
import os
import shutil
import time
from pathlib import Path

from pipeline.budget import current_rss, plan_budget
from pipeline.checkpoint import open_checkpoint
from pipeline.config import Options, check_output_path, format_size
from pipeline.context import StageContext
from pipeline.errors import CheckpointError, OptionError, RunDirError
from pipeline.families import TERNARY
from pipeline.gguf_file import MAX_SPLITS, GGUFWriterError, TensorInfo, file_size
from pipeline.output import final_paths, identity, remove_stale_temps, written_identity
from pipeline.outtypes import BY_GGML_TYPE, OUTPUT_TYPES, TARGET_NAMES, tensor_type
from pipeline.rundir import STAGES, RunDir, stage_key
from pipeline.safetensors_io import files_fingerprint, header_budget
from pipeline.scheduler import Scheduler, probe_scheduler
from pipeline.stores import source_changed

# Memory assemble takes to read the key/values back from metadata.json and build the header,
# per row of the token table (measured with a 1M-row table; docs/notes/tokenizer-memory.md).
KV_READBACK_BYTES_PER_ROW = 160

# Bump when a stage's output for the same input changes, so old stores are redone.
STAGE_VERSIONS = {"extract": 3, "quantize": 3, "pack": 3, "assemble": 3}


def stage_keys(opts: Options, ckpt) -> dict[str, str]:
    keys = {}
    # extract depends on the weight files and the tensor plan only: a tokenizer or metadata
    # change (the key/values) redoes assemble alone
    plan = [[t.hf_name, t.gguf_name, list(t.shape), t.recipe.as_json()] for t in ckpt.plan.tensors]
    keys["extract"] = stage_key("extract", STAGE_VERSIONS["extract"], ckpt.fingerprint, plan)
    keys["quantize"] = stage_key(keys["extract"], "quantize", STAGE_VERSIONS["quantize"])
    # the layout (--type and, where it matters, --target) and the tiles of a TL type
    keys["pack"] = stage_key(keys["quantize"], "pack", STAGE_VERSIONS["pack"], opts.layout.name, opts.embedding_type,
                             *([opts.kernel_tiles] if opts.layout.needs_tiles else []))
    keys["assemble"] = stage_key(keys["pack"], "assemble", STAGE_VERSIONS["assemble"], str(opts.output), ckpt.kv,
                                 opts.split_max_size, opts.split_max_tensors, opts.layout.name)
    return keys


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


def check_kernel_shapes(opts: Options, ckpt) -> None:
    """TL1/TL2: every ternary projection's (m, k) has a section in --kernel-config (refused before any work)."""
    from pipeline.kernel_config import missing_shapes_message, tiles_of

    layout = opts.layout
    if not layout.needs_tiles:
        return
    missing: dict[tuple[int, int], list[str]] = {}
    for t in ckpt.plan.tensors:
        if t.role == TERNARY and tiles_of(opts.kernel_tiles, t.shape) is None:
            missing.setdefault(tuple(t.shape), []).append(t.gguf_name)
    if missing or opts.kernel_config is None:
        if not missing:  # no ternary projection at all: nothing to ask for
            return
        raise OptionError(missing_shapes_message(opts.kernel_config, layout.codec, missing))


def tensor_tiles(opts: Options, role: str, shape) -> tuple | None:
    """The kernel tiles of a ternary projection of a TL type, else None."""
    if role != TERNARY or not opts.layout.needs_tiles:
        return None
    from pipeline.kernel_config import tiles_of

    return tiles_of(opts.kernel_tiles, shape)


def tensor_types(opts: Options, ckpt, log=None) -> list[TensorInfo]:
    """Every tensor's output type and size; raises for a type that cannot hold a tensor."""
    check_kernel_shapes(opts, ckpt)
    infos, ternary, fallbacks = [], 0, 0
    for t in ckpt.plan.tensors:
        out, fallback = tensor_type(t.role, t.shape, opts.layout.name, opts.embedding_type, t.gguf_name)
        if t.role == TERNARY:
            ternary += 1
            fallbacks += fallback is not None
            if t.recipe.packed:  # the scale is the checkpoint's weight_scale, known now
                from stages.pack import check_scale
                from stages.quantize import ternary_scale

                check_scale(t.gguf_name, float(ternary_scale(t.recipe, None)), out.name)
        infos.append(TensorInfo(t.gguf_name, t.shape, out.ggml_type,
                                out.nbytes(t.shape, tensor_tiles(opts, t.role, t.shape))))
    if opts.out_type == "i2_s" and ternary and fallbacks == ternary:
        raise OptionError(f"--type i2_s: no projection of this checkpoint has rows that are a multiple of "
                          f"{opts.layout.block_size} values, so nothing could be I2_S; choose tq2_0 or tq1_0")
    return infos


def output_size(opts: Options, ckpt, infos: list[TensorInfo]) -> tuple[int, int]:
    """(bytes of the GGUF file(s), number of parts); checks every part's path."""
    from stages.assemble import file_kvs, plan_parts

    metadata = {"arch": ckpt.plan.arch, "kv": ckpt.kv}
    parts = plan_parts(infos, opts.split_max_size, opts.split_max_tensors)
    if len(parts) > MAX_SPLITS:
        raise OptionError(f"--split-max-size / --split-max-tensors: {len(parts)} parts; a split set has at most "
                          f"{MAX_SPLITS}; allow larger parts")
    if len(parts) > 1:  # every part's path, as -o's was checked: nothing but a GGUF (or --force) is replaced
        for path in final_paths(opts.output, len(parts)):
            check_output_path(path, opts.force)
    try:
        kvs = file_kvs(metadata, opts.layout.name, opts.kernel_tiles)
        return sum(file_size(kvs, [infos[i] for i in idx]) for idx in parts), len(parts)
    except (GGUFWriterError, ValueError) as e:
        raise CheckpointError(f"{opts.model_dir}: the GGUF header cannot be written ({e})") from None


def convert(opts: Options, log) -> list[Path]:
    if opts.scheduler.startswith("tcp://"):
        probe_scheduler(opts.scheduler)  # before anything is read or written: a wrong address is one line
    ckpt = open_checkpoint(opts.model_dir, name=opts.model_name or None, tokenizer_pre=opts.tokenizer_pre,
                           max_header_bytes=header_budget(opts.memory_limit), memory_limit=opts.memory_limit)
    for stage in STAGES:  # import everything first, so the budget's baseline includes it
        importlib.import_module(f"stages.{stage}")
    # assemble reads the key/values back beside the checkpoint's own copy: rows of the token table
    budget = plan_budget(opts.memory_limit, opts.workers, worker_processes=opts.scheduler == "local",
                         reserve=KV_READBACK_BYTES_PER_ROW * ckpt.plan.config["vocab_size"])
    infos = tensor_types(opts, ckpt)
    out_bytes, n_parts = output_size(opts, ckpt, infos)
    # what is at the output path(s) now: anything written there from here on is another
    # process's, and assemble does not replace it
    outputs_before = [identity(p) for p in final_paths(opts.output, n_parts)]
    keys = stage_keys(opts, ckpt)
    run = RunDir(opts.workdir)
    run.check_is_ours()
    worker_memory = max(1, (opts.memory_limit - current_rss()) // budget.workers)
    with run:
        check_disk(opts, ckpt, run, infos, out_bytes)
        scheduler = Scheduler(opts.scheduler, budget.workers, worker_memory, opts.progress)
        try:
            plan = ckpt.plan
            log(f"model: {opts.model_dir} ({plan.family.description}, {len(plan.tensors)} tensors)")
            built = f" for bitnet.cpp's {TARGET_NAMES[opts.target]} builds" if opts.layout.target else ""
            log(f"output: {opts.output} ({opts.out_type.upper()}{built}, embeddings {opts.embedding_type.upper()}, "
                f"GGUF arch {plan.arch})")
            log(f"run directory: {opts.workdir}")
            log(budget.describe())
            outputs = _run_stages(opts, ckpt, budget, scheduler, run, keys, log, outputs_before)
        finally:
            scheduler.close()
    size = sum(p.stat().st_size for p in outputs)
    kept = run.stores_size()
    shown = outputs[0] if len(outputs) == 1 else f"{outputs[0]} (+ {len(outputs) - 1} more parts)"
    log(f"wrote {shown} ({format_size(size)})")
    log(f"run directory kept for inspection and reruns: {opts.workdir} ({format_size(kept)}); "
        "delete it when you no longer need it")
    return outputs


def disk_needed(ckpt, infos: list[TensorInfo], out_bytes: int) -> tuple[int, int]:
    """(bytes the run directory will hold, bytes of the GGUF), estimated from the plan. extract
    and quantize index the checkpoint's float tensors, and pack those whose bytes do not change."""
    from stages.pack import SAME_BYTES
    from stages.quantize import LAYOUT_2BIT, code_layout

    from pipeline.budget import MAX_CHUNK_BYTES

    last: dict = {}  # the last tensor of each file: an edge chunk of it that runs past the file's end is a copy
    for t in ckpt.plan.tensors:
        src = ckpt.sources[t.hf_name]
        if src.offset >= last.get(src.file, src).offset:
            last[src.file] = src
    extract = sum(min(MAX_CHUNK_BYTES, math.prod(src.shape) * src.np_dtype.itemsize) for src in last.values())
    codes = packed = 0
    for t, info in zip(ckpt.plan.tensors, infos):
        source = ckpt.sources[t.hf_name]
        extract += 8 * (t.source_shape[0] if len(t.source_shape) > 1 else 1) + (64 << 10)  # side arrays, metadata
        if t.role == TERNARY:  # 2-bit codes, or int8 where rows are not whole 128-value blocks
            values = math.prod(t.shape)
            codes += values // 4 if code_layout(t.shape[-1]) == LAYOUT_2BIT else values
            packed += info.nbytes
        elif (source.dtype, BY_GGML_TYPE[info.ggml_type].name) not in SAME_BYTES:
            packed += info.nbytes
    return extract + codes + packed, out_bytes


def check_disk(opts: Options, ckpt, run: RunDir, infos, out_bytes: int) -> None:
    """Refuse up front when the run directory's or the output's disk cannot hold the result."""
    work_bytes, out_bytes = disk_needed(ckpt, infos, out_bytes)
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


def _source_unchanged(ckpt):
    """A check that the weight files are still the ones the run started from (every stage reads
    them: extract's arrays index their bytes)."""
    def check() -> None:
        files = [Path(p) if Path(p).is_absolute() else ckpt.model_dir / p for p, *_ in ckpt.fingerprint]
        try:
            now = files_fingerprint(ckpt.model_dir, files)
        except OSError:
            now = None
        if now != ckpt.fingerprint:
            raise source_changed(ckpt.model_dir)
    return check


def check_float_ranges(store: Path, ckpt, opts: Options) -> None:
    """Refuse a float tensor whose values its output type cannot hold as finite numbers (F16
    tops out at 65504, BF16 below float32's largest values, Q8_0's block scale is an fp16), from
    the row maxima extract recorded: before anything is packed, naming the tensor."""
    from stages.extract import largest_values

    for t in ckpt.plan.tensors:
        if t.role == TERNARY:
            continue  # ternary values are codes times the scale, which pack checks
        out, _ = tensor_type(t.role, t.shape, opts.layout.name, opts.embedding_type, t.gguf_name)
        biggest = largest_values(store, t.gguf_name)
        if not out.holds(biggest):
            roomier = [n for n in ("bf16", "f32") if OUTPUT_TYPES[n].holds(biggest)]
            option = "--embedding-type" if t.role != "norm" else "the output type"
            raise CheckpointError(f"{ckpt.sources[t.hf_name].file}: tensor {t.hf_name} has values up to {biggest:.6g}, "
                                  f"beyond {out.codec.name}'s range ({out.largest:.6g}); choose {option} "
                                  f"{' or '.join(roomier)}")


def _run_stages(opts, ckpt, budget, scheduler, run, keys, log, outputs_before=None) -> list[Path]:
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
    if n := remove_stale_temps(opts.output, opts.workdir):
        log(f"removed {n} unfinished output file(s) of an interrupted run")
    previous = None
    check_source = _source_unchanged(ckpt)
    for stage in STAGES:
        state = manifest["stages"].get(stage)
        if stage != "assemble" and _finished(stage, state, keys[stage]) and not run.store(stage).is_dir():
            log(f"{stage}: its store {run.store(stage)} is gone: redoing {stage} and the stages after it")
            run.reset_from(stage, manifest)
            state = None
        if _finished(stage, state, keys[stage]):
            log(f"{stage}: already done, skipped")
        elif state is not None and state.get("key") != keys[stage]:
            run.reset_from(stage, manifest)  # an option it depends on changed
        if not _finished(stage, manifest["stages"].get(stage), keys[stage]):
            _run_stage(stage, opts, budget, scheduler, run, previous, ckpt, manifest, keys[stage], log, check_source,
                       outputs_before)
        if stage == "extract":
            check_float_ranges(run.store("extract"), ckpt, opts)
        previous = run.store(stage)
    return [Path(p) for p, *_ in manifest["stages"]["assemble"]["outputs"]]


def _run_stage(stage, opts, budget, scheduler, run, previous, ckpt, manifest, key, log, check_source,
               outputs_before=None) -> None:
    if stage != "extract":
        run.check_sealed(STAGES[STAGES.index(stage) - 1])  # its input is what was written
    started = time.monotonic()
    log(f"{stage}: running")
    manifest["stages"][stage] = {"key": key, "state": "running"}
    run.save(manifest)
    output = opts.output if stage == "assemble" else run.store(stage)
    ctx = StageContext(opts, budget, scheduler, previous, output, ckpt if stage == "extract" else None, log,
                       run.metadata_path, before_publish=check_source, outputs_before=outputs_before)
    importlib.import_module(f"stages.{stage}").run(ctx)
    if stage != "assemble":  # assemble checks before it publishes
        check_source()  # a file rewritten while it was read would mix old and new weights
        run.seal(stage)
    state = {"key": key, "state": "done", "seconds": round(time.monotonic() - started, 2)}
    if stage == "assemble":
        state["outputs"] = [[str(p), *(written_identity(p) or [])] for p in ctx.outputs]
    manifest["stages"][stage] = state
    run.save(manifest)
    log(f"{stage}: done in {state['seconds']} s")
