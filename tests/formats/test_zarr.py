"""vitctl.formats.zarr: chunk shapes (Orbax's subchunking, and slabs: chunks that are runs of the array's bytes)."""

import numpy as np
import pytest

from vitctl.formats.zarr import choose_chunks, chunk_runs, is_slab, slab_chunks


@pytest.mark.parametrize(
    "shape,stacked,limit,want",
    [
        ((12, 48, 3, 16), True, 2**20, (1, 48, 3, 16)),  # one layer per chunk
        ((12, 48, 3, 16), True, 4 * 3 * 16 * 10, (1, 8, 3, 16)),  # rows of a layer: the largest divisor of 48 that fits
        ((48, 80), False, 4 * 48 * 40, (24, 80)),
        ((5, 7), False, 4 * 7 * 2, (1, 7)),  # 5 is prime
        ((4, 1000), False, 64, (1, 10)),  # a row is larger than the limit: cut along the last axis (10 divides 1000)
        ((8,), False, 8, (2,)),
        ((), False, 8, ()),
    ],
)
def test_slab_chunks(shape, stacked, limit, want):
    assert slab_chunks(shape, 4, limit, stacked) == want
    assert is_slab(shape, want)
    runs = list(chunk_runs(shape, want, 4))
    assert [b - a for _, a, b in runs] == [int(np.prod(want)) * 4] * len(runs) and runs[-1][2] == int(np.prod(shape)) * 4


@pytest.mark.parametrize(
    "shape,chunks,slab",
    [
        ((4, 32, 128), (1, 32, 128), True),
        ((4, 32, 128), (2, 32, 128), True),
        ((4, 32, 128), (1, 1, 64), True),
        ((4, 32, 128), (1, 32, 64), False),  # rows of 64 with a whole axis before: not one run (as Orbax shards attn_out)
        ((4, 32, 128), (2, 1, 128), False),
        ((4, 32, 128), (1, 3, 128), False),  # does not divide
        ((8,), (8,), True),
    ],
)
def test_is_slab(shape, chunks, slab):
    assert is_slab(shape, chunks) == slab


@pytest.mark.parametrize(
    "shape,stacked,limit,want",
    [
        ((12, 48, 3, 16), True, 2**20, (1, 48, 3, 16)),
        ((48, 80), False, 2**20, (48, 80)),
        ((48, 80), False, 4 * 48 * 40, (48, 40)),
        ((8,), False, 8, (2,)),
        ((7,), False, 8, (1,)),
    ],
)
def test_choose_chunks(shape, stacked, limit, want):
    assert choose_chunks(shape, 4, limit, stacked) == want
