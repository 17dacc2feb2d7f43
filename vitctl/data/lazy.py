"""Random-access data sources that do not hold a split in memory: what grain's workers read from.

`open_records(spec, split)` takes the same specs as `load_dataset` and gives the same
examples, labels, class names and split, as a `Records`: `len(r)`, `r[i] -> (image, label)`
with the image as encoded bytes (decoded per example by `augment.transform`) or a uint8
[H, W, C] array. Sources pickle small (paths and labels, never pixels or open files) and
open their files lazily in each process, so grain can ship them to worker processes.

    packed directory      records.PackedSource (ArrayRecord shards)
    ImageFolder           ImageFolderRecords: the sorted file list; a file is read when asked for
    HF save_to_disk       ArrowRecords: the split's .arrow files memory-mapped, a row read when asked for
    anything else         ArrayRecords: load_dataset's in-memory split (digits, Fashion-MNIST, .npz, IDX, parquet)

Files of mixed sizes are resized once, straight to the model's size, by `transform`; load_dataset
first brings them to one common size. For same-size files the examples are identical.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from vitctl.data.dataset import split_indices
from vitctl.data.sources import MAX_INFERRED_CLASSES, check_split_args, load_dataset
from vitctl.data.sources.common import SPLITS, TEST_NAMES, Part, Source, to_channels, to_uint8
from vitctl.data.sources.hf import IMAGE_COLUMNS, read_hf_disk
from vitctl.data.sources.images import list_image_folder
from vitctl.errors import DataError, MissingDependencyError


class Records(Protocol):
    """One split, random access. `image` is encoded bytes or a uint8 [H, W, C] array."""

    name: str
    num_classes: int
    class_names: tuple[str, ...] | None
    channels: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[bytes | np.ndarray, int]: ...

    def describe(self, i: int) -> str: ...


def open_records(spec: str, split: str, *, channels: int = 3, test_fraction: float = 0.2, seed: int = 0) -> Records:
    """One split of a data source, random access, not loaded into memory where the format allows.

    Args: as `load_dataset` (without image_size: `augment.transform` resizes each example).

    Raises:
        ConfigError, DataError: as load_dataset, with the same messages.
    """
    check_split_args(split, channels, test_fraction)
    spec = str(spec)
    path = Path(spec)
    if spec in ("digits", "fashion-mnist") or not path.is_dir():
        return ArrayRecords(spec, split, channels=channels, test_fraction=test_fraction, seed=seed)
    records = _records_module()
    if records is not None and records.is_packed(path):
        source = records.PackedSource(spec, split)
        source.channels = channels  # what to decode to: the caller's, as for every other source here
        return source
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return ArrowRecords(spec, split, channels=channels, test_fraction=test_fraction, seed=seed)
    if next(path.rglob("*.parquet"), None) is not None or any(_is_idx(p) for p in path.iterdir()):
        return ArrayRecords(spec, split, channels=channels, test_fraction=test_fraction, seed=seed)
    return ImageFolderRecords(spec, split, channels=channels, test_fraction=test_fraction, seed=seed)


def _records_module():
    try:
        from vitctl.data import records
    except ModuleNotFoundError as e:  # the packed format's module may be absent; any other missing module is a real error
        if e.name != "vitctl.data.records":
            raise
        return None
    return records


def _is_idx(p: Path) -> bool:
    from vitctl.data.sources.idx import is_idx_name

    return is_idx_name(p.name.lower(), "images")


def _select(source: Source, spec: str, split: str, test_fraction: float, seed: int) -> tuple[str, np.ndarray, int]:
    """(part name, row indices into that part, num_classes) of `split`, by load_dataset's rules."""
    if "all" in source.parts:
        name = "all"
        rows = split_indices(source.parts["all"].labels, test_fraction, seed)[SPLITS.index(split)]
    else:
        if split not in source.parts:
            raise DataError(f"{spec} has no '{split}' split (it has: {', '.join(source.parts)})")
        name, rows = split, np.arange(len(source.parts[split].labels))
    if not len(rows):
        raise DataError(f"{spec}: the {split} split is empty", hint="add data, or hold out another share (vitctl train --test-fraction)")
    num_classes = source.num_classes or int(max(p.labels.max(initial=-1) for p in source.parts.values())) + 1
    if not source.num_classes and num_classes > MAX_INFERRED_CLASSES:
        raise DataError(
            f"{spec}: the largest label is {num_classes - 1}, so the model would need {num_classes} classes",
            hint=f"labels must be class indices 0..K-1 (at most {MAX_INFERRED_CLASSES} classes read from the labels); remap them",
        )
    return name, rows, num_classes


class _Base:
    """What every source here shares: the Records attributes and int labels per example."""

    name: str
    split: str
    num_classes: int
    class_names: tuple[str, ...] | None
    channels: int
    labels: np.ndarray  # int32 [N], this split's labels in example order

    def __len__(self) -> int:
        return len(self.labels)

    def _index(self, i) -> int:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name} ({self.split}): example {i} of {len(self)}")
        return i % len(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.split!r}, {len(self)} examples, {self.num_classes} classes)"


class ArrayRecords(_Base):
    """load_dataset's in-memory split (the small sets: digits, Fashion-MNIST, .npz, IDX, parquet); pickles with its arrays."""

    def __init__(self, spec: str, split: str, *, channels: int = 3, test_fraction: float = 0.2, seed: int = 0):
        ds = load_dataset(spec, split, channels=channels, test_fraction=test_fraction, seed=seed)
        self.name, self.split, self.num_classes, self.class_names = ds.name, split, ds.num_classes, ds.class_names
        self.channels, self.images, self.labels = channels, ds.images, ds.labels

    def __getitem__(self, i) -> tuple[np.ndarray, int]:
        i = self._index(i)
        return self.images[i], int(self.labels[i])

    def describe(self, i) -> str:
        return f"{self.name} ({self.split}) example {int(i)}"


# --------------------------------------------------------------------------- ImageFolder


def _folder(root: Path) -> tuple[Source, dict[str, list[Path]]]:
    """read_image_folder's classes, files, labels and errors, without decoding: (labels per split, files per split)."""
    listing = list_image_folder(root)
    parts = {s: Part(labels, lambda idx: []) for s, labels in listing.labels.items()}
    return Source(parts, len(listing.classes), listing.classes), listing.paths


class ImageFolderRecords(_Base):
    """ROOT/<class>/<image> (optionally under ROOT/train and ROOT/test): the file list at open, a file's bytes per example.

    The relative paths are kept as one bytes blob and offsets, which pickle in one piece
    (a list of a million Path objects would not).
    """

    def __init__(self, spec: str, split: str, *, channels: int = 3, test_fraction: float = 0.2, seed: int = 0):
        root = Path(spec)
        source, paths = _folder(root)
        part, rows, self.num_classes = _select(source, spec, split, test_fraction, seed)
        self.name, self.split, self.class_names, self.channels = spec, split, source.class_names, channels
        self.labels = source.parts[part].labels[rows]
        names = [os.fsencode(paths[part][r].relative_to(root)) for r in rows]
        self._blob = b"".join(names)
        self._offsets = np.cumsum([0, *map(len, names)], dtype=np.int64)
        self._root = os.path.abspath(root)

    def _relative(self, i: int) -> str:
        return os.fsdecode(self._blob[self._offsets[i] : self._offsets[i + 1]])

    def __getitem__(self, i) -> tuple[bytes, int]:
        i = self._index(i)
        path = os.path.join(self._root, self._relative(i))
        try:
            with open(path, "rb") as f:
                return f.read(), int(self.labels[i])
        except OSError as e:
            raise DataError(
                f"cannot read image {path}: {e.strerror or e}", hint="the data set changed since it was opened; reopen it"
            ) from None

    def describe(self, i) -> str:
        return str(Path(self.name) / self._relative(self._index(i)))


# --------------------------------------------------------------------------- Hugging Face save_to_disk


def _hf_split(path: Path, part: str) -> tuple[list[str], str, str]:
    """(the .arrow files of `part`, its image column, its name in the directory), by the rules of sources.hf."""
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError(f"{path} is a Hugging Face dataset directory; reading it needs `datasets`",
                                     hint="pip install 'vitctl[data]'") from e  # fmt: skip
    ds, name = datasets.load_from_disk(str(path)), part
    if isinstance(ds, datasets.DatasetDict):
        named = {("train" if s == "train" else "test" if s in TEST_NAMES else s): s for s in ds}  # the last one wins, as in sources.hf
        name = named[part]
        ds = ds[name]
    features = ds.features.to_dict()
    types = {c: f.get("_type") if isinstance(f, dict) else None for c, f in features.items()}
    cols = ds.column_names
    image = next((c for c in cols if types.get(c) == "Image"), None) or next(c for c in IMAGE_COLUMNS if c in cols)
    return [f["filename"] for f in ds.cache_files], image, name


class ArrowRecords(_Base):
    """A Hugging Face `save_to_disk` directory: the split's .arrow files memory-mapped (per process), a row read per example.

    Images come back as stored: encoded bytes (HF Image features, raw bytes columns) or, for
    pixel columns, a uint8 array. Labels and class names are read at open by sources.hf.
    """

    def __init__(self, spec: str, split: str, *, channels: int = 3, test_fraction: float = 0.2, seed: int = 0):
        source = read_hf_disk(Path(spec))
        part, rows, self.num_classes = _select(source, spec, split, test_fraction, seed)
        self.name, self.split, self.class_names, self.channels = spec, split, source.class_names, channels
        self.labels = source.parts[part].labels[rows]
        self._rows = rows.astype(np.int64) if part == "all" else None  # None: every row of the part, in order
        self._files, self._image, self._part = _hf_split(Path(spec), part)
        self._column = None
        if len(self._images()) != len(source.parts[part].labels):
            raise DataError(f"{spec}: the {part} .arrow files hold {len(self._column)} rows, the dataset {len(source.parts[part].labels)}",
                            hint="re-create the directory with Dataset.save_to_disk")  # fmt: skip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_column": None}  # memory maps are opened again in each process

    def _images(self):
        if self._column is None:
            import pyarrow as pa

            tables = [pa.ipc.open_stream(pa.memory_map(f)).read_all() for f in self._files]
            self._column = pa.concat_tables(tables).column(self._image)
        return self._column

    def _row(self, i: int) -> int:
        return int(self._rows[i]) if self._rows is not None else i

    def __getitem__(self, i) -> tuple[bytes | np.ndarray, int]:
        i = self._index(i)
        value = self._images()[self._row(i)].as_py()
        if isinstance(value, dict):
            if value.get("bytes") is None:
                try:
                    value = Path(value["path"]).read_bytes()
                except (OSError, TypeError) as e:
                    raise DataError(f"{self.describe(i)}: cannot read its image file {value.get('path')}: {e}") from None
            else:
                value = value["bytes"]
        if isinstance(value, bytes):
            return value, int(self.labels[i])
        return to_channels(to_uint8(np.asarray(value)[None], self.describe(i))[0], self.channels), int(self.labels[i])

    def describe(self, i) -> str:
        where = f" ({self._part})" if self._part != "all" else ""  # "all": a single Dataset, no splits of its own
        return f"{self.name}{where} row {self._row(self._index(i))}"
