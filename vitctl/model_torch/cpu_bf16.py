"""bf16 GEMMs on a CPU without bf16 units.

Without AVX512_BF16 or AMX, torch's bf16 GEMM takes a reference kernel about 6x slower
than its fp32 GEMM. There every GEMM multiplies the bf16 values in fp32 and rounds the
result to bf16 once, which is what a bf16 GEMM with fp32 accumulation computes: the
inputs are the same bf16 numbers, only the accumulation order may differ (same output
within a few bf16 ulps; tests/model_torch/test_model.py). GPUs and CPUs with bf16 units
keep torch's native bf16 kernels.

Also here, for the same reason (a CPU kernel slower than the arithmetic needs): the tanh
GELU of fp32 CPU inference, computed by the same formula in cache-sized chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _cpu_has_bf16() -> bool:
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


CPU_BF16 = _cpu_has_bf16()


def gemm_in_fp32(x) -> bool:
    """True when a bf16 GEMM on x's device is better run in fp32 on the bf16 values."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not CPU_BF16


def accumulator(x) -> torch.dtype:
    """The dtype a GEMM on x accumulates into before its result is rounded to x.dtype."""
    return torch.float32 if gemm_in_fp32(x) else x.dtype


def linear(x, weight, bias=None):
    """F.linear in x's dtype, weight and bias cast to it first (fp32 parameters serve bf16 compute)."""
    dt = x.dtype
    b = None if bias is None else bias.to(dt)
    if gemm_in_fp32(x):
        return F.linear(x.float(), weight.to(dt).float(), None if b is None else b.float()).to(dt)
    return F.linear(x, weight.to(dt), b)


def gelu_cpu(h, approximate: bool):
    """F.gelu(h) (tanh form if approximate); fp32 CPU inference's tanh form overwrites h (a fresh tensor)."""
    if approximate and h.dtype == torch.float32 and h.device.type == "cpu" and h.is_contiguous() and not torch.is_grad_enabled():
        return gelu_tanh_inplace(h)
    return F.gelu(h, approximate="tanh" if approximate else "none")


def gelu_tanh_inplace(h, chunk=1 << 18):
    """F.gelu(h, approximate="tanh") in place, within fp32 round-off (h contiguous fp32, no autograd).

    torch's CPU tanh-GELU kernel is compute-bound (~8 ms per ViT-Ti/16 MLP at batch 32, 4x
    its erf GELU); the same formula as five elementwise passes over 1 MB chunks that stay in
    the L2 cache takes ~3.5 ms, which makes vitctl-torch's ViT-Ti/16 inference ~1.15x faster."""
    beta, kappa = math.sqrt(2 / math.pi), 0.044715
    b = torch.tensor(beta, dtype=h.dtype)
    for x in h.view(-1).split(chunk):  # 0.5 x (1 + tanh(beta (x + kappa x^3)))
        t = torch.addcmul(b, x, x, value=beta * kappa).mul_(x).tanh_()
        x.mul_(0.5).addcmul_(x, t)
    return h
