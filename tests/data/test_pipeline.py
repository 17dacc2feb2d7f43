"""vitctl.data.pipeline on grain: per-process slices that concatenate to the one-process batch (workers
0 and 2, augmentation and mixing on, across epochs), exact resume onto any process count, a corrupt
example named from a worker, skip_bad, and eval_batches' one padded pass.

The data is a small Records stand-in (uint8 arrays of several sizes), so every example is decoded,
cropped and resized as in a real run.
"""

import numpy as np
import pytest

pytest.importorskip("grain")

from tests.conftest import tiny
from vitctl.data.pipeline import StreamLoader, eval_batches, mix
from vitctl.errors import DataError

N, B, STEPS = 36, 8, 4  # 4 steps per epoch (4 examples dropped each epoch)
AUG = "inception_crop|flip_lr"
CFG = tiny(num_classes=5)


class Records:
    """The Records interface over seeded uint8 images of sizes 12..27 px; `bad` examples are undecodable bytes."""

    name, num_classes, class_names, channels = "standin", 5, None, 3

    def __init__(self, n=N, bad=()):
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 256, (12 + i % 16, 27 - i % 16, 3), dtype=np.uint8) for i in range(n)]
        self.labels = [i % 5 for i in range(n)]
        self.bad = set(bad)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return (b"\x00 not an image" if i in self.bad else self.images[i]), self.labels[i]

    def describe(self, i):
        return f"standin/{i:03d}.png"


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def union(per_process):
    """Concatenation in process order, step by step."""
    return [tuple(np.concatenate(parts) for parts in zip(*step)) for step in zip(*per_process)]


def assert_same(got, want):
    assert len(got) == len(want)
    for k, ((x, y), (x2, y2)) in enumerate(zip(got, want)):
        assert x.dtype == np.float32 and x.shape == x2.shape, k
        assert np.array_equal(x, x2) and np.array_equal(y, y2), f"step {k} differs"


def loaders(count, workers, **kw):
    kw = {"seed": 3, "augment": AUG, **kw}
    return [StreamLoader(Records(), CFG, B, process_index=i, process_count=count, workers=workers, **kw) for i in range(count)]


@pytest.fixture(scope="module")
def reference():
    """One process, in-process: 3 epochs (12 steps) with inception_crop|flip_lr."""
    with StreamLoader(Records(), CFG, B, seed=3, augment=AUG, epochs=3, workers=0) as loader:
        return list(loader)


def test_reference_is_augmented_and_shaped(reference):
    assert len(reference) == 3 * STEPS
    x, y = reference[0]
    assert x.shape == (B, 16, 16, 3) and y.dtype == np.int32 and y.shape == (B,)
    plain = take(StreamLoader(Records(), CFG, B, seed=3), 1)[0]
    assert np.array_equal(plain[1], y) and not np.array_equal(plain[0], x)  # same examples, augmented


@pytest.mark.parametrize("workers", [0, 2])
def test_two_processes_concatenate_to_one(reference, workers):
    """Across 3 epochs (epoch boundaries included), bit for bit, in-process and with 2 grain workers each."""
    parts = loaders(2, workers)
    try:
        got = union([take(p, 3 * STEPS) for p in parts])
    finally:
        for p in parts:
            p.close()
    assert_same(got, reference)
    assert parts[0].state() == parts[1].state() == {"epoch": 3, "step_in_epoch": 0, "seed": 3, "batch_size": B, "num_examples": N}


def test_resume_mid_epoch_onto_any_process_count_and_workers(reference):
    with StreamLoader(Records(), CFG, B, seed=3, augment=AUG, workers=2) as first:
        assert_same(take(first, 5), reference[:5])
        state = first.state()
        record = first.process_state()
        assert_same(take(first, 2), reference[5:7])  # the state is the consumer's position, not grain's read-ahead
    assert state == {"epoch": 1, "step_in_epoch": 1, "seed": 3, "batch_size": B, "num_examples": N}
    assert record["grain"] is not None and record["position"] == state and record["workers"] == 2
    with StreamLoader(Records(), CFG, B, seed=999, augment=AUG) as same:  # the saved seed wins
        same.restore(state)
        assert_same(take(same, 7), reference[5:])
    parts = loaders(2, 0)
    for p in parts:
        p.restore(state)
    assert_same(union([take(p, 7) for p in parts]), reference[5:])
    moved = parts[0].state()
    for p in parts:
        p.close()
    with pytest.raises(DataError, match="batch_size=8, this loader 16"):
        StreamLoader(Records(), CFG, 16).restore(moved)


def test_mixup_and_cutmix_do_not_depend_on_the_process_count():
    kw = {"mixup": 0.4, "cutmix": 1.0, "epochs": 2}
    with StreamLoader(Records(), CFG, B, seed=3, augment=AUG, **kw) as one:
        want = list(one)
    parts = loaders(2, 0, **kw)
    assert_same(union([list(p) for p in parts]), want)
    targets = np.concatenate([y for _, y in want])
    assert targets.shape == (2 * STEPS * B, 5) and targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    assert (targets.max(-1) < 1).any()  # some rows are mixed


def test_mix_pairs_rows_and_weights_cutmix_by_area():
    x = np.stack([np.full((4, 4, 1), v, np.float32) for v in (0.0, 1.0, 2.0, 3.0)])
    out, y = mix(x, np.array([0, 1, 2, 3]), 4, np.random.default_rng(0), mixup=0.0, cutmix=1.0)
    own = (out[0] == 0).mean()  # row 0 took a box of row 1
    assert set(np.unique(out[0])) <= {0.0, 1.0} and y[0, 0] == pytest.approx(own) and y[0, 1] == pytest.approx(1 - own)
    out, y = mix(x, np.array([0, 1, 2, 3]), 4, np.random.default_rng(0), mixup=1.0, cutmix=0.0)
    lam = y[2, 2]
    np.testing.assert_allclose(out[2], lam * 2 + (1 - lam) * 3, rtol=1e-6)
    np.testing.assert_allclose(y[3], [0, 0, 1 - lam, lam], rtol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_example_is_named(workers):
    """An undecodable example raises DataError naming it at the batch that holds it (from a worker too)."""
    bad = int(np.random.default_rng((3, 0)).permutation(N)[2 * B + 1])  # read by step 2 of epoch 0
    with StreamLoader(Records(bad={bad}), CFG, B, seed=3, augment=AUG, workers=workers) as loader:
        it = iter(loader)
        next(it), next(it)
        with pytest.raises(DataError, match=rf"standin/{bad:03d}\.png") as e:
            next(it)
    assert "--skip-bad" in e.value.hint


def test_skip_bad_replaces_by_the_next_readable_example_and_counts():
    bad = {3, 4}  # example 3 becomes 5 (2 skipped), example 4 becomes 5 (1 skipped)
    with StreamLoader(Records(bad=bad), CFG, 4, seed=3, shuffle=False, skip_bad=True, epochs=1) as loader:
        got = list(loader)
        assert loader.skipped == 3
    with StreamLoader(Records(), CFG, 4, seed=3, shuffle=False, epochs=1) as clean:
        want = list(clean)
    x, y = np.concatenate([b[0] for b in got]), np.concatenate([b[1] for b in got])
    wx = np.concatenate([b[0] for b in want])
    assert np.array_equal(x[3], wx[5]) and np.array_equal(x[4], wx[5]) and y[3] == y[4] == 5 % 5  # example 5, with its label
    assert np.array_equal(np.delete(x, [3, 4], 0), np.delete(wx, [3, 4], 0))
    valid = np.concatenate([v for *_, v in eval_batches(Records(bad=bad), CFG, B, skip_bad=True)])
    assert valid.sum() == N - 2 and not valid[3] and not valid[4]  # held out: left out of the count, not replaced


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_batches_cover_every_example_once(workers):
    records = Records(n=37)
    records.labels = list(range(37))
    records.num_classes = 37
    cfg = tiny(num_classes=37)
    seen, images = [], {}
    for p in range(2):
        for x, y, valid in eval_batches(records, cfg, B, process_index=p, process_count=2, workers=workers if p else 0):
            assert x.shape == (B // 2, 16, 16, 3) and valid.dtype == bool
            seen += list(y[valid])
            images.update(zip(y[valid].tolist(), x[valid]))
    assert sorted(seen) == list(range(37))  # 5 global batches, the last with 3 valid rows
    with StreamLoader(records, cfg, 37, shuffle=False, epochs=1) as whole:
        ((x, y),) = list(whole)
    assert all(np.array_equal(images[i], x[i]) for i in range(37))  # "" is resize only, as training without --augment


def test_plain_arrays_are_prepared_as_a_batch_with_the_numbers_of_one_at_a_time():
    """Without ops, same-size arrays are prepared together: bit for bit what augment.transform gives each."""
    from vitctl.data.augment import transform

    records = Records()
    records.images = [im[:12, :20] for im in records.images]  # one size: the batched path
    with StreamLoader(records, CFG, B, seed=3, epochs=1) as loader:
        (x, y), *_ = list(loader)
    order = np.random.default_rng((3, 0)).permutation(N)[:B]
    want = np.stack([transform(records.images[i], CFG, None, None, channels=3) for i in order])
    assert np.array_equal(x, want) and np.array_equal(y, [records.labels[i] for i in order])
