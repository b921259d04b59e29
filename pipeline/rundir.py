"""The run directory: four stores, a manifest of what is done, and a lock.

    <workdir>/
      manifest.json     source fingerprint, options, state and key of each stage (and the file
                        whose bytes a stage found changed under the same fingerprint: a rerun
                        starts over)
      plan.json         the plan of the conversion (pipeline/plan.py): every tensor's source, type,
                        size and place in the file, the sizes of the outputs and stores, the memory
      metadata.json     the GGUF architecture and key/values, decided once per run from the
                        checkpoint's config and tokenizer; assemble writes them
      <stage>.checksums.json   size and xxh3 digest of every file of a finished store, checked
                        before the next stage reads it (one file a line: stores.write_checksums)
      lock              held (an OS file lock, see portable.py) while a conversion runs
      extract.zarr  quantize.zarr  pack.zarr
      extract.refs.json   extract.zarr as a kerchunk reference set: zarr reads the checkpoint
                        bytes its arrays index through it (stores.open_with_refs)
      pack-<TYPE>.zarr  plan-<TYPE>.json   with several --type (`--type tq2_0,i2_s`): one pack
                        store and plan per output, its pack and assemble states under
                        manifest.json's "outputs" (TYPE: the output type registry key), so each
                        output resumes on its own after the shared extract and quantize

A stage's key is a hash of everything its output depends on (the previous
stage's key plus the options it reads). A finished stage whose key still matches
is skipped; a changed key removes that store and every later one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from pipeline import portable
from pipeline.errors import RunDirError
from pipeline.safe_files import open_no_link, write_whole
from pipeline.spool import SPOOL_DIR
from pipeline.stores import DamagedStore, check_store, read_checksums, refs_path, remove_tree, write_checksums

STAGES = ("extract", "quantize", "pack", "assemble")
# manifest.json: an assemble with --low-disk removed chunk files of quantize.zarr and pack.zarr as it
# wrote the output (stages/assemble.py), so they are consumed, no longer what their checksums record
CODES_CONSUMED = "codes_consumed"
OUTPUT_STAGES = ("pack", "assemble")  # per output when one run writes several (`tag`: its output type)
TAG = re.compile(r"[a-z0-9_]{1,32}")


def checkpoint_state(manifest: dict) -> dict | None:
    """Whether the checkpoint a run read is still there as it was: the stores index its bytes,
    so the run directory is only valid next to the same files. None before a run recorded it;
    else {"path", "state": "unchanged" | "changed" | "gone", "message"}."""
    from pipeline.safetensors_io import fingerprint_changes

    model_dir, fingerprint = manifest.get("options", {}).get("model_dir"), manifest.get("fingerprint")
    if not model_dir or not isinstance(fingerprint, list):
        return None
    try:
        change = fingerprint_changes(Path(model_dir), fingerprint)
        if change is None:
            from pipeline import remote

            try:
                change = remote.fingerprint_changes(model_dir, fingerprint)
            except Exception:  # noqa: BLE001 - a server out of reach: its files are not known to have changed
                change = None
    except (TypeError, ValueError):
        change = ("changed", model_dir)
    content = manifest.get("source_content_changed")  # runner.CONTENT_CHANGED: bytes found changed mid-run
    if change is None and content:
        change = ("changed", str(content))
    if change is None:
        return {"path": model_dir, "state": "unchanged", "message": "its files are the ones this run read"}
    state, path = change
    return {"path": model_dir, "state": state,
            "message": f"{path} is {'gone' if state == 'gone' else 'not the file this run read'}: the stores refer to "
                       "the checkpoint's bytes, so their tensors cannot be read; rerun the convert command with the "
                       "checkpoint to start over"}
MANIFEST_VERSION = 2
TOOL = "bitnet-gguf"
STAGE_STATES = ("running", "done")


def manifest_problem(data: dict) -> str | None:
    """What is wrong with the content of a manifest of ours (a hand edit, a damaged disk): every
    value the runner, status and inspect read has the type they read it as; None when all do."""
    def shown(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    def stages_problem(stages: dict, where: str, allowed: tuple[str, ...]) -> str | None:
        for stage, state in stages.items():
            if stage not in allowed:
                return f"{where} names {shown(stage)}, which is not a stage ({', '.join(allowed)})"
            at = f"{where}.{stage}"
            if not isinstance(state, dict):
                return f"{at} is {shown(state)}, not an object"
            if not isinstance(state.get("key"), str):
                return f"{at}.key is {shown(state.get('key'))}, not a string"
            if state.get("state") not in STAGE_STATES:
                return f"{at}.state is {shown(state.get('state'))}, not one of {', '.join(STAGE_STATES)}"
            seconds = state.get("seconds", 0)
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                return f"{at}.seconds is {shown(seconds)}, not a number"
            if not isinstance(state.get("inputs", {}), dict):
                return f"{at}.inputs is {shown(state['inputs'])}, not an object"
            outputs = state.get("outputs", [])
            if not isinstance(outputs, list) or not all(isinstance(o, list) and o and isinstance(o[0], str)
                                                        for o in outputs):
                return f"{at}.outputs is {shown(outputs)}, not a list of [path, ...] records"
        return None

    for key, kind, name in (("stages", dict, "an object"), ("options", dict, "an object"),
                            ("fingerprint", list, "a list"), ("outputs", dict, "an object")):
        if key in data and not isinstance(data[key], kind):
            return f"{key} is {shown(data[key])}, not {name}"
    problem = stages_problem(data.get("stages", {}), "stages", STAGES)
    for tag, record in data.get("outputs", {}).items():
        if problem:
            break
        if not TAG.fullmatch(tag):
            return f"outputs names {shown(tag)}, which is not an output type"
        if not isinstance(record, dict) or not isinstance(record.get("output"), str) \
                or not isinstance(record.get("stages", {}), dict):
            return f"outputs.{tag} is {shown(record)}, not an object with an output path and stages"
        problem = stages_problem(record.get("stages", {}), f"outputs.{tag}.stages", OUTPUT_STAGES)
    return problem


def stage_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data, readable: bool = False) -> None:
    """`data` as JSON at `path`, whole or not at all. Compact unless `readable` (the manifest, which
    people read): json encodes an indented file, or any file it writes as it goes (json.dump), in
    pure Python, several times slower than the one-shot compact encoding, which for the plan,
    checksum records and reference set of a model of many tensors was a tenth of a conversion."""
    text = json.dumps(data, indent=2 if readable else None, separators=None if readable else (",", ":"),
                      sort_keys=True)
    write_whole(path, text, fsync=True, suffix=".tmp")


# a run directory's own names for one output of several: pack-<tag>.zarr and its files, plan-<tag>.json
OWN_NAME = re.compile(r"\.?(?:pack|plan)-([a-z0-9_]{1,32})\.(?:zarr|json|checksums\.json|refs\.json).*")


def plan_name(tag: str | None) -> str:
    """plan.json, or one output's own plan-<tag>.json."""
    return f"plan-{tag}.json" if tag else "plan.json"


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest_path = self.path / "manifest.json"
        self.metadata_path = self.path / "metadata.json"
        self._lock_file = None

    def store(self, stage: str, tag: str | None = None) -> Path:
        """A stage's store; `tag`: the output type of one output of several (its own pack store)."""
        return self.path / (f"{stage}-{tag}.zarr" if tag else f"{stage}.zarr")

    def tags(self) -> list[str]:
        """The output types whose own pack store is in the run directory (several --type)."""
        prefix = "pack-"
        try:
            names = [p.name for p in self.path.iterdir()]
        except OSError:
            return []
        return sorted(n[len(prefix):-len(".zarr")] for n in names
                      if n.startswith(prefix) and n.endswith(".zarr") and TAG.fullmatch(n[len(prefix):-len(".zarr")]))

    def _stores(self) -> list[Path]:
        """Every store of the run directory, shared and per output."""
        return [self.store(s) for s in STAGES] + [self.store("pack", t) for t in self.tags()]

    # -- lock ---------------------------------------------------------------
    def acquire(self) -> None:
        self.check_is_ours()
        created = []  # directories made here, removed again if the run directory cannot be used
        try:
            for d in [p for p in (*reversed(self.path.parents), self.path) if not p.exists()]:
                try:
                    d.mkdir()
                except FileExistsError:  # an identical command made it meanwhile
                    continue
                created.append(d)
        except OSError as e:
            self._remove_created(created)
            raise RunDirError(f"cannot create the run directory {self.path} ({e.strerror}); "
                              "choose another place with --workdir") from None
        try:
            self._lock_file = os.fdopen(open_no_link(self.path / "lock", os.O_RDWR | os.O_CREAT), "r+b")
        except OSError as e:
            self._remove_created(created)
            raise RunDirError(f"{self.path / 'lock'}: cannot open the lock file ({e.strerror}); "
                              "choose another --workdir") from None
        if not portable.try_lock(self._lock_file):
            self._lock_file.close()
            self._lock_file = None
            raise RunDirError(f"{self.path}: another conversion is running in this run directory; "
                              "wait for it or pass a different --workdir") from None

    @staticmethod
    def _remove_created(created: list[Path]) -> None:
        """A refusal leaves nothing it made: the directories, deepest first, if still empty."""
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                return

    def is_locked(self) -> bool:
        """True while a conversion holds this run directory (see portable.lock_is_held: on Linux
        asked without taking the lock, so it also works on a read-only run directory)."""
        path = self.path / "lock"
        if not path.is_file() or path.is_symlink():
            return False
        return portable.lock_is_held(path)

    def release(self) -> None:
        if self._lock_file is not None:
            portable.unlock(self._lock_file)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    # -- manifest -----------------------------------------------------------
    def _read_manifest(self):
        """The manifest's JSON, or None when it is missing or not JSON."""
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        except OSError as e:
            raise RunDirError(f"{self.manifest_path}: cannot read ({e.strerror})") from None

    @staticmethod
    def is_our_manifest(data) -> bool:
        return isinstance(data, dict) and data.get("tool") == TOOL

    def load(self) -> dict:
        """The manifest of this version (a hand-edited or damaged one is refused, as a damaged
        checksum record is); {} when there is none, or it is of another version (the run is new)."""
        data = self._read_manifest()
        if not self.is_our_manifest(data) or data.get("version") != MANIFEST_VERSION:
            return {}  # a run of another version, or unreadable: treat the run as new
        problem = manifest_problem(data)
        if problem:
            raise RunDirError(f"{self.manifest_path}: the run directory is damaged ({problem}); delete the run "
                              "directory and convert again")
        return data

    def save(self, manifest: dict) -> None:
        manifest["version"] = MANIFEST_VERSION
        manifest["tool"] = TOOL
        write_json_atomic(self.manifest_path, manifest, readable=True)

    def checksums_path(self, stage: str, tag: str | None = None) -> Path:
        return self.path / (f"{stage}-{tag}.checksums.json" if tag else f"{stage}.checksums.json")

    def seal(self, stage: str, tag: str | None = None, since_ns: int | None = None) -> None:
        """Record what a finished stage's store holds (see stores.check_store), once every chunk
        still matches the record made when it was written (stores.chunk_records), entry by entry as
        the record is written (stores.write_checksums). `since_ns`: when this process started the
        stage; the chunks it recorded since are sealed from their records, not read again
        (stores.seal_digests: the next stage's input check reads them)."""
        try:
            write_checksums(self.checksums_path(stage, tag), self.store(stage, tag), since_ns)
        except DamagedStore as e:
            raise RunDirError(f"{self.path}: the run directory is damaged ({e.what}); delete it and convert again") \
                from None

    def check_sealed(self, stage: str, tag: str | None = None, consumed: set[str] | frozenset = frozenset()) -> None:
        """The finished store of `stage` still holds what it held; else a one-line refusal.
        `consumed`: arrays whose chunk files --low-disk removed (their `c/` files are not checked).
        The record is read and checked entry by entry (stores.read_checksums, check_store)."""
        def skip(rel: str) -> bool:
            return "/c/" in rel and rel.partition("/c/")[0] in consumed

        try:
            check_store(self.store(stage, tag), read_checksums(self.checksums_path(stage, tag)),
                        skip if consumed else None)
        except DamagedStore as e:
            raise RunDirError(f"{self.path}: the run directory is damaged ({e.what}); delete it and convert again") \
                from None
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            raise RunDirError(f"{self.path}: the run directory is damaged ({self.checksums_path(stage, tag)} is missing or "
                              "unreadable); delete it and convert again") from None

    def save_metadata(self, metadata: dict) -> None:
        write_json_atomic(self.metadata_path, metadata)

    def _remove(self, stage: str, tag: str | None = None) -> None:
        self.checksums_path(stage, tag).unlink(missing_ok=True)
        refs_path(self.store(stage, tag)).unlink(missing_ok=True)
        remove_tree(self.store(stage, tag))

    def reset_from(self, stage: str, manifest: dict, tag: str | None = None) -> None:
        """Forget `stage` and everything after it, deleting their stores: of one output's own
        stages (`tag`), or of the shared ones, and then of every output that read them."""
        if tag is not None:
            states = manifest.get("outputs", {}).get(tag, {}).get("stages", {})
            for name in OUTPUT_STAGES[OUTPUT_STAGES.index(stage):]:
                states.pop(name, None)
                self._remove(name, tag)
            self.save(manifest)
            return
        for name in STAGES[STAGES.index(stage):]:
            manifest.get("stages", {}).pop(name, None)
            self._remove(name)
        if stage in ("extract", "quantize"):  # the consumed stores are gone
            manifest.pop(CODES_CONSUMED, None)
        if stage not in OUTPUT_STAGES:  # every output's pack read the shared stores
            manifest.pop("outputs", None)
            for t in self.tags():
                self._remove("pack", t)
        self.save(manifest)

    def stores_size(self) -> int:
        """Bytes held by the stores on disk."""
        # a scandir walk, not rglob or isfile + getsize: a store of many tensors holds hundreds of
        # thousands of files, and each costs one stat here (links to files counted, as before)
        total = 0
        for store in self._stores():
            pending = [str(store)] if store.is_dir() else []
            while pending:
                with os.scandir(pending.pop()) as entries:
                    for e in entries:
                        if e.is_dir(follow_symlinks=False):
                            pending.append(e.path)
                        elif e.is_file():
                            total += e.stat().st_size
        return total

    def has_stores(self) -> bool:
        return any(store.exists() for store in self._stores())

    def check_is_ours(self) -> None:
        """Refuse a directory that holds anything but a run of ours: we write and delete files in a
        run directory. A manifest.json must be our manifest (any version), and nothing else may
        be there but our own files."""
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise RunDirError(f"{self.path}: exists and is not a directory; choose another --workdir")
        if not self.path.is_dir():
            return
        if self.is_locked():  # whatever it holds now, it is another conversion's to finish
            raise RunDirError(f"{self.path}: another conversion is running in this run directory; "
                              "wait for it or pass a different --workdir")
        try:
            entries = sorted(p.name for p in self.path.iterdir())
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot list the run directory ({e.strerror}); choose another --workdir") \
                from None
        tags = [None, *{m[1] for name in entries if (m := OWN_NAME.fullmatch(name))}]
        ours = {"lock", "manifest.json", "manifest.json.tmp", "metadata.json", "metadata.json.tmp", SPOOL_DIR,
                *(n for t in tags for n in (f"{plan_name(t)}", f"{plan_name(t)}.tmp")),
                *(n for s, t in self._stage_tags(tags) for n in (
                    self.store(s, t).name, f".{self.store(s, t).name}.deleting", self.checksums_path(s, t).name,
                    self.checksums_path(s, t).name + ".tmp", refs_path(self.store(s, t)).name,
                    refs_path(self.store(s, t)).name + ".tmp"))}
        if "manifest.json" not in entries and not any(self._is_our_store(s) for s in STAGES):
            # without a manifest, only a store of ours proves the directory is a run of ours;
            # else its files (a user's own extract.zarr or metadata.json) are not ours to replace
            ours = {"lock", "manifest.json.tmp"}
        foreign = [name for name in entries if name not in ours]
        if foreign:
            raise RunDirError(f"{self.path}: not a bitnet-gguf run directory (it holds {foreign[0]!r}"
                              f"{' and more' if len(foreign) > 1 else ''}); choose an empty or new --workdir")
        links = self._links(entries)
        if links:
            raise RunDirError(f"{links[0]}: a symbolic link in the run directory (a run of ours makes none, and "
                              "never writes through one); remove it, or delete the run directory and convert again")
        if "manifest.json" in entries:
            data = self._read_manifest()
            if not self.is_our_manifest(data):
                raise RunDirError(f"{self.manifest_path}: not a bitnet-gguf manifest; this is not a run directory "
                                  "of ours, choose an empty or new --workdir")
            self.load()  # ours: refused here if its content is damaged

    @staticmethod
    def _stage_tags(tags) -> list[tuple[str, str | None]]:
        return [(s, t) for t in tags for s in (STAGES if t is None else ("pack",))]

    def _links(self, entries: list[str]) -> list[Path]:
        """Symbolic links among the run directory's entries and inside its stores (not followed)."""
        found = []
        for name in entries:
            path = self.path / name
            if path.is_symlink():
                found.append(path)
            elif path.is_dir():
                for root, dirs, files in os.walk(path):
                    found += [Path(root) / n for n in dirs + files if os.path.islink(os.path.join(root, n))]
        return found

    def _is_our_store(self, stage: str) -> bool:
        """The store of `stage` is a zarr group that one of our stages made (its `stage` attribute)."""
        meta = self.store(stage) / "zarr.json"
        try:
            if not meta.is_file() or meta.stat().st_size > 64 * 1024**2:
                return False
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return False
        return isinstance(data, dict) and data.get("node_type") == "group" \
            and isinstance(data.get("attributes"), dict) and data["attributes"].get("stage") == stage

    def clean_partials(self) -> int:
        """Delete leftover temporary chunk files of an interrupted write (inside our stores only)."""
        n = 0
        for store in self._stores():
            if store.is_dir():
                for p in store.rglob("*.partial"):
                    p.unlink(missing_ok=True)
                    n += 1
        return n
