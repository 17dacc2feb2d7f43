"""Real images for `vitctl train`, `probe` and `demo`: every data source, read with numpy and PIL only.

`load_dataset(spec, split)`: one split of a source, in memory as uint8 NHWC + int32 labels.
Sources: "digits" (scikit-learn's bundled 8x8 digits, the zero-download default),
"fashion-mnist" (Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist),
or a path: an ImageFolder directory (ROOT/<class>/<image>, optionally under ROOT/train and
ROOT/test), a .npz file, MNIST-style IDX files (a directory, or an images file whose labels
file is found by name, or "IMAGES,LABELS"), a Hugging Face `save_to_disk` directory, or
parquet files (a file or a directory, HF Hub layout: split name in the file or folder name).
Sources without a test split are split by vitctl.data.dataset.split_indices.

A module per format, each returning a common.Source (per-split labels, images decoded on
demand); this module picks one by the spec and assembles the asked-for split:
    builtin.py  "digits" and "fashion-mnist"
    images.py   ImageFolder directories, and the PIL decoder the other formats share
    npz.py      .npz files
    idx.py      MNIST-style IDX files
    hf.py       Hugging Face save_to_disk directories and parquet files
    common.py   Source and Part, and the conversions to uint8, to channels and to one size

Shape letters: N examples, H/W height/width, C channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitctl.data.dataset import Dataset, split_indices
from vitctl.data.sources.builtin import FASHION_MNIST_DIR, read_digits, read_fashion_mnist
from vitctl.data.sources.common import SPLITS, Source, as_list, stack, to_channels
from vitctl.data.sources.hf import read_hf_disk, read_parquet
from vitctl.data.sources.idx import is_idx_name, labels_name, read_idx, read_idx_dir, read_idx_pair
from vitctl.data.sources.images import read_image_folder
from vitctl.data.sources.npz import read_npz
from vitctl.errors import ConfigError, DataError

__all__ = ["FASHION_MNIST_DIR", "check_split_args", "load_dataset", "read_idx"]

MAX_INFERRED_CLASSES = 2**16  # ImageNet-21k has 21,843; a larger label is an id, not a class index
SPEC_HINT = (
    "a data spec is 'digits', 'fashion-mnist', or a path to an ImageFolder directory, a .npz file, "
    "IDX files, a Hugging Face save_to_disk directory or parquet files"
)


def check_split_args(split: str, channels: int, test_fraction: float) -> None:
    """The checks of load_dataset's arguments, shared by every reader of a split (lazy, pack)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'", hint="split must be 'train' or 'test'")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    if not 0 < test_fraction < 1:
        raise ConfigError(
            f"test_fraction must be in (0, 1), got {test_fraction}", hint="e.g. --test-fraction 0.2 holds out 20% of each class"
        )


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
    check_split_args(split, channels, test_fraction)
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
    images = stack([to_channels(im, channels) for im in as_list(part.images(idx))], image_size, spec)
    labels = part.labels[idx]
    num_classes = source.num_classes or int(max(p.labels.max(initial=-1) for p in source.parts.values())) + 1
    if not source.num_classes and num_classes > MAX_INFERRED_CLASSES:  # the classifier head would be sized by one stray label
        raise DataError(
            f"{spec}: the largest label is {num_classes - 1}, so the model would need {num_classes} classes",
            hint=f"labels must be class indices 0..K-1 (at most {MAX_INFERRED_CLASSES} classes read from the labels); remap them",
        )
    return Dataset(images, labels, num_classes, spec, source.class_names, split)


def _read_source(spec: str, channels: int) -> Source:
    if spec == "digits":
        return read_digits()
    if spec == "fashion-mnist":
        return read_fashion_mnist()
    if "," in spec and not Path(spec).exists():
        images, labels = (Path(p) for p in spec.split(",", 1))
        return read_idx_pair(images, labels)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"no such data source: {spec}", hint=SPEC_HINT)
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".npz"):
            return read_npz(path)
        if name.endswith(".parquet"):
            return read_parquet([path], path.parent)
        if is_idx_name(name, "images"):
            return read_idx_pair(path, path.with_name(labels_name(path.name)))
        raise DataError(f"unknown data file type: {path}", hint=SPEC_HINT)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return read_hf_disk(path)
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        return read_parquet(parquet, path)
    if any(is_idx_name(p.name.lower(), "images") for p in path.iterdir()):
        return read_idx_dir(path)
    return read_image_folder(path, channels)
