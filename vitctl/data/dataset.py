"""A split in memory (Dataset: uint8 NHWC images + int32 labels) and the seeded, stratified train/test split.

Sources without a test split get `split_indices`: `test_fraction` of each class held out,
seeded, so "train" and "test" never overlap and are the same on every run and process.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vitctl.errors import DataError


@dataclasses.dataclass
class Dataset:
    """One split, in memory.

    Attributes:
        images: uint8 array of shape [N, H, W, C].
        labels: int32 array of shape [N], each in [0, num_classes).
        num_classes: number of classes of the source (not only those present in this split).
        name: the source's spec, e.g. "digits" or a path.
        class_names: class names where the source has them (ImageFolder, HF ClassLabel).
        split: "train" or "test" (empty for a Dataset built by hand).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    class_names: tuple[str, ...] | None = None
    split: str = ""

    def __post_init__(self):
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(
                f"{self.name}: images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}",
                hint="load data with vitctl.data.sources.load_dataset, which converts it",
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.images)} images but labels of shape {self.labels.shape}")
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise DataError(f"{self.name}: labels must be integers, got {self.labels.dtype}", hint="map class names to 0..K-1")
        self.labels = self.labels.astype(np.int32)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DataError(
                f"{self.name}: labels range over [{self.labels.min()}, {self.labels.max()}], "
                f"outside [0, {self.num_classes}) for num_classes={self.num_classes}",
                hint="labels must be class indices 0..num_classes-1; fix the labels or the class count",
            )

    def __len__(self) -> int:
        return len(self.labels)


# --------------------------------------------------------------------------- loading


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sorted row indices: a seeded stratified split, round(test_fraction * n_c) of class c held out.

    Every class with at least 2 examples keeps at least one on each side.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):  # sorted, so the rng is consumed in the same order every time
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = round(len(idx) * test_fraction)
        if len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        test.append(idx[:n])
        train.append(idx[n:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return cat(train), cat(test)
