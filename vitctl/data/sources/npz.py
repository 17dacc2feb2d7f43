""".npz files: images/labels, or x_train/y_train (and x_test/y_test), sized from the .npy
headers before anything is inflated.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from vitctl.data.sources.common import Part, Source, take, to_uint8
from vitctl.errors import DataError
from vitctl.untrusted import require_memory


def read_npz(path: Path) -> Source:
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
        parts[s] = Part(y.astype(np.int32), take(to_uint8(x, str(path))))
    return Source(parts)


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
