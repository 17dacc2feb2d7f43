"""Push and pull vitctl checkpoints on the Hugging Face Hub (huggingface_hub 2.x).

- `push(ckpt, repo_id)`: one commit holding config.json, model.safetensors (or its shards
  and index), params/ (Orbax) with include_jax, verify.json and probe.json when the checkpoint
  has them, and a generated model card (vitctl.hub_card). Nothing local goes up: provenance
  and reports in public form, and a file still holding this machine's directories (or a
  temporary's name) refuses the push before anything is sent. The repo is created when
  missing; weight files of an earlier push that this one no longer has are deleted in the
  same commit. Afterwards every remote file's size and hash (LFS sha256, or git blob id
  for small files) is checked against the local one.
- `pull("org/name@rev", out)`: resolves the revision to a commit SHA, lists the repo once,
  downloads only the listed files the backend needs into the Hugging Face cache (snapshot
  pinned to that SHA), checks every file (index vs shards, safetensors headers parsed
  without pickle, sizes and sha256 against the listing), re-fetches only bad files, checks
  that config.json describes the weights, then copies exactly the listed files into `out`
  atomically with the SHA in config.json's provenance. Offline (`offline=True` or
  HF_HUB_OFFLINE=1) it reads the cache only and says so when something is not there.
  SIGTERM, like Ctrl-C, stops it and leaves nothing behind.
- `resolve_checkpoint("hf://org/name@rev")`: the same fetch, returning the cached
  snapshot directory; local paths come back unchanged without importing huggingface_hub.

A Hub repo is a stranger's: every name in its listing and index passes untrusted.check_name
before anything is downloaded, and the response headers that huggingface_hub turns into
cache paths (ETag, X-Repo-Commit) are checked the same way (`_check_headers`). A push
uploads only the files the checkpoint format names, none reached by a symlink that leaves
the checkpoint (or, for a Hugging Face cache snapshot, that repo's cache folder).

Tokens come from huggingface_hub's usual sources (HF_TOKEN, the saved login); vitctl never
reads, prints or logs them. Transient failures (5xx, 429, refused or dropped connections,
cut-short downloads) are retried a few times; the rest map to a VitctlError with a hint.
huggingface_hub is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import vitctl
from vitctl import checkpoint as ckpt_mod
from vitctl import untrusted
from vitctl.checkpoint import CONFIG, PARAMS, SAFETENSORS, SAFETENSORS_INDEX
from vitctl.errors import CheckpointError, ConfigError, MissingDependencyError, UnmappedParamError, VitctlError
from vitctl.hub_card import DEFAULT_LICENSE, PROBE_REPORT, VERIFY_REPORT, find_probe_report, find_verify_report, model_card, public_report

SCHEME = "hf://"
CARD = "README.md"
# What each backend needs from a repo (fnmatch patterns, as huggingface_hub's allow_patterns).
NEEDS = {
    "config": [CONFIG],
    "torch": [CONFIG, SAFETENSORS, SAFETENSORS_INDEX, "model-*-of-*.safetensors"],
    "jax": [CONFIG, f"{PARAMS}/*"],
}
NEEDS["all"] = sorted({*NEEDS["torch"], *NEEDS["jax"], CARD, VERIFY_REPORT, PROBE_REPORT})
WEIGHT_PATTERNS = [SAFETENSORS, SAFETENSORS_INDEX, "model-*-of-*.safetensors", f"{PARAMS}/*"]
# org/name; the name is the default output folder of a pull, so it cannot be "." or start with one.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")
REVISION = re.compile(r"[\w.+-]+(/[\w.+-]+)*")  # a branch, tag or SHA; "refs/pr/1" has slashes
COMMIT = re.compile(r"[0-9a-f]{40}")
# huggingface_hub names cache files after these response headers (blobs/ETAG, snapshots/COMMIT):
# each must be one plain path segment.
CACHE_NAME_HEADERS = ("X-Repo-Commit", "ETag", "X-Linked-Etag", "X-Xet-Hash")
SAFE_SEGMENT = re.compile(r"[\w+=-][\w.+=-]{0,254}")
DAMAGED_REPO = "the repo is damaged or hostile: do not use it; try another revision or ask its owner"
TRIES, WAIT = 3, 0.5  # transient failures: 3 tries, 0.5 s then 1 s apart
TOKEN_HINT = "set HF_TOKEN or run `hf auth login` with a token that can access the repo (vitctl never prints it)"
ENDPOINT_HINT = "check --endpoint / HF_ENDPOINT (the Hub asked)"
XET_HINT = "retry; if it keeps failing, set HF_HUB_DISABLE_XET=1 to transfer over plain HTTP instead of Xet storage"
T = TypeVar("T")


class HubError(VitctlError):
    """The Hub (or the network to it) refused or failed an operation."""


def is_hub_uri(arg: str | os.PathLike) -> bool:
    return str(arg).startswith(SCHEME)


def parse_repo(spec: str) -> tuple[str, str | None]:
    """ "hf://org/name@rev", "org/name@rev" or "org/name" -> (repo_id, rev or None)."""
    s = str(spec).removeprefix(SCHEME)
    repo_id, _, rev = s.partition("@")
    bad_rev = _ and not (REVISION.fullmatch(rev) and all(p not in (".", "..") for p in rev.split("/")))
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or bad_rev:
        raise ConfigError(f"'{spec}' is not a Hub repo id", hint="write it as org/name or org/name@revision (a branch, tag or commit SHA)")
    return repo_id, rev or None


def check_endpoint(endpoint: str | None) -> str | None:
    """The Hub URL from --endpoint, else HF_ENDPOINT (None when neither is set), if it is an
    http(s) URL with a host; else a usage error (before anything is read or written)."""
    source, url = ("--endpoint", endpoint) if endpoint is not None else ("HF_ENDPOINT", os.environ.get("HF_ENDPOINT") or None)
    if url is None:
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() or ord(c) < 32 for c in url)
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(
            f"{source} must be an http(s) URL, got {url!r}",
            hint="for example https://huggingface.co, or http://127.0.0.1:8080 for a local Hub",
        )
    return url.rstrip("/")


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


# Push.
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
    cfg = ckpt_mod.read_checkpoint_config(ckpt)
    report, probe = find_verify_report(ckpt), find_probe_report(ckpt)
    card = model_card(ckpt, cfg, repo_id, files, report, license, probe)
    extra = {CARD: card.encode(), CONFIG: _public_config(files[CONFIG])}
    extra.update(
        {name: json.dumps(public_report(r), indent=2).encode() for name, r in ((VERIFY_REPORT, report), (PROBE_REPORT, probe)) if r}
    )
    extra = {k: v for k, v in extra.items() if v is not None}
    check_public(ckpt, {rel: path for rel, path in files.items() if rel not in extra} | extra)
    hf = _hf()
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    endpoint = _endpoint(endpoint, hf)
    if hf.constants.is_offline_mode():
        raise HubError("offline mode is on (HF_HUB_OFFLINE), and a push needs the Hub", hint="unset HF_HUB_OFFLINE to push")
    api = hf.HfApi(endpoint=endpoint)
    branch = revision or "main"
    with _hub_errors(repo_id, branch, endpoint):
        _retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True))
        if branch != "main":
            _retry(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True))
        adds = [CommitOperationAdd(rel, str(path)) for rel, path in files.items() if rel not in extra]
        adds += [CommitOperationAdd(rel, data) for rel, data in extra.items()]
        remote_before = _retry(lambda: api.list_repo_files(repo_id, revision=branch))
        stale = [p for p in remote_before if _matches(p, WEIGHT_PATTERNS) and p not in files]
        ops = adds + [CommitOperationDelete(p) for p in stale]
        title = message or f"vitctl {vitctl.__version__}: push {ckpt.name}"
        commit = _retry(lambda: api.create_commit(repo_id, ops, commit_message=title, revision=branch))
        sha = commit.oid
        remote = {f.path: f for f in _retry(lambda: api.list_repo_tree(repo_id, revision=sha, recursive=True)) if isinstance(f, RepoFile)}
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
                f"after the push, {repo_id}@{sha[:12]}:{op.path_in_repo} does not match the local file "
                f"(local {local['size']} bytes sha256 {local['sha256'][:16]}..., remote {got})",
                hint="push again; if it persists, the Hub or a proxy is altering uploads",
            )
        listed.append({"path": op.path_in_repo, "size": local["size"], "sha256": local["sha256"], "lfs": r.lfs is not None})
    return {
        "repo_id": repo_id, "revision": branch, "commit": sha, "url": f"{endpoint}/{repo_id}", "private": private,
        "files": listed, "deleted": stale, "bytes": sum(f["size"] for f in listed), "verified": True,
        "verify_report": report is not None, "probe_report": probe is not None, "license": license,
        "scrubbed": [CONFIG] if CONFIG in extra else [], "source": str(ckpt),
    }  # fmt: skip


def checkpoint_files(ckpt: Path, include_jax: bool) -> dict[str, Path]:
    """{path in repo: local file} of what a push uploads: config.json, the safetensors weights
    (model.safetensors, or the index and the shards it names), and params/ if asked; nothing
    else. Each file, symlinks followed, lies inside `ckpt` (or inside the Hugging Face cache
    folder of the repo whose snapshot `ckpt` is); the values are those real paths."""
    formats = ckpt_mod.detect_formats(ckpt)
    if ckpt_mod.TORCH not in formats and ckpt_mod.TIMM not in formats and not include_jax:
        raise ConfigError(
            f"{ckpt} has no PyTorch weights ({SAFETENSORS}); its formats: {', '.join(formats) or 'none'}",
            hint=f"pass --include-jax to push params/, or convert first: vitctl convert jax-to-torch {ckpt} DST",
        )
    if include_jax and ckpt_mod.JAX not in formats:
        raise ConfigError(f"--include-jax: {ckpt} has no JAX weights ({PARAMS}/)", hint="drop --include-jax")
    from vitctl.convert.io import hf_cache_repo

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
    from vitctl.convert.io import MAX_HEADER_BYTES

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


# Pull.
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
    return {**got, "path": str(out), "formats": ckpt_mod.detect_formats(out)}


def check_config(snap: Path, files: list[str], where: str) -> dict[str, Any]:
    """The parsed config.json of a fetched repo, if it is a vitctl model config that describes the
    weights fetched with it: safetensors tensor names and shapes (from the headers), Orbax array
    names (from params/_METADATA). Else a CheckpointError naming the repo and the file."""
    from vitctl.config import ViTConfig
    from vitctl.convert.io import read_safetensors_header
    from vitctl.convert.mapping import check_coverage, jax_param_shapes, torch_param_shapes

    source = f"{where}:{CONFIG}"
    config = _json(snap / CONFIG, source)
    try:
        cfg = ViTConfig.from_dict(config.get("model", config))
    except ConfigError as e:
        raise CheckpointError(f"{source} does not describe a vitctl model: {e.message}", hint=DAMAGED_REPO) from None
    hint = f"{CONFIG} does not belong to these weights; {DAMAGED_REPO}"
    timm = "architecture" in config and isinstance(config.get("model_args"), dict)  # a timm export (vitctl convert --format timm)
    if SAFETENSORS_INDEX in files or SAFETENSORS in files:
        weights = SAFETENSORS_INDEX if SAFETENSORS_INDEX in files else SAFETENSORS
        shards = sorted(set(_weight_map(snap / weights, f"{where}:{weights}").values())) if weights == SAFETENSORS_INDEX else [weights]
        got: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            got.update({name: info.shape for name, (info, _) in read_safetensors_header(snap / shard)[1].items()})
        # Layers from the tensor names first: a config claiming a million layers is refused
        # before the expected names are built.
        depth = 1 + max((int(m.group(1)) for n in got if (m := re.match(r"blocks\.(\d+)\.", n))), default=-1)
        if depth != cfg.depth:
            raise CheckpointError(f"{source} says depth {cfg.depth}, but {where}:{weights} holds {depth} blocks", hint=hint)
        try:
            if timm:
                from vitctl.convert.timm import timm_param_shapes

                expected = timm_param_shapes(cfg)
            else:
                expected = torch_param_shapes(cfg)
            check_coverage(got, expected, f"{where}:{weights}")
        except (UnmappedParamError, ConfigError) as e:
            raise CheckpointError(f"{e.message} ({source})", hint=hint) from None
    if f"{PARAMS}/_METADATA" in files:
        meta_source = f"{where}:{PARAMS}/_METADATA"
        meta = _json(snap / PARAMS / "_METADATA", meta_source)
        try:
            names = {"/".join(str(k["key"]) for k in entry["key_metadata"]) for entry in meta["tree_metadata"].values()}
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{meta_source} is not an Orbax tree: no tree_metadata with key_metadata", hint=DAMAGED_REPO) from None
        expected = set(jax_param_shapes(cfg))
        if names != expected:
            diff = sorted(names - expected)[:4] + sorted(expected - names)[:4]
            raise CheckpointError(f"{meta_source} does not match the model in {source}: {', '.join(diff)} differ", hint=hint)
    return config


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
    from huggingface_hub.file_download import repo_folder_name

    endpoint = _endpoint(endpoint, hf)
    offline = offline or hf.constants.is_offline_mode()
    patterns = NEEDS[backend]
    api = hf.HfApi(endpoint=endpoint)
    remote: dict[str, Any] | None = None
    with _hub_errors(repo_id, rev or "main", endpoint, offline):
        if offline:
            snap = Path(hf.snapshot_download(repo_id, revision=rev, allow_patterns=patterns, local_files_only=True))
            sha = _commit(snap.name, repo_id, rev, "the local cache")
            where = f"{repo_id}@{sha[:12]}"
            cached = (
                p.relative_to(snap).as_posix() for p in untrusted.walk_files(snap, f"the cached copy of {where}", also=snap.parent.parent)
            )
            files = sorted(untrusted.check_name(f, f"the cached copy of {where}") for f in cached if _matches(f, patterns))
            _require(repo_id, sha, files, backend, offline=True, snap=snap)
        else:
            sha = _commit(_retry(lambda: api.repo_info(repo_id, revision=rev).sha), repo_id, rev, endpoint)
            where = f"{repo_id}@{sha[:12]}"
            remote = _listed(_retry(lambda: list(api.list_repo_tree(repo_id, revision=sha, recursive=True))), where, patterns)
            files = sorted(remote)
            snap = Path(hf.constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / sha
            if CONFIG in files and backend == "jax" and not any(f.startswith(PARAMS + "/") for f in files):
                _download(hf, repo_id, CONFIG, sha, endpoint, snap)  # (what it is decides the message)
            _require(repo_id, sha, files, backend, snap=snap)
            for rel in files:
                _download(hf, repo_id, rel, sha, endpoint, snap)
        bad = check_files(snap, files, remote, where)
        refetched = sorted(bad)
        if bad and offline:
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
    if not offline and (rev or "main") != sha:
        _cache_ref(hf, repo_id, rev or "main", sha)
    size = sum((snap / f).stat().st_size for f in files)
    return {
        "repo_id": repo_id, "commit": sha, "snapshot": str(snap), "files": files, "bytes": size, "refetched": refetched,
        "offline": offline, "endpoint": endpoint, "backend": backend,
    }  # fmt: skip


def _commit(sha: Any, repo_id: str, rev: str | None, source: str) -> str:
    """`sha` if it is a commit id: the Hugging Face cache names a folder after it."""
    if not isinstance(sha, str) or not COMMIT.fullmatch(sha):
        raise HubError(
            f"{source} gave {sha!r} as the commit of {repo_id}@{rev or 'main'}, which is not a commit id",
            hint="the endpoint is not a Hugging Face Hub, or it is damaged: check --endpoint / HF_ENDPOINT",
        )
    return sha


def _listed(listing: list[Any], where: str, patterns: list[str]) -> dict[str, Any]:
    """{path: RepoFile} of the listed files that match `patterns`, once every listed name is
    checked: each a clean relative path, listed once, and no file also a folder of another."""
    from huggingface_hub.hf_api import RepoFile

    what = f"the file list of {where}"
    listed: dict[str, Any] = {}
    for entry in sorted(listing, key=lambda e: not isinstance(e, RepoFile)):  # files first: an error names the file, not its folder
        path = untrusted.check_name(getattr(entry, "path", None), what)
        if isinstance(entry, RepoFile):
            if path in listed:
                raise CheckpointError(f"{what} names the file {path!r} twice", hint=DAMAGED_REPO)
            listed[path] = entry
    for path in listed:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in listed:
                raise CheckpointError(f"{what} names {parent!r} both as a file and as the folder of {path!r}", hint=DAMAGED_REPO)
            parent = parent.rpartition("/")[0]
    return {p: f for p, f in listed.items() if _matches(p, patterns)}


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


def _require(repo_id: str, sha: str, files: list[str], backend: str, offline: bool = False, snap: Path | None = None) -> None:
    """Refuses a repo that lacks what `backend` needs; `snap`: the snapshot holding its config.json, once fetched."""
    where = f"{repo_id}@{sha[:12]}"
    if offline:  # the cache holds what earlier pulls fetched, not necessarily what the repo has
        where, again = f"the cached copy of {where}", f"pull it online: vitctl hub pull {repo_id}@{sha} --backend {backend}"
    if CONFIG not in files:
        raise CheckpointError(
            f"{where} has no {CONFIG}: not a vitctl checkpoint", hint=again if offline else "check the repo id and revision"
        )
    torch = SAFETENSORS in files or SAFETENSORS_INDEX in files
    jax = any(f.startswith(PARAMS + "/") for f in files)
    if backend == "torch" and not torch:
        raise CheckpointError(f"{where} has no PyTorch weights ({SAFETENSORS})", hint=again if offline else "try --backend jax")
    if backend == "jax" and not jax:
        if snap is not None and ckpt_mod.is_timm_config(snap / CONFIG):
            raise ckpt_mod.timm_export_error(f"{SCHEME}{repo_id}@{sha}", "hub pull --backend jax", load=f"hf-hub:{repo_id}@{sha}")
        hint = again if offline else "try --backend torch, then vitctl convert torch-to-jax"
        raise CheckpointError(f"{where} has no JAX weights ({PARAMS}/)", hint=hint)
    if backend == "all" and not (torch or jax):
        raise CheckpointError(f"{where} holds no weights", hint=again if offline else "check the repo id and revision")


def check_files(snap: Path, files: list[str], remote: dict[str, Any] | None, where: str) -> dict[str, str]:
    """{file: what is wrong} for files in the snapshot: missing, size or sha256 differing from the
    remote listing (when online), safetensors headers that do not parse or disagree with the index.
    An index that is no index, or names a shard outside the checkpoint, is an error at once."""
    bad: dict[str, str] = {}
    for rel in files:
        path = snap / rel
        if not path.is_file():
            bad[rel] = "missing"
            continue
        r = remote.get(rel) if remote else None
        if r is not None:
            d = _local_digest(str(path))
            if d["size"] != r.size:
                bad[rel] = f"{d['size']} bytes, the repo lists {r.size}"
            elif (d["sha256"] != r.lfs.sha256) if r.lfs else (d["git_oid"] != r.blob_id):
                bad[rel] = "content differs from the repo's hash"
    if SAFETENSORS_INDEX not in bad:  # (a damaged index is re-fetched before it is read)
        bad.update({k: v for k, v in _check_safetensors(snap, files, where).items() if k not in bad})
    return bad


def _check_safetensors(snap: Path, files: list[str], where: str) -> dict[str, str]:
    """Each shard's header parses (JSON, no pickle), fits the file, and holds the tensors the index gives it."""
    from vitctl.convert.io import read_safetensors_header

    bad: dict[str, str] = {}
    assigned: dict[str, set[str]] | None = None
    if SAFETENSORS_INDEX in files:
        assigned = {}
        for name, shard in _weight_map(snap / SAFETENSORS_INDEX, f"{where}:{SAFETENSORS_INDEX}").items():
            assigned.setdefault(shard, set()).add(name)
        for shard in assigned:
            if shard not in files:
                bad[shard] = f"named by {SAFETENSORS_INDEX} but not in the repo's file list"
    shards = list(assigned) if assigned is not None else [f for f in files if f == SAFETENSORS]
    for shard in shards:
        if shard in bad or not (snap / shard).is_file():
            bad.setdefault(shard, "missing")
            continue
        try:
            _, tensors = read_safetensors_header(snap / shard)
        except CheckpointError as e:
            bad[shard] = e.message
            continue
        if assigned is not None and set(tensors) != assigned[shard]:
            bad[shard] = f"holds {len(tensors)} tensors, the index assigns it {len(assigned[shard])}"
    return bad


def _json(path: Path, source: str) -> Any:
    """A JSON object from a file of a checkpoint, bounded in size and depth; errors name `source`."""
    try:
        size = path.stat().st_size
        if size > untrusted.JSON_MAX_BYTES:
            raise CheckpointError(f"{source} is {size:,} bytes, more than any JSON file vitctl reads", hint=DAMAGED_REPO)
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {source}: {e.strerror or e}", hint="check the path and its permissions") from None
    return untrusted.parse_json(data, source)


def _weight_map(index: Path, source: str) -> dict[str, str]:
    """{tensor: shard} of a safetensors index, every shard a checked relative file name."""
    weight_map = _json(index, source).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{source} has no weight_map of tensor names to shard files",
            hint='an index is {"metadata": {...}, "weight_map": {tensor: shard}}',
        )
    for shard in set(weight_map.values()):
        untrusted.check_name(shard, source)
    return weight_map


def _describe(bad: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in sorted(bad.items())[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")


# Helpers.
def _hf():
    try:
        import huggingface_hub
    except ImportError as e:
        raise MissingDependencyError(f"the Hub commands need huggingface_hub ({e})", hint="pip install 'vitctl[hub]'") from None
    global _guarded
    if not _guarded:
        from huggingface_hub.utils import _http

        def client_factory():
            client = _http.default_client_factory()
            client.event_hooks = {**client.event_hooks, "response": [*client.event_hooks["response"], _check_headers]}
            return client

        huggingface_hub.set_client_factory(client_factory)
        _guarded = True
    return huggingface_hub


_guarded = False


def _check_headers(response: Any) -> None:
    """Refuses a file response whose headers huggingface_hub would turn into a path that is not one
    plain segment (blobs/{ETag}, snapshots/{X-Repo-Commit}): a hostile server could make it write
    anywhere. Runs on every response huggingface_hub's client receives, before it reads them."""
    if "/resolve/" not in response.url.path:
        return
    for header in CACHE_NAME_HEADERS:
        value = response.headers.get(header)
        name = value if value is None or header == "X-Repo-Commit" else value.lstrip("W/").strip('"')  # as huggingface_hub strips it
        if name is not None and not SAFE_SEGMENT.fullmatch(name):
            raise HubError(
                f"{response.url.host} answered {urllib.parse.unquote(response.url.path)} with {header}: {value!r}, "
                "which would name a file outside the Hugging Face cache",
                hint="the endpoint is damaged or hostile: do not use it",
            )


def _endpoint(endpoint: str | None, hf: Any) -> str:
    return check_endpoint(endpoint) or hf.constants.ENDPOINT.rstrip("/")


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _local_digest(src: str | bytes) -> dict[str, Any]:
    """Size, sha256 (the LFS oid) and git blob id of a file path or bytes, read in 8 MiB blocks."""
    sha, git = hashlib.sha256(), hashlib.sha1()
    if isinstance(src, bytes):
        size = len(src)
        git.update(b"blob %d\0" % size)
        sha.update(src)
        git.update(src)
    else:
        size = os.path.getsize(src)
        git.update(b"blob %d\0" % size)
        with open(src, "rb") as f:
            while block := f.read(8 << 20):
                sha.update(block)
                git.update(block)
    return {"size": size, "sha256": sha.hexdigest(), "git_oid": git.hexdigest()}


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _transient(e: BaseException) -> bool:
    """5xx/429, refused or dropped connections, timeouts and cut-short downloads: worth another try."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for c in _chain(e):
        if isinstance(c, OfflineModeIsEnabled):
            return False
        if isinstance(c, HfHubHTTPError):
            s = _status(c)
            return s is not None and (s >= 500 or s == 429)
        if isinstance(c, httpx2.TransportError) or (isinstance(c, OSError) and "Consistency check failed" in str(c)):
            return True
    return False


def _retry(fn: Callable[[], T]) -> T:
    for i in range(TRIES):
        try:
            return fn()
        except Exception as e:
            if i == TRIES - 1 or not _transient(e):
                raise
            time.sleep(WAIT * 2**i)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _hub_errors(repo_id: str, rev: str, endpoint: str, offline: bool = False) -> Iterator[None]:
    """Maps huggingface_hub and network errors to HubError/CheckpointError with a hint (never the token)."""
    import httpx2
    from huggingface_hub import errors as he

    try:
        yield
    except VitctlError:
        raise
    except Exception as e:
        chain = list(_chain(e))
        first = lambda *types: next((c for c in chain if isinstance(c, types)), None)
        where = f"{repo_id}@{rev}"
        if offline and first(he.LocalEntryNotFoundError, he.OfflineModeIsEnabled):
            raise HubError(
                f"{where} is not (completely) in the local Hugging Face cache, and offline mode is on",
                hint=f"pull it once online: vitctl hub pull {where} (without --offline / HF_HUB_OFFLINE=1)",
            ) from None
        if c := xet_failure(e):
            raise HubError(
                f"Xet transfer failure on {where} ({endpoint}): {type(c).__name__}: {_short(c)}",
                hint=f"{TOKEN_HINT}; then {XET_HINT}" if isinstance(c, PermissionError) else XET_HINT,
            ) from None
        if c := first(he.RevisionNotFoundError):
            raise HubError(
                f"revision '{rev}' not found in {repo_id} on {endpoint} (HTTP 404)",
                hint=f"check the branch, tag or commit SHA (the repo exists); list them with `hf repos branches {repo_id}`",
            ) from None
        if c := first(he.RemoteEntryNotFoundError):
            raise HubError(
                f"a file of {where} is missing on {endpoint}: {_short(c)}", hint="check the revision; the repo may be incomplete"
            ) from None
        if c := first(he.HfHubHTTPError):
            status = _status(c)
            if status in (401, 403):
                raise HubError(f"{endpoint} refused access to {repo_id} (HTTP {status})", hint=TOKEN_HINT) from None
            if isinstance(c, he.RepositoryNotFoundError) or status == 404:
                raise HubError(
                    f"repo {repo_id} not found on {endpoint} (HTTP 404; a private repo you cannot access answers the same)",
                    hint=f"check the repo id (org/name) and {ENDPOINT_HINT}; for a private repo, {TOKEN_HINT}",
                ) from None
            if status is not None and (status >= 500 or status == 429):
                raise HubError(
                    f"{endpoint} failed with HTTP {status} on {where}, {TRIES} tries", hint="the Hub is having trouble; try again later"
                ) from None
            raise HubError(
                f"{endpoint} answered HTTP {status} on {where}: {_short(c)}", hint="check the repo id, revision and your access"
            ) from None
        if first(httpx2.ConnectError, httpx2.TimeoutException, ConnectionError):
            raise HubError(
                f"cannot reach the Hub at {endpoint}",
                hint="check --endpoint / HF_ENDPOINT and the network; cached repos also pull with --offline",
            ) from None
        if c := first(httpx2.TransportError) or next((c for c in chain if isinstance(c, OSError) and "Consistency check" in str(c)), None):
            raise HubError(
                f"the download of {where} from {endpoint} was cut short, {TRIES} tries", hint="try again; nothing was written"
            ) from None
        if c := first(he.LocalEntryNotFoundError):
            raise HubError(
                f"cannot fetch {where} from {endpoint} and it is not in the cache: {_short(c)}",
                hint="check --endpoint / HF_ENDPOINT and the network",
            ) from None
        raise


def xet_failure(e: BaseException) -> BaseException | None:
    """The Xet storage error in `e`'s chain, if the transfer failed there: huggingface_hub's
    XetDownloadError, or any exception of the hf_xet extension (XetAuthenticationError,
    XetObjectNotFoundError, and the errors its transfer engine raises)."""
    from huggingface_hub.errors import XetDownloadError

    return next((c for c in _chain(e) if isinstance(c, XetDownloadError) or type(c).__module__.split(".")[0] == "hf_xet"), None)


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
