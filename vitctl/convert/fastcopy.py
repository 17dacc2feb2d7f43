"""Copies that dominate a conversion's CPU time, made cheap: transposes and fresh buffers.

numpy only (plus, where present, the BLAS that numpy ships), no torch or jax.

- `scratch(shape, dtype)`: an uninitialised array from a small pool of reused buffers. A
  fresh 64 MiB `np.empty` costs 16,384 page faults, each zeroing a page: in `perf` profiles
  of `vitctl convert` the kernel's page zeroing was 10-20% of all CPU time. A pooled buffer
  is handed out again only when no Python object refers to it any more (its refcount), so a
  caller can never see its array overwritten; the pool keeps at most `SCRATCH_FREE_BYTES`,
  and at most twice its largest buffer, of idle buffers (counted in convert's memory estimate), and only within `pooled()` (a
  conversion's run): elsewhere `scratch` is `np.empty`.
- `copy_into(out, w)`: `out[...] = w` for a C-contiguous `out`, bit-exact. When `w` is a
  transposed view of a C-contiguous array (every layout transform of mapping.py except the
  conv kernel's is one), it is one 2-D transpose, done with BLAS `?omatcopy` (OpenBLAS's
  blocked SIMD kernel: 2.5-2.9 GB per CPU-second here vs 0.7-0.8 for numpy's strided copy
  in 128x128 tiles) on two threads (ctypes releases the GIL). `?omatcopy` computes
  alpha * a, which is exact for alpha = 1 except that it quiets a signalling NaN; a source
  holding any NaN takes numpy's copy instead (checked with one `max` over the contiguous
  source: ~12 GB per CPU-second). Other dtypes (bfloat16, float16), casts and layouts
  without a BLAS copy go through numpy in 128x128 tiles (numpy copies a transposed view
  element by element across the whole source, ~100 MB/s; tiles keep both sides in cache).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import glob
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np

SCRATCH_MIN_BYTES = 1 << 20  # smaller arrays come from np.empty (malloc reuses them anyway)
SCRATCH_FREE_BYTES = 256 << 20  # idle pooled bytes kept, at most (and at most 2 of the largest buffer); the oldest go first
COPY_THREADS = min(2, os.cpu_count() or 1)
BLOCK_BYTES = 2 << 20  # iter_blocks: rows copied per block (fits in a core's L2 cache)
_TILE = 128


class _Pool:
    def __init__(self):
        self._lock = threading.Lock()
        self._buffers: list[np.ndarray] = []  # flat uint8 bases, oldest first

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            for k in range(len(self._buffers)):  # (not enumerate: its cached tuple holds a reference)
                b = self._buffers[k]
                # 3 = the list, `b` and getrefcount's argument: no array views it now.
                if b.nbytes == nbytes and sys.getrefcount(b) == 3:
                    self._buffers.append(self._buffers.pop(k))  # most recently used last
                    break
            else:
                b = np.empty(nbytes, np.uint8)
                self._buffers.append(b)
            self._trim()  # `b` is referenced here, so not idle
            return b

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
    if not _active or nbytes < SCRATCH_MIN_BYTES:
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
    if os.environ.get("VITCTL_NO_BLAS_TRANSPOSE"):
        return None
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


def _blas_plan(w: np.ndarray) -> tuple[Callable[[np.ndarray, int, int], None], int] | None:
    """(copy, A) if `w` is a transposed view of a C-contiguous array holding no NaN, else None.

    Flattened, C-contiguous w is a 2-D (A, B) matrix, the transpose of its base's (B, A);
    copy(out, lo, hi) writes rows lo:hi of that matrix into C-contiguous `out` with ?omatcopy.
    """
    fns = _omatcopy()
    if fns is None or w.dtype not in fns or w.size == 0:
        return None
    t = _as_transpose(w)
    if t is None:
        return None
    base, k = t
    if np.isnan(base.max()):  # ?omatcopy would quiet a signalling NaN: keep the bits through numpy
        return None
    A, B = math.prod(w.shape[:k]), math.prod(w.shape[k:])
    fn, isz, a_ptr = fns[w.dtype], w.dtype.itemsize, base.ctypes.data

    def copy(out: np.ndarray, lo: int, hi: int) -> None:  # rows lo:hi = base columns lo:hi
        assert out.flags.c_contiguous and out.size == (hi - lo) * B and out.dtype == w.dtype
        fn(B, hi - lo, a_ptr + lo * isz, A, out.ctypes.data, B)

    return copy, A


def _blas_transpose(out: np.ndarray, w: np.ndarray, threads: bool = True) -> bool:
    """out[...] = w with ?omatcopy (see _blas_plan); False if that does not apply."""
    plan = _blas_plan(w) if w.dtype == out.dtype else None
    if plan is None:
        return False
    copy, A = plan
    flat = out.reshape(A, -1)
    parts = min(COPY_THREADS, max(1, w.nbytes // (4 << 20)), A) if threads else 1
    bounds = [A * p // parts for p in range(parts + 1)]
    if parts == 1:
        copy(flat, 0, A)
    else:
        list(_pool().map(lambda lo, hi: copy(flat[lo:hi], lo, hi), bounds[:-1], bounds[1:]))
    return True


def iter_blocks(
    w: np.ndarray, dtype: np.dtype, start: int = 0, stop: int | None = None, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[int, memoryview]]:
    """(byte offset, bytes) of rows start:stop of C-contiguous `w` cast to `dtype`, in order, a block at a time.

    Offsets count from the start of the whole array. A C-contiguous `w` of `dtype` is handed
    out in place. Otherwise each block of rows is copied into one small reused buffer (it
    stays in the CPU cache until the caller has written it out), with BLAS for a transposed
    view, else numpy. A block is valid until the next one is requested.
    """
    dtype = np.dtype(dtype)
    n = w.shape[0] if w.ndim else 1
    stop = n if stop is None else stop
    row_bytes = math.prod(w.shape[1:]) * dtype.itemsize if w.ndim else dtype.itemsize
    if w.ndim < 2 or (w.flags.c_contiguous and w.dtype == dtype):
        flat = memoryview(np.ascontiguousarray(w, dtype).reshape(-1).view(np.uint8))
        for lo in range(start * row_bytes, stop * row_bytes, block_bytes):
            yield lo, flat[lo : min(lo + block_bytes, stop * row_bytes)]
        return
    rows = max(1, block_bytes // max(row_bytes, 1))
    buf = np.empty((min(rows, stop - start), *w.shape[1:]), dtype)
    blas = _blas_plan(w) if w.dtype == dtype else None
    if blas is not None and blas[1] != n:  # the 2-D form's rows are not w's rows
        blas = None
    for lo in range(start, stop, rows):
        hi = min(lo + rows, stop)
        out = buf[: hi - lo]
        if blas is not None:
            blas[0](out, lo, hi)
        else:
            copy_into(out, w[lo:hi], threads=False)
        yield lo * row_bytes, memoryview(out.reshape(-1).view(np.uint8))


def write_array(fd: int, offset: int, w: np.ndarray, dtype: np.dtype, threads: int = COPY_THREADS) -> int:
    """Writes C-contiguous `w` cast to `dtype` at `offset` of file `fd` (os.pwrite, block by block,
    bands of rows on `threads` threads); returns the bytes written."""
    nbytes = w.size * np.dtype(dtype).itemsize
    n = w.shape[0] if w.ndim else 1
    parts = min(threads, max(1, nbytes // (8 << 20)), n)

    def band(lo: int, hi: int) -> None:
        for off, block in iter_blocks(w, dtype, lo, hi):
            done = 0
            while done < len(block):
                done += os.pwrite(fd, block[done:], offset + off + done)

    bounds = [n * p // parts for p in range(parts + 1)]
    if parts == 1:
        band(0, n)
    else:
        list(_pool().map(band, bounds[:-1], bounds[1:]))
    return nbytes


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

    parts = min(COPY_THREADS, max(1, w.nbytes // (4 << 20)), w.shape[0] // _TILE or 1) if threads else 1
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
