"""The adversarial suite: hostile inputs and faults against every command, built by the tests.

Every case runs the real `vitctl` in a subprocess inside a sandbox directory (`sandbox`),
optionally under resource limits (RLIMIT_AS for memory cases, RLIMIT_FSIZE for full-disk
cases), and checks what a user must be able to rely on (`assert_refused`):
- the exit code;
- exactly one `Error:` line on stderr and no traceback;
- nothing written outside the output, and no partial output;
- no leftover temporary (vitctl's `.NAME.tmp-XXXXXXXX` / `.NAME.old-XXXXXXXX` siblings).
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.hub.conftest import hub  # noqa: F401  (the loopback Hub server fixture, for test_hub.py)

REPO = Path(__file__).parents[2]
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every entry under root (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[p.relative_to(root).as_posix()] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns if not p.is_dir() else 0)
    return out


def env_for(extra: dict | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "VITCTL_DEBUG"}
    e["PYTHONPATH"] = str(REPO)
    e.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    for k, v in (extra or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


# Limits are set by a small launcher that then execs vitctl: preexec_fn would run Python code
# between fork and exec in a test process that may already hold JAX's threads (a deadlock risk).
_LAUNCH = (
    "import os, resource, signal, sys\n"
    "mem, fsize = (int(v) for v in sys.argv[1:3])\n"
    "if mem >= 0: resource.setrlimit(resource.RLIMIT_AS, (mem, mem))\n"
    # writes past the file-size limit then fail with EFBIG, as on a full disk, instead of killing the process
    "if fsize >= 0: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize)); signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'vitctl', *sys.argv[3:]])\n"
)


def command(args, memory: int | None = None, file_size: int | None = None) -> list[str]:
    """The argv that runs `python -m vitctl ARGS`, under RLIMIT_AS=`memory` and RLIMIT_FSIZE=`file_size` bytes if given."""
    if memory is None and file_size is None:
        return [sys.executable, "-m", "vitctl", *map(str, args)]
    limits = [str(-1 if memory is None else memory), str(-1 if file_size is None else file_size)]
    return [sys.executable, "-c", _LAUNCH, *limits, *map(str, args)]


def run_vitctl(*args, cwd: Path, env: dict | None = None, memory: int | None = None, file_size: int | None = None,
               timeout: float = 300) -> Run:  # fmt: skip
    """`python -m vitctl ARGS` in `cwd`, with optional RLIMIT_AS (`memory`) and RLIMIT_FSIZE (`file_size`) in bytes."""
    p = subprocess.run(
        command(args, memory, file_size), cwd=cwd, env=env_for(env), capture_output=True, text=True, timeout=timeout, check=False
    )
    return Run(p.returncode, p.stdout, p.stderr)


def start_vitctl(*args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Starts `python -m vitctl ARGS` (for signal cases); stderr is a pipe, read it after wait()."""
    return subprocess.Popen(
        [sys.executable, "-m", "vitctl", *map(str, args)], cwd=cwd, env=env_for(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def wait_for(predicate, proc: subprocess.Popen, what: str, limit: float = 240.0) -> None:
    """Polls `predicate()` until it holds; fails if `proc` exits first. The limit only guards
    against a hang (it is generous: the machine may be loaded)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"vitctl exited ({proc.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def leftovers(root: Path) -> list[str]:
    """vitctl temporaries anywhere under root."""
    return sorted(p for p in snapshot(root) if TEMPORARY.match(Path(p).name))


@pytest.fixture
def sandbox(tmp_path):
    """A directory to run in; `sandbox.before()` records its content, `sandbox.changed(allowed=...)`
    lists entries created, changed or removed since, outside the `allowed` relative paths."""

    class Sandbox:
        root = tmp_path

        def __init__(self):
            self._before: dict = {}

        def before(self):
            self._before = snapshot(self.root)

        def changed(self, allowed=()):
            now = snapshot(self.root)
            keys = set(now) | set(self._before)
            diff = sorted(k for k in keys if now.get(k) != self._before.get(k))
            return [k for k in diff if not any(k == a or k.startswith(a.rstrip("/") + "/") for a in allowed)]

    return Sandbox()


def assert_refused(r: Run, sandbox, code: int = 1, allowed=(), says: str | None = None) -> None:
    """The command failed cleanly: exit `code`, one Error: line (mentioning `says`), no traceback,
    nothing changed in the sandbox outside `allowed`, no vitctl temporary left anywhere in it."""
    assert r.returncode == code, f"exit {r.returncode} (expected {code})\nstdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-3000:]}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, f"expected one Error: line, got {len(errors)}:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "bug in vitctl" not in r.stderr, r.stderr[-3000:]
    if says is not None:
        assert says.lower() in r.stderr.lower(), f"{says!r} not in:\n{r.stderr[-3000:]}"
    assert sandbox.changed(allowed) == [], f"changed outside the output: {sandbox.changed(allowed)}"
    assert leftovers(sandbox.root) == [], f"leftover temporaries: {leftovers(sandbox.root)}"
