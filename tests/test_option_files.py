"""Files named by options (--kernel-config, --metadata, --config) that are not what they seem.

A FIFO or a device must not block the converter or feed it without end, a file far larger than
such a file ever is must be refused before it is read (its parsing would take many times its
size), and a file's text must be read as data (no ConfigParser interpolation of '%'). Each is
one line on stderr naming the option, exit 2, nothing written, within seconds. A --config preset
that is missing, a directory, not TOML, or holds a value of the wrong type or an unknown key is
refused the same way, naming the option the value stands for.
"""
from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import ROOT, convert, run_cli
from tests.hostile import refuse
from tests.test_bad_input import snapshot
from tests.hostile import out  # noqa: F401 (fixtures)

SECTION = "[Kernels_{i}]\nm = 3200\nk = 8640\nbm = 160\nbk = 96\nbmm = 32\n"
TL2 = ("--type", "tl2", "--kernel-config")  # the options that read a kernel config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.synthetic import write_bitnet_checkpoint

    return write_bitnet_checkpoint(tmp_path_factory.mktemp("src") / "tiny", hidden_size=256, intermediate_size=512,
                                   num_layers=1, num_heads=4)


def refused(model, tmp_path, option_args, *needles, extra=()):
    """Convert in a process of its own (a hang fails by the timeout), expecting one line, exit 2."""
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir(exist_ok=True)
    before = snapshot(model, out.parent)
    proc = convert(model, out, *option_args, *extra, check_exit=None, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitnet-gguf: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(model, out.parent) == before, "a refused conversion touched files"
    return lines[0]


def sparse(path, size: int):
    """A file of `size` bytes that costs no disk (its content is never read when it is refused)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize("option", [TL2, ("--metadata",), ("--config",)], ids=["kernel-config", "metadata", "config"])
def test_a_fifo_is_refused_not_waited_on(model, tmp_path, option):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(model, tmp_path, (*option, fifo), option[-1], "not a", str(fifo))


@pytest.mark.parametrize("option", [TL2, ("--config",)], ids=["kernel-config", "config"])
def test_a_device_is_refused_not_read_without_end(model, tmp_path, option):
    refused(model, tmp_path, (*option, "/dev/zero"), option[-1], "/dev/zero", "not a regular file")


def test_verify_refuses_a_fifo_as_metadata(model, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    gguf_file = sparse(tmp_path / "m.gguf", 16)  # refused before the file is read
    proc = run_cli("verify", gguf_file, model, "--metadata", fifo, check_exit=2, timeout=60)
    assert proc.stderr.count("\n") == 1 and "--metadata" in proc.stderr, proc.stderr


def test_a_kernel_config_of_100000_sections_is_refused_before_it_is_read(model, tmp_path):
    """About 6 MB, which ConfigParser held as 376 MiB: refused unread, under a 256 MiB limit's worth of memory."""
    from tests.peak_rss import run_measuring_peak

    ini = tmp_path / "kernel_config.ini"
    ini.write_text("".join(SECTION.format(i=i) for i in range(100_000)))
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    r = run_measuring_peak([sys.executable, "-m", "pipeline", "convert", str(model), "-o", str(out),
                            "--no-progress", *TL2, str(ini), "--memory-limit", "256MiB"],
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r["exit"] == 2 and r["stderr"].count("\n") == 1 and f"--kernel-config {ini}" in r["stderr"], r
    assert r["peak"] < 256 * 1024**2 and r["cpu"] < 30, r
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("option,size,limit", [(("--metadata",), 150 * 10**6, "256MiB"),
                                               (("--config",), 200 * 10**6, "300MiB"),
                                               (TL2, 50 * 10**6, "256MiB")],
                         ids=["metadata", "config", "kernel-config"])
def test_option_files_far_larger_than_any_such_file_are_refused_unread(model, tmp_path, option, size, limit):
    big = sparse(tmp_path / "big", size)
    refused(model, tmp_path, (*option, big), option[-1], str(big), "bytes, more than the",
            extra=("--memory-limit", limit))


def test_reading_an_option_file_is_sized_against_the_memory_limit(tmp_path):
    """Below the size cap, a file whose parsing would pass the memory limit is refused before it is
    read, naming the limit that would do; the same file under a larger limit is read."""
    from pipeline.budget import HEADROOM, current_rss
    from pipeline.errors import OptionError
    from pipeline.kernel_config import read_kernel_config
    from pipeline.outtypes import OUTPUT_TYPES

    ini = tmp_path / "kernel_config.ini"
    ini.write_text("".join(SECTION.format(i=i) for i in range(8000)))  # about 480 KB
    tight = current_rss() + HEADROOM + 4 * 1024**2  # room for far less than ConfigParser would hold
    with pytest.raises(OptionError, match=r"--kernel-config .*--memory-limit .*allow at least \d+MiB"):
        read_kernel_config(ini, OUTPUT_TYPES["tl2"].codec, tight)
    # read (and refused for what it says, the same shape 8000 times), not for its size
    with pytest.raises(OptionError, match=r"names \(m, k\) = \(3200, 8640\) again"):
        read_kernel_config(ini, OUTPUT_TYPES["tl2"].codec, tight + 1024**3)


@pytest.mark.parametrize("value", ["3200%", "%(k)s", "%%"])
def test_percent_signs_in_a_kernel_config_are_plain_text(model, tmp_path, value):
    """ConfigParser's default interpolation failed on them (exit 1); a value is still checked."""
    ini = tmp_path / "kernel_config.ini"
    ini.write_text(SECTION.format(i=0).replace("m = 3200", f"m = {value}"))
    refused(model, tmp_path, (*TL2, ini), f"--kernel-config {ini}", "[Kernels_0]: m = ", "not a whole number")


@pytest.mark.parametrize("preset,needle", [
    ("DIR", "--config"),
    ("MISSING", "--config"),
    ('type = "tq2_0\n', "not valid TOML"),
    ("workers = 2\nworkers = 3\n", "not valid TOML"),
    ('workers = "two"\n', "--workers"),
    ("workers = 2.5\n", "--workers"),
    ("workers = -1\n", "--workers"),
    ('force = "yes"\n', "--force"),
    ("progress = 1\n", "--no-progress"),
    ("memory_limit = true\n", "--memory-limit"),
    ("memory_limit = [1]\n", "--memory-limit"),
    ("out_type = 3\n", "--type"),
    ('scheduler = ["tcp://a:1"]\n', "--scheduler"),
    ("split_max_size = -5\n", "--split-max-size"),
    ('split_max_tensors = {a = 1}\n', "--split-max-tensors"),
    ('embedding_type = "F16 "\n', "--embedding-type"),
    ("colour = 'blue'\n", "unknown keys"),
    (b"\xff\xfe\x00", "--config"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "--config"),
])
def test_bad_presets_are_refused(model, out, tmp_path, preset, needle):
    if preset == "DIR":
        path = tmp_path
    elif preset == "MISSING":
        path = tmp_path / "nope.toml"
    else:
        path = tmp_path / "preset.toml"
        path.write_bytes(preset if isinstance(preset, bytes) else preset.encode())
    refuse(model, out, needle, extra=("--config", path))
