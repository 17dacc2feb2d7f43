"""The named sources: "digits" (scikit-learn's bundled 8x8 digits, the zero-download default)
and "fashion-mnist" (Debian's dataset-fashion-mnist package).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vitctl.data.sources.common import Part, Source
from vitctl.data.sources.idx import read_idx_dir
from vitctl.errors import DataError, MissingDependencyError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Reference: github.com/zalandoresearch/fashion-mnist README, "Labels".
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_digits() -> Source:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingDependencyError("the 'digits' data set needs scikit-learn", hint="pip install 'vitctl[data]'") from e
    d = load_digits()
    # Values are counts 0..16 (4x4 blocks of a 32x32 bitmap); scale to the full uint8 range.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return Source({"all": Part(d.target.astype(np.int32), lambda idx: images[idx])}, 10, tuple(map(str, range(10))))


def read_fashion_mnist() -> Source:
    if not FASHION_MNIST_DIR.is_dir():
        raise DataError(
            f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}",
            hint="apt-get install dataset-fashion-mnist, or pass a directory of Fashion-MNIST IDX files",
        )
    return dataclasses.replace(read_idx_dir(FASHION_MNIST_DIR), num_classes=10, class_names=FASHION_MNIST_CLASSES)
