"""`verify` recomputes every tensor from the source and finds any byte that differs."""
from __future__ import annotations

import gguf

from tests.conftest import convert, run_cli


def test_verify_accepts_a_good_file_and_finds_a_flipped_byte(checkpoint, tmp_path):
    model = checkpoint(intermediate_size=320, dtype="f16")  # ffn_down falls back to F16
    out = tmp_path / "m.gguf"
    convert(model, out, "--type", "tq1_0")
    ok = run_cli("verify", out, model)
    assert "OK" in ok.stdout

    reader = gguf.GGUFReader(out)
    target = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    raw = bytearray(out.read_bytes())
    raw[target.data_offset + 7] ^= 0x01
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    proc = run_cli("verify", bad, model, check_exit=1)
    assert "MISMATCH blk.1.attn_v.weight" in proc.stdout
    assert proc.stdout.count("MISMATCH") == 1


def test_verify_against_another_checkpoint_fails(checkpoint, tmp_path):
    model, other = checkpoint(seed=1), checkpoint(seed=2)
    out = tmp_path / "m.gguf"
    convert(model, out)
    proc = run_cli("verify", out, other, check_exit=1)
    assert proc.stdout.count("MISMATCH") >= 20
