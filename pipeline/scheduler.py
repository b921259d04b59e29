"""Where chunk tasks run: dask's threaded scheduler (default), a local
distributed cluster, or an existing one. Stages hand over lists of
chunk tasks (chunk_task); this module runs them with a progress bar, the threaded
scheduler's threads its own, ended when the conversion ends.

A dask cluster without workers holds its tasks forever without a word: while tasks are
pending and no worker is connected, one line says so, and after --worker-timeout seconds
the conversion gives up (NoWorkers, exit 1); a scheduler that goes away ends it the same way
(SchedulerLost). The chunks already written stay, so a rerun continues."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import socket
import struct
import sys
import time
import uuid
from typing import Callable, Sequence

import dask
import dask.threaded
from dask.callbacks import Callback
from tqdm import tqdm

from pipeline.errors import OptionError, ResumableFailure

# How often a distributed run looks at its futures, and at whether any worker is connected.
POLL_SECONDS = 0.1
WORKER_CHECK_SECONDS = 1.0
DEFAULT_WORKER_TIMEOUT = 300.0
# Tasks the threaded scheduler gets at once: enough to keep every worker busy (the last tasks of a
# batch leave workers idle for one task's time), few enough that dask's state for them stays small.
THREADED_BATCH = 512


class NoWorkers(ResumableFailure):
    """No dask worker was connected for --worker-timeout seconds while tasks were pending (an
    environment failure, exit 1: the run directory is kept and a rerun continues)."""


class SchedulerLost(ResumableFailure):
    """The dask scheduler went away (or cancelled the tasks) mid-run: exit 1, a rerun continues."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkTask:
    """One chunk of work: a function and its arguments, made a dask task only when its batch runs
    (a dask.delayed and its graph take a few KiB, which for the tens of thousands of chunks of a
    model with many experts made a stage's peak grow with the number of tensors)."""
    func: Callable
    args: tuple
    # unique (a shared cluster must never take one conversion's chunk for another's: this process's
    # random tag and a count), and the same each time the task is made, so start_order's dask.order
    # agrees with the run's
    key: str = dataclasses.field(default_factory=lambda: f"chunk-{_PROCESS_TAG}-{next(_COUNT)}")

    def node(self):
        """The dask task (threaded scheduler): the call as one argument dask does not look into."""
        if _Task is None:  # dask before its task classes (2024.12): a task tuple
            return (_call, _Call(self.func, self.args))
        return _Task(self.key, _call, _Call(self.func, self.args))

    def delayed(self):
        return dask.delayed(_call, pure=False)(_Call(self.func, self.args), dask_key_name=self.key)


try:
    from dask._task_spec import Task as _Task
except ImportError:
    _Task = None
_PROCESS_TAG = uuid.uuid4().hex
_COUNT = itertools.count()


class _Call:
    """A chunk task's function and arguments, handed to dask as one object: dask walks every
    argument of a task it is given (lists, tuples, dicts, dataclasses) looking for other tasks,
    which for thousands of chunk tasks of plain arguments was a tenth of a stage's time."""
    __slots__ = ("func", "args")

    def __init__(self, func: Callable, args: tuple):
        self.func, self.args = func, args

    def __getstate__(self):
        return self.func, self.args

    def __setstate__(self, state):
        self.func, self.args = state


def _call(call: _Call):
    return call.func(*call.args)


def run_reading_ahead(ctx, tasks: list, ahead: list, name: str) -> None:
    """Run a stage's tasks; `ahead[i]`: the remote byte range task i reads (or None). With the
    threaded scheduler the ranges are fetched ahead in the order its tasks start, at most one chunk
    per worker not yet taken, so the next chunks arrive while the current ones are processed."""
    from pipeline import remote

    reads = ctx.options.scheduler == "threads" and any(ahead)
    ranges = [ahead[i] for i in start_order(tasks) if ahead[i]] if reads else []
    with remote.prefetching(ranges, ctx.budget.workers):
        ctx.scheduler.run(tasks, name)


def chunk_task(func, *args) -> ChunkTask:
    return ChunkTask(func, args)


def start_order(tasks: Sequence[ChunkTask]) -> list[int]:
    """Indices of `tasks` in the order the threaded scheduler starts them (Scheduler.run: batch by
    batch, each in dask.order's priority), so that their input can be read ahead in that order."""
    from dask.order import order

    out: list[int] = []
    for first in range(0, len(tasks), THREADED_BATCH):
        batch = range(first, min(first + THREADED_BATCH, len(tasks)))
        graph = {tasks[i].key: tasks[i].node() for i in batch}
        priority = order(graph)
        out += sorted(batch, key=lambda i: priority[tasks[i].key])
    return out


# How long a dask scheduler may take to accept a connection and send its handshake.
HANDSHAKE_TIMEOUT = 10.0
_MAX_HANDSHAKE = 64 * 1024  # a dask handshake is well under 100 bytes
_HANDSHAKE_KEYS = {"compression", "python", "pickle-protocol"}


def probe_scheduler(address: str, timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Refuse in one line, before anything is written, an address where no dask scheduler
    answers: nothing listening, a server that accepts and says nothing, or one that speaks
    another protocol. A dask comm's first message on a new connection is the server's
    handshake: an 8-byte length, then frames (an 8-byte count, 8-byte lengths, the bytes)
    holding one msgpack map with the keys in _HANDSHAKE_KEYS."""
    url = address[len("tcp://"):].rstrip("/")
    host, _, port = url.rpartition(":")
    host = host.strip("[]")
    where = f"--scheduler {address}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        raise OptionError(f"{where}: cannot connect ({e.strerror or e}); start the dask scheduler there "
                          "or check the address") from None
    with sock:
        try:
            total = struct.unpack("<Q", _receive(sock, 8, deadline))[0]
            if not 16 <= total <= _MAX_HANDSHAKE:
                raise ValueError
            body = _receive(sock, total, deadline)
            n = struct.unpack_from("<Q", body)[0]
            lengths = struct.unpack_from(f"<{n}Q", body, 8) if 1 <= n <= 16 else ()
            if not lengths or 8 + 8 * n + sum(lengths) != total:
                raise ValueError
            import msgpack

            message = msgpack.unpackb(body[8 + 8 * n:8 + 8 * n + lengths[0]], raw=False)
            if not isinstance(message, dict) or not _HANDSHAKE_KEYS <= message.keys():
                raise ValueError
        except TimeoutError:
            raise OptionError(f"{where}: connected, but no dask handshake came within {timeout:g} s; this is not "
                              "a dask scheduler (or it is stuck); check the address") from None
        except Exception:  # noqa: BLE001 - ValueError, struct.error, msgpack's own errors, a reset connection
            raise OptionError(f"{where}: the server there does not speak dask's protocol; give the address of a "
                              "dask scheduler (dask scheduler prints it)") from None


def _receive(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - len(data), 65536))
        except socket.timeout:
            raise TimeoutError from None
        if not chunk:
            raise ValueError("closed")
        data += chunk
    return bytes(data)


class _TaskProgress(Callback):
    def __init__(self, keys: set, bar: tqdm):
        super().__init__()
        self._keys, self._bar = keys, bar

    def _posttask(self, key, result, dsk, state, worker_id):
        if key in self._keys:
            self._bar.update(1)


class Scheduler:
    def __init__(self, kind: str, workers: int, worker_memory: int, progress: bool = True,
                 worker_timeout: float = DEFAULT_WORKER_TIMEOUT, log=None):
        self.kind, self.workers, self.progress = kind, workers, progress
        self.worker_timeout, self.log = worker_timeout, log or (lambda message: None)
        self.client = None
        self.cluster = None
        self.pool = None  # the threaded scheduler's threads, this scheduler's own (close() ends them)
        if kind == "local" or kind.startswith("tcp://"):
            import distributed  # noqa: F401 - configures its loggers on import; quiet them
            for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker"):
                logging.getLogger(name).setLevel(logging.WARNING)
            for name in ("distributed.client", "distributed.utils"):  # a lost scheduler's tracebacks: our line says it
                logging.getLogger(name).setLevel(logging.CRITICAL)
        if kind == "local":
            from distributed import Client, LocalCluster
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=worker_memory,
                                        processes=True, dashboard_address=None, silence_logs=logging.CRITICAL)
            self.client = Client(self.cluster)
        elif kind.startswith("tcp://"):
            from distributed import Client
            try:
                self.client = Client(kind, timeout=HANDSHAKE_TIMEOUT)
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
                # the threaded scheduler's own function on a graph of independent tasks (dask.compute
                # of delayed objects would cull and optimize each one's graph first, a millisecond a
                # chunk). In batches: dask's bookkeeping for one graph of every task grows with the
                # number of tensors (tens of thousands for a model with many experts), a batch's does not
                if self.pool is None:
                    self.pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="bitnet-gguf-chunk")
                results = []
                for first in range(0, len(tasks), THREADED_BATCH):
                    graph = {t.key: t.node() for t in tasks[first:first + THREADED_BATCH]}
                    with _TaskProgress(set(graph), bar):
                        results += dask.threaded.get(graph, list(graph), pool=self.pool)
                return results
            return self._run_distributed(tasks, bar)

    def _run_distributed(self, tasks: Sequence, bar: tqdm) -> list:
        futures = self.client.compute([t.delayed() for t in tasks])
        pending = set(futures)
        idle_since, next_check = None, 0.0
        where = "--cluster local" if self.kind == "local" else f"--scheduler {self.kind}"
        while pending:
            finished = {f for f in pending if f.done()}
            for f in finished:
                if f.status == "cancelled":  # by the client when it lost the scheduler, or by the scheduler
                    raise self._lost(where)
                if f.status != "finished":
                    f.result()  # the task's error, now rather than after the others
                bar.update(1)
            pending -= finished
            now = time.monotonic()
            if pending and now >= next_check:
                next_check = now + WORKER_CHECK_SECONDS
                if self.client.status != "running":
                    pass  # reconnecting to the scheduler: its tasks are cancelled if that fails
                elif self._connected_workers():
                    if idle_since is not None:
                        self.log(f"{where}: a dask worker is connected again; continuing")
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                    self.log(f"{where}: no dask worker is connected; waiting for one (giving up after "
                             f"{self.worker_timeout:g} s, --worker-timeout)")
                elif now - idle_since >= self.worker_timeout:
                    raise NoWorkers(f"{where}: no dask worker connected for {self.worker_timeout:g} s "
                                    "(--worker-timeout); start a worker for that scheduler (dask worker ADDRESS) "
                                    "and rerun the same command to continue")
            if pending:
                time.sleep(POLL_SECONDS)
        return self.client.gather(futures)

    def _lost(self, where: str) -> SchedulerLost:
        what = "lost the connection to the dask scheduler; check that it runs" if self.client.status != "running" \
            else "the dask scheduler cancelled a chunk task (was it restarted?)"
        return SchedulerLost(f"{where}: {what}, then rerun the same command to continue")

    def _connected_workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def close(self) -> None:
        # the pool's threads are ended here, not left to the interpreter's exit: a signal that lands
        # while the pool starts a thread (Thread.start waits for it) leaves a thread the interpreter
        # does not know to wake, and an interrupted conversion then never exits. shutdown() wakes every
        # thread of the pool, known or not, and drops the tasks not begun.
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
