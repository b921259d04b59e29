"""Conversion options: one frozen dataclass, built from a TOML preset plus CLI flags."""
from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from pathlib import Path

from pipeline.errors import OptionError
from pipeline.outtypes import (AUTO_TYPE, DEFAULT_EMBEDDING_TYPE, DEFAULT_TYPE, EMBEDDING_CHOICES, OUTPUT_TYPES,
                               TYPE_OPTIONS, OutputType, check_choice, resolve, target_of)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = CONFIG_DIR / "default.toml"

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}


def parse_size(text: str | int, option: str = "--memory-limit", bare_letters_decimal: bool = False) -> int:
    """'512MiB' -> 536870912. Binary units for KiB/MiB/..., decimal for KB/MB/GB; a bare K/M/G/T
    is binary, or decimal with `bare_letters_decimal` (llama.cpp's --split-max-size: 2G = 2e9)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise OptionError(f"{option}: size {text} is negative")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text)) if isinstance(text, str) else None
    if not m or m.group(2).lower() not in _UNITS:
        raise OptionError(f"{option}: cannot read size {text!r}; write it like 512MiB, 4GiB or 16G")
    unit = m.group(2).lower()
    factor = 1000 ** ("kmgt".index(unit) + 1) if bare_letters_decimal and len(unit) == 1 and unit != "b" \
        else _UNITS[unit]
    value = float(m.group(1)) * factor
    if value >= 2**62:
        raise OptionError(f"{option}: size {text!r} is too large")
    if value and not int(value):
        raise OptionError(f"{option}: size {text!r} is less than one byte")
    return int(value)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclasses.dataclass(frozen=True)
class Options:
    model_dir: Path
    output: Path
    workdir: Path
    out_type: str = DEFAULT_TYPE
    memory_limit: int = 4 * 1024**3
    workers: int = 0            # 0: decided by the memory budget and the CPU count
    scheduler: str = "threads"  # "threads", "local" (distributed.LocalCluster) or tcp://host:port
    worker_timeout: float = 300.0  # a dask cluster with no worker for this many seconds: give up
    progress: bool = True
    force: bool = False         # replace an existing output that is not a GGUF file
    embedding_type: str = DEFAULT_EMBEDDING_TYPE  # token_embd and output
    split_max_size: int = 0     # bytes of tensor data per output part (0: no limit)
    split_max_tensors: int = 0  # tensors per output part (0: no limit)
    model_name: str = ""        # general.name and the default output name (not a snapshot's hash)
    tokenizer_pre: str | None = None  # BPE pre-tokenizer name, when detection cannot tell
    target: str = "x86"         # the bitnet.cpp build (x86, arm) whose byte layout --type i2_s writes
    kernel_config: Path | None = None  # TL1/TL2: the kernel_config.ini of the user's bitnet.cpp build
    kernel_tiles: tuple = ()    # ... read: (m, k, BM, BK, bm) per section
    name_override: str | None = None  # --model-name: general.name, over README and --metadata
    metadata_file: Path | None = None  # --metadata: general.* overrides (llama.cpp's JSON layout)
    vocab_only: bool = False    # --vocab-only: tokenizer and key/values, no tensors
    allow_requantize: bool = False  # group-scaled tensors a type cannot hold are requantized (lossy), not refused
    type_reason: str | None = None  # --type auto: why out_type was chosen (None: --type was given)
    low_disk: bool = False      # assemble removes each tensor's codes once it is in the output (stages/assemble.py)

    @property
    def layout(self) -> OutputType:
        """The output type registry entry of --type for --target."""
        return resolve(self.out_type, self.target)

    def as_json(self) -> dict:
        from pipeline.remote import label

        d = dataclasses.asdict(self)
        d["model_dir"] = label(self.model_dir)  # a remote checkpoint's URL, not the directory of its small files
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# a preset is a dozen lines; tomllib holds up to about 100 bytes per byte of a file of tables (measured)
MAX_PRESET_BYTES = 64 * 1024
PRESET_BYTES_PER_BYTE = 128


def load_preset(path: Path | None, memory_limit: int | None = None) -> dict:
    """Read a TOML preset; keys are Options field names (sizes may be strings). `memory_limit`:
    the --memory-limit given on the command line, which the file's reading must fit in (without
    it, the preset's own memory_limit, checked once the small file is read)."""
    from pipeline.safe_files import read_option_file, refuse_too_big

    if path is None and not DEFAULT_PRESET.is_file():
        return {}  # installed without the presets: the dataclass defaults are the default preset
    path = path or DEFAULT_PRESET
    kind = "a TOML preset file (like configs/default.toml)"
    raw = read_option_file(path, "--config", kind, MAX_PRESET_BYTES, PRESET_BYTES_PER_BYTE, memory_limit)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise OptionError(f"--config: {path} is not valid TOML ({str(e).splitlines()[0] if str(e) else e})") from None
    if memory_limit is None and isinstance(data, dict):
        try:
            own_limit = parse_size(data.get("memory_limit", Options.memory_limit))
        except OptionError:
            own_limit = None  # refused with the other preset values, naming the value
        if own_limit:  # the file is small (the cap): what reading it took can be judged after
            refuse_too_big(path, "--config", kind, len(raw), MAX_PRESET_BYTES, PRESET_BYTES_PER_BYTE, own_limit)
    known = {f.name for f in dataclasses.fields(Options)} - {"model_dir", "output", "workdir", "model_name",
                                                               "tokenizer_pre", "kernel_config", "kernel_tiles",
                                                               "name_override", "metadata_file", "vocab_only",
                                                               "type_reason"}
    unknown = set(data) - known
    if unknown:
        raise OptionError(f"--config: {path} has unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
    return data


def default_output(model_name: str, out_type: str, vocab_only: bool = False) -> Path:
    return Path.cwd() / f"{model_name}-{'vocab' if vocab_only else out_type.upper()}.gguf"


_SCHEDULER_ADDRESS = re.compile(r"tcp://(?P<host>[^\s:/]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})/?")
_BOOL_OPTIONS = {"progress": "--no-progress", "force": "--force", "allow_requantize": "--allow-requantize",
                 "low_disk": "--low-disk"}


def _whole_number(values: dict, key: str, option: str) -> int:
    value = values.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OptionError(f"{option}: {value!r} is not a whole number")
    try:
        number = int(value)
    except ValueError:
        raise OptionError(f"{option}: {value!r} is not a whole number") from None
    if number < 0:
        raise OptionError(f"{option}: must be 0 or a positive number, not {number}")
    return number


def _seconds(value, option: str) -> float:
    """A positive, finite number of seconds (text from the command line, a number in a preset)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise OptionError(f"{option}: {value!r} is not a number of seconds")
    try:
        number = float(value)
    except ValueError:
        raise OptionError(f"{option}: {value!r} is not a number of seconds") from None
    if not 0 < number < float("inf"):
        raise OptionError(f"{option}: must be a positive number of seconds, not {value!r}")
    return number


def check_scheduler(value) -> str:
    scheduler = str(value)
    if scheduler in ("threads", "local"):
        return scheduler
    m = _SCHEDULER_ADDRESS.fullmatch(scheduler)
    if not m or not 0 < int(m.group("port")) < 65536:
        raise OptionError(f"--scheduler: {scheduler!r} is not threads, local or a tcp://HOST:PORT address "
                          "(with a port from 1 to 65535)")
    return scheduler


NAME_MAX = 255  # bytes in one file name on the usual file systems


def _require_utf8(path: Path, option: str) -> None:
    """Paths go into the manifest, the GGUF's general.name and C libraries as UTF-8."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise OptionError(f"{option}: the path {shown} is not valid UTF-8; rename it or choose another") from None


PATH_MAX = 4096  # bytes in a whole path (Linux), the terminating NUL included
# the longest path the conversion makes inside a run directory, past the directory's own path:
# /<stage>.zarr/<tensor name>.abs_max/zarr.<32 hex>.partial, tensor names being GGUF names (<= 64 bytes)
RUN_DIR_INNER_BYTES = 136


def _check_name_length(path: Path, extra: int, option: str) -> None:
    if len(path.name.encode()) + extra > NAME_MAX:
        raise OptionError(f"{option}: the file name {path.name[:40]}... is too long (with the converter's "
                          f"temporary suffix it exceeds {NAME_MAX} bytes); choose a shorter name")
    if len(os.fsencode(path)) + extra >= PATH_MAX:
        raise OptionError(f"{option}: the path {str(path)[:40]}... is too long (with the files the converter "
                          f"makes there it exceeds {PATH_MAX} bytes); choose a shorter path")


def check_output_path(output: Path, force: bool) -> None:
    """Only nothing, or a regular file (a GGUF one, unless --force), may be replaced at the output."""
    try:
        st = os.lstat(output)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OptionError(f"-o: cannot look at {output} ({e.strerror}); choose another output path") from None
    if stat.S_ISDIR(st.st_mode):
        raise OptionError(f"-o: {output} is a directory; give a file name such as {output / 'model.gguf'}")
    if stat.S_ISLNK(st.st_mode):
        raise OptionError(f"-o: {output} is a symbolic link; give the path of the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise OptionError(f"-o: {output} is not a regular file (a device, FIFO or socket); "
                          "choose another output path")
    if force:
        return
    try:
        with open(output, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise OptionError(f"-o: cannot read the existing {output} ({e.strerror}); choose another output path") from None
    if magic != b"GGUF":
        raise OptionError(f"-o: {output} exists and is not a GGUF file; choose another output path "
                          "or pass --force to replace it")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _checked_values(values: dict) -> dict:
    """Option values (preset keys; sizes as text or numbers) checked and normalized."""
    values = dict(values)
    values["out_type"] = check_choice(values.get("out_type", DEFAULT_TYPE), TYPE_OPTIONS, "--type")
    if values["out_type"] == AUTO_TYPE:  # never a type with a target: the given one is kept, checked
        values["target"] = target_of("f16", values.get("target"))  # as for any type without a layout per build
    else:
        values["target"] = target_of(values["out_type"], values.get("target"))
    # a float --type makes the whole file that type unless --embedding-type says otherwise, as
    # llama.cpp's --outtype does; ternary types keep F16 embeddings (as llama.cpp's converter too)
    default_embedding = values["out_type"] if values["out_type"] in EMBEDDING_CHOICES \
        and not OUTPUT_TYPES[values["out_type"]].codec.ternary else DEFAULT_EMBEDDING_TYPE
    values["embedding_type"] = check_choice(values.get("embedding_type", default_embedding),
                                            EMBEDDING_CHOICES, "--embedding-type")
    from pipeline.budget import check_memory_limit  # budget formats sizes with this module's format_size

    values["memory_limit"] = check_memory_limit(parse_size(values.get("memory_limit", Options.memory_limit)))
    values["split_max_size"] = parse_size(values.get("split_max_size", 0), "--split-max-size",
                                          bare_letters_decimal=True)
    values["workers"] = _whole_number(values, "workers", "--workers")
    values["split_max_tensors"] = _whole_number(values, "split_max_tensors", "--split-max-tensors")
    for key, option in _BOOL_OPTIONS.items():
        if key in values and not isinstance(values[key], bool):
            raise OptionError(f"{option}: {key} must be true or false, not {values[key]!r}")
    values["scheduler"] = check_scheduler(values.get("scheduler", "threads"))
    values["worker_timeout"] = _seconds(values.get("worker_timeout", Options.worker_timeout), "--worker-timeout")
    return values


def make_options(model_dir: Path, *, output: Path | None = None, workdir: Path | None = None,
                 preset: Path | None = None, model_name: str | None = None, name_override: str | None = None,
                 metadata_file: Path | None = None, vocab_only: bool = False, **overrides) -> Options:
    """Merge preset and explicit overrides (None means 'not given') and validate every value,
    so that nothing the options decide can fail after the work has started."""
    given_limit = overrides.get("memory_limit")
    preset_values = load_preset(preset, parse_size(given_limit) if given_limit is not None else None)
    _checked_values(preset_values)  # a bad preset value is refused even where a flag overrides it
    values = _checked_values({**preset_values, **{k: v for k, v in overrides.items() if v is not None}})
    if values["out_type"] == AUTO_TYPE:  # decided now: the default output name and everything after hold the type
        from pipeline.auto_type import choose

        values["out_type"], values["type_reason"] = choose(Path(model_dir).resolve(), values["memory_limit"],
                                                           vocab_only)
    layout = resolve(values["out_type"], values["target"])
    if values.get("kernel_config") is not None:
        from pipeline.kernel_config import read_kernel_config

        if not layout.needs_tiles:
            raise OptionError(f"--kernel-config: only --type tl1 and tl2 use a kernel config, not --type "
                              f"{values['out_type']}; leave it out")
        values["kernel_config"] = Path(os.path.abspath(values["kernel_config"]))
        values["kernel_tiles"] = read_kernel_config(values["kernel_config"], layout.codec, values["memory_limit"])

    try:
        model_dir = Path(model_dir).resolve()
        model_name = model_name or model_dir.name
        output = Path(os.path.abspath(output)) if output else default_output(model_name, values["out_type"],
                                                                              vocab_only)
        parent = output.parent.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise OptionError(f"-o: cannot use the output path {output} ({e}); choose another") from None
    _require_utf8(model_dir, "MODEL")
    _require_utf8(output, "-o")
    if _inside(parent / output.name, model_dir):
        raise OptionError(f"-o: {output} is inside the checkpoint directory; write the GGUF somewhere else")
    check_output_path(output, bool(values.get("force")))
    if not parent.is_dir():
        raise OptionError(f"-o: the directory {output.parent} does not exist; create it or choose another output path")
    if not os.access(parent, os.W_OK):
        raise OptionError(f"-o: cannot write to the directory {output.parent}; choose another output path")
    output = parent / output.name
    _check_name_length(output, PARTIAL_SUFFIX_BYTES, "-o")
    try:
        workdir = Path(workdir).resolve() if workdir else output.with_name(output.name + ".work")
    except (OSError, RuntimeError) as e:
        raise OptionError(f"--workdir: cannot use {workdir} ({e}); choose another") from None
    _require_utf8(workdir, "--workdir")
    _check_name_length(workdir, 0, "--workdir")
    if len(os.fsencode(workdir)) + RUN_DIR_INNER_BYTES >= PATH_MAX:
        raise OptionError(f"--workdir: the run directory's path {str(workdir)[:40]}... is too long (the files inside "
                          f"it would exceed {PATH_MAX} bytes); choose a shorter --workdir or -o")
    if _inside(output, workdir) or _inside(workdir, output):
        raise OptionError(f"--workdir: the run directory {workdir} and the output {output} must be apart; "
                          "choose another --workdir or -o")
    if _inside(workdir, model_dir) or _inside(model_dir, workdir):
        raise OptionError(f"--workdir: {workdir} overlaps the checkpoint directory {model_dir}; "
                          "choose a run directory outside it")
    if vocab_only and (values.get("split_max_size") or values.get("split_max_tensors")):
        raise OptionError("--vocab-only: a file without tensors cannot be split; drop --split-max-size / "
                          "--split-max-tensors")
    if metadata_file is not None:
        metadata_file = Path(os.path.abspath(metadata_file))
        if not metadata_file.is_file():
            raise OptionError(f"--metadata: {metadata_file} does not exist or is not a file; give a JSON file of "
                              "general.* keys")
    if name_override is not None and not name_override.strip():
        raise OptionError("--model-name: empty; give the model's name")
    if name_override is not None:
        from pipeline.metadata import check_model_name

        check_model_name(name_override)
    return Options(model_dir=model_dir, output=output, workdir=workdir, model_name=model_name,
                   name_override=name_override, metadata_file=metadata_file, vocab_only=vocab_only, **values)


# ".<name>.<8 hex>.partial" and split part suffixes "-00001-of-00002"
PARTIAL_SUFFIX_BYTES = 1 + 1 + 8 + len(".partial") + len("-00001-of-00002")


def type_list(value) -> list[str] | None:
    """The types of `--type a,b,c` (several outputs from one read), or None for one type."""
    if value is None or "," not in str(value):
        return None
    types = [t.strip().lower() for t in str(value).split(",")]
    if not all(types):
        raise OptionError(f"--type: {value!r} has an empty entry; write the types like tq2_0,i2_s,iq2_bn")
    return types


def make_many_options(model_dir: Path, out_types: list[str], *, output: Path | None = None,
                      workdir: Path | None = None, model_name: str | None = None, kernel_config: Path | None = None,
                      vocab_only: bool = False, **kw) -> list[Options]:
    """The options of each output of `--type a,b,c`: `<model>-<TYPE>.gguf` each, in the directory
    -o names (default: the current one), one run directory for all (default <dir>/<model>.work).
    `auto` in the list is the type --type auto chooses; a type listed twice (also through auto)
    is refused. --kernel-config goes to the TL types of the list."""
    if vocab_only:
        raise OptionError("--vocab-only: writes no tensors, so one file whatever the --type; give one --type or none")
    for t in out_types:
        check_choice(t, TYPE_OPTIONS, "--type")
    directory = Path(os.path.abspath(output)) if output is not None else Path.cwd()
    if not directory.is_dir():
        raise OptionError(f"-o: with several --type values, -o names the directory the outputs go to "
                          f"(<model>-<TYPE>.gguf each); {directory} is not a directory")
    name = model_name or Path(model_dir).resolve().name
    work = workdir if workdir is not None else directory / f"{name}.work"
    tiled = [t for t in out_types if t != AUTO_TYPE and OUTPUT_TYPES[resolve_any(t)].needs_tiles]
    if kernel_config is not None and not tiled:
        raise OptionError(f"--kernel-config: only --type tl1 and tl2 use a kernel config, and the list "
                          f"{','.join(out_types)} has neither; leave it out")
    many, seen = [], {}
    for t in out_types:
        reason = None
        if t == AUTO_TYPE:
            from pipeline.auto_type import choose

            t, reason = choose(Path(model_dir).resolve(), parse_size(kw.get("memory_limit") or Options.memory_limit))
        opts = make_options(model_dir, output=directory / f"{name}-{t.upper()}.gguf", workdir=work,
                            model_name=model_name, out_type=t, type_reason=reason,
                            kernel_config=kernel_config if t in tiled else None, **kw)
        key = opts.layout.name
        if key in seen:
            said = f"auto chose {t} ({reason}), which the list names already" if reason else \
                f"{t} is what auto chose ({seen[key]})" if seen[key] else f"{t} is listed twice"
            raise OptionError(f"--type: {said}; list each type once")
        seen[key] = reason
        many.append(opts)
    if many[0].low_disk:
        raise OptionError("--low-disk: the outputs of several --type share quantize's codes until the last is "
                          "written, and --low-disk removes them as the first is; give one --type, or drop --low-disk")
    return many


def resolve_any(option: str) -> str:
    """The registry key of a --type for any target (its first layout): what kind of type it is."""
    return next(t.name for t in OUTPUT_TYPES.values() if t.type_option == option and t.ternary_choice)
