"""The order xdist's workers run the suite in: the costliest files first, on every worker.

`--dist worksteal` hands worker k the k-th of N equal runs of the collection (by test count) and
then moves tests from the tail of a busy worker's queue to an idle one; the run ends when the last
test started ends. In file order that last test can be one of the slowest (a kill test of half a
minute) while the other worker idles. Here each worker's share starts with the costliest files and
ends with the cheapest, so what is left to move, and what runs last, are short tests. A file stays
whole and in its own order (its module fixtures are made once), except where a share's test count
ends inside it.

The costs are the seconds each file took in a recorded run (tests/data/test_costs.json: wall time of
setup, call and teardown, per file, with its test count), refreshed with `--record-costs`
(docs/testing.md). A file the table does not know costs the table's mean per test.
"""
from __future__ import annotations

import json
from pathlib import Path

COSTS = Path(__file__).resolve().parent / "data" / "test_costs.json"


def load_costs(path: Path = COSTS) -> dict[str, dict]:
    """file -> {"seconds": wall seconds of its tests, "tests": how many there were}; {} without a table."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return {}


def file_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


def shares(n: int, workers: int) -> list[int]:
    """The test counts worksteal's first distribution gives N workers: each takes len(pending) // (workers left)."""
    sizes = []
    for k in range(workers):
        sizes.append(n // (workers - k))
        n -= sizes[-1]
    return sizes


def costliest_first(items: list, workers: int, costs: dict[str, dict]) -> list:
    """`items` (pytest items, or anything with a .nodeid) reordered for `workers` workers: files by
    recorded cost, each given to the share with the least cost so far that has room, each share's
    files costliest first; the shares concatenated, so worksteal's first distribution hands out
    exactly those shares. The order of the tests within a file is kept."""
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(file_of(item.nodeid), []).append(item)
    known = [c for c in costs.values() if c.get("tests")]
    mean = sum(c["seconds"] for c in known) / max(sum(c["tests"] for c in known), 1)

    def per_test(name: str) -> float:
        c = costs.get(name)
        return c["seconds"] / c["tests"] if c and c.get("tests") else mean
    ranked = sorted(by_file, key=lambda name: (-per_test(name) * len(by_file[name]), name))
    room = shares(len(items), workers)
    bins: list[list] = [[] for _ in room]
    load = [0.0] * len(room)
    for name in ranked:
        tests = by_file[name]
        while tests:
            k = min((k for k in range(len(room)) if room[k]), key=lambda k: (load[k], k))
            take = min(room[k], len(tests))
            bins[k] += tests[:take]
            load[k] += per_test(name) * take
            room[k] -= take
            tests = tests[take:]
    return [item for share in bins for item in share]


def record(durations: dict[str, float], path: Path = COSTS) -> None:
    """Write the files' wall seconds and test counts from `durations` (nodeid -> seconds of setup,
    call and teardown) into the table at `path`; files this run did not run keep their entries."""
    files = load_costs(path)
    seen: dict[str, dict] = {}
    for nodeid, seconds in durations.items():
        entry = seen.setdefault(file_of(nodeid), {"seconds": 0.0, "tests": 0})
        entry["seconds"] += seconds
        entry["tests"] += 1
    files.update({name: {"seconds": round(e["seconds"], 1), "tests": e["tests"]} for name, e in seen.items()})
    about = ("wall seconds per test file (setup, call and teardown of its tests) and its test count, from a "
             "run with --record-costs; tests/run_order.py orders xdist's workers by it")
    rows = [f"  {json.dumps(name)}: {json.dumps(e)}" for name, e in sorted(files.items(), key=lambda kv: -kv[1]["seconds"])]
    path.write_text(f'{{"about": {json.dumps(about)},\n "files": {{\n' + ",\n".join(rows) + "\n }\n}\n",
                    encoding="utf-8")
