"""The threaded scheduler's chunk tasks: every task runs once, results in the order given, the start
order a permutation of the tasks, across batch boundaries, with dask's task classes and with the
task tuples of a dask older than them (pyproject allows dask from 2024.8)."""
from __future__ import annotations

import threading

import pytest

from pipeline import scheduler


def _square_counted(i, seen, lock):
    with lock:
        seen.append(i)
    return i * i


@pytest.mark.parametrize("task_classes", [True, False], ids=["task-classes", "task-tuples"])
def test_every_chunk_task_runs_once_and_results_keep_the_tasks_order(monkeypatch, task_classes):
    if not task_classes:
        monkeypatch.setattr(scheduler, "_Task", None)
    elif scheduler._Task is None:
        pytest.skip("this dask has no task classes")
    n = 2 * scheduler.THREADED_BATCH + 7
    seen, lock = [], threading.Lock()
    tasks = [scheduler.ChunkTask(_square_counted, (i, seen, lock)) for i in range(n)]
    assert sorted(scheduler.start_order(tasks)) == list(range(n))
    assert isinstance(tasks[0].node(), tuple) is not task_classes
    sched = scheduler.Scheduler("threads", 2, 1 << 30, progress=False)
    try:
        assert sched.run(tasks, "squares") == [i * i for i in range(n)]
    finally:
        sched.close()
    assert sorted(seen) == list(range(n))
    assert sched.pool is None
