"""Issue 17, classes 5-10: what a careless or hostile user does to the tokenizer files, the run
directory, the model id, the scheduler address and the memory limit.

Every refusal is exit 2 with one stderr line naming the file or option, and nothing outside the
run directory changes (checkpoint and output directory hashed before and after, as
tests/test_hostile.py does); a refusal before any work leaves the run directory as it was.

  5 tokenizer content that converts to a file llama.cpp cannot use, or silently without keys:
    a BPE tokenizer without merges, a dangling link (or a link loop) for a tokenizer file
  6 links planted in a run directory where a temporary file is written (manifest, metadata
    record, checksums, lock, inside a store): never followed, nothing outside is written
  7 a model id whose @revision is a path, or a cache snapshot that links out of the cache
  8 --scheduler to a closed port, a silent server, a server of another protocol: refused
    quickly, before anything is written
  9 tokenizers and vocabularies the memory limit cannot hold: refused before they are read
 10 input faults that were exit 1 with a traceback class name: wrong JSON types, malformed or
    non-UTF-8 chat templates, deeply nested JSON, unreadable files and shard directories,
    damaged checksum records, a store deleted under a finished run, paths too long
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, convert
from tests.test_bad_input import rewrite_config
from tests.test_hostile import ERROR, assert_same, cli, one_line, refuse, tree

SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from tests.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("pristine")
    return {"spm": write_checkpoint(root / "spm", "1bitllm", **SHAPE),
            "bpe": write_checkpoint(root / "bpe", "llama3-1.58", **SHAPE)}


@pytest.fixture
def fresh(pristine, tmp_path):
    """fresh(kind) -> a private copy of a pristine checkpoint ("spm": 1bitLLM with tokenizer.model,
    "bpe": Llama3-8B-1.58 with tokenizer.json)."""
    def make(kind="bpe") -> Path:
        dest = tmp_path / "src" / kind / "model"
        shutil.copytree(pristine[kind], dest)
        return dest
    return make


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "notes.txt").write_text("the user's notes")
    return d / "m.gguf"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# == 5. tokenizer content llama.cpp cannot use, or keys silently missing =========================

@pytest.mark.parametrize("merges", ["empty", "missing"])
def test_a_bpe_tokenizer_without_merges_is_refused(fresh, out, merges):
    """llama.cpp stops on a gpt2 vocabulary without tokenizer.ggml.merges; the file must not be written."""
    model = fresh("bpe")
    data = json.loads((model / "tokenizer.json").read_text())
    if merges == "empty":
        data["model"]["merges"] = []
    else:
        del data["model"]["merges"]
    (model / "tokenizer.json").write_text(json.dumps(data))
    refuse(model, out, "tokenizer.json", "merges")


def test_a_bpe_tokenizer_whose_merges_come_from_merges_txt_converts(fresh, out):
    """The refusal is about having no merges at all: merges.txt (gguf.SpecialVocab's fallback) is enough."""
    model = fresh("bpe")
    data = json.loads((model / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (model / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    data["model"]["merges"] = []
    (model / "tokenizer.json").write_text(json.dumps(data))
    # the tokenizers package itself still needs merges for the pre-tokenizer hash: name it
    convert(model, out, "--tokenizer-pre", "llama-bpe")
    import gguf

    reader = gguf.GGUFReader(out)
    field = reader.fields["tokenizer.ggml.merges"]
    assert len(field.data) == len(lines)


@pytest.mark.parametrize("kind,name", [
    ("bpe", "tokenizer_config.json"),   # BOS flag, chat template: silently gone
    ("spm", "tokenizer_config.json"),
    ("spm", "added_tokens.json"),
    ("bpe", "chat_template.jinja"),
    ("bpe", "tokenizer.model"),         # was: converted as BPE from tokenizer.json, silently
])
@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_a_tokenizer_file_that_links_to_nothing_is_refused(fresh, out, kind, name, link):
    """A cache snapshot whose blob is missing: the file looks absent to is_file(), and the keys it
    would have given were silently left out."""
    model = fresh(kind)
    path = model / name
    path.unlink(missing_ok=True)
    if name == "chat_template.jinja":  # read only when tokenizer_config.json has no chat_template
        edit_json(model / "tokenizer_config.json", chat_template=...)
    os.symlink(Path("..", "..", "blobs", "0" * 64) if link == "dangling" else name, path)
    refuse(model, out, name)


# == 6. links planted in a run directory ==========================================================

@pytest.fixture
def victim(tmp_path):
    """A user's file outside every run directory, which a planted link points to."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text("the user's precious file\n")
    return path


def interrupted_run(model, out, work, after: str) -> None:
    """A run directory as a conversion interrupted after `after` leaves it (later stages forgotten)."""
    convert(model, out, "--workdir", work)
    out.unlink()
    manifest = json.loads((work / "manifest.json").read_text())
    stages = ["extract", "quantize", "pack", "assemble"]
    for stage in stages[stages.index(after) + 1:]:
        manifest["stages"].pop(stage, None)
    (work / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["manifest.json.tmp", "metadata.json.tmp", "quantize.checksums.json.tmp",
                                  "pack.checksums.json.tmp", "lock", "metadata.json", "pack.checksums.json"])
def test_a_link_planted_in_a_run_directory_is_never_written_through(fresh, out, tmp_path, victim, name):
    model, work = fresh("spm"), tmp_path / "work"
    interrupted_run(model, out, work, "extract")
    (work / name).unlink(missing_ok=True)
    (work / name).symlink_to(victim)
    before = victim.read_bytes()
    line = refuse(model, out, name, "link", workdir=work, watch=[model, out.parent, victim.parent])
    assert "run directory" in line
    assert victim.read_bytes() == before and (work / name).is_symlink()


def test_a_link_planted_inside_a_store_is_never_written_through(fresh, out, tmp_path):
    """A chunk directory of an unfinished store replaced by a link to a directory outside."""
    model, work = fresh("spm"), tmp_path / "work"
    interrupted_run(model, out, work, "quantize")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    chunks = sorted((work / "pack.zarr").glob("*/c"))[0]  # the store stays on disk; pack reruns into it
    shutil.rmtree(chunks)
    chunks.symlink_to(elsewhere)  # pack would write this array's chunk files there
    before = tree(elsewhere)
    refuse(model, out, "link", workdir=work, watch=[model, out.parent, elsewhere])
    assert_same(before, tree(elsewhere))


def test_write_json_atomic_never_writes_through_a_link_at_its_temporary_name(tmp_path, victim):
    """The race the start-up check cannot close: a link planted after it, at the temporary name."""
    from pipeline.rundir import write_json_atomic

    (tmp_path / "manifest.json.tmp").symlink_to(victim)
    write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert victim.read_text() == "the user's precious file\n"
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}
    assert not (tmp_path / "manifest.json").is_symlink() and not os.path.lexists(tmp_path / "manifest.json.tmp")


def test_the_gguf_writer_never_writes_through_a_link_at_its_path(tmp_path, victim):
    import numpy as np

    from pipeline.gguf_file import GGUFFileWriter, TensorInfo

    temp = tmp_path / ".m.gguf.1234abcd.partial"
    temp.symlink_to(victim)
    data = np.arange(8, dtype=np.float32)
    with GGUFFileWriter(temp, [], [TensorInfo("t", (8,), 0, data.nbytes)]) as w:
        w.write_header()
        w.write_tensor_data("t", data)
        w.end_tensor()
    assert victim.read_text() == "the user's precious file\n"
    assert not temp.is_symlink() and temp.read_bytes()[:4] == b"GGUF"


def test_create_exclusive_removes_what_is_there_and_refuses_a_directory(tmp_path, victim):
    from pipeline.errors import RunDirError
    from pipeline.safe_files import create_exclusive

    path = tmp_path / "x.tmp"
    path.symlink_to(victim)
    with create_exclusive(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and victim.read_text() == "the user's precious file\n"
    (tmp_path / "d.tmp").mkdir()
    with pytest.raises(RunDirError, match="d.tmp"):
        create_exclusive(tmp_path / "d.tmp")


# == 7. @revision that is a path, snapshots outside the cache =====================================

REV = "a" * 40


@pytest.fixture
def cache(pristine, tmp_path, monkeypatch):
    """A Hugging Face cache holding org/m at REV (refs/main), and a checkpoint outside it."""
    from tests.test_hub import add_snapshot

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


# == 8. --scheduler: refused quickly, before anything is written ===================================

@pytest.fixture
def fake_server():
    """fake_server(behaviour) -> tcp://127.0.0.1:PORT of a server that is not a dask scheduler:
    "silent" accepts and says nothing, "http" answers like a web server, "close" hangs up."""
    servers, conns = [], []

    def start(behaviour: str) -> str:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        servers.append(srv)

        def serve():
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                conns.append(conn)
                if behaviour == "http":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                elif behaviour == "close":
                    conn.close()
        threading.Thread(target=serve, daemon=True).start()
        return f"tcp://127.0.0.1:{srv.getsockname()[1]}"
    yield start
    for s in servers + conns:
        s.close()


def closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"tcp://127.0.0.1:{port}"


@pytest.mark.parametrize("behaviour", ["silent", "http", "close", "closed port"])
def test_a_scheduler_address_where_no_dask_scheduler_answers_is_refused_before_anything_is_written(
        fresh, out, fake_server, behaviour):
    model = fresh("spm")
    address = closed_port() if behaviour == "closed port" else fake_server(behaviour)
    started = time.monotonic()
    line = refuse(model, out, "--scheduler", address, extra=("--scheduler", address), timeout=90)
    assert time.monotonic() - started < 40, "the handshake is bounded"
    assert not (out.parent / "m.gguf.work").exists()
    if behaviour == "silent":
        assert "handshake" in line


# == 10. input faults that were exit 1 =============================================================

@pytest.mark.parametrize("kind", ["spm", "bpe"])
@pytest.mark.parametrize("value", [[1, 2], "gemma", 3, True])
def test_a_text_config_that_is_not_an_object_is_refused(fresh, out, kind, value):
    model = fresh(kind)
    rewrite_config(model, text_config=value)
    refuse(model, out, "config.json", "text_config")


@pytest.mark.parametrize("template", [5, 1.5, True, {"default": "{{ x }}"}, ["{{ x }}"], [{"name": "a"}],
                                      [{"name": "default", "template": 7}], [{"name": 3, "template": "x"}]])
def test_a_chat_template_of_the_wrong_json_type_is_refused(fresh, out, template):
    model = fresh("bpe")
    edit_json(model / "tokenizer_config.json", chat_template=template)
    refuse(model, out, "tokenizer_config.json", "chat_template")


@pytest.mark.parametrize("template", ["{% if %}", "{{ messages[0] ", "{% for m in messages %}{{ m }}",
                                      "{% endif %}", "{{ '\ud800' }}", "{{ x | }}"])
def test_a_malformed_chat_template_is_refused(fresh, out, template):
    model = fresh("bpe")
    edit_json(model / "tokenizer_config.json", chat_template=template)
    refuse(model, out, "tokenizer_config.json", "chat_template")


def test_a_chat_template_with_transformers_generation_blocks_converts(fresh, out):
    """Templates that mark the assistant's part with {% generation %} (transformers' extension) are fine."""
    model = fresh("bpe")
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    edit_json(model / "tokenizer_config.json", chat_template=template)
    convert(model, out)


@pytest.mark.parametrize("content,needle", [(b"\xff\xfe{{ x }}", "UTF-8"), (b"{% for %}", "parse"),
                                            (b"{{ messages", "parse")])
def test_a_malformed_or_non_utf8_chat_template_jinja_is_refused(fresh, out, content, needle):
    model = fresh("bpe")
    edit_json(model / "tokenizer_config.json", chat_template=...)
    (model / "chat_template.jinja").write_bytes(content)
    refuse(model, out, "chat_template.jinja", needle)


@pytest.mark.parametrize("content", [b'{"chat_template": "\xff"}', b"[1, 2]", b'"x"'])
def test_a_chat_template_json_that_is_not_a_utf8_object_is_refused(fresh, out, content):
    model = fresh("bpe")
    edit_json(model / "tokenizer_config.json", chat_template=...)
    (model / "chat_template.json").write_bytes(content)
    refuse(model, out, "chat_template.json")


def nested(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("kind,name,where", [
    ("bpe", "tokenizer.json", "whole"), ("bpe", "tokenizer.json", "inside"),
    ("spm", "tokenizer.json", "whole"),  # beside a tokenizer.model, gguf.SpecialVocab still reads it
    ("bpe", "tokenizer_config.json", "inside"), ("spm", "added_tokens.json", "whole"),
    ("bpe", "chat_template.json", "inside"),
])
def test_deeply_nested_json_in_a_tokenizer_file_is_refused(fresh, out, kind, name, where):
    model = fresh(kind)
    path = model / name
    if where == "whole":
        path.write_text(nested())
    else:
        text = path.read_text() if path.exists() else "{}"
        path.write_text(text.rstrip()[:-1] + (", " if text.strip() != "{}" else "") + f'"deep": {nested()}}}')
    if name == "chat_template.json":
        edit_json(model / "tokenizer_config.json", chat_template=...)
    refuse(model, out, name, "nested")


# -- as an unprivileged user: unreadable files and directories that cannot be searched

SETPRIV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@functools.cache
def nobody_python() -> tuple[list[str], str, str]:
    """(command prefix, project root as uid 65534 sees it, why not) for running Python as nobody.

    A project cloned under a private directory (mktemp -d is 0700) cannot be entered by uid 65534.
    Then the project is bind-mounted at a public path in a private mount namespace (unshare -m), so
    that only the files the test makes unreadable are unreadable. When neither works, the tests
    below have nothing to say about our code and are skipped with the reason."""
    if not (os.geteuid() == 0 and shutil.which("setpriv")):
        return [], "", "needs root and setpriv to run as another user"
    probe = "import pipeline.cli, numpy, zarr, safetensors"
    python = Path(sys.executable)
    attempts = [([], ROOT)]
    if shutil.which("unshare") and shutil.which("mount"):
        mnt = Path(tempfile.mkdtemp(prefix="bitnet-gguf-root-", dir="/tmp"))
        os.chmod(mnt, 0o755)
        atexit.register(os.rmdir, mnt)
        attempts.append((["unshare", "-m", "--propagation", "private", "sh", "-c",
                          'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(ROOT), str(mnt)], mnt))
    last = ""
    for prefix, root in attempts:
        exe = str(root / python.relative_to(ROOT)) if python.is_relative_to(ROOT) else str(python)
        cmd = [*prefix, *SETPRIV, exe]
        proc = subprocess.run([*cmd, "-c", probe], capture_output=True, text=True, cwd="/", timeout=120,
                              env={**os.environ, "PYTHONPATH": str(root)})
        if proc.returncode == 0:
            return cmd, str(root), ""
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return [], "", f"uid 65534 cannot run the converter from {ROOT} (private parent directory?): {last}"


@pytest.fixture
def shared_dir():
    """A directory an unprivileged user can use (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="bitnet-gguf-test-", dir="/tmp"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(model: Path, out: Path) -> subprocess.CompletedProcess:
    cmd, root, _ = nobody_python()
    env = {**os.environ, "PYTHONPATH": root, "HOME": str(out.parent)}
    return subprocess.run([*cmd, "-m", "pipeline", "convert", str(model), "-o", str(out), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=out.parent)


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
        edit_json(model / "tokenizer_config.json", chat_template=...)
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


@pytest.mark.parametrize("entry", [5, None, 1.5, True, ["12", "ab"]])
def test_a_checksum_record_entry_of_the_wrong_type_is_damage(fresh, out, tmp_path, entry):
    model, work = fresh("spm"), tmp_path / "work"
    interrupted_run(model, out, work, "quantize")
    path = work / "quantize.checksums.json"
    record = json.loads(path.read_text())
    record[next(iter(record))] = entry
    path.write_text(json.dumps(record))
    proc = convert(model, out, "--workdir", work, check_exit=2)
    line = one_line(proc, after_log=True)
    assert "quantize.checksums.json" in line and "damaged" in line
    assert not out.exists()


@pytest.mark.parametrize("store", ["extract", "quantize", "pack"])
def test_a_store_deleted_under_a_finished_run_is_redone_and_reruns_resume(fresh, out, tmp_path, store):
    model, work = fresh("spm"), tmp_path / "work"
    convert(model, out, "--workdir", work)
    expected = out.read_bytes()
    shutil.rmtree(work / f"{store}.zarr")
    proc = convert(model, out, "--workdir", work)
    assert f"{store}: its store" in proc.stderr and out.read_bytes() == expected
    proc = convert(model, out, "--workdir", work)
    assert "assemble: already done" in proc.stderr and out.read_bytes() == expected


def deep_directory(root: Path, total: int) -> Path:
    """A directory whose absolute path is `total` bytes long (made of 200-byte names)."""
    path = str(root)
    while len(path) < total - 210:
        path += "/" + "d" * 200
    path += "/" + "e" * (total - len(path) - 1)
    os.makedirs(path)
    return Path(path)


@pytest.mark.parametrize("total,workdir", [(4080, False), (4080, True), (4050, False), (4000, False)])
def test_an_output_directory_path_too_long_for_the_files_made_there_is_refused(fresh, tmp_path, total, workdir):
    model = fresh("spm")
    out = deep_directory(tmp_path / "long", total) / "m.gguf"
    line = refuse(model, out, "too long", workdir=tmp_path / "w" if workdir else None)
    assert ("-o" in line) if total > 4060 or workdir else ("--workdir" in line)


# == 9. tokenizers and configs the memory limit cannot hold ========================================
# Checkpoints with huge vocabularies stay cheap: the embedding's rows are a hole in a sparse file.

MiB = 1024**2


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
def test_a_vocabulary_the_limit_cannot_hold_is_refused_before_it_is_read(fresh, out, kind, rows):
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
