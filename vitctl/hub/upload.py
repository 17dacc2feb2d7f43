"""`push(ckpt, repo_id)`: one commit holding config.json, model.safetensors (or its shards and
index), params/ (Orbax) with include_jax, verify.json and probe.json when the checkpoint has
them, and a generated model card (vitctl.hub.card).

Nothing local goes up: provenance and reports in public form, and a file still holding this
machine's directories (or a temporary's name) refuses the push before anything is sent. The
repo is created when missing; weight files of an earlier push that this one no longer has are
deleted in the same commit. Afterwards every remote file's size and hash (LFS sha256, or git
blob id for small files) is checked against the local one. A push uploads only the files the
checkpoint format names, none reached by a symlink that leaves the checkpoint (or, for a
Hugging Face cache snapshot, that repo's cache folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import vitctl
from vitctl import checkpoint as ckpt_mod
from vitctl import untrusted
from vitctl.errors import CheckpointError, ConfigError
from vitctl.formats import layout
from vitctl.formats.layout import CONFIG, PARAMS, SAFETENSORS, SAFETENSORS_INDEX
from vitctl.hub.card import DEFAULT_LICENSE, PROBE_REPORT, VERIFY_REPORT, find_probe_report, find_verify_report, model_card, public_report
from vitctl.hub.checks import _json, _local_digest, _weight_map
from vitctl.hub.client import _endpoint, _hf
from vitctl.hub.errors import HubError, _hub_errors, _retry
from vitctl.hub.names import CARD, WEIGHT_PATTERNS, _matches, check_endpoint, parse_repo


def push(
    ckpt: str | Path, repo_id: str, *, revision: str | None = None, private: bool = False, message: str | None = None,
    include_jax: bool = False, endpoint: str | None = None, license: str = DEFAULT_LICENSE,
) -> dict[str, Any]:  # fmt: skip
    """Uploads a checkpoint directory as one commit and checks the remote copy; returns a summary dict.

    Nothing local is published: config.json goes up with its provenance through
    checkpoint.public_provenance (a copy, when the file on disk still holds a local path), the
    generated card and reports are built from public forms, and every text file of the commit
    (and each safetensors header) is searched for this machine's directories before anything is
    sent: a hit refuses the push (`check_public`)."""
    ckpt = Path(ckpt)
    repo_id, rev = parse_repo(repo_id)
    if rev is not None:
        raise ConfigError(f"push takes a repo id without @revision, got '{repo_id}@{rev}'", hint="pass the branch with --revision")
    check_endpoint(endpoint)
    files = checkpoint_files(ckpt, include_jax)  # first: the card below reads config.json, which must be the checkpoint's own
    cfg = layout.read_checkpoint_config(ckpt)
    report, probe = find_verify_report(ckpt), find_probe_report(ckpt)
    extra = _generated(ckpt, cfg, repo_id, files, report, probe, license)
    check_public(ckpt, {rel: path for rel, path in files.items() if rel not in extra} | extra)
    hf = _hf()
    endpoint = _endpoint(endpoint, hf)
    if hf.constants.is_offline_mode():
        raise HubError("offline mode is on (HF_HUB_OFFLINE), and a push needs the Hub", hint="unset HF_HUB_OFFLINE to push")
    branch = revision or "main"
    title = message or f"vitctl {vitctl.__version__}: push {ckpt.name}"
    adds, stale, sha, remote = _upload(hf.HfApi(endpoint=endpoint), endpoint, repo_id, branch, private, files, extra, title)
    listed = _check_remote(adds, remote, f"{repo_id}@{sha[:12]}")
    return {
        "repo_id": repo_id, "revision": branch, "commit": sha, "url": f"{endpoint}/{repo_id}", "private": private,
        "files": listed, "deleted": stale, "bytes": sum(f["size"] for f in listed), "verified": True,
        "verify_report": report is not None, "probe_report": probe is not None, "license": license,
        "scrubbed": [CONFIG] if CONFIG in extra else [], "source": str(ckpt),
    }  # fmt: skip


def _generated(
    ckpt: Path, cfg: Any, repo_id: str, files: dict[str, Path], report: dict | None, probe: dict | None, license: str
) -> dict[str, bytes]:  # fmt: skip
    """{path in repo: bytes} of what the push writes itself: the model card, the reports in public
    form, and config.json when its provenance must be made public first."""
    card = model_card(ckpt, cfg, repo_id, files, report, license, probe)
    extra = {CARD: card.encode(), CONFIG: _public_config(files[CONFIG])}
    extra.update(
        {name: json.dumps(public_report(r), indent=2).encode() for name, r in ((VERIFY_REPORT, report), (PROBE_REPORT, probe)) if r}
    )
    return {k: v for k, v in extra.items() if v is not None}


def _upload(
    api: Any, endpoint: str, repo_id: str, branch: str, private: bool, files: dict[str, Path], extra: dict[str, bytes], title: str
) -> tuple[list[Any], list[str], str, dict[str, Any]]:  # fmt: skip
    """Creates the repo (and branch) when missing and commits `files` and `extra` in one commit,
    deleting weight files of an earlier push that this one no longer has. Returns (the add
    operations, the deleted paths, the commit SHA, {path: RepoFile} of that commit)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    with _hub_errors(repo_id, branch, endpoint):
        _retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True))
        if branch != "main":
            _retry(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True))
        adds = [CommitOperationAdd(rel, str(path)) for rel, path in files.items() if rel not in extra]
        adds += [CommitOperationAdd(rel, data) for rel, data in extra.items()]
        remote_before = _retry(lambda: api.list_repo_files(repo_id, revision=branch))
        stale = [p for p in remote_before if _matches(p, WEIGHT_PATTERNS) and p not in files]
        ops = adds + [CommitOperationDelete(p) for p in stale]
        sha = _retry(lambda: api.create_commit(repo_id, ops, commit_message=title, revision=branch)).oid
        remote = {f.path: f for f in _retry(lambda: api.list_repo_tree(repo_id, revision=sha, recursive=True)) if isinstance(f, RepoFile)}
    return adds, stale, sha, remote


def _check_remote(adds: list[Any], remote: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """[{"path", "size", "sha256", "lfs"}] of the uploaded files, once each remote file's size and
    hash match the local one; else a HubError."""
    listed = []
    for op in adds:
        r = remote.get(op.path_in_repo)
        # LFS files: the sha256 the client hashed from the local file for the upload (one pass over
        # the data); small regular files: their git blob id, computed here.
        local = {"size": op.upload_info.size, "sha256": op.upload_info.sha256.hex()}
        if r is not None and not r.lfs:
            local = _local_digest(op.path_or_fileobj)
        got = None if r is None else (r.size, r.lfs.sha256 if r.lfs else None, r.blob_id)
        if r is None or r.size != local["size"] or (r.lfs.sha256 != local["sha256"] if r.lfs else r.blob_id != local["git_oid"]):
            raise HubError(
                f"after the push, {where}:{op.path_in_repo} does not match the local file "
                f"(local {local['size']} bytes sha256 {local['sha256'][:16]}..., remote {got})",
                hint="push again; if it persists, the Hub or a proxy is altering uploads",
            )
        listed.append({"path": op.path_in_repo, "size": local["size"], "sha256": local["sha256"], "lfs": r.lfs is not None})
    return listed


def checkpoint_files(ckpt: Path, include_jax: bool) -> dict[str, Path]:
    """{path in repo: local file} of what a push uploads: config.json, the safetensors weights
    (model.safetensors, or the index and the shards it names), and params/ if asked; nothing
    else. Each file, symlinks followed, lies inside `ckpt` (or inside the Hugging Face cache
    folder of the repo whose snapshot `ckpt` is); the values are those real paths."""
    formats = layout.detect_formats(ckpt)
    if layout.TORCH not in formats and layout.TIMM not in formats and not include_jax:
        raise ConfigError(
            f"{ckpt} has no PyTorch weights ({SAFETENSORS}); its formats: {', '.join(formats) or 'none'}",
            hint=f"pass --include-jax to push params/, or convert first: vitctl convert jax-to-torch {ckpt} DST",
        )
    if include_jax and layout.JAX not in formats:
        raise ConfigError(f"--include-jax: {ckpt} has no JAX weights ({PARAMS}/)", hint="drop --include-jax")
    from vitctl.formats.base import hf_cache_repo

    also = hf_cache_repo(ckpt)

    def local(rel: str) -> Path:
        path = ckpt / untrusted.check_name(rel, str(ckpt))
        real = untrusted.inside(ckpt, path, str(ckpt), also=also)
        if not real.is_file():
            raise CheckpointError(f"{path} is not a file", hint="a checkpoint file is missing: re-create or re-download the checkpoint")
        return real

    files = {CONFIG: local(CONFIG)}
    if (ckpt / SAFETENSORS_INDEX).is_file():
        files[SAFETENSORS_INDEX] = local(SAFETENSORS_INDEX)
        files.update({s: local(s) for s in sorted(set(_weight_map(files[SAFETENSORS_INDEX], str(ckpt / SAFETENSORS_INDEX)).values()))})
    elif (ckpt / SAFETENSORS).is_file():
        files[SAFETENSORS] = local(SAFETENSORS)
    if include_jax:
        for p in untrusted.walk_files(ckpt / PARAMS, str(ckpt), also=also if also is not None else ckpt):
            files[untrusted.check_name(p.relative_to(ckpt).as_posix(), str(ckpt))] = p.resolve()
    return files


def _public_config(path: Path) -> bytes | None:
    """config.json with its provenance in public form, if the file holds a local path (a checkpoint
    written before vitctl stored provenance so); None when the file can go up as it is."""
    config = _json(path, CONFIG)
    provenance = config.get("provenance")
    if not isinstance(provenance, dict) or (public := ckpt_mod.public_provenance(provenance)) == provenance:
        return None
    return (json.dumps({**config, "provenance": public}, indent=2) + "\n").encode()


def local_markers(ckpt: Path) -> list[str]:
    """Strings that only this machine's files hold: the checkpoint's directory (as given and
    resolved), the home directory, and a temporary's name (`.tmp-`)."""
    dirs = {str(ckpt.absolute().parent), str(ckpt.resolve().parent), os.path.expanduser("~")}
    return sorted(d for d in dirs if d.strip("/") and len(d) > 4) + [".tmp-"]


def check_public(ckpt: Path, uploads: dict[str, Path | bytes]) -> None:
    """Refuses (CheckpointError, nothing uploaded) a push whose files hold a local path: every text
    file (JSON, the card, Orbax metadata) whole, and the header of each safetensors file."""
    from vitctl.formats.safetensors import MAX_HEADER_BYTES

    markers = [m.encode() for m in local_markers(ckpt)]
    for rel, src in uploads.items():
        if isinstance(src, bytes):
            data = src
        elif rel.endswith(".safetensors"):
            with open(src, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                data = f.read(min(n, MAX_HEADER_BYTES))
        elif os.path.getsize(src) <= untrusted.JSON_MAX_BYTES:
            data = Path(src).read_bytes()
            try:
                data.decode()
            except UnicodeDecodeError:
                continue  # array data, not text
        else:
            continue
        if hit := next((m for m in markers if m in data), None):
            raise CheckpointError(
                f"{ckpt}/{rel} holds the local path {hit.decode()!r}; push publishes nothing of this machine's directories",
                hint=f"rewrite {rel} without it (re-create the checkpoint with this vitctl, or edit the file); nothing was uploaded",
            )
