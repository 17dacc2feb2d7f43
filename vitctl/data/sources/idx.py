"""MNIST-style IDX files, gzipped or not: a directory of them, or an images file and its
labels file.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from vitctl.data.sources.common import TEST_NAMES, Part, Source, take, to_uint8
from vitctl.errors import DataError
from vitctl.untrusted import require_memory

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def is_idx_name(name: str, kind: str) -> bool:
    return ("idx3" if kind == "images" else "idx1") in name and name.removesuffix(".gz").endswith("ubyte")


def labels_name(images_name: str) -> str:
    return images_name.replace("images", "labels").replace("idx3", "idx1")


def read_idx_dir(d: Path) -> Source:
    """train-images-idx3-ubyte(.gz) + train-labels-idx1-ubyte(.gz), t10k-* (or test-*) for test."""
    pairs = {}
    for p in sorted(d.iterdir()):
        if is_idx_name(p.name.lower(), "images"):
            prefix = p.name.lower().split("images")[0].strip("-_.")
            split = "train" if prefix.startswith("train") else "test" if prefix.startswith(TEST_NAMES) else "all"
            pairs[split] = (p, p.with_name(labels_name(p.name)))
    if "all" in pairs and len(pairs) > 1 or "test" in pairs and "train" not in pairs:
        raise DataError(f"{d}: cannot tell train from test among {sorted(p.name for p, _ in pairs.values())}",
                        hint="name the files train-images-idx3-ubyte / t10k-images-idx3-ubyte and their labels files")  # fmt: skip
    parts = {s: read_idx_pair(x, y).parts["all"] for s, (x, y) in pairs.items()}
    return Source(parts)


def read_idx_pair(images: Path, labels: Path) -> Source:
    for p in (images, labels):
        if not p.is_file():
            raise DataError(f"no IDX file {p}", hint="an IDX images file needs its labels file beside it (…-images-idx3-ubyte -> …-labels-idx1-ubyte)")  # fmt: skip
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"IDX pair {images.name} {x.shape} / {labels.name} {y.shape}: expected [N, H, W] images and [N] labels")
    x = to_uint8(x, str(images))
    return Source({"all": Part(y.astype(np.int32), take(x))})


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
