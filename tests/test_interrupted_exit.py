"""An interrupted conversion exits: a signal that lands while the threaded scheduler starts one of its
threads (Thread.start waits for the thread, so the signal's KeyboardInterrupt is raised there, before
the pool has recorded the thread) must not leave a thread the interpreter waits for at exit forever;
nor may a conversion's fetch threads outlive it."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The interrupt is raised in the main thread just after a pool thread has started, the moment the
# real signal hit: the thread runs, the pool does not know it.
SCRIPT = textwrap.dedent("""
    import threading
    from pipeline.scheduler import Scheduler, chunk_task

    start = threading.Thread.start
    def interrupted_start(self):
        start(self)
        if getattr(self, "_target", None) is not None and self._target.__name__ == "_worker":
            threading.Thread.start = start
            raise KeyboardInterrupt
    threading.Thread.start = interrupted_start

    scheduler = Scheduler("threads", 2, 1 << 30, progress=False)
    try:
        scheduler.run([chunk_task(abs, -i) for i in range(8)], "chunks")
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        scheduler.close()
""")


def test_an_interrupt_while_a_scheduler_thread_starts_still_exits():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
    assert proc.stdout.strip() == "interrupted", proc.stderr
    assert proc.returncode == 0, proc.stderr


def test_the_scheduler_still_computes_after_a_run_and_ends_its_threads_at_close():
    from pipeline.scheduler import Scheduler, chunk_task
    import threading

    scheduler = Scheduler("threads", 2, 1 << 30, progress=False)
    try:
        assert scheduler.run([chunk_task(abs, -i) for i in range(600)], "chunks") == list(range(600))
        assert scheduler.run([chunk_task(pow, i, 2) for i in range(5)], "chunks") == [0, 1, 4, 9, 16]
        assert any(t.name.startswith("bitnet-gguf-chunk") for t in threading.enumerate())
    finally:
        scheduler.close()
    assert not any(t.name.startswith("bitnet-gguf-chunk") for t in threading.enumerate())


def test_a_conversions_fetch_threads_end_with_it():
    import threading
    from pipeline import remote

    assert [f.result() for f in [remote._POOL.submit(abs, -i) for i in range(20)]] == list(range(20))
    fetching = [t for t in threading.enumerate() if t.name.startswith("bitnet-gguf-fetch")]
    assert fetching
    remote.end_fetching()
    for t in fetching:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in fetching)
    assert remote._POOL.submit(abs, -3).result() == 3  # the next conversion's pool
    remote.end_fetching()
