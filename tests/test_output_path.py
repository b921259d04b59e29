"""What would stop the GGUF from appearing at the output path is refused before any work.

A directory at the temporary name (`.NAME.<tag>.partial`, of a single file or of any part of a
split set) used to be found only after every stage ran; another user's GGUF at the output path
in a sticky directory (mode 1777, like /tmp) failed at the final rename. Both are now one line,
exit 2, with nothing created, and the thing in the way is left as it was.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import run_cli
from tests.test_hostile_inputs import as_nobody, nobody_python

OTHER_UID = 65533  # owns the GGUF in the way; the converter runs as 65534 (nobody)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.synthetic import write_bitnet_checkpoint

    return write_bitnet_checkpoint(tmp_path_factory.mktemp("output") / "model")


def one_line(proc) -> str:
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip()


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("command", ["convert", "plan"])
def test_a_directory_at_a_temporary_output_name_is_refused_up_front(model, tmp_path, parts, command):
    from pipeline.output import final_paths, temp_path

    out, work = tmp_path / "m.gguf", tmp_path / "m.gguf.work"
    split = ["--split-max-tensors", "10"] if parts > 1 else []
    finals = final_paths(out, parts)
    blocked = temp_path(finals[-1], work)
    blocked.mkdir()
    (blocked / "keep").write_text("mine")
    proc = run_cli(command, model, "-o", out, *split, check_exit=2)
    line = one_line(proc)
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


def test_another_users_gguf_in_a_sticky_directory_is_refused_up_front(model, sticky_dir):
    if why := nobody_python()[2]:
        pytest.skip(why)
    from pathlib import Path

    d = Path(sticky_dir)
    shutil.copytree(model, d / "model")
    for p in [d / "model", *(d / "model").rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    out = d / "m.gguf"
    theirs = b"GGUF" + bytes(60)  # a GGUF by its magic: without the sticky bit it would be replaced
    out.write_bytes(theirs)
    os.chown(out, OTHER_UID, OTHER_UID)
    os.chmod(out, 0o666)  # writable by all: only the sticky bit stands in the way
    proc = as_nobody(d / "model", out)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc)
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
