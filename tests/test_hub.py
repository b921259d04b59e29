"""Resolving the model argument offline: a directory, or `org/name` in a Hugging Face cache laid
out as `hf download` leaves it (refs/main, snapshots/<rev>/ of relative symlinks into blobs/).

What a hostile cache or argument must not do: an @revision that is a path, a snapshot that links
out of the cache, or a ref that holds no commit hash never converts a directory outside the cache
(refused in one line, nothing written); a revision by commit or by ref still converts."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import safetensors_io
from tests.synthetic import write_bitnet_checkpoint
from pipeline.errors import CheckpointError
from pipeline.hub import ResolvedModel, resolve_model
from tests.conftest import convert
from tests.hostile import refuse
from tests.hostile import out, pristine  # noqa: F401 (fixtures)

CONFIG = json.dumps({"architectures": ["BitnetForCausalLM"]}).encode()


def add_snapshot(cache: Path, repo_id: str, rev: str, files: dict[str, bytes], *, main: bool = True) -> Path:
    """One snapshot of `repo_id` in `cache`, files stored as blobs behind relative symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / name).symlink_to(Path("..", "..", "blobs", blob))
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(rev)  # hf writes the hash without a newline
    return snap


def env_for(tmp_path: Path, **extra) -> dict[str, str]:
    """An environment with a HOME of our own and no Hugging Face variables from the real one."""
    return {"HOME": str(tmp_path / "home"), **extra}


REV_A, REV_B, REV_C = "a" * 40, "b" * 40, "c" * 40


# -- where the cache is ------------------------------------------------------------------------

def test_hf_hub_cache_wins_over_hf_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "hubcache"
    snap = add_snapshot(cache, "org/model-1.5B", REV_A, {"config.json": CONFIG})
    add_snapshot(tmp_path / "hfhome" / "hub", "org/model-1.5B", REV_B, {"config.json": CONFIG})
    got = resolve_model("org/model-1.5B", env_for(tmp_path, HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hfhome")))
    assert got == ResolvedModel(snap, "model-1.5B", f"Hugging Face cache ({cache}, revision {REV_A})")
    assert os.path.islink(got.path / "config.json")  # the snapshot, not the blob it points to


def test_hf_home_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap = add_snapshot(tmp_path / "hfhome" / "hub", "org/m", REV_A, {"config.json": CONFIG})
    got = resolve_model("org/m", env_for(tmp_path, HF_HOME=str(tmp_path / "hfhome")))
    assert got.path == snap and got.name == "m"


def test_default_cache_under_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap = add_snapshot(tmp_path / "home" / ".cache" / "huggingface" / "hub", "org/m", REV_A, {"config.json": CONFIG})
    assert resolve_model("org/m", env_for(tmp_path)).path == snap


def test_default_env_is_os_environ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    snap = add_snapshot(tmp_path / "home" / ".cache" / "huggingface" / "hub", "org/m", REV_A, {"config.json": CONFIG})
    assert resolve_model("org/m").path == snap


def test_tilde_in_hf_home_uses_the_given_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap = add_snapshot(tmp_path / "home" / "hf" / "hub", "org/m", REV_A, {"config.json": CONFIG})
    assert resolve_model("org/m", env_for(tmp_path, HF_HOME="~/hf")).path == snap


# -- which snapshot --------------------------------------------------------------------------

def test_refs_main_chooses_among_several_snapshots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    add_snapshot(cache, "org/m", REV_A, {"config.json": CONFIG}, main=False)
    snap_b = add_snapshot(cache, "org/m", REV_B, {"config.json": CONFIG})
    snap_c = add_snapshot(cache, "org/m", REV_C, {"config.json": CONFIG}, main=False)
    os.utime(snap_c, ns=(snap_b.stat().st_mtime_ns + 10**9,) * 2)  # newer, yet refs/main decides
    got = resolve_model("org/m", env_for(tmp_path, HF_HUB_CACHE=str(cache)))
    assert got.path == snap_b
    assert got.source == f"Hugging Face cache ({cache}, revision {REV_B})"


def test_no_refs_single_snapshot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    snap = add_snapshot(cache, "org/m", REV_A, {"config.json": CONFIG}, main=False)
    got = resolve_model("org/m", env_for(tmp_path, HF_HUB_CACHE=str(cache)))
    assert got.path == snap
    assert REV_A in got.source and "only snapshot" in got.source and "no refs/main" in got.source


def test_no_refs_several_snapshots_takes_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    snaps = [add_snapshot(cache, "org/m", rev, {"config.json": CONFIG}, main=False) for rev in (REV_A, REV_B, REV_C)]
    for age, snap in zip((3, 1, 2), snaps):  # REV_B is the newest
        os.utime(snap, ns=(10**18 - age * 10**9,) * 2)
    got = resolve_model("org/m", env_for(tmp_path, HF_HUB_CACHE=str(cache)))
    assert got.path == snaps[1]
    assert REV_B in got.source and "newest of 3 snapshots" in got.source


def test_revision_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    snap_a = add_snapshot(cache, "org/m", REV_A, {"config.json": CONFIG}, main=False)
    add_snapshot(cache, "org/m", REV_B, {"config.json": CONFIG})
    env = env_for(tmp_path, HF_HUB_CACHE=str(cache))
    assert resolve_model(f"org/m@{REV_A}", env).path == snap_a
    (cache / "models--org--m" / "refs" / "v1").write_text(REV_A)
    assert resolve_model("org/m@v1", env).path == snap_a
    with pytest.raises(CheckpointError, match="revision v2 is not in the cache.*hf download org/m --revision v2"):
        resolve_model("org/m@v2", env)


# -- local directories -----------------------------------------------------------------------

def test_local_directory_wins_even_if_it_looks_like_an_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    add_snapshot(cache, "org/m", REV_A, {"config.json": CONFIG})
    (tmp_path / "org" / "m").mkdir(parents=True)
    got = resolve_model("org/m", env_for(tmp_path, HF_HUB_CACHE=str(cache)))
    assert got == ResolvedModel(tmp_path / "org" / "m", "m", "directory")


def test_plain_directory_named_by_itself(tmp_path, monkeypatch):
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path / "my-model")
    got = resolve_model(".", env_for(tmp_path))
    assert got == ResolvedModel(tmp_path / "my-model", "my-model", "directory")
    assert resolve_model(tmp_path / "my-model", env_for(tmp_path)).name == "my-model"


def test_snapshot_directory_named_by_its_repository(tmp_path):
    snap = add_snapshot(tmp_path / "c", "org/bitnet_b1_58-large", REV_A, {"config.json": CONFIG})
    got = resolve_model(str(snap), env_for(tmp_path))
    assert got == ResolvedModel(snap, "bitnet_b1_58-large", "directory")


def test_symlink_to_snapshot_keeps_the_link_path_and_the_repository_name(tmp_path):
    snap = add_snapshot(tmp_path / "c", "org/m", REV_A, {"config.json": CONFIG})
    (tmp_path / "link").symlink_to(snap)
    got = resolve_model(str(tmp_path / "link"), env_for(tmp_path))
    assert got.path == tmp_path / "link" and got.name == "m"


def test_repository_folder_resolves_to_refs_main(tmp_path):
    cache = tmp_path / "c"
    add_snapshot(cache, "org/m", REV_A, {"config.json": CONFIG}, main=False)
    snap_b = add_snapshot(cache, "org/m", REV_B, {"config.json": CONFIG})
    got = resolve_model(str(cache / "models--org--m"), env_for(tmp_path))
    assert got == ResolvedModel(snap_b, "m", f"Hugging Face cache ({cache}, revision {REV_B})")


# -- errors ----------------------------------------------------------------------------------

def one_line_error(arg, env) -> str:
    with pytest.raises(CheckpointError) as info:
        resolve_model(arg, env)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_not_found_lists_the_places_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    cache.mkdir()
    message = one_line_error("1bitLLM/bitnet_b1_58-large", env_for(tmp_path, HF_HUB_CACHE=str(cache)))
    assert message.startswith("1bitLLM/bitnet_b1_58-large: ")
    assert str(tmp_path / "1bitLLM" / "bitnet_b1_58-large") in message
    assert str(cache / "models--1bitLLM--bitnet_b1_58-large") in message
    assert "hf download 1bitLLM/bitnet_b1_58-large" in message


def test_the_download_command_fetches_exactly_what_a_conversion_reads(tmp_path):
    """The command's --include globs, matched as huggingface_hub matches them (fnmatch), against a
    repository listing like 1bitLLM's and HF1BitLLM's: every file a conversion reads, nothing else."""
    import fnmatch
    import shlex

    from pipeline.hub import download_command

    line = one_line_error("HF1BitLLM/Llama3-8B-1.58-100B-tokens", env_for(tmp_path, HF_HUB_CACHE=str(tmp_path / "c")))
    command = shlex.split(line.split(": ")[-1])
    assert command[:3] == ["hf", "download", "HF1BitLLM/Llama3-8B-1.58-100B-tokens"]
    assert command == shlex.split(download_command("HF1BitLLM/Llama3-8B-1.58-100B-tokens"))
    globs = [command[i + 1] for i, a in enumerate(command) if a == "--include"]
    read = ["config.json", "generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "added_tokens.json", "model.safetensors", "model-00001-of-00002.safetensors",
            "model.safetensors.index.json"]
    not_read = ["pytorch_model.bin", "model.safetensors.bak", "special_tokens_map.json", ".gitattributes",
                "training_args.bin", "optimizer.pt", "figures/loss.png", "LICENSE"]
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in read), globs
    assert not any(fnmatch.fnmatch(f, g) for g in globs for f in not_read), globs


@pytest.mark.parametrize("arg", ["no-such-dir", "a/b/c", "org/-bad", "org/na--me", "org/a..b", "/abs/org/m"])
def test_not_an_id_and_not_a_directory(tmp_path, monkeypatch, arg):
    monkeypatch.chdir(tmp_path)
    message = one_line_error(arg, env_for(tmp_path, HF_HUB_CACHE=str(tmp_path / "c")))
    assert "no such directory" in message and "hf download" not in message


def test_a_file_is_not_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "not a directory" in one_line_error("model.safetensors", env_for(tmp_path))


def test_refs_main_naming_a_missing_snapshot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    add_snapshot(cache, "org/m", REV_A, {"config.json": CONFIG})
    (cache / "models--org--m" / "refs" / "main").write_text(REV_B + "\n")
    message = one_line_error("org/m", env_for(tmp_path, HF_HUB_CACHE=str(cache)))
    assert "refs/main" in message and REV_B in message and "does not exist" in message


def test_empty_refs_main(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    add_snapshot(cache, "org/m", REV_A, {"config.json": CONFIG})
    (cache / "models--org--m" / "refs" / "main").write_text("")
    assert "does not hold a commit hash" in one_line_error("org/m", env_for(tmp_path, HF_HUB_CACHE=str(cache)))


@pytest.mark.parametrize("dangling", [False, True])
def test_snapshot_without_config_json(tmp_path, monkeypatch, dangling):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "c"
    snap = add_snapshot(cache, "org/m", REV_A, {"config.json": CONFIG, "model.safetensors": b"x"})
    if dangling:  # the link is there but its blob is gone
        (snap / "config.json").resolve().unlink()
    else:
        (snap / "config.json").unlink()
    message = one_line_error("org/m", env_for(tmp_path, HF_HUB_CACHE=str(cache)))
    assert str(snap) in message and "no config.json" in message


@pytest.mark.parametrize("make_snapshots_dir", [False, True])
def test_no_snapshots(tmp_path, monkeypatch, make_snapshots_dir):
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "c" / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    if make_snapshots_dir:
        (repo / "snapshots").mkdir()
    message = one_line_error("org/m", env_for(tmp_path, HF_HUB_CACHE=str(tmp_path / "c")))
    assert "no snapshots" in message and str(repo) in message


def test_name_never_holds_a_path_separator(tmp_path):
    from pipeline.hub import safe_name
    assert safe_name("a/b") == "a_b" and safe_name("a\\b") == "a_b"
    assert safe_name("") == "model" and safe_name("..") == "model"
    assert resolve_model("/", env_for(tmp_path)).name == "model"


# -- the converter reads a symlinked snapshot like a plain directory -------------------------

def weights_fingerprint(model_dir: Path) -> list:
    """The converter's fingerprint of a directory's weight files (safetensors and index)."""
    files = [p for p in model_dir.iterdir() if p.name.endswith((".safetensors", ".index.json"))]
    return safetensors_io.files_fingerprint(model_dir, files)


def test_checkpoint_reader_follows_snapshot_symlinks(tmp_path, monkeypatch):
    plain = write_bitnet_checkpoint(tmp_path / "plain", hidden_size=256, intermediate_size=512, num_layers=1,
                                    num_heads=4, shards=2)
    files = {p.name: p.read_bytes() for p in sorted(plain.iterdir()) if p.is_file()}
    snap = add_snapshot(tmp_path / "c", "org/m", REV_A, files)
    # give every link an mtime of its own, so reading the link instead of the blob shows
    for link in snap.iterdir():
        os.utime(link, ns=(123_000_000_000,) * 2, follow_symlinks=False)
    assert all(p.is_symlink() for p in snap.iterdir())

    monkeypatch.chdir(tmp_path)
    resolved = resolve_model("org/m", env_for(tmp_path, HF_HUB_CACHE=str(tmp_path / "c")))
    assert resolved.path == snap

    plain_index = safetensors_io.index_checkpoint(plain)
    snap_index = safetensors_io.index_checkpoint(resolved.path)
    assert len(plain_index) > 10
    assert {n: (t.dtype, t.shape, t.offset, t.file.name) for n, t in snap_index.items()} == \
           {n: (t.dtype, t.shape, t.offset, t.file.name) for n, t in plain_index.items()}
    assert all(t.file.parent == snap for t in snap_index.values())
    for name, src in plain_index.items():
        rows = src.shape[0]
        np.testing.assert_array_equal(snap_index[name].read_rows(0, rows), src.read_rows(0, rows))

    plain_fp = weights_fingerprint(plain)
    snap_fp = weights_fingerprint(resolved.path)
    assert "model.safetensors.index.json" in {name for name, *_ in snap_fp}
    assert [(n, size) for n, size, *_ in snap_fp] == [(n, size) for n, size, *_ in plain_fp]
    for name, size, mtime, *_ in snap_fp:
        blob = os.path.realpath(snap / name)
        assert Path(blob).parent.name == "blobs"
        assert (size, mtime) == (os.path.getsize(blob), os.stat(blob).st_mtime_ns)
        assert mtime != os.lstat(snap / name).st_mtime_ns


def test_fingerprint_changes_when_a_blob_is_replaced(tmp_path):
    """`hf download` of a new revision re-points the links; the run must see a changed source."""
    cache = tmp_path / "c"
    snap = add_snapshot(cache, "org/m", REV_A, {"config.json": CONFIG, "model.safetensors": b"\0" * 16})
    before = weights_fingerprint(snap)
    (snap / "model.safetensors").unlink()
    new_blob = cache / "models--org--m" / "blobs" / "new"
    new_blob.write_bytes(b"\0" * 32)
    (snap / "model.safetensors").symlink_to(Path("..", "..", "blobs", "new"))
    after = weights_fingerprint(snap)
    assert before != after and {n: s for n, s, *_ in after}["model.safetensors"] == 32


@pytest.mark.parametrize("gone", ["model.safetensors.index.json", "model-00002-of-00002.safetensors"])
def test_missing_blob_of_a_checkpoint_file_is_an_incomplete_download(tmp_path, gone):
    plain = write_bitnet_checkpoint(tmp_path / "plain", hidden_size=256, intermediate_size=512, num_layers=1,
                                    num_heads=4, shards=2)
    assert (plain / gone).is_file()
    snap = add_snapshot(tmp_path / "c", "org/m", REV_A, {p.name: p.read_bytes() for p in plain.iterdir() if p.is_file()})
    (snap / gone).resolve().unlink()
    with pytest.raises(CheckpointError, match=rf"^{snap / gone}: links to \.\./\.\./blobs/\w+, which does not exist;"
                                              ".*download the model again$"):
        safetensors_io.index_checkpoint(snap)


def test_resolving_never_opens_a_socket(tmp_path, monkeypatch):
    import socket

    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.chdir(tmp_path)
    env = env_for(tmp_path, HF_HUB_CACHE=str(tmp_path / "c"))
    snap = add_snapshot(tmp_path / "c", "org/m", REV_A, {"config.json": CONFIG})
    assert resolve_model("org/m", env).path == snap
    with pytest.raises(CheckpointError, match="hf download org/other"):
        resolve_model("org/other", env)


# -- the CLI converts org/name from the cache -----------------------------------------------

def test_convert_a_model_id_from_the_cache_names_the_model_not_the_revision(tmp_path):
    import gguf

    from tests.conftest import run_cli

    plain = write_bitnet_checkpoint(tmp_path / "plain", hidden_size=256, intermediate_size=512, num_layers=1,
                                    num_heads=4)
    files = {p.name: p.read_bytes() for p in sorted(plain.iterdir()) if p.is_file()}
    add_snapshot(tmp_path / "cache", "someorg/tiny-bitnet", REV_A, files)
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("convert", "someorg/tiny-bitnet", "--no-progress", cwd=work, env=env)
    out = work / "tiny-bitnet-TQ2_0.gguf"
    assert out.is_file(), proc.stderr
    assert "Hugging Face cache" in proc.stderr and REV_A in proc.stderr
    general = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if k.startswith("general.")}
    assert general["general.name"] == "Tiny Bitnet"  # the title llama.cpp's converter makes of "tiny-bitnet"
    assert not any(REV_A in str(v) for v in general.values()), general  # nothing guessed from the snapshot's hash
    # the same bytes as converting the plain directory under the same name
    ref = tmp_path / "ref.gguf"
    run_cli("convert", plain, "-o", ref, "--no-progress", env=env)
    theirs, ours = gguf.GGUFReader(ref), gguf.GGUFReader(out)
    assert [bytes(t.data) for t in theirs.tensors] == [bytes(t.data) for t in ours.tensors]

    missing = run_cli("convert", "someorg/not-there", "--no-progress", cwd=work, env=env, check_exit=2)
    assert len(missing.stderr.strip().splitlines()) == 1 and "someorg/not-there" in missing.stderr


REV = "a" * 40


@pytest.fixture
def cache(pristine, tmp_path, monkeypatch):
    """A Hugging Face cache holding org/m at REV (refs/main), and a checkpoint outside it."""
    root = tmp_path / "hub"
    files = {p.name: p.read_bytes() for p in pristine["spm"].iterdir()}
    snap = add_snapshot(root, "org/m", REV, files)
    outside = tmp_path / "outside" / "ckpt"
    shutil.copytree(pristine["spm"], outside)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root, snap, outside


@pytest.mark.parametrize("rev", ["{outside}", "{outside}/", "//{outside}", "{outside}/.", "./{outside}"])
def test_a_revision_that_is_a_path_is_refused(cache, out, rev):
    """Was: the directory at that path, outside the cache, converted."""
    root, snap, outside = cache
    rev = rev.format(outside=outside)
    refuse(f"org/m@{rev}", out, "not a revision", watch=[outside, root, out.parent])


def test_a_revision_by_commit_and_by_ref_still_converts(cache, out):
    root, snap, outside = cache
    (root / "models--org--m" / "refs" / "v1").write_text(REV)
    convert(f"org/m@{REV}", out)
    first = out.read_bytes()
    out.unlink()
    convert("org/m@v1", out)
    assert out.read_bytes() == first


@pytest.mark.parametrize("how", ["refs_main", "only_snapshot"])
def test_a_snapshot_that_links_out_of_the_cache_is_refused(cache, out, how):
    root, snap, outside = cache
    repo = root / "models--org--m"
    shutil.rmtree(snap)
    snap.symlink_to(outside)
    if how == "only_snapshot":
        shutil.rmtree(repo / "refs")
    refuse("org/m", out, "out of the cache", watch=[outside, root, out.parent])


def test_a_ref_that_does_not_hold_a_commit_hash_is_refused(cache, out):
    root, snap, outside = cache
    repo = root / "models--org--m"
    (repo / "snapshots" / "v1").symlink_to(outside)
    (repo / "refs" / "main").write_text("v1")
    refuse("org/m", out, "refs/main", "commit hash", watch=[outside, root, out.parent])
