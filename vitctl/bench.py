"""`vitctl bench`: what this hardware does with vitctl's models, side by side with timm and
with each framework's GEMM peak, all measured in one run. Also the measuring toolkit of
the scripts in bench/ (timing, quiet gate, GEMM peaks, analytic FLOPs, child processes).

Imports only the standard library at module level: torch, jax and timm are imported by
the functions that need them, so `vitctl --help` stays light and bench/convert.py keeps
its own process small. timm is optional: without it its rows say so.

Rows. Every result is a Row(name, value, unit, baseline, ratio, note); `baseline` names
another row (or is None) and `ratio = value / that row's value`. So:
- GEMM rows: GFLOP/s of one matmul per framework and dtype (best over the model's own
  shapes); no baseline.
- forward / train rows of vitctl-torch: images/s, baseline the timm row of the same
  configuration, dtype and batch (ratio > 1: vitctl is faster).
- vitctl-jax rows: images/s against plain-flax (forward) or timm + AdamW (train step), and
  GFLOP/s against the best fp32 GEMM row of the run (ratio = the fraction of the GEMM peak
  reached; the train-step one is MFU).
- plain-flax rows (forward): the same configuration written the straightforward way in
  Flax NNX (`plain_flax_model`, loaded with the same weights), timed interleaved with
  vitctl-jax; images/s against timm.
- convert: GB/s of `vitctl convert jax-to-torch` against `cp -r` of the same bytes.
- info / plan vit-22b: seconds and peak RSS of the command, against `vitctl --help`.

Configurations (Mode): classic = vitctl `B/16` (sequential block, LayerNorm, tanh GELU,
QKV bias, class token); parallel = `vit22b-B/16` with pool "tok" (parallel block,
QK-norm, RMSNorm; the class token instead of the MAP head, as timm's
`vit_base_patch16_xp_224`). timm's model is built from vitctl's config by
`vitctl.convert.timm.timm_spec`: the same function, so the same FLOPs.
- full: B/16, forward at batch 1, 8 and 32; train at batch 8; 1 warm-up + 3 timed
  rounds; GEMM probes of >= 0.3 s each; up to 120 s waiting for a quiet machine.
- quick: S/16 instead of B/16 everywhere (4x fewer FLOPs), forward at batch 1 and 8;
  1 warm-up + 1 timed round; GEMM probes of >= 0.1 s; no oneDNN GEMM probe; up to
  15 s waiting for a quiet machine.
- tiny (tests; `vitctl bench --tiny`, hidden): 2-layer width-32 models on 32 px images,
  batch 1 and 2, one round, one GEMM shape, no waiting: checks that every part runs;
  its figures mean nothing.
Where torch's bf16 GEMM runs below a quarter of its fp32 rate (no native bf16 on the
CPU: a reference kernel), the torch bf16 forward rows run at the smallest batch only.

Timing: warm-up calls first (JIT compile, allocator, thread pools), then timed rounds
that call the competitors in turn (A, B, A, B, ...), so a burst of load from other
processes hits both sides alike; before each timed call a QuietGate waits (within a
budget) for other processes to leave the CPUs. A result is the best round (other load
only ever adds time). Never assert on time.

FLOPs: `flops(cfg, batch, train)` = 2 x the multiply-accumulates of every matmul.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

SECTIONS = ("gemm", "torch-forward", "jax-forward", "torch-train", "jax-train", "convert", "cli")
DT_SHORT = {"float32": "fp32", "bfloat16": "bf16"}
TIMM_MISSING = "timm not installed"


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


# ----------------------------------------------------------------------------- FLOPs
def flops(cfg, batch: int = 1, train: bool = False) -> int:
    """FLOPs of a forward pass (train=False) or a train step (train=True) over `batch` images:
    2 x the multiply-accumulates of every matmul, attention included (norms, softmax, GELU,
    bias adds, residuals and the optimizer are not counted). With Np = (image_size / P)^2
    patches and T = Np (+1 with a class token); the heads span the width (N*K = D):

        patch embedding   2 * Np * (P*P*C) * D
        each of L blocks  2 * T * (4*D*D + 2*D*F)    q, k, v, attn-out; MLP in and out
                        + 2 * 2 * T*T * D            q.k^T logits and probs.v, all heads
        MAP head          2 * (2*D*D + 2*T*D*D + 2*T*D + 2*D*F)   (pool="map" only)
        classifier        2 * D * num_classes

    A train step is 3x the forward (the backward pass computes two matmuls per forward
    matmul: the input's and the weight's gradient), the usual convention of MFU; it
    counts the patch embedding's input gradient, which nobody needs (< 1% at B/16).
    The parallel and the sequential block do the same matmuls, so one formula serves
    both; timm's models of the same configuration have the same count.
    """
    D, L, F, P, C = cfg.width, cfg.depth, cfg.mlp_dim, cfg.patch_size, cfg.channels
    Np, T = cfg.num_patches, cfg.seq_len
    macs = Np * (P * P * C) * D
    macs += L * (T * (4 * D * D + 2 * D * F) + 2 * T * T * D)
    if cfg.pool == "map":  # 1 query: q and out-proj on 1 token, k and v on T tokens
        macs += 2 * D * D + 2 * T * D * D + 2 * T * D + 2 * D * F
    macs += D * cfg.num_classes
    return 2 * macs * batch * (3 if train else 1)


# ----------------------------------------------------------------------------- GEMM peaks
def gemm_shapes(cfg, batch: int) -> list[tuple[int, int, int]]:
    """(M, K, N) shapes to probe: the model's own (B*T, D) x (D, F), (B*T, F) x (F, D) and
    the fused parallel block's (B*T, D) x (D, 3D+F). (A square 2048 or 4096 GEMM was no
    faster here than these, and costs seconds.)"""
    M, D, F = batch * cfg.seq_len, cfg.width, cfg.mlp_dim
    return [(M, D, F), (M, F, D), (M, D, 3 * D + F)]


def best_rate(call: Callable[[], object], flop: int, min_time: float, max_reps: int) -> float:
    """GFLOP/s of the fastest of >= 2 calls (more until min_time is spent, at most max_reps), after one warm-up."""
    call()
    best, spent, reps = float("inf"), 0.0, 0
    while reps < max_reps and (reps < 2 or spent < min_time):
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return flop / best / 1e9


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
            out[(M, K, N)] = best_rate(lambda x=x, w=w: F.linear(x, w), 2 * M * K * N, min_time, max_reps)
    return out


def torch_mkldnn_gemm_gflops(shapes, min_time: float = 0.3, max_reps: int = 10) -> dict[tuple[int, int, int], float]:
    """fp32 through oneDNN instead of MKL: torch.utils.mkldnn's MkldnnLinear (weights
    pre-packed in oneDNN's blocked layout; input and output stay dense tensors)."""
    import torch
    import torch.utils.mkldnn
    from torch import nn

    out = {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script_method inside torch.utils.mkldnn
        for M, K, N in shapes:
            lin = torch.utils.mkldnn.to_mkldnn(nn.Linear(K, N, bias=False))
            x = torch.randn(M, K)
            out[(M, K, N)] = best_rate(lambda lin=lin, x=x: lin(x), 2 * M * K * N, min_time, max_reps)
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
        out[(M, K, N)] = best_rate(lambda a=a, b=b: jax.block_until_ready(mm(a, b)), 2 * M * K * N, min_time, max_reps)
    return out


def fmt_shape(s: tuple[int, int, int]) -> str:
    M, K, N = s
    return f"({M}x{K})@({K}x{N})"


# ----------------------------------------------------------------------------- models
def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def timm_model(cfg, dtype: str = "float32"):
    """timm's model computing the same function as vitctl's `cfg` (vitctl.convert.timm.timm_spec), random init, in `dtype`."""
    import timm
    import torch

    from vitctl.convert.timm import timm_spec

    spec = timm_spec(cfg)
    torch.manual_seed(0)
    return timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"]).to(
        {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    )


def vitctl_torch_model(cfg):
    """vitctl's torch ViT for `cfg`, returning logits only (as timm's)."""
    import torch
    from torch import nn

    from vitctl.model_torch.model import ViT

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = ViT(cfg)

        def forward(self, x):
            return self.vit(x)[0]

    torch.manual_seed(0)
    return Logits()


def torch_forward(model, cfg, batch: int, dtype: str) -> Callable[[], None]:
    """One synchronised inference call on a fixed random batch [B, C, H, W]."""
    import torch

    model.eval()
    x = torch.randn(
        batch, cfg.channels, cfg.image_size, cfg.image_size, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    )

    def call():
        with torch.inference_mode():
            model(x)

    return call


def torch_train_step(model, cfg, batch: int) -> Callable[[], None]:
    """One plain fp32 train step: cross-entropy, backward, torch.optim.AdamW (lr 1e-3, wd 1e-4)."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)

    def call():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return call


def jax_forward(cfg, batch: int) -> tuple[Callable[[], None], float]:
    """vitctl-jax jit(forward) compiled ahead of time, logits only (XLA drops the unused
    intermediates), on random_weights (numpy: no eager init, whose many small XLA programs
    take longer to compile than the forward); returns (synchronised call, compile seconds)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from vitctl.model_jax.model import DTYPES, abstract_model, load_flat_params

    model = abstract_model(cfg)
    load_flat_params(model, {n: w.astype(DTYPES[cfg.param_dtype]) for n, w in random_weights(cfg).items()})
    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)[0]

    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, cfg.image_size, cfg.image_size, cfg.channels)), DTYPES[cfg.dtype])
    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    return (lambda: jax.block_until_ready(compiled(state, x))), compile_s


def jax_train_step(cfg, batch: int) -> tuple[Callable[[], None], float]:
    """The train step of `vitctl train` (vitctl.train.loop.Setup: AdamW, global-norm clipping,
    softmax cross-entropy, donated state) on one device; returns (synchronised call,
    seconds to compile and run the first step)."""
    import jax
    import numpy as np

    from vitctl.train.loop import Setup, TrainConfig, mesh_for

    setup = Setup(cfg, TrainConfig(batch_size=batch, steps=1000, warmup=10), mesh_for(""))
    rng = np.random.default_rng(0)
    images, labels = setup.put_batch(
        rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.channels), np.float32),
        rng.integers(0, cfg.num_classes, batch),
    )
    box = {"state": setup.init_state(0)}

    def call():  # the state is donated: keep the new one
        box["state"], metrics = setup.train_step(box["state"], images, labels)
        jax.block_until_ready(metrics)

    t0 = time.perf_counter()
    call()
    return call, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the plain Flax baseline
def plain_flax_model(cfg, flat: dict | None = None):
    """The issue's baseline: the same ViT written the straightforward way in Flax NNX, as a
    user would from the paper, without vitctl's tricks (no fused/split-K projections, no
    reshape-matmul patch embedding, no stacked blocks or scan, no dot_product_attention):
    nnx.Conv patches, nnx.Linear q/k/v/out and MLP, nnx.LayerNorm / nnx.RMSNorm, a Python
    list of blocks, softmax attention by jnp.einsum. fp32 only. Built shapes-only
    (nnx.eval_shape) and filled from `flat`, vitctl-jax's flat params (default:
    random_weights(cfg)), so it computes the same function as vitctl-jax's model;
    attribute names follow vitctl's so the parameters map by name."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vitctl.posemb import posemb_sincos_2d

    D, N, K, F = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    if cfg.dtype != "float32" or (cfg.norm == "rmsnorm" and cfg.norm_bias):
        raise ValueError("the plain Flax baseline supports fp32 and RMSNorm without bias only")

    def norm(dim, rngs):
        if cfg.norm == "layernorm":
            return nnx.LayerNorm(dim, epsilon=cfg.norm_eps, use_bias=cfg.norm_bias, rngs=rngs)
        return nnx.RMSNorm(dim, epsilon=cfg.norm_eps, rngs=rngs)

    class Attention(nnx.Module):  # q from x_q, k and v from x_kv; the probe of a MAP head is x_q
        def __init__(self, rngs, qk_norm=False):
            self.q, self.k, self.v = (nnx.Linear(D, D, use_bias=cfg.qkv_bias, rngs=rngs) for _ in range(3))
            self.q_norm, self.k_norm = (norm(K, rngs), norm(K, rngs)) if qk_norm else (None, None)
            self.attn_out = nnx.Linear(D, D, use_bias=cfg.attn_out_bias, rngs=rngs)

        def __call__(self, xq, xkv):
            B, S, T = xq.shape[0], xq.shape[1], xkv.shape[1]
            q, k, v = self.q(xq).reshape(B, S, N, K), self.k(xkv).reshape(B, T, N, K), self.v(xkv).reshape(B, T, N, K)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            probs = jax.nn.softmax(jnp.einsum("bsnk,btnk->bnst", q, k) / K**0.5, axis=-1)
            return self.attn_out(jnp.einsum("bnst,btnk->bsnk", probs, v).reshape(B, S, D))

    class AttentionMLP(Attention):  # + a norm and a GELU MLP
        def __init__(self, rngs, qk_norm=False):
            super().__init__(rngs, qk_norm)
            self.norm = norm(D, rngs)
            self.mlp_in = nnx.Linear(D, F, use_bias=cfg.mlp_bias, rngs=rngs)
            self.mlp_out = nnx.Linear(F, D, use_bias=cfg.mlp_bias, rngs=rngs)

        def mlp(self, h):
            return self.mlp_out(jax.nn.gelu(self.mlp_in(h), approximate=cfg.gelu_approximate))

    class Block(AttentionMLP):
        def __init__(self, rngs):
            super().__init__(rngs, qk_norm=cfg.qk_norm)
            self.mlp_norm = norm(D, rngs) if cfg.block == "sequential" else None

        def __call__(self, x):
            h = self.norm(x)
            if cfg.block == "parallel":  # y = x + Attn(N(x)) + MLP(N(x))
                return x + super().__call__(h, h) + self.mlp(h)
            x = x + super().__call__(h, h)
            return x + self.mlp(self.mlp_norm(x))

    class MAPHead(AttentionMLP):  # big_vision's: a learned probe attends over the tokens
        def __init__(self, rngs):
            super().__init__(rngs)
            self.probe = nnx.Param(jnp.zeros((1, 1, D)))

        def __call__(self, x):
            x = super().__call__(jnp.broadcast_to(self.probe[...], (x.shape[0], 1, D)), x)
            return (x + self.mlp(self.norm(x)))[:, 0]

    class PlainViT(nnx.Module):
        def __init__(self, rngs):
            P = cfg.patch_size
            self.patch_embed = nnx.Conv(cfg.channels, D, (P, P), strides=(P, P), padding="VALID", rngs=rngs)
            self.pos_embed = nnx.Param(jnp.zeros((1, cfg.num_patches, D))) if cfg.posemb == "learn" else None
            self.cls_token = nnx.Param(jnp.zeros((1, 1, D))) if cfg.pool == "tok" else None
            self.blocks = nnx.List([Block(rngs) for _ in range(cfg.depth)])
            self.norm = norm(D, rngs)
            self.map_head = MAPHead(rngs) if cfg.pool == "map" else None
            self.head = nnx.Linear(D, cfg.num_classes, rngs=rngs) if cfg.num_classes else None

        def __call__(self, images):  # [B, H, W, C] -> logits
            x = self.patch_embed(images).reshape(images.shape[0], -1, D)
            x = x + (self.pos_embed[...] if self.pos_embed is not None else posemb_sincos_2d(cfg.grid, cfg.grid, D))
            if self.cls_token is not None:
                x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, D)), x], 1)
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)
            x = self.map_head(x) if cfg.pool == "map" else x.mean(1) if cfg.pool == "gap" else x[:, 0]
            return self.head(x) if self.head is not None else x

    model = nnx.eval_shape(lambda: PlainViT(nnx.Rngs(0)))
    flat = random_weights(cfg) if flat is None else flat
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):  # "blocks/3/q/kernel" <- vitctl's "blocks/q/kernel"[3]
        path = [str(p) for p in path]
        name = "/".join(["blocks", *path[2:]] if path[0] == "blocks" else path).replace("patch_embed/", "patch_embed/proj/")
        w = flat[name][int(path[1])] if path[0] == "blocks" else flat[name]
        var.set_value(jnp.asarray(w, jnp.float32).reshape(var.get_value().shape))  # (D, N, K) -> (D, N*K) etc.
    nnx.update(model, state)
    return model


def plain_flax_forward(cfg, batch: int) -> tuple[Callable[[], None], float]:
    """plain_flax_model jitted over its split state, as jax_forward does vitctl-jax's; on the same
    input; returns (synchronised call, compile seconds)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(plain_flax_model(cfg))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, cfg.image_size, cfg.image_size, cfg.channels)), jnp.float32)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    return (lambda: jax.block_until_ready(compiled(state, x))), compile_s


def random_weights(cfg, seed: int = 0) -> dict:
    """JAX-named (stacked) float32 numpy weights where every tensor holds distinct, non-trivial
    values: kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), the rest
    (position embedding, class token, MAP probe) N(0, 0.5^2). No XLA compile, the same on every
    backend; the test suite's parameters too (tests/conftest.py, whose golden logits pin them)."""
    import numpy as np

    from vitctl.convert.mapping import jax_param_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in jax_param_shapes(cfg).items():
        per_layer = shape[1:] if name.startswith("blocks/") else shape
        if name.endswith("/kernel"):
            fan_in = per_layer[0] if name.split("/")[-2] in ("q", "k", "v") else int(np.prod(per_layer[:-1]))
            w = rng.normal(0, fan_in**-0.5, shape)
        elif name.endswith("/scale"):
            w = 1 + rng.normal(0, 0.1, shape)
        else:
            w = rng.normal(0, 0.1 if name.endswith("/bias") else 0.5, shape)
        out[name] = w.astype(np.float32)
    return out


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


# ----------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    name: str
    value: float | None  # None: not measured (see note)
    unit: str
    baseline: str | None = None  # the name of another row
    ratio: float | None = None  # value / the baseline row's value
    note: str = ""

    def as_dict(self) -> dict:
        r = lambda x: None if x is None else float(f"{x:.6g}")
        return {
            "name": self.name,
            "value": r(self.value),
            "unit": self.unit,
            "baseline": self.baseline,
            "ratio": r(self.ratio),
            "note": self.note,
        }


def link(rows: list[Row]) -> list[Row]:
    """Fills each row's ratio = value / its baseline row's value (None where either is missing)."""
    by_name = {r.name: r for r in rows}
    for r in rows:
        base = by_name.get(r.baseline) if r.baseline else None
        ok = base is not None and r.value is not None and base.value
        r.ratio = r.value / base.value if ok else None
    return rows


def fmt_value(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def table(title: str, columns: list[str], rows: Iterable[Iterable[str]], left: tuple[int, ...] = (0,)):
    """A Rich table, rows as strings; the columns numbered in `left` left-aligned, the others right."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i in left else "right", no_wrap=i == 0)
    for r in rows:
        t.add_row(*map(str, r))
    return t


def print_table(title: str, columns: list[str], rows: Iterable[Iterable[str]], file=None) -> None:
    """table() printed wide enough not to wrap (to stdout by default)."""
    from rich.console import Console

    Console(file=file or sys.stdout, width=250, highlight=False).print(table(title, columns, rows))


def short_baseline(row: Row) -> str:
    """The baseline's name without the words it shares with the row's at the start
    ("forward classic B/16 fp32 b8 timm" next to "forward classic B/16 fp32 b8 vitctl-torch": "timm")."""
    if not row.baseline:
        return ""
    ours, theirs = row.name.split(" "), row.baseline.split(" ")
    n = 0
    while n < min(len(ours), len(theirs)) - 1 and ours[n] == theirs[n]:
        n += 1
    return " ".join(theirs[n:])


def rows_table(title: str, rows: list[Row], notes: bool = True):
    """The bench table: name, value, unit, baseline (shortened), ratio and, with `notes`, each
    row's note. Without notes the name and baseline columns may wrap, so it fits 80 columns."""
    columns = ["name", "value", "unit", "vs", "ratio"] + (["note"] if notes else [])
    t = table(
        title,
        columns,
        (
            [r.name, fmt_value(r.value), r.unit, short_baseline(r), "-" if r.ratio is None else f"{r.ratio:.2f}", r.note][: len(columns)]
            for r in rows
        ),
        left=(0, 2, 3, 5),
    )
    if not notes:
        t.columns[0].no_wrap = False
        for c in t.columns[1:]:
            c.no_wrap = c.header in ("value", "unit", "ratio")  # numbers and units never break
    return t


# ----------------------------------------------------------------------------- the benchmark
@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    batches: tuple[int, ...]  # forward batches
    train_batch: int
    warmup: int
    iters: int
    gate_budget_s: float
    gemm_min_time: float
    gemm_max_reps: int
    onednn: bool  # also probe oneDNN's fp32 GEMM
    size: str = "B"  # a ViTConfig variant size; "tiny" for the test models

    def configs(self) -> dict:
        """{"classic": ViTConfig, "parallel": ViTConfig} at this mode's size."""
        from vitctl.config import ViTConfig

        if self.size == "tiny":
            small = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 8, "image_size": 32, "num_classes": 10}
            return {
                "classic": ViTConfig.from_variant("mu/16", **small),
                "parallel": ViTConfig.from_variant("vit22b-mu/16", pool="tok", **small),
            }
        return {
            "classic": ViTConfig.from_variant(f"{self.size}/16"),
            "parallel": ViTConfig.from_variant(f"vit22b-{self.size}/16", pool="tok"),
        }

    def label(self, config: str) -> str:
        return f"{config} {'tiny' if self.size == 'tiny' else self.size + '/16'}"


MODES = {
    "full": Mode("full", (1, 8, 32), 8, warmup=1, iters=3, gate_budget_s=120, gemm_min_time=0.3, gemm_max_reps=10, onednn=True),
    "quick": Mode("quick", (1, 8), 8, warmup=1, iters=1, gate_budget_s=15, gemm_min_time=0.1, gemm_max_reps=4, onednn=False, size="S"),
    "tiny": Mode("tiny", (1, 2), 2, warmup=0, iters=1, gate_budget_s=0, gemm_min_time=0.0, gemm_max_reps=1, onednn=False, size="tiny"),
}
INFO_CMD = ("info", "vit-22b")
PLAN_CMD = ("plan", "vit-22b", "--mesh", "data=1,fsdp=256,tensor=4", "--batch-size", "1024")


@dataclasses.dataclass
class Report:
    mode: str
    rows: list[Row]
    machine: dict
    load: dict
    notes: list[str]
    interrupted: str | None = None  # the section a Ctrl-C or SIGTERM stopped; rows before it are kept

    def as_dict(self) -> dict:
        return {
            "rows": [r.as_dict() for r in self.rows],
            "mode": self.mode,
            "machine": self.machine,
            "load": self.load,
            "notes": self.notes,
            "interrupted": self.interrupted,
        }


class _Bench:
    """One run: the rows so far, the gate, the peaks."""

    def __init__(self, mode: Mode, log: Callable[[str], None]):
        self.mode, self.log = mode, log
        self.gate = QuietGate(mode.gate_budget_s)
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.cfgs = mode.configs()
        self.has_timm = timm_available()
        self.peak_fp32: str | None = None  # name of the best fp32 GEMM row
        self.torch_bf16_batches = mode.batches

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)
        for r in rows:  # each row as it is measured: progress, and what an interruption keeps
            self.log(f"row: {r.name} = {fmt_value(r.value)} {r.unit}")

    def timed(self, fns: dict[str, Callable[[], object]], warmup: int | None = None) -> dict[str, float]:
        """Best seconds per call of each fn, interleaved."""
        ts = interleaved_times(fns, self.mode.warmup if warmup is None else warmup, self.mode.iters, self.gate)
        return {k: min(v) for k, v in ts.items()}

    # --- sections -----------------------------------------------------------------------
    def gemm(self) -> None:
        m = self.mode
        shapes = gemm_shapes(self.cfgs["classic"], m.train_batch)[: 1 if m.size == "tiny" else None]
        kw = {"min_time": m.gemm_min_time, "max_reps": m.gemm_max_reps}
        probes = [("GEMM torch fp32 (MKL)", lambda: torch_gemm_gflops("float32", shapes, **kw))]
        if m.onednn:
            probes.append(("GEMM torch fp32 (oneDNN)", lambda: torch_mkldnn_gemm_gflops(shapes, **kw)))
        # bf16 may hit a reference kernel (seconds per call): one shape, two calls.
        probes.append(("GEMM torch bf16", lambda: torch_gemm_gflops("bfloat16", shapes[:1], min_time=0.0, max_reps=2)))
        probes += [
            ("GEMM XLA fp32", lambda: xla_gemm_gflops("float32", shapes, **kw)),
            ("GEMM XLA bf16", lambda: xla_gemm_gflops("bfloat16", shapes, **kw)),
        ]
        rates = {}
        for name, probe in probes:
            self.log(f"{name} ...")
            self.gate.wait()
            per_shape = probe()
            best = max(per_shape, key=per_shape.get)
            rates[name] = per_shape[best]
            self.add(Row(name, per_shape[best], "GFLOP/s", note=f"best of {len(per_shape)} shapes: {fmt_shape(best)}"))
        self.peak_fp32 = max((n for n in rates if "fp32" in n), key=rates.get)
        if rates["GEMM torch bf16"] < 0.25 * rates["GEMM torch fp32 (MKL)"]:
            self.torch_bf16_batches = m.batches[:1]
            self.bf16_note = (
                f"torch's bf16 GEMM runs at {rates['GEMM torch bf16']:.1f} GFLOP/s here against {rates['GEMM torch fp32 (MKL)']:.1f} "
                f"fp32 (no native bf16 kernel on this CPU): the torch bf16 forward rows run at batch {m.batches[0]} only"
            )

    def _timm_rows(self, names: list[str], unit: str) -> None:
        self.add(*(Row(n, None, unit, note=TIMM_MISSING) for n in names))

    def torch_forward(self) -> None:
        if self.torch_bf16_batches != self.mode.batches:
            self.notes.append(self.bf16_note)
        for dtype in ("float32", "bfloat16"):
            d = DT_SHORT[dtype]
            for key, base in self.cfgs.items():
                cfg = base if dtype == "float32" else dataclasses.replace(base, dtype=dtype, param_dtype=dtype)
                ours = vitctl_torch_model(cfg)
                theirs = timm_model(base, dtype) if self.has_timm else None
                for b in self.torch_bf16_batches if dtype == "bfloat16" else self.mode.batches:
                    prefix = f"forward {self.mode.label(key)} {d} b{b}"
                    fns = {f"{prefix} vitctl-torch": torch_forward(ours, cfg, b, dtype)}
                    if theirs is not None:
                        fns[f"{prefix} timm"] = torch_forward(theirs, base, b, dtype)
                    self.log(f"time {prefix} ...")
                    best = self.timed(fns)
                    self.add(Row(f"{prefix} vitctl-torch", b / best[f"{prefix} vitctl-torch"], "images/s", f"{prefix} timm"))
                    if theirs is not None:
                        self.add(Row(f"{prefix} timm", b / best[f"{prefix} timm"], "images/s", note=timm_spec_name(base)))
                    else:
                        self._timm_rows([f"{prefix} timm"], "images/s")

    def jax_forward(self) -> None:
        b = self.mode.train_batch
        for key, cfg in self.cfgs.items():
            prefix = f"forward {self.mode.label(key)} fp32 b{b}"
            self.log(f"compile {prefix} vitctl-jax and plain-flax ...")
            call, compile_s = jax_forward(cfg, b)
            plain, plain_s = plain_flax_forward(cfg, b)
            note, of_peak = f"compile {compile_s:.1f} s", "fraction of the GEMM peak"
            s = self._jax_rows(prefix, call, b, flops(cfg, b), "plain-flax", note, of_peak, {"plain-flax": plain})
            plain_note = f"bench.plain_flax_model: nnx.Conv/Linear/norms, einsum attention, loop over blocks; compile {plain_s:.1f} s"
            self.add(Row(f"{prefix} plain-flax", b / s["plain-flax"], "images/s", f"{prefix} timm", note=plain_note))
            self._timm_baseline(f"{prefix} timm", lambda cfg=cfg: torch_forward(timm_model(cfg), cfg, b, "float32"), b)

    def _jax_rows(
        self, prefix: str, call: Callable[[], None], batch: int, flop: int, base: str, note: str, of_peak: str, rivals: dict | None = None
    ) -> dict[str, float]:
        """Times a vitctl-jax call, interleaved with `rivals` ({name: call}): images/s against the row
        `prefix base`, GFLOP/s against the fp32 GEMM peak; returns best seconds per call by name."""
        self.log(f"time {prefix} vitctl-jax{''.join(', ' + r for r in rivals or ())} ...")
        best = self.timed({"vitctl-jax": call, **(rivals or {})})
        s = best["vitctl-jax"]
        self.add(
            Row(f"{prefix} vitctl-jax", batch / s, "images/s", f"{prefix} {base}", note=note),
            Row(f"{prefix} vitctl-jax GFLOP/s", flop / s / 1e9, "GFLOP/s", self.peak_fp32, note=f"ratio: {of_peak}"),
        )
        return best

    def _timm_baseline(self, name: str, make: Callable[[], Callable[[], None]], batch: int) -> None:
        """Adds the timm row `name` unless a section already measured it."""
        if any(r.name == name for r in self.rows):
            return
        if not self.has_timm:
            return self._timm_rows([name], "images/s")
        self.log(f"time {name} ...")
        s = self.timed({"timm": make()})["timm"]
        self.add(Row(name, batch / s, "images/s"))

    def torch_train(self) -> None:
        b, cfg = self.mode.train_batch, self.cfgs["parallel"]
        prefix = f"train {self.mode.label('parallel')} fp32 b{b}"
        fns = {"vitctl-torch": torch_train_step(vitctl_torch_model(cfg), cfg, b)}
        if self.has_timm:
            fns["timm"] = torch_train_step(timm_model(cfg), cfg, b)
        self.log(f"time {prefix} vitctl-torch + AdamW{', timm + AdamW' if self.has_timm else ''} ...")
        best = self.timed(fns, warmup=max(1, self.mode.warmup))  # the first step allocates the optimizer state
        self.add(Row(f"{prefix} vitctl-torch", b / best["vitctl-torch"], "images/s", f"{prefix} timm+AdamW", note="torch.optim.AdamW"))
        if self.has_timm:
            self.add(Row(f"{prefix} timm+AdamW", b / best["timm"], "images/s", note=timm_spec_name(cfg)))
        else:
            self._timm_rows([f"{prefix} timm+AdamW"], "images/s")

    def jax_train(self) -> None:
        b, cfg = self.mode.train_batch, self.cfgs["parallel"]
        prefix = f"train {self.mode.label('parallel')} fp32 b{b}"
        self.log(f"compile {prefix} vitctl-jax (vitctl train's step) ...")
        call, first_s = jax_train_step(cfg, b)
        note = f"vitctl.train step, AdamW; compile+1st step {first_s:.1f} s"
        self._jax_rows(prefix, call, b, flops(cfg, b, train=True), "timm+AdamW", note, "MFU against the GEMM peak")
        self._timm_baseline(f"{prefix} timm+AdamW", lambda: torch_train_step(timm_model(cfg), cfg, b), b)

    def convert(self) -> None:
        from vitctl import checkpoint as ckpt

        cfg = self.cfgs["parallel"]
        label = self.mode.label("parallel")
        with tempfile.TemporaryDirectory(prefix="vitctl-bench-") as tmp:
            src, dst, copy = Path(tmp) / "src", Path(tmp) / "dst", Path(tmp) / "copy"
            self.log(f"write a {label} vitctl-jax checkpoint ...")
            src.mkdir()
            ckpt.write_config(src, cfg, {"created_by": "vitctl bench"})
            ckpt.save_jax(src, random_weights(cfg))
            nbytes = disk_bytes(src)
            cps = []
            for i in range(2):  # cp before and after: both sides meet the same page-cache state and load
                self.gate.wait()
                cps.append(run_command(["cp", "-r", "--reflink=never", str(src), str(copy)]).seconds)
                shutil.rmtree(copy)
                if i == 0:
                    self.log(f"vitctl convert jax-to-torch {label} ...")
                    self.gate.wait()
                    r = run_command([*vitctl_command(), "convert", "jax-to-torch", str(src), str(dst)])
                    if r.exit_code:
                        raise RuntimeError(f"vitctl convert failed: {r.stderr.strip()[-500:]}")
                    shutil.rmtree(dst)
        cp_s = sum(cps) / len(cps)
        size = f"{nbytes / 2**20:.0f} MiB"
        self.add(
            Row(f"convert jax-to-torch {label}", nbytes / r.seconds / 1e9, "GB/s", "cp -r (same bytes)", note=f"{size}, peak RSS {r.maxrss_bytes / 2**20:.0f} MiB, {r.seconds:.2f} s"),
            Row("cp -r (same bytes)", nbytes / cp_s / 1e9, "GB/s", note=f"{size}, mean of 2 runs around the conversion"),
        )  # fmt: skip

    def cli(self) -> None:
        cmds = {"vitctl --help": ("--help",), "vitctl info vit-22b": INFO_CMD, "vitctl plan vit-22b": PLAN_CMD}
        results = {}
        for name, args in cmds.items():
            self.log(f"{name} ...")
            self.gate.wait()
            r = run_command([*vitctl_command(), *args])
            if r.exit_code:
                raise RuntimeError(f"{name} failed: {r.stderr.strip()[-500:]}")
            results[name] = r
        for name, r in results.items():
            base = None if name == "vitctl --help" else "vitctl --help"
            self.add(
                Row(f"{name} time", r.seconds, "s", base and f"{base} time", note="vitctl " + " ".join(cmds[name])),
                Row(f"{name} peak RSS", r.maxrss_bytes / 2**20, "MiB", base and f"{base} peak RSS"),
            )


def timm_spec_name(cfg) -> str:
    from vitctl.convert.timm import timm_spec

    return f"timm {timm_spec(cfg)['model_name']}-like (timm_spec)"


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


def run(mode: str | Mode = "full", sections: Iterable[str] = SECTIONS, log: Callable[[str], None] | None = None) -> Report:
    """Runs the benchmark; returns its rows (ratios filled), machine, load and notes.

    Args:
      mode: "full", "quick", "tiny" (see the module docstring) or a Mode of one's own.
      sections: a subset of SECTIONS, run in SECTIONS' order.
      log: progress callback (one line per step), e.g. printing to stderr.
    """
    if isinstance(mode, str):
        if mode not in MODES:
            raise ValueError(f"unknown bench mode {mode!r}: one of {', '.join(MODES)}")
        mode = MODES[mode]
    chosen = set(sections)
    if chosen - set(SECTIONS):
        raise ValueError(f"unknown bench sections {sorted(chosen - set(SECTIONS))}: pick from {', '.join(SECTIONS)}")
    t0 = time.perf_counter()
    bench = _Bench(mode, lambda msg: log(f"[{time.perf_counter() - t0:5.0f} s] {msg}") if log else None)
    monitor = LoadMonitor()
    steps = {"gemm": bench.gemm, "torch-forward": bench.torch_forward, "jax-forward": bench.jax_forward,
             "torch-train": bench.torch_train, "jax-train": bench.jax_train, "convert": bench.convert, "cli": bench.cli}  # fmt: skip
    interrupted = None
    try:  # Ctrl-C (or SIGTERM, which the CLI turns into one) keeps the rows measured so far
        interrupted = "set-up"
        if chosen & {"gemm", "torch-forward", "torch-train"}:
            import torch

            torch.set_num_threads(num_cores())
        for name in SECTIONS:
            if name in chosen:
                interrupted = name
                steps[name]()
        interrupted = None
    except KeyboardInterrupt:
        bench.notes.append(f"interrupted during {interrupted}: {len(bench.rows)} rows measured before it are kept")
    if not bench.has_timm:
        bench.notes.append("timm is not installed (pip install timm): the timm rows are empty and so are the ratios against them")
    load = {**monitor.summary(), "quiet_gate": bench.gate.summary(), "describe": f"{monitor.describe()}; {bench.gate.describe()}"}
    return Report(mode.name, link(bench.rows), machine(), load, bench.notes, interrupted)
