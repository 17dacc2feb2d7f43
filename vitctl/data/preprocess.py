"""Images -> model input, following a config's `Preprocess` spec: on the host (numpy) and in each framework.

Resizing is the step ports most often get wrong, so each backend
resizes with its own framework's kernel and both are compared: JAX uses
`jax.image.resize`, torch `F.interpolate` (both half-pixel centres, align_corners=False),
each with the spec's method and antialias flag. Then pixel values [0, 255] map to
`value_range` (big_vision) or `(x / 255 - mean) / std` (torchvision).

`prepare(images, cfg)` does the same on the host for training batches, with a numpy port of
`jax.image.resize` (jax/_src/image/scale.py): half-pixel centres, "bilinear" = triangle kernel,
"bicubic" = Keys cubic with a = -0.5, "nearest" = floor((i + 0.5) * in / out); with antialias
the kernel is widened by in/out when downsampling. So host-prepared batches match what
`to_jax_input` computes on device, up to float32 rounding.

Layouts: uint8 images are HWC; JAX input is NHWC, torch input NCHW.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitctl.config import Preprocess
from vitctl.errors import CheckpointError, ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image_files(directory: str | Path, limit: int | None = None, channels: int = 3) -> tuple[list[str], list[np.ndarray]]:
    """(names, uint8 HWC arrays) of the image files in `directory` (sorted, recursive)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ConfigError("reading image files needs Pillow", hint="pip install pillow") from e
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ConfigError(f"no image files in {directory}", hint=f"--images takes a directory of {', '.join(IMAGE_SUFFIXES)} files")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("L" if channels == 1 else "RGB")))
        except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files)
            raise CheckpointError(f"cannot decode image {f}: {e}", hint="remove or replace the file") from None
    if channels == 1:
        images = [im[..., None] for im in images]
    return [str(f.relative_to(directory)) for f in files], images


def normalize(x, spec: Preprocess):
    """float pixels in [0, 255] (any array type, channels last) -> model values."""
    if spec.value_range is not None:
        lo, hi = spec.value_range
        return x * ((hi - lo) / 255.0) + lo
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    return (x / 255.0 - mean) / std


def to_jax_input(images: Sequence[np.ndarray], spec: Preprocess, size: int):
    """uint8 HWC images -> [B, size, size, C] float32 jax array, resized by jax.image.resize."""
    import jax
    import jax.numpy as jnp

    method = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}[spec.resize]
    out = []
    for im in images:
        x = jnp.asarray(im, jnp.float32)
        if x.shape[:2] != (size, size):
            x = jax.image.resize(x, (size, size, x.shape[2]), method=method, antialias=spec.antialias)
        out.append(normalize(x, spec))
    return jnp.stack(out)


def to_torch_input(images: Sequence[np.ndarray], spec: Preprocess, size: int):
    """uint8 HWC images -> [B, C, size, size] float32 torch tensor, resized by F.interpolate."""
    import torch
    import torch.nn.functional as F

    out = []
    for im in images:
        x = torch.from_numpy(np.array(im, dtype=np.float32))
        if tuple(x.shape[:2]) != (size, size):
            chw = x.permute(2, 0, 1)[None]
            mode = spec.resize
            kw = {} if mode == "nearest" else {"align_corners": False, "antialias": spec.antialias}
            x = F.interpolate(chw, size=(size, size), mode=mode, **kw)[0].permute(1, 2, 0)
        out.append(normalize(x, spec))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def random_images(n: int, size: int, channels: int, seed: int) -> list[np.ndarray]:
    """`n` seeded uint8 HWC images of the model's own size (no resize needed)."""
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8))


def _kernel(method: str):
    if method == "bilinear":
        return lambda x: np.maximum(0.0, 1.0 - np.abs(x))

    # Keys (1981) cubic convolution with a = -0.5, as jax.image.resize's "cubic".
    def keys_cubic(x):
        out = ((1.5 * x - 2.5) * x) * x + 1.0
        out = np.where(x >= 1.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, out)
        return np.where(x >= 2.0, 0.0, out)

    return keys_cubic


def resize_weights(n_in: int, n_out: int, method: str, antialias: bool) -> np.ndarray:
    """[n_out, n_in] interpolation matrix along one axis, as jax/_src/image/scale.py compute_weight_mat."""
    inv_scale = n_in / n_out
    kernel_scale = max(inv_scale, 1.0) if antialias else 1.0  # low-pass only when downsampling
    sample = (np.arange(n_out) + 0.5) * inv_scale - 0.5  # half-pixel centres, in input coordinates
    w = _kernel(method)(np.abs(sample[:, None] - np.arange(n_in)[None, :]) / kernel_scale)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(np.abs(total) > 1000.0 * np.finfo(np.float32).eps, w / np.where(total != 0, total, 1), 0.0)
    inside = (sample >= -0.5) & (sample <= n_in - 0.5)
    return np.where(inside[:, None], w, 0.0).astype(np.float32)


def resize(x: np.ndarray, size: tuple[int, int], method: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """float32 [B, H, W, C] -> [B, size[0], size[1], C], matching jax.image.resize (see module docstring)."""
    (h, w), (oh, ow) = x.shape[1:3], size
    if method == "nearest":
        # jax's _resize_nearest, in float32 like jax: floor((i + 0.5) * in / out).
        rows = np.floor((np.arange(oh, dtype=np.float32) + 0.5) * np.float32(h) / np.float32(oh)).astype(np.int64)
        cols = np.floor((np.arange(ow, dtype=np.float32) + 0.5) * np.float32(w) / np.float32(ow)).astype(np.int64)
        return x[:, rows][:, :, cols]
    if (h, w) != (oh, ow):
        # One axis at a time; optimize=True turns each contraction into a BLAS matmul (10x faster).
        x = np.einsum("oh,bhwc->bowc", resize_weights(h, oh, method, antialias), x, optimize=True) if h != oh else x
        x = np.einsum("pw,bowc->bopc", resize_weights(w, ow, method, antialias), x, optimize=True) if w != ow else x
    return x.astype(np.float32, copy=False)


def prepare(images: np.ndarray, cfg) -> np.ndarray:
    """uint8 [B, H, W, C] -> float32 [B, S, S, cfg.channels] model input, per cfg.preprocess.

    Resize (method and antialias from the spec; skipped when already S x S, as
    to_jax_input does) with the jax.image.resize port above, then map
    [0, 255] to value_range or (x / 255 - mean) / std. Deterministic, host only.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise DataError(f"prepare() takes [B, H, W, C] images, got shape {images.shape}")
    if images.shape[-1] != cfg.channels:
        if images.shape[-1] != 1:
            raise DataError(f"images have {images.shape[-1]} channels, the model {cfg.channels}",
                            hint=f"load the data with channels={cfg.channels}")  # fmt: skip
        images = np.repeat(images, cfg.channels, axis=-1)
    spec, s = cfg.preprocess, cfg.image_size
    x = images.astype(np.float32)
    if x.shape[1:3] != (s, s):
        x = resize(x, (s, s), spec.resize, spec.antialias)
    return np.asarray(normalize(x, spec), np.float32)


# --------------------------------------------------------------------------- batching
