"""Fixed position embeddings, computed once in numpy so both models get the same bits.

numpy only.
"""

from __future__ import annotations

import math

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


RESAMPLE_METHODS = ("bilinear", "bicubic")


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_in, n_out) weights of jax.image.resize's "bilinear" (scale_and_translate with a triangle
    kernel, antialiased: widened by the zoom factor when shrinking), in float64."""
    inv_scale = n_in / n_out
    kernel_scale = max(inv_scale, 1.0)
    sample = (np.arange(n_out) + 0.5) * inv_scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(sample[None, :] - np.arange(n_in)[:, None]) / kernel_scale)
    total = w.sum(0, keepdims=True)
    w = np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps, w / np.where(total != 0, total, 1), 0.0)
    return np.where(((sample >= -0.5) & (sample <= n_in - 0.5))[None, :], w, 0.0)


def _cubic_weights(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_in, n_out) weights of torch F.interpolate(mode="bicubic", align_corners=False,
    antialias=False): Keys' cubic with a=-0.75 on the 4 nearest inputs, indices clamped at the border."""
    w = np.zeros((n_in, n_out))
    for j in range(n_out):
        x = (j + 0.5) * n_in / n_out - 0.5  # not clamped at 0 for cubic (torch's area_pixel_compute_source_index)
        i0 = int(np.floor(x))
        t = x - i0
        coeffs = (
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        )
        for k, c in enumerate(coeffs):
            w[min(max(i0 - 1 + k, 0), n_in - 1), j] += c
    return w


def resample_posemb(
    posemb: np.ndarray, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None, *, prefix: int = 0, method: str = "bilinear"
) -> np.ndarray:
    """A learned position embedding [1, prefix + h*w, D] resampled to the grid `new_grid` (gh, gw).

    The first `prefix` rows (a class-token slot) are kept apart and unchanged; the rest is
    the (h, w, D) grid, row-major (old_grid: square if not given).
    - bilinear: big_vision's `resample_posemb` (models/vit.py: jax.image.resize, bilinear,
      which antialiases when shrinking).
    - bicubic: timm's `resample_abs_pos_embed` with torch F.interpolate(bicubic,
      align_corners=False, antialias=False).
    Computed in float64 and rounded once to the input's dtype.
    """
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"Unknown position-embedding resampling '{method}' (known: {', '.join(RESAMPLE_METHODS)})")
    head, grid = posemb[:, :prefix], posemb[:, prefix:]
    if old_grid is None:
        side = math.isqrt(grid.shape[1])
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != grid.shape[1]:
        raise ValueError(f"a position embedding of {grid.shape[1]} grid rows is not a {old_grid[0]}x{old_grid[1]} grid")
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    weights = _triangle_weights if method == "bilinear" else _cubic_weights
    wh, ww = weights(old_grid[0], new_grid[0]), weights(old_grid[1], new_grid[1])
    g = grid.reshape(old_grid[0], old_grid[1], -1).astype(np.float64)  # (h, w, D)
    out = np.einsum("hwD,hH,wW->HWD", g, wh, ww).reshape(1, new_grid[0] * new_grid[1], -1)
    return np.concatenate([head, out.astype(posemb.dtype)], axis=1)
