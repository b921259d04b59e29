"""The README's commands: `make convert` with and without MODEL."""
from __future__ import annotations

import json
import subprocess

import gguf

from tests.conftest import ROOT


def make(*args, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_make_convert_with_all_variables(checkpoint, tmp_path):
    model = checkpoint(dtype="bf16", shards=2)
    out = tmp_path / "made.gguf"
    work = tmp_path / "work"
    make("convert", f"MODEL={model}", f"OUT={out}", "TYPE=tq1_0", "MEM=1GiB", f"WORK={work}", "LOW_DISK=1")
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.file_type").contents() == 36
    assert (work / "manifest.json").is_file() and (work / "pack.zarr").is_dir()
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["options"]["low_disk"] and manifest["codes_consumed"]  # LOW_DISK=1 is --low-disk


def test_make_convert_without_model_converts_the_demo(tmp_path):
    out = tmp_path / "a dir with spaces" / "demo.gguf"
    out.parent.mkdir()
    make("convert", f"OUT={out}", f"WORK={tmp_path / 'work dir'}", "MEM=1 GiB", "TYPE=TQ2_0")
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.architecture").contents() == "bitnet"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.TQ2_0
