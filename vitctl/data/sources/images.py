"""ImageFolder directories (ROOT/<class>/<image>, optionally under ROOT/train and ROOT/test),
and the one image decoder (PIL) that every source with encoded images uses.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from vitctl.data.preprocess import IMAGE_SUFFIXES
from vitctl.data.sources.common import TEST_NAMES, Part, Source
from vitctl.errors import DataError

MAX_IMAGE_PIXELS = 64 * 2**20  # 8192 x 8192; training images are resized to a few hundred pixels anyway


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """An ImageFolder's files, listed and checked, not read: what every reader of one shares."""

    roots: dict[str, Path]  # split ("all", or "train" and "test") -> its directory
    files: dict[str, dict[str, list[Path]]]  # split -> class folder name -> image files (empty folders too)
    classes: tuple[str, ...]  # the class names (folders with images in any split), sorted
    paths: dict[str, list[Path]]  # split -> its files in class order
    labels: dict[str, np.ndarray]  # split -> int32 labels of `paths`


def folder_files(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, list[Path]]]]:
    """(split -> directory, split -> class folder -> image files): ROOT/<class>/**, or ROOT/train and ROOT/test (or val)."""
    roots = {"all": root}
    if (root / "train").is_dir():
        roots = {"train": root / "train"}
        test = next((root / n for n in TEST_NAMES if (root / n).is_dir()), None)
        if test is not None:
            roots["test"] = test
    return roots, {s: {c.name: image_files(c) for c in _subdirs(r)} for s, r in roots.items()}


def list_image_folder(root: Path, listed: tuple | None = None) -> FolderListing:
    """The checked listing of ROOT (`listed`: folder_files(root) when the caller has it already)."""
    roots, files = listed or folder_files(root)
    classes = sorted({c for per_class in files.values() for c, fs in per_class.items() if fs})
    if not classes:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        raise DataError(
            f"no images in class subdirectories of {root}" + (f" ({len(loose)} loose image files)" if loose else ""),
            hint="an ImageFolder holds ROOT/<class>/<image> (png, jpg, ...), optionally under ROOT/train and ROOT/test",
        )
    paths, labels = {}, {}
    for s, per_class in files.items():
        paths[s] = [f for c in classes for f in per_class.get(c, [])]
        labels[s] = np.array([i for i, c in enumerate(classes) for _ in per_class.get(c, [])], np.int32)
        if not paths[s]:
            raise DataError(f"no images under {roots[s]}", hint=f"put class subdirectories with images under {roots[s]}")
    return FolderListing(roots, files, tuple(classes), paths, labels)


def folder_source(listing: FolderListing, channels: int) -> Source:
    """The listing as a Source whose images are decoded when asked for."""
    parts = {s: Part(listing.labels[s], lambda idx, paths=paths: [decode_file(paths[i], channels) for i in idx])
             for s, paths in listing.paths.items()}  # fmt: skip
    return Source(parts, len(listing.classes), listing.classes)


def read_image_folder(root: Path, channels: int) -> Source:
    """ROOT/<class>/**/<image>, or ROOT/train/<class>/... and ROOT/test (or val)/<class>/..."""
    return folder_source(list_image_folder(root), channels)


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(d: Path) -> list[Path]:
    return sorted(
        p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not any(q.startswith(".") for q in p.relative_to(d).parts)
    )


def decode_file(path: Path, channels: int) -> np.ndarray:
    try:
        return decode(path, channels)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for bad files
        raise DataError(f"cannot decode image {path}: {e}", hint="remove or replace the file") from None


def decode(fp, channels: int) -> np.ndarray:
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
