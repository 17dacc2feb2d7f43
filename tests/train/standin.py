"""A tiny in-memory stand-in for vitctl.data (Dataset, Loader, prepare), with an
exactly restorable iterator state, so the trainer's tests do not depend on real data."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Dataset:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int32 (N,)
    num_classes: int
    name: str = "standin"


def make_dataset(n: int = 96, size: int = 8, channels: int = 3, num_classes: int = 4, seed: int = 0) -> Dataset:
    """Learnable: each class is a bright square in its own quadrant, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = rng.integers(0, 64, (n, size, size, channels)).astype(np.uint8)
    h = size // 2
    for i, c in enumerate(labels):
        r, q = divmod(int(c) % 4, 2)
        images[i, r * h : (r + 1) * h, q * h : (q + 1) * h] += 160
    return Dataset(images, labels, num_classes)


def prepare(images, cfg):
    """uint8 NHWC -> float32 in [-1, 1] at cfg.image_size (nearest-neighbour repeat)."""
    x = np.asarray(images, np.float32) / 127.5 - 1.0
    f = cfg.image_size // x.shape[1]
    x = x.repeat(f, 1).repeat(f, 2)
    if x.shape[-1] != cfg.channels:
        x = np.broadcast_to(x[..., :1], (*x.shape[:-1], cfg.channels))
    return np.ascontiguousarray(x)


class Loader:
    def __init__(
        self, data, cfg, batch_size, seed=0, shuffle=True, drop_remainder=True, process_index=0, process_count=1, prefetch=2, epochs=None
    ):
        self.data, self.cfg, self.bs, self.seed = data, cfg, batch_size, seed
        self.epoch, self.index = 0, 0

    def state(self):
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state):
        self.epoch, self.index = state["epoch"], state["index"]

    def __iter__(self):
        n = len(self.data.labels)
        while True:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            while self.index + self.bs <= n:
                idx = order[self.index : self.index + self.bs]
                self.index += self.bs
                yield prepare(self.data.images[idx], self.cfg), self.data.labels[idx]
            self.epoch, self.index = self.epoch + 1, 0

    def close(self):
        pass
