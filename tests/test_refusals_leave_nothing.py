"""A refusal leaves nothing it created, and plan refuses what convert refuses.

The disk is checked before the run directory is made, so a short disk leaves no `OUT.work/`,
no new `--workdir` (however deep) and an existing empty one as it was. `plan` runs convert's
checks of the run directory, the output side and the disk, and refuses with the same line.
"""
from __future__ import annotations

import json
import os
from collections import namedtuple

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.synthetic import write_bitnet_checkpoint

    return write_bitnet_checkpoint(tmp_path_factory.mktemp("refusals") / "model")


def tree(root) -> dict:
    """Every path under root (with the bytes of files), to compare before and after."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        found[os.path.relpath(dirpath, root)] = "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            found[os.path.relpath(p, root)] = open(p, "rb").read()
    return found


@pytest.mark.parametrize("command", ["convert", "plan"])
@pytest.mark.parametrize("workdir", ["default", "new and deep", "existing and empty"])
def test_a_short_disk_is_refused_leaving_nothing(model, tmp_path, monkeypatch, capsys, command, workdir):
    from pipeline import runner
    from pipeline.cli import main

    out = tmp_path / "m.gguf"
    extra = []
    if workdir == "new and deep":
        extra = ["--workdir", str(tmp_path / "a" / "b" / "work")]
    elif workdir == "existing and empty":
        (tmp_path / "work").mkdir()
        extra = ["--workdir", str(tmp_path / "work")]
    before = tree(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 4096, 4096))
    code = main([command, str(model), "-o", str(out), *extra, *(["--no-progress"] if command == "convert" else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "free, but this conversion needs about" in err, err
    assert tree(tmp_path) == before, "the refusal left something behind"


def plant(case: str, tmp_path, out):
    """Put in place what convert refuses; the options that point at it."""
    work = tmp_path / "work"
    if case == "foreign file in --workdir":
        work.mkdir()
        (work / "notes.txt").write_text("mine")
    elif case == "damaged manifest":
        work.mkdir()
        (work / "manifest.json").write_text(json.dumps({"tool": "bitnet-gguf", "version": 2,
                                                        "stages": {"extract": "done"}}))
    elif case == "directory at the temporary output name":
        from pipeline.output import temp_path

        temp_path(out, work).mkdir()
    elif case == "symbolic link in --workdir":
        work.mkdir()
        (work / "manifest.json").write_text(json.dumps({"tool": "bitnet-gguf", "version": 2, "stages": {}}))
        os.symlink(tmp_path, work / "plan.json")
    return ["--workdir", str(work)]


@pytest.mark.parametrize("case", ["foreign file in --workdir", "damaged manifest",
                                  "directory at the temporary output name", "symbolic link in --workdir"])
def test_plan_refuses_what_convert_refuses(model, tmp_path, case):
    out = tmp_path / "m.gguf"
    options = plant(case, tmp_path, out)
    before = tree(tmp_path)
    lines = {}
    for command in ("plan", "convert"):
        proc = run_cli(command, model, "-o", out, *options, check_exit=2)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bitnet-gguf: error: "), proc.stderr
        assert not proc.stdout, f"{command} printed a plan it refuses: {proc.stdout[:200]}"
        lines[command] = proc.stderr
        assert tree(tmp_path) == before, f"{command}'s refusal changed what was there"
    assert lines["plan"] == lines["convert"]
