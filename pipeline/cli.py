"""Command line: `bitnet-gguf convert MODEL_DIR ...` and `bitnet-gguf status WORKDIR`.

Exit status: 0 success, 2 a problem with the input or options, 1 anything else,
130 interrupted (rerun the same command to continue).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import sys
import traceback
import unicodedata
import warnings
from pathlib import Path

from pipeline.errors import ResumableFailure, UserError
from pipeline.outtypes import (DEFAULT_EMBEDDING_TYPE, DEFAULT_TYPE, EMBEDDING_CHOICES, TARGETS, TERNARY_CHOICES,
                               choices_help)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DESCRIPTION = """\
Convert a BitNet b1.58 (ternary) Hugging Face checkpoint to GGUF for llama.cpp,
out of core: no tensor is ever held whole, and peak memory stays under
--memory-limit. Work happens in a run directory of zarr stores
(extract -> quantize -> pack -> assemble); rerunning an interrupted command
continues where it stopped."""


def one_line(text: str) -> str:
    """`text` as one printable line: a line break or other control character (in a path, a model
    id, a name from a file) is written as its escape (\\n, \\x1b), and so is a lone surrogate (a
    name that is not UTF-8), so a message never spills onto a second line or fails to print. Every
    line this command writes to stderr passes through here: it is where paths meet messages."""
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") else c for c in text)


def _log(message: str) -> None:
    print(one_line(shown(message)), file=sys.stderr, flush=True)


def _error(message: str) -> None:
    print(one_line(shown(f"bitnet-gguf: error: {message}")), file=sys.stderr, flush=True)


def shown(message: str) -> str:
    """A remote checkpoint's small files are named by their URL, not by the directory they are
    staged in."""
    from pipeline.remote import shown_paths

    return shown_paths(message)


class HeldLog:
    """The command's log, holding some lines back until the first line the command logs itself
    (which comes after every check: a refusal is then its one line alone), or `flush`."""

    def __init__(self, *held: str):
        self.held = list(held)

    def flush(self) -> None:
        for line in self.held:
            _log(line)
        self.held.clear()

    def __call__(self, message: str) -> None:
        self.flush()
        _log(message)


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are one line too (the usage block is what --help is for)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, one_line(f"bitnet-gguf: error: {message} (see {self.prog} --help)") + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bitnet-gguf", description=DESCRIPTION,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a checkpoint directory to a GGUF file",
                       description="Convert a checkpoint directory (config.json, *.safetensors, tokenizer) to GGUF.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_options(c)
    c.add_argument("--dry-run", action="store_true",
                   help="show the plan (as `bitnet-gguf plan`) and write nothing")
    pl = sub.add_parser("plan", help="show what a conversion would do, without writing anything",
                        description="Every GGUF tensor (source dtype -> output type, size, part, fallback), the "
                                    "output and run directory sizes and the memory budget, from the checkpoint's "
                                    "headers and the options convert takes; what convert would refuse is refused.")
    add_convert_options(pl)
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    return build_parser_rest(p, sub)


def add_convert_options(c) -> None:
    c.add_argument("model", metavar="MODEL",
                   help="Hugging Face checkpoint directory, or a model id org/name already downloaded to the "
                        "local Hugging Face cache (HF_HUB_CACHE / HF_HOME; never downloaded), or a URL read where "
                        "it lives, weights by byte range and never stored: hf://ORG/NAME[@REVISION] (token from "
                        "`hf auth login` or HF_TOKEN, HF_ENDPOINT honoured), https://HOST/DIR/, or any installed "
                        "fsspec filesystem's URL (s3://, gs://, memory://)")
    c.add_argument("-o", "--output", type=Path, default=None,
                   help="GGUF file to write (default: ./<model name>-<TYPE>.gguf); with several --type, the "
                        "directory the <model name>-<TYPE>.gguf files go to (default: .)")
    c.add_argument("--type", dest="out_type", default=None, metavar="TYPE",
                   help="type of the ternary projections: auto (the smallest type that holds them exactly and that "
                        "the family's runtime runs: tq2_0 for one scale per tensor; for group-scaled checkpoints, "
                        "decided from the first and last rows of every projection: q1_0 for binary ones with one "
                        "scale per 128 values, tq2_0 per 256, q2_0 per 64 or 128; never i2_s/tl1/tl2); "
                        f"{choices_help(TERNARY_CHOICES)} [preset: {DEFAULT_TYPE}]. A comma list (tq2_0,i2_s,iq2_bn) "
                        "writes one file per type from one read of the checkpoint (auto in the list: the type "
                        "auto chooses; a type listed twice is refused)")
    c.add_argument("--target", default=None, choices=TARGETS, type=str.lower,
                   help="the bitnet.cpp build the file is for: x86 (AVX2) or arm (NEON); it decides --type i2_s's "
                        "byte layout (blocks of 128 or 64 values; a file for one build computes garbage on the "
                        "other) [default: this machine; tl1: arm, tl2: x86]")
    c.add_argument("--kernel-config", type=Path, default=None, metavar="PATH",
                   help="for --type tl1/tl2: the include/kernel_config.ini your bitnet.cpp build was generated with "
                        "(its tiles per matrix shape decide the bytes)")
    c.add_argument("--allow-requantize", action="store_true", default=None,
                   help="a group-scaled checkpoint (one ternary scale per group of columns) whose scale changes "
                        "inside a block of --type (64 values for q2_0, 128 for q1_0, 256 for tq2_0/tq1_0, the "
                        "whole tensor for i2_s/tl1/tl2), or that holds a 0 for q1_0 (binary signs only), is "
                        "refused unless this is given; with it, such a tensor is requantized "
                        "to --type by the "
                        "type's own quantizer (lossy: a warning per tensor says what changed); q2_0 holds groups "
                        "of 64 or more without it")
    c.add_argument("--embedding-type", default=None, metavar="TYPE",
                   help=f"type of token_embd and output: {choices_help(EMBEDDING_CHOICES)} "
                        f"[default: {DEFAULT_EMBEDDING_TYPE}]")
    c.add_argument("--split-max-size", default=None, metavar="SIZE",
                   help="split the output into NAME-00001-of-0000N.gguf parts of at most SIZE of tensor data "
                        "each, written like llama.cpp's converter (300K, 2G: powers of 1000) or 512MiB")
    c.add_argument("--split-max-tensors", default=None, metavar="N",
                   help="split the output into parts of at most N tensors each")
    c.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="peak resident memory of the whole conversion, e.g. 512MiB, 4GiB [preset: 4GiB]")
    c.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="BPE pre-tokenizer name for tokenizer.ggml.pre (e.g. llama-bpe, falcon3), when it cannot "
                        "be recognised from tokenizer.json (default: detected as llama.cpp's converter does)")
    c.add_argument("--model-name", default=None, metavar="NAME",
                   help="general.name of the file (default: from README.md's front matter, config.json or the "
                        "directory's name, as llama.cpp's converter decides it)")
    c.add_argument("--metadata", type=Path, default=None, metavar="FILE.json",
                   help="general.* key/values overriding the guessed ones, in llama.cpp's converter's layout "
                        "(e.g. {\"general.name\": \"...\", \"general.license\": \"mit\", \"general.tags\": [...]}); "
                        "README.md lists the keys and their JSON types, anything else is refused")
    c.add_argument("--vocab-only", action="store_true",
                   help="write only the tokenizer and key/values, no tensors (reads config.json and the "
                        "tokenizer, not the weights; default output ./<model name>-vocab.gguf)")
    c.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="run directory for the intermediate zarr stores (default: <output>.work); "
                        "rerun with the same one to resume")
    c.add_argument("--low-disk", action="store_true", default=None,
                   help="keep the disk at about the output's size: assemble removes each tensor's codes from the "
                        "run directory once the tensor is in the output (fsynced and recorded), and a rerun after a "
                        "kill continues the unfinished output; the run directory's codes are then gone (inspect "
                        "--codes is refused; another --type or -o redoes quantize, fetching a remote checkpoint "
                        "again); one --type only")
    c.add_argument("--workers", type=int, default=None, metavar="N",
                   help="parallel chunk tasks (default: from CPU count and memory limit)")
    sched = c.add_mutually_exclusive_group()
    sched.add_argument("--cluster", choices=["local"], default=None,
                       help="run chunk tasks on a local dask.distributed cluster instead of threads")
    sched.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                       help="use an existing dask cluster (the run directory must be on storage every worker sees)")
    c.add_argument("--worker-timeout", default=None, metavar="SECONDS",
                   help="with --scheduler or --cluster: while chunk tasks wait and no dask worker is connected, "
                        "give up after this many seconds (exit 1; rerun to continue) [preset: 300]")
    c.add_argument("--config", type=Path, default=None, metavar="TOML",
                   help="preset file (default: configs/default.toml); command-line flags override it")
    c.add_argument("--no-progress", action="store_true",
                   help="do not draw progress bars (they are drawn only when stderr is a terminal)")
    c.add_argument("--force", action="store_true",
                   help="replace an existing output file that is not a GGUF file")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback when something fails")


def build_parser_rest(p, sub) -> argparse.ArgumentParser:
    s = sub.add_parser("status", help="show the stages of a run directory",
                       description="Show which stages of a run directory are done.")
    s.add_argument("workdir", type=Path, metavar="WORKDIR", help="run directory (printed by convert)")
    s.add_argument("--json", action="store_true", help="print the manifest as JSON")

    i = sub.add_parser("inspect", help="list every tensor of a run directory's stores, or one tensor, or plot them",
                       description="Per tensor and store: shape, dtype, chunks written, scale, GGML type; "
                                   "with --codes also the share of -1/0/+1 (reads the codes). With TENSOR, that "
                                   "tensor's recipe, source, chunk layout, scales and GGML size. With --plot, a "
                                   "figure of the scale and -1/0/+1 shares of every layer and projection.")
    i.add_argument("workdir", type=Path, metavar="WORKDIR",
                   help="run directory (printed by convert), or a GGUF file (its header: type, target, tensors)")
    i.add_argument("tensor", nargs="?", default=None, metavar="TENSOR",
                   help="GGUF tensor name, e.g. blk.0.attn_q.weight (inspect WORKDIR lists them)")
    i.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="draw scale, -1/0/+1 shares (and |W|/absmean histograms of master weights) per layer "
                        "and projection into an image file (.png, .svg, .pdf, ...); works on an interrupted run")
    i.add_argument("--codes", action="store_true", help="count -1/0/+1 in every ternary tensor (reads all codes)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")

    v = sub.add_parser("verify", help="check a GGUF file against its source checkpoint, tensor by tensor",
                       description="Recompute the whole file from the checkpoint (key/values, tensor infos, "
                                   "every tensor chunk by chunk, the file's length; every part of a split set) "
                                   "and compare. Exit 0 if all match, 1 if anything differs.")
    v.add_argument("gguf", type=Path, metavar="GGUF", help="file written by convert")
    v.add_argument("model", metavar="MODEL", help="the checkpoint it was converted from (directory, org/name or URL)")
    v.add_argument("--memory-limit", default="1GiB", metavar="SIZE", help="peak memory while verifying")
    v.add_argument("--model-name", "--name", dest="name", default=None, metavar="NAME",
                   help="the --model-name the file was converted with, if any")
    v.add_argument("--metadata", type=Path, default=None, metavar="FILE.json",
                   help="the --metadata file the file was converted with, if any")
    v.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="the --tokenizer-pre the file was converted with, if any")
    v.add_argument("--target", default=None, choices=TARGETS, type=str.lower,
                   help="the bitnet.cpp build the file must be laid out for (default: the one the file names)")
    return p


def cmd_verify(args) -> int:
    from pipeline.budget import check_memory_limit
    from pipeline.config import parse_size
    from pipeline.errors import OptionError
    from pipeline.hub import resolve_model
    from pipeline.verify import verify

    memory_limit = check_memory_limit(parse_size(args.memory_limit))
    if not args.gguf.is_file():
        raise OptionError(f"{args.gguf}: no such file")
    model = resolve_model(args.model)
    if args.metadata is not None and not args.metadata.is_file():
        raise OptionError(f"--metadata: {args.metadata} does not exist or is not a file")
    problems = verify(args.gguf, model.path, memory_limit, _log, name=model.name,
                      tokenizer_pre=args.tokenizer_pre, target=args.target, model_name=args.name,
                      metadata_file=args.metadata)
    for p in problems:
        print(f"MISMATCH {p}")
    print(f"{args.gguf}: " + ("OK: key/values, tensors and length are what the checkpoint converts to"
                              if not problems else f"{len(problems)} problem(s)"))
    return EXIT_FAILURE if problems else EXIT_OK


def cmd_inspect(args) -> int:
    from pipeline.errors import RunDirError
    from pipeline.inspect_run import damage_error, inspect_command
    from pipeline.errors import OptionError
    from pipeline.rundir import CODES_CONSUMED, RunDir

    if args.workdir.is_file():  # a GGUF file: what its header says
        from pipeline.inspect_run import describe_gguf, format_gguf

        report = describe_gguf(args.workdir, args.tensor)
        print(json.dumps(report, indent=2) if args.json else format_gguf(report))
        return EXIT_OK
    run = RunDir(args.workdir)
    if not run.is_our_manifest(run._read_manifest()):
        raise RunDirError(f"{args.workdir}: no bitnet-gguf manifest.json; not a bitnet-gguf run directory")
    if (args.codes or args.plot) and run.load().get(CODES_CONSUMED):
        raise OptionError(f"{'--codes' if args.codes else '--plot'}: the codes of {args.workdir} were removed as "
                          "the output was written (convert --low-disk); rerun the convert command without --low-disk, "
                          "after deleting its output, to make them again")
    text, damaged = inspect_command(run, args.tensor, codes=args.codes, as_json=args.json, plot=args.plot, log=_log)
    if text:
        print(text, flush=True)
    if damaged:  # the rest is shown above, the damaged arrays marked; the status says the directory is damaged
        raise damage_error(run, damaged)
    return EXIT_OK


def _convert_options(args):
    """(the options, a log function): a model id from the cache is said with the first line the
    command logs, which comes after every check, so a refusal stays one line. With several --type
    (`--type tq2_0,i2_s`), a list of options, one per output."""
    from pipeline.config import make_many_options, make_options, type_list
    from pipeline.hub import resolve_model
    from pipeline.remote import is_url, redact

    model = resolve_model(args.model)
    said = redact(args.model) if is_url(args.model) else f"{args.model}: {model.path}"
    log = HeldLog(*([f"model {said} ({model.source})"] if model.source != "directory" else []))
    scheduler = "local" if args.cluster else args.scheduler
    common = dict(model_name=model.name, output=args.output, workdir=args.workdir,
                  preset=args.config, tokenizer_pre=args.tokenizer_pre, embedding_type=args.embedding_type,
                  split_max_size=args.split_max_size, split_max_tensors=args.split_max_tensors,
                  target=args.target, kernel_config=args.kernel_config,
                  memory_limit=args.memory_limit, workers=args.workers,
                  scheduler=scheduler, worker_timeout=args.worker_timeout,
                  progress=False if args.no_progress else sys.stderr.isatty(),
                  force=args.force, name_override=args.model_name, metadata_file=args.metadata,
                  vocab_only=args.vocab_only, allow_requantize=args.allow_requantize,
                  low_disk=args.low_disk)
    types = type_list(args.out_type)
    if types is not None:
        return make_many_options(model.path, types, **common), log
    return make_options(model.path, out_type=args.out_type, **common), log


def cmd_plan(args) -> int:
    from pipeline.errors import OptionError
    from pipeline.runner import plan_conversion

    opts, log = _convert_options(args)
    if isinstance(opts, list):  # several --type: every output's plan
        from pipeline.runner import plan_many

        plans = plan_many(opts)
        log.flush()
        if getattr(args, "json", False):
            print(json.dumps({"outputs": [p.as_json() for p in plans], "run_directory": str(opts[0].workdir),
                              "run_dir_bytes": plans[0].run_dir_bytes + sum(p.stores["pack"] for p in plans[1:]),
                              "output_bytes": sum(p.output_bytes for p in plans)}, indent=2))
        else:
            print(f"{len(plans)} outputs from one read of the checkpoint (extract and quantize once, then pack and "
                  f"assemble each; run directory {opts[0].workdir}):")
            print("\n\n".join(p.table() for p in plans))
        return EXIT_OK
    if opts.vocab_only:
        raise OptionError("--vocab-only: nothing to plan (no tensors, no run directory); drop --vocab-only")
    plan = plan_conversion(opts)
    log.flush()
    print(json.dumps(plan.as_json(), indent=2) if getattr(args, "json", False) else plan.table())
    return EXIT_OK


def cmd_convert(args) -> int:
    from pipeline.runner import convert, convert_vocab_only

    if args.dry_run:
        return cmd_plan(args)
    opts, log = _convert_options(args)
    if isinstance(opts, list):
        from pipeline.runner import convert_many

        convert_many(opts, log)
        return EXIT_OK
    (convert_vocab_only if opts.vocab_only else convert)(opts, log)
    return EXIT_OK


def cmd_status(args) -> int:
    from pipeline.rundir import CODES_CONSUMED, STAGES, RunDir, checkpoint_state
    from pipeline.errors import RunDirError

    run = RunDir(args.workdir)
    manifest = run.load()
    if not manifest:
        raise RunDirError(f"{args.workdir}: no manifest.json; not a bitnet-gguf run directory")
    if args.json:
        print(json.dumps(manifest, indent=2))
        return EXIT_OK
    opts = manifest.get("options", {})
    running = run.is_locked()
    print(f"run directory: {run.path}{'  (a conversion is running)' if running else ''}")
    print(f"model: {opts.get('model_dir')}")
    source = checkpoint_state(manifest)
    if source is not None:
        print(f"  checkpoint {source['state']}: {source['message']}")
    several = manifest.get("outputs") if isinstance(opts.get("output"), list) else None
    if several is None:
        print(f"output: {opts.get('output')}")
    interrupted = False

    def show(stage: str, st: dict, output) -> bool:
        state = st.get("state", "pending")
        if state == "running" and not running:
            state = "interrupted"
        if stage == "assemble" and state == "done" and \
                not all(Path(p).is_file() for p, *_ in st.get("outputs", [[output or ""]])):
            state = "output missing"
        extra = f"  {st['seconds']} s" if "seconds" in st and state == "done" else ""
        print(f"  {stage:<9} {state}{extra}")
        return state == "interrupted"

    for stage in STAGES if several is None else STAGES[:2]:
        interrupted |= show(stage, manifest.get("stages", {}).get(stage, {}), opts.get("output"))
    if several is not None:  # several --type: each output's own pack and assemble
        records = {r.get("output"): r.get("stages", {}) for r in several.values()}
        for output in opts["output"]:
            print(f"output: {output}")
            for stage in STAGES[2:]:
                interrupted |= show(stage, records.get(output, {}).get(stage, {}), output)
    if manifest.get(CODES_CONSUMED):
        print("codes: removed from quantize.zarr and pack.zarr as the output was written (--low-disk); a run "
              "that needs them again redoes quantize")
    if interrupted:
        print("rerun the same convert command to continue from the chunks already written")
    return EXIT_OK


def _end_fetching() -> None:
    """End a remote source's fetch threads when the command ends (plan, inspect and verify read by
    range too), not at the interpreter's exit: remote.end_fetching says why."""
    remote = sys.modules.get("pipeline.remote")  # not imported: nothing was fetched
    if remote is not None:
        remote.end_fetching()


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwind normally: partial files are removed, stores stay consistent


def _quiet_numcodecs_install_note() -> None:
    """numcodecs 0.16.4+ warns once, at its import, when the `crc32c` package (what zarr 3.1.0-3.1.2
    install) is there instead of google_crc32c, with a filter of its own that shows it: a library's install note
    above our one line. Import it here with the note silenced (only in that case: the import costs
    a command that never needs it)."""
    import importlib.util

    if "numcodecs" in sys.modules or importlib.util.find_spec("google_crc32c") is not None \
            or importlib.util.find_spec("crc32c") is None:
        return
    with warnings.catch_warnings(record=True):  # numcodecs puts its own filter first: keep what it shows
        import numcodecs  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    _quiet_numcodecs_install_note()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        try:
            return {"convert": cmd_convert, "plan": cmd_plan, "status": cmd_status, "inspect": cmd_inspect,
                    "verify": cmd_verify}[args.command](args)
        finally:
            _end_fetching()
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        _error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        # a write zarr's event loop thread was doing is abandoned (zarr writes a file whole or not
        # at all); asyncio's complaints about it at exit are not for the user
        logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
        # so are the leftovers of whatever the signal cut short (an event loop half constructed,
        # a coroutine never awaited), reported when they are collected on the way out
        sys.unraisablehook = lambda unraisable: None
        warnings.simplefilter("ignore")
        print("bitnet-gguf: interrupted; rerun the same command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ResumableFailure as e:
        if args.debug:
            traceback.print_exc()
        print(one_line(shown(f"bitnet-gguf: failed: {e}")), file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # noqa: BLE001 - the CLI boundary
        if args.debug:
            traceback.print_exc()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            _log(f"bitnet-gguf: failed: no space left on the device{f' writing {e.filename}' if e.filename else ''}; "
                 "free some space (or choose another --workdir / -o) and rerun the same command to continue")
            return EXIT_FAILURE
        _log(f"bitnet-gguf: failed: {type(e).__name__}: {e} (rerun with --debug for the traceback; "
             "rerunning the same command resumes)")
        return EXIT_FAILURE
