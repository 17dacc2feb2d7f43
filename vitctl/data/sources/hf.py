"""Hugging Face data: a `save_to_disk` directory, or parquet files in the Hub layout (the
split name in the file or folder name). Both become Arrow tables read the same way.
"""

from __future__ import annotations

import collections
import functools
import json
from pathlib import Path

import numpy as np

from vitctl.data.sources.common import SPLITS, TEST_NAMES, Part, Source, to_uint8
from vitctl.data.sources.images import decode
from vitctl.errors import DataError, MissingDependencyError

IMAGE_COLUMNS = ("image", "img", "images", "pixel_values", "pixels")
LABEL_COLUMNS = ("label", "labels", "fine_label", "target", "y")


def read_hf_disk(path: Path) -> Source:
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


def read_parquet(files: list[Path], root: Path) -> Source:
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


def _from_arrow(tables: dict, name: str) -> Source:
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
        parts[s] = Part(labels.astype(np.int32), functools.partial(_arrow_images, table.column(img), name=f"{name} ({s})"))
    return Source(parts, num_classes, class_names)


def _arrow_images(column, idx: np.ndarray, name: str) -> list[np.ndarray]:
    """Rows `idx` of an image column: HF Image structs {bytes, path}, raw encoded bytes, or nested pixel lists."""
    import io

    rows = column.take(idx).to_pylist()
    out = []
    for i, row in zip(idx, rows):
        try:
            if isinstance(row, dict):
                src = io.BytesIO(row["bytes"]) if row.get("bytes") is not None else row.get("path")
                out.append(decode(src, 3))
            elif isinstance(row, bytes):
                out.append(decode(io.BytesIO(row), 3))
            else:
                out.append(to_uint8(np.asarray(row)[None], name)[0])
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 -- PIL, numpy
            raise DataError(
                f"{name}: cannot decode image in row {i}: {e}", hint="the image data is corrupt; re-create the data set"
            ) from None
    return out
