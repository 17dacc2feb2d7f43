"""safetensors: `model.safetensors`, or HF shards `model-0000i-of-0000N.safetensors` +
`model.safetensors.index.json`, read and written one tensor at a time.

- SafetensorsReader: headers are parsed and validated here (offsets inside the file, sizes
  matching shapes, no overlaps, index consistent with the shards), so a truncated, corrupt or
  hostile file fails before any data is read, naming file and tensor. Each tensor is then
  mapped (fastcopy.mapped: a read-only view of the file's pages, no copy) and unmapped with
  its last view, so RSS stays at the tensors in flight.
- SafetensorsWriter: shards planned upfront (HF semantics: a new shard when the next tensor
  would exceed the limit; a larger tensor gets a shard alone); each shard's header is written
  first, then each tensor's bytes at their offset.

The format is an 8-byte header length, a JSON header and the raw bytes, so numpy reads it
without the safetensors library: the library's numpy side cannot hand out bfloat16, and it
copies each tensor out of the file where this reader hands out the file's pages themselves.
bfloat16 is ml_dtypes.bfloat16 here and BF16 in the file. Never pickle.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from vitctl import untrusted
from vitctl.errors import CheckpointError
from vitctl.formats import fastcopy
from vitctl.formats.base import INDEX, SAFETENSORS, CheckpointRoot, Spec, TensorInfo, block_writes, guarded, iter_by_name, nbytes

SHARD_NAME = "model-{i:05d}-of-{n:05d}.safetensors"
# safetensors dtype codes <-> numpy: the dtypes vitctl's formats carry. Parameters are floats; the rest only pass through.
ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}  # fmt: skip
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers too


# Reading.
def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"cannot read {path}: {what}", hint="the file may be truncated or not a safetensors file; re-download or re-create it"
    )


def read_safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[TensorInfo, int]]]:
    """Parses and validates one safetensors header without reading tensor data.

    Returns:
        (metadata, {name: (info, absolute byte offset of its data in the file)}).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"{size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _fail(path, f"header length {n} exceeds the file ({size} bytes)")
        try:
            header = untrusted.parse_json(f.read(n), "header", expect=None)
        except CheckpointError as e:
            raise _fail(path, e.message) from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _fail(path, "__metadata__ is not a JSON object")
    tensors = {name: _parse_entry(path, name, entry, 8 + n) for name, entry in header.items()}
    spans = sorted((off, off + info.nbytes, name) for name, (info, off) in tensors.items())
    for _, end, name in spans:  # the first tensor cut off, in file order
        if end > size:
            raise _fail(path, f"tensor '{name}' ends at byte {end}, past the end of the file ({size} bytes): the file is truncated")
    for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
        if begin < end:
            raise _fail(path, f"tensors '{a}' and '{b}' overlap")
    return metadata, tensors


def _parse_entry(path: Path, name: str, entry: Any, data_start: int) -> tuple[TensorInfo, int]:
    """One header entry {"dtype", "shape", "data_offsets"} -> (info, absolute offset)."""
    try:
        dtype = ST_DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
        assert all(d >= 0 for d in shape) and 0 <= begin <= end
    except (KeyError, TypeError, ValueError, AssertionError):
        raise _fail(path, f"tensor '{name}' has an invalid header entry {str(entry)[:200]}") from None
    info = TensorInfo(name, shape, dtype, path)
    if end - begin != info.nbytes:
        raise _fail(path, f"tensor '{name}' spans {end - begin} bytes, but {entry['dtype']}{list(shape)} needs {info.nbytes}")
    return info, data_start + begin


def _read_index(index: Path, root: CheckpointRoot) -> tuple[dict[str, str], int | None]:
    """(weight_map, metadata.total_size) of an HF index; every shard a file inside the checkpoint.

    Shard names come from the file, so each is a checked relative name (untrusted.check_name)
    that must stay inside the checkpoint once symlinks are followed."""
    try:
        d = untrusted.read_json(index)
    except CheckpointError as e:
        raise CheckpointError(f"cannot read {index}: {e.message}", hint=e.hint) from None
    weight_map = d.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"cannot read {index}: it has no weight_map of tensor names to shard file names",
            hint='an index is {"metadata": {"total_size": N}, "weight_map": {tensor: shard}}',
        )
    for shard in sorted(set(weight_map.values())):
        path = root.member(index.parent, shard, str(index), "shard")
        if not path.is_file():
            raise CheckpointError(
                f"{index} names shard '{shard}', which is not a file in {index.parent}",
                hint="a shard is missing: re-download or re-create the checkpoint",
            )
    total = d.get("metadata", {}).get("total_size") if isinstance(d.get("metadata"), dict) else None
    return weight_map, total


class SafetensorsReader:
    """A torch checkpoint directory: model.safetensors, or an index and its shards."""

    naming = "torch"

    def __init__(self, ckpt: str | Path):
        self.path = Path(ckpt)
        self.root = CheckpointRoot(self.path)
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}
        self._files: dict[Path, Any] = {}
        self.metadata: dict[str, str] = {}
        if (self.path / INDEX).is_file():
            self._open_shards(self.root.check(self.path / INDEX))
        elif (self.path / SAFETENSORS).is_file():
            self._add(self.root.check(self.path / SAFETENSORS), None)
        else:
            raise CheckpointError(f"{self.path} has no torch weights ({SAFETENSORS} or {INDEX})", hint="check the path")

    def count(self) -> int:
        return len(self._infos)

    def _add(self, file: Path, listed: set[str] | None) -> None:
        self.metadata, tensors = read_safetensors_header(file)
        for name, (info, offset) in tensors.items():
            if listed is not None and name not in listed:
                raise CheckpointError(
                    f"{file} holds tensor '{name}', which the index does not assign to it",
                    hint="the index and the shards disagree: re-create the checkpoint",
                )
            if name in self._infos:
                raise CheckpointError(f"tensor '{name}' appears in both {self._infos[name].file} and {file}")
            self._infos[name], self._offsets[name] = info, offset

    def _open_shards(self, index: Path) -> None:
        weight_map, total = _read_index(index, self.root)
        for shard in sorted(set(weight_map.values())):
            self._add(index.parent / shard, {n for n, s in weight_map.items() if s == shard})
        missing = sorted(set(weight_map) - set(self._infos))
        if missing:
            where = weight_map[missing[0]]
            raise CheckpointError(
                f"{index} lists {len(missing)} tensor(s) its shards lack, e.g. '{missing[0]}' in {where}",
                hint="a shard is truncated or stale",
            )
        actual = sum(i.nbytes for i in self._infos.values())
        if total is not None and total != actual:
            raise CheckpointError(
                f"{index}: metadata.total_size is {total}, but the shards hold {actual} bytes of tensors",
                hint="the index and the shards disagree",
            )

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str) -> np.ndarray:
        """The tensor, read-only: a view of the file's pages (fastcopy.mapped), not a copy."""
        info = self._infos[name]
        f = self._files.get(info.file) or self._files.setdefault(info.file, open(info.file, "rb"))  # noqa: SIM115
        size, end = os.fstat(f.fileno()).st_size, self._offsets[name] + info.nbytes
        if end > size:
            raise _fail(
                info.file,
                f"tensor '{name}' is cut short ({max(0, size - self._offsets[name])} of {info.nbytes} bytes): the file is truncated",
            )
        data = fastcopy.mapped([(f.fileno(), self._offsets[name], info.nbytes)])
        return data.view(info.dtype).reshape(info.shape)

    def view(self, name: str) -> np.ndarray:
        """The tensor as a read-only map of the file whose pages are read only when touched: a
        slice of it (`view(name)[index]`, copied with np.array) reads that slice's pages alone.
        Unlike `read`, nothing is read ahead, so each of several processes that hold different
        slices of a tensor reads only its own."""
        info = self._infos[name]
        f = self._files.get(info.file) or self._files.setdefault(info.file, open(info.file, "rb"))  # noqa: SIM115
        offset, size = self._offsets[name], os.fstat(f.fileno()).st_size
        if offset + info.nbytes > size:
            raise _fail(info.file, f"tensor '{name}' is cut short: the file is truncated")
        if not info.nbytes:
            return np.empty(info.shape, info.dtype)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(f.fileno(), offset + info.nbytes - start, access=mmap.ACCESS_READ, offset=start)
        return np.frombuffer(m, info.dtype, math.prod(info.shape), offset - start).reshape(info.shape)

    def read_slice(self, name: str, index: tuple[slice | int, ...]) -> np.ndarray:
        """`tensor[index]` as a new array, reading only the pages that slice touches (`view`)."""
        return np.array(self.view(name)[index])

    iter_tensors = iter_by_name

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# Writing.
def plan_shards(tensors: Sequence[tuple[str, int]], max_bytes: int | None) -> list[list[str]]:
    """Groups (name, nbytes) in order into shards of at most max_bytes (HF semantics).

    A tensor larger than max_bytes gets a shard of its own; None means one shard.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in tensors:
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def shard_names(n: int) -> list[str]:
    return [SAFETENSORS] if n == 1 else [SHARD_NAME.format(i=i + 1, n=n) for i in range(n)]


def _header_bytes(specs: Sequence[Spec], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """The 8-byte length + JSON header of one shard, and each tensor's offset in the file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, pos = {}, 0
    for name, shape, dtype in specs:
        end = pos + nbytes(shape, dtype)
        header[name] = {"dtype": ST_CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [pos, end]}
        offsets[name], pos = pos, end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {n: start + o for n, o in offsets.items()}


class RowStack(NamedTuple):
    """A tensor given as parts to be stacked along axis 0 (timm's fused projections), not yet
    copied together: SafetensorsWriter writes each part at its place."""

    parts: tuple[np.ndarray, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])


class SafetensorsWriter:
    """Writes state_dict tensors into model.safetensors or HF shards + index, one at a time.

    Args:
        directory: existing output directory.
        specs: every (name, shape, dtype) that will be written, in file order.
        max_shard_bytes: shard size limit in bytes (None: one file).
        metadata: string metadata for every shard's header (e.g. {"format": "pt"}).
    """

    def __init__(self, directory: str | Path, specs: Sequence[Spec], max_shard_bytes: int | None, metadata: Mapping[str, str]):
        self.directory = Path(directory)
        by_name = {n: (n, tuple(s), np.dtype(d)) for n, s, d in specs}
        for _, _, d in by_name.values():
            if d not in ST_CODES:
                raise CheckpointError(f"safetensors cannot store dtype {d}")
        groups = plan_shards([(n, nbytes(s, d)) for n, s, d in by_name.values()], max_shard_bytes)
        self.files = shard_names(len(groups))
        self._specs = by_name
        self._where: dict[str, tuple[Path, int]] = {}
        self._handles: dict[Path, Any] = {}
        self._written: set[str] = set()
        for file, names in zip(self.files, groups):
            header, offsets = _header_bytes([by_name[n] for n in names], metadata)
            path = self.directory / file
            self._handles[path] = guarded(path, "the header", lambda p=path: open(p, "wb"))  # noqa: SIM115
            guarded(path, "the header", lambda f=self._handles[path], h=header: (f.write(h), f.flush()))
            self._where.update({n: (path, off) for n, off in offsets.items()})
        self.total_size = sum(nbytes(s, d) for _, s, d in by_name.values())
        self._blocks = fastcopy.BlockWriter()

    def write(self, name: str, array: np.ndarray | RowStack) -> None:
        """Queues `array` (any memory layout; cast to the planned dtype; or a RowStack of such parts)
        for writing at its offset: a transposed view is re-laid out block by block into cache-sized
        buffers here, while a background thread writes the blocks (fastcopy.BlockWriter). Returns
        before the bytes are written; a failed write is raised (naming its file and tensor) by a
        later `write` or `close`."""
        _, shape, dtype = self._specs[name]
        assert array.shape == shape and name not in self._written, (name, array.shape, shape)
        path, offset = self._where[name]
        fd = self._handles[path].fileno()
        for part in array.parts if isinstance(array, RowStack) else (array,):
            block_writes(lambda p=part, at=offset: self._blocks.write(fd, at, p, dtype, (path, f"tensor '{name}'")))
            offset += part.size * dtype.itemsize
        self._written.add(name)

    def close(self) -> None:
        missing = sorted(set(self._specs) - self._written)
        assert not missing, f"tensors never written: {missing[:8]}"
        block_writes(self._blocks.close)
        for path, f in self._handles.items():
            guarded(path, "the end of the file", f.close)
        if len(self.files) > 1:
            weight_map = {n: p.name for n, (p, _) in self._where.items()}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            guarded(self.directory / INDEX, "the index", lambda: (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n"))
            self.files.append(INDEX)

    def abort(self) -> None:
        self._blocks.abort()  # no write lands after this returns
        for f in self._handles.values():
            f.close()
