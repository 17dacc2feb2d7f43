"""Images -> model input, following a config's `Preprocess` spec, in each framework.

Resizing is the step ports most often get wrong (shared/PARITY.md), so each backend
resizes with its own framework's kernel and both are compared: JAX uses
`jax.image.resize`, torch `F.interpolate` (both half-pixel centres, align_corners=False),
each with the spec's method and antialias flag. Then pixel values [0, 255] map to
`value_range` (big_vision) or `(x / 255 - mean) / std` (torchvision).

Layouts: uint8 images are HWC; JAX input is NHWC, torch input NCHW.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitctl.config import Preprocess
from vitctl.errors import CheckpointError, ConfigError

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
        except Exception as e:  # PIL raises many types for bad files
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
            kw = {} if mode == "nearest" else dict(align_corners=False, antialias=spec.antialias)
            x = F.interpolate(chw, size=(size, size), mode=mode, **kw)[0].permute(1, 2, 0)
        out.append(normalize(x, spec))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def random_images(n: int, size: int, channels: int, seed: int) -> list[np.ndarray]:
    """`n` seeded uint8 HWC images of the model's own size (no resize needed)."""
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8))
