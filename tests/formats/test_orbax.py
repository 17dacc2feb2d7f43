"""vitctl.formats.orbax: the one Orbax writer (plain files or tensorstore, OCDBT or one directory per
array, raw or zstd) and the one reader, against Orbax itself.

Every layout the writer makes is restored by Orbax's StandardCheckpointer; the reader is fed
Orbax's own output (OCDBT or not, zarr v2 or zarr3, one process or several). Corrupt and
truncated inputs fail with a CheckpointError naming the file and the tensor.
"""

import json

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import random_params, tiny
from tests.formats.orbax_testing import assert_bitwise, orbax_restore, specs, write_orbax, zarr_metadata
from vitctl import checkpoint as ckpt
from vitctl.errors import CheckpointError
from vitctl.formats import layout, zarr
from vitctl.formats.base import CHUNK_BYTES
from vitctl.formats.orbax import OrbaxReader, OrbaxWriter
from vitctl.params import unstack

BF16 = np.dtype(ml_dtypes.bfloat16)
FILES = {"compress": False, "use_ocdbt": False}  # what vitctl convert writes


def write_orbax_files(params_dir, flat, depth, chunk_bytes=CHUNK_BYTES, order=None):
    return write_orbax(params_dir, flat, depth, chunk_bytes, order, **FILES)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_orbax_writer_restores_with_orbax(tmp_path, param_dtype):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = tiny(param_dtype=param_dtype, depth=3)
    flat = {n: a.astype(BF16 if param_dtype == "bfloat16" else np.float32) for n, a in random_params(cfg).items()}
    per_layer = write_orbax(tmp_path / "params", flat, cfg.depth)
    assert layout.detect_formats(tmp_path) == [layout.JAX]
    ckpt.write_config(tmp_path, cfg, {})
    assert_bitwise(orbax_restore(tmp_path, cfg), flat)  # Orbax restores it into an abstract target
    assert_bitwise(layout.load_jax(tmp_path, cfg), flat)  # and vitctl's own loader reads it
    with ocp.StandardCheckpointer() as c:  # and Orbax alone, from its metadata
        meta = c.metadata((tmp_path / "params").absolute()).item_metadata.tree
        assert meta["blocks"]["q"]["kernel"].shape == (3, 48, 3, 16)
        restored = c.restore((tmp_path / "params").absolute())
    assert restored["blocks"]["mlp_in"]["kernel"].tobytes() == flat["blocks/mlp_in/kernel"].tobytes()
    assert len(per_layer) > len(flat)


def test_orbax_writer_takes_layers_in_any_order(tmp_path):
    cfg = tiny(depth=3)
    flat = random_params(cfg)
    names = [n for n, _ in unstack(flat, cfg.depth)]
    write_orbax(tmp_path / "params", flat, cfg.depth, order=names[::-1])
    r = OrbaxReader(tmp_path / "params")
    assert_bitwise(dict(r.iter_tensors(names)), dict(unstack(flat, cfg.depth)))


def test_orbax_writer_bounds_chunks(tmp_path):
    cfg = tiny()
    flat = random_params(cfg)
    write_orbax(tmp_path / "params", flat, cfg.depth, chunk_bytes=1024)
    meta = zarr_metadata(tmp_path / "params")
    assert sorted(meta) == sorted(n.replace("/", ".") for n in flat)
    for n, a in flat.items():
        m = meta[n.replace("/", ".")]
        assert tuple(m["shape"]) == a.shape and m["compressor"] == {"id": "zstd", "level": 1}, n
        assert np.prod(m["chunks"]) * 4 <= 1024 and all(s % c == 0 for s, c in zip(a.shape, m["chunks"])), (n, m["chunks"])
        if n.startswith("blocks/"):
            assert m["chunks"][0] == 1, n


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_orbax_files_writer_restores_with_orbax_and_reads_without_tensorstore(tmp_path, param_dtype):
    """One directory per array (Orbax's use_ocdbt=False layout), chunks of contiguous bytes, any write order;
    Orbax restores it, and OrbaxReader reads every array straight from its chunk files, bit-exact."""
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = tiny(param_dtype=param_dtype, depth=3)
    flat = {n: a.astype(BF16 if param_dtype == "bfloat16" else np.float32) for n, a in random_params(cfg).items()}
    names = [n for n, _ in unstack(flat, cfg.depth)]
    per_layer = write_orbax_files(tmp_path / "params", flat, cfg.depth, chunk_bytes=4096, order=names[::-1])
    meta = zarr_metadata(tmp_path / "params")
    assert sorted(meta) == sorted(n.replace("/", ".") for n in flat)
    for n, a in flat.items():
        m = meta[n.replace("/", ".")]
        assert (
            tuple(m["shape"]) == a.shape
            and m["compressor"] is None
            and m["chunks"] == list(zarr.slab_chunks(a.shape, a.itemsize, 4096, n.startswith("blocks/")))
        )
        assert zarr.is_slab(a.shape, m["chunks"]) and (np.prod(m["chunks"]) * a.itemsize <= 4096 or m["chunks"][-1] == 1)
    ckpt.write_config(tmp_path, cfg, {})
    assert layout.detect_formats(tmp_path) == [layout.JAX]
    assert_bitwise(orbax_restore(tmp_path, cfg), flat)  # restored by Orbax
    assert_bitwise(layout.load_jax(tmp_path, cfg), flat)
    with ocp.StandardCheckpointer() as c:
        restored = c.restore((tmp_path / "params").absolute())
    assert restored["blocks"]["mlp_in"]["kernel"].tobytes() == flat["blocks/mlp_in/kernel"].tobytes()
    r = OrbaxReader(tmp_path / "params")
    assert sorted(r._plain) == sorted(flat) and not r._arrays  # no tensorstore
    assert_bitwise(dict(r.iter_tensors(names)), per_layer)


def test_orbax_reader_maps_page_sized_chunks(tmp_path):
    """Chunks that are whole pages are mapped in order into one array (no copy); others are read in place."""
    arrays = {"blocks/w": np.arange(3 * 2 * 1024, dtype=np.float32).reshape(3, 2, 1024), "x": np.arange(6, dtype=np.float32)}
    write_orbax_files(tmp_path / "params", arrays, 3, chunk_bytes=4096)
    r = OrbaxReader(tmp_path / "params")
    assert r._plain["blocks/w"].chunks == (1, 1, 1024)  # two 4 KiB chunk files per layer
    got = dict(r.iter_tensors(list(r.infos())))
    assert not got["blocks/1/w"].flags.writeable  # a view of the chunk files' pages
    assert got["blocks/1/w"].tobytes() == arrays["blocks/w"][1].tobytes() and got["x"].tobytes() == arrays["x"].tobytes()


def test_orbax_files_reader_names_a_truncated_or_missing_chunk(tmp_path):
    cfg = tiny()
    flat = random_params(cfg)
    per_layer = write_orbax_files(tmp_path / "params", flat, cfg.depth, chunk_bytes=4096)
    chunk = tmp_path / "params" / "blocks.mlp_in.kernel" / "1.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-4])
    r = OrbaxReader(tmp_path / "params")
    with pytest.raises(CheckpointError, match=f"cannot read tensor 'blocks/1/mlp_in/kernel' from {chunk}: the chunk file holds") as e:
        dict(r.iter_tensors(list(per_layer)))
    assert "re-create" in e.value.hint
    chunk.unlink()
    with pytest.raises(CheckpointError, match=f"cannot read tensor 'blocks/1/mlp_in/kernel': chunk file {chunk} is missing"):
        r.read("blocks/1/mlp_in/kernel")
    assert r.read("blocks/0/mlp_in/kernel").tobytes() == flat["blocks/mlp_in/kernel"][0].tobytes()


@pytest.mark.parametrize("arrays", ["numpy", "jax"])
def test_orbax_reader_streams_save_jax_output(tmp_path, arrays):
    """Reads what Orbax itself wrote (per-process OCDBT, merged manifest), layer by layer."""
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny(depth=3, param_dtype="bfloat16")
    flat = {n: a.astype(BF16) for n, a in random_params(cfg).items()}
    if arrays == "jax":  # as `vitctl init` and training save them: jax.Array leaves, sharding metadata
        jnp = pytest.importorskip("jax.numpy")
        layout.save_jax(tmp_path, {n: jnp.asarray(a) for n, a in flat.items()})
    else:
        layout.save_jax(tmp_path, flat)
    r = OrbaxReader(tmp_path / "params")
    per_layer = dict(unstack(flat, cfg.depth))
    infos = r.infos()
    assert {n: (i.shape, i.dtype) for n, i in infos.items()} == {n: (a.shape, BF16) for n, a in per_layer.items()}
    assert infos["blocks/1/mlp_in/kernel"].chunk_bytes == 48 * 80 * 2  # one layer per chunk
    assert sorted(r._plain) == sorted(flat) and not r._arrays  # uncompressed: read from the data files, not by tensorstore
    assert_bitwise(dict(r.iter_tensors(list(per_layer))), per_layer)
    assert r.read("blocks/2/q/kernel").tobytes() == flat["blocks/q/kernel"][2].tobytes()


@pytest.mark.parametrize("chunk_bytes", [CHUNK_BYTES, 1024, 96])
@pytest.mark.parametrize("direct", [True, False], ids=["in-place", "via-copy"])
def test_orbax_reader_reads_uncompressed_ocdbt_chunks_in_place(tmp_path, chunk_bytes, direct, monkeypatch):
    """Chunks cut along any axes (Orbax's subchunking): each chunk's rows land in place (os.preadv) or,
    when short, through a copy; inline values (small arrays) too. Bit-exact against Orbax's own restore."""
    monkeypatch.setattr(zarr, "DIRECT_RUN_BYTES", 1 if direct else 1 << 30)
    cfg = tiny(depth=2)
    flat = random_params(cfg)
    layout.save_jax(tmp_path, flat, chunk_bytes=chunk_bytes)
    r = OrbaxReader(tmp_path / "params")
    assert sorted(r._plain) == sorted(flat) and not r._arrays
    chunks = {n: a.chunks for n, a in r._plain.items()}
    assert (chunk_bytes > 4096) == (chunks["blocks/mlp_in/kernel"] == (1, 48, 80)), chunks  # else cut inside a layer
    per_layer = dict(unstack(flat, cfg.depth))
    assert_bitwise(dict(r.iter_tensors(list(per_layer))), per_layer)
    r.close()


def test_orbax_reader_names_a_truncated_ocdbt_data_file(tmp_path):
    cfg = tiny(depth=2)
    flat = random_params(cfg)
    layout.save_jax(tmp_path, flat)
    r = OrbaxReader(tmp_path / "params")
    names = list(r.infos())
    biggest = data_files(tmp_path / "params")[-1]
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cannot read tensor '.*' from {biggest}: chunk .* past the end of the file") as e:
        list(r.iter_tensors(names))
    assert "re-create" in e.value.hint
    biggest.unlink()
    r = OrbaxReader(tmp_path / "params")
    with pytest.raises(CheckpointError, match=f"cannot read tensor '.*': data file {biggest} is missing"):
        list(r.iter_tensors(names))


@pytest.mark.parametrize("use_ocdbt,use_zarr3", [(False, False), (True, True), (False, True)])
def test_orbax_reader_reads_other_orbax_layouts(tmp_path, use_ocdbt, use_zarr3):
    """Orbax can also store one directory per array and zarr v3: the reader follows _METADATA."""
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = tiny()
    flat = random_params(cfg)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)) as c:
        c.save((tmp_path / "params").absolute(), layout.nest(flat))
    r = OrbaxReader(tmp_path / "params")
    per_layer = dict(unstack(flat, cfg.depth))
    assert_bitwise(dict(r.iter_tensors(list(per_layer))), per_layer)


@pytest.fixture
def orbax_params(tmp_path):
    cfg = tiny()
    flat = random_params(cfg)
    write_orbax(tmp_path / "params", flat, cfg.depth)
    return tmp_path / "params"


def test_orbax_reader_missing_or_corrupt_metadata(orbax_params):
    meta = orbax_params / "_METADATA"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*_METADATA") as e:
        OrbaxReader(orbax_params)
    assert "re-create" in e.value.hint
    meta.unlink()
    with pytest.raises(CheckpointError, match="cannot read .*_METADATA"):
        OrbaxReader(orbax_params)


def test_orbax_reader_names_a_missing_array(orbax_params):
    meta = json.loads((orbax_params / "_METADATA").read_text())
    meta["tree_metadata"]["('extra', 'kernel')"] = {
        "key_metadata": [{"key": "extra", "key_type": 2}, {"key": "kernel", "key_type": 2}],
        "value_metadata": {},
    }
    (orbax_params / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"cannot read array 'extra/kernel' from {orbax_params}"):
        OrbaxReader(orbax_params)


def data_files(params_dir):
    return sorted((p for p in params_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def test_orbax_reader_detects_truncated_data(orbax_params):
    r = OrbaxReader(orbax_params)
    names = list(r.infos())
    for f in data_files(orbax_params):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cannot read (tensor|array) '.*' from {orbax_params}"):
        list(r.iter_tensors(names))


def test_orbax_reader_detects_a_corrupt_manifest(orbax_params):
    (orbax_params / "manifest.ocdbt").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match=f"cannot read array '.*' from {orbax_params}"):
        OrbaxReader(orbax_params)


@pytest.mark.parametrize("options", [{}, FILES], ids=["ocdbt", "files"])
def test_orbax_writer_waits_for_background_writes_on_abort(tmp_path, options):
    cfg = tiny(depth=4)
    per_layer = dict(unstack(random_params(cfg), cfg.depth))
    w = OrbaxWriter(tmp_path / "params", specs(per_layer), CHUNK_BYTES, **options)
    for n in list(per_layer)[:10]:
        w.write(n, per_layer[n])
    w.abort()
    assert not (w._inflight if w._blocks is None else w._blocks._thread.is_alive())  # nothing writes on
    with pytest.raises(AssertionError, match="never written"):
        w.close()


@pytest.mark.parametrize("read_ahead", [1, 2, 100])
def test_orbax_reader_reads_ahead_in_order(tmp_path, read_ahead, monkeypatch):
    pytest.importorskip("tensorstore")
    cfg = tiny()
    flat = random_params(cfg)
    layout.save_jax(tmp_path, flat)
    r = OrbaxReader(tmp_path / "params")
    monkeypatch.setattr(r, "read_ahead", read_ahead)
    per_layer = dict(unstack(flat, cfg.depth))
    names = list(per_layer)[::-1]
    got = list(r.iter_tensors(names))
    assert [n for n, _ in got] == names
    assert_bitwise(dict(got), per_layer)
    assert list(r.iter_tensors([])) == []


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
@pytest.mark.parametrize("use_ocdbt", [False, True], ids=["per-array", "ocdbt"])
def test_orbax_writer_options_all_restore_with_orbax(tmp_path, compress, use_ocdbt):
    """Every layout the one writer makes: Orbax restores it and OrbaxReader reads it, bit-exact."""
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny(depth=2)
    flat = random_params(cfg)
    per_layer = write_orbax(tmp_path / "params", flat, cfg.depth, chunk_bytes=4096, compress=compress, use_ocdbt=use_ocdbt)
    assert (tmp_path / "params" / "manifest.ocdbt").exists() == use_ocdbt
    assert {json.dumps(m["compressor"]) for m in zarr_metadata(tmp_path / "params").values()} == {
        json.dumps({"id": "zstd", "level": 1} if compress else None)
    }
    assert_bitwise(orbax_restore(tmp_path, cfg), flat)
    r = OrbaxReader(tmp_path / "params")
    assert bool(r._plain) != compress  # uncompressed arrays are read without tensorstore
    assert_bitwise(dict(r.iter_tensors(list(per_layer))), per_layer)
    r.close()
