"""What every source reader returns, and the conversions they share: images to uint8, to
the asked-for channels, and to one array of one size.

Shape letters: N examples, H/W height/width, C channels.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from vitctl.data.preprocess import resize
from vitctl.errors import DataError

SPLITS = ("train", "test")
TEST_NAMES = ("test", "t10k", "val", "validation", "valid")  # names a source's held-out split may have


@dataclasses.dataclass
class Part:
    """One split of a source: labels up front, images decoded only for the rows asked for."""

    labels: np.ndarray
    images: Callable[[np.ndarray], list[np.ndarray] | np.ndarray]  # indices -> [n, H, W(, C)] images


@dataclasses.dataclass
class Source:
    parts: dict[str, Part]  # "train" and "test", or "all" for a source without splits
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None


def take(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda idx: x[idx]


def to_uint8(x: np.ndarray, name: str) -> np.ndarray:
    """Images as uint8: integers in [0, 255] as they are, floats in [0, 1] scaled by 255."""
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise DataError(f"{name}: images must be [N, H, W] or [N, H, W, C] with C in (1, 3), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    lo, hi = (x.min(), x.max()) if x.size else (0, 0)
    if np.issubdtype(x.dtype, np.integer) and lo >= 0 and hi <= 255:
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating) and lo >= 0 and hi <= 1:
        return np.round(x * 255.0).astype(np.uint8)
    raise DataError(
        f"{name}: images of dtype {x.dtype} range over [{lo}, {hi}]",
        hint="store uint8 pixels in [0, 255], or floats in [0, 1]",
    )


def as_list(images) -> list[np.ndarray]:
    return list(images) if not isinstance(images, np.ndarray) else [im for im in images]


def to_channels(im: np.ndarray, channels: int) -> np.ndarray:
    """[H, W] or [H, W, C] uint8 -> [H, W, channels]: gray repeated to RGB, RGB to luminance (ITU-R 601, as PIL's "L")."""
    im = im[..., None] if im.ndim == 2 else im
    if im.shape[-1] == channels:
        return im
    if im.shape[-1] == 1:
        return np.repeat(im, channels, axis=-1)
    if im.shape[-1] == 3 and channels == 1:
        return np.round(im.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].astype(np.uint8)
    raise DataError(f"cannot turn a {im.shape[-1]}-channel image into {channels} channels")


def stack(images: list[np.ndarray], image_size: int | None, name: str) -> np.ndarray:
    """Same-size images stacked as they are; others resized to image_size (or the most common size)."""
    sizes = collections.Counter(im.shape[:2] for im in images)
    if image_size is not None:
        target = (image_size, image_size)
    elif len(sizes) == 1:
        return np.stack(images)
    else:  # mixed sizes and no size asked for: the most common, ties to the largest
        target = max(sizes, key=lambda hw: (sizes[hw], hw))
    out = [
        im if im.shape[:2] == target else np.clip(np.round(resize(im[None].astype(np.float32), target, "bilinear", True)[0]), 0, 255).astype(np.uint8)
        for im in images
    ]  # fmt: skip
    return np.stack(out)
