"""Real images for `vitctl train`, `probe` and `demo`: every data source, read with numpy and PIL only.

`load_dataset(spec, split)`: one split of a source, in memory as uint8 NHWC + int32 labels.
Sources: "digits" (scikit-learn's bundled 8x8 digits, the zero-download default),
"fashion-mnist" (Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist),
or a path: an ImageFolder directory (ROOT/<class>/<image>, optionally under ROOT/train and
ROOT/test), a .npz file, MNIST-style IDX files (a directory, or an images file whose labels
file is found by name, or "IMAGES,LABELS"), a Hugging Face `save_to_disk` directory, or
parquet files (a file or a directory, HF Hub layout: split name in the file or folder name).
Sources without a test split are split by vitctl.data.dataset.split_indices.

Shape letters: N examples, H/W height/width, C channels.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import json
import math
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vitctl.data.dataset import Dataset, split_indices
from vitctl.data.preprocess import IMAGE_SUFFIXES, resize
from vitctl.errors import ConfigError, DataError, MissingDependencyError
from vitctl.untrusted import require_memory

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Reference: github.com/zalandoresearch/fashion-mnist README, "Labels".
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = ("train", "test")
TEST_NAMES = ("test", "t10k", "val", "validation", "valid")  # names a source's held-out split may have
IMAGE_COLUMNS = ("image", "img", "images", "pixel_values", "pixels")
LABEL_COLUMNS = ("label", "labels", "fine_label", "target", "y")
MAX_INFERRED_CLASSES = 2**16  # ImageNet-21k has 21,843; a larger label is an id, not a class index
MAX_IMAGE_PIXELS = 64 * 2**20  # 8192 x 8192; training images are resized to a few hundred pixels anyway
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPEC_HINT = (
    "a data spec is 'digits', 'fashion-mnist', or a path to an ImageFolder directory, a .npz file, "
    "IDX files, a Hugging Face save_to_disk directory or parquet files"
)


@dataclasses.dataclass
class _Part:
    """One split of a source: labels up front, images decoded only for the rows asked for."""

    labels: np.ndarray
    images: Callable[[np.ndarray], list[np.ndarray] | np.ndarray]  # indices -> [n, H, W(, C)] images


@dataclasses.dataclass
class _Source:
    parts: dict[str, _Part]  # "train" and "test", or "all" for a source without splits
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None


def load_dataset(
    spec: str,
    split: str = "train",
    *,
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
) -> Dataset:
    """One split of a data source, as uint8 images and int32 labels.

    Args:
        spec: "digits", "fashion-mnist", or a path (see the module docstring).
        split: "train" or "test".
        channels: 1 or 3; grayscale is repeated to 3 channels, RGB reduced to luminance for 1.
        test_fraction: for sources without a test split, the share of each class held out
            (seeded by `seed`; train and test never overlap).
        seed: seed of that split.
        image_size: if set, images of any other size are resized to image_size x image_size
            at load (bilinear, antialiased, rounded to uint8), which keeps large photos small in
            memory. If unset, images keep their size; mixed sizes are resized to the most
            common one. `prepare` then resizes to the model's size per its config.

    Returns:
        A Dataset with images of shape [N, H, W, channels].
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'", hint="split must be 'train' or 'test'")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    if not 0 < test_fraction < 1:
        raise ConfigError(
            f"test_fraction must be in (0, 1), got {test_fraction}", hint="e.g. --test-fraction 0.2 holds out 20% of each class"
        )
    spec = str(spec)
    source = _read_source(spec, channels)
    if "all" in source.parts:
        part = source.parts["all"]
        idx = split_indices(part.labels, test_fraction, seed)[SPLITS.index(split)]
    else:
        if split not in source.parts:
            raise DataError(f"{spec} has no '{split}' split (it has: {', '.join(source.parts)})")
        part = source.parts[split]
        idx = np.arange(len(part.labels))
    if not len(idx):
        raise DataError(f"{spec}: the {split} split is empty", hint="add data, or hold out another share (vitctl train --test-fraction)")
    images = _stack([_channels(im, channels) for im in _as_list(part.images(idx))], image_size, spec)
    labels = part.labels[idx]
    num_classes = source.num_classes or int(max(p.labels.max(initial=-1) for p in source.parts.values())) + 1
    if not source.num_classes and num_classes > MAX_INFERRED_CLASSES:  # the classifier head would be sized by one stray label
        raise DataError(
            f"{spec}: the largest label is {num_classes - 1}, so the model would need {num_classes} classes",
            hint=f"labels must be class indices 0..K-1 (at most {MAX_INFERRED_CLASSES} classes read from the labels); remap them",
        )
    return Dataset(images, labels, num_classes, spec, source.class_names, split)


def _read_source(spec: str, channels: int) -> _Source:
    if spec == "digits":
        return _read_digits()
    if spec == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise DataError(
                f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}",
                hint="apt-get install dataset-fashion-mnist, or pass a directory of Fashion-MNIST IDX files",
            )
        return dataclasses.replace(_read_idx_dir(FASHION_MNIST_DIR), num_classes=10, class_names=FASHION_MNIST_CLASSES)
    if "," in spec and not Path(spec).exists():
        images, labels = (Path(p) for p in spec.split(",", 1))
        return _read_idx_pair(images, labels)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"no such data source: {spec}", hint=SPEC_HINT)
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".npz"):
            return _read_npz(path)
        if name.endswith(".parquet"):
            return _read_parquet([path], path.parent)
        if _is_idx_name(name, "images"):
            return _read_idx_pair(path, path.with_name(_labels_name(path.name)))
        raise DataError(f"unknown data file type: {path}", hint=SPEC_HINT)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_hf_disk(path)
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        return _read_parquet(parquet, path)
    if any(_is_idx_name(p.name.lower(), "images") for p in path.iterdir()):
        return _read_idx_dir(path)
    return _read_image_folder(path, channels)


def _read_digits() -> _Source:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingDependencyError("the 'digits' data set needs scikit-learn", hint="pip install 'vitctl[data]'") from e
    d = load_digits()
    # Values are counts 0..16 (4x4 blocks of a 32x32 bitmap); scale to the full uint8 range.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return _Source({"all": _Part(d.target.astype(np.int32), lambda idx: images[idx])}, 10, tuple(map(str, range(10))))


# ImageFolder -------------------------------------------------------------------------


def _read_image_folder(root: Path, channels: int) -> _Source:
    """ROOT/<class>/**/<image>, or ROOT/train/<class>/... and ROOT/test (or val)/<class>/..."""
    roots = {"all": root}
    if (root / "train").is_dir():
        roots = {"train": root / "train"}
        test = next((root / n for n in TEST_NAMES if (root / n).is_dir()), None)
        if test is not None:
            roots["test"] = test
    files = {s: {c.name: _image_files(c) for c in _subdirs(r)} for s, r in roots.items()}
    classes = sorted({c for per_class in files.values() for c, fs in per_class.items() if fs})
    if not classes:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        raise DataError(
            f"no images in class subdirectories of {root}" + (f" ({len(loose)} loose image files)" if loose else ""),
            hint="an ImageFolder holds ROOT/<class>/<image> (png, jpg, ...), optionally under ROOT/train and ROOT/test",
        )
    parts = {}
    for s, per_class in files.items():
        paths = [f for c in classes for f in per_class.get(c, [])]
        labels = np.array([i for i, c in enumerate(classes) for _ in per_class.get(c, [])], np.int32)
        if not paths:
            raise DataError(f"no images under {roots[s]}", hint=f"put class subdirectories with images under {roots[s]}")
        parts[s] = _Part(labels, lambda idx, paths=paths: [_decode_file(paths[i], channels) for i in idx])
    return _Source(parts, len(classes), tuple(classes))


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(d: Path) -> list[Path]:
    return sorted(
        p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not any(q.startswith(".") for q in p.relative_to(d).parts)
    )


def _decode_file(path: Path, channels: int) -> np.ndarray:
    try:
        return _decode(path, channels)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for bad files
        raise DataError(f"cannot decode image {path}: {e}", hint="remove or replace the file") from None


def _decode(fp, channels: int) -> np.ndarray:
    from PIL import Image

    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; a data set of photos never comes near.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(fp) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"{getattr(fp, 'name', fp)}: the image declares {w} x {h} pixels, more than vitctl decodes ({MAX_IMAGE_PIXELS})",
                                hint="the file is damaged or a decompression bomb; remove it, or shrink the image first")  # fmt: skip
            return np.asarray(im.convert("L" if channels == 1 else "RGB"))


# NumPy ------------------------------------------------------------------------------


def _read_npz(path: Path) -> _Source:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                names = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
            elif {"x_train", "y_train"} <= keys:  # no test split: held out by the seeded split, as for other sources
                names = {"all": ("x_train", "y_train")}
            elif {"images", "labels"} <= keys:
                names = {"all": ("images", "labels")}
            else:
                raise DataError(
                    f"{path} has arrays {sorted(keys)}, not images/labels or x_train/y_train(/x_test/y_test)",
                    hint="save with np.savez(path, images=uint8 [N,H,W(,C)], labels=int [N])",
                )
            # Sized from the .npy headers first: a small compressed member can declare (and inflate to) GBs.
            need = sum(_npz_member_bytes(z, k, path) for pair in names.values() for k in pair)
            require_memory(2 * need, f"loading {path}", hint="use a smaller data set, or one saved in parts")
            arrays = {s: (z[x], z[y]) for s, (x, y) in names.items()}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path}: {e}", hint="the .npz file is corrupt or not a NumPy archive; re-create it") from None
    parts = {}
    for s, (x, y) in arrays.items():
        if len(x) != len(y) or y.ndim != 1:
            raise DataError(f"{path}: {s} has {len(x)} images but labels of shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: {s} labels are {y.dtype}, not integers", hint="store class indices 0..K-1")
        parts[s] = _Part(y.astype(np.int32), _take(_to_uint8(x, str(path))))
    return _Source(parts)


def _npz_member_bytes(z, key: str, path: Path) -> int:
    """Bytes that loading member `key` of an open .npz allocates, from its .npy header (nothing inflated)."""
    with z.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    if dtype.hasobject:
        raise DataError(f"{path}: {key} holds Python objects, which vitctl does not load (they would need pickle)",
                        hint="store images as uint8 [N,H,W(,C)] and labels as integers")  # fmt: skip
    return math.prod(shape) * dtype.itemsize


def _to_uint8(x: np.ndarray, name: str) -> np.ndarray:
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


# IDX (MNIST) ----------------------------------------------------------------------------


def _is_idx_name(name: str, kind: str) -> bool:
    return ("idx3" if kind == "images" else "idx1") in name and name.removesuffix(".gz").endswith("ubyte")


def _labels_name(images_name: str) -> str:
    return images_name.replace("images", "labels").replace("idx3", "idx1")


def _read_idx_dir(d: Path) -> _Source:
    """train-images-idx3-ubyte(.gz) + train-labels-idx1-ubyte(.gz), t10k-* (or test-*) for test."""
    pairs = {}
    for p in sorted(d.iterdir()):
        if _is_idx_name(p.name.lower(), "images"):
            prefix = p.name.lower().split("images")[0].strip("-_.")
            split = "train" if prefix.startswith("train") else "test" if prefix.startswith(TEST_NAMES) else "all"
            pairs[split] = (p, p.with_name(_labels_name(p.name)))
    if "all" in pairs and len(pairs) > 1 or "test" in pairs and "train" not in pairs:
        raise DataError(f"{d}: cannot tell train from test among {sorted(p.name for p, _ in pairs.values())}",
                        hint="name the files train-images-idx3-ubyte / t10k-images-idx3-ubyte and their labels files")  # fmt: skip
    parts = {s: _read_idx_pair(x, y).parts["all"] for s, (x, y) in pairs.items()}
    return _Source(parts)


def _read_idx_pair(images: Path, labels: Path) -> _Source:
    for p in (images, labels):
        if not p.is_file():
            raise DataError(f"no IDX file {p}", hint="an IDX images file needs its labels file beside it (…-images-idx3-ubyte -> …-labels-idx1-ubyte)")  # fmt: skip
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"IDX pair {images.name} {x.shape} / {labels.name} {y.shape}: expected [N, H, W] images and [N] labels")
    x = _to_uint8(x, str(images))
    return _Source({"all": _Part(y.astype(np.int32), _take(x))})


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (http://yann.lecun.com/exdb/mnist/), gzipped or not: magic 0x0000 <dtype> <ndim>, big-endian dims, data.

    The header is read first and the size it declares checked against free memory; then
    exactly that many bytes are read (a gzip that inflates past them, or a file that ends
    before them, is refused), so a small file cannot make vitctl allocate GBs."""
    path = Path(path)
    try:
        with open(path, "rb") as raw_f:
            gz = raw_f.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in IDX_DTYPES:
                raise DataError(f"{path} is not an IDX file (magic {head.hex() or 'empty'})", hint="IDX files start with 0x00000803 (images) or 0x00000801 (labels)")  # fmt: skip
            dtype, ndim = np.dtype(IDX_DTYPES[head[2]]), head[3]
            dims = f.read(4 * ndim)
            if len(dims) != 4 * ndim:
                raise DataError(
                    f"{path}: the IDX header is cut short", hint="the file is truncated or corrupt; re-download or re-create it"
                )
            shape = tuple(int(v) for v in np.frombuffer(dims, ">u4", ndim))
            size = math.prod(shape) * dtype.itemsize
            require_memory(2 * size, f"{path} (IDX header: shape {shape}, {dtype})", hint="the header may be corrupt; check the file")
            data = f.read(size)
            extra = f.read(1)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}", hint="the file is corrupt; re-download or re-create it") from None
    if len(data) != size or extra:
        got = f"{len(data)}" if not extra else f"more than {size}"
        raise DataError(f"{path}: IDX header says shape {shape} ({dtype}) but the file has {got} data bytes",
                        hint="the file is truncated or corrupt; re-download or re-create it")  # fmt: skip
    return np.frombuffer(data, dtype).reshape(shape).astype(dtype.newbyteorder("="))


# Hugging Face ---------------------------------------------------------------------------


def _read_hf_disk(path: Path) -> _Source:
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError(f"{path} is a Hugging Face dataset directory; reading it needs `datasets`",
                                     hint="pip install 'vitctl[data]'") from e  # fmt: skip
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 -- datasets raises FileNotFoundError, ArrowInvalid, JSONDecodeError, ...
        raise DataError(f"cannot load the Hugging Face dataset at {path}: {e}", hint="re-create it with Dataset.save_to_disk") from None
    splits = ds if isinstance(ds, datasets.DatasetDict) else {"all": ds}
    tables = {_split_name(s): (d.with_format("arrow")[:], d.features.to_dict()) for s, d in splits.items()}
    return _from_arrow(tables, str(path))


def _read_parquet(files: list[Path], root: Path) -> _Source:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingDependencyError("reading parquet needs pyarrow", hint="pip install 'vitctl[data]'") from e
    groups: dict[str, list[Path]] = collections.defaultdict(list)
    for f in files:
        groups[_split_of_path(f.relative_to(root))].append(f)
    if "all" in groups and len(groups) > 1:
        groups = {"all": files}  # some files carry a split name and others none: treat them as one set
    tables = {}
    for s, fs in groups.items():
        try:
            table = pa.concat_tables([pq.read_table(f) for f in fs], promote_options="default")
        except Exception as e:  # noqa: BLE001 -- ArrowInvalid, OSError, ...
            raise DataError(
                f"cannot read parquet {', '.join(map(str, fs))}: {e}", hint="the parquet file is corrupt; re-create it"
            ) from None
        meta = (table.schema.metadata or {}).get(b"huggingface")
        features = json.loads(meta).get("info", {}).get("features", {}) if meta else {}
        tables[s] = (table, features)
    if "test" in tables and "train" not in tables:
        raise DataError(f"{root}: parquet files for a test split but none for train", hint="name the training files train-*.parquet")
    return _from_arrow(tables, str(root))


def _split_name(name: str) -> str:
    return "train" if name == "train" else "test" if name in TEST_NAMES else name


def _split_of_path(rel: Path) -> str:
    """HF Hub layouts: data/train-00000-of-00001.parquet, plain_text/train/0000.parquet."""
    for part in (*rel.parts[:-1], rel.name.split("-")[0].split(".")[0].split("_")[0]):
        if _split_name(part.lower()) in SPLITS:
            return _split_name(part.lower())
    return "all"


def _from_arrow(tables: dict, name: str) -> _Source:
    if "train" in tables:
        tables = {s: t for s, t in tables.items() if s in SPLITS}
    elif len(tables) > 1:
        raise DataError(f"{name}: splits {sorted(tables)}, none of them 'train'", hint="name the training split 'train'")
    parts, num_classes, class_names = {}, None, None
    for s, (table, features) in tables.items():
        cols = table.column_names
        types = {c: (features.get(c) or {}).get("_type") if isinstance(features.get(c), dict) else None for c in cols}
        img = next((c for c in cols if types[c] == "Image"), None) or next((c for c in IMAGE_COLUMNS if c in cols), None)
        lab = next((c for c in cols if types[c] == "ClassLabel"), None) or next((c for c in LABEL_COLUMNS if c in cols), None)
        if img is None or lab is None:
            raise DataError(f"{name}: cannot find the image and label columns among {cols}",
                            hint=f"name them one of {IMAGE_COLUMNS} and one of {LABEL_COLUMNS}, or use HF Image/ClassLabel features")  # fmt: skip
        if types[lab] == "ClassLabel" and features[lab].get("names"):
            class_names = tuple(features[lab]["names"])
            num_classes = len(class_names)
        labels = np.asarray(table.column(lab).to_numpy(zero_copy_only=False))
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{name}: label column '{lab}' holds {labels.dtype}, not integer class indices",
                            hint="cast it to a ClassLabel feature")  # fmt: skip
        parts[s] = _Part(labels.astype(np.int32), functools.partial(_arrow_images, table.column(img), name=f"{name} ({s})"))
    return _Source(parts, num_classes, class_names)


def _arrow_images(column, idx: np.ndarray, name: str) -> list[np.ndarray]:
    """Rows `idx` of an image column: HF Image structs {bytes, path}, raw encoded bytes, or nested pixel lists."""
    import io

    rows = column.take(idx).to_pylist()
    out = []
    for i, row in zip(idx, rows):
        try:
            if isinstance(row, dict):
                src = io.BytesIO(row["bytes"]) if row.get("bytes") is not None else row.get("path")
                out.append(_decode(src, 3))
            elif isinstance(row, bytes):
                out.append(_decode(io.BytesIO(row), 3))
            else:
                out.append(_to_uint8(np.asarray(row)[None], name)[0])
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 -- PIL, numpy
            raise DataError(
                f"{name}: cannot decode image in row {i}: {e}", hint="the image data is corrupt; re-create the data set"
            ) from None
    return out


def _take(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda idx: x[idx]


# Shared conversion ------------------------------------------------------------------------


def _as_list(images) -> list[np.ndarray]:
    return list(images) if not isinstance(images, np.ndarray) else [im for im in images]


def _channels(im: np.ndarray, channels: int) -> np.ndarray:
    """[H, W] or [H, W, C] uint8 -> [H, W, channels]: gray repeated to RGB, RGB to luminance (ITU-R 601, as PIL's "L")."""
    im = im[..., None] if im.ndim == 2 else im
    if im.shape[-1] == channels:
        return im
    if im.shape[-1] == 1:
        return np.repeat(im, channels, axis=-1)
    if im.shape[-1] == 3 and channels == 1:
        return np.round(im.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].astype(np.uint8)
    raise DataError(f"cannot turn a {im.shape[-1]}-channel image into {channels} channels")


def _stack(images: list[np.ndarray], image_size: int | None, name: str) -> np.ndarray:
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


# --------------------------------------------------------------------------- preprocessing
