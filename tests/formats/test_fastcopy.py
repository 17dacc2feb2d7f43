"""vitctl.formats.fastcopy: bit-exact copies of layout views (BLAS transpose and numpy tiles), the scratch pool,
mapped reads, background writes; every path with its speed tricks on and on its plain path, byte for byte alike."""

from __future__ import annotations

import glob
import os

import ml_dtypes
import numpy as np
import pytest

from vitctl.formats import fastcopy
from vitctl.params import LAYOUTS

BF16 = np.dtype(ml_dtypes.bfloat16)


def random_bits(shape, dtype, seed=0):
    """Every bit pattern alike: NaNs (signalling and quiet, any payload), infinities, subnormals."""
    dtype = np.dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def finite(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def same_bits(got, want):
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == np.ascontiguousarray(want).tobytes()


@pytest.fixture(params=["tricks", "plain"])
def both_paths(request):
    """The test runs twice: with every speed trick on, and with all of them on their plain path."""
    if request.param == "plain":
        with fastcopy.plain():
            yield request.param
    else:
        yield request.param


def _every_function(pool: list[np.ndarray], fd: int, nbytes: int, out) -> list:
    """What each public function makes of `pool` and of the file `fd` (nbytes long)."""
    with fastcopy.pooled():
        got = [fastcopy.contiguous(w, w.dtype).tobytes() for w in pool]
    got += [b"".join(bytes(b) for _, b in fastcopy.iter_blocks(w, np.dtype(np.float32), block_bytes=5000)) for w in pool]
    got += [fastcopy.mapped([(fd, 12, nbytes - 12)]).tobytes(), list(fastcopy.read_ahead(iter(range(20)), 3))]
    writer, offset = fastcopy.BlockWriter(block_bytes=1 << 17, depth=2), 5  # a block holds a row of each
    with open(out, "wb") as f:
        for w in pool:
            offset += writer.write(f.fileno(), offset, w, np.dtype(np.float32))
        writer.close()
    return [*got, out.read_bytes()]


def test_plain_path_gives_the_same_bytes(tmp_path):
    """Every public function, tricks on against all of them on their plain path, on every bit pattern."""
    pool = [random_bits((300, 4, 64), BF16).transpose(1, 2, 0), finite((1100, 2051), np.float32, 1).T,
            random_bits((600, 200), np.float32).T, finite((4, 4, 3, 16), np.float64).transpose(3, 2, 0, 1)]  # fmt: skip
    data = random_bits((3 * fastcopy._PAGE + 100,), np.uint8)
    (tmp_path / "data").write_bytes(data.tobytes())
    fd = os.open(tmp_path / "data", os.O_RDONLY)
    try:
        tricks = _every_function(pool, fd, data.size, tmp_path / "tricks")
        with fastcopy.plain():
            plain = _every_function(pool, fd, data.size, tmp_path / "plain")
    finally:
        os.close(fd)
    assert plain == tricks and plain[2 * len(pool)] == data[12:].tobytes()
    assert plain[-1][5:] == b"".join(np.ascontiguousarray(w).astype(np.float32).tobytes() for w in pool)


@pytest.mark.usefixtures("both_paths")
def test_contiguous_copies_views_exactly():
    a = finite((70, 33, 5), np.float32)
    for view in (a.transpose(2, 0, 1), a.reshape(70, -1).T, a[::2], a[..., 1], a):
        for dtype in (np.dtype(np.float32), BF16):
            got = fastcopy.contiguous(view, dtype)
            assert got.flags.c_contiguous and same_bits(got, view.astype(dtype))
    assert fastcopy.contiguous(a, a.dtype) is a
    big = finite((1100, 2051), np.float32, 1)  # 9 MB: split between threads
    for dtype in (np.dtype(np.float32), BF16):
        assert same_bits(fastcopy.contiguous(big.T, dtype), big.T.astype(dtype))


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16, np.float16], ids=str)
@pytest.mark.parametrize("make", [finite, random_bits], ids=["finite", "any-bits"])
def test_every_layout_view_copies_bit_exactly(dtype, make):
    """Both directions of every mapping layout, on every bit pattern (NaN payloads survive)."""
    shapes = {
        "same": (6, 10),
        "dense": (48, 80),
        "conv": (4, 4, 3, 16),
        "heads_in": (16, 4, 8),
        "heads_out": (4, 8, 16),
        "heads_bias": (4, 8),
    }
    for layout in LAYOUTS:
        w = make(shapes[layout.name], dtype)
        t = layout.to_torch(w)
        got = fastcopy.contiguous(t, np.dtype(dtype))
        assert same_bits(got, t), layout.name
        back = fastcopy.contiguous(layout.to_jax(got, w.shape), np.dtype(dtype))
        assert same_bits(back, w), layout.name


def numpy_wheel_has_openblas():
    here = os.path.dirname(np.__file__)
    return bool(glob.glob(os.path.join(here, "..", "numpy.libs", "*openblas*")) + glob.glob(os.path.join(here, ".dylibs", "*openblas*")))


@pytest.mark.skipif(not numpy_wheel_has_openblas(), reason="this numpy bundles no OpenBLAS (conda/MKL, Accelerate)")
def test_blas_transpose_is_used_and_keeps_signalling_nans():
    assert fastcopy._omatcopy() is not None
    w = finite((300, 2500), np.float32).T  # 3 MB, transposed view of (300, 2500)
    out = np.empty(w.shape, w.dtype)
    assert fastcopy._blas_transpose(out, w) and same_bits(out, w)
    f64 = finite((64, 48, 3), np.float64).transpose(2, 0, 1)  # a transpose with k = 1 of a 3-D base
    out64 = np.empty(f64.shape, f64.dtype)
    assert fastcopy._blas_transpose(out64, f64) and same_bits(out64, f64)
    # ?omatcopy computes 1.0 * a, which quiets a signalling NaN: a block holding a NaN is copied again by numpy.
    snan = finite((600, 2000), np.float32)  # 4.8 MB: three blocks of rows of the transposed (2000, 600)
    snan.view(np.uint32)[3, 1500] = 0x7F800001  # in the last block
    snan.view(np.uint32)[5, 7] = 0xFFC00000  # a quiet NaN of the other sign, in the first
    quieted = np.empty((2000, 600), np.float32)
    fastcopy._omatcopy()[np.dtype(np.float32)](600, 2000, snan.ctypes.data, 2000, quieted.ctypes.data, 600)
    assert quieted.view(np.uint32)[1500, 3] == 0x7FC00001  # what BLAS alone would write
    for threads in (False, True):
        got = np.empty((2000, 600), np.float32)
        assert fastcopy._blas_transpose(got, snan.T, threads) and same_bits(got, snan.T)
        assert got.view(np.uint32)[1500, 3] == 0x7F800001 and got.view(np.uint32)[7, 5] == 0xFFC00000
    got = fastcopy.contiguous(snan.T, snan.dtype)
    assert same_bits(got, snan.T)
    assert not fastcopy._blas_transpose(np.empty((6, 4, 3), np.float32), finite((4, 3, 6), np.float32).transpose(2, 0, 1)[:, ::1, ::-1])


@pytest.mark.skipif(not numpy_wheel_has_openblas(), reason="this numpy bundles no OpenBLAS (conda/MKL, Accelerate)")
@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=str)
def test_two_byte_transposes_move_as_float32_pairs_bit_exactly(dtype):
    """bfloat16/float16 transposes go through ?omatcopy as pairs; a pair whose bits are a float32
    NaN (any bfloat16 infinity or NaN in its upper half) is copied by numpy, so every pattern survives."""
    for base, k in [(finite((600, 2000), np.float32).astype(dtype), 1), (random_bits((300, 4, 64), dtype), 2),
                    (random_bits((50, 6), dtype), 1)]:  # fmt: skip
        w = base.transpose(*range(k, base.ndim), *range(k))  # (A..., B...) view of the C-contiguous base
        plan = fastcopy._blas_plan(w)
        assert plan is not None and plan[2] == 2
        for threads in (False, True):
            got = np.empty(w.shape, dtype)
            assert fastcopy._blas_transpose(got, w, threads) and same_bits(got, w)
        blocks = b"".join(bytes(b) for _, b in fastcopy.iter_blocks(w, np.dtype(dtype), block_bytes=1000))
        assert blocks == np.ascontiguousarray(w).tobytes()
    odd = finite((10, 7), np.float32).astype(dtype).T  # 7 rows: no pairs; numpy's copy
    assert fastcopy._blas_plan(odd) is None and same_bits(fastcopy.contiguous(odd, np.dtype(dtype)), odd)


def test_scratch_reuses_only_buffers_nobody_holds():
    n = fastcopy.SCRATCH_MIN_BYTES // 4
    outside = fastcopy.scratch((n,), np.float32)
    with fastcopy.pooled():
        a = fastcopy.scratch((n,), np.float32)
        view = a.reshape(2, -1)[1]
        ptr = a.ctypes.data
        del a
        b = fastcopy.scratch((2, n // 2), np.float32)  # the view keeps a's buffer busy
        assert b.ctypes.data != ptr
        del view
        c = fastcopy.scratch((n,), np.int32)  # now free: reused, in any dtype and shape of its size
        assert c.ctypes.data == ptr and c.dtype == np.int32 and c.shape == (n,)
        small = fastcopy.scratch((4,), np.float32)
        assert small.base is None  # small arrays: plain np.empty
        del b, c
        idle = [fastcopy.scratch((4 * n + k,), np.uint8) for k in range(300)]  # 300 MiB (untouched) held, then dropped
        del idle
        kept = fastcopy.scratch((4 * n + 299,), np.uint8)  # the newest idle one, reused; the oldest let go
        assert sum(x.nbytes for x in fastcopy._POOL._buffers) - kept.nbytes <= 2 * kept.nbytes  # idle: twice the largest
        assert kept.base is fastcopy._POOL._buffers[-1] and len(fastcopy._POOL._buffers) < 300
    assert not fastcopy._POOL._buffers and outside.base is None
    after = fastcopy.scratch((n,), np.float32)
    assert after.base is None  # outside pooled(): np.empty


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=str)
def test_write_array_writes_every_layout_view_at_its_offset(tmp_path, dtype):
    """Block by block (several blocks for the large one), cast on the way."""
    views = [LAYOUTS[1].to_torch(finite((48, 80), np.float32)), LAYOUTS[3].to_torch(finite((16, 4, 8), np.float32)),
             LAYOUTS[2].to_torch(finite((4, 4, 3, 16), np.float32)), finite((5,), np.float32), finite((1100, 2051), np.float32).T,
             random_bits((30, 20), np.float32).T]  # fmt: skip
    path, offset = tmp_path / "out.bin", 17
    for w in views:
        want = np.ascontiguousarray(w).astype(dtype).tobytes()
        with open(path, "wb") as f:
            assert fastcopy.write_array(f.fileno(), offset, w, np.dtype(dtype)) == len(want)
        assert path.read_bytes() == b"\0" * offset + want
        got, n = bytearray(len(want)), 0
        for off, b in fastcopy.iter_blocks(w, np.dtype(dtype), block_bytes=1000):
            got[off : off + len(b)] = b  # a block is valid until the next one: copy it now
            n += 1
        assert bytes(got) == want and (n > 1 or len(want) <= 1000)


@pytest.mark.usefixtures("both_paths")
def test_block_writer_queues_every_layout_and_reports_a_failed_write(tmp_path):
    """Blocks (re-laid out or in place) written by the background thread at their offsets, with fewer
    buffers than blocks; a failing os.pwrite surfaces, labelled, at the next call, and nothing after it is written."""
    arrays = [(LAYOUTS[1].to_torch(finite((480, 800), np.float32)), np.dtype(np.float32)),  # transposed, BLAS
              (finite((1000, 300), np.float32), np.dtype(np.float32)),  # C-contiguous: written in place
              (finite((1100, 205), np.float32).T, BF16), (finite((7,), np.float32), BF16),  # cast on the way
              (random_bits((30, 200), np.float32).T, np.dtype(np.float32))]  # NaNs of every kind  # fmt: skip
    wants = [np.ascontiguousarray(w).astype(d).tobytes() for w, d in arrays]
    offsets = np.cumsum([3] + [len(b) for b in wants]).tolist()
    path = tmp_path / "out.bin"
    writer = fastcopy.BlockWriter(block_bytes=4096, depth=2)
    with open(path, "wb") as f:
        for (w, d), off in zip(arrays, offsets):
            assert writer.write(f.fileno(), off, w, d, label=off) == np.ascontiguousarray(w).astype(d).nbytes
        writer.close()
    assert writer._made <= 3 and path.read_bytes()[3:] == b"".join(wants)

    writer = fastcopy.BlockWriter(block_bytes=4096, depth=2)
    with open(path, "rb") as f:  # read-only: every os.pwrite fails (EBADF)
        with pytest.raises(fastcopy.WriteFailed) as e:
            writer.write(f.fileno(), 0, arrays[0][0], arrays[0][1], label=("out.bin", "tensor 'a'"))
            writer.flush()
        assert e.value.label == ("out.bin", "tensor 'a'") and isinstance(e.value.error, OSError)
        with pytest.raises(fastcopy.WriteFailed):
            writer.write(f.fileno(), 0, arrays[1][0], arrays[1][1], label="b")
        writer.abort()
    assert not writer._thread.is_alive()


@pytest.mark.parametrize("tile", [1, 7, 128])
@pytest.mark.parametrize("blas", [True, False], ids=["blas", "numpy"])
def test_contiguous_tiles_cover_every_element(monkeypatch, tile, blas):
    monkeypatch.setattr(fastcopy, "_TILE", tile)
    if not blas:
        monkeypatch.setattr(fastcopy, "_omatcopy", lambda: None)  # the numpy fallback (other numpy builds)
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 130, 3), dtype=np.float32)  # edges not multiples of the tile
    big = rng.standard_normal((1027, 2049), dtype=np.float32)  # > 4 MiB: bands on threads, ragged last band
    for view in (a.transpose(1, 0, 2), a.transpose(2, 1, 0), a.reshape(300, -1).T, a[::3, ::2], big.T):
        for dtype in (np.dtype(np.float32), BF16):
            if view.size > 10**6 and tile == 1:
                continue  # element by element: slow
            assert same_bits(fastcopy.contiguous(view, dtype), view.astype(dtype))


def _maps_of(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(path) in line for line in f)


def test_mapped_views_file_pieces_without_copying_and_unmaps_with_the_last_view(tmp_path):
    page = fastcopy._PAGE
    data = np.random.default_rng(0).integers(0, 256, 5 * page, dtype=np.uint8)
    path = tmp_path / "data"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        one = fastcopy.mapped([(fd, 3 * page + 12, 100)])  # one piece: any offset
        assert one.tobytes() == data[3 * page + 12 :][:100].tobytes() and not one.flags.writeable
        if not fastcopy._libc():
            pytest.skip("joining pieces needs Linux")
        pieces = [(fd, 2 * page, page), (fd, 0, 2 * page), (fd, 4 * page, 100)]  # out of file order, last one short
        joined = fastcopy.mapped(pieces)
        want = np.concatenate([data[2 * page : 3 * page], data[: 2 * page], data[4 * page :][:100]])
        assert joined.tobytes() == want.tobytes() and not joined.flags.writeable
        assert fastcopy.mapped([(fd, 12, page), (fd, page, 100)]) is None  # not on a page boundary: the caller copies
        assert fastcopy.mapped([(fd, 0, 100), (fd, page, 100)]) is None  # a short piece before the last
    finally:
        os.close(fd)
    view = joined.view(np.float32)[3:]
    del joined, one
    assert _maps_of(path) > 0  # `view` still holds the mapping
    del view
    assert _maps_of(path) == 0
