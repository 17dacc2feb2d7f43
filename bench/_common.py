"""Shared helpers for the benchmarks in bench/: timing, analytic FLOPs, GEMM peaks,
machine and load description, and output (a table, or one JSON object).

Imports neither torch nor jax at module level; the helpers that need one import it
inside, so a benchmark for one framework runs with only that framework installed.

Timing rules used by every benchmark here:
- warm-up calls first (JIT compilation, allocator and thread-pool start-up);
- then timed calls, each synchronised (`jax.block_until_ready`; torch on CPU is eager);
- report the median; keep the best too. Never assert on time.
- Competitors are timed interleaved (A, B, A, B, ...) so a burst of load from other
  processes on a shared machine hits both sides alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/forward.py` without the editable install
    sys.path.insert(0, str(REPO_ROOT))


# ----------------------------------------------------------------------------- machine
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


def _proc_stat_busy() -> tuple[float, float, float] | None:
    """(busy, steal, total) jiffies over all CPUs from /proc/stat."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, user + nice + system + idle + iowait + irq + softirq + steal


class LoadMonitor:
    """How much of the machine other processes used while we ran.

    A benchmark on a shared box is only as good as its quiet: this reads /proc/stat
    (all CPUs) and our own CPU time at start and stop, and reports the share of the
    machine's CPU time spent by others plus hypervisor steal.
    """

    def __init__(self):
        self.start_loadavg = os.getloadavg() if hasattr(os, "getloadavg") else None
        self._stat0, self._self0, self._t0 = _proc_stat_busy(), time.process_time(), time.perf_counter()

    def summary(self) -> dict:
        stat1, self1 = _proc_stat_busy(), time.process_time()
        out = {"wall_s": time.perf_counter() - self._t0, "loadavg_start": self.start_loadavg}
        out["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        if self._stat0 and stat1:
            hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            busy = stat1[0] - self._stat0[0]
            steal = stat1[1] - self._stat0[1]
            total = stat1[2] - self._stat0[2]
            mine = (self1 - self._self0) * hz
            if total > 0:
                out["other_processes_frac"] = max(0.0, busy - mine) / total
                out["steal_frac"] = steal / total
        return out

    def describe(self) -> str:
        s = self.summary()
        parts = [f"wall {s['wall_s']:.0f} s"]
        if s["loadavg_start"]:
            parts.append(f"load average {s['loadavg_start'][0]:.2f} at start, {s['loadavg_end'][0]:.2f} at end")
        if "other_processes_frac" in s:
            parts.append(f"other processes used {100 * s['other_processes_frac']:.0f}% of the CPUs, hypervisor steal {100 * s['steal_frac']:.0f}%")
        return "; ".join(parts)


def others_busy(window: float = 0.15) -> float | None:
    """Share of the machine's CPU time used by other processes over `window` seconds
    (ours subtracted), or None where /proc/stat is missing."""
    s0, m0 = _proc_stat_busy(), time.process_time()
    time.sleep(window)
    s1, m1 = _proc_stat_busy(), time.process_time()
    if not s0 or not s1 or s1[2] <= s0[2]:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, (s1[0] - s0[0]) - (m1 - m0) * hz) / (s1[2] - s0[2])


class QuietGate:
    """Waits, before a timed call, until other processes leave the CPUs alone.

    On a shared 2-core box a test run next door oversubscribes the OpenMP / XLA thread
    pools and can make one call several times slower. Before each timed call this
    samples the others' CPU share and, while it is above `threshold`, sleeps in steps
    of one second, spending at most `budget_s` over the whole benchmark; after that
    it times regardless and counts the call as started busy.
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

    def describe(self) -> str:
        return (f"waited {self.waited_s:.0f} s (budget {self.budget_s:.0f} s) for other processes to go quiet; "
                f"{self.busy_starts} of {self.calls} timed calls started while others used >{100 * self.threshold:.0f}% of the CPUs")  # fmt: skip


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


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ----------------------------------------------------------------------------- FLOPs
def vit_flops(cfg) -> int:
    """Forward FLOPs per image of a ViTConfig = 2 x the multiply-accumulates of every
    matmul, attention included (norms, softmax, GELU, bias adds and residuals are not
    counted). With Np = (image_size / P)^2 patches and T = Np (+1 with a class token);
    the heads span the width (N*K = D):

        patch embedding   2 * Np * (P*P*C) * D
        each of L blocks  2 * T * (4*D*D + 2*D*F)    q, k, v, attn-out; MLP in and out
                        + 2 * 2 * T*T * D            q.k^T logits and probs.v, all heads
        MAP head          2 * (2*D*D + 2*T*D*D + 2*T*D + 2*D*F)   (pool="map" only)
        classifier        2 * D * num_classes

    The parallel and the sequential block do the same matmuls, so one formula serves
    both; timm's models with the same sizes have the same count.
    """
    D, L, F, P, C = cfg.width, cfg.depth, cfg.mlp_dim, cfg.patch_size, cfg.channels
    Np, T = cfg.num_patches, cfg.seq_len
    macs = Np * (P * P * C) * D
    macs += L * (T * (4 * D * D + 2 * D * F) + 2 * T * T * D)
    if cfg.pool == "map":  # 1 query: q and out-proj on 1 token, k and v on T tokens
        macs += 2 * D * D + 2 * T * D * D + 2 * T * D + 2 * D * F
    macs += D * cfg.num_classes
    return 2 * macs


# ----------------------------------------------------------------------------- GEMM peaks
def gemm_shapes(cfg, batch: int) -> list[tuple[int, int, int]]:
    """(M, K, N) shapes to probe: the model's own (B*T, D) x (D, F), (B*T, F) x (F, D) and
    the fused parallel block's (B*T, D) x (D, 3D+F). (A square 2048 or 4096 GEMM was no
    faster here than these, and costs seconds.)"""
    M, D, F = batch * cfg.seq_len, cfg.width, cfg.mlp_dim
    return [(M, D, F), (M, F, D), (M, D, 3 * D + F)]


def _best_rate(call: Callable[[], object], flops: int, min_time: float, max_reps: int) -> float:
    call()  # warm-up
    best, spent, reps = float("inf"), 0.0, 0
    while reps < max_reps and (reps < 2 or spent < min_time):
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return flops / best / 1e9


def torch_gemm_gflops(dtype: str, shapes, min_time: float = 0.3, max_reps: int = 10) -> dict[tuple[int, int, int], float]:
    """Best GFLOP/s of F.linear(x[M, K], w[N, K]) per shape: the call nn.Linear makes,
    so the same MKL (fp32) or oneDNN / fallback (bf16) kernel the models hit."""
    import torch
    import torch.nn.functional as F

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = {}
    with torch.inference_mode():
        for M, K, N in shapes:
            x, w = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
            out[(M, K, N)] = _best_rate(lambda: F.linear(x, w), 2 * M * K * N, min_time, max_reps)
    return out


def torch_mkldnn_gemm_gflops(shapes, min_time: float = 0.3, max_reps: int = 10) -> dict[tuple[int, int, int], float]:
    """fp32 through oneDNN instead of MKL: torch.utils.mkldnn's MkldnnLinear (weights
    pre-packed in oneDNN's blocked layout; input and output stay dense tensors)."""
    import torch
    import torch.utils.mkldnn
    from torch import nn

    out = {}
    with torch.inference_mode():
        for M, K, N in shapes:
            lin = torch.utils.mkldnn.to_mkldnn(nn.Linear(K, N, bias=False))
            x = torch.randn(M, K)
            out[(M, K, N)] = _best_rate(lambda: lin(x), 2 * M * K * N, min_time, max_reps)
    return out


def xla_gemm_gflops(dtype: str, shapes, min_time: float = 0.3, max_reps: int = 10) -> dict[tuple[int, int, int], float]:
    """Best GFLOP/s of a jitted x[M, K] @ w[K, N] (default precision: full fp32 on CPU)."""
    import jax
    import jax.numpy as jnp

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    mm = jax.jit(lambda a, b: a @ b)
    out = {}
    for i, (M, K, N) in enumerate(shapes):
        a = jax.random.normal(jax.random.key(i), (M, K), dt)
        b = jax.random.normal(jax.random.key(i + 1), (K, N), dt)
        out[(M, K, N)] = _best_rate(lambda: jax.block_until_ready(mm(a, b)), 2 * M * K * N, min_time, max_reps)
    return out


def fmt_shape(s: tuple[int, int, int]) -> str:
    M, K, N = s
    return f"({M}x{K})@({K}x{N})"


# ----------------------------------------------------------------------------- output
def print_table(title: str, columns: list[str], rows: list[list[str]], file=None) -> None:
    """A Rich table when Rich is installed (wide enough not to wrap), else plain text."""
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
        print(title, file=file)
        for r in [columns, ["-" * w for w in widths], *rows]:
            print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))), file=file)
        return
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*map(str, r))
    Console(file=file, width=250, highlight=False).print(table)


def json_row(name: str, value: float, unit: str, baseline: str | None = None, ratio: float | None = None) -> dict:
    """One row of the bench JSON schema: {"name", "value", "unit", "baseline", "ratio"};
    `baseline` names another row (or a peak), `ratio` is value / that row's value."""
    return {"name": name, "value": round(value, 4), "unit": unit, "baseline": baseline, "ratio": None if ratio is None else round(ratio, 4)}


def print_json(rows: list[dict], **extra) -> None:
    print(json.dumps({"rows": rows, **extra}))
