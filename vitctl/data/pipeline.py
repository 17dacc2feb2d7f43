"""The streaming input pipeline of `vitctl train`, on grain: `StreamLoader` (training) and `eval_batches` (held out).

- Reads examples on demand from a Records (vitctl.data.lazy): nothing is loaded whole.
- Epoch e's order is `np.random.default_rng((seed, epoch)).permutation(N)`; each process
  takes its contiguous slice of every global batch, so the union of the processes' batches
  is the one-process batch at every step, whatever the process count.
- Each example is decoded, augmented and normalized by vitctl.data.augment.transform with
  `example_rng(seed, epoch, index)`: its randomness depends only on (seed, epoch, index),
  never on the worker or process that reads it. Without ops, same-size arrays (the small
  in-memory sets) are prepared a batch at once: the same numbers, at a fraction of the cost.
- mixup / cutmix after batching, from `(seed, epoch, step)`: rows 2k and 2k+1 of every
  global batch are mixed with each other, so pairs never straddle two processes and the
  batch does not depend on the process count; labels become float32 [B, K] targets.
- grain: a MapDataset over this process's slots (one per row it feeds), `.map` (read and
  transform), `.batch`, `.to_iter_dataset`, then `.mp_prefetch` over `workers` processes
  (workers=0: in-process, a thread prefetch).
- State: the global position (epoch, step_in_epoch), enough to resume on any process count
  and any number of workers; grain's own iterator state beside it, per process, for the record.
- A failing example raises DataError naming it (records.describe), from a worker too; with
  skip_bad a training example is replaced by the next one that reads, and counted, and a
  held-out one is left out of the accuracy.

Shape letters: B batch (per process), S = cfg.image_size, C channels, K classes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, Self

import numpy as np

from vitctl.data import augment as augment_ops
from vitctl.data.loader import read_position
from vitctl.data.preprocess import prepare
from vitctl.errors import ConfigError, DataError

_MIX_SALT = 0x6D6978  # keeps the mixing rng's seed apart from the example rngs'
_SKIP_LIMIT = 64  # consecutive unreadable examples before skip_bad gives up


class _Slots:
    """Which example a slot is: a pure, picklable function of the fields (run in grain's workers too).

    Slot j of a process is row j % B of its batch number j // B; batch number t is epoch
    t // steps, step t % steps. The process's rows of a step are its contiguous slice of
    that step's global batch.
    """

    def __init__(self, records, cfg, batch_size, seed, shuffle, process_index, process_count, steps, *, augment="", train=True):
        self.records, self.cfg, self.batch_size, self.seed, self.shuffle = records, cfg, batch_size, seed, shuffle
        self.process_index, self.process_count, self.steps, self.augment, self.train = process_index, process_count, steps, augment, train
        self.local = batch_size // process_count
        self.skip_bad, self.mixup, self.cutmix, self.num_classes = False, 0.0, 0.0, 0
        self._order: tuple[int, np.ndarray] | None = None
        self._aug = None
        augment_ops.parse(augment)  # a bad spec is a ConfigError here, not a failure in a worker

    def __getstate__(self):
        return {**self.__dict__, "_order": None, "_aug": None}

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.records)
            self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n))
        return self._order[1]

    def where(self, slot: int) -> tuple[int, int, int]:
        """(epoch, step, global row) of `slot`."""
        batch, r = divmod(int(slot), self.local)
        epoch, step = divmod(batch, self.steps)
        return epoch, step, step * self.batch_size + self.process_index * self.local + r

    def example(self, slot: int) -> dict[str, Any]:
        """One row: image float32 [S, S, C], label, its batch number, validity (eval pad) and skipped count."""
        epoch, step, row = self.where(slot)
        valid = row < len(self.records)
        index = int(self.order(epoch)[row]) if valid else 0  # a pad row of an eval batch: example 0, masked
        image, label, skipped = self._read(index, epoch)
        if image is None:  # held out and unreadable, with skip_bad: not counted
            image, valid = np.zeros((self.cfg.image_size, self.cfg.image_size, self.cfg.channels), np.float32), False
        return {"image": image, "label": np.int32(label), "batch": np.int64(epoch * self.steps + step), "valid": valid, "skipped": skipped}

    def _read(self, index: int, epoch: int):
        """(image, label, skipped); with skip_bad a training example that fails is replaced by the next
        readable one, a held-out one is (None, 0, 1): left out of the evaluation rather than replaced."""
        n, skipped = len(self.records), 0
        while True:
            i = (index + skipped) % n
            try:
                image, label = self.records[i]
                return self._transform(image, epoch, i), label, skipped
            except Exception as e:  # noqa: BLE001 (decoders raise many types; all name this example)
                if not self.skip_bad or skipped >= min(_SKIP_LIMIT, n - 1):
                    raise _bad_example(self.records, i, e, skipped) from None
                if not self.train:
                    return None, 0, 1
                skipped += 1

    def _transform(self, image, epoch: int, index: int) -> np.ndarray:
        """float32 [S, S, C]; or, without ops, a uint8 [H, W, C] array as it is (`collate` prepares the batch at once)."""
        if self._aug is None:
            aug = augment_ops.parse(self.augment)
            self._aug = (aug if aug.ops else None,)
        channels = getattr(self.records, "channels", self.cfg.channels)
        if self._aug[0] is None and isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape[2:] == (channels,):
            return image
        return augment_ops.transform(image, self.cfg, self._aug[0], augment_ops.example_rng(self.seed, epoch, index), channels=channels)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Rows -> a batch. Arrays left as they are (no ops) are prepared together, as `prepare` does a batch: the
        same numbers as one at a time (augment.transform's contract), at a fraction of the cost for small images."""
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "image"}
        images = [r["image"] for r in rows]
        if all(x.dtype == np.uint8 and x.shape == images[0].shape for x in images):
            batch["image"] = prepare(np.stack(images), self.cfg)
        else:
            batch["image"] = np.stack([prepare(x[None], self.cfg)[0] if x.dtype == np.uint8 else x for x in images])
        return batch

    def finish(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch's mixup / cutmix (from (seed, epoch, step)); the labels become float32 [B, K] targets."""
        if not (self.mixup or self.cutmix):
            return batch
        epoch, step = divmod(int(batch["batch"][0]), self.steps)
        x, y = mix(batch["image"], batch["label"], self.num_classes, np.random.default_rng((self.seed, epoch, step, _MIX_SALT)),
                   mixup=self.mixup, cutmix=self.cutmix)  # fmt: skip
        return {**batch, "image": x, "label": y}


def _bad_example(records, index: int, e: BaseException, skipped: int) -> DataError:
    try:
        what = records.describe(index)
    except Exception:  # noqa: BLE001 (a description is best effort: the index still names it)
        what = f"example {index}"
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    more = f" (and the {skipped} before it)" if skipped else ""
    return DataError(
        f"cannot read {what} of {getattr(records, 'name', 'the data')}{more}: {type(e).__name__}: {detail}",
        hint="remove or replace it, or pass --skip-bad to replace unreadable examples by the next readable one",
    )


def mix(images: np.ndarray, labels: np.ndarray, num_classes: int, rng: np.random.Generator, *, mixup: float, cutmix: float):
    """mixup (arXiv:1710.09412) or cutmix (arXiv:1905.04899) of rows 2k and 2k+1, one lambda per batch.

    With both on, each batch takes one of them with probability 1/2 (timm's switch).

    Args:
        images: float32 [B, S, S, C], B even.
        labels: int [B] class indices, or float32 [B, K] targets.
        num_classes: K.
        rng: the batch's generator.

    Returns:
        (mixed images [B, S, S, C], float32 targets [B, K]).
    """
    b, h, w = images.shape[:3]
    assert b % 2 == 0, f"mixing pairs rows: batch {b} must be even"
    y = labels if labels.ndim == 2 else np.eye(num_classes, dtype=np.float32)[labels]
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    partner = np.arange(b) ^ 1  # rows 2k <-> 2k+1
    if use_cutmix:
        ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        out = images.copy()
        out[:, y0:y1, x0:x1] = images[partner, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the share of the image that is still its own
    else:
        out = (lam * images + (1 - lam) * images[partner]).astype(np.float32)
    return out, (lam * y + (1 - lam) * y[partner]).astype(np.float32)


def _check(records, cfg, batch_size: int, process_index: int, process_count: int, workers: int, prefetch: int) -> None:
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ConfigError(
            f"global batch size {batch_size} is not divisible by the process count {process_count}",
            hint=f"use a batch size that is a multiple of {process_count}, e.g. {batch_size + process_count - batch_size % process_count}",
        )
    if workers < 0 or prefetch < 0:
        raise ConfigError(f"workers and prefetch must be 0 or more, got workers={workers}, prefetch={prefetch}")
    if cfg.num_classes and records.num_classes > cfg.num_classes:
        raise DataError(
            f"{records.name} has {records.num_classes} classes but the model has num_classes={cfg.num_classes}",
            hint=f"use a model config with num_classes >= {records.num_classes}, or a data set with fewer classes",
        )


def _iterate(slots: _Slots, start: int, stop: int, workers: int, prefetch: int):
    """grain's iterator over this process's batches number start .. stop-1."""
    import grain

    local = slots.local
    ds = grain.MapDataset.range(start * local, stop * local).map(slots.example)
    ds = ds.batch(local, drop_remainder=True, batch_fn=slots.collate).map(slots.finish)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; a library caller has parsed none
            flags.FLAGS.mark_as_parsed()
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(prefetch, 1))
        ds = ds.mp_prefetch(options, worker_init_fn=_worker_init)
    else:
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch))
    return iter(ds)


def _worker_init(index: int, count: int) -> None:
    """A grain worker ignores SIGINT: Ctrl-C reaches the whole process group, and the trainer answers it by
    finishing the step and saving, then closing the workers itself (a worker killed by it would lose its batches)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StreamLoader:
    """Batches of transformed images and labels, each process taking its slice of every global batch.

    Iterating yields (images float32 [B / process_count, S, S, C], labels int32 [B / process_count],
    or float32 [B / process_count, K] targets with mixup / cutmix). With `epochs=None` it runs
    forever; with `epochs=k` it stops after k epochs (and starts over from epoch 0 when
    iterated again). Call `close()` or use it as a context manager to stop grain's workers.

    Args:
        records: a Records (vitctl.data.lazy): len, [i] -> (encoded bytes | uint8 HWC, label), describe(i).
        cfg: the model's ViTConfig (image size, channels, preprocessing, classes).
        batch_size: the global batch size.
        workers: grain worker processes per training process (0: in this process).
        augment: an augmentation spec for vitctl.data.augment.parse ("": resize only).
        mixup / cutmix: Beta(alpha, alpha) of the batch-level mixing (0: off).
        skip_bad: replace an unreadable example by the next readable one, counted in `skipped`.
    """

    def __init__(self, records, cfg, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_remainder: bool = True,
                 process_index: int = 0, process_count: int = 1, workers: int = 0, augment: str = "", epochs: int | None = None,
                 prefetch: int = 2, mixup: float = 0.0, cutmix: float = 0.0, skip_bad: bool = False):  # fmt: skip
        _check(records, cfg, batch_size, process_index, process_count, workers, prefetch)
        if not drop_remainder:
            raise ConfigError("StreamLoader yields whole global batches only", hint="use eval_batches for a padded pass over every example")
        if epochs is not None and epochs <= 0:
            raise ConfigError(f"epochs must be positive or None (forever), got {epochs}")
        steps = len(records) // batch_size
        if steps == 0:
            raise DataError(f"{records.name} has {len(records)} examples, fewer than one batch of {batch_size}",
                            hint="use a smaller --batch-size, or more data")  # fmt: skip
        if (mixup or cutmix) and (batch_size // process_count) % 2:
            raise ConfigError(f"mixup / cutmix mix pairs of rows: the per-process batch {batch_size // process_count} must be even")
        self._slots = _Slots(records, cfg, batch_size, seed, shuffle, process_index, process_count, steps, augment=augment)
        self._slots.skip_bad, self._slots.mixup, self._slots.cutmix = skip_bad, float(mixup), float(cutmix)
        self._slots.num_classes = cfg.num_classes or records.num_classes
        self.workers, self.prefetch, self.epochs = workers, prefetch, epochs
        self._epoch, self._step, self.skipped = 0, 0, 0
        self._it = None

    @property
    def steps_per_epoch(self) -> int:
        return self._slots.steps

    @property
    def local_batch_size(self) -> int:
        return self._slots.local

    def _finished(self) -> bool:
        return self.epochs is not None and self._epoch >= self.epochs

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._finished():
            self.close()
            self._epoch, self._step = 0, 0
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._finished():
            raise StopIteration
        if self._it is None:
            start = self._epoch * self.steps_per_epoch + self._step
            stop = sys.maxsize // (4 * self.local_batch_size) if self.epochs is None else self.epochs * self.steps_per_epoch
            self._it = _iterate(self._slots, start, stop, self.workers, self.prefetch)
        try:
            batch = next(self._it)
        except StopIteration:
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 (grain re-raises what a worker raised, of any type)
            self.close()
            raise _from_worker(e) from None
        assert int(batch["batch"][0]) == self._epoch * self.steps_per_epoch + self._step, "grain yielded a batch out of order"
        self.skipped += int(batch["skipped"].sum())
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return batch["image"], batch["label"]

    def state(self) -> dict:
        """JSON-serialisable global position of the next batch: the same on every process, for any process count."""
        s = self._slots
        return {
            "epoch": self._epoch,
            "step_in_epoch": self._step,
            "seed": s.seed,
            "batch_size": s.batch_size,
            "num_examples": len(s.records),
        }

    def process_state(self) -> dict:
        """This process's part (JSON): its slice, workers, skipped count and grain's own iterator state (for the record)."""
        s = self._slots
        grain_state = self._it.get_state() if self._it is not None else None
        return {"process_index": s.process_index, "process_count": s.process_count, "workers": self.workers,
                "position": self.state(), "skipped": self.skipped, "grain": _jsonable(grain_state)}  # fmt: skip

    def restore(self, state: dict, process_state: dict | None = None) -> None:
        """Continue from `state` (from `state()`, saved with any process count): the next batches are those an
        uninterrupted loader would yield. The saved seed replaces this loader's; batch_size and
        num_examples, when saved, must match. `process_state` (this process's, same slice) restores the skipped count."""
        s = self._slots
        epoch, step, seed = read_position(state, "StreamLoader", s.batch_size, len(s.records), self.steps_per_epoch)
        self.close()
        s.seed, s._order = seed, None
        self._epoch, self._step = epoch, step
        if process_state and (process_state.get("process_index"), process_state.get("process_count")) == (s.process_index, s.process_count):
            self.skipped = int(process_state.get("skipped", 0))

    def close(self) -> None:
        """Stops grain's workers and threads; iterating again restarts at the current position."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_it", None) is not None:
            self.close()


def _from_worker(e: BaseException) -> BaseException:
    """A worker's failure as the main process sees it: a DataError naming the example when the cause is one."""
    seen = e
    while seen is not None:
        if isinstance(seen, DataError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    marker = "DataError: "
    if marker in text:  # grain re-raises a worker's error with its traceback as text
        line = text[text.rindex(marker) + len(marker) :].strip().splitlines()[0]
        return DataError(line, hint="remove or replace it, or pass --skip-bad to replace unreadable examples by the next readable one")
    return e


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bytes):
        return x.decode("latin-1")
    if isinstance(x, np.generic):
        return x.item()
    return x


def eval_batches(records, cfg, batch_size: int, *, process_index: int = 0, process_count: int = 1, workers: int = 0,
                 augment: str = "", prefetch: int = 2, skip_bad: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:  # fmt: skip
    """One pass over every example in order, for held-out evaluation: (images [B/P, S, S, C], labels [B/P], valid [B/P]).

    Global batches of `batch_size`, each process its contiguous slice; the last global batch is
    padded (rows past the end repeat example 0 with valid False), so every process takes the same steps.
    With skip_bad an unreadable example is a row with valid False (left out of the accuracy), not an error.
    """
    _check(records, cfg, batch_size, process_index, process_count, workers, prefetch)
    steps = -(-len(records) // batch_size)
    slots = _Slots(records, cfg, batch_size, 0, False, process_index, process_count, steps, augment=augment, train=False)
    slots.skip_bad = skip_bad
    it = _iterate(slots, 0, steps, workers, prefetch)
    try:
        for batch in it:
            yield batch["image"], batch["label"], batch["valid"]
    except Exception as e:  # noqa: BLE001 (grain re-raises what a worker raised, of any type)
        raise _from_worker(e) from None
    finally:
        if hasattr(it, "close"):
            it.close()


class InMemoryRecords:
    """A Records over a split already in memory (a vitctl.data.dataset.Dataset, or any object with
    uint8 `images` [N, H, W, C], int `labels` [N], `num_classes` and `name`)."""

    def __init__(self, data):
        self.images, self.labels = np.asarray(data.images), np.asarray(data.labels, np.int32)
        self.name, self.num_classes = getattr(data, "name", "data"), int(data.num_classes)
        self.class_names, self.channels = getattr(data, "class_names", None), int(self.images.shape[-1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"example {i}"


def array_batches(data, cfg, prepare_fn, batch_size: int, *, process_index: int = 0, process_count: int = 1):
    """eval_batches' batches from a split in memory (`images` uint8 [N, H, W, C], `labels`) through `prepare_fn(images, cfg)`."""
    n, local = len(data.labels), batch_size // process_count
    for start in range(0, n, batch_size):
        rows = np.arange(start + process_index * local, start + (process_index + 1) * local)
        valid = rows < n
        rows = np.where(valid, rows, 0)
        yield np.asarray(prepare_fn(np.asarray(data.images)[rows], cfg)), np.asarray(data.labels)[rows], valid


def image_side(records, sample: int = 256) -> int:
    """The larger side of the data's images (the model's default image size follows it), as load_dataset
    sizes a split: the most common size (ties to the largest), among up to `sample` examples spread over it
    (an encoded image's header only). From the array of a split in memory, or a Records' `image_side`."""
    images = getattr(records, "images", None)
    if images is not None and getattr(images, "ndim", 0) == 4:
        return int(max(images.shape[1:3]))
    side = getattr(records, "image_side", None)
    if side:
        return int(side)
    import collections

    picks = np.unique(np.linspace(0, len(records) - 1, min(sample, len(records))).astype(np.int64))
    sizes: collections.Counter = collections.Counter()
    for i in picks:
        try:
            sizes[_size(records[int(i)][0])] += 1
        except Exception as e:  # noqa: BLE001 (an unreadable example is the pipeline's to report, or skip)
            error = _bad_example(records, int(i), e, 0)
    if not sizes:
        raise error
    return int(max(max(sizes, key=lambda hw: (sizes[hw], hw))))  # ties to the largest, as load_dataset


def _size(image) -> tuple[int, int]:
    """(height, width) of encoded bytes (from the header) or an array."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(bytes(image))) as im:
            return im.height, im.width
    return tuple(np.asarray(image).shape[:2])
