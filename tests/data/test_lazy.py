"""vitctl.data.lazy: each source gives load_dataset's examples, labels, classes and split; pickles; opens nothing early."""

import builtins
import io
import pickle
import sys
import types

import numpy as np
import pytest

from tests.conftest import tiny
from vitctl.data.augment import transform
from vitctl.data.lazy import ArrayRecords, ArrowRecords, ImageFolderRecords, open_records
from vitctl.data.preprocess import prepare
from vitctl.data.sources import load_dataset
from vitctl.errors import ConfigError, DataError

PIL = pytest.importorskip("PIL")
from PIL import Image


def write_image(path, x, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(path, fmt)


def random_image(rng, shape=(10, 12, 3)):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def make_folder(root, counts, seed=0, prefix=""):
    """root/<class>/...: PNGs (and one BMP, one nested), plus files an ImageFolder skips."""
    rng = np.random.default_rng(seed)
    for c, n in counts.items():
        for i in range(n):
            name = f"{prefix}{i:03d}.png" if i != 1 else f"sub/{prefix}{i:03d}.bmp"
            write_image(root / c / name, random_image(rng))
    (root / "notes.txt").write_text("not an image")
    write_image(root / "cat" / ".hidden" / "skip.png", random_image(rng))
    return root


def assert_same_as_load_dataset(spec, split, channels=3, **kw):
    """Records vs load_dataset: same labels, classes, images (decoded as load_dataset does), and the same model input."""
    r, ds = open_records(spec, split, channels=channels, **kw), load_dataset(spec, split, channels=channels, **kw)
    assert (len(r), r.num_classes, r.class_names, r.channels, r.name) == (len(ds), ds.num_classes, ds.class_names, channels, ds.name)
    cfg = tiny(image_size=16, channels=channels)
    for i in range(len(r)):
        image, label = r[i]
        assert label == ds.labels[i] and type(label) is int
        if isinstance(image, bytes):
            with Image.open(io.BytesIO(image)) as im:
                decoded = np.asarray(im.convert("L" if channels == 1 else "RGB"))
            np.testing.assert_array_equal(decoded.reshape(ds.images[i].shape), ds.images[i], err_msg=r.describe(i))
        else:
            np.testing.assert_array_equal(image, ds.images[i])
        np.testing.assert_array_equal(transform(image, cfg, None, None, channels=channels), prepare(ds.images[i][None], cfg)[0])
    return r


def round_trip(r):
    blob = pickle.dumps(r)
    back = pickle.loads(blob)
    assert len(back) == len(r) and back.class_names == r.class_names and back.num_classes == r.num_classes
    for i in (0, len(r) - 1, -1):
        a, b = r[i], back[i]
        assert a[1] == b[1] and (a[0] == b[0] if isinstance(a[0], bytes) else np.array_equal(a[0], b[0]))
        assert not hasattr(r, "describe") or r.describe(i) == back.describe(i)  # PackedSource: records.py's own
    return blob


# --------------------------------------------------------------------------- ImageFolder


@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder_without_splits_is_load_datasets_split(tmp_path, channels):
    root = make_folder(tmp_path / "f", {"dog": 7, "cat": 5, "emu": 3})
    for split in ("train", "test"):
        for kw in ({}, {"test_fraction": 0.4, "seed": 3}):
            r = assert_same_as_load_dataset(str(root), split, channels, **kw)
            assert isinstance(r, ImageFolderRecords)
    r = open_records(str(root), "test")
    assert r.class_names == ("cat", "dog", "emu") and r.describe(0).startswith(str(root / "cat"))
    round_trip(r)


def test_image_folder_with_train_and_val(tmp_path):
    root = tmp_path / "tv"
    make_folder(root / "train", {"a": 4, "b": 3, "c": 2}, seed=1)
    make_folder(root / "val", {"a": 2, "b": 2}, seed=2, prefix="v")  # class c only in train: labels still by the union
    for split in ("train", "test"):
        r = assert_same_as_load_dataset(str(root), split)
        assert r.num_classes == 3 and len(r) == (9 if split == "train" else 4)
    assert "val" in open_records(str(root), "test").describe(0)
    round_trip(open_records(str(root), "train"))
    make_folder(tmp_path / "only_train" / "train", {"a": 2})
    with pytest.raises(DataError, match="has no 'test' split") as want:
        load_dataset(str(tmp_path / "only_train"), "test")
    with pytest.raises(DataError) as got:
        open_records(str(tmp_path / "only_train"), "test")
    assert str(got.value) == str(want.value)


def test_image_folder_opens_no_image_file(tmp_path, monkeypatch):
    """10,000 empty files: open_records lists them and reads none; an example reads exactly its file."""
    root = tmp_path / "big"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5000):
            (root / c / f"{i:05d}.jpg").touch()
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    r = open_records(str(root), "train")
    assert opened == [] and len(r) == 8000 and r.num_classes == 2
    image, label = r[4321]
    assert image == b"" and opened == [r.describe(4321)] and label == r.labels[4321]
    monkeypatch.setattr(builtins, "open", real_open)
    assert len(round_trip(r)) < 200_000  # paths as one blob: ~20 bytes an example
    with pytest.raises(DataError, match="cannot decode the image"):
        transform(image, tiny(), None, None, channels=3)


def test_image_folder_errors_are_load_datasets(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "x.png").write_bytes(b"")
    for spec in (str(tmp_path / "empty"),):
        with pytest.raises(DataError) as want:
            load_dataset(spec, "train")
        with pytest.raises(DataError) as got:
            open_records(spec, "train")
        assert str(got.value) == str(want.value) and "1 loose image files" in str(got.value)
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        open_records(str(tmp_path), "val")
    with pytest.raises(ConfigError, match="channels must be 1 or 3"):
        open_records("digits", "train", channels=2)


# --------------------------------------------------------------------------- Hugging Face save_to_disk


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(5)
    root = tmp_path_factory.mktemp("hf")
    images = [Image.fromarray(random_image(rng, (9, 11, 3))) for _ in range(12)]
    labels = [i % 3 for i in range(12)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee", "cow"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(8, 12))}).save_to_disk(str(root / "dict"))
    ds.save_to_disk(str(root / "single"), num_shards=3)  # no test split: split by split_indices; three .arrow files
    pixels = datasets.Dataset.from_dict(
        {"img": [random_image(rng, (6, 6, 1)).tolist() for _ in range(10)], "label": [i % 2 for i in range(10)]}
    )
    pixels.save_to_disk(str(root / "pixels"))  # pixel lists, inferred classes
    return root


@pytest.mark.parametrize("name", ["dict", "single", "pixels"])
def test_hf_save_to_disk_is_load_datasets_split(hf_dirs, name):
    for split in ("train", "test"):
        r = assert_same_as_load_dataset(str(hf_dirs / name), split)
        assert isinstance(r, ArrowRecords)
        blob = round_trip(r)
        assert len(blob) < 2000  # file names and labels, never the images
    assert open_records(str(hf_dirs / "dict"), "test").describe(0).endswith("(validation) row 0")
    if name == "pixels":
        assert_same_as_load_dataset(str(hf_dirs / name), "train", channels=1)


def test_arrow_records_reopen_their_files_after_pickling(hf_dirs, tmp_path):
    r = open_records(str(hf_dirs / "single"), "train")
    back = pickle.loads(pickle.dumps(r))
    assert back._column is None  # nothing open until the first example
    assert back[0] == r[0] and back._column is not None


# --------------------------------------------------------------------------- the in-memory sets


def test_digits_and_npz_are_load_datasets_arrays(tmp_path):
    for split in ("train", "test"):
        r = assert_same_as_load_dataset("digits", split)
        assert isinstance(r, ArrayRecords) and r.describe(3) == f"digits ({split}) example 3"
    assert_same_as_load_dataset("digits", "test", channels=1)
    round_trip(open_records("digits", "test"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=random_image(rng, (20, 5, 5, 3)), labels=np.arange(20) % 4)
    np.savez(
        tmp_path / "s.npz",
        x_train=random_image(rng, (8, 4, 4)),
        y_train=np.arange(8) % 2,
        x_test=random_image(rng, (3, 4, 4)),
        y_test=[0, 1, 1],
    )
    for spec in ("d.npz", "s.npz"):
        for split in ("train", "test"):
            round_trip(assert_same_as_load_dataset(str(tmp_path / spec), split))
    with pytest.raises(DataError, match="no such data source"):
        open_records(str(tmp_path / "missing.npz"), "train")


def test_packed_directory_goes_to_packed_source(tmp_path, monkeypatch):
    calls = []
    packed = types.SimpleNamespace(channels=3)
    fake = types.SimpleNamespace(
        is_packed=lambda p: (p / "PACKED").exists(), PackedSource=lambda root, split: calls.append((root, split)) or packed
    )
    monkeypatch.setitem(sys.modules, "vitctl.data.records", fake)
    import vitctl.data

    monkeypatch.delattr(vitctl.data, "records", raising=False)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "PACKED").touch()
    assert open_records(str(tmp_path / "p"), "test", channels=1) is packed and calls == [(str(tmp_path / "p"), "test")]
    assert packed.channels == 1  # decoded to what the caller asked for


def test_a_packed_folder_gives_the_folders_examples(tmp_path):
    """Through the real packed format: the same labels and classes, and the same model input for every example."""
    pack = pytest.importorskip("vitctl.data.pack")
    pytest.importorskip("array_record")
    make_folder(tmp_path / "f", {"dog": 7, "cat": 5, "emu": 3})
    pack.pack(str(tmp_path / "f"), tmp_path / "p", workers=1)
    cfg = tiny()
    for split in ("train", "test"):
        folder, packed = open_records(str(tmp_path / "f"), split), open_records(str(tmp_path / "p"), split)
        assert type(packed).__name__ == "PackedSource" and len(packed) == len(folder)
        assert (packed.num_classes, packed.class_names, packed.channels) == (folder.num_classes, folder.class_names, 3)
        for i in range(len(folder)):
            (a, la), (b, lb) = folder[i], packed[i]
            assert la == lb
            np.testing.assert_array_equal(transform(a, cfg, None, None, channels=3), transform(b, cfg, None, None, channels=3))
        round_trip(packed)
