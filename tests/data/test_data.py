"""vitctl.data: every source format, splits, prepare() numerics, Loader slicing/resume, and bad input."""

import gzip
import json
import struct
import threading

import numpy as np
import pytest

from tests.conftest import tiny
from vitctl.config import Preprocess
from vitctl.data.dataset import Dataset, split_indices
from vitctl.data.loader import Loader
from vitctl.data.preprocess import prepare, resize
from vitctl.data.sources import FASHION_MNIST_DIR, load_dataset, read_idx
from vitctl.errors import ConfigError, DataError, VitctlError

PIL = pytest.importorskip("PIL")
from PIL import Image


@pytest.fixture(scope="module")
def digits_train():
    return load_dataset("digits", "train")


def small_dataset(n=40, num_classes=4, size=8, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8), np.arange(n) % num_classes, num_classes, "synthetic")


def write_png(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def write_idx(path, array, gz=False):
    """The real IDX format: 0x0000, dtype code 0x08 (ubyte), ndim, big-endian uint32 dims, then the bytes."""
    array = np.ascontiguousarray(array, np.uint8)
    raw = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


# --------------------------------------------------------------------------- sources


def test_digits_loads_and_splits(digits_train):
    test = load_dataset("digits", "test")
    assert len(digits_train) + len(test) == 1797
    assert digits_train.num_classes == test.num_classes == 10
    assert (digits_train.name, digits_train.split, test.split) == ("digits", "train", "test")
    assert digits_train.images.shape[1:] == (8, 8, 3) and digits_train.images.dtype == np.uint8
    assert digits_train.images.max() == 255 and digits_train.labels.dtype == np.int32
    gray = load_dataset("digits", "test", channels=1)
    assert gray.images.shape[1:] == (8, 8, 1)
    np.testing.assert_array_equal(np.repeat(gray.images, 3, -1), test.images)  # grayscale repeated to RGB


def test_split_disjoint_deterministic_stratified():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train, test = split_indices(labels, 0.2, seed=0)
    assert not set(train) & set(test) and len(train) + len(test) == len(labels)
    np.testing.assert_array_equal(test, split_indices(labels, 0.2, seed=0)[1])
    assert not np.array_equal(test, split_indices(labels, 0.2, seed=1)[1])
    for c in range(10):  # each class held out in proportion
        n_c = (labels == c).sum()
        assert (labels[test] == c).sum() == round(0.2 * n_c)
    # The same split through load_dataset: the train and test images are exactly those rows.
    d = load_digits()
    tr, te = load_dataset("digits", "train", channels=1, seed=3), load_dataset("digits", "test", channels=1, seed=3)
    tr_idx, te_idx = split_indices(d.target, 0.2, seed=3)
    np.testing.assert_array_equal(tr.labels, d.target[tr_idx])
    np.testing.assert_array_equal(te.labels, d.target[te_idx])
    np.testing.assert_array_equal(te.images[..., 0], np.round(d.images[te_idx] * 255 / 16).astype(np.uint8))


def test_image_folder_mixed_sizes(tmp_path):
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    sizes = [(12, 10), (20, 16), (12, 10), (7, 9)]
    for cls, color in colors.items():
        for i, size in enumerate(sizes):
            write_png(tmp_path / cls / f"{i}.png", size, color)
    (tmp_path / "notes.txt").write_text("not an image")
    train = load_dataset(str(tmp_path), "train", test_fraction=0.25)
    test = load_dataset(str(tmp_path), "test", test_fraction=0.25)
    assert (len(train), len(test)) == (6, 2)
    assert train.num_classes == 2 and train.class_names == ("cat", "dog")
    assert train.images.shape[1:] == (10, 12, 3)  # mixed sizes -> the most common (H, W) = (10, 12)
    red = train.images[train.labels == 0]
    assert (red[..., 0] == 255).all() and (red[..., 2] == 0).all()  # a solid colour survives resizing
    sized = load_dataset(str(tmp_path), "train", image_size=16, channels=1)
    assert sized.images.shape[1:] == (16, 16, 1)


def test_image_folder_train_test_dirs(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b", "c"):
            for i in range(n):
                write_png(tmp_path / split / cls / f"{i}.png", (6, 6), (i * 10, 0, 0))
    train, test = load_dataset(str(tmp_path), "train"), load_dataset(str(tmp_path), "test")
    assert (len(train), len(test)) == (9, 6)
    np.testing.assert_array_equal(test.labels, [0, 0, 1, 1, 2, 2])


def test_npz_both_layouts(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 5, 5), dtype=np.uint8)
    y = np.arange(30) % 3
    np.savez(tmp_path / "one.npz", images=x, labels=y)
    train, test = load_dataset(str(tmp_path / "one.npz")), load_dataset(str(tmp_path / "one.npz"), "test")
    assert len(train) + len(test) == 30 and train.num_classes == 3 and train.images.shape[1:] == (5, 5, 3)
    np.savez(tmp_path / "two.npz", x_train=x[:20] / 255.0, y_train=y[:20], x_test=x[20:], y_test=y[20:])
    train, test = load_dataset(str(tmp_path / "two.npz"), channels=1), load_dataset(str(tmp_path / "two.npz"), "test", channels=1)
    np.testing.assert_array_equal(train.images[..., 0], x[:20])  # floats in [0, 1] scaled back to uint8
    np.testing.assert_array_equal(test.images[..., 0], x[20:])
    np.testing.assert_array_equal(test.labels, y[20:])


def test_npz_train_only_gets_the_seeded_split(tmp_path):
    """x_train/y_train without x_test: a seeded stratified split of it, as for sources without a test split."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 5, 5), dtype=np.uint8), np.arange(40) % 4
    np.savez(tmp_path / "train.npz", x_train=x, y_train=y)
    train, test = (load_dataset(str(tmp_path / "train.npz"), s, test_fraction=0.25, seed=3) for s in ("train", "test"))
    want_train, want_test = split_indices(y.astype(np.int32), 0.25, 3)
    np.testing.assert_array_equal(train.images[..., 0], x[want_train])
    np.testing.assert_array_equal(test.labels, y[want_test])
    assert len(test) == 8 and np.bincount(test.labels).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir_and_pair(tmp_path, gz):
    rng = np.random.default_rng(1)
    x_tr, y_tr = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12) % 10
    x_te, y_te = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5)
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", x_tr, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", y_tr, gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", x_te, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", y_te, gz)
    assert (tmp_path / f"train-images-idx3-ubyte{sfx}").read_bytes()[:4] == b"\x00\x00\x08\x03" or gz
    np.testing.assert_array_equal(read_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}"), y_tr)
    train, test = load_dataset(str(tmp_path), channels=1), load_dataset(str(tmp_path), "test", channels=1)
    np.testing.assert_array_equal(train.images[..., 0], x_tr)
    np.testing.assert_array_equal(test.labels, y_te)
    assert train.num_classes == 10
    pair = load_dataset(str(tmp_path / f"train-images-idx3-ubyte{sfx}"), "test")  # labels file found by name
    assert len(pair) == 2 and pair.images.shape[1:] == (28, 28, 3)  # classes 0 and 1 have 2 examples: one held out each
    explicit = load_dataset(f"{tmp_path}/train-images-idx3-ubyte{sfx},{tmp_path}/train-labels-idx1-ubyte{sfx}")
    assert len(explicit) + len(load_dataset(f"{tmp_path}/train-images-idx3-ubyte{sfx}", "test")) == 12


def test_idx_magic_numbers(tmp_path):
    write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((2, 3, 4)))
    write_idx(tmp_path / "a-labels-idx1-ubyte", np.zeros(2))
    assert (tmp_path / "a-images-idx3-ubyte").read_bytes()[:8] == bytes.fromhex("00000803 00000002")
    assert (tmp_path / "a-labels-idx1-ubyte").read_bytes()[:4] == bytes.fromhex("00000801")


def write_fashion_mnist(root, n_train=30, n_test=20):
    """A small Fashion-MNIST in the layout Debian's dataset-fashion-mnist installs: gzipped 28x28 IDX files."""
    rng = np.random.default_rng(7)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz=True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, gz=True)
    return root


def test_fashion_mnist(monkeypatch, tmp_path):
    """`fashion-mnist` reads the installed IDX files, its own test split, with the ten class names. The files are
    built here (the package is not on every machine), in its layout; an installed copy is checked as well."""
    from vitctl.data.sources import builtin as data

    if FASHION_MNIST_DIR.is_dir():
        real = load_dataset("fashion-mnist", "test", channels=1)
        assert real.images.shape == (10000, 28, 28, 1) and real.num_classes == 10
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", write_fashion_mnist(tmp_path))
    train, test = load_dataset("fashion-mnist", "train", channels=1), load_dataset("fashion-mnist", "test", channels=1)
    assert train.images.shape == (30, 28, 28, 1) and test.images.shape == (20, 28, 28, 1)
    assert test.num_classes == 10 and test.class_names[9] == "Ankle boot" and test.split == "test"
    np.testing.assert_array_equal(test.labels, np.arange(20) % 10)


def hf_dataset(n=12, sizes=((6, 6), (8, 5))):
    datasets = pytest.importorskip("datasets", reason="Hugging Face formats need `datasets` (pip install 'vitctl[data]')")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    images = [Image.new("RGB", sizes[i % len(sizes)], (20 * i, 0, 0)) for i in range(n)]
    return datasets, datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)


def test_hf_save_to_disk(tmp_path):
    datasets, ds = hf_dataset()
    ds.save_to_disk(str(tmp_path / "flat"))
    train, test = load_dataset(str(tmp_path / "flat"), image_size=6), load_dataset(str(tmp_path / "flat"), "test", image_size=6)
    assert len(train) + len(test) == 12 and train.class_names == ("x", "y", "z") and train.num_classes == 3
    assert train.images.shape[1:] == (6, 6, 3)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    test = load_dataset(str(tmp_path / "dict"), "test", channels=1)
    np.testing.assert_array_equal(test.labels, [0, 1, 2, 0])
    assert test.images[1, 0, 0, 0] == round(20 * 0.299)  # red 20 -> luminance


def test_hf_parquet_file_and_dir(tmp_path):
    _, ds = hf_dataset()
    ds.to_parquet(str(tmp_path / "all.parquet"))
    one = load_dataset(str(tmp_path / "all.parquet"), "test", test_fraction=0.25)
    assert len(one) == 3 and one.class_names == ("x", "y", "z")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.select(range(9)).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(9, 12)).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    train, test = load_dataset(str(tmp_path / "hub")), load_dataset(str(tmp_path / "hub"), "test")
    assert (len(train), len(test)) == (9, 3)
    np.testing.assert_array_equal(test.labels, [0, 1, 2])


# --------------------------------------------------------------------------- prepare


def test_prepare_value_range_and_mean_std():
    images = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, -1)
    cfg = tiny(image_size=4, patch_size=4, preprocess=Preprocess(resize="nearest"))
    x = prepare(images, cfg)
    assert x.shape == (1, 4, 4, 3) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(np.unique(x), [-1.0, 51 / 255 * 2 - 1, 1.0], rtol=1e-6)
    stats = Preprocess(value_range=None, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    x = prepare(np.full((2, 4, 4, 3), 51, np.uint8), tiny(image_size=4, patch_size=4, preprocess=stats))
    np.testing.assert_allclose(x[0, 0, 0], (0.2 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5]), rtol=1e-5)


def test_prepare_bilinear_downsample_is_block_mean():
    # Halving with half-pixel centres and no antialias samples at 2i + 0.5: the mean of pixels 2i and 2i+1.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    cfg = tiny(image_size=4, patch_size=4, preprocess=Preprocess(resize="bilinear", antialias=False, value_range=(0.0, 255.0)))
    expected = images.astype(np.float64).reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(prepare(images, cfg), expected, atol=1e-4)
    # Already at size: no resize at all, and grayscale repeated to the model's channels.
    gray = images[..., :1][:, :4, :4]
    np.testing.assert_array_equal(prepare(gray, cfg), np.repeat(gray, 3, -1).astype(np.float32))


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matches_jax_image_resize(method, antialias, shape=(7, 40)):  # 7 -> 16 upsamples, 40 -> 16 downsamples
    jax = pytest.importorskip("jax")
    x = np.random.default_rng(0).uniform(0, 255, (2, *shape, 3)).astype(np.float32)
    jmethod = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}[method]
    want = np.asarray(jax.image.resize(x, (2, 16, 16, 3), method=jmethod, antialias=antialias))
    np.testing.assert_allclose(resize(x, (16, 16), method, antialias), want, atol=2e-3)


# --------------------------------------------------------------------------- Loader


def test_loader_shapes_order_and_epochs(digits_train):
    cfg = tiny()
    with Loader(digits_train, cfg, 128, seed=5, epochs=2) as loader:
        batches = list(loader)
    assert len(batches) == 2 * loader.steps_per_epoch == 2 * (len(digits_train) // 128)
    x, y = batches[0]
    assert x.shape == (128, 16, 16, 3) and x.dtype == np.float32 and y.dtype == np.int32
    order = np.random.default_rng((5, 1)).permutation(len(digits_train))  # epoch 1's order
    np.testing.assert_array_equal(batches[loader.steps_per_epoch][1], digits_train.labels[order[:128]])
    np.testing.assert_array_equal(batches[loader.steps_per_epoch][0], prepare(digits_train.images[order[:128]], cfg))
    # One pass without shuffling or dropping: every example once, in order; iterating again starts over.
    ds = small_dataset(10)
    with Loader(ds, tiny(), 4, shuffle=False, drop_remainder=False, epochs=1, prefetch=0) as once:
        labels = [y for _, y in once]
        assert [len(y) for y in labels] == [4, 4, 2]
        np.testing.assert_array_equal(np.concatenate(labels), ds.labels)
        assert len(list(once)) == 3


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_process_slices_concatenate_to_global_batch(drop_remainder):
    ds, cfg = small_dataset(25), tiny()  # drop_remainder=False: a last batch of 1 row, so 3 processes get an empty slice

    def batches(**kw):
        with Loader(ds, cfg, 8, seed=2, drop_remainder=drop_remainder, epochs=1, **kw) as loader:
            return list(loader)

    whole = batches()
    parts = [batches(process_index=i, process_count=4) for i in range(4)]
    assert all(len(p) == len(whole) for p in parts)  # every process takes the same number of steps
    for step, (x, y) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([p[step][0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[step][1] for p in parts]), y)
    if drop_remainder:
        assert all(p[0][0].shape[0] == 2 for p in parts)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_restore_continues_bit_identically(prefetch):
    ds, cfg = small_dataset(37), tiny()
    with Loader(ds, cfg, 8, seed=7, prefetch=prefetch) as loader:
        it = iter(loader)
        reference = [next(it) for _ in range(12)]  # crosses epochs (4 steps each)
    with Loader(ds, cfg, 8, seed=7, prefetch=prefetch) as first:
        it = iter(first)
        for _ in range(6):
            next(it)
        state = json.loads(json.dumps(first.state()))
    assert state["epoch"] == 1 and state["step_in_epoch"] == 2
    with Loader(ds, cfg, 8, seed=999, prefetch=prefetch) as resumed:  # the saved seed wins
        resumed.restore(state)
        it = iter(resumed)
        for want in reference[6:]:
            got = next(it)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        resumed.restore(state)  # restoring mid-iteration rewinds, thread and all
        np.testing.assert_array_equal(next(iter(resumed))[1], reference[6][1])


def test_no_thread_leak():
    before = threading.active_count()
    loader = Loader(small_dataset(40), tiny(), 4, prefetch=2)
    next(iter(loader))
    assert threading.active_count() == before + 1
    loader.close()
    assert threading.active_count() == before
    with Loader(small_dataset(40), tiny(), 4) as loader:
        next(iter(loader))
    assert threading.active_count() == before


# --------------------------------------------------------------------------- errors


def assert_error(exc_type, fn, *match):
    with pytest.raises(exc_type) as info:
        fn()
    assert issubclass(exc_type, VitctlError)
    assert info.value.hint, f"{exc_type.__name__} without a hint: {info.value}"
    for m in match:
        assert m in str(info.value) + info.value.hint
    return info.value


def test_bad_sources(tmp_path):
    assert_error(DataError, lambda: load_dataset(str(tmp_path / "nope")), "no such data source", "ImageFolder")
    (tmp_path / "empty").mkdir()
    assert_error(DataError, lambda: load_dataset(str(tmp_path / "empty")), "no images", "ROOT/<class>")
    (tmp_path / "emptycls" / "a").mkdir(parents=True)
    assert_error(DataError, lambda: load_dataset(str(tmp_path / "emptycls")), "no images")
    write_png(tmp_path / "bad" / "a" / "ok.png", (4, 4), (0, 0, 0))
    (tmp_path / "bad" / "b").mkdir()
    (tmp_path / "bad" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # a class of one: always in train
    assert_error(DataError, lambda: load_dataset(str(tmp_path / "bad"), "train"), "broken.png", "remove or replace")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 this is no zip")
    assert_error(DataError, lambda: load_dataset(str(tmp_path / "bad.npz")), "cannot read", "corrupt")
    np.savez(tmp_path / "keys.npz", foo=np.zeros(3))
    assert_error(DataError, lambda: load_dataset(str(tmp_path / "keys.npz")), "foo", "np.savez")
    write_idx(tmp_path / "t-images-idx3-ubyte", np.zeros((4, 3, 3)))
    (tmp_path / "t-labels-idx1-ubyte").write_bytes(bytes.fromhex("00000801 00000009") + b"\0\0")  # says 9 labels, has 2
    assert_error(DataError, lambda: load_dataset(str(tmp_path / "t-images-idx3-ubyte")), "truncated")
    assert_error(DataError, lambda: load_dataset("fashion-mnist-nope"), "no such data source")
    assert_error(ConfigError, lambda: load_dataset("digits", "validation"), "split")


def test_bad_labels_and_batches(digits_train):
    assert_error(DataError, lambda: Dataset(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 12]), 10, "x"), "num_classes=10")
    assert_error(DataError, lambda: Loader(digits_train, tiny(num_classes=5), 8), "num_classes=5", "num_classes >= 10")
    assert_error(ConfigError, lambda: Loader(digits_train, tiny(), 10, process_count=4), "not divisible", "multiple of 4")
    assert_error(DataError, lambda: Loader(small_dataset(5), tiny(), 8), "fewer than one batch")
    loader = Loader(small_dataset(40), tiny(), 8)
    assert_error(DataError, lambda: loader.restore({"epoch": 0, "step_in_epoch": 0, "seed": 0, "batch_size": 16}), "batch_size")
    # A probe-style config with no classifier (num_classes=0) takes any labels.
    Loader(digits_train, tiny(num_classes=0), 8, prefetch=0)


def test_fashion_mnist_missing_says_how_to_install(monkeypatch, tmp_path):
    from vitctl.data.sources import builtin as data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    assert_error(DataError, lambda: load_dataset("fashion-mnist"), "not installed", "apt-get install dataset-fashion-mnist")
