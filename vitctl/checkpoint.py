"""Writing checkpoint directories safely: atomic outputs, `--force`, temporaries of killed runs,
atomic JSON, config.json with provenance in public form.

- Writes are atomic: build everything in a temporary sibling, then rename
  (`atomic_output`). `--force` replaces only a directory that vitctl wrote (`check_output`:
  its config.json or vitctl-run.json, and only entries that vitctl writes), never a user's
  folder. A temporary that a killed run left (SIGKILL, a native abort) is removed by the
  next run to the same output, once its owner process is known to be gone.
- config.json's provenance names where the weights came from in a form that means something
  elsewhere (`public_provenance`), never this machine's directories.

The directory's layout (config.json, params/, model.safetensors; saving and loading) is
vitctl.formats.layout. Importing this module loads neither jax, orbax nor torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import vitctl
from vitctl.config import PRESETS, ViTConfig
from vitctl.errors import CheckpointError, ConfigError, OutputError, OutputExistsError, VitctlError
from vitctl.formats.base import hf_snapshot
from vitctl.formats.layout import CONFIG, PARAMS, SAFETENSORS, SAFETENSORS_INDEX
from vitctl.untrusted import raise_if_interrupted, read_json

RUN_MARKER = "vitctl-run.json"  # marks a directory of several checkpoints that vitctl made (demo, train runs)


# What vitctl writes at the top of an output directory. `--force` replaces a directory only
# if it is vitctl's by its config (or run marker) and every entry in it is one of these, so it
# never deletes a user's files; a stale temporary is removed only if it holds nothing else.
CHECKPOINT_ENTRIES = {
    CONFIG: "file", PARAMS: "dir", SAFETENSORS: "file", SAFETENSORS_INDEX: "file",  # init, convert (and timm export), hub pull
    "README.md": "file", "verify.json": "file", "probe.json": "file",  # hub pull: the pushed repo's model card and reports
    "train_config.json": "file", "metrics.jsonl": "file", "metrics.png": "file", "state": "dir",  # train
}  # fmt: skip
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # convert --max-shard-size, hub pull
RUN_ENTRIES = {  # demo: a run directory of two checkpoints and the reports on them
    RUN_MARKER: "file", "model.json": "file", "verify.json": "file", "probe.json": "file", "demo.json": "file",
    "jax": "checkpoint", "torch": "checkpoint",
}  # fmt: skip
# A temporary beside one of those entries (write_json's `.config.json.tmp-1a2b3c4d`, train's
# `.params.tmp-STEP`, `.metrics.jsonl.tmp`), and Orbax's own temporary of params/.
HIDDEN_TEMPORARY = re.compile(r"\.(?P<base>.+)\.(tmp|old)(-\w+)?")
ORBAX_TEMPORARY = re.compile(rf"{PARAMS}\.orbax-checkpoint-tmp(-\d+)?")
# atomic_output's temporaries beside DST: `.DST.tmp-1a2b3c4d` (being built) and `.DST.old-1a2b3c4d`
# (the DST it replaces). Each holds OWNER while a process uses it: {"pid", "host", "start"}.
OWNER = ".vitctl-owner.json"


@contextlib.contextmanager
def atomic_output(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yields a new temporary sibling of `dst` (empty but for its OWNER record); on success it becomes `dst`.

    On any exception (KeyboardInterrupt included) the temporary is deleted and `dst`
    is untouched. An existing `dst` is refused unless `force`; with `force` it is
    replaced only once the new one is complete, and only if vitctl wrote it (see
    `check_output`). Temporaries of earlier runs to the same `dst` that were killed before
    they could clean up (SIGKILL, a native abort) are removed first, and reported on stderr.
    """
    dst = Path(dst)
    _check_replaceable(dst, force)
    reclaim_temporaries(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(4)}"
    try:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create {dst}: {e.strerror or e}", hint=f"check that {dst.parent} is a writable directory") from None
        _claim(tmp)
        yield tmp
        raise_if_interrupted()  # a signal whose KeyboardInterrupt was swallowed on the way still stops the commit
        _check_replaceable(dst, force)  # something may have appeared meanwhile
        (tmp / OWNER).unlink()
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{secrets.token_hex(4)}"
            dst.rename(old)
            try:
                with contextlib.suppress(OSError):
                    _claim(old)  # a kill before the removal below leaves it to the next run
                tmp.rename(dst)
            except BaseException:
                if not dst.exists():
                    old.rename(dst)
                    (dst / OWNER).unlink(missing_ok=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        remove_tree(tmp)
        raise


@contextlib.contextmanager
def atomic_file(dst: str | Path) -> Iterator[Path]:
    """Yields the path of a new temporary file beside `dst` (not yet created); on success it becomes `dst`.

    For one-file outputs (embeddings, an exported graph). An existing `dst` is refused (vitctl
    cannot tell a file it wrote from a user's); on any exception (KeyboardInterrupt included)
    the temporary is deleted and `dst` is untouched. The temporary's name carries its owner
    (pid, start time, a hash of the host name): one that a killed run left is removed by the
    next run to the same `dst` once that process is gone, and reported on stderr."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        raise OutputExistsError(f"{dst} already exists", hint="remove it yourself, or choose another output path")
    if not dst.parent.is_dir():
        raise OutputError(
            f"cannot create {dst}: {dst.parent} is not a directory", hint="create the directory first, or choose another path"
        )
    _reclaim_files(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(4)}-{os.getpid()}-{_start_time(os.getpid()) or 0}-{_host_tag()}"
    try:
        yield tmp
        raise_if_interrupted()
        if dst.exists() or dst.is_symlink():  # something appeared meanwhile
            raise OutputExistsError(f"{dst} appeared while vitctl was writing it", hint="remove it yourself, or choose another output path")
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _reclaim_files(dst: Path) -> None:
    """Removes atomic_file's temporaries of `dst` whose process, on this host, no longer runs."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.tmp-[0-9a-f]{{8}}-(?P<pid>\d+)-(?P<start>\d+)-(?P<host>[0-9a-f]{{8}})")
    with contextlib.suppress(OSError):
        for p in sorted(dst.parent.iterdir()):
            m = pattern.fullmatch(p.name)
            if m is None or m["host"] != _host_tag() or p.is_symlink() or not p.is_file():
                continue
            owner = {"pid": int(m["pid"]), "host": socket.gethostname(), "start": int(m["start"]) or None}
            if _owner_alive(owner) is False:
                p.unlink(missing_ok=True)
                _note(f"removed {p}, a temporary left by an interrupted vitctl run (process {owner['pid']}, no longer running)")


def remove_tree(path: Path, tries: int = 40) -> None:
    """rmtree, repeated while the tree still exists: a library thread still finishing a write
    (tensorstore's or Orbax's, after an interrupt or a failed save) may add an entry while the
    tree is being removed. Waits at most ~8 s in all."""
    for k in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(min(0.25, 0.05 * (k + 1)))


def check_output(dst: str | Path, force: bool) -> None:
    """Raises OutputExistsError unless `dst` is absent, or replaceable with `force`: a directory
    (not a symlink) that is empty or that vitctl wrote, by its config.json (or vitctl-run.json)
    and by every entry in it being one that vitctl writes."""
    _check_replaceable(Path(dst), force)


def _check_replaceable(dst: Path, force: bool) -> None:
    if not dst.exists() and not dst.is_symlink():
        return
    if not force:
        raise OutputExistsError(f"{dst} already exists", hint="pass --force to replace it, or choose another output path")
    if dst.is_symlink():
        why = "it is a symlink"
    elif not dst.is_dir():
        why = "it is a file"
    else:
        why = foreign(dst)
    if why:
        raise OutputExistsError(
            f"{dst} exists and is not a vitctl checkpoint directory ({why}); refusing to replace it even with --force",
            hint=f"vitctl replaces only directories it wrote; remove {dst} yourself to replace it, or choose another output path",
        )


def foreign(d: Path, complete: bool = True) -> str | None:
    """Why directory `d` is not one that vitctl wrote, or None if it is (or is empty).

    complete=True: d must be vitctl's by its config.json (a vitctl checkpoint config) or
    vitctl-run.json, and hold only the entries of that kind. complete=False (a temporary
    that a killed run left half written): any entries vitctl writes, no marker needed.
    """
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError as e:
        return f"it cannot be listed: {e.strerror or e}"
    names = {e.name for e in entries}
    if not entries or names == {OWNER}:
        return None
    if not complete:
        kinds = [CHECKPOINT_ENTRIES, RUN_ENTRIES]
    else:
        kinds = [RUN_ENTRIES] if RUN_MARKER in names else [CHECKPOINT_ENTRIES]
    for e in entries:
        name = e.name
        hidden = HIDDEN_TEMPORARY.fullmatch(name)
        if e.is_symlink():
            return f"{name} is a symlink, which vitctl never writes"
        if name == OWNER or ORBAX_TEMPORARY.fullmatch(name) or (hidden and any(hidden["base"] in k for k in kinds)):
            continue
        want = next((k[name] for k in kinds if name in k), "file" if SHARD.fullmatch(name) and CHECKPOINT_ENTRIES in kinds else None)
        if want is None:
            return f"it holds {name}, which vitctl does not write"
        if (want == "file") != e.is_file(follow_symlinks=False):
            return f"its {name} is a {'directory' if want == 'file' else 'file'}"
        if want == "checkpoint" and (why := foreign(Path(e.path), complete)):
            return f"{name}/: {why}"
    if not complete:
        return None
    if RUN_MARKER in names:
        return _unreadable(d / RUN_MARKER, run=True)
    if CONFIG in names:
        return _unreadable(d / CONFIG, run=False)
    return f"it has no {CONFIG}"


def _unreadable(path: Path, run: bool) -> str | None:
    """Why `path` is not vitctl's config.json (run=False) or run marker (run=True), or None."""
    try:
        d = read_json(path, ConfigError)
        if run:
            if not str(d.get("created_by", "")).startswith("vitctl"):
                return f"its {path.name} was not written by vitctl"
        elif not isinstance(d.get("model"), dict):
            return f"its {path.name} has no vitctl model config"
        else:
            ViTConfig.from_dict(d["model"])
    except VitctlError as e:
        return f"its {path.name} is not a vitctl checkpoint config: {e.message}"
    return None


# Temporaries of killed runs.
def _claim(tmp: Path) -> None:
    """Marks `tmp` as this process's, so that another run leaves it alone while this one lives."""
    (tmp / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}))


def _start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), to tell a reused pid apart; None off Linux."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return None


def _owner_alive(owner: dict[str, Any]) -> bool | None:
    """Whether the process named by an OWNER record still runs; None if this machine cannot tell."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None  # another machine's (a shared file system), or not a record vitctl wrote
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OSError:
        return None
    start = owner.get("start")
    return start is None or _start_time(pid) in (None, start)  # the same pid, started later: a new process


def reclaim_temporaries(dst: str | Path) -> list[Path]:
    """Removes the temporaries of earlier runs to `dst` that were killed before they cleaned up.

    A sibling `.DST.tmp-XXXXXXXX` / `.DST.old-XXXXXXXX` is removed only if it is vitctl's by
    name and by content (a directory holding only entries vitctl writes) and its OWNER names
    a process of this machine that no longer runs; each removal is one line on stderr. One
    that cannot be proven stale (no owner record, another machine's) is left and reported.
    Returns the paths removed.
    """
    dst = Path(dst)
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    try:
        siblings = sorted(p for p in dst.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []
    removed = []
    for p in siblings:
        if p.is_symlink() or not p.is_dir() or foreign(p, complete=False):
            continue  # not vitctl's after all: never touched
        try:
            owner = read_json(p / OWNER, CheckpointError)
        except VitctlError:
            owner = {}
        alive = _owner_alive(owner)
        if alive is False:
            remove_tree(p)
            if not p.exists():
                removed.append(p)
                _note(f"removed {p}, a temporary left by an interrupted vitctl run (process {owner['pid']}, no longer running)")
        elif alive is None:
            _note(f"left {p} in place: it looks like an interrupted vitctl run's temporary; remove it if no vitctl is writing {dst}")
    return removed


def _note(message: str) -> None:
    sys.stderr.write(f"Note: {message}\n")
    sys.stderr.flush()


# Write failures.
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def no_space(e: BaseException) -> str | None:
    """The reason if `e` is a write that failed for want of space (full disk, quota, file-size
    limit), else None. Library errors carry the errno in their text (tensorstore's
    `os_error_code='28'`, a CheckpointError's strerror), so the text is searched too."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return e.strerror
    text = str(e)
    return next((os.strerror(c) for c in _NO_SPACE if os.strerror(c) in text or f"os_error_code='{c}'" in text), None)


def write_json(path: str | Path, obj: Any) -> None:
    """Writes JSON atomically: a temporary file in the same directory, then os.replace."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_config(ckpt: str | Path, cfg: ViTConfig, provenance: Mapping[str, Any], head: Mapping[str, Any] | None = None) -> Path:
    """Writes ckpt/config.json: `head` (keys another library reads, e.g. timm's), then vitctl's.
    provenance: source_format, source, created_by, ...; stored through `public_provenance`."""
    path = Path(ckpt) / CONFIG
    body = {"vitctl_version": vitctl.__version__, "model": cfg.to_dict(), "provenance": public_provenance(provenance)}
    write_json(path, {**(head or {}), **body})
    return path


# Provenance travels with a checkpoint (hub push uploads config.json): it names where the weights
# came from in a form that means something elsewhere, never this machine's directories.
PATH_KEYS = {"source", "data", "model", "path", "init_from", "config"}  # values that are a path when one exists on disk
TEMPORARY_NAME = re.compile(r"\.(?P<base>.+?)\.(tmp|old)(-\w+)?")  # atomic_output's `.DST.tmp-1a2b3c4d`, write_json's


def public_value(value: str, path_key: bool = False) -> str:
    """`value` as it may be published. hf:// URIs, URLs and names that are no local path (a preset,
    a named data set, an org/name repo id) stay; a local path (absolute, under ~, holding a
    temporary's name, or, for a `path_key`, one that exists here) becomes its final name
    component, and a temporary's name the name it was being built as (`.demo.tmp-1a2b` -> demo)."""
    if "://" in value:
        return value
    local = value.startswith(("/", "~")) or ".tmp-" in value or ".old-" in value or os.path.isabs(value)
    if not local and path_key and value not in PRESETS:
        with contextlib.suppress(OSError, ValueError):
            local = os.path.lexists(value)
    if not local:
        return value
    if snapshot := hf_snapshot(value):  # a Hugging Face cache snapshot: .../models--org--name/snapshots/SHA[/...]
        return f"hf://{snapshot}"
    name = Path(value.rstrip("/")).name
    while m := TEMPORARY_NAME.fullmatch(name):
        name = m["base"]
    return re.sub(r"\.(tmp|old)-\w*$", "", name) or "."


def public_provenance(provenance: Any, key: str = "") -> Any:
    """A provenance block (nested dicts and lists, e.g. source_provenance, upstream) with every
    string passed through `public_value`: what config.json and a model card may carry."""
    if isinstance(provenance, Mapping):
        return {str(k): public_provenance(v, str(k)) for k, v in provenance.items()}
    if isinstance(provenance, (list, tuple)):
        return [public_provenance(v, key) for v in provenance]
    if isinstance(provenance, str):
        return public_value(provenance, key in PATH_KEYS)
    return provenance
