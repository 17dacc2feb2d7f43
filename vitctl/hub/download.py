"""Downloads from the Hub: hf:// checkpoint arguments, `fetch` into the Hugging Face cache, `pull`.

- `fetch(repo_id, rev)`: resolves the revision to a commit SHA, lists the repo once,
  downloads only the listed files the backend needs into the Hugging Face cache (snapshot
  pinned to that SHA), checks every file (vitctl.hub.checks) and re-fetches only bad files.
  Offline (`offline=True` or HF_HUB_OFFLINE=1) it reads the cache only and says so when
  something is not there.
- `pull("org/name@rev", out)`: fetch, check that config.json describes the weights, then copy
  exactly the listed files into `out` atomically with the SHA in config.json's provenance.
  SIGTERM, like Ctrl-C, stops it and leaves nothing behind.
- `resolve_checkpoint("hf://org/name@rev")`: the same fetch, returning the cached snapshot
  directory; local paths come back unchanged without importing huggingface_hub.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from vitctl import checkpoint as ckpt_mod
from vitctl import untrusted
from vitctl.errors import CheckpointError, ConfigError
from vitctl.formats import layout
from vitctl.formats.layout import CONFIG, PARAMS
from vitctl.hub.checks import DAMAGED_REPO, _commit, _describe, _listed, _require, check_config, check_files
from vitctl.hub.client import _endpoint, _hf
from vitctl.hub.errors import HubError, _hub_errors, _retry
from vitctl.hub.names import NEEDS, SCHEME, _matches, check_endpoint, is_hub_uri, parse_repo


def resolve_checkpoint(
    arg: str | os.PathLike, *, endpoint: str | None = None, backend: str = "all", offline: bool = False, must_exist: bool = False
) -> Path:
    """A checkpoint argument as a local directory: paths unchanged (a usage error if `must_exist` and
    absent); `hf://org/name[@rev]` fetched (only what `backend` needs: config, jax, torch or all)
    into the Hugging Face cache, pinned to the commit SHA, checked, and returned as that snapshot's directory."""
    if not is_hub_uri(arg):
        if must_exist and not Path(arg).exists():
            raise ConfigError(f"no such file or directory: {arg}", hint="give a checkpoint directory, a .npz file or hf://org/name[@rev]")
        return Path(arg)
    repo_id, rev = parse_repo(str(arg))
    with untrusted.sigterm_as_interrupt():
        return Path(fetch(repo_id, rev, backend=backend, offline=offline, endpoint=endpoint)["snapshot"])


def pull(
    spec: str, out: str | Path | None = None, *, backend: str = "all", offline: bool = False, endpoint: str | None = None,
    force: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Fetches `org/name[@rev]` (checked, pinned to a commit SHA) into the directory `out` (default: ./name), atomically."""
    repo_id, rev = parse_repo(spec)
    check_endpoint(endpoint)
    out = Path(out) if out is not None else Path(repo_id.split("/")[-1])
    ckpt_mod.check_output(out, force)
    with untrusted.sigterm_as_interrupt():  # `kill` cleans up as Ctrl-C does: no temporary left beside `out`
        got = fetch(repo_id, rev, backend=backend, offline=offline, endpoint=endpoint)
        snap, files = Path(got["snapshot"]), got["files"]
        where = f"{repo_id}@{got['commit'][:12]}"
        config = check_config(snap, files, where)
        untrusted.require_disk(out.absolute().parent, got["bytes"], f"pulling {where}")
        with ckpt_mod.atomic_output(out, force) as tmp:
            own = {p.relative_to(tmp).as_posix() for p in untrusted.walk_files(tmp, where)}  # atomic_output's own records
            for rel in files:
                src = untrusted.inside(snap, snap / rel, where, also=snap.parent.parent)  # the cache's symlinks lead to ../../blobs
                dst = untrusted.member(tmp, rel, where)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            written = sorted(
                p.relative_to(tmp).as_posix() for p in untrusted.walk_files(tmp, where) if p.relative_to(tmp).as_posix() not in own
            )
            if written != files:  # exactly the listed files: nothing more, nothing less
                raise CheckpointError(f"copying {where} into {out} wrote {written}, not the listed {files}", hint="pull again")
            config["provenance"] = ckpt_mod.public_provenance({
                "source_format": "hub", "source": f"{SCHEME}{repo_id}@{got['commit']}", "repo_id": repo_id,
                "revision": got["commit"], "requested_revision": rev or "main", "endpoint": got["endpoint"],
                "backend": backend, "created_by": "vitctl hub pull", "upstream": config.get("provenance", {}),
            })  # fmt: skip
            ckpt_mod.write_json(tmp / CONFIG, config)
    return {**got, "path": str(out), "formats": layout.detect_formats(out)}


def fetch(repo_id: str, rev: str | None, *, backend: str = "all", offline: bool = False, endpoint: str | None = None) -> dict[str, Any]:
    """Downloads (or, offline, finds) what `backend` needs of repo_id@rev in the HF cache and checks it.

    Online the repo is listed once, every name in the listing is checked, and only listed files
    are downloaded, one after another in this thread (so that SIGTERM and Ctrl-C stop it at
    once), each pinned to the commit. Returns {"repo_id", "commit", "snapshot", "files",
    "bytes", "refetched", "offline", "endpoint", "backend"}.
    """
    if backend not in NEEDS:
        raise ConfigError(f"unknown backend '{backend}'", hint=f"choose one of {', '.join(NEEDS)}")
    hf = _hf()
    endpoint = _endpoint(endpoint, hf)
    offline = offline or hf.constants.is_offline_mode()
    remote: dict[str, Any] | None = None
    with _hub_errors(repo_id, rev or "main", endpoint, offline):
        if offline:
            snap, sha, files = _find_cached(hf, repo_id, rev, backend)
        else:
            snap, sha, remote = _download_listed(hf, repo_id, rev, backend, endpoint)
            files = sorted(remote)
        refetched = _refetch_bad(hf, repo_id, sha, endpoint, snap, files, remote)
    if not offline and (rev or "main") != sha:
        _cache_ref(hf, repo_id, rev or "main", sha)
    size = sum((snap / f).stat().st_size for f in files)
    return {
        "repo_id": repo_id, "commit": sha, "snapshot": str(snap), "files": files, "bytes": size, "refetched": refetched,
        "offline": offline, "endpoint": endpoint, "backend": backend,
    }  # fmt: skip


def _patterns(backend: str) -> list[str]:
    """The files `backend` fetches: NEEDS, and for safetensors Hugging Face's image processor settings
    (a transformers ViT's preprocessing; optional, fetched when the repo has one)."""
    return NEEDS[backend] + ([layout.PREPROCESSOR] if backend in ("torch", "all") else [])


def _find_cached(hf: Any, repo_id: str, rev: str | None, backend: str) -> tuple[Path, str, list[str]]:
    """(snapshot, commit, files) of what `backend` needs of repo_id@rev in the cache, offline."""
    patterns = _patterns(backend)
    snap = Path(hf.snapshot_download(repo_id, revision=rev, allow_patterns=patterns, local_files_only=True))
    sha = _commit(snap.name, repo_id, rev, "the local cache")
    where = f"the cached copy of {repo_id}@{sha[:12]}"
    cached = (p.relative_to(snap).as_posix() for p in untrusted.walk_files(snap, where, also=snap.parent.parent))
    files = sorted(untrusted.check_name(f, where) for f in cached if _matches(f, patterns))
    _require(repo_id, sha, files, backend, offline=True, snap=snap)
    return snap, sha, files


def _download_listed(hf: Any, repo_id: str, rev: str | None, backend: str, endpoint: str) -> tuple[Path, str, dict[str, Any]]:
    """(snapshot, commit, {path: RepoFile}): the repo listed once at its commit, and the listed
    files that `backend` needs downloaded into the cache snapshot of that commit."""
    from huggingface_hub.file_download import repo_folder_name

    api = hf.HfApi(endpoint=endpoint)
    sha = _commit(_retry(lambda: api.repo_info(repo_id, revision=rev).sha), repo_id, rev, endpoint)
    where = f"{repo_id}@{sha[:12]}"
    remote = _listed(_retry(lambda: list(api.list_repo_tree(repo_id, revision=sha, recursive=True))), where, _patterns(backend))
    files = sorted(remote)
    snap = Path(hf.constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / sha
    if CONFIG in files and backend == "jax" and not any(f.startswith(PARAMS + "/") for f in files):
        _download(hf, repo_id, CONFIG, sha, endpoint, snap)  # (what it is decides the message)
    _require(repo_id, sha, files, backend, snap=snap)
    for rel in files:
        _download(hf, repo_id, rel, sha, endpoint, snap)
    return snap, sha, remote


def _refetch_bad(hf: Any, repo_id: str, sha: str, endpoint: str, snap: Path, files: list[str], remote: dict[str, Any] | None) -> list[str]:
    """Checks the snapshot's files, re-fetches only the bad ones (online) and checks them again;
    returns the names re-fetched. Offline (`remote` None) a bad file is an error."""
    where = f"{repo_id}@{sha[:12]}"
    bad = check_files(snap, files, remote, where)
    if bad and remote is None:
        raise CheckpointError(
            f"the cached copy of {where} is damaged: {_describe(bad)}",
            hint="pull it again online (without --offline / HF_HUB_OFFLINE) to re-fetch the damaged files",
        )
    unlisted = {k: v for k, v in bad.items() if k not in remote}
    if unlisted:  # named by the index, absent from the listing: nothing to re-fetch
        raise CheckpointError(f"{where} is incomplete: {_describe(unlisted)}", hint=DAMAGED_REPO)
    for rel in bad:  # re-fetch only the bad files, then check them again
        _download(hf, repo_id, rel, sha, endpoint, snap, force=True)
    if bad:
        still = check_files(snap, files, remote, where)
        if still:
            raise CheckpointError(
                f"{where} serves files that do not match the repo's own listing: {_describe(still)}",
                hint="the repo or a proxy is corrupt; try again later or another revision",
            )
    return sorted(bad)


def _download(hf: Any, repo_id: str, rel: str, sha: str, endpoint: str, snap: Path, force: bool = False) -> None:
    """One listed file into the cache snapshot `snap` of commit `sha`."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    where = f"{repo_id}@{sha[:12]}"
    try:
        got = _retry(lambda: hf.hf_hub_download(repo_id, rel, revision=sha, endpoint=endpoint, force_download=force))
    except RemoteEntryNotFoundError:
        raise HubError(
            f"{rel} of {where} is listed but missing on {endpoint}", hint="check the revision; the repo may be incomplete"
        ) from None
    if os.path.abspath(got) != os.path.abspath(snap / rel):  # huggingface_hub files it under the commit the server names
        raise HubError(
            f"{endpoint} served {rel} of {where} as part of another commit",
            hint="the Hub or a proxy answered inconsistently; try again later",
        )


def _cache_ref(hf: Any, repo_id: str, rev: str, sha: str) -> None:
    """Records rev -> sha in the cache's refs/ (as huggingface_hub does), once the snapshot checked out,
    so that an offline pull of the same branch finds it. vitctl resolves the revision itself, so
    that an unreachable Hub is an error online rather than a silent fall-back to an older cached SHA."""
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(hf.constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / rev
    tmp = ref.with_name(f".{ref.name}.tmp-{os.getpid()}")
    with contextlib.suppress(OSError):  # best effort, like huggingface_hub: a read-only cache still pulls
        try:
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(sha)
            os.replace(tmp, ref)
        finally:
            tmp.unlink(missing_ok=True)
