"""What the tests of hostile and careless input share: how a refusal is observed, and the checkpoints.

A refusal is exit 2 with exactly one stderr line starting `bitnet-gguf: error:`, and nothing
outside the run directory changes: every file of the checkpoint and of the output's directory is
hashed (xxh3-128; links by target, special files by type and device) before and after (`refuse`).
A refusal found before any work also leaves the run directory as it was (not created); one found
in the data extract reads may leave a run directory, but no output and no temporary file.

`fresh(kind)` copies one of a few small checkpoints (written once per run, on first use) for a
test to damage; `model` is a fresh 1bitLLM one, `out` an output path beside a user's other files.
Refusals before work run the command line in this process (`cli`, fast); what could hang or needs
its own memory measured runs as a command (`convert`, `run_cli`).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import xxhash

from tests.conftest import ROOT, convert, shared_checkpoint
from tests.test_bad_input import edit_safetensors

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4, num_kv_heads=2)
FAMILIES = ("1bitllm", "llama3-1.58", "2b4t")
ERROR = "bitnet-gguf: error:"
UP = "model.layers.0.mlp.up_proj.weight_scale"  # a packed projection's scale


# -- observing the file system ---------------------------------------------------------------

def content_digest(path: Path) -> str:
    """xxh3-128 of a regular file's size, the bytes of its data extents and where its holes are.

    Some checkpoints here are GiB-sized sparse files, hashed before and after each refusal: a hole
    reads as zeros, so it is described by its place (SEEK_DATA/SEEK_HOLE) instead of read. Any
    change of a byte changes the digest (a byte written into a hole makes data there); zeros
    written into a hole change it too, though the bytes read are the same: stricter, never
    weaker, than hashing every byte. Where the system cannot tell holes, every byte is read."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(f"size {size};".encode())
        for begin, end in _data_extents(f.fileno(), size):
            h.update(f"data {begin} {end};".encode())
            f.seek(begin)
            left = end - begin
            while left > 0:
                block = f.read(min(left, 1 << 22))
                if not block:  # shorter than its size said (truncated meanwhile): what is there
                    break
                h.update(block)
                left -= len(block)
    return h.hexdigest()


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[begin, end) of the parts of a file that are not holes (the whole file where the system
    has no SEEK_DATA, or the file system does not say)."""
    if not hasattr(os, "SEEK_DATA"):
        return [(0, size)]
    extents, pos = [], 0
    while pos < size:
        try:
            begin = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # a hole up to the end
                break
            return [(0, size)]
        end = min(os.lseek(fd, begin, os.SEEK_HOLE), size)
        extents.append((begin, end))
        pos = end
    return extents


def describe(path: Path):
    """What is at `path`, without following links or opening special files."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISREG(st.st_mode):
        # xxh3-128, not sha256: the same power to see a changed byte, at ~20 times the speed
        return ("file", content_digest(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir",)
    return ("special", stat.S_IFMT(st.st_mode), st.st_rdev)


def tree(*roots, skip=()) -> dict:
    """Every entry under the roots (the roots too), described; `skip` paths are left out."""
    skip = {Path(p) for p in skip}
    out = {}
    for root in map(Path, roots):
        if not os.path.lexists(root):
            out[str(root)] = None
            continue
        out[str(root)] = describe(root)
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if here / d not in skip]
            for name in dirnames + filenames:
                if here / name not in skip:
                    out[str(here / name)] = describe(here / name)
    return out


def assert_same(before: dict, after: dict) -> None:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed outside the run directory: {changed[:8]}"


def one_line(proc, after_log=False) -> str:
    """The refusal's single line. `after_log`: the run had started, so progress lines may come first
    (but no other line of the refusal)."""
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(ERROR), f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    if after_log:
        assert [x for x in lines if "error" in x.lower() or "traceback" in x.lower()] == lines[-1:], proc.stderr
    else:
        assert len(lines) == 1, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    return lines[-1]


def partials(d: Path) -> list[Path]:
    return sorted(p for p in Path(d).iterdir() if p.name.endswith(".partial"))


def cli(*args) -> subprocess.CompletedProcess:
    """The command line in this process (a refusal costs no interpreter start): exit code and output."""
    from pipeline.cli import main

    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(args, code, std.getvalue(), err.getvalue())


def refuse(model, out, *needles, extra=(), workdir=None, in_data=False, watch=None, timeout=None):
    """Convert, expecting exit 2 with one line holding every needle and nothing changed.

    `in_data`: the refusal comes from the data extract reads, so the run directory may
    exist afterwards (never the output or a temporary file). Otherwise the run directory
    is as it was (not created when it did not exist). With a `timeout` the command runs in a
    process of its own (what could hang), else in this one."""
    out = Path(out)
    run_dir = Path(workdir) if workdir else out.with_name(out.name + ".work")
    watched = [model, out.parent] if watch is None else watch
    skip = [run_dir] if in_data else []
    before = tree(*watched, skip=skip)
    run_before = tree(run_dir)
    args = (*extra, "--workdir", workdir) if workdir else extra
    if timeout:
        proc = convert(model, out, *args, check_exit=None, timeout=timeout)
    else:
        proc = cli("convert", model, "-o", out, "--no-progress", *args)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    line = one_line(proc, after_log=in_data)
    for needle in needles:
        assert needle in line, (needle, line)
    assert_same(before, tree(*watched, skip=skip))
    if not in_data:
        assert_same(run_before, tree(run_dir))
    else:
        assert not os.path.lexists(out) or before.get(str(out)) is not None
        assert not partials(out.parent)
    return line


# -- checkpoints -----------------------------------------------------------------------------

class Pristine(dict):
    """kind -> a small checkpoint, written once per run on first use (conftest.shared_checkpoint):
    each family of FAMILIES, "1bitllm-f32", "sharded" (llama3-1.58 in two shards), "added" (1bitLLM
    with added_tokens.json); "spm" and "bpe" name the 1bitLLM (tokenizer.model) and Llama3-8B-1.58
    (tokenizer.json) ones. Never changed in place: `fresh` copies."""

    KINDS = {**{family: (family, {}) for family in FAMILIES}, "1bitllm-f32": ("1bitllm", {"dtype": "f32"}),
             "sharded": ("llama3-1.58", {"shards": 2}), "added": ("1bitllm", {"added_tokens": True})}
    ALIASES = {"spm": "1bitllm", "bpe": "llama3-1.58"}

    def __init__(self, tmp_path_factory) -> None:
        super().__init__()
        self.factory = tmp_path_factory

    def __missing__(self, kind: str) -> Path:
        family, extra = self.KINDS[self.ALIASES.get(kind, kind)]
        self[kind] = path = shared_checkpoint(self.factory, family, **extra, **SHAPE)
        return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The small checkpoints of `Pristine`, copied per test (`fresh`)."""
    return Pristine(tmp_path_factory)


@pytest.fixture
def fresh(pristine, tmp_path):
    """fresh(kind) -> a private copy of a pristine checkpoint (named `model`)."""
    def make(kind="1bitllm", name="model") -> Path:
        dest = tmp_path / "src" / kind / name
        shutil.copytree(pristine[kind], dest)
        return dest
    return make


@pytest.fixture
def model(fresh):
    return fresh("1bitllm")


@pytest.fixture
def out(tmp_path):
    """The output path, in a directory that also holds a user's other files."""
    d = tmp_path / "out"
    d.mkdir()
    (d / "notes.txt").write_text("the user's notes")
    (d / "older.gguf").write_bytes(b"GGUF" + bytes(60))
    return d / "m.gguf"


# -- editing a checkpoint ---------------------------------------------------------------------

def tensor_view(header, data, name):
    info = header[name]
    begin, end = info["data_offsets"]
    dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "U8": "u1"}[info["dtype"]]
    return np.frombuffer(memoryview(data)[begin:end], dtype).reshape(info["shape"])


def set_values(path: Path, name: str, edit) -> None:
    """Apply edit(float32 array) -> float32 array to one float tensor of a safetensors file, in place."""
    def apply(header, data):
        info = header[name]
        view = tensor_view(header, data, name)
        if info["dtype"] == "BF16":
            values = (view.astype(np.uint32) << 16).view(np.float32)
            new = (np.asarray(edit(values.copy()), np.float32).view(np.uint32) >> 16).astype("<u2")
        else:
            new = np.asarray(edit(view.astype(np.float32)), np.float32).astype(view.dtype)
        b, e = info["data_offsets"]
        data[b:e] = new.tobytes()
        return header, data
    edit_safetensors(path, apply)


def rewrite_in_place(path: Path, keep_times=True) -> None:
    """Change a weight file's bytes (one projection negated) keeping its size, inode and times."""
    st = os.stat(path)
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k.endswith("_proj.weight"))
    b, e = header[name]["data_offsets"]
    start = 8 + n + b
    if header[name]["dtype"] == "U8":  # packed: swap codes 0 and 2 (-1 <-> +1) in every field
        block = np.frombuffer(bytes(raw[start:8 + n + e]), np.uint8)
        swapped = np.zeros_like(block)
        for shift in (0, 2, 4, 6):
            field = (block >> shift) & 3
            swapped |= (np.where(field == 1, 1, 2 - field).astype(np.uint8) << shift)
        new = swapped.tobytes()
    else:
        dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[header[name]["dtype"]]
        block = np.frombuffer(bytes(raw[start:8 + n + e]), dtype)
        new = ((block ^ np.array(0x8000, "<u2")) if dtype == "<u2" else -block).astype(dtype).tobytes()
    assert new != bytes(raw[start:8 + n + e])
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(new)
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        now = os.stat(path)
        assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def move_shard_into_subdirectory(model: Path, sub: str = "sub") -> Path:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (model / sub).mkdir(parents=True)
    os.replace(model / shard, model / sub / shard)
    index["weight_map"] = {k: (f"{sub}/{v}" if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return model / sub / shard


def set_json_keys(path: Path, **changes) -> None:
    """Set keys of the JSON object in `path` (a new file when there is none); a value of `...` removes the key."""
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def interrupted_run(model, out, work, after: str) -> None:
    """A run directory as a conversion interrupted after `after` leaves it (later stages forgotten)."""
    convert(model, out, "--workdir", work)
    out.unlink()
    manifest = json.loads((work / "manifest.json").read_text())
    stages = ["extract", "quantize", "pack", "assemble"]
    for stage in stages[stages.index(after) + 1:]:
        manifest["stages"].pop(stage, None)
    (work / "manifest.json").write_text(json.dumps(manifest))



# -- as an unprivileged user: unreadable files and directories that cannot be searched

SETPRIV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@functools.cache
def nobody_python() -> tuple[list[str], str, str]:
    """(command prefix, project root as uid 65534 sees it, why not) for running Python as nobody.

    A project cloned under a private directory (mktemp -d is 0700) cannot be entered by uid 65534.
    Then the project is bind-mounted at a public path in a private mount namespace (unshare -m), so
    that only the files the test makes unreadable are unreadable. When neither works, the tests
    below have nothing to say about our code and are skipped with the reason."""
    if not (os.geteuid() == 0 and shutil.which("setpriv")):
        return [], "", "needs root and setpriv to run as another user"
    probe = "import pipeline.cli, numpy, zarr, safetensors"
    python = Path(sys.executable)
    attempts = [([], ROOT)]
    if shutil.which("unshare") and shutil.which("mount"):
        mnt = Path(tempfile.mkdtemp(prefix="bitnet-gguf-root-", dir="/tmp"))
        os.chmod(mnt, 0o755)
        atexit.register(os.rmdir, mnt)
        attempts.append((["unshare", "-m", "--propagation", "private", "sh", "-c",
                          'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(ROOT), str(mnt)], mnt))
    last = ""
    for prefix, root in attempts:
        exe = str(root / python.relative_to(ROOT)) if python.is_relative_to(ROOT) else str(python)
        cmd = [*prefix, *SETPRIV, exe]
        proc = subprocess.run([*cmd, "-c", probe], capture_output=True, text=True, cwd="/", timeout=120,
                              env={**os.environ, "PYTHONPATH": str(root)})
        if proc.returncode == 0:
            return cmd, str(root), ""
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return [], "", f"uid 65534 cannot run the converter from {ROOT} (private parent directory?): {last}"


@pytest.fixture
def shared_dir():
    """A directory an unprivileged user can use (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="bitnet-gguf-test-", dir="/tmp"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(model: Path, out: Path) -> subprocess.CompletedProcess:
    cmd, root, _ = nobody_python()
    env = {**os.environ, "PYTHONPATH": root, "HOME": str(out.parent)}
    return subprocess.run([*cmd, "-m", "pipeline", "convert", str(model), "-o", str(out), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=out.parent)
