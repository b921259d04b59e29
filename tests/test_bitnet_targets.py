"""Files for every bitnet.cpp build: I2_S for ARM (`--target arm`), TL1 and TL2 (`--kernel-config`).

Every ternary tensor of every family is decoded by tests/bitnet_layouts.py (written from
FORMATS.md and TL-FORMAT.md, not from our codecs) back to the effective weights that
tests/reference_model.py computes from the checkpoint, with the scale each family's
weight_scale rule gives (not 1.0 for packed 2B-4T, microsoft's TL mistake). TL bytes do
not depend on --memory-limit or --workers, a kill in pack and a rerun give the same file,
and kernel configs that cannot describe the model are refused in one line.
"""
from __future__ import annotations

import json
import platform
import shutil
import signal

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.gguf_file import read_gguf
from tests import kill_points as kp
from tests.bitnet_layouts import (decode_i2s_arm, decode_tl1, decode_tl2, kernel_config_text, test_tiles,
                                  tl2_payload)
from tests.conftest import ROOT, convert, run_cli
from tests.reference_model import effective_weights
from tests.synthetic import write_checkpoint
from tests.test_families import (CASES, FAMILY_FACTS, case_checkpoint, case_outputs, decode_i2s_reference, gguf_name,
                                 llama_permute)

TARGET_KEY = "bitnet_gguf.target"
FAMILY_CASES = ["1bitllm-f16", "llama3", "falcon3-head-dim", "2b4t", "2b4t-bf16-sharded"]


def ternary_shapes(model) -> list[tuple[int, int]]:
    return [w.shape for name, w in effective_weights(model).items()
            if w.ndim == 2 and gguf_name(name) not in ("token_embd.weight", "output.weight")]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    models, files = {}, {}

    def get(case: str, kind: str) -> tuple:
        if case not in models:  # tests/test_families.py's checkpoints, written once per run
            models[case] = case_checkpoint(tmp_path_factory, case)
        model = models[case]
        key = (case, kind)
        if key not in files:
            out = root / f"{case}-{kind}.gguf"
            extra, tiles = ("--type", "i2_s", "--target", kind), None
            if kind in ("tl1", "tl2"):
                tiles = test_tiles(kind, ternary_shapes(model))
                ini = root / f"{case}-{kind}.ini"
                ini.write_text(kernel_config_text(tiles))
                extra = ("--type", kind, "--kernel-config", str(ini))
            convert(model, out, *extra)
            files[key] = (out, tiles)
        return (model, *files[key])
    return get


def decoded_tensors(model, family: str, out, kind: str, tiles):
    """(name, tensor info, effective weights, decoded codes, decoded scale) of every ternary tensor."""
    _, permuted, _ = FAMILY_FACTS[family]
    config = json.loads((model / "config.json").read_text())
    contents = read_gguf(out)
    tensors = {t.name: t for t in contents.tensors}
    raw_file = out.read_bytes()
    by_shape = {(m, k): (BM, BK, bm) for m, k, BM, BK, bm in tiles or []}
    for hf, w in effective_weights(model).items():
        name = gguf_name(hf)
        if w.ndim != 2 or name in ("token_embd.weight", "output.weight"):
            continue
        if permuted and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = llama_permute(w, config["num_attention_heads"] if "attn_q" in name else config["num_key_value_heads"])
        t = tensors[name]
        raw = raw_file[t.offset:t.offset + t.nbytes]
        if kind == "arm":
            codes, scale = decode_i2s_arm(raw, w.shape)
        elif kind == "tl1":
            codes, scale = decode_tl1(raw, w.shape, *by_shape[w.shape])
        else:
            codes, scale = decode_tl2(raw, w.shape, *by_shape[w.shape][:2])
        yield name, t, w, codes, scale


@pytest.mark.parametrize("kind", ["arm", "tl1", "tl2"])
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_every_ternary_tensor_decodes_to_the_effective_weights(made, case, kind):
    model, out, tiles = made(case, kind)
    contents = read_gguf(out)
    if kind != "arm":
        assert [e for e in json.loads(run_cli("inspect", out, "--json").stdout)["kernel_tiles"]] == \
            [list(t) for t in tiles]
    assert contents.kv("general.file_type") == {"arm": 40, "tl1": 38, "tl2": 39}[kind]
    assert contents.kv(TARGET_KEY) == {"arm": "arm", "tl1": "arm", "tl2": "x86"}[kind]
    assert contents.kv("general.architecture") == FAMILY_FACTS[CASES[case][0]][0]
    n = 0
    for name, t, w, codes, scale in decoded_tensors(model, CASES[case][0], out, kind, tiles):
        assert t.ggml_type == {"arm": 36, "tl1": 38, "tl2": 39}[kind], name
        m, k = w.shape
        if kind == "tl1":  # TL-FORMAT.md section 4: payload, then the 32-byte scale slot
            assert t.nbytes == m * k // 4 + 32
        elif kind == "tl2":
            assert t.nbytes == -(-tl2_payload(m, k) // 32) * 32 + 32
        # the scale is the effective magnitude (weight_scale in the family's direction; absmean)
        assert scale == np.float32(np.abs(w).max()), name
        np.testing.assert_array_equal(codes.astype(np.float32) * scale, w.astype(np.float32), err_msg=name)
        n += 1
    assert n == 7 * json.loads((model / "config.json").read_text())["num_hidden_layers"]


def test_the_x86_and_arm_i2s_layouts_differ_and_each_decoder_rejects_the_other(made, tmp_path_factory):
    """The test of the difference is real: the same codes in the x86 layout decode to other values
    under the ARM reading, and the reverse."""
    model, arm, _ = made("2b4t", "arm")
    x86 = case_outputs(tmp_path_factory, "2b4t")[1]["i2_s"][0]  # tests/test_families.py's, --target x86
    a, b = read_gguf(arm), read_gguf(x86)
    assert b.kv(TARGET_KEY) == "x86"
    ta = {t.name: t for t in a.tensors}
    raw_a, raw_b = arm.read_bytes(), x86.read_bytes()
    for t in b.tensors:
        if t.ggml_type != 36:
            continue
        u = ta[t.name]
        body_a, body_b = raw_a[u.offset:u.offset + u.nbytes], raw_b[t.offset:t.offset + t.nbytes]
        assert body_a != body_b, t.name
        arm_codes, _ = decode_i2s_arm(body_a, t.shape)
        x86_values, scale, _ = decode_i2s_reference(body_b, t.shape)
        np.testing.assert_array_equal(arm_codes * scale, x86_values)  # same weights, two layouts
        wrong, _ = decode_i2s_arm(body_b, t.shape)
        assert (wrong != arm_codes).mean() > 0.3, t.name


def test_a_target_change_redoes_pack_and_assemble_only_and_verify_tells_the_layouts_apart(made, tmp_path):
    model, _, _ = made("llama3", "arm")
    out, work = tmp_path / "m.gguf", tmp_path / "work"
    first = convert(model, out, "--type", "i2_s", "--target", "x86", "--workdir", work)
    assert "I2_S for bitnet.cpp's x86 builds" in first.stderr
    x86_bytes = out.read_bytes()
    again = convert(model, out, "--type", "i2_s", "--target", "arm", "--workdir", work)
    assert "extract: already done" in again.stderr and "quantize: already done" in again.stderr
    assert "pack: running" in again.stderr and "assemble: running" in again.stderr
    assert "I2_S for bitnet.cpp's ARM builds" in again.stderr
    assert out.read_bytes() != x86_bytes and read_gguf(out).kv(TARGET_KEY) == "arm"
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["options"]["target"] == "arm"
    shown = run_cli("inspect", work).stdout
    assert "I2_S for bitnet.cpp's ARM builds (target arm)" in shown
    # the file alone says it too
    alone = run_cli("inspect", out).stdout
    assert "general.file_type 40 (I2_S)" in alone and "laid out for bitnet.cpp's ARM builds" in alone
    assert run_cli("verify", out, model).returncode == 0
    wrong = run_cli("verify", out, model, "--target", "x86", check_exit=1).stdout
    assert f"MISMATCH m.gguf: {TARGET_KEY} is 'arm', expected 'x86'" in wrong
    assert "attn_q.weight: bytes differ" in wrong


def test_the_target_defaults_to_this_machine_and_the_log_says_so(made, tmp_path):
    model, _, _ = made("2b4t", "arm")
    here = "arm" if platform.machine().lower() in ("aarch64", "arm64") else "x86"
    proc = convert(model, tmp_path / "m.gguf", "--type", "i2_s")
    assert f"(I2_S for bitnet.cpp's {'ARM' if here == 'arm' else 'x86'} builds," in proc.stderr
    assert read_gguf(tmp_path / "m.gguf").kv(TARGET_KEY) == here
    # a type that runs on every build names none, and its file carries no target
    proc = convert(model, tmp_path / "t.gguf", "--type", "tq2_0", "--target", "arm")
    assert "(TQ2_0, embeddings" in proc.stderr and read_gguf(tmp_path / "t.gguf").kv(TARGET_KEY) is None


def test_tl_types_run_on_one_build_each(tmp_path, made):
    model, _, _ = made("2b4t", "arm")
    proc = convert(model, tmp_path / "x.gguf", "--type", "tl1", "--target", "x86", check_exit=2)
    assert proc.stderr.count("\n") == 1 and "--type tl1 runs on bitnet.cpp's ARM builds only" in proc.stderr
    proc = convert(model, tmp_path / "x.gguf", "--type", "tq2_0", "--kernel-config", tmp_path / "k.ini",
                   check_exit=2)
    assert proc.stderr.count("\n") == 1 and "--kernel-config" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- kernel configs that cannot describe the model -------------------------------------------------

def _refused(model, tmp_path, kind: str, text: str, *expected: str) -> None:
    ini = tmp_path / "kernel_config.ini"
    ini.write_text(text)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    proc = convert(model, out_dir / "m.gguf", "--type", kind, "--kernel-config", ini, check_exit=2)
    line = proc.stderr
    assert line.count("\n") == 1, line
    assert f"--kernel-config {ini}" in line, line
    for part in expected:
        assert part in line, line
    assert list(out_dir.iterdir()) == [], "nothing is written"


@pytest.mark.parametrize("kind", ["tl1", "tl2"])
def test_bad_kernel_configs_are_refused_in_one_line_naming_the_file_and_the_section(made, tmp_path, kind):
    model, _, _ = made("2b4t", "arm")
    shapes = ternary_shapes(model)
    tiles = test_tiles(kind, shapes)
    # a shape missing: the line names it, a tensor of that shape, and tiles codegen accepts for it
    m, k = tiles[-1][:2]
    _refused(model, tmp_path, kind, kernel_config_text(tiles[:-1]), f"no section for (m, k) = ({m}, {k})",
             f"utils/codegen_{kind}.py", f"({m}, {k}): bm ")
    # a shape twice
    twice = tiles + [tiles[0]]
    _refused(model, tmp_path, kind, kernel_config_text(twice), f"[Kernels_{len(tiles)}]",
             f"(m, k) = ({tiles[0][0]}, {tiles[0][1]}) again (first in [Kernels_0])")
    # tiles that do not divide the shape: BM not dividing m
    m, k, BM, BK, bm = tiles[1]
    bad = list(tiles)
    bad[1] = (m, k, m + 32, BK, bm)
    _refused(model, tmp_path, kind, kernel_config_text(bad), "[Kernels_1]", f"does not divide m = {m}")
    # ... and BK not dividing k (TL1) / leaving a tail that is not whole 32-column blocks (TL2)
    bad[1] = (m, k, BM, 48 if kind == "tl2" else k + 64, bm)
    _refused(model, tmp_path, kind, kernel_config_text(bad), "[Kernels_1]")
    # a key missing
    _refused(model, tmp_path, kind, kernel_config_text(tiles).replace("bmm = 32\n", "", 1), "[Kernels_0] has no bmm")


def test_tl_without_a_kernel_config_names_the_shapes_it_needs(made, tmp_path):
    model, _, _ = made("2b4t", "arm")
    proc = convert(model, tmp_path / "m.gguf", "--type", "tl2", check_exit=2)
    assert proc.stderr.count("\n") == 1
    for m, k in set(ternary_shapes(model)):
        assert f"({m}, {k})" in proc.stderr
    assert "--type tl2 needs --kernel-config PATH" in proc.stderr and "bm " in proc.stderr


# -- out of core -----------------------------------------------------------------------------------

def tile_checkpoint(d):
    """Projections of 1024 and 2048 rows: several tiles per chunk, several chunks per tensor at a
    small memory limit."""
    return write_checkpoint(d, "2b4t-bf16", hidden_size=1024, intermediate_size=2048, num_layers=1, num_heads=8,
                            num_kv_heads=2, vocab_size=512)


@pytest.fixture(scope="module")
def tile_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    model = tile_checkpoint(root / "m")
    files = {}
    for kind in ("tl1", "tl2"):
        ini = root / f"{kind}.ini"
        ini.write_text(kernel_config_text(test_tiles(kind, ternary_shapes(model))))
        files[kind] = ini
    return model, files


def pack_chunks(work, name: str) -> int:
    return sum(p.is_file() for p in (work / "pack.zarr" / name / "c").rglob("*"))


@pytest.mark.parametrize("kind", ["tl1", "tl2"])
def test_tl_bytes_do_not_depend_on_memory_limit_or_workers(tile_model, tmp_path, kind):
    model, configs = tile_model
    files = {}
    for limit, workers in (("4GiB", "1"), ("200MiB", "2"), ("200MiB", "1")):
        out, work = tmp_path / f"{limit}-{workers}.gguf", tmp_path / f"{limit}-{workers}.work"
        convert(model, out, "--type", kind, "--kernel-config", configs[kind], "--memory-limit", limit,
                "--workers", workers, "--workdir", work)
        files[(limit, workers)] = out.read_bytes()
        chunks = pack_chunks(work, "blk.0.ffn_up.weight")
        assert chunks == 1 if limit == "4GiB" else chunks > 2, (limit, workers, chunks)
    first = files[("4GiB", "1")]
    assert all(v == first for v in files.values())
    # and they are the checkpoint's weights
    tiles = test_tiles(kind, ternary_shapes(model))
    out = tmp_path / "4GiB-1.gguf"
    for name, t, w, codes, scale in decoded_tensors(model, "2b4t-bf16", out, kind, tiles):
        np.testing.assert_array_equal(codes.astype(np.float32) * scale, w.astype(np.float32), err_msg=name)


@pytest.mark.parametrize("kind", ["tl2", "tl1"])
def test_a_kill_in_pack_and_a_rerun_give_the_same_bytes(tile_model, tmp_path, kind):
    model, configs = tile_model
    extra = ("--type", kind, "--kernel-config", str(configs[kind]), "--workers", "1")
    clean, clean_work = tmp_path / "clean.gguf", tmp_path / "clean.work"
    convert(model, clean, "--memory-limit", "200MiB", "--workdir", clean_work, *extra)
    ref = kp.Reference(0.0, {s: kp.count_chunks(clean_work / f"{s}.zarr") for s in kp.CHUNK_STAGES},
                       clean.stat().st_size)
    assert ref.chunks["pack"] > 8
    shutil.rmtree(clean_work)
    landed_in_pack = 0
    for i, fraction in enumerate((0.3, 0.6)):
        out, work = tmp_path / f"k{i}.gguf", tmp_path / f"k{i}.work"
        point = kp.KillPoint("pack", fraction, signal.SIGKILL, "200MiB")
        kill = kp.interrupt(ROOT, model, out, work, point, ref, tmp_path / "log", *extra)
        landed_in_pack += kill.landed == "pack"
        convert(model, out, "--memory-limit", "200MiB", "--workdir", work, *extra)
        assert out.read_bytes() == clean.read_bytes(), kill
    assert landed_in_pack, "no kill landed in pack"


# -- the codecs alone, on shapes the families do not have ------------------------------------------

TL_SHAPES = {
    "tl1": [(64, 128, 64, 64, 32), (128, 64, 128, 64, 64), (96, 192, 32, 64, 32), (256, 256, 128, 128, 64)],
    # K2 = 0 (64 x 288 / 96), K2 = 96 (128 x 480 / 192), K < 256 with a tail (64 x 224), P not a multiple of 32
    "tl2": [(64, 288, 32, 96, 32), (128, 480, 64, 192, 32), (64, 224, 64, 96, 32), (96, 512, 96, 96, 32),
            (320, 320, 320, 96, 32)],
}


@pytest.mark.parametrize("kind,shape", [(k, s) for k, shapes in TL_SHAPES.items() for s in shapes])
def test_tl_codecs_agree_with_the_independent_decoder(kind, shape):
    from pipeline.codecs import CODECS, Tiles, pack_fields

    m, k, BM, BK, bm = shape
    codec = CODECS[kind]
    tiles = Tiles(BM, BK, bm)
    rng = np.random.default_rng(m * k)
    codes = rng.integers(-1, 2, (m, k)).astype(np.int8)
    rows = codec.encode(codes, np.float32(0.75), tiles)
    if k % 128 == 0:  # from the 2-bit code layout quantize.zarr stores: the same bytes
        np.testing.assert_array_equal(codec.encode_codes(pack_fields((codes + 1).astype(np.uint8)), 0.75, tiles), rows)
    # a chunk of whole tiles encodes alone: the first BM rows' bytes are the first rows of the whole
    np.testing.assert_array_equal(codec.encode(codes[:BM], np.float32(0.75), tiles), rows[:BM])
    payload = b"".join(np.ascontiguousarray(rows[:, a:b]).tobytes() for a, b in codec.regions(k, tiles))
    raw = payload + codec.tail_bytes((m, k), np.float32(0.75), tiles)
    if kind == "tl1":
        got, scale = decode_tl1(raw, (m, k), BM, BK, bm)
    else:
        got, scale = decode_tl2(raw, (m, k), BM, BK)
    np.testing.assert_array_equal(got, codes)
    assert scale == np.float32(0.75)


FILLS = ["random", "sparse", "zeros", "plus", "minus"]


def fill_codes(fill: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if fill == "random":
        return rng.integers(-1, 2, shape).astype(np.int8)
    if fill == "sparse":  # mostly zeros: triples of value 0 next to signed ones
        return (rng.integers(-1, 2, shape) * (rng.random(shape) < 0.1)).astype(np.int8)
    return np.full(shape, {"zeros": 0, "plus": 1, "minus": -1}[fill], dtype=np.int8)


@st.composite
def tl_cases(draw, kind: str):
    """A matrix shape and tiles bitnet.cpp's code generator accepts for it (TL-FORMAT.md section 7),
    with K a multiple of 128 (rows that quantize.zarr stores in the 2-bit code layout) when it can."""
    if kind == "tl1":
        bm = draw(st.sampled_from([32, 64]))
        BK = 256 // bm * draw(st.integers(1, 16))
        tail, least = 0, 1
    else:
        bm = 32
        BK = 24 * draw(st.integers(1, 12))
        tail = 32 * draw(st.integers(0, min(8, (BK - 1) // 32)))  # K2 = K mod BK: 0 or whole 32-column blocks
        least = -(-max(256 - tail, 1) // BK)  # K >= 256
    blocks = least + draw(st.integers(0, 3))
    if draw(st.booleans()):
        blocks = next((n for n in range(blocks, blocks + 128) if (BK * n + tail) % 128 == 0), blocks)
    BM = bm * draw(st.integers(1, 3))
    return BM * draw(st.integers(1, 2)), BK * blocks + tail, BM, BK, bm


@pytest.mark.parametrize("kind", ["tl1", "tl2"])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), fill=st.sampled_from(FILLS), seed=st.integers(0, 2**32 - 1))
@example(data=None, fill="random", seed=0)
def test_tl_codecs_round_trip_any_tiles(kind, data, fill, seed):
    """Both encoders (from int8 codes, and from the 2-bit code layout in column order) against the
    independent decoder for random tiles, including two-weight tails of every width (TL2) and codes
    that are all zero, all +1 or all -1; the decoder also checks region sizes, padding and value ranges."""
    from pipeline.codecs import CODECS, Tiles, pack_fields

    # the explicit example: K2 = 0, so the last 4-byte window of TL2's triples ends the chunk
    m, k, BM, BK, bm = data.draw(tl_cases(kind)) if data is not None else \
        {"tl1": (64, 256, 64, 64, 32), "tl2": (64, 384, 32, 96, 32)}[kind]
    codec, tiles = CODECS[kind], Tiles(BM, BK, bm)
    assert codec.tile_problem(m, k, tiles) is None
    codes = fill_codes(fill, (m, k), seed)
    rows = codec.encode(codes, np.float32(0.5), tiles)
    if k % 128 == 0:
        np.testing.assert_array_equal(codec.encode_codes(pack_fields((codes + 1).astype(np.uint8)), 0.5, tiles), rows)
    payload = b"".join(np.ascontiguousarray(rows[:, a:b]).tobytes() for a, b in codec.regions(k, tiles))
    raw = payload + codec.tail_bytes((m, k), np.float32(0.5), tiles)
    got, scale = decode_tl1(raw, (m, k), BM, BK, bm) if kind == "tl1" else decode_tl2(raw, (m, k), BM, BK)
    np.testing.assert_array_equal(got, codes)
    assert scale == np.float32(0.5)


def test_arm_i2s_from_the_code_layout_equals_the_independent_decoders_reading():
    from pipeline.codecs import I2_S_ARM, pack_fields

    rng = np.random.default_rng(7)
    codes = rng.integers(-1, 2, (12, 640)).astype(np.int8)
    packed = I2_S_ARM.encode_codes(pack_fields((codes + 1).astype(np.uint8)))
    got, scale = decode_i2s_arm(packed.tobytes() + I2_S_ARM.i2s_tail(np.float32(2.5)), codes.shape)
    np.testing.assert_array_equal(got, codes)
    assert scale == np.float32(2.5)


def test_a_split_tl2_set_verifies(made, tmp_path):
    """Type 39 is MXFP4 upstream: our reader sizes it as TL2 in a file that carries our kernel tiles,
    and in every later part of its split set (which carries no model key/values)."""
    model, single, tiles = made("2b4t", "tl2")
    ini = tmp_path / "k.ini"
    ini.write_text(kernel_config_text(tiles))
    out = tmp_path / "split.gguf"
    convert(model, out, "--type", "tl2", "--kernel-config", ini, "--split-max-tensors", "7")
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) > 2
    assert run_cli("verify", parts[0], model).returncode == 0
    got = {t.name: t.nbytes for t in read_gguf(single).tensors}
    assert got["blk.0.attn_q.weight"] == -(-tl2_payload(256, 256) // 32) * 32 + 32
