"""The run directory: four stores, a manifest of what is done, and a lock.

    <workdir>/
      manifest.json     source fingerprint, options, state and key of each stage
      metadata.json     the GGUF architecture and key/values, decided once per run from the
                        checkpoint's config and tokenizer; assemble writes them
      lock              held (flock) while a conversion runs
      extract.zarr  quantize.zarr  pack.zarr

A stage's key is a hash of everything its output depends on (the previous
stage's key plus the options it reads). A finished stage whose key still matches
is skipped; a changed key removes that store and every later one.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from pipeline.errors import RunDirError
from pipeline.stores import remove_tree

STAGES = ("extract", "quantize", "pack", "assemble")
MANIFEST_VERSION = 1


def stage_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest_path = self.path / "manifest.json"
        self.metadata_path = self.path / "metadata.json"
        self._lock_file = None

    def store(self, stage: str) -> Path:
        return self.path / f"{stage}.zarr"

    # -- lock ---------------------------------------------------------------
    def acquire(self) -> None:
        self.check_is_ours()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create the run directory {self.path} ({e.strerror}); "
                              "choose another place with --workdir") from None
        self._lock_file = open(self.path / "lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise RunDirError(f"{self.path}: another conversion is running in this run directory; "
                              "wait for it or pass a different --workdir") from None

    def is_locked(self) -> bool:
        """True while a conversion holds this run directory."""
        path = self.path / "lock"
        if not path.is_file():
            return False
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
        return False

    def release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    # -- manifest -----------------------------------------------------------
    def load(self) -> dict:
        if not self.manifest_path.is_file():
            return {}
        try:
            data = json.loads(self.manifest_path.read_text())
        except ValueError:
            return {}  # unreadable manifest: treat the run as new
        return data if data.get("version") == MANIFEST_VERSION else {}

    def save(self, manifest: dict) -> None:
        manifest["version"] = MANIFEST_VERSION
        write_json_atomic(self.manifest_path, manifest)

    def save_metadata(self, metadata: dict) -> None:
        write_json_atomic(self.metadata_path, metadata)

    def reset_from(self, stage: str, manifest: dict) -> None:
        """Forget `stage` and everything after it, deleting their stores."""
        for name in STAGES[STAGES.index(stage):]:
            manifest.get("stages", {}).pop(name, None)
            remove_tree(self.store(name))
        self.save(manifest)

    def stores_size(self) -> int:
        """Bytes held by the stores on disk."""
        return sum(p.stat().st_size for name in STAGES if self.store(name).is_dir()
                   for p in self.store(name).rglob("*") if p.is_file())

    def has_stores(self) -> bool:
        return any(self.store(name).exists() for name in STAGES)

    def check_is_ours(self) -> None:
        """Refuse a directory that holds other things: we delete files in a run directory."""
        if not self.path.is_dir() or self.manifest_path.is_file():
            return
        ours = {"lock", "manifest.json", "manifest.json.tmp", "metadata.json", "metadata.json.tmp", *(self.store(s).name for s in STAGES)}
        foreign = sorted(p.name for p in self.path.iterdir() if p.name not in ours and not p.name.startswith("."))
        if foreign:
            raise RunDirError(f"{self.path}: not a bitnet-gguf run directory (it holds {foreign[0]!r}"
                              f"{' and more' if len(foreign) > 1 else ''}); choose an empty or new --workdir")

    def clean_partials(self) -> int:
        """Delete leftover temporary chunk files of an interrupted write (inside our stores only)."""
        n = 0
        for name in STAGES:
            if self.store(name).is_dir():
                for p in self.store(name).rglob("*.partial"):
                    p.unlink(missing_ok=True)
                    n += 1
        return n
