"""Fixed position embeddings, computed once in numpy so both models get the same bits.

numpy only.
"""

from __future__ import annotations

import numpy as np


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's `posemb_sincos_2d` (models/vit.py), exactly: shape [1, h*w, width], float32.

    Computed in float64, then rounded once to float32, so that the JAX and PyTorch models
    (and big_vision checkpoints, which store no position embedding) see identical values.
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
