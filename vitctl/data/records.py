"""The packed data format: a directory of ArrayRecord shards of encoded images, and a manifest.

`vitctl data pack` writes it (vitctl.data.pack); grain reads it through `PackedSource`, one
record at a time, from any number of worker processes. A packed directory holds:

    manifest.json                          what is in it (below), checked before any shard is opened
    train-00000-of-00004.array_record ...  ArrayRecord shards (group_size:1, so any record is one seek)
    test-00000-of-00001.array_record

Each record is one example, in a fixed 12-byte little-endian header and the image file:

    offset  size  field
    0       2     magic b"VR"
    2       1     record layout version (1)
    3       1     image format: 1 PNG, 2 JPEG
    4       4     label, int32, in [0, num_classes)
    8       4     N, the byte length of the image, uint32; the record is exactly 12 + N bytes
    12      N     the encoded image (PNG or JPEG file bytes)

No pickle anywhere: a record is read by `struct` and decoded by PIL, so a hostile shard can
at worst hold a bad image or a bad label, both of which are refused by name.

manifest.json: {"format": "vitctl-packed", "version": 1, "created_by", "source" (public:
a named set or the source's final path component), "image_format" ("png", "jpeg" or
"png+jpeg": what the records hold), "channels" (what readers decode to), "num_classes",
"class_names" (or null), "split" ({"from": "source"}, or {"test_fraction", "seed"} for a
source split by vitctl.data.dataset.split_indices), "splits": {"train": {"num_examples",
"class_counts", "shards": [{"file", "num_records", "bytes", "sha256"}]}, "test": ...}}.

The manifest is untrusted: every name must be a plain file name inside the directory, every
count and size a sane integer, the counts must add up, and each shard must have the size
(and with verify="sha256" the hash) that the manifest says, and as many records.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
import struct
import threading
from pathlib import Path
from typing import Any

from vitctl.errors import ConfigError, DataError
from vitctl.untrusted import check_name, member, read_json

FORMAT, VERSION = "vitctl-packed", 1
MANIFEST = "manifest.json"
HEADER = struct.Struct("<2sBBiI")  # magic, layout version, image format, label, image bytes
MAGIC, RECORD_VERSION = b"VR", 1
PNG, JPEG = 1, 2
FORMAT_NAMES = {PNG: "png", JPEG: "jpeg"}
SIGNATURES = {PNG: b"\x89PNG\r\n\x1a\n", JPEG: b"\xff\xd8\xff"}  # the first bytes of each file format
SPLITS = ("train", "test")
SHARD_NAME = re.compile(r"(?P<split>train|test)-(?P<index>\d{5})-of-(?P<count>\d{5})\.array_record")
MAX_CLASSES = 2**24  # far above any real label set; a larger count is a damaged manifest
MAX_COUNT = 2**40  # records or bytes per shard: a number no file system holds is a damaged manifest
HASH_CHUNK = 8 * 2**20
MAX_IMAGE_BYTES = 2**32 - 1  # the header's uint32 length


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def encode_record(image: bytes, label: int, image_format: int) -> bytes:
    """One record: HEADER, then the encoded image bytes."""
    return HEADER.pack(MAGIC, RECORD_VERSION, image_format, label, len(image)) + image


def decode_record(record: bytes, num_classes: int, where: str) -> tuple[bytes, int, int]:
    """(image bytes, label, image format) of one record, or DataError naming `where` (shard and index)."""
    bad = None
    if len(record) < HEADER.size:
        bad = f"it is {len(record)} bytes, shorter than the {HEADER.size}-byte header"
    else:
        magic, version, fmt, label, n = HEADER.unpack_from(record)
        if magic != MAGIC or version != RECORD_VERSION:
            bad = f"its header starts {record[:3].hex()}, not a vitctl record (magic {MAGIC.hex()}, version {RECORD_VERSION})"
        elif fmt not in FORMAT_NAMES:
            bad = f"its image format code is {fmt}, not one of {sorted(FORMAT_NAMES)}"
        elif len(record) != HEADER.size + n:
            bad = f"its header declares {n} image bytes but it holds {len(record) - HEADER.size}"
        elif not 0 <= label < num_classes:
            bad = f"its label {label} is outside [0, {num_classes})"
    if bad:
        raise DataError(f"{where}: {bad}", hint="the packed data is damaged or hostile; pack it again with `vitctl data pack`")
    return record[HEADER.size :], label, fmt


def is_packed(path: str | Path) -> bool:
    """Whether `path` is a directory holding a manifest.json of format vitctl-packed."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return read_json(manifest, DataError).get("format") == FORMAT
    except DataError:
        return False


def _int(value: Any, where: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise DataError(
            f"{where} is {value!r}, not an integer in [{lo}, {hi}]", hint="the manifest is damaged or hostile; pack the data again"
        )
    return value


def _check_shard(root: Path, s: Any, where: str) -> dict[str, Any]:
    if not isinstance(s, dict):
        raise DataError(f"{where} is not an object", hint="the manifest is damaged; pack the data again")
    name = check_name(s.get("file"), where, DataError)
    if "/" in name:
        raise DataError(f"{where} names {name!r}, not a file of the packed directory itself", hint="the manifest is damaged or hostile")
    member(root, name, where, DataError)
    sha = s.get("sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise DataError(f"{where}: sha256 is {sha!r}, not 64 hex digits", hint="the manifest is damaged; pack the data again")
    return {"file": name, "num_records": _int(s.get("num_records"), f"{where}: num_records"), "bytes": _int(s.get("bytes"), f"{where}: bytes"), "sha256": sha}  # fmt: skip


def read_manifest(root: str | Path) -> dict[str, Any]:
    """root/manifest.json, checked (format, version, names, counts; see the module docstring), shards not opened."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} is not a packed data directory (no {MANIFEST})", hint="make one with `vitctl data pack SRC DST`")
    m = read_json(path, DataError)
    if m.get("format") != FORMAT:
        raise DataError(f"{path}: format is {m.get('format')!r}, not {FORMAT!r}", hint="make one with `vitctl data pack SRC DST`")
    if m.get("version") != VERSION:
        raise DataError(
            f"{path}: version {m.get('version')!r}; this vitctl reads version {VERSION}", hint="pack the data again with this vitctl"
        )
    num_classes = _int(m.get("num_classes"), f"{path}: num_classes", 1, MAX_CLASSES)
    _int(m.get("channels"), f"{path}: channels", 1, 3)
    names = m.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names)):
        raise DataError(f"{path}: class_names must be null or {num_classes} strings", hint="the manifest is damaged; pack the data again")
    splits = m.get("splits")
    if not isinstance(splits, dict) or "train" not in splits or not set(splits) <= set(SPLITS):
        raise DataError(f"{path}: splits must hold 'train' (and 'test'), got {splits if not isinstance(splits, dict) else sorted(splits)}",
                        hint="the manifest is damaged; pack the data again")  # fmt: skip
    for split, info in splits.items():
        where = f"{path}: splits.{split}"
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise DataError(f"{where} has no list of shards", hint="the manifest is damaged; pack the data again")
        n = _int(info.get("num_examples"), f"{where}.num_examples")
        info["shards"] = [_check_shard(root, s, f"{where}.shards[{i}]") for i, s in enumerate(info["shards"])]
        counts = info.get("class_counts")
        if not isinstance(counts, list) or len(counts) != num_classes:
            raise DataError(f"{where}.class_counts must list {num_classes} counts", hint="the manifest is damaged; pack the data again")
        counts = [_int(c, f"{where}.class_counts[{i}]") for i, c in enumerate(counts)]
        total = sum(s["num_records"] for s in info["shards"])
        if total != n or sum(counts) != n:
            raise DataError(f"{where}: num_examples is {n}, but the shards hold {total} records and the class counts add to {sum(counts)}",
                            hint="the manifest is damaged; pack the data again")  # fmt: skip
    return m


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _open_reader(path: Path, num_records: int):
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")  # random access: no read-ahead
        ok, count = reader.ok(), reader.num_records()
    except (RuntimeError, ValueError, OSError) as e:
        raise DataError(f"cannot read shard {path}: {e}", hint="the shard is damaged; pack the data again") from None
    if not ok or count != num_records:
        reader.close()
        why = "it is not a readable ArrayRecord file" if not ok else f"it holds {count} records, the manifest says {num_records}"
        raise DataError(f"shard {path}: {why}", hint="the packed data is damaged; pack it again with `vitctl data pack`")
    return reader


def check_shards(root: Path, shards: list[dict[str, Any]], verify: str) -> None:
    """Each shard exists, with the manifest's size (and sha256 if verify="sha256") and record count."""
    if verify not in ("size", "sha256"):
        raise ConfigError(f"verify must be 'size' or 'sha256', got {verify!r}")
    for s in shards:
        path = root / s["file"]
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError:
            size = None
        if size is None:
            raise DataError(f"shard {path} is missing", hint="the packed directory is incomplete; pack the data again")
        if size != s["bytes"]:
            raise DataError(f"shard {path} is {size:,} bytes; the manifest says {s['bytes']:,}",
                            hint="the shard is truncated or was changed; pack the data again")  # fmt: skip
        if verify == "sha256" and (got := sha256_file(path)) != s["sha256"]:
            raise DataError(f"shard {path}: sha256 {got} differs from the manifest's {s['sha256']}",
                            hint="the shard was changed or damaged; pack the data again")  # fmt: skip
        _open_reader(path, s["num_records"]).close()


class PackedSource:
    """One split of a packed directory: a random-access, picklable source of (image bytes, label).

    Readers open lazily in each process (grain pickles the source into its workers; an
    ArrayRecord reader cannot cross a process), so pickling carries only the checked manifest.

    Attributes:
        name: the packed directory, as given.
        num_classes: classes of the whole source (not only those present in this split).
        class_names: the class names, where the source had them.
        channels: what images are to be decoded to (1 or 3); stored images may hold others.
    """

    def __init__(self, root: str | Path, split: str = "train", *, verify: str = "size"):
        self.root = Path(root)
        if split not in SPLITS:
            raise ConfigError(f"unknown split '{split}'", hint="split must be 'train' or 'test'")
        manifest = read_manifest(self.root)
        if split not in manifest["splits"]:
            raise DataError(f"{self.root} has no '{split}' split (it has: {', '.join(manifest['splits'])})")
        self.name, self.split = str(root), split
        self.num_classes = manifest["num_classes"]
        self.class_names = tuple(manifest["class_names"]) if manifest["class_names"] is not None else None
        self.channels = manifest["channels"]
        self.shards = manifest["splits"][split]["shards"]
        check_shards(self.root, self.shards, verify)
        self._ends = [0]
        for s in self.shards:
            self._ends.append(self._ends[-1] + s["num_records"])
        self._readers: dict[int, Any] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._ends[-1]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _readers={}, _lock=threading.Lock())

    def _reader(self, k: int):
        if self._pid != os.getpid():  # a forked child: the parent's readers are not ours
            self._readers, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        reader = self._readers.get(k)
        if reader is None:
            with self._lock:
                reader = self._readers.get(k)
                if reader is None:
                    reader = self._readers[k] = _open_reader(self.root / self.shards[k]["file"], self.shards[k]["num_records"])
        return reader

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, record index in that shard) of example i."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} examples")
        i %= n
        k = bisect.bisect_right(self._ends, i) - 1
        return k, i - self._ends[k]

    def describe(self, i: int) -> str:
        """Where example i lies, for messages: "SHARD record POS"."""
        k, pos = self.locate(int(i))
        return f"{self.root / self.shards[k]['file']} record {pos}"

    def record(self, i: int) -> tuple[bytes, int, int]:
        """(image bytes, label, image format code) of example i."""
        k, pos = self.locate(int(i))
        where = self.describe(i)
        try:
            data = self._reader(k).read([pos])[0]
        except RuntimeError as e:
            raise DataError(f"{where}: cannot read it: {e}", hint="the shard is damaged; pack the data again") from None
        return decode_record(data, self.num_classes, where)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        image, label, _ = self.record(i)
        return image, label

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}

    def __repr__(self) -> str:
        return f"PackedSource({self.name!r}, {self.split!r}: {len(self)} examples, {self.num_classes} classes)"


def describe(root: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """What `vitctl data info` shows: the manifest's figures per split; with `verify`, every shard's
    sha256 checked and every record parsed (header, label, and the image's file signature)."""
    root = Path(root)
    m = read_manifest(root)
    splits = {}
    for split, info in m["splits"].items():
        src = PackedSource(root, split, verify="sha256" if verify else "size")
        if verify:
            for i in range(len(src)):
                image, _, fmt = src.record(i)
                if not image.startswith(SIGNATURES[fmt]):
                    raise DataError(f"{src.describe(i)}: the image is not a {FORMAT_NAMES[fmt].upper()} file",
                                    hint="the packed data is damaged; pack it again")  # fmt: skip
        src.close()
        splits[split] = {"num_examples": info["num_examples"], "bytes": sum(s["bytes"] for s in info["shards"]),
                         "shards": len(info["shards"]), "class_counts": info["class_counts"]}  # fmt: skip
    keys = ("source", "image_format", "channels", "num_classes", "class_names", "split", "created_by")
    return {"path": str(root), **{k: m.get(k) for k in keys}, "splits": splits, "verified": verify}
