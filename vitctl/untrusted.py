"""Reading what strangers wrote: names, JSON and sizes from checkpoints, Hub repos and data sets.

Every checkpoint, Hub repo and data set may come from someone else. Whatever they name
or declare passes through here before vitctl acts on it:

- `member(root, name, where)`: a file name taken from a listing (a Hub repo's file list, a
  safetensors index, an Orbax manifest, a zip member) becomes a path under `root`, or is
  refused: it must be relative, with no empty, `.`, `..` or control-character segment,
  and must resolve inside `root` (no symlink out of it).
- `inside(root, path, where)`: a file that exists under `root` really lies inside it once
  symlinks are followed (a symlink under params/ pointing at ~/.ssh is refused).
- `read_json(path)`/`parse_json(text, source)`: JSON with bounded size and nesting; a
  file that is not JSON, is too deep or too big is a clear error naming the file.
- `require_memory(nbytes, what)`/`require_disk(path, nbytes, what)`: refuse, with the
  numbers, work that would exhaust this machine before allocating or writing anything.
- `sigterm_as_interrupt()`: SIGTERM raises KeyboardInterrupt within a block, so the
  cleanup that Ctrl-C runs (removing temporaries) runs for `kill` too.

Stdlib only: vitctl.config uses it, and importing it loads neither numpy, jax nor torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from vitctl.errors import CheckpointError, ResourceError, VitctlError

JSON_MAX_BYTES = 64 * 2**20  # a config, index or manifest is KBs to a few MB; 64 MiB is far above any real one
JSON_MAX_DEPTH = 64  # vitctl's deepest JSON (an Orbax tree of a scanned model) nests under 10 levels


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# Names from listings.
def check_name(name: Any, where: str, error: type[VitctlError] = CheckpointError, *, kind: str = "the file") -> str:
    """`name` as a clean relative POSIX path ("params/a/b"), or `error` naming `where` and the name.

    Refused: a non-string, an empty name, an absolute path or drive, backslashes, and any
    empty, ".", ".." or control-character segment (a name must mean one file, the same on
    every system)."""
    bad = None
    if not isinstance(name, str) or not name:
        bad = "it is empty" if name == "" else f"it is not a string ({type(name).__name__})"
    elif name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        bad = "it is absolute or uses backslashes"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        bad = "it holds control characters"
    else:
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            bad = "it has an empty, '.' or '..' segment"
    if bad:
        raise error(
            f"{where} names {kind} {name!r}, which vitctl refuses: {bad}",
            hint="a file name must be a plain relative path inside the checkpoint; the source is damaged or hostile: do not use it",
        )
    return str(PurePosixPath(name))


def member(root: str | Path, name: Any, where: str, error: type[VitctlError] = CheckpointError) -> Path:
    """root / name for a `name` from a listing: checked by `check_name`, and inside `root` once
    symlinks that already exist on the way are followed."""
    path = Path(root) / check_name(name, where, error)
    inside(root, path, where, error)
    return path


def inside(
    root: str | Path, path: str | Path, where: str, error: type[VitctlError] = CheckpointError, *, also: str | Path | None = None
) -> Path:
    """`path` (under `root`) with symlinks resolved, if that lies inside `root` (or inside `also`,
    e.g. the Hugging Face cache folder of the repo whose snapshot `root` is); else `error`."""
    real = Path(path).resolve()
    roots = [Path(root).resolve()] + ([Path(also).resolve()] if also is not None else [])
    if not any(real == r or r in real.parents for r in roots):
        raise error(
            f"{where}: {path} is a symlink that leads outside the checkpoint (to {real})",
            hint="vitctl reads and uploads only files inside the checkpoint; copy the file in if you mean to use it",
        )
    return real


def walk_files(root: str | Path, where: str, error: type[VitctlError] = CheckpointError, *, also: str | Path | None = None) -> list[Path]:
    """Every file under `root` (sorted, not following directory symlinks out of it), each checked by `inside`."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in list(dirnames):  # a symlinked directory: check where it leads, then walk it as files
            p = Path(dirpath) / d
            if p.is_symlink():
                inside(root, p, where, error, also=also)
        for f in filenames:
            p = Path(dirpath) / f
            inside(root, p, where, error, also=also)
            if p.is_file():
                out.append(p)
    return sorted(out)


# JSON.
def _depth_check(obj: Any, source: str, error: type[VitctlError]) -> None:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > JSON_MAX_DEPTH:
            raise error(f"{source} nests JSON deeper than {JSON_MAX_DEPTH} levels", hint="the file is damaged or hostile: do not use it")
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)


def parse_json(text: str | bytes, source: str, error: type[VitctlError] = CheckpointError, *, expect: type | None = dict) -> Any:
    """json.loads for untrusted text: too deep for the parser (RecursionError) or deeper than
    JSON_MAX_DEPTH (which recursive code after it would trip on) is an error naming `source`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(
                f"{source} is not JSON (not UTF-8 text: {e.reason} at byte {e.start})", hint="the file is damaged; fetch or write it again"
            ) from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise error(f"{source} nests JSON too deeply", hint="the file is damaged or hostile: do not use it") from None
    except ValueError as e:
        raise error(f"{source} is not valid JSON: {e}", hint="the file is damaged; fetch or write it again") from None
    _depth_check(obj, source, error)
    if expect is not None and not isinstance(obj, expect):
        kind = {dict: "object", list: "list"}.get(expect, expect.__name__)
        raise error(f"{source} must hold a JSON {kind}, got {type(obj).__name__}", hint="the file is damaged or not what vitctl expects")
    return obj


def read_json(
    path: str | Path, error: type[VitctlError] = CheckpointError, *, expect: type | None = dict, max_bytes: int = JSON_MAX_BYTES
) -> Any:
    """Reads and parses a JSON file from an untrusted source (size, encoding and nesting bounded)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(
                f"{path} is {_gib(size)}, more than any JSON file vitctl reads ({_gib(max_bytes)})", hint="the file is damaged or hostile"
            )
        data = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}", hint="check the path and its permissions") from None
    return parse_json(data, str(path), error, expect=expect)


# Memory and disk.
def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, and at most the address-space limit's headroom."""
    avail = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 1 << 62
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = 0
        with contextlib.suppress(OSError, ValueError):
            used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        avail = min(avail, max(0, soft - used))
    return avail


def require_memory(nbytes: int, what: str, hint: str | None = None) -> None:
    """ResourceError with the numbers if `what` needs more memory than this process can get."""
    have = available_memory()
    if nbytes > have:
        raise ResourceError(
            f"{what} needs {_gib(nbytes)} of memory; this machine has {_gib(have)} available",
            hint=hint or "free memory, or use a smaller model or batch",
        )


def free_disk(path: str | Path) -> tuple[int | None, Path]:
    """(free bytes, the existing directory they were measured at) for a path that may not exist yet;
    None where the file system does not say."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free, p
    except OSError:
        return None, p


def require_disk(path: str | Path, nbytes: int, what: str, hint: str | None = None) -> None:
    """ResourceError with the numbers if `what` would write more than the free space at `path`
    (a file-size limit, RLIMIT_FSIZE, shows up as EFBIG when writing)."""
    free, p = free_disk(path)
    if free is not None and nbytes > free:
        raise ResourceError(
            f"{what} writes {_gib(nbytes)}; {p} has {_gib(free)} free",
            hint=hint or "free disk space, or write to another disk",
        )


# Signals.
_SIGNALLED: list[int] = []  # signals that sigterm_as_interrupt turned into KeyboardInterrupt, in this process


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (like Ctrl-C), so cleanup runs.

    The signal is also remembered (and Ctrl-C too, while Python's own handler is in place):
    an exception raised by a signal handler is lost if it lands in a finalizer or a callback
    whose errors Python only prints, so `raise_if_interrupted()` before committing an output
    makes sure a signalled command never completes as if nothing happened."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _SIGNALLED.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    catch = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else [])
    old = {s: signal.signal(s, handler) for s in catch}
    try:
        yield
        raise_if_interrupted()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _SIGNALLED.clear()


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a signal arrived within sigterm_as_interrupt, even one whose exception was lost."""
    if _SIGNALLED:
        raise KeyboardInterrupt(f"signal {_SIGNALLED[0]}")
