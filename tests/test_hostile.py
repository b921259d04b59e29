"""The adversarial sweep of issue 9, class by class: what a hostile or careless user does.

Every case asserts the exit status (2 for anything the user's input or options cause),
that a refusal is exactly one stderr line starting `bitnet-gguf: error:`, and that
nothing outside the run directory changed: every file of the checkpoint and of the
output's directory is hashed (xxh3-128; links by target, special files by type and
device) before and after. A refusal found before any work also leaves the run
directory as it was (not created); one found in the data extract reads may leave a run
directory, but no output and no temporary file.

Classes (issue 9 numbering; 4, damaged stores, is tests/test_damage.py; 7, tokenizers,
is tests/test_vocab.py; 9, verify, is tests/test_verify.py):
  1 the output path (every part of a split set) is not a regular file, before and during the run
  2 run directories that are not ours; the output inside the run directory
  3 conversions to one output from different run directories (raced and interleaved), or in one
  5 the source changing between runs (same size and mtime, shards in subdirectories) and during one
  6 values a type cannot represent (NaN/Inf, beyond F16, scales fp16 or float32 cannot hold)
  8 corrupt safetensors headers and indexes
 10 other input errors: presets, scheduler addresses, added tokens, config.json, non-UTF-8 and
    read-only paths (a mount namespace makes them read-only for root)
 11 absurd sizes (config dimensions, a huge header), refused quickly in bounded memory
 12 header values refused before any work
 13 one-line refusals: usage errors, status and inspect, FIFOs among the checkpoint's files

Refusals before work run the command line in this process (`cli`, fast); what could hang
or needs its own memory measured runs as a command (`convert`, `run_cli`).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

from tests.conftest import ROOT, convert, run_cli
from tests.test_bad_input import edit_safetensors, rewrite_config

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4, num_kv_heads=2)
FAMILIES = ("1bitllm", "llama3-1.58", "2b4t")
ERROR = "bitnet-gguf: error:"


# -- observing the file system ---------------------------------------------------------------

def describe(path: Path):
    """What is at `path`, without following links or opening special files."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISREG(st.st_mode):
        # xxh3-128, not sha256: the same power to see a changed byte, at ~20 times the speed (some
        # checkpoints here are GiB-sized sparse files, hashed before and after each refusal)
        h = xxhash.xxh3_128()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return ("file", h.hexdigest())
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

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One small checkpoint of each family (f32 1bitLLM too), copied per test."""
    from tests.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("pristine")
    made = {family: write_checkpoint(root / family, family, **SHAPE) for family in FAMILIES}
    made["1bitllm-f32"] = write_checkpoint(root / "1bitllm-f32", "1bitllm", dtype="f32", **SHAPE)
    made["sharded"] = write_checkpoint(root / "sharded", "llama3-1.58", shards=2, **SHAPE)
    made["added"] = write_checkpoint(root / "added", "1bitllm", added_tokens=True, **SHAPE)
    return made


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


# == 1. the output path is not a regular file ===================================================

@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
@pytest.mark.parametrize("force", [False, True])
def test_a_device_at_the_output_is_refused_and_stays_a_device(model, device, force):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    st = os.lstat(device)
    refuse(model, Path(device), "-o", device, extra=("--force",) if force else (), watch=[model])
    now = os.lstat(device)
    assert stat.S_ISCHR(now.st_mode) and now.st_rdev == st.st_rdev
    assert not os.path.lexists(device + ".work")


@pytest.mark.parametrize("kind", ["fifo", "link-to-gguf", "link-to-missing", "link-loop", "self-link", "directory",
                                  "link-to-directory"])
def test_an_output_that_is_not_a_regular_file_is_refused_and_left_as_it_was(model, out, tmp_path, kind):
    target = tmp_path / "target.gguf"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "link-to-gguf":
        target.write_bytes(b"GGUF" + bytes(100))
        out.symlink_to(target)
    elif kind == "link-to-missing":
        out.symlink_to(tmp_path / "nowhere.gguf")
    elif kind == "link-loop":
        out.symlink_to(out.with_name("b.gguf"))
        out.with_name("b.gguf").symlink_to(out)
    elif kind == "self-link":
        out.symlink_to(out.name)
    elif kind == "directory":
        out.mkdir()
        (out / "inside.txt").write_text("x")
    else:
        (tmp_path / "somedir").mkdir()
        out.symlink_to(tmp_path / "somedir")
    kind_before = describe(out)
    for extra in ((), ("--force",)):
        refuse(model, out, "-o", extra=extra, watch=[model, out.parent, tmp_path / "target.gguf"],
               timeout=60 if kind == "fifo" else None)
    assert describe(out) == kind_before
    assert not (tmp_path / "nowhere.gguf").exists()


def test_an_output_that_turns_into_a_fifo_during_the_run_is_not_replaced(model, out):
    """The check before work is not enough: the rename itself refuses a special file."""
    from pipeline.config import make_options
    from pipeline.errors import RunDirError
    from pipeline.runner import convert as run_convert

    opts = make_options(model, output=out, progress=False)

    def log(line):
        if line == "assemble: running":
            os.mkfifo(out)
    with pytest.raises(RunDirError, match="not a regular file") as e:
        run_convert(opts, log)
    assert stat.S_ISFIFO(os.lstat(out).st_mode)
    left = re.search(r"stays at (\S+)", str(e.value)).group(1)
    assert Path(left).read_bytes()[:4] == b"GGUF" and partials(out.parent) == [Path(left)]


SPLIT = ("--split-max-tensors", "3")  # 13 tensors of the 1bitLLM checkpoint: 5 parts


def part(out: Path, k: int, n: int = 5) -> Path:
    return out.with_name(f"{out.stem}-{k:05d}-of-{n:05d}.gguf")


@pytest.mark.parametrize("k,kind", [(1, "fifo"), (2, "directory"), (3, "link"), (5, "not-gguf")])
def test_every_part_of_a_split_output_is_checked_before_any_work(model, out, k, kind):
    path = part(out, k)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "link":
        path.symlink_to(out.with_name("older.gguf"))
    else:
        path.write_text("the user's own file that happens to have this name")
    line = refuse(model, out, path.name, extra=SPLIT, timeout=60 if kind == "fifo" else None)
    if kind == "not-gguf":
        assert "--force" in line
        convert(model, out, *SPLIT, "--force")
        assert path.read_bytes()[:4] == b"GGUF"
    else:
        refuse(model, out, path.name, extra=(*SPLIT, "--force"), timeout=60 if kind == "fifo" else None)


def test_a_split_set_appears_whole_or_not_at_all(model, out):
    from pipeline.config import make_options
    from pipeline.errors import RunDirError
    from pipeline.runner import convert as run_convert

    opts = make_options(model, output=out, split_max_tensors=3, progress=False)

    def log(line):
        if line == "assemble: running":
            os.mkfifo(part(out, 4))
    with pytest.raises(RunDirError, match="other 4 parts") as e:
        run_convert(opts, log)
    assert [p for p in out.parent.iterdir() if p.name.startswith("m-")] == [part(out, 4)]
    assert len(partials(out.parent)) == 5
    assert str(e.value).count("\n") == 0


# == 2. run directories that are not ours =========================================================

@pytest.mark.parametrize("content", [
    {"manifest.json": json.dumps({"name": "my-web-app", "version": 2, "stages": {}})},
    {"manifest.json": json.dumps([1, 2, 3])},
    {"manifest.json": "not json at all"},
    {"notes.txt": "mine", "manifest.json": json.dumps({"tool": "something-else"})},
    {"photo.jpg": "\xff\xd8"},
    {"extract.zarr/zarr.json": json.dumps({"mine": True})},  # a store name, but no manifest of ours
    {"pack.zarr": "a file named like a store"},
    {"lock": "the user's lock file", "extract.zarr/data.bin": "precious"},
    {"metadata.json": json.dumps({"title": "my photos"})},
    {"extract.zarr/zarr.json": json.dumps({"node_type": "group", "attributes": {"stage": "pack"}}),
     "metadata.json": "{}"},
])
def test_a_workdir_holding_someone_elses_files_is_refused_and_left_alone(model, out, tmp_path, content):
    work = tmp_path / "theirs"
    for name, text in content.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    line = refuse(model, out, "--workdir", workdir=work, watch=[model, out.parent, work])
    assert str(work) in line


def test_a_workdir_that_is_a_file_is_refused(model, out, tmp_path):
    work = tmp_path / "file"
    work.write_text("not a directory")
    refuse(model, out, "not a directory", workdir=work, watch=[model, out.parent, work])


@pytest.fixture
def our_run(model, tmp_path):
    """A finished conversion's run directory (ours) and output."""
    work, first = tmp_path / "run", tmp_path / "first" / "m.gguf"
    first.parent.mkdir()
    convert(model, first, "--workdir", work)
    return work


@pytest.mark.parametrize("where", ["manifest.json", "metadata.json", "lock", "extract.zarr/zarr.json",
                                   "new.gguf", "extract.zarr/x.gguf"])
def test_the_output_inside_the_run_directory_is_refused(model, our_run, where):
    out = our_run / where
    for extra in ((), ("--force",)):  # without --force a file there may be refused as not a GGUF first
        refuse(model, out, "-o", extra=extra, workdir=our_run, watch=[model, our_run])
    assert "apart" in refuse(model, out, extra=("--force",), workdir=our_run, watch=[model, our_run])


def test_the_output_equal_to_the_workdir_is_refused(model, tmp_path):
    target = tmp_path / "same"
    refuse(model, target, "apart", workdir=target, watch=[model, tmp_path])
    assert not target.exists()


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_a_workdir_overlapping_the_checkpoint_is_refused(model, out, where):
    work = {"inside": model / "run", "same": model, "parent": model.parent}[where]
    refuse(model, out, "--workdir", workdir=work, watch=[model, out.parent, model.parent])


def test_a_workdir_equal_to_the_output_directory_is_refused(model, out):
    refuse(model, out, "--workdir", workdir=out.parent)


# == 3. concurrent conversions to the same output ==================================================

def test_concurrent_conversions_to_one_output_never_leave_a_wrong_file(fresh, tmp_path):
    """Rounds of two runs (different checkpoints, different run directories) racing to one -o."""
    import gguf

    models = {name: fresh("1bitllm", name) for name in ("alpha", "beta")}
    rewrite_in_place(models["beta"] / "model.safetensors")  # different weights, same shapes
    out = tmp_path / "race" / "m.gguf"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for rnd in range(4):
        if rnd % 2 == 0 and out.exists():
            out.unlink()
        procs = {name: subprocess.Popen(
            [sys.executable, "-m", "pipeline", "convert", m, "-o", out, "--no-progress", "--workdir",
             tmp_path / f"work-{name}"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
            for name, m in models.items()}
        results = {name: (p.wait(timeout=300), p.stderr.read()) for name, p in procs.items()}
        left = []
        for name, (code, err) in results.items():
            assert code in (0, 2), (name, code, err)
            if code == 2:
                line = err.strip().splitlines()[-1]
                assert line.startswith(ERROR) and [x for x in err.splitlines() if "error" in x] == [line], err
                m = re.search(r"stays at (\S+)", line)
                assert m, line
                kept = Path(m.group(1))
                assert kept.parent == out.parent and kept.read_bytes()[:4] == b"GGUF"
                left.append(kept)
        assert sorted(partials(out.parent)) == sorted(left), results
        winner = gguf.GGUFReader(out).fields["general.name"]
        name = bytes(winner.parts[winner.data[0]]).decode().lower()  # "Alpha": llama.cpp's title of the name
        proc = run_cli("verify", out, models[name], check_exit=None)
        assert proc.returncode == 0, (rnd, name, results, proc.stdout[-2000:])
        for kept in left:
            kept.unlink()


@pytest.mark.parametrize("when", ["quantize: running", "assemble: running"])
def test_an_output_another_run_wrote_meanwhile_is_not_replaced_and_a_rerun_replaces_it(fresh, tmp_path, when):
    """The same race, interleaved on purpose: B finishes while A works."""
    import gguf

    from pipeline.config import make_options
    from pipeline.errors import RunDirError
    from pipeline.runner import convert as run_convert

    alpha, beta = fresh("1bitllm", "alpha"), fresh("1bitllm", "beta")
    rewrite_in_place(beta / "model.safetensors")
    out = tmp_path / "race" / "m.gguf"
    out.parent.mkdir()
    opts = make_options(alpha, output=out, workdir=tmp_path / "work-alpha", progress=False)

    def log(line):
        if line == when:
            convert(beta, out, "--workdir", tmp_path / "work-beta")
    with pytest.raises(RunDirError, match="another process") as e:
        run_convert(opts, log)
    kept = Path(re.search(r"stays at (\S+)", str(e.value)).group(1))
    assert partials(out.parent) == [kept]

    def name_of(path):
        field = gguf.GGUFReader(path).fields["general.name"]
        return bytes(field.parts[field.data[0]]).decode()
    assert name_of(out) == "Beta" and name_of(kept) == "Alpha"  # titles of the names, as llama.cpp's converter
    run_cli("verify", out, beta)
    proc = convert(alpha, out, "--workdir", tmp_path / "work-alpha")  # the message's other advice
    assert "assemble: running" in proc.stderr
    assert name_of(out) == "Alpha" and not partials(out.parent)
    run_cli("verify", out, alpha)


def test_a_second_conversion_in_a_busy_run_directory_is_refused_and_the_first_finishes(model, out):
    from pipeline.config import make_options
    from pipeline.runner import convert as run_convert

    opts = make_options(model, output=out, progress=False)
    second = []

    def log(line):
        if line in ("extract: running", "assemble: running"):
            before = tree(model, out.parent, skip=[opts.workdir])
            second.append(convert(model, out, check_exit=None, timeout=120))
            assert_same(before, tree(model, out.parent, skip=[opts.workdir]))
    run_convert(opts, log)
    assert len(second) == 2
    for proc in second:
        assert proc.returncode == 2 and "another conversion is running" in one_line(proc)
    run_cli("verify", out, model)


# == 5. the source changing under a run =========================================================

def converted_fresh(model: Path, tmp_path: Path, tag: str) -> bytes:
    out = tmp_path / f"clean-{tag}" / "m.gguf"
    out.parent.mkdir()
    convert(model, out)
    return out.read_bytes()


@pytest.mark.parametrize("family,how", [("1bitllm", "in-place"), ("llama3-1.58", "in-place"),
                                        ("1bitllm", "replaced")])
def test_a_weight_file_rewritten_with_the_same_size_and_mtime_is_noticed(fresh, tmp_path, family, how):
    model = fresh(family)
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    convert(model, out, "--workdir", work)
    old = out.read_bytes()
    weights = model / "model.safetensors"
    if how == "in-place":
        rewrite_in_place(weights)
    else:  # a new file (new inode) with the old size and times
        st = os.stat(weights)
        copy = model / "copy.tmp"
        shutil.copyfile(weights, copy)
        rewrite_in_place(copy, keep_times=False)
        os.replace(copy, weights)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc = convert(model, out, "--workdir", work)
    assert "already done" not in proc.stderr.split("extract:")[1].splitlines()[0]
    new = out.read_bytes()
    assert new != old
    assert new == converted_fresh(model, tmp_path, "changed")


def move_shard_into_subdirectory(model: Path, sub: str = "sub") -> Path:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (model / sub).mkdir(parents=True)
    os.replace(model / shard, model / sub / shard)
    index["weight_map"] = {k: (f"{sub}/{v}" if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return model / sub / shard


def test_a_shard_in_a_subdirectory_converts_and_its_change_is_noticed(fresh, tmp_path):
    model = fresh("sharded")
    moved = move_shard_into_subdirectory(model, "nested/dir")
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    convert(model, out, "--workdir", work)
    run_cli("verify", out, model)
    old = out.read_bytes()
    rewrite_in_place(moved)
    convert(model, out, "--workdir", work)
    assert out.read_bytes() != old
    assert out.read_bytes() == converted_fresh(model, tmp_path, "changed")


@pytest.mark.parametrize("when", ["extract: running", "quantize: running", "assemble: running"])
def test_a_weight_file_changed_during_the_run_is_refused_before_the_output_appears(model, out, when):
    from pipeline.config import make_options
    from pipeline.errors import CheckpointError
    from pipeline.runner import convert as run_convert

    opts = make_options(model, output=out, progress=False)
    seen = []

    def log(line):
        seen.append(line)
        if line == when:
            rewrite_in_place(model / "model.safetensors")
    before = tree(out.parent, skip=[opts.workdir])
    with pytest.raises(CheckpointError, match="changed during the conversion"):
        run_convert(opts, log)
    assert when in seen
    assert not out.exists() and not partials(out.parent)
    assert_same(before, tree(out.parent, skip=[opts.workdir]))
    if when == "assemble: running":  # the message's advice works
        convert(model, out)
        run_cli("verify", out, model)


# == 6. values a type cannot represent ===========================================================

@pytest.mark.parametrize("kind,name,value", [
    ("1bitllm", "model.embed_tokens.weight", np.nan),
    ("1bitllm", "model.embed_tokens.weight", -np.inf),
    ("1bitllm", "model.layers.0.input_layernorm.weight", np.inf),
    ("1bitllm", "model.norm.weight", np.nan),
    ("1bitllm", "model.layers.0.mlp.down_proj.weight", np.nan),
    ("llama3-1.58", "model.norm.weight", -np.inf),
    ("llama3-1.58", "lm_head.weight", np.nan),
    ("2b4t", "model.embed_tokens.weight", np.inf),
    ("2b4t", "model.layers.0.self_attn.attn_sub_norm.weight", np.nan),
])
def test_nan_and_inf_are_refused_naming_the_tensor(fresh, out, kind, name, value):
    model = fresh(kind)

    def poke(values):
        values.reshape(-1)[len(values.reshape(-1)) // 2] = value
        return values
    set_values(model / "model.safetensors", name, poke)
    refuse(model, out, name, "NaN or infinite", in_data=True)


@pytest.mark.parametrize("kind,name", [("1bitllm-f32", "model.embed_tokens.weight"), ("llama3-1.58", "lm_head.weight"),
                                       ("2b4t", "model.embed_tokens.weight")])
def test_a_value_beyond_f16_is_refused_and_bf16_or_f32_convert(fresh, out, kind, name):
    model = fresh(kind)

    def big(values):
        values[3, 7] = 70000.0
        return values
    set_values(model / "model.safetensors", name, big)
    line = refuse(model, out, name, "bf16", "f32", in_data=True)
    assert "--embedding-type" in line
    for etype in ("f32", "bf16"):
        convert(model, out, "--embedding-type", etype, "--workdir", out.parent / f"w-{etype}")
        assert out.read_bytes()[:4] == b"GGUF"
        out.unlink()


def test_a_value_beyond_q8_0s_range_is_refused(fresh, out):
    model = fresh("1bitllm-f32")
    set_values(model / "model.safetensors", "model.embed_tokens.weight", lambda v: v * np.float32(1e7))
    refuse(model, out, "model.embed_tokens.weight", extra=("--embedding-type", "q8_0"), in_data=True)


def test_a_large_norm_value_is_fine_in_f32(fresh, out):
    model = fresh("1bitllm-f32")
    set_values(model / "model.safetensors", "model.norm.weight", lambda v: v * np.float32(1e6))
    convert(model, out)
    run_cli("verify", out, model)


@pytest.mark.parametrize("out_type", ["tq2_0", "tq1_0"])
def test_a_projection_scale_beyond_fp16_is_refused_for_tq_and_converts_as_i2_s(fresh, out, out_type):
    model = fresh("1bitllm-f32")
    name = "model.layers.0.self_attn.o_proj.weight"
    set_values(model / "model.safetensors", name, lambda v: v * np.float32(1e7))
    refuse(model, out, "attn_output", "i2_s", extra=("--type", out_type), in_data=True)
    convert(model, out, "--type", "i2_s", "--workdir", out.parent / "w-i2s")
    run_cli("verify", out, model)


@pytest.mark.parametrize("family,scale", [("llama3-1.58", 1e-6), ("2b4t", 1e6), ("llama3-1.58", 1e30)])
def test_a_packed_weight_scale_fp16_cannot_hold_is_refused_for_tq_before_any_work(fresh, out, family, scale):
    """A packed projection's scale is its weight_scale, read before any work: refused then."""
    model = fresh(family)
    name = "model.layers.0.mlp.up_proj.weight_scale"
    set_values(model / "model.safetensors", name, lambda v: np.full_like(v, scale))
    refuse(model, out, "ffn_up", "i2_s")
    convert(model, out, "--type", "i2_s")
    run_cli("verify", out, model)


@pytest.mark.parametrize("family,scale", [("llama3-1.58", 1e-39), ("2b4t", 3e38)])
@pytest.mark.parametrize("out_type", ["i2_s", "tq2_0"])
def test_a_packed_weight_scale_no_float32_can_hold_is_refused_for_every_type(fresh, out, family, scale, out_type):
    """1 / 1e-39 (a bf16 subnormal) is beyond float32: not even I2_S's float32 scale holds it."""
    model = fresh(family)
    name = "model.layers.0.mlp.up_proj.weight_scale"
    set_values(model / "model.safetensors", name, lambda v: np.full_like(v, scale))
    if family == "2b4t":  # 3e38 fits float32: only the fp16 types refuse it
        if out_type == "i2_s":
            convert(model, out, "--type", out_type)
            return
    line = refuse(model, out, "ffn_up", extra=("--type", out_type))
    if family == "llama3-1.58":
        assert "i2_s" not in line  # it would not help


# == 8. corrupt safetensors files and indexes ====================================================

def _offsets(value):
    def edit(header, data):
        header["model.layers.0.self_attn.k_proj.weight"]["data_offsets"] = value(
            header["model.layers.0.self_attn.k_proj.weight"]["data_offsets"])
        return header, data
    return edit


def _entry(value):
    def edit(header, data):
        header["model.layers.0.self_attn.k_proj.weight"] = value
        return header, data
    return edit


def _same_range_as(other, shift=0):
    def edit(header, data):
        b, e = header[other]["data_offsets"]
        header["model.layers.0.self_attn.v_proj.weight"]["data_offsets"] = [b + shift, e + shift]
        return header, data
    return edit


@pytest.mark.parametrize("edit,needle", [
    (_offsets(lambda o: [str(o[0]), str(o[1])]), "data_offsets"),
    (_offsets(lambda o: [float(o[0]), float(o[1])]), "data_offsets"),
    (_offsets(lambda o: [o[0] - 10**9, o[1] - 10**9]), "data_offsets"),
    (_offsets(lambda o: [o[1], o[0]]), "k_proj"),
    (_offsets(lambda o: [o[0], o[1], o[1]]), "data_offsets"),
    (_offsets(lambda o: {"begin": o[0]}), "data_offsets"),
    (_offsets(lambda o: [o[0] + 2**64, o[1] + 2**64]), "k_proj"),
    (_entry([1, 2, 3]), "not an object"),
    (_entry("F32"), "not an object"),
    (_entry({"dtype": "F32", "shape": [128, "256"], "data_offsets": [0, 131072]}), "k_proj"),
    (_entry({"dtype": "F32", "shape": [-128, -256], "data_offsets": [0, 131072]}), "k_proj"),
    (_entry({"dtype": ["F32"], "shape": [128, 256], "data_offsets": [0, 131072]}), "k_proj"),
    (_same_range_as("model.layers.0.self_attn.k_proj.weight"), "overlap"),
    (_same_range_as("model.layers.0.self_attn.k_proj.weight", shift=4), "overlap"),
])
def test_corrupt_header_entries_are_refused(model, out, edit, needle):
    edit_safetensors(model / "model.safetensors", edit)
    refuse(model, out, "model.safetensors", needle)


def write_header_bytes(path: Path, head: bytes) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:])


@pytest.mark.parametrize("head", [
    b'{"a":' * 100_000 + b"{}" + b"}" * 100_000,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
    b'"just a string"',
    b"\xff\xfe{}",
])
def test_headers_that_are_not_a_plain_json_object_are_refused(model, out, head):
    write_header_bytes(model / "model.safetensors", head)
    refuse(model, out, "model.safetensors")


def test_a_tensor_named_twice_in_one_header_is_refused(model, out):
    """json.loads keeps the last of two equal keys: the second entry points at another tensor's bytes."""
    path = model / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    other = header["model.layers.0.input_layernorm.weight"]
    text = json.dumps(header)[:-1] + ', "model.norm.weight": ' + json.dumps(other) + "}"
    write_header_bytes(path, text.encode())
    refuse(model, out, "model.safetensors", "model.norm.weight", "twice")


def test_a_tensor_in_two_shards_is_refused(fresh, out):
    model = fresh("sharded")
    shards = sorted(model.glob("model-*.safetensors"))
    first = json.loads(shards[0].read_bytes()[8:8 + int.from_bytes(shards[0].read_bytes()[:8], "little")])
    name = next(k for k, v in first.items() if k != "__metadata__" and v["dtype"] == "U8")
    info = first[name]
    raw0 = shards[0].read_bytes()
    n0 = int.from_bytes(raw0[:8], "little")
    payload = raw0[8 + n0 + info["data_offsets"][0]: 8 + n0 + info["data_offsets"][1]]

    def add(header, data):
        header[name] = {**info, "data_offsets": [len(data), len(data) + len(payload)]}
        return header, data + payload
    edit_safetensors(shards[1], add)
    refuse(model, out, name, "one shard")


def _index(change):
    def edit(index, model):
        index["weight_map"] = change(index["weight_map"], model)
        return index
    return edit


@pytest.mark.parametrize("edit,needle", [
    (_index(lambda wm, m: list(wm.items())), "weight_map"),
    (_index(lambda wm, m: "model-00001-of-00002.safetensors"), "weight_map"),
    (_index(lambda wm, m: None), "weight_map"),
    (_index(lambda wm, m: {k: 1 for k in wm}), "weight_map"),
    (_index(lambda wm, m: {k: ["a"] for k in wm}), "weight_map"),
    (_index(lambda wm, m: {k: f"../{m.name}-copy/{v}" for k, v in wm.items()}), "inside the checkpoint"),
    (_index(lambda wm, m: {k: f"sub/../../{m.name}-copy/{v}" for k, v in wm.items()}), "inside the checkpoint"),
    (_index(lambda wm, m: {k: str(m.parent / f"{m.name}-copy" / v) for k, v in wm.items()}), "inside the checkpoint"),
    (_index(lambda wm, m: {k: "" for k in wm}), "shard name"),
    (lambda index, m: [index], "safetensors index"),
    (lambda index, m: {"metadata": {}}, "weight_map"),
])
def test_malformed_indexes_are_refused_and_never_read_outside_the_checkpoint(fresh, out, edit, needle):
    model = fresh("sharded")
    shutil.copytree(model, model.parent / f"{model.name}-copy")  # what a `..` or absolute path would reach
    path = model / "model.safetensors.index.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()), model)))
    refuse(model, out, "model.safetensors.index.json", needle, watch=[model.parent, out.parent])


def test_an_index_that_is_deeply_nested_is_refused(fresh, out):
    model = fresh("sharded")
    (model / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refuse(model, out, "model.safetensors.index.json")


# == 10. other input errors ======================================================================

@pytest.mark.parametrize("preset,needle", [
    ("DIR", "--config"),
    ("MISSING", "--config"),
    ('type = "tq2_0\n', "not valid TOML"),
    ("workers = 2\nworkers = 3\n", "not valid TOML"),
    ('workers = "two"\n', "--workers"),
    ("workers = 2.5\n", "--workers"),
    ("workers = -1\n", "--workers"),
    ('force = "yes"\n', "--force"),
    ("progress = 1\n", "--no-progress"),
    ("memory_limit = true\n", "--memory-limit"),
    ("memory_limit = [1]\n", "--memory-limit"),
    ("out_type = 3\n", "--type"),
    ('scheduler = ["tcp://a:1"]\n', "--scheduler"),
    ("split_max_size = -5\n", "--split-max-size"),
    ('split_max_tensors = {a = 1}\n', "--split-max-tensors"),
    ('embedding_type = "F16 "\n', "--embedding-type"),
    ("colour = 'blue'\n", "unknown keys"),
    (b"\xff\xfe\x00", "--config"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "--config"),
])
def test_bad_presets_are_refused(model, out, tmp_path, preset, needle):
    if preset == "DIR":
        path = tmp_path
    elif preset == "MISSING":
        path = tmp_path / "nope.toml"
    else:
        path = tmp_path / "preset.toml"
        path.write_bytes(preset if isinstance(preset, bytes) else preset.encode())
    refuse(model, out, needle, extra=("--config", path))


@pytest.mark.parametrize("address", ["tcp://host", "tcp://host:", "tcp://host:0", "tcp://host:70000",
                                     "tcp://:8786", "tcp://host:-1", "tcp://host:87 86", "host:8786", ""])
def test_bad_scheduler_addresses_are_refused(model, out, address):
    refuse(model, out, "--scheduler", extra=("--scheduler", address))


@pytest.mark.parametrize("tokens,needle", [
    ({"<extra>": "384"}, "added_tokens.json"),
    ({"<extra>": -1}, "added_tokens.json"),
    ({"<extra>": 3.0}, "added_tokens.json"),
    ({"<extra>": True}, "added_tokens.json"),
    ({"<extra>": None}, "added_tokens.json"),
    (["<extra>", 384], "added_tokens.json"),
    ("<extra>", "added_tokens.json"),
])
def test_malformed_added_tokens_are_refused(fresh, out, tokens, needle):
    model = fresh("added")
    (model / "added_tokens.json").write_text(json.dumps(tokens))
    refuse(model, out, needle)


def test_a_bpe_added_token_beyond_the_vocabulary_is_refused(fresh, out):
    model = fresh("llama3-1.58")
    (model / "added_tokens.json").write_text(json.dumps({"<extra>": 10**30}))
    refuse(model, out, "added_tokens.json", "vocab_size")


@pytest.mark.parametrize("decoder", [
    {"-1": {"content": "<x>"}},
    {"abc": {"content": "<x>"}},
    {"5": "<x>"},
    {"5": {"content": 7}},
    [{"content": "<x>"}],
])
def test_malformed_added_tokens_decoder_is_refused(fresh, out, decoder):
    model = fresh("added")
    path = model / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["added_tokens_decoder"] = decoder
    path.write_text(json.dumps(config))
    refuse(model, out, "tokenizer_config.json")


@pytest.mark.parametrize("family", ["llama3-1.58", "2b4t"])
@pytest.mark.parametrize("entry", [{"id": "5", "content": "<x>"}, {"id": -3, "content": "<x>"},
                                   {"id": 1.5, "content": "<x>"}, {"content": "<x>"}, "<x>"])
def test_malformed_bpe_added_tokens_are_refused(fresh, out, family, entry):
    model = fresh(family)
    path = model / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["added_tokens"] = [*tok.get("added_tokens", []), entry]
    path.write_text(json.dumps(tok))
    refuse(model, out, "tokenizer.json")


@pytest.mark.parametrize("content", [
    b"[1, 2, 3]", b'"BitnetForCausalLM"', b"null", b'{"hidden_size": "\xff\xfe"}', b"\xef\xbb\xbf\xff{}",
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"[" * 100_000 + b"]" * 100_000, b"", b"{" ,
])
def test_config_json_that_is_not_an_object_is_refused(model, out, content):
    (model / "config.json").write_bytes(content)
    refuse(model, out, "config.json")


@pytest.mark.parametrize("field,value", [
    ("architectures", "BitnetForCausalLM"), ("architectures", [["BitnetForCausalLM"]]), ("architectures", [None]),
    ("hidden_size", 256.0), ("hidden_size", True), ("num_key_value_heads", 3), ("vocab_size", -1),
    ("tie_word_embeddings", "false"), ("rope_scaling", "linear"),
])
def test_config_fields_of_the_wrong_type_are_refused(model, out, field, value):
    rewrite_config(model, **{field: value})
    refuse(model, out, "config.json")


@pytest.mark.parametrize("which", ["MODEL", "-o", "--workdir"])
def test_paths_that_are_not_utf8_are_refused_before_any_work(model, out, tmp_path, which):
    odd = os.fsdecode(b"odd\xff\xfename")  # what Python makes of such bytes in argv
    if which == "MODEL":
        moved = tmp_path / "src" / odd
        os.replace(model, moved)
        model = moved
        refuse(model, out, "MODEL", "UTF-8", watch=[tmp_path / "src", out.parent])
    elif which == "-o":
        refuse(model, out.with_name(odd + ".gguf"), "-o", "UTF-8", watch=[model, out.parent])
    else:
        refuse(model, out, "--workdir", "UTF-8", workdir=tmp_path / odd, watch=[model, out.parent, tmp_path])


@functools.lru_cache(maxsize=None)
def read_only_mounts_work() -> bool:
    probe = "d=$(mktemp -d) && mount --bind $d $d && mount -o remount,ro,bind $d && ! touch $d/x 2>/dev/null"
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


def run_with_read_only(directory: Path, *args) -> subprocess.CompletedProcess:
    """Run the command line with `directory` mounted read-only (in a mount namespace of its own:
    as root, permissions would not refuse anything)."""
    command = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "pipeline", *args))
    script = (f"mount --bind {shlex.quote(str(directory))} {shlex.quote(str(directory))} && "
              f"mount -o remount,ro,bind {shlex.quote(str(directory))} && exec {command}")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("case", ["new-workdir", "output-directory", "existing-run", "checkpoint"])
def test_read_only_places_are_refused_in_one_line(model, tmp_path, case):
    if not read_only_mounts_work():
        pytest.skip("no mount namespaces here")
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    if case == "existing-run":
        convert(model, rw / "first.gguf", "--workdir", ro / "run")
    args = {"new-workdir": ["-o", rw / "a.gguf", "--workdir", ro / "new"],
            "output-directory": ["-o", ro / "a.gguf", "--workdir", rw / "w"],
            "existing-run": ["-o", rw / "b.gguf", "--workdir", ro / "run"],
            "checkpoint": ["-o", rw / "c.gguf"]}[case]
    directory = model if case == "checkpoint" else ro
    before = tree(model, ro)
    proc = run_with_read_only(directory, "convert", model, *args, "--no-progress")
    if case == "checkpoint":  # the checkpoint is only read: a read-only one converts
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2, proc.stderr
    one_line(proc)
    assert_same(before, tree(model, ro))
    assert not [p for p in rw.iterdir() if p.name != "first.gguf" and not p.name.endswith(".work")]


# == 11. absurd sizes: refused quickly, in bounded memory ========================================

@pytest.mark.parametrize("field,value", [("num_hidden_layers", 1_000_000_000), ("num_hidden_layers", 10**7),
                                         ("intermediate_size", 10**12), ("vocab_size", 10**11),
                                         ("num_attention_heads", 2**40), ("hidden_size", 2**62)])
def test_absurd_sizes_are_refused_quickly_in_bounded_memory(model, out, field, value):
    from tests.peak_rss import run_measuring_peak

    rewrite_config(model, **{field: value})
    before = tree(model, out.parent)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = run_measuring_peak([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out), "--no-progress"],
                           env=env)
    assert r["exit"] == 2, r
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR) and field in lines[0] and "config.json" in lines[0], \
        r["stderr"]
    assert r["seconds"] < 10, r
    assert r["peak"] < 300 * 1024**2, r
    assert_same(before, tree(model, out.parent))


def test_a_huge_safetensors_header_is_refused_within_the_memory_limit(model, out):
    """A 20 MiB header of junk entries would take ~250 MiB to parse: more than 512MiB's share for headers."""
    path = model / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    junk = ", ".join(f'"junk.{i}": {{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}' for i in range(300_000))
    write_header_bytes(path, (json.dumps(header)[:-1] + ", " + junk + "}").encode())
    from tests.peak_rss import run_measuring_peak

    before = tree(model, out.parent)
    r = run_measuring_peak([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out), "--no-progress",
                            "--memory-limit", "512MiB"], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r["exit"] == 2, r
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and "model.safetensors" in lines[0] and "--memory-limit" in lines[0], r["stderr"]
    assert r["peak"] < 300 * 1024**2 and r["seconds"] < 10, r
    assert_same(before, tree(model, out.parent))


# == 12. header values refused before any work ===================================================

@pytest.mark.parametrize("family,field,value", [
    ("1bitllm", "max_position_embeddings", 2**32),
    ("1bitllm", "max_position_embeddings", -1),
    ("1bitllm", "max_position_embeddings", 2048.5),
    ("1bitllm", "rope_theta", 1e39),
    ("1bitllm", "rope_theta", float("nan")),
    ("1bitllm", "rope_theta", float("inf")),
    ("1bitllm", "rope_theta", -10000.0),
    ("1bitllm", "rope_theta", 0),
    ("1bitllm", "rope_theta", "10000"),
    ("1bitllm", "rms_norm_eps", -1e-5),
    ("1bitllm", "rms_norm_eps", 0.0),
    ("1bitllm", "rms_norm_eps", float("nan")),
    ("1bitllm", "rms_norm_eps", True),
    ("llama3-1.58", "rope_theta", 1e39),
    ("llama3-1.58", "max_position_embeddings", 2**32),
    ("2b4t", "rms_norm_eps", -1e-6),
    ("2b4t", "rope_theta", float("-inf")),
])
def test_header_values_that_cannot_be_written_are_refused_before_any_work(fresh, out, family, field, value):
    model = fresh(family)
    rewrite_config(model, **{field: value})  # json.dumps writes NaN / Infinity as JSON5-style literals
    refuse(model, out, "config.json", field)


@pytest.mark.parametrize("length,extra", [(250, ()), (240, ()), (224, ("--split-max-tensors", "3"))])
def test_an_output_name_too_long_for_its_temporary_name_is_refused_before_any_work(model, tmp_path, length, extra):
    out = tmp_path / "o" / ("n" * (length - 5) + ".gguf")
    out.parent.mkdir()
    refuse(model, out, "-o", "too long", extra=extra, workdir=tmp_path / "w")


def test_a_workdir_name_too_long_is_refused(model, out, tmp_path):
    refuse(model, out, "--workdir", workdir=tmp_path / ("w" * 256))


# == 13. one-line refusals, status, FIFOs =======================================================

@pytest.mark.parametrize("args", [
    ["convert", "--frobnicate"],
    ["convert", "-o", "x.gguf"],
    ["convert", "m", "--workers"],
    ["convert", "m", "--workers", "two"],
    ["convert", "m", "--cluster", "remote"],
    ["convert", "m", "--cluster", "local", "--scheduler", "tcp://a:1"],
    ["status"],
    ["frobnicate"],
    [],
    ["verify", "x.gguf"],
    ["inspect"],
])
def test_usage_errors_are_one_line(args, tmp_path):
    proc = run_cli(*args, check_exit=2, cwd=tmp_path)
    one_line(proc)
    assert "--help" in proc.stderr and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_status_polled_continuously_never_makes_a_conversion_refuse(model, out):
    """One thread runs `status` as a command, another asks what it asks (the manifest, whether the
    lock is held) in a tight loop, while 20 conversions start in the same run directory."""
    from pipeline.rundir import RunDir

    work = out.with_name("m.gguf.work")
    convert(model, out)
    stop = threading.Event()
    polls, asked = [], []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def poll():
        while not stop.is_set():
            p = subprocess.run([sys.executable, "-m", "pipeline", "status", work], env=env, capture_output=True,
                               text=True)
            polls.append(p.returncode)

    def ask():
        run = RunDir(work)
        while not stop.is_set():
            asked.append((bool(run.load()), run.is_locked()))
    threads = [threading.Thread(target=poll), threading.Thread(target=ask)]
    for t in threads:
        t.start()
    try:
        codes = []
        for _ in range(20):  # in this process, so they start often; each takes the lock
            proc = cli("convert", model, "-o", out, "--no-progress")
            codes.append((proc.returncode, proc.stderr[-300:]))
        while len(polls) < 3:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [c for c, _ in codes] == [0] * 20, [c for c in codes if c[0]]
    assert set(polls) == {0}, polls
    assert len(asked) > 100 and all(loaded for loaded, _ in asked)
    assert any(locked for _, locked in asked), "the asking never overlapped a conversion"


def test_status_works_on_a_read_only_run_directory_and_changes_nothing(model, out):
    work = out.with_name("m.gguf.work")
    convert(model, out)
    before = tree(work, out.parent)
    proc = run_cli("status", work)
    assert "assemble" in proc.stdout and "done" in proc.stdout
    json.loads(run_cli("status", work, "--json").stdout)
    assert_same(before, tree(work, out.parent))
    if not read_only_mounts_work():
        pytest.skip("cannot make a read-only mount here (no mount namespace)")
    ro = run_with_read_only(work, "status", work)
    assert ro.returncode == 0, ro.stderr
    assert "assemble" in ro.stdout and "done" in ro.stdout and ro.stderr == ""
    assert_same(before, tree(work, out.parent))


@pytest.mark.parametrize("command,args", [("status", []), ("status", ["--json"]), ("inspect", []),
                                          ("inspect", ["--plot", "PLOT"]), ("inspect", ["--json"]),
                                          ("inspect", ["blk.0.attn_q.weight"])])
def test_status_and_inspect_refuse_a_directory_that_is_not_a_run_of_ours(tmp_path, command, args):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text(json.dumps({"name": "my-web-app", "stages": [1, 2]}))
    args = [str(tmp_path / "p.png") if a == "PLOT" else a for a in args]
    before = tree(tmp_path)
    proc = cli(command, theirs, *args)
    assert proc.returncode == 2 and "not a bitnet-gguf run directory" in one_line(proc), proc
    assert proc.stdout == ""
    assert_same(before, tree(tmp_path))


@pytest.mark.parametrize("fifo", ["tokenizer.model", "config.json", "model.safetensors", "readme.fifo",
                                  "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"])
def test_a_fifo_among_the_checkpoints_files_is_refused_without_hanging(model, out, fifo):
    path = model / fifo
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    line = refuse(model, out, fifo, timeout=30)
    assert "regular file" in line or "FIFO" in line
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


def test_a_link_to_a_fifo_and_a_fifo_shard_are_refused_without_hanging(fresh, out, tmp_path):
    model = fresh("sharded", "linked")
    fifo = tmp_path / "elsewhere.fifo"
    os.mkfifo(fifo)
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(fifo)
    refuse(model, out, "tokenizer.json", timeout=30)
    model = fresh("sharded", "fifo-shard")
    shard = move_shard_into_subdirectory(model)
    shard.unlink()
    os.mkfifo(shard)
    refuse(model, out, shard.name, timeout=30)
