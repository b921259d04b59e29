"""Peak resident memory of a command and every process it starts (psutil sampling)."""
from __future__ import annotations

import resource
import subprocess
import tempfile
import time

import psutil


def run_measuring_peak(cmd: list[str], env: dict | None = None, interval: float = 0.02) -> dict:
    """Run cmd, sampling the summed RSS of it and all its descendants every `interval` s.

    Returns exit code, peak bytes, seconds (wall), cpu (seconds of CPU of the command and the
    children it waited for: what "quickly" means on a shared machine) and the end of stderr. RSS
    counts file pages a process has mapped and touched, but not the page cache behind read() calls.
    """
    started = time.monotonic()
    cpu_before = _children_cpu()
    # stderr into a file, not a pipe read at the end: a conversion that logs more than a pipe holds
    # (a warning per tensor of a model with many tensors) would block on its next line
    err_file = tempfile.TemporaryFile()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, env=env)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            family = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in family:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        peak = max(peak, total)
        time.sleep(interval)
    proc.wait()
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
    err_file.close()
    return {"exit": proc.returncode, "peak": peak, "seconds": time.monotonic() - started,
            "cpu": _children_cpu() - cpu_before, "stderr": err[-2000:]}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
