"""Where chunk tasks run: dask's threaded scheduler (default), a local
distributed cluster, or an existing one. Stages hand over lists of
`dask.delayed` tasks; this module runs them with a progress bar."""
from __future__ import annotations

import logging
import sys
from typing import Sequence

import dask
import dask.threaded
from dask.callbacks import Callback
from tqdm import tqdm

from pipeline.errors import OptionError


def chunk_task(func, *args):
    """One chunk of work as a dask task. Keys are unique per call (pure=False): a shared
    cluster must never take one conversion's chunk for another's."""
    return dask.delayed(func, pure=False)(*args)


class _TaskProgress(Callback):
    def __init__(self, keys: set, bar: tqdm):
        super().__init__()
        self._keys, self._bar = keys, bar

    def _posttask(self, key, result, dsk, state, worker_id):
        if key in self._keys:
            self._bar.update(1)


class Scheduler:
    def __init__(self, kind: str, workers: int, worker_memory: int, progress: bool = True):
        self.kind, self.workers, self.progress = kind, workers, progress
        self.client = None
        self.cluster = None
        if kind == "local" or kind.startswith("tcp://"):
            import distributed  # noqa: F401 - configures its loggers on import; quiet them
            for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker"):
                logging.getLogger(name).setLevel(logging.WARNING)
        if kind == "local":
            from distributed import Client, LocalCluster
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=worker_memory,
                                        processes=True, dashboard_address=None, silence_logs=logging.CRITICAL)
            self.client = Client(self.cluster)
        elif kind.startswith("tcp://"):
            from distributed import Client
            try:
                self.client = Client(kind, timeout=20)
            except (OSError, TimeoutError) as e:
                raise OptionError(f"--scheduler: cannot reach the dask scheduler at {kind} ({e})") from None

    def bar(self, total: int, desc: str, unit: str = "chunk", **kw) -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, file=sys.stderr,
                    dynamic_ncols=True, leave=True, **kw)

    def run(self, tasks: Sequence, desc: str) -> list:
        """Compute every task; results in task order."""
        if not tasks:
            return []
        with self.bar(len(tasks), desc) as bar:
            if self.client is None:
                # the threaded scheduler's function, not its name: given a name, dask imports
                # distributed to look for a client (over a second at every start)
                with _TaskProgress({t.key for t in tasks}, bar):
                    return list(dask.compute(*tasks, scheduler=dask.threaded.get, num_workers=self.workers))
            from distributed import as_completed
            futures = self.client.compute(list(tasks))
            for _ in as_completed(futures):
                bar.update(1)
            return self.client.gather(futures)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
