"""Refusals are one line, also for a model id from the Hugging Face cache and for paths with line
breaks in them (issue 21): the `model org/m: <snapshot> (Hugging Face cache ...)` line used to come
before every refusal, and a directory named with a newline split a message in two.

The line naming the snapshot is still logged, first, when the command goes on to do its work.
"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.synthetic import write_checkpoint
from tests.test_hub import add_snapshot

REV = "c" * 40


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ids") / "m", "1bitllm", hidden_size=256,
                            intermediate_size=512, num_layers=1, num_heads=4)


@pytest.fixture
def cache(pristine, tmp_path, monkeypatch):
    """org/m in a cache of its own: returns a function that adds (or replaces) a file of the snapshot."""
    root = tmp_path / "hub"
    snap = add_snapshot(root, "org/m", REV, {p.name: p.read_bytes() for p in pristine.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)

    def put(name: str, data: bytes) -> None:
        (snap / name).unlink(missing_ok=True)
        (snap / name).write_bytes(data)
    put.snapshot = snap
    return put


def run(argv, capsys) -> tuple[int, str, str]:
    from pipeline.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str) -> str:
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("bitnet-gguf: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["convert", "plan", "vocab-only"])
@pytest.mark.parametrize("damage", ["type", "memory", "tokenizer", "config", "metadata", "embedding-type"])
def test_every_refusal_of_a_cached_model_id_is_one_line(cache, tmp_path, capsys, command, damage):
    argv = {"convert": ["convert"], "plan": ["plan"], "vocab-only": ["convert", "--vocab-only"]}[command]
    argv = [*argv, "org/m", "-o", tmp_path / "out.gguf", "--no-progress"] if command != "plan" else \
        [*argv, "org/m", "-o", tmp_path / "out.gguf"]
    if damage == "type":
        argv += ["--type", "tq9"]
    elif damage == "memory":
        argv += ["--memory-limit", "1KiB"]
    elif damage == "embedding-type":
        argv += ["--embedding-type", "q4_k"]
    elif damage == "metadata":
        argv += ["--metadata", tmp_path / "missing.json"]
    elif damage == "tokenizer":
        cache("tokenizer.json", b"[1, 2]")
    elif damage == "config":
        config = json.loads((cache.snapshot / "config.json").read_text())
        cache("config.json", json.dumps({**config, "vocab_size": "many"}).encode())
    code, out, err = run(argv, capsys)
    line = assert_one_line(code, err)
    assert "model org/m" not in line
    assert not (tmp_path / "out.gguf").exists()


def test_the_snapshot_line_comes_first_when_the_work_starts(cache, tmp_path, capsys):
    code, out, err = run(["convert", "org/m", "-o", tmp_path / "out.gguf", "--no-progress"], capsys)
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0] == f"model org/m: {cache.snapshot} (Hugging Face cache ({cache.snapshot.parents[2]}, revision {REV}))"
    assert sum(line.startswith("model org/m") for line in lines) == 1
    code, out, err = run(["plan", "org/m", "-o", tmp_path / "out.gguf"], capsys)
    assert code == 0 and err.splitlines() == [lines[0]] and out.strip()
    code, out, err = run(["convert", "--vocab-only", "org/m", "-o", tmp_path / "v.gguf"], capsys)
    assert code == 0 and err.splitlines()[0] == lines[0] and len(err.splitlines()) == 2


NAMES = ["m\nx", "m\r\nx", "m\x1b[31mx", "m\u2028x", "m\tx"]


@pytest.mark.parametrize("name", NAMES, ids=["newline", "crlf", "escape", "line-separator", "tab"])
def test_a_directory_name_with_a_line_break_is_escaped_in_the_one_line(pristine, tmp_path, capsys, name):
    model = shutil.copytree(pristine, tmp_path / name)
    (model / "config.json").unlink()
    code, out, err = run(["convert", model, "-o", tmp_path / "out.gguf"], capsys)
    line = assert_one_line(code, err)
    assert "config.json" in line and all(c not in line for c in name if not c.isprintable())
    escaped = name.encode("unicode_escape").decode("ascii")
    assert escaped in line


def test_a_conversion_from_such_a_directory_logs_one_line_per_message(pristine, tmp_path, capsys):
    model = shutil.copytree(pristine, tmp_path / "m\nx")
    code, out, err = run(["convert", model, "-o", tmp_path / "out.gguf", "--no-progress"], capsys)
    assert code == 0, err
    assert all(not line.startswith(("x", "\r")) for line in err.splitlines())
    assert "m\\nx" in err and (tmp_path / "out.gguf").stat().st_size > 0


def test_a_bad_option_value_with_a_line_break_is_one_line(pristine, tmp_path, capsys):
    code, err = None, None
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal
        run(["convert", pristine, "stray\narg"], capsys)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "stray\\narg" in err, err
    code, out, err = run(["convert", pristine, "-o", tmp_path / "o.gguf", "--type", "a\nb"], capsys)
    assert_one_line(code, err)
