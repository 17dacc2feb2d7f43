"""Sizes and counts as people read them, for messages and tables: the one formatter of each.

Bytes use binary units (KiB, MiB, GiB, TiB), as `vitctl plan --hbm 32GiB` and the memory and
disk refusals do; parameter counts use decimal suffixes (k, M, B, T), as model names do
("ViT-22B"). Standard library only.
"""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1536 -> "1.50 KiB"; a negative size (a shortfall) keeps its sign: -2**30 -> "-1.00 GiB"."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {suffix}"
    return f"{sign}{n:.0f} B"


def human_count(n: float) -> str:
    """A parameter count: 86_567_656 -> "86.57M", 21_743_000_000 -> "21.74B"."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"
