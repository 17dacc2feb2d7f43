"""Slice reads (what `vitctl train --init-from` uses to read only a device's shard): each reader's
`read_slice(name, index)` equals `read(name)[index]` bit for bit, for every layout it reads."""

import numpy as np
import pytest

from tests.conftest import random_params, tiny
from tests.formats.orbax_testing import write_orbax
from vitctl.formats import layout
from vitctl.formats.orbax import OrbaxReader
from vitctl.formats.safetensors import SafetensorsReader, SafetensorsWriter
from vitctl.params import unstack

INDEXES = [(), (slice(None, 5),), (slice(3, 17), slice(1, 2)), (slice(None), slice(None), slice(8, None)), (slice(0, 48, 2),)]


def check_slices(reader, names):
    for name in names:
        whole = np.asarray(reader.read(name))
        for index in INDEXES[: whole.ndim + 1]:
            got = reader.read_slice(name, index)
            assert got.dtype == whole.dtype and np.array_equal(got, whole[index]), (name, index)


@pytest.mark.parametrize("how", ["save_jax", "files", "zstd"])
def test_orbax_read_slice(tmp_path, how):
    cfg = tiny()
    flat = random_params(cfg)
    params = tmp_path / "params"
    if how == "save_jax":  # uncompressed OCDBT (init, train): read in place by the plain-file path, sliced by tensorstore
        layout.save_jax(tmp_path, flat)
    else:
        write_orbax(params, flat, cfg.depth, 4096, None, compress=how == "zstd", use_ocdbt=how == "zstd")
    reader = OrbaxReader(params)
    try:
        names = list(dict(unstack(flat, cfg.depth)))
        check_slices(reader, [n for n in names if n.startswith(("blocks/1/", "patch_embed", "pos_embed", "head"))])
    finally:
        reader.close()


def test_safetensors_read_slice_and_view(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(48, 3, 16)).astype(np.float32), "b": rng.normal(size=(80,)).astype(np.float32)}
    writer = SafetensorsWriter(tmp_path, [(n, w.shape, w.dtype) for n, w in tensors.items()], 600, {"format": "pt"})  # two shards
    for n, w in tensors.items():
        writer.write(n, w)
    writer.close()
    reader = SafetensorsReader(tmp_path)
    try:
        check_slices(reader, list(tensors))
        view = reader.view("a")
        assert not view.flags.writeable and not view.flags.owndata  # a map of the file, not a copy
        relaid = view.transpose(2, 0, 1)  # as Layout.to_jax re-lays a tensor out: a view still
        assert np.shares_memory(relaid, view) and np.array_equal(np.array(relaid[3:7, 1]), tensors["a"].transpose(2, 0, 1)[3:7, 1])
    finally:
        reader.close()
