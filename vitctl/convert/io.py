"""Lazy per-tensor readers and streaming writers for the checkpoint formats.

A reader lists its tensors from headers alone (`infos()`: name -> TensorInfo, no
data read), then hands out one tensor at a time (`read(name)`). A writer is built
from the full list of tensors it will receive (names, shapes, dtypes: the plan), so
it lays out its files before any data arrives, then takes one tensor at a time in any
order (`write(name, array)`: any memory layout, e.g. a transposed view, cast to the
planned dtype), and `close()` checks that each was written exactly once.
Memory is bounded by one tensor (or one stored chunk), never by the checkpoint.

- SafetensorsReader: `model.safetensors`, or HF shards `model-0000i-of-0000N.safetensors`
  + `model.safetensors.index.json`. Headers are parsed and validated by hand (offsets
  inside the file, sizes matching shapes, index consistent with the shards), so a
  truncated or corrupt file fails before any data is read, naming file and tensor.
  Each tensor is mapped (fastcopy.mapped: a read-only view of the file's pages, no copy),
  and unmapped with its last view, so RSS stays at the tensors in flight.
- SafetensorsWriter: shards planned upfront (HF semantics: a new shard when the next
  tensor would exceed the limit; a larger tensor gets a shard alone); each shard's
  header is written first, then each tensor's bytes at their offset.
- OrbaxReader: `params/` as Orbax writes it (OCDBT + zarr, or their per-array and zarr3
  variants, from `_METADATA`), opened with tensorstore. Stacked block arrays
  (`blocks/q/kernel`, leading L axis) are exposed per layer (`blocks/{i}/q/kernel`)
  and read as slices `[i]`, which touch only that layer's chunks, decoded by tensorstore
  straight into a reused buffer (fastcopy.scratch), a few tensors ahead. Uncompressed zarr v2
  arrays (what `vitctl init/train` and OrbaxFilesWriter write) are read without tensorstore's
  decoder: where each chunk lies comes from the OCDBT B-tree (tensorstore.ocdbt.dump) or is
  a chunk file; chunks that are runs of the array's bytes are mapped into one array in order
  (no copy), others are read in place (os.preadv, one iovec per chunk row).
- OrbaxFilesWriter (what `vitctl convert` writes): `params/` in Orbax's one-directory-per-array
  layout (`use_ocdbt: false`), uncompressed, written as plain files through fastcopy.BlockWriter.
- OrbaxWriter (with zstd, as Orbax's default): `params/` written directly with tensorstore in Orbax's on-disk layout
  (one OCDBT database, zarr v2 arrays, zstd level 1, `_METADATA`, `_CHECKPOINT_METADATA`),
  one layer slice at a time. Orbax's own `save` needs the whole pytree in memory; its
  experimental partial save adds whole leaves only, so a stacked (L, ...) array would
  still be one allocation. The result restores with `ocp.StandardCheckpointer`.

Names: the safetensors side uses torch state_dict keys ("torch" naming), the Orbax side
per-layer NNX paths ("jax" naming). Shapes and dtypes are numpy's; bfloat16 is
ml_dtypes.bfloat16. Imports numpy, ml_dtypes and (for Orbax) tensorstore only: no jax,
no torch, no pickle.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import ml_dtypes
import numpy as np

from vitctl import untrusted
from vitctl.errors import CheckpointError, ConfigError, MissingDependencyError
from vitctl.formats import fastcopy
from vitctl.formats.fastcopy import scratch

SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"
SHARD_NAME = "model-{i:05d}-of-{n:05d}.safetensors"
# safetensors dtype codes <-> numpy. Parameters are floats; the rest only pass through.
ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}  # fmt: skip
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers too


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: enough to plan without reading data."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path  # for messages: the file (or Orbax directory) holding the data
    chunk_bytes: int = 0  # bytes a reader must hold to read it, if more than nbytes (Orbax chunks)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Reader(Protocol):
    """A source checkpoint, read one tensor at a time.

    `naming` is "jax" (per-layer NNX paths, `blocks/{i}/q/kernel`, shapes as in
    mapping.jax_param_shapes(cfg, stacked=False)) or "torch" (state_dict keys).
    """

    naming: str
    path: Path

    def infos(self) -> dict[str, TensorInfo]: ...

    def read(self, name: str) -> np.ndarray: ...

    def iter_tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for each of `names` (all of them, each once), in the reader's preferred order."""
        ...

    def close(self) -> None: ...


def iter_by_name(reader: Reader, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """The default `iter_tensors`: random access, in the order given."""
    for name in names:
        yield name, reader.read(name)


class Writer(Protocol):
    files: list[str]  # what it creates, relative to its directory

    def write(self, name: str, array: np.ndarray) -> None: ...

    def close(self) -> None:
        """Checks that every planned tensor was written once; finishes the files (index, metadata)."""

    def abort(self) -> None:
        """Releases open files after a failure (the caller deletes the directory)."""


def parse_size(text: str | int) -> int:
    """ "5GB" -> 5_000_000_000 (decimal units, as Hugging Face), "2GiB" -> 2 * 2**30, "123" -> 123."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(text), re.IGNORECASE)
    unit = m and m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    if not m or unit not in scale or float(m.group(1)) * scale[unit] < 1:
        raise ConfigError(f"invalid size '{text}'", hint='use e.g. "5GB" (10^9 bytes), "500MB", "2GiB" (2^30 bytes) or a byte count')
    return int(float(m.group(1)) * scale[unit])


def _nbytes(shape: Sequence[int], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _as_bytes(array: np.ndarray) -> memoryview:
    """The raw bytes of a C-contiguous array (bfloat16 included), without a copy."""
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


# safetensors: reading.
def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"cannot read {path}: {what}", hint="the file may be truncated or not a safetensors file; re-download or re-create it"
    )


class CheckpointRoot:
    """Where a checkpoint's files may lie: inside its directory, or, for a Hugging Face cache
    snapshot (`.../models--org--name/snapshots/SHA/...`, whose files are symlinks), inside that
    repo's cache folder too. A file that is a symlink leading elsewhere is refused: a checkpoint
    from a stranger must not make vitctl read (and copy into an output, or upload) other files."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.also = hf_cache_repo(self.path)

    def check(self, path: str | Path, where: str | None = None) -> Path:
        """`path` itself, after checking that it resolves inside the checkpoint."""
        untrusted.inside(self.path, path, where or str(self.path), also=self.also)
        return Path(path)

    def member(self, folder: str | Path, name: Any, where: str, kind: str = "the file") -> Path:
        """folder / name for a `name` read from a file (index, manifest): a checked relative name, inside the checkpoint."""
        path = Path(folder) / untrusted.check_name(name, where, kind=kind)
        return self.check(path, where)

    def check_tree(self, folder: str | Path, where: str) -> None:
        """Every symlink under `folder` (not followed) leads inside the checkpoint. Metadata only: a
        scandir per directory, a resolve per symlink, so a 22B checkpoint's thousands of chunk files
        cost milliseconds."""
        pending = [Path(folder)]
        while pending:
            try:
                entries = list(os.scandir(pending.pop()))
            except OSError:
                continue  # a missing or unreadable folder: the reader names it
            for e in entries:
                if e.is_symlink():
                    self.check(e.path, where)
                elif e.is_dir(follow_symlinks=False):
                    pending.append(Path(e.path))


def hf_cache_repo(path: Path) -> Path | None:
    """The blob folder `.../models--org--name/blobs` of the Hugging Face cache snapshot that holds
    `path` (`.../models--org--name/snapshots/SHA/...`), else None."""
    parts = path.absolute().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--", "spaces--")) and i + 1 < len(parts):
            return Path(*parts[:i]) / "blobs"
    return None


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

    iter_tensors = iter_by_name

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# safetensors: writing.
def plan_shards(tensors: Sequence[tuple[str, int]], max_bytes: int | None) -> list[list[str]]:
    """Groups (name, nbytes) in order into shards of at most max_bytes (HF semantics).

    A tensor larger than max_bytes gets a shard of its own; None means one shard.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in tensors:
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [SAFETENSORS] if n == 1 else [SHARD_NAME.format(i=i + 1, n=n) for i in range(n)]


def _header_bytes(specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """The 8-byte length + JSON header of one shard, and each tensor's offset in the file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, pos = {}, 0
    for name, shape, dtype in specs:
        end = pos + _nbytes(shape, dtype)
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

    def __init__(
        self,
        directory: str | Path,
        specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
        max_shard_bytes: int | None,
        metadata: Mapping[str, str],
    ):
        self.directory = Path(directory)
        by_name = {n: (n, tuple(s), np.dtype(d)) for n, s, d in specs}
        for _, _, d in by_name.values():
            if d not in ST_CODES:
                raise CheckpointError(f"safetensors cannot store dtype {d}")
        groups = plan_shards([(n, _nbytes(s, d)) for n, s, d in by_name.values()], max_shard_bytes)
        self.files = shard_names(len(groups))
        self._specs = by_name
        self._where: dict[str, tuple[Path, int]] = {}
        self._handles: dict[Path, Any] = {}
        self._written: set[str] = set()
        for file, names in zip(self.files, groups):
            header, offsets = _header_bytes([by_name[n] for n in names], metadata)
            path = self.directory / file
            self._handles[path] = _guarded(path, "the header", lambda p=path: open(p, "wb"))  # noqa: SIM115
            _guarded(path, "the header", lambda f=self._handles[path], h=header: (f.write(h), f.flush()))
            self._where.update({n: (path, off) for n, off in offsets.items()})
        self.total_size = sum(_nbytes(s, d) for _, s, d in by_name.values())
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
            _block_writes(lambda p=part, at=offset: self._blocks.write(fd, at, p, dtype, (path, f"tensor '{name}'")))
            offset += part.size * dtype.itemsize
        self._written.add(name)

    def close(self) -> None:
        missing = sorted(set(self._specs) - self._written)
        assert not missing, f"tensors never written: {missing[:8]}"
        _block_writes(self._blocks.close)
        for path, f in self._handles.items():
            _guarded(path, "the end of the file", f.close)
        if len(self.files) > 1:
            weight_map = {n: p.name for n, (p, _) in self._where.items()}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            _guarded(self.directory / INDEX, "the index", lambda: (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n"))
            self.files.append(INDEX)

    def abort(self) -> None:
        self._blocks.abort()  # no write lands after this returns
        for f in self._handles.values():
            f.close()


def _guarded(path: Path, what: str, fn):
    """Runs a write; turns an OSError (disk full, file too large, ...) into a CheckpointError naming file and tensor."""
    try:
        return fn()
    except OSError as e:
        raise _write_error(path, what, e) from None


def _block_writes(fn) -> None:
    """Runs fn (queueing or flushing fastcopy.BlockWriter writes labelled (path, what)); a failed
    write becomes a CheckpointError naming its file and tensor."""
    try:
        fn()
    except fastcopy.WriteFailed as e:
        path, what = e.label
        raise _write_error(path, what, e.error) from None


def _write_error(path: Path, what: str, e: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write {what} to {path}: {e.strerror or e}", hint="check the free disk space and the file size limit (ulimit -f)"
    )


# Orbax params/: layout constants (orbax-checkpoint 0.12.8, StandardCheckpointer).
METADATA, CHECKPOINT_METADATA = "_METADATA", "_CHECKPOINT_METADATA"
ORBAX_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000, "manifest_kind": "single"}


def _tensorstore():
    try:
        import tensorstore as ts
    except ImportError as e:
        raise MissingDependencyError(f"JAX checkpoints (Orbax params/) need tensorstore ({e})", hint="pip install 'vitctl[jax]'") from None
    return ts


def _ts_context(ts):
    # No data cache (each chunk is read once); a small one for OCDBT B-tree nodes (Orbax: 100 MB).
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "cache_pool#ocdbt": {"total_bytes_limit": 8 * 2**20}})


def _kvstore(params: Path, array: str, ocdbt: bool, writing: bool = False) -> dict[str, Any]:
    """The tensorstore kvstore spec of one array in params/ (Orbax names arrays by '.'-joined keys)."""
    if not ocdbt:
        return {"driver": "file", "path": f"{params}/{array}/"}
    spec: dict[str, Any] = {
        "driver": "ocdbt",
        "base": {"driver": "file", "path": f"{params}/"},
        "path": array,
        "cache_pool": "cache_pool#ocdbt",
    }
    if writing:  # as Orbax: non-atomic data files (fresh names), atomic manifest, one writer
        spec.update(
            base={"driver": "file", "path": f"{params}/", "file_io_locking": {"mode": "non_atomic"}},
            manifest={"driver": "file", "path": f"{params}/"},
            config=OCDBT_CONFIG, assume_config=True, target_data_file_size=2**31,
        )  # fmt: skip
    return spec


def is_stacked(name: str) -> bool:
    """`blocks/q/kernel` (leading L axis) is stacked; `blocks/3/q/kernel` is one layer."""
    parts = name.split("/")
    return parts[0] == "blocks" and len(parts) > 1 and not parts[1].isdigit()


def layer_name(stacked: str, i: int) -> str:
    return stacked.replace("blocks/", f"blocks/{i}/", 1)


def split_layer(name: str) -> tuple[str, int | None]:
    """`blocks/3/q/kernel` -> ("blocks/q/kernel", 3); anything else -> (name, None)."""
    m = re.fullmatch(r"blocks/(\d+)/(.+)", name)
    return (f"blocks/{m.group(2)}", int(m.group(1))) if m else (name, None)


def _ts_error(params: Path, what: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot read {what} from {params}: {str(e)[:500]}", hint="the Orbax checkpoint is corrupt or incomplete: re-create it"
    )


class OrbaxReader:
    """params/ of a JAX checkpoint, one array (or one layer of a stacked array) at a time."""

    naming = "jax"

    def __init__(self, params: str | Path):
        ts = self._ts = _tensorstore()
        self.path = Path(params).absolute()
        # Everything below comes from files a stranger may have written: the checkpoint's files
        # must lie inside it, and every array's metadata is checked here, before tensorstore
        # sees it (a chunk shape larger than the array, or a shape past what is stored, made
        # tensorstore allocate without bound and abort the process).
        root = CheckpointRoot(self.path.parent)
        root.check(self.path)
        root.check_tree(self.path, str(self.path))
        meta = _read_orbax_metadata(self.path)
        ctx = _ts_context(ts)
        driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self._arrays: dict[str, Any] = {}  # arrays tensorstore reads
        self._plain: dict[str, _PlainArray] = {}  # arrays read straight from their files
        self._open_files = _OpenFiles()
        self._reading: set[concurrent.futures.Future] = set()
        self._stacked: dict[str, TensorInfo] = {}  # as stored: block arrays with their leading L axis
        self._infos: dict[str, TensorInfo] | None = None  # per layer, listed on first use
        ocdbt, zarr3 = meta.get("use_ocdbt", True), meta.get("use_zarr3", False)
        names = _orbax_names(self.path, meta)
        index = _ocdbt_index(ts, self.path, ctx, f"array '{next(iter(names), '')}'") if ocdbt else None
        stored_chunks = _stored_chunks(index) if index is not None else None
        every_chunk_stored = meta.get("store_array_data_equal_to_fill_value") is True
        for name, stored in names.items():
            tally = stored_chunks.get(stored, (0, 0)) if stored_chunks is not None else _chunk_file_tally(self.path / stored)
            z = _array_metadata(self.path, stored, name, zarr3, index, tally, every_chunk_stored)
            plain = (
                None if zarr3 else self._plain_array(z, stored, index) if ocdbt else _PlainArray.parse(z, _chunk_files(self.path / stored))
            )
            if plain is not None and (plain.chunks[:1] == (1,) or not is_stacked(name)):
                self._plain[name] = plain
                self._add_info(name, plain.shape, plain.dtype, _nbytes(plain.chunks, plain.dtype))
                continue
            spec = {"driver": driver, "kvstore": _kvstore(self.path, stored, ocdbt)}
            try:
                arr = ts.open(spec, open=True, read=True, write=False, context=ctx).result()
                dtype, chunks = np.dtype(arr.dtype.numpy_dtype), tuple(arr.chunk_layout.read_chunk.shape)
            except Exception as e:  # noqa: BLE001  (tensorstore maps its status codes to several exception types)
                raise _ts_error(self.path, f"array '{name}'", e) from None
            self._arrays[name] = arr
            self._add_info(name, tuple(arr.shape), dtype, _nbytes(chunks, dtype))

    def _plain_array(self, z: Mapping[str, Any], stored: str, index: Mapping[str, Location]) -> _PlainArray | None:
        """An array of the OCDBT database whose chunks are all stored, uncompressed (else None)."""
        plain = _PlainArray.parse(z, lambda key: index.get(f"{stored}/{key}"))
        return plain if plain is not None and all(f"{stored}/{k}" in index for k in plain.chunk_keys()) else None

    def _add_info(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunk_bytes: int) -> None:
        if is_stacked(name) and not shape:
            raise CheckpointError(f"stacked block array '{name}' in {self.path} is a scalar; expected a leading layer axis")
        self._stacked[name] = TensorInfo(name, shape, dtype, self.path, chunk_bytes)

    def count(self) -> int:
        """How many per-layer tensors `infos()` lists, without listing them."""
        return sum(i.shape[0] if is_stacked(n) else 1 for n, i in self._stacked.items())

    def infos(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            self._infos = {}
            for name, info in self._stacked.items():
                if not is_stacked(name):
                    self._infos[name] = info
                    continue
                for i in range(info.shape[0]):
                    self._infos[layer_name(name, i)] = TensorInfo(
                        layer_name(name, i), info.shape[1:], info.dtype, self.path, info.chunk_bytes
                    )
        return dict(self._infos)

    def read(self, name: str) -> np.ndarray:
        return self._finish(name, self._start(name))

    read_ahead = 2  # tensors tensorstore reads and decodes while the caller works on the current one

    def iter_tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        """In the order given, reading `read_ahead` tensors ahead: tensorstore decodes them while the caller works."""
        ahead: collections.deque[tuple[str, Any]] = collections.deque()
        for name in names:
            ahead.append((name, self._start(name)))
            if len(ahead) > self.read_ahead:
                yield ahead[0][0], self._finish(*ahead.popleft())
        while ahead:
            yield ahead[0][0], self._finish(*ahead.popleft())

    def _start(self, name: str):
        stacked, i = split_layer(name)
        key = stacked if i is not None else name
        if self._infos is None:
            self.infos()
        if key in self._plain:  # read straight into a reused buffer, on the reader thread
            future = _reader_thread().submit(self._plain[key].read, i, name, self._open_files)
            self._reading.add(future)
            future.add_done_callback(self._reading.discard)
            return None, future
        arr = self._arrays[stacked] if i is not None else self._arrays[name]
        src = arr[i] if i is not None else arr
        info = self._infos[name]
        # Decoded straight into a reused buffer (fastcopy.scratch): no fresh pages to fault in.
        out = scratch(info.shape, info.dtype)
        try:
            future = self._ts.array(out, copy=False, write=True).write(src).commit
        except Exception as e:  # noqa: BLE001  (as below)
            raise _ts_error(self.path, f"tensor '{name}'", e) from None
        future.force()  # tensorstore futures are lazy: start reading and decoding now
        return out, future

    def _finish(self, name: str, started) -> np.ndarray:
        out, future = started
        try:
            result = future.result()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  (as above)
            raise _ts_error(self.path, f"tensor '{name}'", e) from None
        return result if out is None else out

    def close(self) -> None:
        concurrent.futures.wait(list(self._reading))  # reads still running use the open files
        self._arrays.clear()
        self._plain.clear()
        self._open_files.close()


@functools.cache
def _reader_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vitctl-read")


# Where one stored chunk lies: (file, byte offset, byte length or None for "the whole file"), or its
# bytes when the OCDBT B-tree holds them inline. None: not stored.
Location = tuple[Path, int, int | None] | bytes
_IOV_MAX = 1024  # iovecs per os.preadv (Linux's UIO_MAXIOV)
_DIRECT_RUN_BYTES = 16 << 10  # chunk rows at least this long are read straight into place; shorter ones via a copy


@dataclasses.dataclass(frozen=True)
class _PlainArray:
    """An uncompressed zarr v2 array (C order, no filters, no fill value) whose chunks tile its shape,
    read without tensorstore: every chunk's rows go from the file straight to their place in the
    caller's buffer (one os.preadv per chunk), so the bytes are copied once, by the kernel.

    `locate(key)` says where the chunk with zarr key `key` ("i.j.k") lies: chunk files of the
    per-array layout, or values in the data files of an OCDBT database (_ocdbt_index).
    """

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    locate: Callable[[str], Location | None]

    @classmethod
    def parse(cls, z: Mapping[str, Any], locate: Callable[[str], Location | None]) -> _PlainArray | None:
        """The array that `.zarray` (checked by _array_metadata) describes if it has that form (else None: tensorstore reads it)."""
        try:
            dtype = {v: k for k, v in _ZARR_DTYPE.items()}.get(z["dtype"]) or np.dtype(z["dtype"])
            shape, chunks = tuple(int(d) for d in z["shape"]), tuple(int(c) for c in z["chunks"])
        except (ValueError, KeyError, TypeError):
            return None  # tensorstore names what is wrong
        plain = z.get("compressor") is None and z.get("filters") is None and z.get("order", "C") == "C" and z.get("zarr_format") == 2
        plain = plain and z.get("fill_value") is None and z.get("dimension_separator", ".") == "."
        tiles = len(shape) == len(chunks) and all(c > 0 and s % c == 0 for s, c in zip(shape, chunks)) and 0 not in shape
        ok = plain and tiles and dtype.byteorder in "=<|" and dtype in _PLAIN_DTYPES
        return cls(shape, chunks, dtype, locate) if ok else None

    def read(self, layer: int | None, name: str, files: _OpenFiles) -> np.ndarray:
        """The array, or layer `layer` of it (chunks[0] must then be 1), C-contiguous.

        When its chunks are runs of its bytes (slabs) stored in files, page-aligned, the result
        maps them in order (fastcopy.mapped: read-only, no copy); else it is a reused buffer that
        each chunk is read into in place."""
        shape, chunks, prefix = self.shape, self.chunks, ""
        if layer is not None:
            assert chunks[0] == 1, (name, chunks)
            shape, chunks, prefix = shape[1:], chunks[1:], f"{layer}."
        nbytes = math.prod(chunks) * self.dtype.itemsize
        with contextlib.ExitStack() as opened:
            if shape and _is_slab(shape, chunks):
                pieces = [self._open_chunk(prefix + key, nbytes, name, files, opened) for key in self._grid_keys(shape, chunks)]
                if all(isinstance(p, tuple) for p in pieces):
                    data = fastcopy.mapped([(fd, offset, nbytes) for fd, offset in pieces])  # type: ignore[misc]
                    if data is not None:
                        return data.view(self.dtype).reshape(shape)
            out = scratch(shape, self.dtype)
            self._read_into(out, shape, chunks, prefix, name, files, opened)
            return out

    @staticmethod
    def _grid_keys(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[str]:
        for index in itertools.product(*(range(s // c) for s, c in zip(shape, chunks))):
            yield ".".join(map(str, index))

    def chunk_keys(self) -> Iterator[str]:
        """The zarr key of every chunk."""
        return self._grid_keys(self.shape, self.chunks) if self.shape else iter(["0"])

    def _read_into(self, out, shape, chunks, prefix: str, name: str, files: _OpenFiles, opened: contextlib.ExitStack) -> None:
        size = self.dtype.itemsize
        buf = memoryview(out.reshape(-1).view(np.uint8))
        if not shape:
            self._read_chunk(prefix + "0", [buf], name, files, opened)
            return
        strides = [math.prod(shape[a + 1 :]) * size for a in range(len(shape))]
        cut = [a for a in range(len(shape)) if chunks[a] != shape[a]]
        j = cut[-1] if cut else 0  # chunk rows: contiguous runs of chunks[j:] elements
        run = chunks[j] * strides[j]
        rows = np.zeros((), np.int64)  # offsets of a chunk's rows from its first byte, in its C order
        for a in range(j):
            rows = np.add.outer(rows, np.arange(chunks[a], dtype=np.int64) * strides[a])
        rows = rows.reshape(-1)
        direct = run >= _DIRECT_RUN_BYTES or len(rows) == 1
        whole = out.reshape(shape)
        for index in itertools.product(*(range(s // c) for s, c in zip(shape, chunks))):
            key = prefix + ".".join(map(str, index))
            if direct:  # each row of the chunk straight to its place (os.preadv)
                start = sum(i * c * s for i, c, s in zip(index, chunks, strides))
                self._read_chunk(key, [buf[o : o + run] for o in (rows + start).tolist()], name, files, opened)
            else:  # short rows: read the chunk whole, then copy it into place
                tile = scratch(chunks, self.dtype)
                self._read_chunk(key, [memoryview(tile.reshape(-1).view(np.uint8))], name, files, opened)
                whole[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))] = tile

    def _read_chunk(self, key: str, views: list[memoryview], name: str, files: _OpenFiles, opened: contextlib.ExitStack) -> None:
        where = self._open_chunk(key, sum(map(len, views)), name, files, opened)
        if isinstance(where, bytes):  # inline in the OCDBT B-tree
            data = memoryview(where)
            for v in views:
                v[:], data = data[: len(v)], data[len(v) :]
            return
        fd, offset = where
        try:
            complete = _preadv_all(fd, views, offset)
        except OSError as e:
            raise CheckpointError(f"cannot read tensor '{name}' from {files.path(fd)}: {e.strerror or e}", hint=_RECREATE) from None
        if not complete:
            raise CheckpointError(f"cannot read tensor '{name}' from {files.path(fd)}: the file ended inside chunk {key}", hint=_RECREATE)

    def _open_chunk(self, key: str, nbytes: int, name: str, files: _OpenFiles, opened: contextlib.ExitStack) -> tuple[int, int] | bytes:
        """(fd, offset) of chunk `key`'s `nbytes` bytes, checked to lie inside their file, or its inline value."""
        where = self.locate(key)
        if isinstance(where, bytes):
            if len(where) != nbytes:
                raise CheckpointError(f"cannot read tensor '{name}': chunk {key} holds {len(where)} bytes, not {nbytes}", hint=_RECREATE)
            return where
        if where is None:
            raise CheckpointError(f"cannot read tensor '{name}': chunk {key} is not stored", hint=_RECREATE)
        path, offset, length = where
        if length is None:  # a chunk file (per-array layout): each is read once
            fd, size = opened.enter_context(files.opened(path, name, "chunk file"))
            if size != nbytes:
                raise CheckpointError(
                    f"cannot read tensor '{name}' from {path}: the chunk file holds {size} bytes, not {nbytes}", hint=_RECREATE
                )
            return fd, 0
        fd, size = files.open(path, name, "data file")  # an OCDBT data file: kept open, it holds many chunks
        if length != nbytes or offset + length > size:
            what = (
                f"holds {length} bytes, not {nbytes}"
                if length != nbytes
                else f"ends at byte {offset + length}, past the end of the file ({size} bytes)"
            )
            raise CheckpointError(f"cannot read tensor '{name}' from {path}: chunk {key} {what}", hint=_RECREATE)
        return fd, offset


_RECREATE = "the Orbax checkpoint is truncated or corrupt: re-create it"
_PLAIN_DTYPES = frozenset(ST_DTYPES.values())


def _preadv_all(fd: int, views: list[memoryview], offset: int) -> bool:
    """Fills `views` from consecutive bytes of `fd` at `offset` (consumes the list); False at end of file."""
    i = 0
    while i < len(views):
        n = os.preadv(fd, views[i : i + _IOV_MAX], offset)
        if n == 0:
            return False
        offset += n
        while n and i < len(views):
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i], n = views[i][n:], 0
    return True


class _OpenFiles:
    """File descriptors (and sizes) of the files a reader reads from."""

    def __init__(self):
        self._fds: dict[Path, tuple[int, int]] = {}
        self._paths: dict[int, Path] = {}
        self._lock = threading.Lock()

    def open(self, path: Path, name: str, what: str) -> tuple[int, int]:
        """(fd, size) of `path`, opened on first use and kept open until close()."""
        with self._lock:
            if path not in self._fds:
                self._fds[path] = self._open(path, name, what)
            return self._fds[path]

    @contextlib.contextmanager
    def opened(self, path: Path, name: str, what: str) -> Iterator[tuple[int, int]]:
        """(fd, size) of `path`, closed on leaving."""
        fd, size = self._open(path, name, what)
        try:
            yield fd, size
        finally:
            with self._lock:
                del self._paths[fd]
            os.close(fd)

    def path(self, fd: int) -> Path:
        return self._paths[fd]

    def _open(self, path: Path, name: str, what: str) -> tuple[int, int]:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointError(f"cannot read tensor '{name}': {what} {path} is missing", hint=_RECREATE) from None
        except OSError as e:
            raise CheckpointError(f"cannot read tensor '{name}' from {path}: {e.strerror or e}", hint=_RECREATE) from None
        self._paths[fd] = path
        return fd, os.fstat(fd).st_size

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._paths.clear()


def _chunk_files(folder: Path) -> Callable[[str], Location]:
    """Chunk key -> its file in the per-array layout (`params/<array>/<key>`)."""
    return lambda key: (folder / key, 0, None)


_VALUE_REF = re.compile(r"value:([^:]*):([^:]*):([0-9]+):([0-9]+)")


_NODE_REF = re.compile(r"btreenode:([^:]*):([^:]*):([0-9]+):([0-9]+)")


def _data_file(params: Path, ref: str, pattern: re.Pattern, what: str) -> Path:
    """The file an OCDBT reference (`value:` or `btreenode:` base:path:offset:length) names, checked
    to be a plain relative name inside params/: the references come from the database's own files."""
    m = pattern.fullmatch(ref)
    if m is None:
        raise CheckpointError(f"{params}: the OCDBT database holds an unreadable {what} reference {ref[:200]!r}", hint=_RECREATE)
    base = urllib.parse.unquote(m.group(1))
    rel = (base if not base or base.endswith("/") else base + "/") + urllib.parse.unquote(m.group(2))
    return params / untrusted.check_name(rel, f"the OCDBT database in {params} ({what} reference)")


def _ocdbt_index(ts, params: Path, context, what: str) -> dict[str, Location]:
    """Every key of the OCDBT database in `params/` (latest version) -> where its value lies, from its
    B+tree as tensorstore.ocdbt.dump decodes it. Every node and value it references must be a file
    inside params/ (refused otherwise, before tensorstore reads any of them)."""
    try:
        base = ts.KvStore.open({"driver": "file", "path": f"{params}/"}, context=context).result()
        manifest = ts.ocdbt.dump(base, context=context).result()
        root = max(manifest["versions"], key=lambda v: v["generation_number"])["root"]
    except Exception as e:  # noqa: BLE001  (tensorstore maps its status codes to several exception types)
        raise _ts_error(params, what, e) from None  # (tensorstore's message names the manifest)
    pending = [root["location"]] if "location" in root else []
    index: dict[str, Location] = {}
    while pending:
        location = pending.pop()
        _data_file(params, location, _NODE_REF, "node")
        try:
            entries = ts.ocdbt.dump(base, location, context=context).result()["entries"]
        except Exception as e:  # noqa: BLE001  (as above)
            raise _ts_error(params, what, e) from None
        for entry in entries:
            if "location" in entry:  # interior node: a subtree
                pending.append(entry["location"])
                continue
            key = bytes(entry["key"]).decode(errors="replace")
            if "inline_value" in entry:
                index[key] = bytes(entry["inline_value"])
                continue
            m = _VALUE_REF.fullmatch(entry.get("indirect_value", ""))
            index[key] = (_data_file(params, entry.get("indirect_value", ""), _VALUE_REF, "value"), int(m.group(3)), int(m.group(4)))
    return index


def _read_orbax_metadata(params: Path) -> dict[str, Any]:
    path = params / METADATA
    if not path.is_file():
        raise CheckpointError(f"cannot read {path}: no such file", hint="params/ is not a complete Orbax checkpoint: re-create it")
    try:
        meta = untrusted.read_json(path)
    except CheckpointError as e:
        raise CheckpointError(f"cannot read {path}: {e.message}", hint="params/ is not a complete Orbax checkpoint: re-create it") from None
    if not isinstance(meta.get("tree_metadata"), dict):
        raise CheckpointError(
            f"cannot read {path}: it has no tree_metadata object", hint="params/ is not a complete Orbax checkpoint: re-create it"
        )
    return meta


def _orbax_names(params: Path, meta: Mapping[str, Any]) -> dict[str, str]:
    """{"/"-joined tree path: Orbax's stored array name ('.'-joined keys)} from _METADATA.

    The stored name is a directory (or an OCDBT key prefix) under params/, so every key must be
    one plain path segment: no '/', no '..', nothing that leads out of params/."""
    out = {}
    where = f"{params / METADATA}"
    for key, entry in meta["tree_metadata"].items():
        try:
            keys = [k["key"] for k in entry["key_metadata"]]
        except (KeyError, TypeError):
            raise CheckpointError(f"cannot read {where}: entry {str(key)[:200]!r} has no key_metadata") from None
        for k in keys:
            if not isinstance(k, str | int) or isinstance(k, bool) or "/" in str(k):
                raise CheckpointError(
                    f"{where} names the tree key {str(k)[:200]!r}, which vitctl refuses: a key must be one plain name",
                    hint="the checkpoint is damaged or hostile: do not use it",
                )
        keys = [untrusted.check_name(str(k), where, kind="the tree key") for k in keys]
        stored = ".".join(keys)
        untrusted.check_name(stored, where)
        out["/".join(keys)] = stored
    return out


# The dtypes vitctl reads from zarr metadata: zarr v2 spellings ("<f4", byte order stripped) and zarr3 names ("float32").
ZARR_DTYPES = {
    **{d.str.lstrip("<>|="): d for d in ST_DTYPES.values() if d.kind != "V"},
    **{d.name: d for d in ST_DTYPES.values()},
}


def _stored_chunks(index: Mapping[str, Location]) -> dict[str, tuple[int, int]]:
    """{array: (stored chunks, their bytes)} of an OCDBT database, from its index."""
    out: dict[str, list[int]] = {}
    for key, where in index.items():
        array, _, chunk = key.partition("/")  # stored array names are one segment (_orbax_names)
        if not chunk or chunk.startswith(".") or chunk == "zarr.json":
            continue
        t = out.setdefault(array, [0, 0])
        t[0] += 1
        t[1] += len(where) if isinstance(where, bytes) else where[2] or 0
    return {k: (n, b) for k, (n, b) in out.items()}


def _chunk_file_tally(folder: Path) -> tuple[int, int]:
    """(chunk files, their bytes) of one array in the per-array layout."""
    n = nbytes = 0
    pending = [folder]
    while pending:
        with contextlib.suppress(OSError), os.scandir(pending.pop()) as entries:
            for e in entries:
                if e.is_dir():  # zarr3 (c/0/0) or a '/' dimension separator
                    pending.append(Path(e.path))
                elif not e.name.startswith(".") and e.name != "zarr.json" and e.is_file():
                    n, nbytes = n + 1, nbytes + e.stat().st_size
    return n, nbytes


def _array_metadata(
    params: Path,
    stored: str,
    name: str,
    zarr3: bool,
    index: Mapping[str, Location] | None,
    tally: tuple[int, int],
    every_chunk_stored: bool,
) -> dict[str, Any]:
    """The array's zarr metadata (.zarray, or zarr.json for zarr3), checked before tensorstore opens it:
    a known dtype, positive shape and chunks, no chunk larger than the array, and no more chunks
    than params/ stores for it. Returns the parsed JSON."""
    file = "zarr.json" if zarr3 else ".zarray"
    where = f"cannot read array '{name}' from {params}: {stored}/{file}"
    if index is not None:
        raw = index.get(f"{stored}/{file}")
        if not isinstance(raw, bytes):
            raise CheckpointError(f"{where} is missing from its OCDBT database", hint=_RECREATE)
    else:
        try:
            raw = (params / stored / file).read_bytes() if (params / stored / file).stat().st_size <= untrusted.JSON_MAX_BYTES else b"-"
        except OSError as e:
            raise CheckpointError(f"{where}: {e.strerror or e}", hint=_RECREATE) from None
    z = untrusted.parse_json(raw, where)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where} {what}", hint="the checkpoint is damaged or hostile: re-create or re-download it")

    if zarr3:
        grid = z.get("chunk_grid")
        chunks = (
            grid.get("configuration", {}).get("chunk_shape")
            if isinstance(grid, dict) and isinstance(grid.get("configuration"), dict)
            else None
        )
        shape, dtype_name = z.get("shape"), z.get("data_type")
    else:
        shape, chunks, dtype_name = z.get("shape"), z.get("chunks"), z.get("dtype")

    def ints(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v)

    if not ints(shape) or not ints(chunks) or len(shape) != len(chunks) or len(shape) > 32:
        raise bad(f"has no valid shape and chunks (shape {str(shape)[:100]}, chunks {str(chunks)[:100]})")
    if any(d < 1 for d in shape) or any(c < 1 for c in chunks):
        raise bad(f"declares shape {shape} with chunks {chunks}: every size must be positive")
    if any(c > d for c, d in zip(chunks, shape)):
        raise bad(f"declares chunks {chunks} larger than the array {shape}")
    dtype = ZARR_DTYPES.get(dtype_name.lstrip("<>|=")) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise bad(f"declares dtype {str(dtype_name)[:60]!r}, which vitctl does not read (known: {', '.join(sorted(ZARR_DTYPES))})")
    grid_chunks = math.prod(-(-d // c) for d, c in zip(shape, chunks))
    n_stored, stored_bytes = tally
    # Orbax stores every chunk (store_array_data_equal_to_fill_value), so a shape that needs more
    # chunks than are stored is a lie: it would list and read layers that hold nothing.
    if every_chunk_stored and grid_chunks > n_stored:
        nbytes = math.prod(shape) * dtype.itemsize
        raise bad(
            f"declares {dtype_name} {shape} ({nbytes:,} bytes) in {grid_chunks:,} chunks, but params/ stores {n_stored:,} chunks ({stored_bytes:,} bytes) for it"
        )
    return z


def choose_chunks(shape: tuple[int, ...], itemsize: int, max_bytes: int, stacked: bool) -> tuple[int, ...]:
    """A chunk shape that divides `shape`, holds at most max_bytes, and (stacked) one layer.

    Greedy like Orbax's subchunking: cut the layer axis to 1, then shrink the currently
    largest dimension to its next smaller divisor until the chunk fits.
    """
    chunks = [max(1, d) for d in shape]
    if stacked and chunks:
        chunks[0] = 1
    while math.prod(chunks) * itemsize > max_bytes and max(chunks, default=1) > 1:
        j = max(range(len(chunks)), key=lambda k: chunks[k])
        chunks[j] = next(d for d in range(chunks[j] - 1, 0, -1) if shape[j] % d == 0)
    return tuple(chunks)


class OrbaxWriter:
    """Writes params/ in Orbax's layout, one array or one layer slice at a time.

    `write` returns once tensorstore has copied the tensor; compression and storage run in
    the background, at most `max_inflight` tensors behind (memory: that many copies, plus
    their compressed bytes).

    Args:
        params: the params/ directory to create (its parent must exist).
        specs: every per-layer (name, shape, dtype) that will be written; `blocks/{i}/x`
            for i < L become slice i of the stacked array `blocks/x` with shape (L, ...).
        chunk_bytes: the largest stored chunk (checkpoint.CHUNK_BYTES).
        compress: zstd level 1 on each chunk, as Orbax's default.
    """

    max_inflight = 1  # 2 is ~10% faster on 2 cores but holds ~1.5 more tensors

    def __init__(self, params: str | Path, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], chunk_bytes: int, compress: bool = True):
        ts = _tensorstore()
        self.path = Path(params).absolute()
        self.files = [self.path.name + "/"]
        _guarded(self.path, "the directory", self.path.mkdir)
        self._arrays: dict[str, Any] = {}
        self._pending: set[str] = {n for n, _, _ in specs}
        self._inflight: collections.deque[tuple[str, Any]] = collections.deque()
        # No fsync per chunk (as cp): the checkpoint becomes visible only by the final rename.
        # No B-tree node cache: every commit adds a version, and cached nodes grew RSS with the
        # number of tensors written (by ~60 MiB over 1,000 tensors), for no speed gain.
        ctx = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 0}, "file_io_sync": False})
        arrays = _stack_specs(specs)
        self._names = sorted(arrays)
        opening = []
        try:
            for name, (shape, dtype) in arrays.items():
                chunks = choose_chunks(shape, np.dtype(dtype).itemsize, chunk_bytes, is_stacked(name))
                compressor = {"id": "zstd", "level": 1} if compress else None
                spec = {
                    "driver": "zarr", "dtype": np.dtype(dtype).name,
                    "kvstore": _kvstore(self.path, name.replace("/", "."), ocdbt=True, writing=True),
                    "metadata": {"shape": list(shape), "chunks": list(chunks), "compressor": compressor},
                }  # fmt: skip
                opening.append(ts.open(spec, create=True, context=ctx))
                self._arrays[name] = self._ts_call(f"array '{name}'", opening[-1].result)
        except BaseException:
            # An open that Ctrl-C or SIGTERM interrupted goes on creating its metadata in the
            # background: wait for it, so that nothing lands after the caller deletes the directory.
            _settle(opening)
            raise

    def _ts_call(self, what: str, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  (tensorstore reports write failures, disk full or EFBIG, as ValueError and others)
            raise CheckpointError(
                f"cannot write {what} to {self.path}: {str(e)[:500]}", hint="check the free disk space and the file size limit (ulimit -f)"
            ) from None

    def write(self, name: str, array: np.ndarray) -> None:
        stacked, i = split_layer(name)
        assert name in self._pending, f"'{name}' written twice or not planned"
        arr = self._arrays[stacked] if i is not None else self._arrays[name]
        target = arr[i] if i is not None else arr
        assert tuple(target.shape) == array.shape, (name, array.shape, tuple(target.shape))
        array = fastcopy.contiguous(array, np.dtype(target.dtype.numpy_dtype))  # any layout in; the planned dtype out
        futures = self._ts_call(f"tensor '{name}'", lambda: target.write(array))
        self._inflight.append((name, futures.commit))  # first: abort() must wait for it whatever interrupts us below
        self._ts_call(f"tensor '{name}'", futures.copy.result)  # `array` may be dropped from here on
        self._pending.discard(name)
        futures.commit.force()  # lazy until forced: start compressing and storing now
        while len(self._inflight) > self.max_inflight:  # compress and store in the background, a few tensors deep
            done, commit = self._inflight.popleft()
            self._ts_call(f"tensor '{done}'", commit.result)

    def close(self) -> None:
        assert not self._pending, f"tensors never written: {sorted(self._pending)[:8]}"
        while self._inflight:
            done, commit = self._inflight.popleft()
            self._ts_call(f"tensor '{done}'", commit.result)
        self._arrays.clear()
        _write_orbax_metadata(self.path, self._names, use_ocdbt=True)

    def abort(self) -> None:
        """Waits out the background writes, so none lands after the caller deletes the directory."""
        _settle([commit for _, commit in self._inflight])
        self._inflight.clear()
        self._arrays.clear()


def _settle(futures: Sequence[Any]) -> None:
    """Waits for tensorstore futures to finish, whatever their outcome. Not cancel(): a
    cancelled future returns before its write stops."""
    for future in futures:
        with contextlib.suppress(Exception):
            if hasattr(future, "force"):
                future.force()
            future.result()


_ZARR_DTYPE = {np.dtype(ml_dtypes.bfloat16): "bfloat16"}  # tensorstore's zarr v2 name (numpy's would be a void type)


def slab_chunks(shape: Sequence[int], itemsize: int, max_bytes: int, stacked: bool) -> tuple[int, ...]:
    """A zarr chunk shape (1, ..., 1, c, *shape[j + 1:]) dividing `shape`: every chunk is one run of
    the array's C-order bytes, at most max_bytes where one element row allows; stacked: one layer at most.

    The outermost axis j at which the rest fits is cut to its largest divisor c that fits.
    """
    shape = [max(1, int(d)) for d in shape]
    first = 1 if stacked else 0
    for j in range(first, len(shape)):
        inner = math.prod(shape[j + 1 :]) * itemsize
        if inner <= max_bytes or j == len(shape) - 1:
            c = max((d for d in range(1, shape[j] + 1) if shape[j] % d == 0 and d * inner <= max_bytes), default=1)
            return (1,) * j + (c, *shape[j + 1 :])
    return (1,) * len(shape)


def _chunk_runs(shape: Sequence[int], chunks: Sequence[int], itemsize: int) -> Iterator[tuple[str, int, int]]:
    """(zarr chunk key, byte start, byte stop) of every chunk of slab_chunks form, in C order of the array's bytes."""
    if not shape:
        yield "0", 0, itemsize
        return
    grid = [s // c for s, c in zip(shape, chunks)]
    nbytes = math.prod(chunks) * itemsize
    for k, index in enumerate(itertools.product(*map(range, grid))):
        yield ".".join(map(str, index)), k * nbytes, (k + 1) * nbytes


def _is_slab(shape: Sequence[int], chunks: Sequence[int]) -> bool:
    """Whether each chunk is one contiguous run of C-order bytes and the chunks tile the shape exactly."""
    if len(shape) != len(chunks) or any(c <= 0 or s % c for s, c in zip(shape, chunks)):
        return False
    cut = [a for a, (s, c) in enumerate(zip(shape, chunks)) if c != s]
    return not cut or all(chunks[a] == 1 for a in range(cut[-1]))  # (1, ..., 1, c, full, ..., full)


class OrbaxFilesWriter:
    """params/ in Orbax's one-directory-per-array layout (`use_ocdbt: false`, zarr v2), uncompressed,
    written with plain files: `params/<dotted name>/.zarray` and one file per chunk.

    Chunks are runs of C-order bytes (slab_chunks), so a tensor's bytes go to its chunk files
    block by block through a fastcopy.BlockWriter: laid out here, written by its thread,
    os.pwrite 512 KiB at a time. (tensorstore's OCDBT writer hands the kernel 16 MiB+ writes,
    each copied into large page-cache folios: 2-4x the CPU of small writes here; and it copies
    every tensor into its own buffers first.) Orbax restores this layout, and
    OrbaxReader reads it straight into its buffers.

    Args: as OrbaxWriter (no compression).
    """

    def __init__(self, params: str | Path, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], chunk_bytes: int):
        self.path = Path(params).absolute()
        self.files = [self.path.name + "/"]
        _guarded(self.path, "the directory", self.path.mkdir)
        self._pending: set[str] = {n for n, _, _ in specs}
        self._arrays = _stack_specs(specs)
        self._names = sorted(self._arrays)
        self._chunks: dict[str, tuple[int, ...]] = {}
        for name, (shape, dtype) in self._arrays.items():
            chunks = slab_chunks(shape, dtype.itemsize, chunk_bytes, is_stacked(name))
            self._chunks[name] = chunks
            zarray = {
                "chunks": list(chunks), "compressor": None, "dimension_separator": ".", "dtype": _ZARR_DTYPE.get(dtype, dtype.str),
                "fill_value": None, "filters": None, "order": "C", "shape": list(shape), "zarr_format": 2,
            }  # fmt: skip
            folder = self.path / name.replace("/", ".")
            _guarded(folder, "the array metadata", lambda f=folder, z=zarray: (f.mkdir(), (f / ".zarray").write_text(json.dumps(z))))
        self._blocks = fastcopy.BlockWriter()

    def write(self, name: str, array: np.ndarray) -> None:
        stacked, i = split_layer(name)
        key = stacked if i is not None else name
        assert name in self._pending, f"'{name}' written twice or not planned"
        shape, dtype = self._arrays[key]
        chunks = self._chunks[key]
        assert (shape[1:] if i is not None else shape) == array.shape, (name, array.shape, shape)
        folder = self.path / key.replace("/", ".")
        runs = _chunk_runs(shape, chunks, dtype.itemsize)
        if i is not None:  # this layer's runs, from the start of the layer
            layer = math.prod(shape[1:]) * dtype.itemsize
            runs = [(k, a - i * layer, b - i * layer) for k, a, b in runs if i * layer <= a < (i + 1) * layer]
        segments, label = [], (folder, f"tensor '{name}'")
        try:
            for k, a, b in runs:
                fd = _guarded(folder / k, f"tensor '{name}'", lambda p=folder / k: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
                segments.append((a, b, fd, 0))
            if array.size:
                _block_writes(lambda: self._blocks.write_segments(segments, array, dtype, label))
        finally:
            for _, _, fd, _ in segments:
                self._blocks.close_file(fd, label)
        self._pending.discard(name)

    def close(self) -> None:
        assert not self._pending, f"tensors never written: {sorted(self._pending)[:8]}"
        _block_writes(self._blocks.close)
        _write_orbax_metadata(self.path, self._names, use_ocdbt=False)

    def abort(self) -> None:
        """Stops the writing thread: no write lands after this returns."""
        self._blocks.abort()


def _write_orbax_metadata(path: Path, names: Iterable[str], use_ocdbt: bool) -> None:
    """params/_METADATA (the tree: dict keys, numpy leaves) and _CHECKPOINT_METADATA, as Orbax writes them."""
    tree = {str(tuple(name.split("/"))): _tree_entry(name) for name in names}
    meta = {
        "tree_metadata": tree,
        "use_ocdbt": use_ocdbt,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }
    now = time.time_ns()
    ckpt_meta = {
        "item_handlers": ORBAX_HANDLER,
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": now,
        "commit_timestamp_nsecs": now,
        "custom_metadata": {},
    }
    _guarded(path / METADATA, "the Orbax metadata", lambda: (path / METADATA).write_text(json.dumps(meta)))
    _guarded(path / CHECKPOINT_METADATA, "the Orbax metadata", lambda: (path / CHECKPOINT_METADATA).write_text(json.dumps(ckpt_meta)))


def _tree_entry(name: str) -> dict[str, Any]:
    """One _METADATA entry: the dict keys of the path (key_type 2) and a numpy leaf."""
    keys = [{"key": k, "key_type": 2} for k in name.split("/")]
    return {"key_metadata": keys, "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}


def _stack_specs(specs: Iterable[tuple[str, tuple[int, ...], np.dtype]]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-layer specs -> {array name: (shape, dtype)}, block layers stacked along a new leading axis."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    layers: dict[str, dict[int, tuple[tuple[int, ...], np.dtype]]] = {}
    for name, shape, dtype in specs:
        stacked, i = split_layer(name)
        if i is None:
            out[name] = (tuple(shape), np.dtype(dtype))
        else:
            layers.setdefault(stacked, {})[i] = (tuple(shape), np.dtype(dtype))
    for name, per_layer in layers.items():
        if sorted(per_layer) != list(range(len(per_layer))) or len(set(per_layer.values())) != 1:
            raise CheckpointError(
                f"cannot stack {name}: layers {sorted(per_layer)} with shapes/dtypes {sorted(set(map(str, per_layer.values())))}"
            )
        shape, dtype = per_layer[0]
        out[name] = ((len(per_layer), *shape), dtype)
    return out
