"""The command line itself: usage errors and paths that are not UTF-8.

A usage error is one line pointing at --help, on stderr only, and writes nothing; a checkpoint,
output or work directory path whose bytes are not UTF-8 is refused before any work naming the
argument.
"""
from __future__ import annotations

import os

import pytest

from tests.conftest import run_cli
from tests.hostile import one_line, refuse
from tests.hostile import fresh, model, out, pristine  # noqa: F401 (fixtures)


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
