"""Interrupting a conversion at chosen moments, found by watching its run directory.

A kill point names a target and a fraction: the target is a stage (the kill lands once the
run's log says it is in that stage and the given fraction of the stage's remaining work is on
disk: chunk files under `<stage>.zarr/**/c/` for extract, quantize and pack, bytes of the
temporary `.NAME.<8 hex>.partial` next to the output for assemble), "index" (extract is
running and that fraction of its index is on disk: the arrays' zarr.json files, then
extract.refs.json; 0 aims before the index, 1 after it), "write" (just before a run-directory
write: the lock, manifest.json, plan.json, a store made or removed, the output's temporary
name..., tests/write_points.py; the fraction picks which of a clean run's writes, or `at_write`
names it) or "time" (that fraction of a clean conversion's wall time after the start,
wherever that falls). Watching the directory cannot aim between two writes a millisecond
apart; the "write" kill is made by the process itself, from an audit hook, so it lands exactly. Where the process
was when it died is read back from its log and manifest.json, so the report counts where
kills landed, not where they were aimed.

The plan is drawn from a seeded random.Random: BITNET_GGUF_KILL_SEED overrides the seed.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("extract", "quantize", "pack", "assemble")
CHUNK_STAGES = STAGES[:3]
TARGETS = ("write", "index", *STAGES, "time")  # in this order in a chain: a timed kill can land anywhere, so it comes last
INDEX_MOMENTS = ("before", "during", "after")  # where an "index" kill aims, in turn
SEED_ENV = "BITNET_GGUF_KILL_SEED"
DEFAULT_SEED = 1580
SIGNAL_WEIGHTS = ((signal.SIGKILL, 6), (signal.SIGTERM, 2), (signal.SIGINT, 2))
CHAIN_WEIGHTS = ((1, 5), (2, 3), (3, 2))  # kills before the final rerun
POLL = 0.01
TIMEOUT = 180.0


def seed() -> int:
    return int(os.environ.get(SEED_ENV, DEFAULT_SEED))


@dataclass(frozen=True)
class KillPoint:
    target: str  # a stage, or "time"
    fraction: float
    signal: int
    memory_limit: str  # of the run this kill interrupts
    at_write: int = 0  # "write": before this write (1-based); 0: the one `fraction` picks

    def describe(self) -> str:
        where = f"before run-directory write {self.at_write}" if self.at_write else \
            f"at {self.fraction:.2f} of {self.target}"
        return f"{signal.Signals(self.signal).name} {where} (--memory-limit {self.memory_limit})"

    def write_number(self, writes: int) -> int:
        """The write a "write" kill lands before, of a run that makes `writes` of them."""
        return self.at_write or min(writes, 1 + int(self.fraction * writes))


@dataclass(frozen=True)
class Scenario:
    kills: tuple[KillPoint, ...]
    final_memory_limit: str


def _weighted(rng: random.Random, table) -> object:
    values, weights = zip(*table)
    return rng.choices(values, weights)[0]


def _memory_limits(rng: random.Random, n: int, limits: tuple[str, ...], mixed: bool) -> list[str]:
    """n memory limits, one per run; a mixed scenario changes the limit at least once."""
    if not mixed:
        return [limits[0]] * n
    while True:
        chosen = [rng.choice(limits) for _ in range(n)]
        if len(set(chosen)) > 1:
            return chosen


def plan(rng: random.Random, n_kills: int, limits: tuple[str, ...], mixed_share: float = 0.3) -> list[Scenario]:
    """Scenarios of 1-3 chained kills, n_kills in all, the targets spread evenly over TARGETS.

    Targets in a chain are in stage order ("time" last), so each kill aims at work the earlier
    ones left. A mixed scenario runs some of its runs (interrupted or final) under another limit."""
    targets = [TARGETS[i % len(TARGETS)] for i in range(n_kills)]
    rng.shuffle(targets)
    moments = iter(INDEX_MOMENTS * n_kills)
    scenarios = []
    while targets:
        size = min(_weighted(rng, CHAIN_WEIGHTS), len(targets))
        group, targets = sorted(targets[:size], key=TARGETS.index), targets[size:]
        mems = _memory_limits(rng, size + 1, limits, rng.random() < mixed_share)
        kills = tuple(KillPoint(t, _index_fraction(rng, next(moments)) if t == "index"
                                else round(rng.random(), 3) if t == "write"  # any of the writes, the last too
                                else round(rng.uniform(0.0, 0.9), 3),
                                signal.SIGKILL if t == "time" else _weighted(rng, SIGNAL_WEIGHTS), m)
                      for t, m in zip(group, mems))
        scenarios.append(Scenario(kills, mems[-1]))
    return scenarios


def _index_fraction(rng: random.Random, moment: str) -> float:
    """An "index" kill's fraction: 0 before the index, 1 after it, else between."""
    return {"before": 0.0, "during": round(rng.uniform(0.1, 0.9), 3), "after": 1.0}[moment]


# -- watching a run directory ------------------------------------------------------------
def stage_states(work: Path) -> dict[str, str] | None:
    """Stage -> state from manifest.json (None: no manifest yet)."""
    try:
        data = json.loads((work / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {name: st.get("state", "") for name, st in data.get("stages", {}).items()}


def progress(log: Path) -> tuple[str | None, set[str]]:
    """(the stage this run is in, the stages it finished or skipped), from its stderr log.

    The manifest cannot tell: until a rerun reaches the stage an earlier run was killed in, it
    still says that stage is running."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None, set()
    started, finished = set(), set()
    for line in lines:
        stage, _, what = line.partition(": ")
        if stage in STAGES:
            if what == "running":
                started.add(stage)
            elif what.startswith(("done", "already done")):
                finished.add(stage)
    current = next((s for s in reversed(STAGES) if s in started and s not in finished), None)
    return current, finished


def where(work: Path, log: Path) -> str:
    """Where a dead conversion stopped: a stage, "start" (before it began or skipped any stage),
    "between" (after one stage, before the next) or "after" (assemble done)."""
    current, finished = progress(log)
    if current is not None:  # the manifest knows whether the stage's end was recorded
        return "between" if (stage_states(work) or {}).get(current) == "done" else current
    if "assemble" in finished:
        return "after"
    return "between" if finished else "start"


def _recorded(store: Path, rel: Path) -> bool:
    """Whether the chunk file at `rel` (`<array>/c/<i>[/0]`) has the digest record that makes it
    written (`<array>/digests/<i>`, pipeline/stores.py): without it, a rerun writes it again."""
    parts = rel.parts
    at = len(parts) - 1 - parts[::-1].index("c")
    return (store.joinpath(*parts[:at]) / "digests" / parts[at + 1]).is_file()


def chunk_files(store: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (inode, mtime_ns) of every finished (recorded) chunk file in a zarr store."""
    found = {}
    for root, _dirs, files in os.walk(store):
        rel = Path(root).relative_to(store)
        if "c" not in rel.parts:
            continue
        for f in files:
            if not f.endswith(".partial") and _recorded(store, rel / f):
                try:
                    st = os.stat(os.path.join(root, f))
                except FileNotFoundError:  # removed meanwhile (an array being redone)
                    continue
                found[str(rel / f)] = (st.st_ino, st.st_mtime_ns)
    return found


def index_files(work: Path) -> int:
    """Files of extract's index on disk: every array's zarr.json (not the group's), then the
    reference set extract.refs.json."""
    store = work / "extract.zarr"
    n = sum(1 for p in store.glob("*/zarr.json")) if store.is_dir() else 0
    return n + (work / "extract.refs.json").is_file()


def index_moment(work: Path, ref: "Reference") -> str:
    """Where extract's index was when a run died: "before" (none of it), "during", "after"."""
    n = index_files(work)
    return "before" if n == 0 else "after" if n >= ref.index_files else "during"


def count_chunks(store: Path) -> int:
    """len(chunk_files(store)) from the names alone (no stat of each chunk, no pathlib): the watcher
    counts every POLL, and the sooner it sees its goal the closer to it the kill lands (a pack of a
    few tenths of a second is over before a slow count ends)."""
    n = 0
    for root, dirs, _files in os.walk(store):
        if os.path.basename(root) != "c":
            continue
        dirs[:] = []  # counted below
        try:
            recorded = set(os.listdir(os.path.join(os.path.dirname(root), "digests")))
        except FileNotFoundError:
            continue
        for entry in _entries(root):
            if entry.name in recorded:
                n += _files_below(entry)
    return n


def _entries(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:  # removed meanwhile (an array being redone)
        return []


def _files_below(entry: os.DirEntry) -> int:
    """Finished chunk files at `entry` (a chunk file, or a directory of them: c/<row>/<column>)."""
    if entry.is_dir(follow_symlinks=False):
        return sum(_files_below(e) for e in _entries(entry.path))
    return not entry.name.endswith(".partial")


def all_chunk_files(work: Path) -> dict[str, tuple[int, int]]:
    return {f"{stage}/{k}": v for stage in CHUNK_STAGES for k, v in chunk_files(work / f"{stage}.zarr").items()}


def partials(work: Path, out: Path) -> list[Path]:
    """Every *.partial in the run directory and next to the output."""
    return sorted({*work.rglob("*.partial"), *out.parent.glob("*.partial")})  # "*" matches dot files too


# -- a reference conversion ------------------------------------------------------------------
@dataclass
class Reference:
    """What a clean conversion under one memory limit looks like."""
    seconds: float
    chunks: dict[str, int]  # stage -> finished chunk files
    size: int  # of the GGUF
    index_files: int = 0  # files of extract's index (index_files)
    writes: int = 0  # run-directory writes (tests/write_points.py)


# -- running and interrupting ----------------------------------------------------------------
def start(root: Path, model: Path, out: Path, work: Path, memory_limit: str, log: Path, *extra: str,
          watch: dict | None = None):
    """A conversion, its stderr appended to `log`; with `watch` (environment of tests/write_points.py),
    run through its audit hook. Forked from tests/cli_server.py's server when it may be
    (tests/conftest.py popen_cli: a process of its own, pid, exit status or signal, SIGINT at its
    default so that the CLI's own handling of it runs), else an ordinary process (subprocess.Popen)."""
    from tests import write_points
    from tests.conftest import popen_cli

    module = "pipeline" if watch is None else "tests.write_points"
    watched = {} if watch is None else {write_points.WATCH_ENV: str(work), write_points.OUTPUT_ENV: str(out), **watch}
    with open(log, "ab") as err:
        return popen_cli("convert", model, "-o", out, "--workdir", work, "--memory-limit", memory_limit,
                         "--no-progress", *extra, module=module, stdout=subprocess.DEVNULL, stderr=err,
                         default_sigint=True, env={**os.environ, "PYTHONPATH": str(root), **watched},
                         read_at_run_time=write_points.ENVIRONMENT)


def recorded_writes(root: Path, model: Path, out: Path, work: Path, memory_limit: str, log: Path,
                    *extra: str) -> list[str]:
    """Run a conversion to its end through tests/write_points.py; its run-directory writes, in order."""
    from tests import write_points

    record = log.with_name(log.name + ".writes")
    record.unlink(missing_ok=True)
    proc = start(root, model, out, work, memory_limit, log, *extra, watch={write_points.LOG_ENV: str(record)})
    if proc.wait(timeout=TIMEOUT) != 0:
        raise AssertionError(f"the conversion failed:\n{log.read_text(errors='replace')}")
    return record.read_text().splitlines() if record.exists() else []


def _wait_until(proc, ready, deadline: float) -> bool:
    """Poll until ready() (True) or the process ends (False)."""
    while proc.poll() is None:
        if ready():
            return True
        if time.monotonic() > deadline:
            raise AssertionError("the conversion neither reached the kill point nor finished")
        time.sleep(POLL)
    return False


def _past(stage: str, log: Path) -> bool:
    """The run is past `stage` (skipped it, or is in a later one): a kill aimed at it lands now."""
    current, finished = progress(log)
    return stage in finished or (current is not None and STAGES.index(current) > STAGES.index(stage))


def wait_for(proc, kp: KillPoint, work: Path, out: Path, ref: Reference, started: float,
             log: Path) -> bool:
    """Block until the kill point is reached (True) or the process has ended (False)."""
    deadline = started + TIMEOUT
    if kp.target == "time":
        moment = started + kp.fraction * ref.seconds
        return _wait_until(proc, lambda: time.monotonic() >= moment, deadline)
    stage = kp.target

    if stage == "index":
        if not _wait_until(proc, lambda: progress(log)[0] == "extract" or _past("extract", log), deadline):
            return False
        goal = kp.fraction * ref.index_files
        return _wait_until(proc, lambda: index_files(work) >= goal or progress(log)[0] != "extract", deadline)

    def in_stage() -> bool:
        return progress(log)[0] == stage
    if not _wait_until(proc, lambda: in_stage() or _past(stage, log), deadline):
        return False
    if stage in CHUNK_STAGES:
        store = work / f"{stage}.zarr"
        first = count_chunks(store)  # chunks an earlier run left (a reset store was removed already)
        goal = first + kp.fraction * max(ref.chunks.get(stage, 0) - first, 0)
        return _wait_until(proc, lambda: count_chunks(store) >= goal or not in_stage(), deadline)
    goal = kp.fraction * ref.size

    def written() -> int:
        sizes = [0]
        for p in out.parent.glob(f".{out.name}.*.partial"):
            try:
                sizes.append(p.stat().st_size)
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        return max(sizes)
    return _wait_until(proc, lambda: written() >= goal or not in_stage(), deadline)


@dataclass
class Kill:
    point: KillPoint
    landed: str  # where(work) after the process died, or "finished" (it ended first)
    returncode: int
    seconds: float
    index: str = ""  # an "index" kill: index_moment when it died
    stderr: str = field(repr=False, default="")


def interrupt(root: Path, model: Path, out: Path, work: Path, kp: KillPoint, ref: Reference, log: Path,
              *extra: str) -> Kill:
    """Run a conversion (extra: more options) and interrupt it at kp."""
    from tests import write_points

    log.write_bytes(b"")
    started = time.monotonic()
    watch = None
    if kp.target == "write":  # the process kills itself, before the write
        watch = {write_points.KILL_AT_ENV: str(kp.write_number(ref.writes)), write_points.SIGNAL_ENV: str(kp.signal)}
    proc = start(root, model, out, work, kp.memory_limit, log, *extra, watch=watch)
    try:
        reached = watch is not None or wait_for(proc, kp, work, out, ref, started, log)
        if reached and watch is None:
            proc.send_signal(kp.signal)
        rc = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    landed = where(work, log) if reached and rc != 0 else "finished"
    index = index_moment(work, ref) if kp.target == "index" and landed != "finished" else ""
    return Kill(kp, landed, rc, time.monotonic() - started, index, log.read_text(errors="replace"))


def chunk_identity(work: Path, key: str) -> tuple[int, int] | None:
    """(inode, mtime_ns) of the chunk file `key` ("<stage>/<path in store>") of all_chunk_files."""
    stage, rel = key.split("/", 1)
    try:
        st = os.stat(work / f"{stage}.zarr" / rel)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _row_chunk(key: str) -> tuple[str, str, int]:
    """("<stage>", "<array>", row-chunk index) of an all_chunk_files key."""
    stage, rest = key.split("/", 1)
    array, _, coords = rest.rpartition("/c/")
    return stage, array, int(coords.split("/")[0])


def beside_unfinished_chunk(work: Path, key: str, snapshot: dict[str, tuple[int, int]]) -> bool:
    """Whether the chunk `key` is in a side array (`<tensor>.<suffix>`: per-row sums or maxima)
    whose tensor's chunk of the same rows was not on disk in `snapshot`. The task that writes both
    was unfinished, so a rerun does it again, side chunk included. A tensor that indexes the
    checkpoint (extract writes no chunk of it) excuses nothing: the side chunk is its task's
    only output."""
    stage, array, row = _row_chunk(key)
    parts = array.split(".")
    tensors = [".".join(parts[:n]) for n in range(1, len(parts))]
    done = {_row_chunk(k) for k in snapshot}
    return any(_copied(work / f"{stage}.zarr" / t / "zarr.json") and (stage, t, row) not in done for t in tensors)


def _copied(metadata: Path) -> bool:
    """An array whose zarr.json exists and that holds chunk files of its own (no source_ref)."""
    try:
        return "source_ref" not in json.loads(metadata.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
