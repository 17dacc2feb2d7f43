"""bf16 GEMMs on a CPU without bf16 units.

Without AVX512_BF16 or AMX, torch's bf16 GEMM takes a reference kernel about 6x slower
than its fp32 GEMM. There every GEMM multiplies the bf16 values in fp32 and rounds the
result to bf16 once, which is what a bf16 GEMM with fp32 accumulation computes: the
inputs are the same bf16 numbers, only the accumulation order may differ (same output
within a few bf16 ulps; tests/model_torch/test_model.py). GPUs and CPUs with bf16 units
keep torch's native bf16 kernels.
"""

from __future__ import annotations

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
