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


def test_a_library_install_note_is_not_printed_above_the_one_line(tmp_path):
    """numcodecs 0.16.4+ warns at import, with a filter of its own that shows the warning, when the
    `crc32c` package (zarr 3.1.0-3.1.2's dependency) is installed instead of google_crc32c: seen
    with pyproject's lowest versions. Here a `crc32c` module is put on the path and google_crc32c
    hidden from the lookup numcodecs makes (newer zarr imports it itself), in a fresh interpreter;
    the refusal must still be its one line."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    (tmp_path / "crc32c.py").write_text("def crc32c(data, value=0):\n    return 0\n")
    script = (
        "import sys, importlib.util\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'google_crc32c' else find(name, *a)\n"
        "from pipeline.cli import main\n"
        "sys.exit(main(['convert', 'someorg/not-there', '--no-progress']))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    one_line(proc)
    assert proc.stderr.startswith("bitnet-gguf: error: someorg/not-there")
