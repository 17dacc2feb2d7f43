"""Checks of what a Hub repo serves, before vitctl uses it: a repo is a stranger's.

- `_listed`: every name in the listing is a clean relative path, listed once.
- `_require`: the repo holds what the backend needs.
- `check_files`: sizes and hashes against the listing; safetensors headers parse (JSON, no
  pickle) and agree with the index.
- `check_config`: config.json is a vitctl model config that describes the weights beside it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from vitctl import untrusted
from vitctl.errors import CheckpointError, ConfigError, UnmappedParamError
from vitctl.formats import layout
from vitctl.formats.layout import CONFIG, PARAMS, SAFETENSORS, SAFETENSORS_INDEX
from vitctl.hub.errors import HubError
from vitctl.hub.names import COMMIT, SCHEME, _matches

DAMAGED_REPO = "the repo is damaged or hostile: do not use it; try another revision or ask its owner"


def check_config(snap: Path, files: list[str], where: str) -> dict[str, Any]:
    """The parsed config.json of a fetched repo, if it is a vitctl model config that describes the
    weights fetched with it: safetensors tensor names and shapes (from the headers), Orbax array
    names (from params/_METADATA). Else a CheckpointError naming the repo and the file."""
    from vitctl.config import ViTConfig
    from vitctl.formats.safetensors import read_safetensors_header
    from vitctl.params import check_coverage, jax_param_shapes, torch_param_shapes

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
        if snap is not None and layout.is_timm_config(snap / CONFIG):
            raise layout.timm_export_error(f"{SCHEME}{repo_id}@{sha}", "hub pull --backend jax", load=f"hf-hub:{repo_id}@{sha}")
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
    from vitctl.formats.safetensors import read_safetensors_header

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
