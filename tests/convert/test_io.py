"""Lazy readers and streaming writers: safetensors (single, HF shards) and Orbax params/.

Every writer's output is read back by the real library (safetensors' own readers,
Orbax's StandardCheckpointer); every reader is fed the real library's output. Corrupt
and truncated inputs fail with a CheckpointError naming the file and the tensor.
"""

import json

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import random_params, tiny
from vitctl import checkpoint as ckpt
from vitctl.convert import io
from vitctl.convert.mapping import jax_to_torch, unstack
from vitctl.errors import CheckpointError, ConfigError

BF16 = np.dtype(ml_dtypes.bfloat16)


def torch_state(cfg=None, dtype=np.float32):
    cfg = cfg or tiny()
    return {n: np.ascontiguousarray(a).astype(dtype) for n, a in jax_to_torch(random_params(cfg), cfg).items()}


def specs(state):
    return [(n, a.shape, a.dtype) for n, a in state.items()]


def write_safetensors(d, state, max_bytes=None, order=None, metadata=None):
    w = io.SafetensorsWriter(d, specs(state), max_bytes, metadata or {"format": "pt"})
    for n in order or state:
        w.write(n, state[n])
    w.close()
    return w.files


def assert_bitwise(got, want):
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape, n
        assert got[n].tobytes() == np.ascontiguousarray(want[n]).tobytes(), n


# Sizes and shard plans.
@pytest.mark.parametrize(
    "text,n",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("123", 123),
        ("64kib", 65536),
        ("10 MB", 10**7),
        (4096, 4096),
    ],
)
def test_parse_size(text, n):
    assert io.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB", "5 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="invalid size") as e:
        io.parse_size(text)
    assert "5GB" in e.value.hint and e.value.exit_code == 2


def test_plan_shards_hf_semantics():
    sizes = [("a", 4), ("b", 4), ("big", 20), ("c", 3), ("d", 5), ("e", 1)]
    assert io.plan_shards(sizes, 10) == [["a", "b"], ["big"], ["c", "d", "e"]]  # a tensor past the limit gets a shard alone
    assert io.plan_shards(sizes, None) == [["a", "b", "big", "c", "d", "e"]]
    assert io.shard_names(1) == ["model.safetensors"]
    assert io.shard_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


# safetensors writer -> the safetensors library.
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_single_file_loads_with_safetensors(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = torch_state(dtype=dtype)
    files = write_safetensors(tmp_path, state, order=list(reversed(state)), metadata={"format": "pt", "source_dtype": "float32"})
    assert files == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt", "source_dtype": "float32"}
        assert_bitwise({n: f.get_tensor(n) for n in f.keys()}, state)  # noqa: SIM118  (safe_open is not a dict)
    tensors = load_file(tmp_path / "model.safetensors")  # torch reads it without pickle
    assert tensors["head.weight"].dtype == (torch.bfloat16 if dtype == BF16 else torch.float32)
    for n, a in state.items():
        t = tensors[n].view(torch.uint16) if dtype == BF16 else tensors[n]
        np.testing.assert_array_equal(t.numpy(), a.view(t.numpy().dtype), err_msg=n)


def test_shards_and_index_load_like_transformers(tmp_path):
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    state = torch_state()
    limit = 20_000
    files = write_safetensors(tmp_path, state, limit)
    n = len(files) - 1
    assert n > 3 and files[-1] == io.INDEX and files[:-1] == io.shard_names(n)
    index = json.loads((tmp_path / io.INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in state.values())
    assert sorted(index["weight_map"]) == sorted(state)
    merged = {}
    for shard in files[:-1]:  # what transformers' sharded loader does: each shard, then the weight_map
        part = load_file(tmp_path / shard)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= limit or len(part) == 1
        assert all(index["weight_map"][k] == shard for k in part)
        merged.update({k: t.numpy() for k, t in part.items()})
    assert_bitwise(merged, state)


def test_writer_writes_a_row_stack_part_by_part(tmp_path):
    """timm's fused projections: parts (transposed views among them) land at their rows, cast, never concatenated."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    parts = (rng.normal(size=(32, 48)).astype(np.float32).T, rng.normal(size=(16, 32)).astype(np.float32), np.zeros((8, 32), np.float32))
    w = io.SafetensorsWriter(tmp_path, [("fused", (72, 32), BF16), ("other", (3,), np.float32)], None, {"format": "pt"})
    w.write("fused", io.RowStack(parts))
    w.write("other", np.arange(3, dtype=np.float32))
    w.close()
    got = load_file(tmp_path / "model.safetensors")
    assert got["fused"].tobytes() == np.concatenate(parts).astype(BF16).tobytes() and list(got["other"]) == [0, 1, 2]


def test_writer_failure_names_file(tmp_path):
    (tmp_path / "model.safetensors").mkdir()  # cannot be opened as a file
    with pytest.raises(CheckpointError, match="cannot write the header to .*model.safetensors"):
        io.SafetensorsWriter(tmp_path, specs(torch_state()), None, {"format": "pt"})


# safetensors reader.
def test_reader_reads_the_librarys_files_lazily(tmp_path):
    from safetensors.numpy import save_file

    state = torch_state(dtype=BF16)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    r = io.SafetensorsReader(tmp_path)
    infos = r.infos()
    assert {n: (i.shape, i.dtype) for n, i in infos.items()} == {n: (a.shape, a.dtype) for n, a in state.items()}
    assert r.metadata == {"format": "pt"}
    assert_bitwise(dict(r.iter_tensors(list(state))), state)
    r.close()


def test_reader_reads_shards(tmp_path):
    state = torch_state()
    write_safetensors(tmp_path, state, 30_000)
    with_index = io.SafetensorsReader(tmp_path)
    assert_bitwise({n: with_index.read(n) for n in state}, state)
    with_index.close()


def corrupt(path, at=None, data=None, truncate=None):
    raw = bytearray(path.read_bytes())
    if truncate is not None:
        raw = raw[:truncate]
    if data is not None:
        raw[at : at + len(data)] = data
    path.write_bytes(bytes(raw))


def header(path):
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return json.loads(path.read_bytes()[8 : 8 + n]), n


def rewrite_header(path, fn):
    """Replaces the JSON header (keeping the data bytes) after fn(header) edits it."""
    h, n = header(path)
    fn(h)
    text = json.dumps(h).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + path.read_bytes()[8 + n :])


def last_tensor(path):
    h, _ = header(path)
    return max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda p: corrupt(p, truncate=p.stat().st_size - 8), "tensor '{last}' ends at byte .* past the end of the file .*truncated"),
        (lambda p: corrupt(p, truncate=5), "5 bytes, too short for a safetensors header"),
        (lambda p: corrupt(p, 0, (10**9).to_bytes(8, "little")), "header length 1000000000 exceeds the file"),
        (lambda p: corrupt(p, 8, b"[garbage"), "header is not valid JSON"),
        (lambda p: rewrite_header(p, lambda h: h["head.bias"].update(dtype="F8")), "tensor 'head.bias' has an invalid header entry"),
        (
            lambda p: rewrite_header(p, lambda h: h["head.bias"].update(shape=[11])),
            "tensor 'head.bias' spans 40 bytes, but F32\\[11\\] needs 44",
        ),
        (
            lambda p: rewrite_header(p, lambda h: h["head.bias"].update(data_offsets=[8, 0])),
            "tensor 'head.bias' has an invalid header entry",
        ),
        (
            lambda p: rewrite_header(p, lambda h: h["head.bias"].update(data_offsets=[0, 0])),
            "tensor 'head.bias' spans 0 bytes, but F32\\[10\\] needs 40",
        ),
    ],
)
def test_reader_rejects_damaged_files(tmp_path, damage, match):
    write_safetensors(tmp_path, torch_state())
    path = tmp_path / "model.safetensors"
    match = match.replace("{last}", last_tensor(path))
    damage(path)
    with pytest.raises(CheckpointError, match=f"cannot read .*model.safetensors: ({match})") as e:
        io.SafetensorsReader(tmp_path)
    assert e.value.hint


def test_reader_rejects_overlapping_tensors(tmp_path):
    write_safetensors(tmp_path, torch_state())
    path = tmp_path / "model.safetensors"
    rewrite_header(path, lambda h: h["head.bias"].update(data_offsets=[0, 40]))  # same bytes as the first tensor's start
    with pytest.raises(CheckpointError, match="overlap"):
        io.SafetensorsReader(tmp_path)


@pytest.mark.parametrize(
    "damage,match",
    [
        ("missing_shard", "names shard 'model-00002-of-.*', which is not a file"),
        ("bad_json", "cannot read .*model.safetensors.index.json"),
        ("total_size", "metadata.total_size is 7, but the shards hold"),
        ("unlisted", "holds tensor '.*', which the index does not assign to it"),
        ("listed_absent", "lists 1 tensor\\(s\\) its shards lack, e.g. 'ghost'"),
        ("traversal", "names shard '../model.safetensors'"),
    ],
)
def test_reader_validates_the_index(tmp_path, damage, match):
    write_safetensors(tmp_path, torch_state(), 30_000)
    index_path = tmp_path / io.INDEX
    index = json.loads(index_path.read_text())
    if damage == "missing_shard":
        next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    elif damage == "bad_json":
        index_path.write_text("{")
    elif damage == "total_size":
        index["metadata"]["total_size"] = 7
    elif damage == "unlisted":
        del index["weight_map"][next(iter(index["weight_map"]))]
    elif damage == "listed_absent":
        index["weight_map"]["ghost"] = next(iter(index["weight_map"].values()))
    elif damage == "traversal":
        (tmp_path.parent / "model.safetensors").write_bytes(b"")
        index["weight_map"]["head.bias"] = "../model.safetensors"
    if damage not in ("missing_shard", "bad_json"):
        index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        io.SafetensorsReader(tmp_path)


def test_reader_detects_truncation_after_the_header_was_read(tmp_path):
    state = torch_state()
    write_safetensors(tmp_path, state)
    path = tmp_path / "model.safetensors"
    r = io.SafetensorsReader(tmp_path)
    last = last_tensor(path)
    corrupt(path, truncate=path.stat().st_size - 8)  # shrinks while open (a concurrent writer, a failing disk)
    with pytest.raises(CheckpointError, match=f"tensor '{last}' is cut short"):
        r.read(last)
    r.close()


# Orbax params/.
def zarr_metadata(params_dir):
    """{stored array name: its .zarray}, from an OCDBT database or from one directory per array."""
    if not (params_dir / "manifest.ocdbt").exists():
        return {z.parent.name: json.loads(z.read_text()) for z in params_dir.glob("*/.zarray")}
    ts = pytest.importorskip("tensorstore")
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{params_dir.absolute()}/"}).result()
    return {k.decode()[: -len("/.zarray")]: json.loads(kv.read(k).result().value) for k in kv.list().result() if k.endswith(b"/.zarray")}


def write_orbax(params_dir, flat, depth, chunk_bytes=ckpt.CHUNK_BYTES, order=None, writer=io.OrbaxWriter):
    per_layer = dict(unstack(flat, depth))
    w = writer(params_dir, specs(per_layer), chunk_bytes)
    for n in order or per_layer:
        w.write(n, per_layer[n])
    w.close()
    return per_layer


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_orbax_writer_restores_with_orbax(tmp_path, param_dtype):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = tiny(param_dtype=param_dtype, depth=3)
    flat = {n: a.astype(BF16 if param_dtype == "bfloat16" else np.float32) for n, a in random_params(cfg).items()}
    per_layer = write_orbax(tmp_path / "params", flat, cfg.depth)
    assert ckpt.detect_formats(tmp_path) == [ckpt.JAX]
    ckpt.write_config(tmp_path, cfg, {})
    assert_bitwise(ckpt.load_jax(tmp_path, cfg), flat)  # vitctl's own loader: Orbax restore into an abstract target
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
    r = io.OrbaxReader(tmp_path / "params")
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


def write_orbax_files(params_dir, flat, depth, chunk_bytes=ckpt.CHUNK_BYTES, order=None):
    return write_orbax(params_dir, flat, depth, chunk_bytes, order, writer=io.OrbaxFilesWriter)


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
            and m["chunks"] == list(io.slab_chunks(a.shape, a.itemsize, 4096, n.startswith("blocks/")))
        )
        assert io._is_slab(a.shape, m["chunks"]) and (np.prod(m["chunks"]) * a.itemsize <= 4096 or m["chunks"][-1] == 1)
    ckpt.write_config(tmp_path, cfg, {})
    assert ckpt.detect_formats(tmp_path) == [ckpt.JAX]
    assert_bitwise(ckpt.load_jax(tmp_path, cfg), flat)  # restored by Orbax
    with ocp.StandardCheckpointer() as c:
        restored = c.restore((tmp_path / "params").absolute())
    assert restored["blocks"]["mlp_in"]["kernel"].tobytes() == flat["blocks/mlp_in/kernel"].tobytes()
    r = io.OrbaxReader(tmp_path / "params")
    assert sorted(r._plain) == sorted(flat) and not r._arrays  # no tensorstore
    assert_bitwise(dict(r.iter_tensors(names)), per_layer)


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
    assert io.slab_chunks(shape, 4, limit, stacked) == want
    assert io._is_slab(shape, want)
    runs = list(io._chunk_runs(shape, want, 4))
    assert [b - a for _, a, b in runs] == [int(np.prod(want)) * 4] * len(runs) and runs[-1][2] == int(np.prod(shape)) * 4


def test_orbax_reader_maps_page_sized_chunks(tmp_path):
    """Chunks that are whole pages are mapped in order into one array (no copy); others are read in place."""
    arrays = {"blocks/w": np.arange(3 * 2 * 1024, dtype=np.float32).reshape(3, 2, 1024), "x": np.arange(6, dtype=np.float32)}
    write_orbax_files(tmp_path / "params", arrays, 3, chunk_bytes=4096)
    r = io.OrbaxReader(tmp_path / "params")
    assert r._plain["blocks/w"].chunks == (1, 1, 1024)  # two 4 KiB chunk files per layer
    got = dict(r.iter_tensors(list(r.infos())))
    assert not got["blocks/1/w"].flags.writeable  # a view of the chunk files' pages
    assert got["blocks/1/w"].tobytes() == arrays["blocks/w"][1].tobytes() and got["x"].tobytes() == arrays["x"].tobytes()


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
    assert io._is_slab(shape, chunks) == slab


def test_orbax_files_reader_names_a_truncated_or_missing_chunk(tmp_path):
    cfg = tiny()
    flat = random_params(cfg)
    per_layer = write_orbax_files(tmp_path / "params", flat, cfg.depth, chunk_bytes=4096)
    chunk = tmp_path / "params" / "blocks.mlp_in.kernel" / "1.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-4])
    r = io.OrbaxReader(tmp_path / "params")
    with pytest.raises(CheckpointError, match=f"cannot read tensor 'blocks/1/mlp_in/kernel' from {chunk}: the chunk file holds") as e:
        dict(r.iter_tensors(list(per_layer)))
    assert "re-create" in e.value.hint
    chunk.unlink()
    with pytest.raises(CheckpointError, match=f"cannot read tensor 'blocks/1/mlp_in/kernel': chunk file {chunk} is missing"):
        r.read("blocks/1/mlp_in/kernel")
    assert r.read("blocks/0/mlp_in/kernel").tobytes() == flat["blocks/mlp_in/kernel"][0].tobytes()


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
    assert io.choose_chunks(shape, 4, limit, stacked) == want


@pytest.mark.parametrize("arrays", ["numpy", "jax"])
def test_orbax_reader_streams_save_jax_output(tmp_path, arrays):
    """Reads what Orbax itself wrote (per-process OCDBT, merged manifest), layer by layer."""
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny(depth=3, param_dtype="bfloat16")
    flat = {n: a.astype(BF16) for n, a in random_params(cfg).items()}
    if arrays == "jax":  # as `vitctl init` and training save them: jax.Array leaves, sharding metadata
        jnp = pytest.importorskip("jax.numpy")
        ckpt.save_jax(tmp_path, {n: jnp.asarray(a) for n, a in flat.items()})
    else:
        ckpt.save_jax(tmp_path, flat)
    r = io.OrbaxReader(tmp_path / "params")
    per_layer = dict(unstack(flat, cfg.depth))
    infos = r.infos()
    assert {n: (i.shape, i.dtype) for n, i in infos.items()} == {n: (a.shape, BF16) for n, a in per_layer.items()}
    assert infos["blocks/1/mlp_in/kernel"].chunk_bytes == 48 * 80 * 2  # one layer per chunk
    assert sorted(r._plain) == sorted(flat) and not r._arrays  # uncompressed: read from the data files, not by tensorstore
    assert_bitwise(dict(r.iter_tensors(list(per_layer))), per_layer)
    assert r.read("blocks/2/q/kernel").tobytes() == flat["blocks/q/kernel"][2].tobytes()


@pytest.mark.parametrize("chunk_bytes", [ckpt.CHUNK_BYTES, 1024, 96])
@pytest.mark.parametrize("direct", [True, False], ids=["in-place", "via-copy"])
def test_orbax_reader_reads_uncompressed_ocdbt_chunks_in_place(tmp_path, chunk_bytes, direct, monkeypatch):
    """Chunks cut along any axes (Orbax's subchunking): each chunk's rows land in place (os.preadv) or,
    when short, through a copy; inline values (small arrays) too. Bit-exact against Orbax's own restore."""
    monkeypatch.setattr(io, "_DIRECT_RUN_BYTES", 1 if direct else 1 << 30)
    cfg = tiny(depth=2)
    flat = random_params(cfg)
    ckpt.save_jax(tmp_path, flat, chunk_bytes=chunk_bytes)
    r = io.OrbaxReader(tmp_path / "params")
    assert sorted(r._plain) == sorted(flat) and not r._arrays
    chunks = {n: a.chunks for n, a in r._plain.items()}
    assert (chunk_bytes > 4096) == (chunks["blocks/mlp_in/kernel"] == (1, 48, 80)), chunks  # else cut inside a layer
    per_layer = dict(unstack(flat, cfg.depth))
    assert_bitwise(dict(r.iter_tensors(list(per_layer))), per_layer)
    r.close()


def test_orbax_reader_names_a_truncated_ocdbt_data_file(tmp_path):
    cfg = tiny(depth=2)
    flat = random_params(cfg)
    ckpt.save_jax(tmp_path, flat)
    r = io.OrbaxReader(tmp_path / "params")
    names = list(r.infos())
    biggest = data_files(tmp_path / "params")[-1]
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cannot read tensor '.*' from {biggest}: chunk .* past the end of the file") as e:
        list(r.iter_tensors(names))
    assert "re-create" in e.value.hint
    biggest.unlink()
    r = io.OrbaxReader(tmp_path / "params")
    with pytest.raises(CheckpointError, match=f"cannot read tensor '.*': data file {biggest} is missing"):
        list(r.iter_tensors(names))


@pytest.mark.parametrize("use_ocdbt,use_zarr3", [(False, False), (True, True), (False, True)])
def test_orbax_reader_reads_other_orbax_layouts(tmp_path, use_ocdbt, use_zarr3):
    """Orbax can also store one directory per array and zarr v3: the reader follows _METADATA."""
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = tiny()
    flat = random_params(cfg)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)) as c:
        c.save((tmp_path / "params").absolute(), ckpt._nest(flat))
    r = io.OrbaxReader(tmp_path / "params")
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
        io.OrbaxReader(orbax_params)
    assert "re-create" in e.value.hint
    meta.unlink()
    with pytest.raises(CheckpointError, match="cannot read .*_METADATA"):
        io.OrbaxReader(orbax_params)


def test_orbax_reader_names_a_missing_array(orbax_params):
    meta = json.loads((orbax_params / "_METADATA").read_text())
    meta["tree_metadata"]["('extra', 'kernel')"] = {
        "key_metadata": [{"key": "extra", "key_type": 2}, {"key": "kernel", "key_type": 2}],
        "value_metadata": {},
    }
    (orbax_params / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"cannot read array 'extra/kernel' from {orbax_params}"):
        io.OrbaxReader(orbax_params)


def data_files(params_dir):
    return sorted((p for p in params_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def test_orbax_reader_detects_truncated_data(orbax_params):
    r = io.OrbaxReader(orbax_params)
    names = list(r.infos())
    for f in data_files(orbax_params):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cannot read (tensor|array) '.*' from {orbax_params}"):
        list(r.iter_tensors(names))


def test_orbax_reader_detects_a_corrupt_manifest(orbax_params):
    (orbax_params / "manifest.ocdbt").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match=f"cannot read array '.*' from {orbax_params}"):
        io.OrbaxReader(orbax_params)


@pytest.mark.parametrize("writer", [io.OrbaxWriter, io.OrbaxFilesWriter], ids=["ocdbt", "files"])
def test_orbax_writer_waits_for_background_writes_on_abort(tmp_path, writer):
    cfg = tiny(depth=4)
    per_layer = dict(unstack(random_params(cfg), cfg.depth))
    w = writer(tmp_path / "params", specs(per_layer), ckpt.CHUNK_BYTES)
    for n in list(per_layer)[:10]:
        w.write(n, per_layer[n])
    w.abort()
    assert not (w._inflight if writer is io.OrbaxWriter else w._blocks._thread.is_alive())  # nothing writes on
    with pytest.raises(AssertionError, match="never written"):
        w.close()


@pytest.mark.parametrize("read_ahead", [1, 2, 100])
def test_orbax_reader_reads_ahead_in_order(tmp_path, read_ahead, monkeypatch):
    pytest.importorskip("tensorstore")
    cfg = tiny()
    flat = random_params(cfg)
    ckpt.save_jax(tmp_path, flat)
    r = io.OrbaxReader(tmp_path / "params")
    monkeypatch.setattr(r, "read_ahead", read_ahead)
    per_layer = dict(unstack(flat, cfg.depth))
    names = list(per_layer)[::-1]
    got = list(r.iter_tensors(names))
    assert [n for n, _ in got] == names
    assert_bitwise(dict(got), per_layer)
    assert list(r.iter_tensors([])) == []
