"""Copies and file I/O that dominate a conversion's time, behind a small door: re-laying out
tensors, reading file ranges, writing arrays.

numpy only (plus, where present, the BLAS that numpy ships), no torch or jax. The door:

- `contiguous(w, dtype)` (`copy_into(out, w)` for a given `out`): a view (a layout
  transform's transpose, a cast) as a C-contiguous array, bit-exact. A transposed view of a
  C-contiguous array (every layout transform of params.py except the conv kernel's is one)
  is one 2-D transpose, done with BLAS `?omatcopy` (OpenBLAS's blocked SIMD kernel; numpy
  copies a transposed view element by element) on COPY_THREADS threads (ctypes releases the
  GIL). `?omatcopy` computes alpha * a, which is exact for alpha = 1 except that it quiets a
  signalling NaN: a block holding any NaN is copied again by numpy. Other dtypes, casts and
  layouts go through numpy in 128x128 tiles (both sides stay in the cache).
- `scratch(shape, dtype)`: an uninitialised array, within `pooled()` (a conversion's run)
  from a small pool of reused buffers: a fresh large `np.empty` faults in and zeroes every
  page. A pooled buffer is handed out again only when no Python object refers to it any more
  (its refcount), so a caller never sees its array overwritten; the pool keeps at most
  `SCRATCH_FREE_BYTES`, and at most twice its largest buffer, of idle buffers.
- `mapped(pieces)`: file ranges as one read-only array that maps the page cache's pages (no
  copy; several page-aligned ranges joined with MAP_FIXED).
- `BlockWriter` (`write_array`, `iter_blocks`): arrays written into files block by block,
  each block re-laid out in a small cached buffer, on a background thread.
  `read_ahead(items)` produces a reader's tensors on a background thread.

Each trick has a plain path beside it that gives the same bytes (see TRICKS); the tests run
both.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import glob
import math
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from vitctl.background import Sink, produced

# The speed tricks, by name. Each has a plain path beside it that gives the same bytes:
#   blas        ?omatcopy transposes            plain: numpy copies in 128x128 tiles
#   threads     copies split over COPY_THREADS   plain: the caller's thread alone
#   map         mapped() maps the file's pages   plain: os.preadv into a new array (one piece; several: None)
#   pool        scratch() reuses idle buffers    plain: np.empty
#   writer      BlockWriter writes on a thread   plain: os.pwrite in the caller's thread
#   read_ahead  read_ahead() on a thread         plain: the items as they come
# $VITCTL_PLAIN (names, comma-separated, or "all") turns tricks off for a process, `plain()` within a block.
TRICKS = ("blas", "threads", "map", "pool", "writer", "read_ahead")
PLAIN_ENV = "VITCTL_PLAIN"


def _parse_plain(value: str) -> set[str]:
    names = {n.strip() for n in value.split(",") if n.strip()}
    if "all" in names:
        return set(TRICKS)
    unknown = names - set(TRICKS)
    if unknown:
        raise ValueError(f"${PLAIN_ENV}: unknown trick(s) {sorted(unknown)}; choose from all, {', '.join(TRICKS)}")
    return names


_plain: set[str] = _parse_plain(os.environ.get(PLAIN_ENV, ""))


def uses(trick: str) -> bool:
    """Whether `trick` (one of TRICKS) is on."""
    return trick not in _plain


@contextlib.contextmanager
def plain(*tricks: str) -> Iterator[None]:
    """Within the block, `tricks` (default: all) take their plain path."""
    global _plain
    was = _plain
    _plain = was | _parse_plain(",".join(tricks or ("all",)))
    try:
        yield
    finally:
        _plain = was


SCRATCH_MIN_BYTES = 1 << 20  # smaller arrays come from np.empty (malloc reuses them anyway)
SCRATCH_FREE_BYTES = 256 << 20  # idle pooled bytes kept, at most (and at most 2 of the largest buffer); the oldest go first
COPY_THREADS = min(2, os.cpu_count() or 1)
BLOCK_BYTES = 2 << 20  # iter_blocks: rows copied per block (fits in the L3 cache)
# Bytes per os.pwrite. Linux (6.x, ext4 with large folios) allocates page-cache folios as large
# as the write, and high-order pages cost several times more CPU per GB than the 128-512 KiB
# writes cp makes.
WRITE_BYTES = 512 << 10
_TILE = 128


class _Pool:
    def __init__(self):
        self._lock = threading.Lock()
        self._buffers: list[np.ndarray] = []  # flat uint8 bases, oldest first

    def get(self, nbytes: int) -> np.ndarray:
        """An idle buffer of at least `nbytes` (the smallest that fits; its first `nbytes`), else a new one."""
        with self._lock:
            best = None
            for k in range(len(self._buffers)):  # (not enumerate: its cached tuple holds a reference)
                b = self._buffers[k]
                # 3 = the list, `b` and getrefcount's argument: no array views it now.
                if b.nbytes >= nbytes and sys.getrefcount(b) == 3 and (best is None or b.nbytes < self._buffers[best].nbytes):
                    best = k
                del b
            if best is not None:
                b = self._buffers.pop(best)
                self._buffers.append(b)  # most recently used last
            else:
                b = np.empty(nbytes, np.uint8)
                self._buffers.append(b)
            self._trim()  # `b` is referenced here, so not idle
            return b[:nbytes]

    def _trim(self) -> None:
        idle = [b for b in self._buffers if sys.getrefcount(b) == 3]  # list, `b`, the call's argument
        limit = min(SCRATCH_FREE_BYTES, 2 * max((b.nbytes for b in self._buffers), default=0))
        excess = sum(b.nbytes for b in idle) - limit
        for b in idle:  # oldest first
            if excess <= 0:
                break
            excess -= b.nbytes
            self._buffers = [x for x in self._buffers if x is not b]

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


_POOL = _Pool()


_active = 0  # depth of `pooled()` blocks (the pool is used only inside one)


def scratch(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array: inside `pooled()` and when large, a reused buffer."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if not _active or nbytes < SCRATCH_MIN_BYTES or not uses("pool"):
        return np.empty(shape, dtype)
    return _POOL.get(nbytes).view(dtype).reshape(shape)


@contextlib.contextmanager
def pooled() -> Iterator[None]:
    """Within the block, `scratch` reuses buffers; at its end the pool lets go of them all."""
    global _active
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        if not _active:
            _POOL.clear()


# BLAS ?omatcopy from the OpenBLAS that numpy's wheels bundle (symbol names by build).
_OMATCOPY_SYMBOLS = (  # (float32 symbol, float64 symbol, integer type)
    ("scipy_cblas_somatcopy64_", "scipy_cblas_domatcopy64_", ctypes.c_int64),  # numpy >= 2 wheels (ILP64)
    ("cblas_somatcopy64_", "cblas_domatcopy64_", ctypes.c_int64),
    ("cblas_somatcopy", "cblas_domatcopy", ctypes.c_int),
)
_ROW_MAJOR, _TRANS = 101, 112


@functools.cache
def _omatcopy() -> dict[np.dtype, Callable] | None:
    """{float32: fn, float64: fn}, fn(rows, cols, a_ptr, lda, b_ptr, ldb) writing b = a.T; None without one."""
    here = os.path.dirname(np.__file__)
    libs = sorted(glob.glob(os.path.join(here, "..", "numpy.libs", "*openblas*")))
    libs += sorted(glob.glob(os.path.join(here, ".dylibs", "*openblas*")))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for s_name, d_name, int_t in _OMATCOPY_SYMBOLS:
            fns = {}
            for dtype, name, scalar in ((np.float32, s_name, ctypes.c_float), (np.float64, d_name, ctypes.c_double)):
                fn = getattr(lib, name, None)
                if fn is None:
                    break
                fn.restype = None
                fn.argtypes = [ctypes.c_int, ctypes.c_int, int_t, int_t, scalar, ctypes.c_void_p, int_t, ctypes.c_void_p, int_t]
                fns[np.dtype(dtype)] = functools.partial(_call, fn)
            if len(fns) == 2:
                return fns
    return None


def _call(fn, rows: int, cols: int, a: int, lda: int, b: int, ldb: int) -> None:
    fn(_ROW_MAJOR, _TRANS, rows, cols, 1.0, a, lda, b, ldb)


def _as_transpose(w: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(C-contiguous base of shape w.shape[k:] + w.shape[:k], k) if w is base's transposed view, else None.

    Then out = C-contiguous w is, flattened to 2-D, base.reshape(B, A).T with A = prod(w.shape[:k]).
    """
    for k in range(1, w.ndim):
        base = w.transpose(*range(k, w.ndim), *range(k))
        if base.flags.c_contiguous:
            return base, k
    return None


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="vitctl-copy")


def _blas_plan(w: np.ndarray) -> tuple[Callable[[np.ndarray, int, int], None], int, int] | None:
    """(copy, A, align) if `w` is a transposed view of a C-contiguous array of 2, 4 or 8-byte
    elements that ?omatcopy can move, else None.

    Flattened, C-contiguous w is a 2-D (A, B) matrix, the transpose of its base's (B, A);
    copy(out, lo, hi) writes rows lo:hi (multiples of `align`, or hi = A) of that matrix into
    C-contiguous `out`, exactly: block by block with ?omatcopy, each block checked for NaN
    while it is still in the cache (?omatcopy computes 1.0 * a, which quiets a signalling
    NaN) and, if it holds one, copied again by numpy. float32 and float64 move as they are;
    2-byte elements (bfloat16, float16) move as float32 pairs of adjacent base columns, which
    land as pairs of output rows and are then de-interleaved in the cache (by SIMD casts, about
    twice as fast as strided copies).
    """
    fns = _omatcopy() if uses("blas") else None
    pairs = w.dtype.itemsize == 2 and sys.byteorder == "little"
    if fns is None or w.size == 0 or not (pairs or w.dtype in fns):
        return None
    t = _as_transpose(w)
    if t is None:
        return None
    base, k = t
    A, B = math.prod(w.shape[:k]), math.prod(w.shape[k:])
    if pairs and A % 2:
        return None
    view = base.reshape(B, A).T  # (A, B): row r of `w`, flattened
    if pairs:
        return _pair_copy(fns[np.dtype(np.float32)], base.ctypes.data, view, A, B), A, 2
    fn, isz, a_ptr = fns[w.dtype], w.dtype.itemsize, base.ctypes.data
    step = max(1, BLOCK_BYTES // (B * isz))

    def copy(out: np.ndarray, lo: int, hi: int) -> None:  # rows lo:hi = base columns lo:hi
        assert out.flags.c_contiguous and out.size == (hi - lo) * B and out.dtype == w.dtype
        flat = out.reshape(hi - lo, B)
        for r in range(lo, hi, step):
            e = min(r + step, hi)
            block = flat[r - lo : e - lo]
            fn(B, e - r, a_ptr + r * isz, A, block.ctypes.data, B)
            if np.isnan(block.max()):  # rare: keep every NaN's bits
                _tile_copy(block, view[r:e])

    return copy, A, 1


_local = threading.local()


def _pair_copy(fn: Callable, a_ptr: int, view: np.ndarray, A: int, B: int) -> Callable[[np.ndarray, int, int], None]:
    """copy(out, lo, hi) for 2-byte elements (see _blas_plan): base viewed as (B, A/2) float32
    pairs; rows lo:hi of the (A, B) matrix are pair rows lo/2:hi/2 of its transpose, de-interleaved."""
    step = max(1, BLOCK_BYTES // (B * 8))  # pair rows per block: two output rows each

    def copy(out: np.ndarray, lo: int, hi: int) -> None:
        assert out.flags.c_contiguous and out.size == (hi - lo) * B and lo % 2 == 0 and hi % 2 == 0
        flat = out.reshape(hi - lo, B).view(np.uint16)
        buf = getattr(_local, "pairs", None)
        if buf is None or buf.size < 2 * step * B:
            buf = _local.pairs = np.empty(2 * step * B, np.uint32)
        for p in range(lo // 2, hi // 2, step):
            q = min(p + step, hi // 2)
            block, high = buf[: (q - p) * B].reshape(q - p, B), buf[step * B : (step + q - p) * B].reshape(q - p, B)
            fn(B, q - p, a_ptr + p * 4, A // 2, block.ctypes.data, B)
            rows = flat[2 * p - lo : 2 * q - lo]
            if np.isnan(block.view(np.float32).max()):  # a pair whose bits are a float32 NaN: numpy keeps them
                _tile_copy(rows, view[2 * p : 2 * q].view(np.uint16))
                continue
            # De-interleaved by SIMD casts (a uint32 -> uint16 cast keeps the low half): 2x strided copies.
            pair_rows = rows.reshape(q - p, 2, B)
            np.copyto(pair_rows[:, 0], block, casting="unsafe")
            np.right_shift(block, 16, out=high)
            np.copyto(pair_rows[:, 1], high, casting="unsafe")

    return copy


def _blas_transpose(out: np.ndarray, w: np.ndarray, threads: bool = True) -> bool:
    """out[...] = w with ?omatcopy (see _blas_plan); False if that does not apply."""
    plan = _blas_plan(w) if w.dtype == out.dtype else None
    if plan is None:
        return False
    copy, A, align = plan
    flat = out.reshape(A, -1)
    parts = min(COPY_THREADS, max(1, w.nbytes // (4 << 20)), A // align) if threads and uses("threads") else 1
    bounds = [A * p // parts // align * align for p in range(parts)] + [A]
    if parts <= 1:
        copy(flat, 0, A)
    else:
        list(_pool().map(lambda lo, hi: copy(flat[lo:hi], lo, hi), bounds[:-1], bounds[1:]))
    return True


def _tile_copy(out: np.ndarray, w: np.ndarray) -> None:
    """out[...] = w for 2-D arrays, in 128x128 tiles (numpy copies a transposed view element by
    element across the whole source; tiles keep both sides in the cache)."""
    for i in range(0, w.shape[0], _TILE):
        for j in range(0, w.shape[1], _TILE):
            out[i : i + _TILE, j : j + _TILE] = w[i : i + _TILE, j : j + _TILE]


def iter_blocks(
    w: np.ndarray, dtype: np.dtype, block_bytes: int = BLOCK_BYTES, buffers: Callable[[int], np.ndarray] | None = None
) -> Iterator[tuple[int, memoryview]]:
    """(byte offset, bytes) of C-contiguous `w` cast to `dtype`, in order, a block at a time.

    A C-contiguous `w` of `dtype` is handed out in place. Otherwise each block of rows is
    copied into a small buffer (it stays in the CPU cache until the caller has written it
    out): with BLAS for a transposed view (rows of its 2-D form, see _blas_plan), else numpy
    (rows of `w`). One reused buffer, valid until the next block is requested, or, with
    `buffers`, `buffers(nbytes)` for each block (a uint8 array the caller owns).
    """
    dtype = np.dtype(dtype)
    if w.ndim < 2 or (w.flags.c_contiguous and w.dtype == dtype):
        flat = memoryview(np.ascontiguousarray(w, dtype).reshape(-1).view(np.uint8))
        for lo in range(0, len(flat), block_bytes):
            yield lo, flat[lo : lo + block_bytes]
        return
    blas = _blas_plan(w) if w.dtype == dtype else None
    copy, n, align = blas if blas is not None else (None, w.shape[0], 1)
    row_shape = (w.size // n,) if blas is not None else w.shape[1:]
    row_bytes = math.prod(row_shape) * dtype.itemsize
    rows = max(align, block_bytes // max(row_bytes, 1) // align * align)
    shared = None if buffers else np.empty(min(rows, n) * row_bytes, np.uint8)
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        raw = shared[: (hi - lo) * row_bytes] if shared is not None else buffers((hi - lo) * row_bytes)
        out = raw.view(dtype).reshape(hi - lo, *row_shape)
        if copy is not None:
            copy(out, lo, hi)
        else:
            copy_into(out, w[lo:hi], threads=False)
        yield lo * row_bytes, memoryview(raw)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite of `data` at `offset`, WRITE_BYTES per call."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + WRITE_BYTES], offset + done)


def write_array(fd: int, offset: int, w: np.ndarray, dtype: np.dtype) -> int:
    """Writes C-contiguous `w` cast to `dtype` at `offset` of file `fd` (os.pwrite, block by block); returns the bytes written."""
    for off, block in iter_blocks(w, dtype):
        _pwrite_all(fd, block, offset + off)
    return w.size * np.dtype(dtype).itemsize


class WriteFailed(Exception):
    """An os.pwrite of BlockWriter's thread failed: `label` is what the caller named the write, `error` the OSError."""

    def __init__(self, label: Any, error: OSError):
        super().__init__(f"{label}: {error}")
        self.label, self.error = label, error


class BlockWriter:
    """Writes arrays into files on one background thread, while the caller lays out the next blocks.

    `write(fd, offset, w, dtype, label)` returns once every block of `w` (cast to `dtype`,
    C order) is queued: a re-laid-out block sits in one of a few reused `block_bytes` buffers,
    a C-contiguous `w` of `dtype` is queued in place, as slices that hold a reference to it
    (a pooled buffer is not handed out again before it is written). `write_segments` spreads
    the bytes over several files (zarr chunk files). At most `depth` pieces are queued;
    writing waits for room. One thread does every os.pwrite: two writers into one file only
    contend for its inode lock.
    A failed write is raised as WriteFailed by the next call or by `flush`; after it, the
    thread writes nothing more. `close()` flushes and stops the thread; `abort()` stops it
    without writing what is still queued, and returns only when no write is in progress.
    """

    def __init__(self, block_bytes: int = BLOCK_BYTES, depth: int = 8):
        self.block_bytes, self.depth = block_bytes, depth
        self._free: list[np.ndarray] = []  # idle block buffers
        self._free_ready = threading.Condition()
        self._made = 0
        self._sink = Sink(self._write, depth, self._drop, name="vitctl-write", threaded=uses("writer"))

    @property
    def _thread(self) -> Sink:
        """What writes (is_alive(): a write may still be in progress)."""
        return self._sink

    def _buffer(self, nbytes: int) -> np.ndarray:
        """A block buffer: a new one while at most depth + 1 exist, else the next one the thread frees."""
        with self._free_ready:
            if not self._free and self._made <= self.depth:
                self._made += 1
                return np.empty(self.block_bytes, np.uint8)[:nbytes]
            while not self._free:
                self._free_ready.wait()
            return self._free.pop()[:nbytes]

    def _release(self, buf: np.ndarray | None) -> None:
        if buf is not None:
            with self._free_ready:
                self._free.append(buf.base if buf.base is not None else buf)
                self._free_ready.notify()

    def _write(self, item: tuple) -> None:
        fd, offset, data, buf, label = item
        try:
            if data is None:  # closing a file
                os.close(fd)
            else:
                _pwrite_all(fd, data, offset)
        except OSError as e:
            raise WriteFailed(label, e) from None
        finally:
            del data, item
            self._release(buf)

    def _drop(self, item: tuple) -> None:
        """After a failure or abort: files are still closed, buffers handed back, nothing written."""
        fd, _, data, buf, _ = item
        if data is None:
            with contextlib.suppress(OSError):
                os.close(fd)
        del data, item
        self._release(buf)

    def write(self, fd: int, offset: int, w: np.ndarray, dtype: np.dtype, label: Any = "") -> int:
        """Queues `w` cast to `dtype` for writing at `offset` of `fd`; returns its byte count."""
        nbytes = w.size * np.dtype(dtype).itemsize
        return self.write_segments([(0, nbytes, fd, offset)], w, dtype, label)

    def write_segments(self, segments: list[tuple[int, int, int, int]], w: np.ndarray, dtype: np.dtype, label: Any = "") -> int:
        """Queues the bytes of `w` cast to `dtype` (C order) spread over files: each segment
        (start, stop, fd, file offset) takes bytes start:stop; in order, covering them all."""
        dtype = np.dtype(dtype)
        nbytes = w.size * dtype.itemsize
        assert segments[0][0] == 0 and segments[-1][1] == nbytes, (segments[:1], segments[-1:], nbytes)
        in_place = w.ndim < 2 or (w.flags.c_contiguous and w.dtype == dtype)
        k = 0
        for off, block in iter_blocks(w, dtype, block_bytes=self.block_bytes, buffers=None if in_place else self._buffer):
            pos, end = off, off + len(block)
            while pos < end:
                while segments[k][1] <= pos:
                    k += 1
                start, stop, fd, file_offset = segments[k]
                cut = min(end, stop)
                last = cut == end
                self._sink.put(
                    (fd, file_offset + pos - start, block[pos - off : cut - off], block.obj if last and not in_place else None, label)
                )
                pos = cut
        self._sink.check()
        return nbytes

    def close_file(self, fd: int, label: Any = "") -> None:
        """Queues closing `fd` after what is queued for it."""
        self._sink.put((fd, 0, None, None, label), check=False)

    def flush(self) -> None:
        """Returns when everything queued is written; raises WriteFailed if a write failed."""
        self._sink.flush()

    def close(self) -> None:
        self._sink.close()

    def abort(self) -> None:
        self._sink.abort()


def read_ahead(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """The items of `items`, produced on a background thread up to `depth` ahead of the consumer
    (a reader's positioned reads and checksums run while the caller re-lays out the previous
    tensor). An exception of the producer is raised here, in order; closing this generator
    (or an exception in the consumer) stops the producer after its current item and waits for it."""
    if not uses("read_ahead"):
        return iter(items)
    return produced(items, depth, name="vitctl-read-ahead")


# Mapped reads. A tensor read through the page cache's own pages costs no copy: pread into a
# buffer larger than the CPU cache copies at DRAM speed, about as long as the transpose that
# follows, and the buffer adds to the peak memory; the transpose reads a mapping as fast.
_MADV_POPULATE_READ = 22  # Linux >= 5.14: page tables filled in one call (else on first touch)
_PAGE = mmap.PAGESIZE


def mapped(pieces: list[tuple[int, int, int]]) -> np.ndarray | None:
    """The bytes of the file ranges `pieces` ((fd, offset, length), in order) as one read-only
    uint8 array that maps them: nothing is copied, and the mapping goes away with the last
    view of the array. None when they cannot be mapped as one range: several pieces need
    Linux, offsets on page boundaries and whole pages but for the last piece.

    The files must not shrink while the array lives (a read past a file's end is SIGBUS);
    the caller checks their sizes first. Page tables are filled here, so that the thread that
    maps (a reader thread) takes the page faults, not the one that reads the array.
    """
    if not uses("map"):
        return _read(pieces[0]) if len(pieces) == 1 else None
    if len(pieces) == 1:
        fd, offset, length = pieces[0]
        if not length:
            return np.empty(0, np.uint8)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(fd, offset + length - start, access=mmap.ACCESS_READ, offset=start)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            m.madvise(_MADV_POPULATE_READ)
        return np.frombuffer(m, np.uint8, length, offset - start)
    libc = _libc()
    if libc is None or any(off % _PAGE for _, off, _ in pieces) or any(n % _PAGE for _, _, n in pieces[:-1]):
        return None
    total = sum(n for _, _, n in pieces)
    region = mmap.mmap(-1, total)  # reserves the addresses (freed with the last view of the array)
    view = (ctypes.c_char * total).from_buffer(region)  # (keeps `region` alive)
    at = ctypes.addressof(view)
    for fd, offset, length in pieces:
        if libc.mmap(at, length, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, offset) != at:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        at += length
    libc.madvise(ctypes.addressof(view), total, _MADV_POPULATE_READ)  # (an error only leaves the faults)
    out = np.frombuffer(view, np.uint8)
    out.flags.writeable = False  # (the pages are mapped read-only)
    return out


_MAP_FIXED = 0x10


def _read(piece: tuple[int, int, int]) -> np.ndarray:
    """The bytes of one file range, read into a new read-only array (mapped's plain path)."""
    fd, offset, length = piece
    out = np.empty(length, np.uint8)
    done = 0
    while done < length:
        n = os.preadv(fd, [memoryview(out)[done:]], offset + done)
        if n == 0:
            raise OSError(f"file ended {length - done} bytes short of {offset + length}")
        done += n
    out.flags.writeable = False
    return out


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def copy_into(out: np.ndarray, w: np.ndarray, threads: bool = True) -> None:
    """out[...] = w (cast to out.dtype, rounding to nearest even), `out` C-contiguous; bit-exact."""
    assert out.flags.c_contiguous and out.shape == w.shape, (out.shape, w.shape)
    if w.ndim < 2 or w.flags.c_contiguous:
        out[...] = w
        return
    if _blas_transpose(out, w, threads):
        return
    cols = w.shape[1]

    def copy_rows(lo: int, hi: int) -> None:
        for i in range(lo, hi, _TILE):
            r = slice(i, min(i + _TILE, hi))
            for j in range(0, cols, _TILE):
                c = slice(j, j + _TILE)
                out[r, c] = w[r, c]

    parts = min(COPY_THREADS, max(1, w.nbytes // (4 << 20)), w.shape[0] // _TILE or 1) if threads and uses("threads") else 1
    bounds = [w.shape[0] * k // parts // _TILE * _TILE for k in range(parts)] + [w.shape[0]]
    if parts == 1:
        copy_rows(0, w.shape[0])
    else:
        list(_pool().map(copy_rows, bounds[:-1], bounds[1:]))


def contiguous(w: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`w` as a C-contiguous array of `dtype` (w itself if it already is one), in a scratch buffer."""
    dtype = np.dtype(dtype)
    if w.flags.c_contiguous and w.dtype == dtype:
        return w
    out = scratch(w.shape, dtype)
    copy_into(out, w)
    return out
