"""--memory-limit holds for --vocab-only too, and a limit no conversion fits under is refused as an
option (issue 21: a 2^24-row vocabulary took 4368 MiB under --memory-limit 1GiB, exit 0; 1KiB was
accepted), and a vocabulary, tokenizer.json or config.json the limit cannot hold is refused before it
is read, naming the file and the limit that would do. Peaks are of the whole process tree (tests/peak_rss.py), as in tests/test_memory.py.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.hostile import ERROR, assert_same, tree
from tests.peak_rss import run_measuring_peak
from tests.synthetic import write_checkpoint
from tests.test_bad_input import rewrite_config
from tests.hostile import fresh, out, pristine  # noqa: F401 (fixtures)

MiB = 1024**2
SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab-memory")
    return {"spm": write_checkpoint(root / "spm", "1bitllm", **SHAPE),
            "bpe": write_checkpoint(root / "bpe", "llama3-1.58", **SHAPE, num_kv_heads=2)}


def with_vocab_size(model, tmp_path, rows: int):
    """A copy of the checkpoint whose config.json says `rows` token rows (--vocab-only reads no
    weights, so the embedding is left as it is)."""
    import shutil

    copy = shutil.copytree(model, tmp_path / f"{model.name}-{rows}")
    config = json.loads((copy / "config.json").read_text())
    config["vocab_size"] = rows
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def measured(*args) -> dict:
    return run_measuring_peak([sys.executable, "-m", "pipeline", *map(str, args)],
                              env={**os.environ, "PYTHONPATH": str(ROOT)})


def single_line(r: dict) -> str:
    lines = r["stderr"].strip().splitlines()
    assert r["exit"] == 2 and len(lines) == 1 and lines[0].startswith("bitnet-gguf: error: "), r
    return lines[0]


def allowed(line: str) -> int:
    """The limit a refusal names ("allow at least 544MiB" or "allow at least 144.0 MiB"), in bytes."""
    m = re.search(r"allow at least ([0-9.]+) ?MiB", line)
    assert m, line
    return int(float(m.group(1)) * MiB)


def test_a_vocabulary_the_limit_cannot_hold_is_refused_before_it_is_read(models, tmp_path):
    model = with_vocab_size(models["spm"], tmp_path, 2**24)
    out = tmp_path / "out" / "v.gguf"
    out.parent.mkdir()
    r = measured("convert", model, "--vocab-only", "-o", out, "--no-progress", "--memory-limit", "1GiB")
    line = single_line(r)
    for needle in (f"{model / 'config.json'}: vocab_size {2**24}", "tokenizer.model", "--memory-limit 1.0 GiB"):
        assert needle in line, (needle, line)
    assert allowed(line) > 4368 * MiB  # what reading it took before it was refused
    assert r["peak"] <= 1024 * MiB, f"peak {r['peak'] / MiB:.0f} MiB"
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_a_large_vocabulary_converts_under_the_limit_the_refusal_names(models, tmp_path, kind):
    """2^18 rows: refused under 200MiB; under the limit that refusal names it is written, and the
    whole process tree stays under that limit."""
    model = with_vocab_size(models[kind], tmp_path, 2**18)
    out = tmp_path / "v.gguf"
    refusal = single_line(measured("convert", model, "--vocab-only", "-o", out, "--no-progress", "--memory-limit",
                                "200MiB"))
    assert f"vocab_size {2**18}" in refusal and not out.exists()
    limit = allowed(refusal)
    r = measured("convert", model, "--vocab-only", "-o", out, "--no-progress", "--memory-limit", limit)
    assert r["exit"] == 0, r["stderr"]
    print(f"{kind}: peak {r['peak'] / MiB:.0f} MiB under --memory-limit {limit / MiB:.0f} MiB")
    assert r["peak"] <= limit
    from tests.gguf_kv import read_kv

    # gguf-py's reading (tests/gguf_kv.py, held equal to GGUFReader's: that takes 24 s of CPU on 2^18 strings)
    assert len(read_kv(out)["tokenizer.ggml.tokens"]) == 2**18


def run(argv, capsys) -> tuple[int, str]:
    from pipeline.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", [("convert",), ("convert", "--vocab-only"), ("plan",)])
@pytest.mark.parametrize("limit", ["1KiB", "1", "64MiB"])
def test_a_limit_below_any_conversion_is_one_line_naming_the_option_and_the_minimum(models, tmp_path, capsys,
                                                                                    command, limit):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = run([*command, models["spm"], "-o", out_dir / "m.gguf", "--memory-limit", limit], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("bitnet-gguf: error: --memory-limit "), err
    assert "allow at least" in lines[0]
    assert list(out_dir.iterdir()) == []


def test_verify_and_presets_take_the_same_floor(models, tmp_path, capsys):
    code, err = run(["verify", tmp_path / "missing.gguf", models["spm"], "--memory-limit", "1KiB"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--memory-limit 1.0 KiB" in err and "allow at least" in err, err
    preset = tmp_path / "tiny.toml"
    preset.write_text('memory_limit = "1KiB"\n')
    code, err = run(["plan", models["spm"], "-o", tmp_path / "m.gguf", "--config", preset], capsys)
    assert code == 2 and err.count("\n") == 1 and "--memory-limit 1.0 KiB" in err, err


def test_the_floor_is_what_a_conversion_really_needs_at_least(models, tmp_path):
    """The minimum the option refusal names is not more than a conversion needs: at that limit the
    refusal (if any) is the measured one, naming a larger limit, under which the smallest
    conversion then runs, the whole process tree under it."""
    out = tmp_path / "m.gguf"
    floor = allowed(single_line(measured("convert", models["spm"], "-o", out, "--no-progress", "--memory-limit", "1KiB")))
    below = single_line(measured("convert", models["spm"], "-o", out, "--no-progress", "--memory-limit", floor - 1))
    assert "too small for any conversion" in below and allowed(below) == floor
    for command in (("convert",), ("convert", "--vocab-only")):
        r = measured(*command, models["spm"], "-o", out, "--no-progress", "--memory-limit", floor)
        limit = floor
        if r["exit"] != 0:
            line = single_line(r)
            assert "too small for any conversion" not in line and allowed(line) > floor, line
            limit = allowed(line)
            r = measured(*command, models["spm"], "-o", out, "--no-progress", "--memory-limit", limit)
        assert r["exit"] == 0, r["stderr"]
        assert r["peak"] <= limit, f"{command}: peak {r['peak'] / MiB:.0f} MiB over {limit / MiB:.0f} MiB"
        out.unlink()


def widen_vocab(model: Path, vocab_size: int) -> None:
    """Make config.json's vocab_size and the embedding (and lm_head) `vocab_size` rows; the new
    tensor bytes are a hole in a sparse file (zeros)."""
    path = model / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}
    pos, pieces = 0, []
    for name in sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]):
        info = header[name]
        b, e = info["data_offsets"]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            info["shape"] = [vocab_size, info["shape"][1]]
            size, chunk = vocab_size * info["shape"][1] * itemsize[info["dtype"]], None
        else:
            size, chunk = e - b, data[b:e]
        pieces.append((pos, chunk))
        info["data_offsets"] = [pos, pos + size]
        pos += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        start = f.tell()
        for at, chunk in pieces:
            if chunk is not None:
                f.seek(start + at)
                f.write(chunk)
        f.truncate(start + pos)
    rewrite_config(model, vocab_size=vocab_size)


def add_vocabulary(model: Path, extra: int) -> int:
    """`extra` more entries in tokenizer.json's BPE vocabulary (added tokens renumbered after them);
    returns the tokenizer's size."""
    path = model / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    base = max(vocab.values()) + 1
    vocab.update({f"x{i:07d}": base + i for i in range(extra)})
    for token in data.get("added_tokens", []):
        if token["id"] >= base:
            token["id"] += extra
    path.write_text(json.dumps(data))
    return base + extra + len(data.get("added_tokens", []))


def convert_measuring(model: Path, out: Path, limit: str) -> dict:
    from tests.peak_rss import run_measuring_peak

    return run_measuring_peak([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out),
                               "--no-progress", "--memory-limit", limit], env={**os.environ, "PYTHONPATH": str(ROOT)})


def refused_within(r: dict, limit: int, *needles) -> str:
    lines = r["stderr"].strip().splitlines()
    assert r["exit"] == 2 and len(lines) == 1 and lines[0].startswith(ERROR), r
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert r["peak"] <= limit, f"peak {r['peak'] / MiB:.0f} MiB over the {limit / MiB:.0f} MiB limit"
    return lines[0]


@pytest.mark.parametrize("kind,rows", [("bpe", 1_000_000), ("spm", 1_000_000), ("bpe", 4_000_000)])
def test_a_wide_vocabulary_the_limit_cannot_hold_is_refused_before_it_is_read(fresh, out, kind, rows):
    """Was: 300-1850 MiB spent building the token table before the first stage, under 300MiB."""
    model = fresh(kind)
    widen_vocab(model, rows)
    before = tree(model, out.parent)
    r = convert_measuring(model, out, "300MiB")
    refused_within(r, 300 * MiB, "config.json", f"vocab_size {rows}", "--memory-limit", "allow at least")
    assert_same(before, tree(model, out.parent))


def test_a_huge_tokenizer_json_is_refused_before_it_is_read(fresh, out):
    model = fresh("bpe")
    size = add_vocabulary(model, 1_000_000)  # a 20 MB tokenizer.json: about 700 MiB to read
    widen_vocab(model, -(-size // 64) * 64)
    r = convert_measuring(model, out, "512MiB")
    refused_within(r, 512 * MiB, "tokenizer.json", "allow at least")
    assert not os.path.lexists(out) and not os.path.lexists(out.with_name("m.gguf.work"))


def test_a_huge_config_json_is_refused_without_reading_it(fresh, out):
    model = fresh("bpe")
    rewrite_config(model, notes="x" * (150 * 10**6))
    r = convert_measuring(model, out, "300MiB")
    refused_within(r, 300 * MiB, "config.json")


def test_a_large_vocabulary_the_limit_holds_converts_under_it(fresh, out):
    model = fresh("bpe")
    widen_vocab(model, 200_000)
    r = convert_measuring(model, out, "300MiB")
    assert r["exit"] == 0, r["stderr"]
    assert r["peak"] <= 300 * MiB, f"peak {r['peak'] / MiB:.0f} MiB"
