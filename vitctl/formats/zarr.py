"""zarr v2 arrays as Orbax stores them: chunk shapes, metadata checks, and reading uncompressed
chunks straight from their files, without tensorstore's decoder.

Where each chunk lies comes from a `locate(key)` function: a chunk file of Orbax's
one-directory-per-array layout (`params/<array>/<i.j.k>`), or a value in the data files of an
OCDBT database (vitctl.formats.orbax lists them from its B-tree). Chunks that are runs of the
array's bytes (slabs) are mapped into one array in order (fastcopy.mapped: no copy); others are
read in place (os.preadv, one iovec per chunk row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from vitctl import untrusted
from vitctl.errors import CheckpointError
from vitctl.formats import fastcopy
from vitctl.formats.fastcopy import scratch
from vitctl.formats.safetensors import ST_DTYPES

# Where one stored chunk lies: (file, byte offset, byte length or None for "the whole file"), or its
# bytes when the OCDBT B-tree holds them inline. None: not stored.
Location = tuple[Path, int, int | None] | bytes
_IOV_MAX = 1024  # iovecs per os.preadv (Linux's UIO_MAXIOV)
DIRECT_RUN_BYTES = 16 << 10  # chunk rows at least this long are read straight into place; shorter ones via a copy
RECREATE = "the Orbax checkpoint is truncated or corrupt: re-create it"
ZARR_NAMES = {np.dtype(ml_dtypes.bfloat16): "bfloat16"}  # tensorstore's zarr v2 name (numpy's would be a void type)
# The dtypes vitctl reads from zarr metadata: zarr v2 spellings ("<f4", byte order stripped) and zarr3 names ("float32").
ZARR_DTYPES = {
    **{d.str.lstrip("<>|="): d for d in ST_DTYPES.values() if d.kind != "V"},
    **{d.name: d for d in ST_DTYPES.values()},
}


_PLAIN_DTYPES = frozenset(ST_DTYPES.values())  # what PlainArray reads (tensorstore reads the rest)


# Chunk shapes.
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


def chunk_runs(shape: Sequence[int], chunks: Sequence[int], itemsize: int) -> Iterator[tuple[str, int, int]]:
    """(zarr chunk key, byte start, byte stop) of every chunk of slab_chunks form, in C order of the array's bytes."""
    if not shape:
        yield "0", 0, itemsize
        return
    grid = [s // c for s, c in zip(shape, chunks)]
    nbytes = math.prod(chunks) * itemsize
    for k, index in enumerate(itertools.product(*map(range, grid))):
        yield ".".join(map(str, index)), k * nbytes, (k + 1) * nbytes


def is_slab(shape: Sequence[int], chunks: Sequence[int]) -> bool:
    """Whether each chunk is one contiguous run of C-order bytes and the chunks tile the shape exactly."""
    if len(shape) != len(chunks) or any(c <= 0 or s % c for s, c in zip(shape, chunks)):
        return False
    cut = [a for a, (s, c) in enumerate(zip(shape, chunks)) if c != s]
    return not cut or all(chunks[a] == 1 for a in range(cut[-1]))  # (1, ..., 1, c, full, ..., full)


# Reading uncompressed chunks in place.
@dataclasses.dataclass(frozen=True)
class PlainArray:
    """An uncompressed zarr v2 array (C order, no filters, no fill value) whose chunks tile its shape,
    read without tensorstore: every chunk's rows go from the file straight to their place in the
    caller's buffer (one os.preadv per chunk), so the bytes are copied once, by the kernel.

    `locate(key)` says where the chunk with zarr key `key` ("i.j.k") lies: chunk files of the
    per-array layout, or values in the data files of an OCDBT database (orbax._ocdbt_index).
    """

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    locate: Callable[[str], Location | None]

    @classmethod
    def parse(cls, z: Mapping[str, Any], locate: Callable[[str], Location | None]) -> PlainArray | None:
        """The array that `.zarray` (checked by array_metadata) describes if it has that form (else None: tensorstore reads it)."""
        try:
            dtype = {v: k for k, v in ZARR_NAMES.items()}.get(z["dtype"]) or np.dtype(z["dtype"])
            shape, chunks = tuple(int(d) for d in z["shape"]), tuple(int(c) for c in z["chunks"])
        except (ValueError, KeyError, TypeError):
            return None  # tensorstore names what is wrong
        plain = z.get("compressor") is None and z.get("filters") is None and z.get("order", "C") == "C" and z.get("zarr_format") == 2
        plain = plain and z.get("fill_value") is None and z.get("dimension_separator", ".") == "."
        tiles = len(shape) == len(chunks) and all(c > 0 and s % c == 0 for s, c in zip(shape, chunks)) and 0 not in shape
        ok = plain and tiles and dtype.byteorder in "=<|" and dtype in _PLAIN_DTYPES
        return cls(shape, chunks, dtype, locate) if ok else None

    def read(self, layer: int | None, name: str, files: OpenFiles) -> np.ndarray:
        """The array, or layer `layer` of it (chunks[0] must then be 1), C-contiguous.

        When its chunks are runs of its bytes (slabs) stored in files, page-aligned, the result
        maps them in order (fastcopy.mapped: read-only, no copy); else it is a new array that
        each chunk is read into in place."""
        shape, chunks, prefix = self.shape, self.chunks, ""
        if layer is not None:
            assert chunks[0] == 1, (name, chunks)
            shape, chunks, prefix = shape[1:], chunks[1:], f"{layer}."
        nbytes = math.prod(chunks) * self.dtype.itemsize
        with contextlib.ExitStack() as opened:
            if shape and is_slab(shape, chunks):
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

    def _read_into(self, out, shape, chunks, prefix: str, name: str, files: OpenFiles, opened: contextlib.ExitStack) -> None:
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
        direct = run >= DIRECT_RUN_BYTES or len(rows) == 1
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

    def _read_chunk(self, key: str, views: list[memoryview], name: str, files: OpenFiles, opened: contextlib.ExitStack) -> None:
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
            raise CheckpointError(f"cannot read tensor '{name}' from {files.path(fd)}: {e.strerror or e}", hint=RECREATE) from None
        if not complete:
            raise CheckpointError(f"cannot read tensor '{name}' from {files.path(fd)}: the file ended inside chunk {key}", hint=RECREATE)

    def _open_chunk(self, key: str, nbytes: int, name: str, files: OpenFiles, opened: contextlib.ExitStack) -> tuple[int, int] | bytes:
        """(fd, offset) of chunk `key`'s `nbytes` bytes, checked to lie inside their file, or its inline value."""
        where = self.locate(key)
        if isinstance(where, bytes):
            if len(where) != nbytes:
                raise CheckpointError(f"cannot read tensor '{name}': chunk {key} holds {len(where)} bytes, not {nbytes}", hint=RECREATE)
            return where
        if where is None:
            raise CheckpointError(f"cannot read tensor '{name}': chunk {key} is not stored", hint=RECREATE)
        path, offset, length = where
        if length is None:  # a chunk file (per-array layout): each is read once
            fd, size = opened.enter_context(files.opened(path, name, "chunk file"))
            if size != nbytes:
                raise CheckpointError(
                    f"cannot read tensor '{name}' from {path}: the chunk file holds {size} bytes, not {nbytes}", hint=RECREATE
                )
            return fd, 0
        fd, size = files.open(path, name, "data file")  # an OCDBT data file: kept open, it holds many chunks
        if length != nbytes or offset + length > size:
            what = (
                f"holds {length} bytes, not {nbytes}"
                if length != nbytes
                else f"ends at byte {offset + length}, past the end of the file ({size} bytes)"
            )
            raise CheckpointError(f"cannot read tensor '{name}' from {path}: chunk {key} {what}", hint=RECREATE)
        return fd, offset


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


class OpenFiles:
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
            raise CheckpointError(f"cannot read tensor '{name}': {what} {path} is missing", hint=RECREATE) from None
        except OSError as e:
            raise CheckpointError(f"cannot read tensor '{name}' from {path}: {e.strerror or e}", hint=RECREATE) from None
        self._paths[fd] = path
        return fd, os.fstat(fd).st_size

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._paths.clear()


def chunk_files(folder: Path) -> Callable[[str], Location]:
    """Chunk key -> its file in the per-array layout (`params/<array>/<key>`)."""
    return lambda key: (folder / key, 0, None)


# Metadata checks.
def stored_chunks(index: Mapping[str, Location]) -> dict[str, tuple[int, int]]:
    """{array: (stored chunks, their bytes)} of an OCDBT database, from its index."""
    out: dict[str, list[int]] = {}
    for key, where in index.items():
        array, _, chunk = key.partition("/")  # stored array names are one segment (orbax.orbax_names)
        if not chunk or chunk.startswith(".") or chunk == "zarr.json":
            continue
        t = out.setdefault(array, [0, 0])
        t[0] += 1
        t[1] += len(where) if isinstance(where, bytes) else where[2] or 0
    return {k: (n, b) for k, (n, b) in out.items()}


def chunk_file_tally(folder: Path) -> tuple[int, int]:
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


def array_metadata(
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
    than params/ stores for it (`tally`: stored chunks and their bytes). Returns the parsed JSON."""
    file = "zarr.json" if zarr3 else ".zarray"
    where = f"cannot read array '{name}' from {params}: {stored}/{file}"
    if index is not None:
        raw = index.get(f"{stored}/{file}")
        if not isinstance(raw, bytes):
            raise CheckpointError(f"{where} is missing from its OCDBT database", hint=RECREATE)
    else:
        try:
            raw = (params / stored / file).read_bytes() if (params / stored / file).stat().st_size <= untrusted.JSON_MAX_BYTES else b"-"
        except OSError as e:
            raise CheckpointError(f"{where}: {e.strerror or e}", hint=RECREATE) from None
    z = untrusted.parse_json(raw, where)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where} {what}", hint="the checkpoint is damaged or hostile: re-create or re-download it")

    shape, chunks, dtype_name = _declared(z, zarr3)

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


def _declared(z: Mapping[str, Any], zarr3: bool) -> tuple[Any, Any, Any]:
    """(shape, chunks, dtype name) as zarr metadata declares them, unchecked."""
    if not zarr3:
        return z.get("shape"), z.get("chunks"), z.get("dtype")
    grid = z.get("chunk_grid")
    config = grid.get("configuration") if isinstance(grid, dict) else None
    return z.get("shape"), config.get("chunk_shape") if isinstance(config, dict) else None, z.get("data_type")
