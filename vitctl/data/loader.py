"""Batches of a split in memory: `Loader`, shuffled, sliced per process, prepared in a background thread, resumable.

`vitctl train` streams through vitctl.data.pipeline.StreamLoader instead (the same order,
slices and state, on grain, from records read on demand); Loader stays for callers that
hold a whole split in memory.

- The order of epoch e is the permutation from `np.random.default_rng((seed, epoch))`; each
  process takes its contiguous slice of every global batch, so the batches do not depend
  on the number of processes.
- Batches are prepared (vitctl.data.preprocess.prepare) in a background thread;
  `state()`/`restore()` resume bit-identically.

Shape letters: B batch, S = cfg.image_size, C channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Self

import numpy as np

from vitctl.background import produced
from vitctl.data.dataset import Dataset
from vitctl.data.preprocess import prepare
from vitctl.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What batch (epoch, step) is: a pure function of these fields. Holds no reference to the Loader."""

    data: Dataset
    cfg: object
    batch_size: int  # global
    seed: int
    shuffle: bool
    drop_remainder: bool
    process_index: int
    process_count: int
    epochs: int | None
    steps_per_epoch: int

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.data)
        return np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)

    def local_indices(self, order: np.ndarray, step: int) -> np.ndarray:
        rows = order[step * self.batch_size : (step + 1) * self.batch_size]
        # Contiguous per-process slices; a short last batch (drop_remainder=False) is split as evenly
        # as possible, so slices still concatenate to the global batch and every process takes a step.
        return np.array_split(rows, self.process_count)[self.process_index]

    def positions(self, epoch: int, step: int) -> Iterator[tuple[int, int]]:
        while self.epochs is None or epoch < self.epochs:
            yield epoch, step
            step += 1
            if step == self.steps_per_epoch:
                epoch, step = epoch + 1, 0

    def batch(self, order: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.local_indices(order, step)
        return prepare(self.data.images[idx], self.cfg), self.data.labels[idx]


def _batches(plan: _Plan, epoch: int, step: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(epoch, step, images, labels) for every position from (epoch, step) on."""
    order_epoch, order = None, None
    for e, s in plan.positions(epoch, step):
        if e != order_epoch:
            order_epoch, order = e, plan.order(e)
        yield (e, s, *plan.batch(order, s))


def read_position(state: dict, kind: str, batch_size: int, num_examples: int, steps_per_epoch: int) -> tuple[int, int, int]:
    """(epoch, step in epoch, seed) of a saved loader state, checked against the loader `kind` restoring it."""
    try:
        epoch, step, seed = int(state["epoch"]), int(state["step_in_epoch"]), int(state["seed"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"invalid data-loader state {state!r}: {e}", hint=f"pass a dict from {kind}.state()") from None
    for key, have in (("batch_size", batch_size), ("num_examples", num_examples)):
        if key in state and state[key] != have:
            raise DataError(f"data-loader state has {key}={state[key]}, this loader {have}",
                            hint="resume with the same data set and global batch size")  # fmt: skip
    if epoch < 0 or not 0 <= step < steps_per_epoch:
        raise DataError(f"data-loader state (epoch {epoch}, step {step}) is outside 0..{steps_per_epoch - 1} steps per epoch")
    return epoch, step, seed


class Loader:
    """Batches of prepared images and labels, each process taking its slice of every global batch.

    Iterating yields (images float32 [B / process_count, S, S, C], labels int32 [B / process_count]).
    The order of epoch e is `np.random.default_rng((seed, epoch)).permutation(N)`; with
    `epochs=None` it runs forever, with `epochs=k` it stops after k epochs (a finished loader
    starts over from epoch 0 when iterated again, so a one-pass eval loader can be reused).
    Batches are prepared `prefetch` ahead in a background thread (prefetch=0: in the caller's
    thread). Call `close()` or use it as a context manager to stop the thread.
    """

    def __init__(
        self,
        data: Dataset,
        cfg,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        epochs: int | None = None,
    ):
        if batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ConfigError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if batch_size % process_count:
            raise ConfigError(
                f"global batch size {batch_size} is not divisible by the process count {process_count}",
                hint=f"use a batch size that is a multiple of {process_count}, e.g. {batch_size + process_count - batch_size % process_count}",
            )
        if epochs is not None and epochs <= 0:
            raise ConfigError(f"epochs must be positive or None (forever), got {epochs}")
        if prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0, got {prefetch}")
        if cfg.num_classes and data.num_classes > cfg.num_classes:
            raise DataError(
                f"{data.name} has {data.num_classes} classes (labels up to {data.labels.max(initial=-1)}) "
                f"but the model has num_classes={cfg.num_classes}",
                hint=f"use a model config with num_classes >= {data.num_classes}, or a data set with fewer classes",
            )
        if data.images.shape[-1] not in (1, cfg.channels):
            raise DataError(f"{data.name} has {data.images.shape[-1]}-channel images, the model {cfg.channels}",
                            hint=f"load it with load_dataset(..., channels={cfg.channels})")  # fmt: skip
        steps = len(data) // batch_size if drop_remainder else -(-len(data) // batch_size)
        if steps == 0:
            raise DataError(
                f"{data.name} has {len(data)} examples, fewer than one batch of {batch_size}",
                hint="use a smaller --batch-size, or more data",
            )
        self._plan = _Plan(data, cfg, batch_size, seed, shuffle, drop_remainder, process_index, process_count, epochs, steps)
        self.prefetch = prefetch
        self._epoch, self._step = 0, 0
        self._batches: Iterator | None = None  # prefetch > 0: produced on a background thread
        self._order: tuple[int, np.ndarray] | None = None  # prefetch=0: (epoch, order) cache

    @property
    def steps_per_epoch(self) -> int:
        return self._plan.steps_per_epoch

    @property
    def local_batch_size(self) -> int:
        return self._plan.batch_size // self._plan.process_count

    def _finished(self) -> bool:
        return self._plan.epochs is not None and self._epoch >= self._plan.epochs

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._finished():
            self.close()
            self._epoch, self._step = 0, 0
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._finished():
            raise StopIteration
        if self.prefetch == 0:
            if self._order is None or self._order[0] != self._epoch:
                self._order = (self._epoch, self._plan.order(self._epoch))
            x, y = self._plan.batch(self._order[1], self._step)
        else:
            if self._batches is None:
                self._batches = produced(_batches(self._plan, self._epoch, self._step), self.prefetch, name="vitctl-data")
            try:
                item = next(self._batches)
            except BaseException:  # the end (StopIteration) or the producer's error: the thread is joined
                self.close()
                raise
            e, s, x, y = item
            assert (e, s) == (self._epoch, self._step), f"prefetched batch {(e, s)} != expected {(self._epoch, self._step)}"
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return x, y

    def state(self) -> dict:
        """JSON-serialisable position of the next batch this loader will yield."""
        p = self._plan
        return {"epoch": self._epoch, "step_in_epoch": self._step, "seed": p.seed, "batch_size": p.batch_size, "num_examples": len(p.data)}

    def restore(self, state: dict) -> None:
        """Continue from `state` (from `state()`): the next batches are those an uninterrupted loader would yield.

        The saved seed replaces this loader's seed. batch_size and num_examples, when saved, must match.
        """
        p = self._plan
        epoch, step, seed = read_position(state, "Loader", p.batch_size, len(p.data), p.steps_per_epoch)
        self.close()
        self._plan = dataclasses.replace(p, seed=seed)
        self._epoch, self._step, self._order = epoch, step, None

    def close(self) -> None:
        """Stops and joins the prefetch thread (if any); iterating again restarts it at the current position."""
        if self._batches is not None:
            batches, self._batches = self._batches, None
            batches.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_batches", None) is not None:  # a loader dropped mid-iteration: stop its thread
            self.close()
