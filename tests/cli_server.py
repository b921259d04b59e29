"""`python -m pipeline ARGS` for the tests without paying its imports on every call: a fork server.

The tests run the command line as a user does, in a process of its own: its exit status, its
stdout and stderr, nothing shared with pytest. Starting that process costs about 0.8 s of CPU,
nearly all of it importing numpy, zarr, dask, gguf and the pipeline, while a refusal or a test-sized
conversion costs a fraction of that; the suite starts well over a thousand of them. This server
imports those modules once; for each request it forks a child that then is `python -m pipeline
ARGS` as far as a test can tell: a process of its own with the request's arguments, environment
(os.environ) and working directory, stdin /dev/null, stdout and stderr the caller's pipes, its exit
status (or the signal that ended it), atexit handlers run at its exit, sys.path[0] its working
directory. What a fork cannot give, and how the caller (tests/conftest.py `run_cli`) keeps it:
- modules read some environment variables when imported (dask's configuration, for one): a request
  whose environment is not the one the server started with runs as an ordinary process instead;
- every child of one server has the server's string hash seed: the caller alternates between two
  servers (each with its own random seed), so two consecutive runs, which the tests comparing two
  conversions' bytes make, hash strings differently as two ordinary processes do.

The same serves llama.cpp's converter (tests/test_reference_converter.py, tests/test_vocab.py), run
by its own virtual environment's Python with torch and transformers preloaded: `python SCRIPT ARGS`.

    python -m tests.cli_server SOCKET_PATH [MODULE,MODULE...]
                            (started by tests/conftest.py; exits with its parent; MODULEs: what to
                            preload instead of the pipeline's modules, in order: `MODULE:FUNCTION`
                            also calls FUNCTION() after the import, `*` stands for the pipeline's)

Protocol, one request per connection: the caller sends one JSON line {"argv", "env", "cwd", "umask"},
and "path" for a script or "module" for `-m MODULE` (else `-m pipeline` runs), "sigint": "default" to
give the child Python's own SIGINT handler (KeyboardInterrupt) as a process started with SIGINT at
its default does (else it keeps the server's, inherited from the caller as an ordinary child's is),
with its stdout and stderr as SCM_RIGHTS (pipes' write ends, a log file, /dev/null); the server
answers "pid N\\n" once the child runs, then "exit N S\\n" (N negative: killed by signal -N; S the
CPU seconds of the child and the processes it waited for) when it has ended. The caller may signal
pid N meanwhile (tests/kill_points.py does): the child is a process of its own.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import signal
import socket
import sys


def preload(modules: list[str]) -> None:
    """Import `modules`, or by default everything `python -m pipeline convert|verify|...` imports on a
    test checkpoint, but run nothing: no thread is started (a fork copies only the thread calling it)."""
    import threading

    if modules:
        for name in modules:
            if name == "*":
                preload([])
                continue
            name, _, function = name.partition(":")
            module = importlib.import_module(name)
            if function:
                getattr(module, function)()
        assert threading.active_count() == 1, f"a preloaded module started a thread: {threading.enumerate()}"
        return
    import pipeline
    import stages

    for package in (pipeline, stages):
        for module in pkgutil.iter_modules(package.__path__):
            if module.name != "__main__":
                importlib.import_module(f"{package.__name__}.{module.name}")
    for name in ("dask", "dask.array", "dask.threaded", "numcodecs", "sentencepiece", "tokenizers", "tqdm",
                 "xxhash", "psutil", "jinja2", "yaml"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert threading.active_count() == 1, f"a preloaded module started a thread: {threading.enumerate()}"


def serve(path: str) -> dict | None:
    """Answer requests until the parent (the pytest process) goes. Returns in a forked child, with
    the request that child is to run; returns None in the server when it is time to stop."""
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # the caller waits for the name: it appears only when ready
    listener.listen(16)
    listener.settimeout(0.5)
    while True:
        _reap()
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            if os.getppid() != parent:
                _reap(block=True)
                return None
            continue
        conn.settimeout(None)
        try:
            line, fds = _receive(conn)
        except (OSError, ValueError):  # a caller that went away mid-request: the next one is served
            conn.close()
            continue
        waiter = os.fork()
        if waiter:
            conn.close()
            for fd in fds:
                os.close(fd)
            continue
        # the waiter: start the command, report its pid and its end
        listener.close()
        request = json.loads(line)
        child = os.fork()
        if child == 0:
            conn.close()
            _become(request, fds)
            return request
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(f"pid {child}\n".encode())
            _, status, usage = os.wait4(child, 0)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            conn.sendall(f"exit {code} {usage.ru_utime + usage.ru_stime:.3f}\n".encode())
        finally:
            os._exit(0)


def _reap(block: bool = False) -> None:
    """Wait for the waiters that have ended (all of them when `block`): their CPU time, and their
    command's, is then counted in this server's, and so in the pytest process's that waits for it."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    data, fds = b"", []
    while not data.endswith(b"\n"):
        msg, got, _, _ = socket.recv_fds(conn, 1 << 20, 4)
        if not msg:
            raise ConnectionError("the caller hung up before its request was complete")
        data += msg
        fds += got
    return data, fds


def _become(request: dict, fds: list[int]) -> None:
    """Turn this forked process into the command's: its standard streams, directory, environment, argv."""
    stdout, stderr = fds
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    for fd in (null, stdout, stderr):
        os.close(fd)
    if request.get("sigint") == "default":
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.umask(request["umask"])
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "path" in request:
        sys.path[0] = os.path.dirname(os.path.abspath(request["path"]))  # as `python SCRIPT` sets it
        sys.argv = [request["path"], *request["argv"]]
    else:
        sys.path[0] = os.getcwd()  # as `python -m` sets it
        sys.argv = ["-m", *request["argv"]]
        # `python -m MODULE` runs a module (not a package's __main__) as __main__ only: a preloaded
        # copy under its name would be a second one (and runpy warns about it on stderr)
        preloaded = sys.modules.get(request.get("module", "pipeline"))
        if preloaded is not None and not hasattr(preloaded, "__path__"):
            del sys.modules[preloaded.__name__]


def main() -> None:
    path, modules = sys.argv[1], [m for m in sys.argv[2:3] for m in m.split(",") if m]
    print(f"hash of a string: {hash('bitnet-gguf')}", flush=True)  # tests/test_cli_server.py reads it
    preload(modules)
    request = serve(path)
    if request is None:
        return
    # the child, from here on `python SCRIPT ARGS` or `python -m pipeline ARGS` (pipeline/__main__.py
    # ends in sys.exit(main()))
    _exit(_run(request))


def _run(request: dict) -> int:
    """Run the request's script or `-m pipeline`; its exit status as the interpreter would give it
    (SystemExit's code, its message on stderr; 1 and the traceback for an uncaught exception)."""
    import runpy

    try:
        if "path" in request:
            runpy.run_path(request["path"], run_name="__main__")
        else:
            runpy.run_module(request.get("module", "pipeline"), run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        raise  # the interpreter's own way: it ends by SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def _exit(code: int) -> None:
    """End as the interpreter ends (non-daemon threads joined, atexit handlers run, the standard
    streams flushed) but without tearing down every module and object: in a child forked from a
    server holding numpy, dask, zarr and the pipeline, that teardown writes to nearly every page
    the child shares with the server and cost 0.3 s of CPU per command, more than most commands."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120  # as the interpreter reports a failed flush at exit
    os._exit(code & 0xFF)


if __name__ == "__main__":
    main()
