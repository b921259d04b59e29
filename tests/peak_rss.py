"""Peak resident memory of a command and every process it starts (psutil sampling)."""
from __future__ import annotations

import os
import resource
import stat
import subprocess
import tempfile
import time

import psutil


def disk_bytes(paths) -> int:
    """Bytes allocated on disk under `paths` (files and directories; absent ones count 0; a file with
    several hard links, as quantize's codes linked into pack.zarr, once)."""
    total = 0
    seen = set()
    stack = [str(p) for p in paths]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                stack += [e.path for e in os.scandir(p)]
            except OSError:
                pass
    return total


def file_bytes(paths) -> int:
    """Bytes the files under `paths` hold (their sizes, not their blocks; a file of several hard
    links once): what a test-sized run's disk is compared in, where 4 KiB blocks would dominate."""
    total, seen = 0, set()
    for root in map(str, paths):
        found = [root] if os.path.isfile(root) else \
            [os.path.join(base, name) for base, _, files in os.walk(root) for name in files]
        for path in found:
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def run_measuring_peak(cmd: list[str], env: dict | None = None, interval: float = 0.02, disk=(),
                       disk_interval: float = 1.0) -> dict:
    """Run cmd, sampling the summed RSS of it and all its descendants every `interval` s (and, when
    `disk` names paths, the bytes on disk under them every `disk_interval` s).

    Returns exit code, peak bytes, seconds (wall), cpu (seconds of CPU of the command and every process
    it waited for: what "quickly" means on a shared machine), the mean load average, the peak of `disk`
    and the end of stderr. RSS counts file pages a process has mapped and touched, but not the page
    cache behind read() calls.
    """
    started = time.monotonic()
    cpu_before = _children_cpu()
    # stderr into a file, not a pipe read at the end: a conversion that logs more than a pipe holds
    # (a warning per tensor of a model with many tensors) would block on its next line
    err_file = tempfile.TemporaryFile()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, env=env)
    peak = disk_peak = 0
    loads, next_disk = [], 0.0
    while proc.poll() is None:
        total = tree_rss(proc.pid) if _PROC_CHILDREN else _psutil_tree_rss(proc)
        if total is None:
            break
        peak = max(peak, total)
        if disk and time.monotonic() >= next_disk:
            disk_peak = max(disk_peak, disk_bytes(disk))
            loads.append(os.getloadavg()[0])
            next_disk = time.monotonic() + disk_interval
        time.sleep(interval)
    proc.wait()
    if disk:
        disk_peak = max(disk_peak, disk_bytes(disk))
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
    err_file.close()
    return {"exit": proc.returncode, "peak": peak, "seconds": time.monotonic() - started, "stderr": err[-2000:],
            "cpu": _children_cpu() - cpu_before, "disk_peak": disk_peak,
            "load": sum(loads) / len(loads) if loads else None}


_PAGE = os.sysconf("SC_PAGE_SIZE")
_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def tree_rss(pid: int) -> int | None:
    """Summed RSS of process `pid` and all its descendants (None once it is gone): the tree that
    psutil's children(recursive=True) finds (the children of each of a process's threads), read
    from /proc/PID/task/TID/children, and each one's resident pages from /proc/PID/statm, what
    psutil's memory_info().rss reads. psutil finds the tree by reading every process of the machine:
    3.8 ms of CPU per sample with 118 processes, against 0.04 ms here, 50 samples a second for as
    long as the command runs (a second of CPU per six of wall time, counted in the test's CPU)."""
    total, stack, first = 0, [pid], True
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children", "rb") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, IndexError, ValueError):  # ended while read (as psutil's NoSuchProcess)
            if first:
                return None
        first = False
    return total


def _psutil_tree_rss(proc: psutil.Popen) -> int | None:
    """tree_rss where /proc has no children files (a kernel without CONFIG_PROC_CHILDREN)."""
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for p in family:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
