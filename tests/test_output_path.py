"""The output path: what is there, what would stop the GGUF from appearing there, and a finished
output that changed.

Whatever is at the output (a device, a FIFO, a link, a directory, at any part of a split set) is
refused before any work and left as it was; one that turns into a FIFO during the run is not
replaced, and a split set appears whole or not at all. A directory at the temporary name
(`.NAME.<tag>.partial`, of a single file or of any part of a split set) used to be found only
after every stage ran; another user's GGUF at the output path in a sticky directory (mode 1777,
like /tmp) failed at the final rename. Names too long for the temporary name or for the files made
beside the output are refused naming the option. Each is one line, exit 2, with nothing created.
A finished output that changed with its mtime restored (a flipped byte, another GGUF of the same
size) is written again by a rerun, not taken as "already done".
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import convert, run_cli
from tests.hostile import UP, as_nobody, describe, nobody_python, partials, refuse, set_values
from tests.hostile import fresh, model, out, pristine  # noqa: F401 (fixtures)

OTHER_UID = 65533  # owns the GGUF in the way; the converter runs as 65534 (nobody)


@pytest.fixture(scope="module")
def bitnet_model(tmp_path_factory):
    from tests.synthetic import write_bitnet_checkpoint

    return write_bitnet_checkpoint(tmp_path_factory.mktemp("output") / "model")


def single_line(proc) -> str:
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip()


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("command", ["convert", "plan"])
def test_a_directory_at_a_temporary_output_name_is_refused_up_front(bitnet_model, tmp_path, parts, command):
    from pipeline.output import final_paths, temp_path

    out, work = tmp_path / "m.gguf", tmp_path / "m.gguf.work"
    split = ["--split-max-tensors", "10"] if parts > 1 else []
    finals = final_paths(out, parts)
    blocked = temp_path(finals[-1], work)
    blocked.mkdir()
    (blocked / "keep").write_text("mine")
    proc = run_cli(command, bitnet_model, "-o", out, *split, check_exit=2)
    line = single_line(proc)
    assert str(blocked) in line and "is a directory" in line, line
    assert not work.exists(), "the refusal made the run directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == [blocked.name]
    assert (blocked / "keep").read_text() == "mine"


@pytest.fixture
def sticky_dir():
    """A /tmp-like directory: mode 1777, owned by root."""
    import tempfile

    d = tempfile.mkdtemp(prefix="bitnet-gguf-sticky-", dir="/tmp")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_another_users_gguf_in_a_sticky_directory_is_refused_up_front(bitnet_model, sticky_dir):
    if why := nobody_python()[2]:
        pytest.skip(why)
    from pathlib import Path

    d = Path(sticky_dir)
    shutil.copytree(bitnet_model, d / "model")
    for p in [d / "model", *(d / "model").rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    out = d / "m.gguf"
    theirs = b"GGUF" + bytes(60)  # a GGUF by its magic: without the sticky bit it would be replaced
    out.write_bytes(theirs)
    os.chown(out, OTHER_UID, OTHER_UID)
    os.chmod(out, 0o666)  # writable by all: only the sticky bit stands in the way
    proc = as_nobody(d / "model", out)
    assert proc.returncode == 2, proc.stderr
    line = single_line(proc)
    assert str(out) in line and "another user" in line and "sticky" in line, line
    assert out.read_bytes() == theirs and os.stat(out).st_uid == OTHER_UID
    assert sorted(p.name for p in d.iterdir()) == ["m.gguf", "model"], "the refusal left something behind"


def test_the_sticky_rule_is_what_the_system_enforces(sticky_dir):
    """The refusal above is not overcautious: as nobody, the rename over the other user's file
    in that directory fails (EPERM), and over nobody's own file it works."""
    if why := nobody_python()[2]:
        pytest.skip(why)
    from pathlib import Path

    d = Path(sticky_dir)
    for name, owner in (("theirs", OTHER_UID), ("own", 65534)):
        (d / name).write_bytes(b"x")
        os.chown(d / name, owner, owner)
    cmd, _, _ = nobody_python()
    script = ("import os, sys\n"
              "d = sys.argv[1]\n"
              "for name in ('theirs', 'own'):\n"
              "    open(os.path.join(d, 'new-' + name), 'wb').close()\n"
              "    try:\n"
              "        os.replace(os.path.join(d, 'new-' + name), os.path.join(d, name)); print(name, 'ok')\n"
              "    except PermissionError:\n"
              "        print(name, 'refused')\n")
    done = subprocess.run([*cmd, "-c", script, str(d)], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.stdout.split("\n")[:2] == ["theirs refused", "own ok"], done.stdout + done.stderr


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


@pytest.mark.parametrize("length,extra", [(250, ()), (240, ()), (224, ("--split-max-tensors", "3"))])
def test_an_output_name_too_long_for_its_temporary_name_is_refused_before_any_work(model, tmp_path, length, extra):
    out = tmp_path / "o" / ("n" * (length - 5) + ".gguf")
    out.parent.mkdir()
    refuse(model, out, "-o", "too long", extra=extra, workdir=tmp_path / "w")


def deep_directory(root: Path, total: int) -> Path:
    """A directory whose absolute path is `total` bytes long (made of 200-byte names)."""
    path = str(root)
    while len(path) < total - 210:
        path += "/" + "d" * 200
    path += "/" + "e" * (total - len(path) - 1)
    os.makedirs(path)
    return Path(path)


@pytest.mark.parametrize("total,workdir", [(4080, False), (4080, True), (4050, False), (4000, False)])
def test_an_output_directory_path_too_long_for_the_files_made_there_is_refused(fresh, tmp_path, total, workdir):
    model = fresh("spm")
    out = deep_directory(tmp_path / "long", total) / "m.gguf"
    line = refuse(model, out, "too long", workdir=tmp_path / "w" if workdir else None)
    assert ("-o" in line) if total > 4060 or workdir else ("--workdir" in line)


def _flip_keeping_mtime(path: Path, offset: int) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_keeping_mtime(path: Path, content: bytes) -> None:
    st = os.stat(path)
    tmp = path.with_name("other.tmp")
    tmp.write_bytes(content)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)


@pytest.mark.parametrize("how", ["flip a tensor byte", "flip a header byte", "another gguf of the same size",
                                 "zeros after the magic"])
def test_a_changed_output_with_its_mtime_restored_is_written_again(fresh, out, how):
    model = fresh("llama3-1.58")
    convert(model, out)
    clean = out.read_bytes()
    if how == "flip a tensor byte":
        _flip_keeping_mtime(out, len(clean) - 100)
    elif how == "flip a header byte":
        _flip_keeping_mtime(out, 40)
    elif how == "another gguf of the same size":  # converted from another checkpoint, same shapes
        other = fresh("llama3-1.58", name="other")
        set_values(other / "model.safetensors", UP, lambda v: v * np.float32(2))
        convert(other, out.parent / "o.gguf", "--workdir", out.parent / "w-other")
        content = (out.parent / "o.gguf").read_bytes()
        assert len(content) == len(clean) and content != clean
        _replace_keeping_mtime(out, content)
    else:
        _replace_keeping_mtime(out, b"GGUF" + bytes(len(clean) - 4))  # a GGUF by its magic, so no --force
    assert out.read_bytes() != clean and out.stat().st_size == len(clean)
    rerun = convert(model, out)
    assert "assemble: already done" not in rerun.stderr
    assert out.read_bytes() == clean
    if how == "flip a tensor byte":  # and an unchanged output still is "already done"
        assert "assemble: already done" in convert(model, out).stderr


def test_a_changed_part_of_a_split_set_is_written_again(fresh, out):
    model = fresh("llama3-1.58")
    convert(model, out, "--split-max-tensors", "4")
    parts = sorted(out.parent.glob("m-*-of-*.gguf"))
    assert len(parts) == 3
    clean = [p.read_bytes() for p in parts]
    _flip_keeping_mtime(parts[1], parts[1].stat().st_size - 10)
    rerun = convert(model, out, "--split-max-tensors", "4")
    assert "assemble: already done" not in rerun.stderr
    assert [p.read_bytes() for p in parts] == clean
