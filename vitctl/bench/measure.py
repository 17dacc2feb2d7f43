"""The benchmark's measuring harness: the machine and its load, interleaved timing behind a
quiet gate, and child processes timed with their peak RSS. Shared by `vitctl bench` and the
scripts in bench/. Standard library only.

Timing: warm-up calls first (JIT compile, allocator, thread pools), then timed rounds
that call the competitors in turn (A, B, A, B, ...), so a burst of load from other
processes hits both sides alike; before each timed call a QuietGate waits (within a
budget) for other processes to leave the CPUs. A result is the best round (other load
only ever adds time). Never assert on time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


# ----------------------------------------------------------------------------- machine and load
def num_cores() -> int:
    """Cores this process may run on (affinity / cgroup cpuset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_description() -> str:
    """'AMD EPYC, 2 cores, SIMD: avx2 fma' from /proc/cpuinfo (best effort)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    return f"{name}, {num_cores()} cores, SIMD: {' '.join(simd) or 'unknown'}"


def proc_stat_busy() -> tuple[float, float, float] | None:
    """(busy, steal, total) jiffies over all CPUs from /proc/stat."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, user + nice + system + idle + iowait + irq + softirq + steal


def _others_share(s0, s1, own_cpu_s: float) -> float | None:
    """Share of all CPUs' time between two proc_stat_busy() samples used by others than `own_cpu_s`."""
    if not s0 or not s1 or s1[2] <= s0[2]:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, (s1[0] - s0[0]) - own_cpu_s * hz) / (s1[2] - s0[2])


def others_busy(window: float = 0.15) -> float | None:
    """Share of the machine's CPU time used by other processes over `window` seconds
    (ours subtracted), or None where /proc/stat is missing."""
    s0, m0 = proc_stat_busy(), time.process_time()
    time.sleep(window)
    return _others_share(s0, proc_stat_busy(), time.process_time() - m0)


class LoadMonitor:
    """How much of the machine other processes used while we ran: /proc/stat (all CPUs)
    and our own CPU time at start and at `summary()`; steal is the hypervisor's share."""

    def __init__(self):
        self._stat0, self._self0, self._t0 = proc_stat_busy(), time.process_time(), time.perf_counter()
        self.loadavg_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def summary(self) -> dict:
        stat1 = proc_stat_busy()
        out = {"wall_s": time.perf_counter() - self._t0, "loadavg_start": self.loadavg_start}
        out["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        others = _others_share(self._stat0, stat1, time.process_time() - self._self0)
        if others is not None:
            out["other_processes_frac"] = others
            out["steal_frac"] = (stat1[1] - self._stat0[1]) / (stat1[2] - self._stat0[2])
        return out

    def describe(self) -> str:
        s = self.summary()
        parts = [f"wall {s['wall_s']:.0f} s"]
        if s["loadavg_start"] is not None:
            parts.append(f"load average {s['loadavg_start']:.2f} at start, {s['loadavg_end']:.2f} at end")
        if "other_processes_frac" in s:
            parts.append(
                f"other processes used {100 * s['other_processes_frac']:.0f}% of the CPUs, hypervisor steal {100 * s['steal_frac']:.0f}%"
            )
        return "; ".join(parts)


class QuietGate:
    """Waits, before a timed call, until other processes leave the CPUs alone.

    On a shared machine a job next door oversubscribes the OpenMP / XLA thread pools and
    can make one call several times slower. Before each timed call this samples the
    others' CPU share and, while it is above `threshold`, sleeps in steps of one second,
    spending at most `budget_s` over the whole benchmark; after that it times regardless
    and counts the call as started busy.
    """

    def __init__(self, budget_s: float, threshold: float = 0.25):
        self.budget_s, self.threshold = budget_s, threshold
        self.waited_s, self.busy_starts, self.calls = 0.0, 0, 0

    def wait(self) -> None:
        self.calls += 1
        while True:
            busy = others_busy()
            if busy is None or busy < self.threshold:
                return
            if self.waited_s >= self.budget_s:
                self.busy_starts += 1
                return
            time.sleep(1.0)
            self.waited_s += 1.0 + 0.15

    def summary(self) -> dict:
        return {"waited_s": round(self.waited_s, 1), "budget_s": self.budget_s, "busy_starts": self.busy_starts, "calls": self.calls}

    def describe(self) -> str:
        return (
            f"waited {self.waited_s:.0f} s (budget {self.budget_s:.0f} s) for other processes to go quiet; "
            f"{self.busy_starts} of {self.calls} timed calls started while others used >{100 * self.threshold:.0f}% of the CPUs"
        )


# ----------------------------------------------------------------------------- timing
def interleaved_times(
    fns: dict[str, Callable[[], object]], warmup: int, iters: int, gate: QuietGate | None = None
) -> dict[str, list[float]]:
    """Seconds per call for each fn: `warmup` untimed rounds, then `iters` timed rounds,
    each round calling every fn once in turn (after `gate.wait()` when given). fns must
    synchronise before returning."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if gate is not None:
                gate.wait()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- child processes
@dataclasses.dataclass
class Run:
    seconds: float  # wall, spawn to exit
    maxrss_bytes: int  # the child's peak resident memory (ru_maxrss)
    exit_code: int
    cpu_seconds: float  # user + sys of the child
    others_cpu_frac: float | None  # share of all CPUs used by other processes meanwhile
    stdout: str
    stderr: str


# Spawns the command, waits with os.wait4 and prints its rusage. It runs in a fresh small
# interpreter: Linux counts, in a child's ru_maxrss, the memory of the image that exec
# replaced, i.e. the spawning process's RSS (gigabytes here, with torch and jax loaded).
_LAUNCHER = """\
import json, os, subprocess, sys, time
cmd, out, err = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(out, "wb") as o, open(err, "wb") as e:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    s = time.perf_counter() - t0
print(json.dumps([s, ru.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime]))
"""


def run_command(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> Run:
    """Runs cmd as a child of a small launcher: wall seconds from spawn to exit, peak RSS
    and CPU seconds from os.wait4, and the others' CPU share meanwhile. On timeout the
    whole process group is killed and TimeoutError raised."""
    with tempfile.TemporaryDirectory(prefix="vitctl-bench-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        s0 = proc_stat_busy()
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, json.dumps(cmd), str(out), str(err)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, start_new_session=True, text=True,
        )  # fmt: skip
        try:
            report, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{' '.join(cmd)} ran past {timeout} s") from None
        except BaseException:  # Ctrl-C / SIGTERM in the benchmark: the child goes too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        seconds, maxrss, code, cpu = json.loads(report)
        others = _others_share(s0, proc_stat_busy(), cpu)
        return Run(seconds, maxrss, code, cpu, others, out.read_text(errors="replace"), err.read_text(errors="replace"))


def vitctl_command() -> list[str]:
    """How to start the vitctl CLI of this interpreter."""
    return [sys.executable, "-m", "vitctl"]


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> dict:
    """Versions and thread settings of what ran (best effort, for the record)."""
    out = {"cpu": cpu_description(), "python": platform.python_version()}
    for mod in ("torch", "jax", "timm"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    if "torch" in sys.modules:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return out
