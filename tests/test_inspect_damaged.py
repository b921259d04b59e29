"""`inspect` of a run directory whose store or array zarr.json is damaged (issue 21: `inspect
--json`, `--codes` and `inspect WORKDIR TENSOR` failed with exit 1 and a JSONDecodeError).

What can still be read is shown, the damaged array (or store) is marked so, and stderr ends with
one line saying the run directory is damaged and naming the file: exit 2, as a conversion reports
a damaged store.
"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import convert
from tests.synthetic import write_checkpoint

DAMAGED_TENSOR = "blk.0.attn_q.weight"
OTHER_TENSOR = "blk.0.ffn_up.weight"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect-damaged")
    model = write_checkpoint(root / "m", "1bitllm", hidden_size=256, intermediate_size=512, num_layers=1,
                             num_heads=4)
    convert(model, root / "m.gguf", "--workdir", root / "work")
    return root / "work"


def inspect(args, capsys) -> tuple[int, str, str]:
    from pipeline.cli import main

    code = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def array_json(work, stage: str, name: str = DAMAGED_TENSOR):
    return work / f"{stage}.zarr" / name / "zarr.json"


def set_attribute(path, key, value) -> str:
    meta = json.loads(path.read_text())
    meta["attributes"][key] = value
    return json.dumps(meta)


# what replaces quantize.zarr/blk.0.attn_q.weight/zarr.json
DAMAGE = {
    "cut-json": lambda p: p.read_text()[:40],
    "empty": lambda p: "",
    "json-list": lambda p: "[1, 2]",
    "no-node-type": lambda p: "{}",
    "a-group": lambda p: json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}),
    "bad-shape": lambda p: json.dumps({**json.loads(p.read_text()), "shape": "many"}),
    "bad-dtype": lambda p: json.dumps({**json.loads(p.read_text()), "data_type": "float99"}),
    "scale-text": lambda p: set_attribute(p, "scale", "big"),
    "role-number": lambda p: set_attribute(p, "role", 3),
}

MODES = {"table": [], "json": ["--json"], "codes": ["--codes"], "codes-json": ["--codes", "--json"],
         "tensor": [DAMAGED_TENSOR], "tensor-json": [DAMAGED_TENSOR, "--json"], "tensor-codes": [DAMAGED_TENSOR, "--codes"]}


@pytest.fixture
def damaged(finished, tmp_path):
    def make(change) -> tuple:
        work = shutil.copytree(finished, tmp_path / "work")
        path = array_json(work, "quantize")
        path.write_text(change(path))
        return work, path
    return make


def test_the_undamaged_run_directory_inspects_with_exit_0(finished, capsys):
    for args in MODES.values():
        code, out, err = inspect([finished, *args], capsys)
        assert code == 0 and not err.strip(), err


def assert_one_damage_line(code: int, err: str, path) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith("bitnet-gguf: error: "), err
    assert "the run directory is damaged" in lines[-1] and str(path) in lines[-1], lines[-1]
    assert "delete it and convert again" in lines[-1]
    assert [line for line in lines if line.startswith("bitnet-gguf:")] == [lines[-1]], err
    return lines[-1]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_array_is_marked_and_the_rest_is_shown(damaged, capsys, kind, mode):
    work, path = damaged(DAMAGE[kind])
    args = MODES[mode]
    code, out, err = inspect([work, *args], capsys)
    assert_one_damage_line(code, err, path)
    if "--json" in args:
        report = json.loads(out)
        assert str(path) in report["damaged"][0]
        stores = report["stores"]
        entry = stores["quantize"] if DAMAGED_TENSOR in args else stores["quantize"]["tensors"][DAMAGED_TENSOR]
        assert entry["state"] == "damaged" and str(path) in entry["problem"]
        if DAMAGED_TENSOR in args:  # the other stores of the same tensor are there
            assert stores["extract"]["chunks_written"] == stores["extract"]["chunks"] > 0
            assert stores["pack"]["chunks_written"] > 0
        else:  # every other tensor of the store is described
            assert stores["quantize"]["tensors"][OTHER_TENSOR]["chunks"] == "1/1"
            if "--codes" in args:
                assert abs(sum(stores["quantize"]["tensors"][OTHER_TENSOR]["shares"].values()) - 1) < 1e-9
    else:
        assert f"damaged: {path}" in out
        if DAMAGED_TENSOR in args:
            assert "extract.zarr" in out and "pack.zarr" in out
        else:
            assert OTHER_TENSOR in out and ("-1/0/+1" in out) == ("--codes" in args)


def test_another_tensor_of_the_damaged_run_directory_inspects_cleanly(damaged, capsys):
    work, _ = damaged(DAMAGE["cut-json"])
    code, out, err = inspect([work, OTHER_TENSOR], capsys)
    assert code == 0 and not err.strip() and "quantize.zarr" in out


def test_a_damaged_store_is_named_and_the_other_stores_are_shown(finished, tmp_path, capsys):
    work = shutil.copytree(finished, tmp_path / "work")
    root = work / "pack.zarr" / "zarr.json"
    root.write_text("{")
    code, out, err = inspect([work, "--json"], capsys)
    assert_one_damage_line(code, err, root)
    report = json.loads(out)
    assert "pack" not in report["stores"] and report["stores"]["quantize"]["tensors"][DAMAGED_TENSOR]["chunks"]
    code, out, err = inspect([work], capsys)
    assert_one_damage_line(code, err, root)
    assert f"damaged store: {root}" in out


def test_the_plot_draws_the_rest_and_says_what_is_damaged(damaged, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    work, path = damaged(DAMAGE["cut-json"])
    figure = tmp_path / "f.png"
    code, out, err = inspect([work, "--plot", figure], capsys)
    assert_one_damage_line(code, err, path)
    assert figure.stat().st_size > 0
