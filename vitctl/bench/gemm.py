"""Analytic FLOPs of vitctl's models and the GEMM peaks of each framework on this machine.

FLOPs: `flops(cfg, batch, train)` = 2 x the multiply-accumulates of every matmul. A GEMM
peak is the best GFLOP/s of one matmul over the model's own shapes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable


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
