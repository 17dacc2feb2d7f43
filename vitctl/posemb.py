"""Fixed position embeddings, computed once in numpy so both models get the same bits.

numpy only.
"""

from __future__ import annotations

import numpy as np


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's `posemb_sincos_2d` formula (models/vit.py): shape [1, h*w, width], float32.

    Computed in float64 and rounded once to float32, so that the JAX and PyTorch models
    see identical bits. big_vision itself computes in float32 with XLA's sin/cos/pow, so
    its values differ from these by up to 1.2e-6 at a 16x16 grid (5e-6 at 64x64); no
    numpy formulation reproduces XLA's transcendental functions bit for bit.
    """
    if width % 4:
        raise ValueError(f"width must be a multiple of 4 for 2-D sin-cos, got {width}")
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return pe.astype(np.float32)[None, :, :]
