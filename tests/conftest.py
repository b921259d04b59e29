"""Shared helpers: build synthetic checkpoints, run the CLI as a user would."""
from __future__ import annotations

import atexit
import json
import locale
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_cli(*args, check_exit: int | None = 0, timeout: int = 600, module: str = "pipeline", preload: str = "",
            read_at_run_time=(), **kw) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a process of its own; its exit status must be `check_exit` (None: any).

    The process is forked from a server that has the pipeline's modules imported already
    (tests/cli_server.py: about 0.8 s of CPU less per call) when the call allows it: the same
    environment the server started with and no other subprocess option. Otherwise, or with
    BITNET_GGUF_TEST_FORK_SERVER=0, it is started the ordinary way. `module`: another module run
    as `python -m MODULE ARGS`; `preload`: the modules of the servers to fork it from (see
    fork_servers), when what it changes must be in place before they are imported;
    `read_at_run_time`: variables of `env` that no preloaded module reads on import, which may
    differ from the servers' (as popen_cli's)."""
    env = {**kw.pop("env", os.environ), "PYTHONPATH": str(ROOT)}
    cwd = kw.pop("cwd", None)
    argv = [str(a) for a in args]
    servers = fork_servers(preload)
    if not kw and servers.serves(env, read_at_run_time):
        proc = servers.run(argv, env, cwd, timeout, module=module)
    else:
        proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=timeout, **kw)
    if check_exit is not None and proc.returncode != check_exit:
        raise AssertionError(f"exit {proc.returncode} (wanted {check_exit})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def popen_cli(*args, module: str = "pipeline", env: dict | None = None, cwd=None, stdout=None, stderr=None,
              default_sigint: bool = False, read_at_run_time=(), preload: str = ""):
    """`python -m MODULE ARGS` started and left running, as subprocess.Popen(..., text=True) starts it:
    forked from a server (a ForkedProcess: pid, poll, wait, send_signal, kill...) when the environment
    allows it (run_cli; `read_at_run_time`: variables the command reads that no preloaded module
    reads on import, which may differ), else, or with BITNET_GGUF_TEST_FORK_SERVER=0, an ordinary
    process (subprocess.Popen). `default_sigint`: SIGINT at its default in the new process, so that
    Python's own handler turns it into KeyboardInterrupt (a shell that starts the tests in the
    background ignores SIGINT, and its children inherit that)."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    argv = [str(a) for a in args]
    servers = fork_servers(preload)
    if servers.serves(env, read_at_run_time):
        return servers.popen(argv, env, cwd, module, stdout, stderr, default_sigint)
    return subprocess.Popen([sys.executable, "-m", module, *argv], stdout=stdout, stderr=stderr, text=True,
                            env=env, cwd=cwd, preexec_fn=_default_sigint if default_sigint else None)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ForkServers:
    """`count` tests/cli_server.py processes run by `python` for this pytest process (each xdist worker has
    its own), started on first use, used in turn (each has its own string hash seed), ended with the
    session. `preload`: the modules they import (default: the pipeline's), `env`: their environment,
    the only one they serve. Two for our commands, so that consecutive ones hash strings differently;
    one for other programs (run_python_script), whose runs no test compares with each other."""

    def __init__(self, python: str = sys.executable, preload: str = "", env: dict | None = None,
                 count: int = 2) -> None:
        self.enabled = os.environ.get("BITNET_GGUF_TEST_FORK_SERVER", "1") != "0" and hasattr(socket, "send_fds") \
            and hasattr(os, "fork")
        self.python, self.preload, self.count = python, preload, count
        # by default the environment of the pytest process as it started (a test may change os.environ later)
        env = {**os.environ, "PYTHONPATH": str(ROOT)} if env is None else env
        self.env = {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}
        self.servers: list[tuple[subprocess.Popen, str]] = []
        self.turn = 0
        self.lock = threading.Lock()
        self.dir: str | None = None

    def serves(self, env: dict, read_at_run_time=()) -> bool:
        """Whether a command with environment `env` may be forked: `env` is the servers' own, but for
        PYTEST_CURRENT_TEST (pytest sets it for each test) and the variables `read_at_run_time`
        (read by what the command runs, never on the import of a preloaded module)."""
        def same(e):
            return {k: v for k, v in e.items() if k != "PYTEST_CURRENT_TEST" and k not in read_at_run_time}
        return self.enabled and same(env) == same(self.env)

    def _start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="bitnet-gguf-cli-server-")
        for i in range(self.count):
            path = os.path.join(self.dir, f"s{i}")
            log = open(os.path.join(self.dir, f"s{i}.log"), "wb")
            proc = subprocess.Popen([self.python, "-m", "tests.cli_server", path, self.preload], env=self.env,
                                    cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            self.servers.append((proc, path))
        deadline = time.monotonic() + 600  # a live server still importing torch under load; a crash ends the wait at once
        for proc, path in self.servers:
            while not os.path.exists(path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = Path(path + ".log").read_text(errors="replace")
                    raise RuntimeError(f"tests/cli_server.py did not start (exit {proc.poll()}):\n{log}")
                time.sleep(0.01)
        atexit.register(self.stop)

    def stop(self) -> None:
        for proc, _ in self.servers:
            proc.terminate()
        for proc, _ in self.servers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.servers = []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _request(self, argv: list[str], env: dict, cwd, fds: list[int], **how) -> tuple[socket.socket, int]:
        """Have a server fork the command (`how`: the request's "path", "module", "sigint"), its stdout
        and stderr `fds`; the connection its end will be reported on, and its pid."""
        with self.lock:  # a test may run commands from several threads
            if not self.servers:
                self._start()
            proc, path = self.servers[self.turn % self.count]
            self.turn += 1
        umask = os.umask(0)
        os.umask(umask)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            request = json.dumps({"argv": argv, "env": env, "cwd": os.path.abspath(cwd if cwd is not None else os.getcwd()),
                                  "umask": umask, **how}) + "\n"
            socket.send_fds(conn, [request.encode()], fds)
            reply = b""
            while not reply.endswith(b"\n"):
                got = conn.recv(1)  # one byte at a time: what follows the line is the exit's
                if not got:
                    raise RuntimeError(f"tests/cli_server.py ({path}) hung up before the command started")
                reply += got
        except BaseException:
            conn.close()
            raise
        return conn, int(reply.split()[1])

    def run(self, argv: list[str], env: dict, cwd, timeout: float, script: str | None = None,
            module: str = "pipeline") -> subprocess.CompletedProcess:
        """`python -m MODULE ARGV`, or `python SCRIPT ARGV`, forked from one of the servers."""
        cmd = [self.python, *((script,) if script else ("-m", module)), *argv]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            conn, pid = self._request(argv, env, cwd, [out_w, err_w],
                                      **({"path": script} if script else {"module": module}))
        finally:
            os.close(out_w)
            os.close(err_w)
        chunks = {out_r: [], err_r: []}
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for fd in chunks:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    os.kill(pid, signal.SIGKILL)
                    for fd in chunks:
                        os.close(fd)
                    conn.close()
                    raise subprocess.TimeoutExpired(cmd, timeout)
                for key, _ in sel.select(min(left, 1.0)):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        sel.unregister(key.fd)
                        os.close(key.fd)
        code = ForkedProcess(cmd, pid, conn).wait()

        def text(fd):  # as subprocess.run(text=True) decodes
            return b"".join(chunks[fd]).decode(locale.getpreferredencoding(False)).replace("\r\n", "\n") \
                .replace("\r", "\n")
        return subprocess.CompletedProcess(cmd, code, text(out_r), text(err_r))

    def popen(self, argv: list[str], env: dict, cwd=None, module: str = "pipeline", stdout=None, stderr=None,
              default_sigint: bool = False) -> "ForkedProcess":
        """`python -m MODULE ARGV` forked from one of the servers and left running: a ForkedProcess.
        stdout, stderr: None (inherit this process's), subprocess.DEVNULL, subprocess.PIPE (then
        the handle's .stdout / .stderr, text), a file object or descriptor; `default_sigint`: as
        subprocess.Popen(preexec_fn=...) putting SIGINT back to its default (tests/kill_points.py)."""
        cmd = [self.python, "-m", module, *argv]
        fds, ours, pipes = [], [], {}
        for name, target, std in (("stdout", stdout, 1), ("stderr", stderr, 2)):
            if target is None:
                fds.append(std)
            elif target == subprocess.DEVNULL:
                fds.append(os.open(os.devnull, os.O_WRONLY))
                ours.append(fds[-1])
            elif target == subprocess.PIPE:
                r, w = os.pipe()
                pipes[name] = open(r, encoding=locale.getpreferredencoding(False))
                fds.append(w)
                ours.append(w)
            else:
                fds.append(target if isinstance(target, int) else target.fileno())
        try:
            conn, pid = self._request(argv, env, cwd, fds, module=module,
                                      **({"sigint": "default"} if default_sigint else {}))
        except BaseException:
            for pipe in pipes.values():
                pipe.close()
            raise
        finally:
            for fd in ours:
                os.close(fd)
        return ForkedProcess(cmd, pid, conn, **pipes)


class ForkedProcess:
    """A command forked from a tests/cli_server.py server, seen as subprocess.Popen shows a process:
    `pid` (signal it at will: it is a process of its own), poll(), wait(timeout), send_signal(),
    terminate(), kill(), `returncode` (negative: the signal that ended it), `stdout`/`stderr` when
    asked for pipes. Its parent is the server's waiter, which reports its end and CPU time on `conn`;
    the CPU is added to this process's figures when the end is read."""

    def __init__(self, args, pid: int, conn: socket.socket, stdout=None, stderr=None) -> None:
        self.args, self.pid, self.conn = args, pid, conn
        self.stdout, self.stderr = stdout, stderr
        self.returncode: int | None = None
        self._reply = b""

    def _ended(self, timeout: float | None) -> bool:
        """Read the server's "exit N S" line, waiting up to `timeout` (None: as long as it takes)."""
        if self.returncode is not None:
            return True
        self.conn.settimeout(timeout)
        try:
            while not self._reply.endswith(b"\n"):
                got = self.conn.recv(64)
                if not got:
                    raise RuntimeError(f"tests/cli_server.py hung up before it reported the end of pid {self.pid}")
                self._reply += got
        except (socket.timeout, BlockingIOError):
            return False
        _, code, cpu = self._reply.split()
        self.conn.close()
        _FORKED_CPU[0] += float(cpu)  # reaped by the server, not by this process: counted here
        self.returncode = int(code)
        return True

    def poll(self) -> int | None:
        self._ended(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen does: never a pid that is no longer this command's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for pipe in (self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()
        self.wait()


_FORK_SERVERS = ForkServers()
_FORKED_CPU = [0.0]  # CPU seconds of the commands forked for this process so far
_SCRIPT_SERVERS: dict[tuple[str, str], ForkServers] = {}


def fork_servers(preload: str = "") -> ForkServers:
    """The servers of our venv's Python (started on first use) that preload `preload` (tests/cli_server.py's
    list: `MODULE:FUNCTION` calls FUNCTION after the import, `*` is the pipeline's modules; "": the
    pipeline's, run_cli's usual servers), serving the environment this pytest process started with."""
    if not preload:
        return _FORK_SERVERS
    key = (sys.executable, preload)
    if key not in _SCRIPT_SERVERS:
        _SCRIPT_SERVERS[key] = ForkServers(sys.executable, preload)
    return _SCRIPT_SERVERS[key]


def run_python_script(python, script, *args, env: dict | None = None, timeout: float = 600, cwd=None,
                      preload: str = "numpy,torch,transformers,tests.converter_preload") -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` (text output captured, as subprocess.run), for llama.cpp's converter in its own
    virtual environment (about 3.5 s of CPU less per run, and 1.0 s more with its own `conversion`
    package imported: tests/converter_preload.py) and for tests/llama_runtime.py's evaluations
    (`preload="numpy,llama_cpp"`, about 0.7 s less): forked from a server of that Python with the
    `preload` modules imported when `env` is the one its server started with, else started the
    ordinary way."""
    env = dict(os.environ if env is None else env)
    python, argv = str(python), [str(a) for a in args]
    servers = _SCRIPT_SERVERS.get((python, preload))
    if servers is None:
        # one server: its start (torch and transformers imported for llama.cpp's converter) costs 7 s of CPU
        servers = _SCRIPT_SERVERS[(python, preload)] = ForkServers(python, preload, env, count=1)
    if servers.serves(env):
        return servers.run(argv, env, cwd, timeout, script=str(script))
    return subprocess.run([python, str(script), *argv], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=cwd)


def convert(model_dir: Path, out: Path, *extra, **kw) -> subprocess.CompletedProcess:
    return run_cli("convert", model_dir, "-o", out, "--no-progress", *extra, **kw)


# -- results made once per run and shared by every test and xdist worker that only reads them ----

def shared_dir(tmp_path_factory, key: str, make) -> Path:
    """A directory that `make(directory)` fills, made once per test run: the first test (in any xdist
    worker) to ask for `key` makes it under a file lock, the others wait for it and get the same one.
    `key` must name everything the content depends on. Tests only read what is there: a test that
    changes something works on a copy. Kept under the run's temporary base (shared by its workers)."""
    import fcntl
    import hashlib
    import re

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", key)[:60] + "-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    done = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_dir():
            making = root / f"{name}.making"
            shutil.rmtree(making, ignore_errors=True)
            making.mkdir()
            make(making)
            os.rename(making, done)
    return done


def shared_checkpoint(tmp_path_factory, family: str = "1bitllm", **kw) -> Path:
    """tests/synthetic.py's write_checkpoint(family, **kw), written once per run (see shared_dir):
    read it, or copy it to change it."""
    from tests.synthetic import write_checkpoint

    key = f"checkpoint {family} " + json.dumps(kw, sort_keys=True)
    return shared_dir(tmp_path_factory, key, lambda d: write_checkpoint(d / "model", family, **kw)) / "model"


def shared_conversion(tmp_path_factory, model: Path, *extra) -> Path:
    """`convert MODEL -o OUT *extra` of a checkpoint from shared_checkpoint, made once per run;
    the path of the GGUF (its run directory beside it, `m.gguf.work`). Read it, or copy it."""
    key = f"conversion {model.parent.name} " + json.dumps([str(a) for a in extra])

    def make(d: Path) -> None:
        convert(model, d / "m.gguf", *extra)
    return shared_dir(tmp_path_factory, key, make) / "m.gguf"


def shared_outputs(tmp_path_factory, model: Path, types, *extra) -> dict[str, tuple[Path, str]]:
    """`convert MODEL -o DIR --type a,b,c *extra` (one file per type from one read) of a checkpoint from
    shared_checkpoint, made once per run: type -> (its GGUF, DIR/<model>-<TYPE>.gguf; what a conversion
    to that type alone prints: output_log). Read them, or copy them. tests/test_many_outputs.py holds
    these lists' files and warnings equal to single conversions'."""
    key = f"outputs {model.parent.name} " + json.dumps([",".join(types), *(str(a) for a in extra)])

    def make(d: Path) -> None:
        (d / "stderr.txt").write_text(convert(model, d, "--type", ",".join(types), *extra).stderr)
    d = shared_dir(tmp_path_factory, key, make)
    stderr = (d / "stderr.txt").read_text()
    names = {t: f"{model.name}-{t.upper()}.gguf" for t in types}
    return {t: (d / name, output_log(stderr, name)) for t, name in names.items()}


def output_log(stderr: str, name: str) -> str:
    """The lines of a `--type a,b,c` conversion's stderr about output `name`: those before the first
    pack (the checkpoint's, shared by every output) and those of its own pack and assemble."""
    lines, mine, started = [], False, False
    for line in stderr.splitlines(keepends=True):
        if line.startswith("pack: running ("):
            started, mine = True, line.rstrip("\n").endswith(f"({name})")
        elif line.startswith("wrote "):
            mine = False
        if mine or not started:
            lines.append(line)
    return "".join(lines)


# -- an independent reading of the source checkpoint (whole tensors: test-sized models only)
def read_source_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors as float32 numpy arrays, parsed from the safetensors bytes directly."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for fname in files:
        raw = (model_dir / fname).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            data = raw[8 + n + b: 8 + n + e]
            if info["dtype"] == "BF16":
                arr = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(data, {"F32": "<f4", "F16": "<f2"}[info["dtype"]]).astype(np.float32)
            out[name] = arr.reshape(info["shape"])
    return out


def absmean_reference(w: np.ndarray) -> np.ndarray:
    """BitNet b1.58 weight quantization (s = mean|W|, W' = clip(round(W/s), -1, 1) * s),
    in float32 the way llama.cpp's converter evaluates it: iscale = 1/s, W' = codes / iscale."""
    s = np.float32(max(np.abs(w.astype(np.float64)).mean(), 1e-5))
    iscale = np.float32(1) / s
    codes = np.clip(np.rint(w.astype(np.float32) * iscale), -1, 1).astype(np.float32)
    return codes / iscale


@pytest.fixture(autouse=True)
def _environment_restored():
    """os.environ as it was before each test, after it. A change left behind (distributed's LocalCluster
    with worker processes sets OMP_NUM_THREADS, PYTHONHASHSEED and more in it, and keeps them) would make
    every later command of this process differ from the fork servers' environment, so run_cli would start
    each as an ordinary process: about 0.8 s of CPU more per command for the rest of the run."""
    def ours(env) -> dict:  # pytest sets PYTEST_CURRENT_TEST for each phase itself
        return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}
    before = ours(os.environ)
    yield
    if ours(os.environ) != before:
        phase = os.environ.get("PYTEST_CURRENT_TEST")
        os.environ.clear()
        os.environ.update(before)
        if phase is not None:
            os.environ["PYTEST_CURRENT_TEST"] = phase


@pytest.fixture
def checkpoint(tmp_path):
    """Factory: checkpoint(**shape) -> directory of a fresh synthetic 1bitLLM checkpoint."""
    from tests.synthetic import write_bitnet_checkpoint

    counter = iter(range(1000))

    def make(**kw) -> Path:
        return write_bitnet_checkpoint(tmp_path / f"model{next(counter)}", **kw)
    return make


@pytest.fixture(scope="session")
def llama():
    """llama.cpp, the real client of our files (`make test` installs llama-cpp-python), run in a
    child process per evaluation (tests/llama_runtime.py: a native crash fails one test)."""
    import importlib.util

    from tests.llama_runtime import LlamaRuntime

    if os.environ.get("BITNET_GGUF_SKIP_LLAMA") == "1":
        pytest.skip("BITNET_GGUF_SKIP_LLAMA=1")
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed; `make test` installs it "
                    "(pip install -e '.[llama]'), or set BITNET_GGUF_SKIP_LLAMA=1 to skip these tests",
                    pytrace=False)
    return LlamaRuntime()


# -- the CPU time a run took, for docs/testing.md's figures ---------------------------------------
# Wall time on a shared machine says little; CPU time (user + system) of pytest, its xdist workers
# and every process they waited for (commands, fork servers and their children) says what the suite
# costs. Printed at the end of the run.

def _cpu_seconds() -> tuple[float, float]:
    """(this process's CPU seconds, those of the processes it has waited for)."""
    import resource

    for servers in (_FORK_SERVERS, *_SCRIPT_SERVERS.values()):
        servers.stop()  # so the servers, and through them their children, are waited for and counted
    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, reaped.ru_utime + reaped.ru_stime


_WORKERS_CPU: list[float] = []


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: its total goes to the controller
        workeroutput["cpu_seconds"] = sum(_cpu_seconds())
    elif session.config.getoption("--record-costs", False) and _WALL:
        from tests import run_order

        run_order.record(_WALL)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _WORKERS_CPU.append(getattr(node, "workeroutput", {}).get("cpu_seconds", 0.0))


# -- the CPU time of each test (setup, call and teardown): this process's, the processes it waited
# for, and the commands forked for it. `--cpu-durations=N` lists the N costliest at the end of a run
# (wall-time `--durations` says little on a shared machine). Servers' own idle time is not in it.

def pytest_addoption(parser):
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="list the N tests that took the most CPU time (0: all), with their processes'")
    parser.addoption("--cpu-durations-file", default=None, metavar="PATH",
                     help="append each test's CPU seconds to PATH as it ends (a run stopped early still "
                          "tells what its tests cost)")
    parser.addoption("--record-costs", action="store_true", default=False,
                     help="write each file's wall seconds and test count into tests/data/test_costs.json "
                          "at the end of the run (the order xdist's workers run the files in: tests/run_order.py)")


def _cpu_now() -> float:
    import resource

    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + _FORKED_CPU[0]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item._cpu_start = _cpu_now()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    if call.when == "teardown" and hasattr(item, "_cpu_start"):
        item.user_properties.append(("cpu_seconds", _cpu_now() - item._cpu_start))  # travels with xdist's reports
    yield


_TEST_CPU: dict[str, float] = {}
_WALL: dict[str, float] = {}  # nodeid -> wall seconds of its setup, call and teardown


_CPU_FILE: list = []


def pytest_configure(config):
    path = config.getoption("--cpu-durations-file", None)
    if path and not hasattr(config, "workerinput"):  # the controller (or the only process) writes it
        _CPU_FILE.append(open(path, "a", buffering=1))


def pytest_runtest_logreport(report):
    _WALL[report.nodeid] = _WALL.get(report.nodeid, 0.0) + report.duration
    if report.when == "teardown":
        for key, value in report.user_properties:
            if key == "cpu_seconds":
                _TEST_CPU[report.nodeid] = value
                if _CPU_FILE:
                    _CPU_FILE[0].write(f"{value:.2f} {report.nodeid}\n")


# -- the order of the tests under xdist: each worker's share costliest file first (tests/run_order.py) --

@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: the shares are of what runs
def pytest_collection_modifyitems(config, items):
    from tests import run_order

    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers > 1:
        items[:] = run_order.costliest_first(items, workers, run_order.load_costs())


def pytest_terminal_summary(terminalreporter, config):
    count = config.getoption("--cpu-durations", None)
    if count is not None and _TEST_CPU:
        ranked = sorted(_TEST_CPU.items(), key=lambda kv: -kv[1])
        terminalreporter.write_sep("=", f"CPU time of the {'' if count == 0 else f'{count} '}costliest tests")
        for nodeid, seconds in ranked[:count or None]:
            terminalreporter.write_line(f"{seconds:8.1f} s  {nodeid}")
        files: dict[str, float] = {}
        for nodeid, seconds in ranked:
            files[nodeid.split("::")[0]] = files.get(nodeid.split("::")[0], 0.0) + seconds
        terminalreporter.write_sep("-", "CPU time by file")
        for name, seconds in sorted(files.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:8.1f} s  {name}")
    own, reaped = _cpu_seconds()
    # the workers have usually been waited for by now (then `reaped` holds all they report, and more)
    workers = max(reaped, sum(_WORKERS_CPU))
    count = f" ({len(_WORKERS_CPU)} workers)" if _WORKERS_CPU else ""
    terminalreporter.write_line(f"CPU time of the run: {own + workers:.0f} s{count}")
