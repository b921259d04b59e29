"""Conversion options: one frozen dataclass, built from a TOML preset plus CLI flags."""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

from pipeline.errors import OptionError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = CONFIG_DIR / "default.toml"

OUTPUT_TYPES = ("tq2_0", "tq1_0")

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}


def parse_size(text: str | int, option: str = "--memory-limit") -> int:
    """'512MiB' -> 536870912. Binary units for K/M/G/KiB/..., decimal for KB/MB/GB."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise OptionError(f"{option}: cannot read size {text!r}; write it like 512MiB, 4GiB or 16G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


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
    out_type: str = "tq2_0"
    memory_limit: int = 4 * 1024**3
    workers: int = 0            # 0: decided by the memory budget and the CPU count
    scheduler: str = "threads"  # "threads", "local" (distributed.LocalCluster) or tcp://host:port
    progress: bool = True
    force: bool = False         # replace an existing output that is not a GGUF file
    model_name: str = ""        # general.name and the default output name (not a snapshot's hash)
    tokenizer_pre: str | None = None  # BPE pre-tokenizer name, when detection cannot tell

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def load_preset(path: Path | None) -> dict:
    """Read a TOML preset; keys are Options field names (sizes may be strings)."""
    if path is None and not DEFAULT_PRESET.is_file():
        return {}  # installed without the presets: the dataclass defaults are the default preset
    path = path or DEFAULT_PRESET
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise OptionError(f"--config: {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"--config: {path} is not valid TOML ({e})") from None
    known = {f.name for f in dataclasses.fields(Options)} - {"model_dir", "output", "workdir", "model_name",
                                                               "tokenizer_pre"}
    unknown = set(data) - known
    if unknown:
        raise OptionError(f"--config: {path} has unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
    return data


def default_output(model_name: str, out_type: str) -> Path:
    return Path.cwd() / f"{model_name}-{out_type.upper()}.gguf"


def make_options(model_dir: Path, *, output: Path | None = None, workdir: Path | None = None,
                 preset: Path | None = None, model_name: str | None = None, **overrides) -> Options:
    """Merge preset and explicit overrides (None means 'not given') and validate."""
    values = load_preset(preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    out_type = str(values.get("out_type", "tq2_0")).lower()
    if out_type not in OUTPUT_TYPES:
        raise OptionError(f"--type: unknown output type {out_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    values["out_type"] = out_type
    values["memory_limit"] = parse_size(values.get("memory_limit", Options.memory_limit))
    try:
        workers = int(values.get("workers", 0))
    except (TypeError, ValueError):
        raise OptionError(f"--workers: {values.get('workers')!r} is not a whole number") from None
    if workers < 0:
        raise OptionError(f"--workers: must be 0 (automatic) or a positive number, not {workers}")
    values["workers"] = workers

    scheduler = str(values.get("scheduler", "threads"))
    if scheduler not in ("threads", "local") and not scheduler.startswith("tcp://"):
        raise OptionError(f"--scheduler: {scheduler!r} is not threads, local or a tcp://HOST:PORT address")
    values["scheduler"] = scheduler

    model_name = model_name or Path(model_dir).resolve().name
    output = Path(output) if output else default_output(model_name, out_type)
    output = output.resolve()
    if output.is_dir():
        raise OptionError(f"-o: {output} is a directory; give a file name such as {output / 'model.gguf'}")
    if not output.parent.is_dir():
        raise OptionError(f"-o: the directory {output.parent} does not exist; create it or choose another output path")
    if not os.access(output.parent, os.W_OK):
        raise OptionError(f"-o: cannot write to the directory {output.parent}; choose another output path")
    model_dir = Path(model_dir).resolve()
    if output.parent == model_dir:
        raise OptionError(f"-o: {output} is inside the checkpoint directory; write the GGUF somewhere else")
    if output.is_file() and not values.get("force"):
        with open(output, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OptionError(f"-o: {output} exists and is not a GGUF file; choose another output path "
                                  "or pass --force to replace it")
    workdir = Path(workdir).resolve() if workdir else output.with_name(output.name + ".work")
    return Options(model_dir=model_dir, output=output, workdir=workdir, model_name=model_name, **values)
