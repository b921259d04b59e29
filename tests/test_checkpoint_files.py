"""The checkpoint's files when they are not what they claim: corrupt safetensors headers and
indexes, FIFOs and links to them, files the user cannot read.

Each is refused in one line naming the file (exit 2, nothing written, the checkpoint as it was),
within seconds and without reading outside the checkpoint: headers with bad offsets, entries or
nesting, a tensor named twice or in two shards, an index whose weight_map is malformed or points
outside the checkpoint, a header too large for the memory limit, a FIFO where a file should be,
unreadable files and shard directories (run as an unprivileged user).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.hostile import (as_nobody, assert_same, move_shard_into_subdirectory, nobody_python, one_line, refuse,
                           set_json_keys, tree)
from tests.test_bad_input import edit_safetensors
from tests.hostile import fresh, model, out, pristine, shared_dir  # noqa: F401 (fixtures)


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


def header_of(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])


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
    header = header_of(path)
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


def test_a_huge_safetensors_header_is_refused_within_the_memory_limit(model, out):
    """A 20 MiB header of junk entries would take ~250 MiB to parse: more than 512MiB's share for headers."""
    path = model / "model.safetensors"
    header = header_of(path)
    junk = ", ".join(f'"junk.{i}": {{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}' for i in range(300_000))
    write_header_bytes(path, (json.dumps(header)[:-1] + ", " + junk + "}").encode())
    from tests.peak_rss import run_measuring_peak

    before = tree(model, out.parent)
    r = run_measuring_peak([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out), "--no-progress",
                            "--memory-limit", "512MiB"], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r["exit"] == 2, r
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and "model.safetensors" in lines[0] and "--memory-limit" in lines[0], r["stderr"]
    assert r["peak"] < 300 * 1024**2 and r["cpu"] < 10, r
    assert_same(before, tree(model, out.parent))


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


def shard_in(model: Path, sub: str) -> Path:
    """Move model.safetensors into a subdirectory, with an index naming it there."""
    header_len = int.from_bytes((model / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((model / "model.safetensors").read_bytes()[8:8 + header_len])
    (model / sub).mkdir()
    (model / "model.safetensors").rename(model / sub / "model.safetensors")
    weight_map = {k: f"{sub}/model.safetensors" for k in header if k != "__metadata__"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model / sub


@pytest.mark.parametrize("kind,what", [("bpe", "tokenizer.json"), ("bpe", "tokenizer_config.json"),
                                       ("spm", "added_tokens.json"), ("spm", "config.json"),
                                       ("bpe", "chat_template.jinja"), ("spm", "shard directory 000"),
                                       ("spm", "shard directory 666")])
def test_unreadable_files_and_unsearchable_shard_directories_are_refused(pristine, shared_dir, kind, what):
    if why := nobody_python()[2]:
        pytest.skip(why)
    model = shared_dir / "model"
    shutil.copytree(pristine[kind], model)
    if what == "added_tokens.json":
        (model / what).write_text("{}")
    if what == "chat_template.jinja":
        set_json_keys(model / "tokenizer_config.json", chat_template=...)
        (model / what).write_text("{{ x }}")
    for p in [model, *model.rglob("*")]:
        os.chmod(p, 0o777 if p.is_dir() else 0o666)
    if what.startswith("shard directory"):
        sub = shard_in(model, "sub")
        os.chmod(model / "model.safetensors.index.json", 0o666)
        os.chmod(sub, int(what.split()[-1], 8))
        name = "sub"
    else:
        os.chmod(model / what, 0)
        name = what
    (shared_dir / "out").mkdir(mode=0o777)
    os.chmod(shared_dir / "out", 0o777)
    out = shared_dir / "out" / "m.gguf"
    proc = as_nobody(model, out)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc)
    assert name in line and "PermissionError" not in line, line
    assert not out.exists() and not (shared_dir / "out" / "m.gguf.work").exists()
