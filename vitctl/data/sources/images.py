"""ImageFolder directories (ROOT/<class>/<image>, optionally under ROOT/train and ROOT/test),
and the one image decoder (PIL) that every source with encoded images uses.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from vitctl.data.preprocess import IMAGE_SUFFIXES
from vitctl.data.sources.common import TEST_NAMES, Part, Source
from vitctl.errors import DataError

MAX_IMAGE_PIXELS = 64 * 2**20  # 8192 x 8192; training images are resized to a few hundred pixels anyway


def read_image_folder(root: Path, channels: int) -> Source:
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
        parts[s] = Part(labels, lambda idx, paths=paths: [decode_file(paths[i], channels) for i in idx])
    return Source(parts, len(classes), tuple(classes))


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(d: Path) -> list[Path]:
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
