"""A manifest.json of ours whose content is malformed (a hand edit, a damaged disk) is refused as damage.

Every value the runner, status and inspect read must have its type; anything else is one line
naming manifest.json and saying to delete the run directory (as a damaged checksum record is),
never an AttributeError, and nothing in the run directory or at the output changes.
"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import convert, run_cli


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from tests.synthetic import write_bitnet_checkpoint

    root = tmp_path_factory.mktemp("manifest")
    model = write_bitnet_checkpoint(root / "model")
    out, work = root / "m.gguf", root / "work"
    convert(model, out, "--workdir", work)
    return model, out, work


EDITS = {
    "a stage as a string": lambda m: m["stages"].update(extract="done"),
    "stages as a list": lambda m: m.update(stages=["extract"]),
    "a state that is no state": lambda m: m["stages"]["quantize"].update(state=5),
    "a key that is not text": lambda m: m["stages"]["pack"].update(key=None),
    "outputs as text": lambda m: m["stages"]["assemble"].update(outputs="m.gguf"),
    "seconds as text": lambda m: m["stages"]["extract"].update(seconds="fast"),
    "inputs as a list": lambda m: m["stages"]["pack"].update(inputs=[]),
    "an unknown stage": lambda m: m["stages"].update(polish={"key": "x", "state": "done"}),
    "options as text": lambda m: m.update(options="--type tq2_0"),
    "fingerprint as an object": lambda m: m.update(fingerprint={}),
}


def snapshot(*paths) -> dict:
    found = {}
    for root in paths:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            found[str(p)] = p.read_bytes() if p.is_file() else "dir"
    return found


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_malformed_manifest_is_refused_in_one_line(finished, tmp_path, edit):
    model, out, work = finished
    copy, copy_out = tmp_path / "work", tmp_path / "m.gguf"
    shutil.copytree(work, copy)
    shutil.copy2(out, copy_out)
    manifest = json.loads((copy / "manifest.json").read_text())
    EDITS[edit](manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(copy, copy_out)
    commands = [("convert", model, "-o", copy_out, "--workdir", copy, "--no-progress")]
    if edit == "a stage as a string":  # status and inspect read the same manifest
        commands += [("status", copy), ("inspect", copy)]
    for args in commands:
        proc = run_cli(*args, check_exit=2)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, f"{args[0]}: {proc.stderr}"
        assert str(copy / "manifest.json") in lines[0] or "manifest.json" in lines[0], lines[0]
        assert "damaged" in lines[0] and "delete the run directory" in lines[0], lines[0]
        assert snapshot(copy, copy_out) == before, f"{args[0]} changed the run directory or the output"
