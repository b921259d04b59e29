"""Turn the model argument (a directory, a Hugging Face id `org/name`, or a URL) into a checkpoint directory.

A URL (hf://ORG/NAME[@REV], https://.../DIR/, any fsspec URL) is pipeline/remote.py's: its small
files are staged in a temporary directory that stands for the checkpoint, the weights stay remote.

Offline only: a model id is looked up in the local Hugging Face cache, never
downloaded. The cache holds `models--{org}--{name}/` with `refs/main` (a text
file with a commit hash), `snapshots/{hash}/` (the files, as relative symlinks
into `../../blobs/`) and `blobs/`. The snapshot directory is used as it is;
the files are read through their symlinks.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline import remote
from pipeline.errors import CheckpointError

REPO_PREFIX = "models--"
# A repository id as the Hub allows it: two parts of letters, digits, '.', '_', '-',
# each starting and ending with a letter or digit, with no '--' or '..' inside.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
MODEL_ID = re.compile(rf"(?P<org>{_PART})/(?P<name>{_PART})(?:@(?P<rev>[A-Za-z0-9._/-]+))?")
# A revision: a commit hash, or a branch or tag name whose ref file is under the repository's
# refs/ (path parts that start with a letter, digit, '_' or '-': no absolute path, no '.' or '..').
COMMIT = re.compile(r"[0-9a-f]{40}")
REF_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


# What a conversion reads from a repository (config, tokenizer, weights and their index;
# README.md and generation_config.json for the general.* keys), as `hf download --include` globs.
CONVERSION_FILES = ("config.json", "generation_config.json", "README.md", "tokenizer*", "added_tokens.json",
                    "*.safetensors", "model.safetensors.index.json")


def download_command(repo_id: str, revision: str | None = None) -> str:
    """The `hf download` command that fetches exactly the files a conversion reads."""
    rev = f" --revision {revision}" if revision else ""
    include = " ".join(f"--include '{g}'" if "*" in g else f"--include {g}" for g in CONVERSION_FILES)
    return f"hf download {repo_id}{rev} {include}"


@dataclass(frozen=True)
class ResolvedModel:
    path: Path    # the directory holding config.json (a cache snapshot stays snapshots/<rev>)
    name: str     # the model's name for general.name and the default output file name
    source: str   # "directory" or "Hugging Face cache (<cache dir>, revision <rev>)"


def resolve_model(arg: str | Path, env: Mapping[str, str] | None = None) -> ResolvedModel:
    """A local directory if one exists at `arg`, else the cached snapshot of model id `arg`."""
    env = os.environ if env is None else env
    text = os.fspath(arg)
    if remote.is_url(text):  # hf://, https://, any fsspec URL: small files staged, weights read by range
        src = remote.open_source(text, env)
        how = f"commit {src.commit}" if src.commit else "weights read by byte range"
        return ResolvedModel(src.staging, safe_name(src.name), f"{how}; nothing of the weights is stored")
    local = Path(os.path.abspath(text))  # absolute, '..' removed, symlinks kept
    if local.is_dir():
        return _from_directory(local)
    match = MODEL_ID.fullmatch(text)
    if match is None or "--" in text.split("@")[0] or ".." in text:
        if local.exists():
            raise CheckpointError(f"{local}: not a directory; pass the checkpoint directory")
        raise CheckpointError(f"{text}: no such directory ({local}) and not a Hugging Face model id "
                              "org/name; pass a checkpoint directory")
    cache = hub_cache_dir(env)
    repo = cache / f"{REPO_PREFIX}{match['org']}--{match['name']}"
    if not repo.is_dir():
        raise CheckpointError(f"{text}: not found: no directory {local} and no {repo} in the Hugging Face "
                              "cache; pass a checkpoint directory, or fetch the files a conversion reads with: "
                              f"{download_command(match['org'] + '/' + match['name'], match['rev'])}")
    rev, how = _pick_snapshot(repo, match["rev"])
    snapshot = repo / "snapshots" / rev
    return ResolvedModel(_require_config(snapshot), safe_name(match["name"]),
                         f"Hugging Face cache ({cache}, revision {rev}{how})")


def hub_cache_dir(env: Mapping[str, str]) -> Path:
    """Where `hf download` puts models, by the same variables huggingface_hub reads."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return _expand_home(env[var], env)
    if env.get("HF_HOME"):
        return _expand_home(env["HF_HOME"], env) / "hub"
    xdg = _expand_home(env["XDG_CACHE_HOME"], env) if env.get("XDG_CACHE_HOME") else _home(env) / ".cache"
    return xdg / "huggingface" / "hub"


def safe_name(name: str) -> str:
    """A model name usable as a file name: no path separators, not empty or a dot name."""
    cleaned = re.sub(r"[/\\]", "_", name).strip()
    return cleaned if cleaned not in ("", ".", "..") else "model"


def _from_directory(path: Path) -> ResolvedModel:
    """A directory given by path; cache snapshots and repository folders are named by the model."""
    for candidate in (path, path.resolve()):
        repo_name = _repo_name(candidate.parent.parent) if candidate.parent.name == "snapshots" else None
        if repo_name:
            return ResolvedModel(path, safe_name(repo_name), "directory")
    repo_name = _repo_name(path)
    if repo_name and (path / "snapshots").is_dir():
        rev, how = _pick_snapshot(path, None)
        return ResolvedModel(_require_config(path / "snapshots" / rev), safe_name(repo_name),
                             f"Hugging Face cache ({path.parent}, revision {rev}{how})")
    return ResolvedModel(path, safe_name(path.name), "directory")


def _repo_name(folder: Path) -> str | None:
    """`name` of a `models--org--name` folder, else None."""
    if not folder.name.startswith(REPO_PREFIX):
        return None
    parts = folder.name[len(REPO_PREFIX):].split("--", 1)
    return parts[1] if len(parts) == 2 and parts[1] else None


def _pick_snapshot(repo: Path, rev: str | None) -> tuple[str, str]:
    """(snapshot folder name, note for the source line) for a `models--org--name` folder, found
    with huggingface_hub's own cache lookups (snapshot_download offline, scan_cache_dir); the ref
    files are checked first, so that a damaged cache is named in one line."""
    snapshots = repo / "snapshots"
    repo_id = repo.name[len(REPO_PREFIX):].replace("--", "/", 1)
    if rev is not None:
        if not (COMMIT.fullmatch(rev) or REF_NAME.fullmatch(rev)):
            raise CheckpointError(f"@{rev}: not a revision (a commit hash of 40 hex digits, or a branch or tag "
                                  "name); pass a revision the cache holds, or a checkpoint directory")
        ref = repo / "refs" / rev
        commit = _read_ref(ref) if ref.is_file() else rev if COMMIT.fullmatch(rev) else None
        snapshot = commit and _cached_snapshot(repo, repo_id, commit)
        if snapshot is None:
            raise CheckpointError(f"{repo}: revision {rev} is not in the cache; pass a checkpoint directory, or "
                                  f"fetch the files a conversion reads with: {download_command(repo_id, rev)}")
        _require_inside(repo, snapshot)
        return commit, ""
    ref = repo / "refs" / "main"
    if ref.is_file():
        commit = _read_ref(ref)
        snapshot = _cached_snapshot(repo, repo_id, commit)
        if snapshot is None:
            raise CheckpointError(f"{ref}: names snapshot {commit}, but {snapshots / commit} does not exist; "
                                  "the download is incomplete: download it again or pass a checkpoint directory")
        _require_inside(repo, snapshot)
        return commit, ""
    found = _cached_revisions(repo, repo_id)
    if not found:
        raise CheckpointError(f"{repo}: no snapshots in the cache (empty or missing {snapshots}); "
                              "download the model again or pass a checkpoint directory")
    if len(found) == 1:
        _require_inside(repo, found[0])
        return found[0].name, ", the only snapshot; no refs/main"
    newest = max(found, key=lambda p: (p.stat().st_mtime_ns, p.name))
    _require_inside(repo, newest)
    return newest.name, f", the newest of {len(found)} snapshots; no refs/main"


def _cached_snapshot(repo: Path, repo_id: str, commit: str) -> Path | None:
    """The snapshot folder of `commit` as huggingface_hub finds it offline (None: not there, or a
    download it knows to be incomplete for the files a conversion reads)."""
    from huggingface_hub import snapshot_download

    try:
        found = snapshot_download(repo_id, revision=commit, cache_dir=repo.parent, local_files_only=True,
                                  allow_patterns=list(CONVERSION_FILES))
    except (OSError, ValueError):  # LocalEntryNotFoundError / IncompleteSnapshotError, a bad id
        return None
    return repo / "snapshots" / Path(found).name


def _cached_revisions(repo: Path, repo_id: str) -> list[Path]:
    """The snapshot folders of a repository without refs/main, as huggingface_hub's cache scan lists them."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        scanned = scan_cache_dir(repo.parent)
    except (CacheNotFound, OSError, ValueError):
        return []
    revisions = [r for cached in scanned.repos if cached.repo_id == repo_id and cached.repo_type == "model"
                 for r in cached.revisions]
    return [repo / "snapshots" / r.commit_hash for r in revisions]


def _read_ref(ref: Path) -> str:
    try:
        commit = ref.read_text().strip()
    except (OSError, UnicodeDecodeError):
        raise CheckpointError(f"{ref}: cannot read this ref file; download the model again") from None
    if not COMMIT.fullmatch(commit):
        raise CheckpointError(f"{ref}: does not hold a commit hash; download the model again")
    return commit


def _require_inside(repo: Path, snapshot: Path) -> None:
    """A snapshot folder is the cache's own, not a link to a directory elsewhere."""
    if snapshot.is_symlink() or repo.resolve() not in snapshot.resolve().parents:
        raise CheckpointError(f"{snapshot}: is a link out of the cache, not a snapshot folder; "
                              "download the model again or pass a checkpoint directory")


def _require_config(snapshot: Path) -> Path:
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(f"{snapshot}: cache snapshot has no config.json (or it points to a missing blob); "
                              "the download is incomplete: download it again")
    return snapshot


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def _expand_home(value: str, env: Mapping[str, str]) -> Path:
    if value == "~" or value.startswith("~/"):
        return _home(env) / value[2:]
    return Path(value)
