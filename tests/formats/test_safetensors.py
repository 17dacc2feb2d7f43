"""vitctl.formats.safetensors: shard plans, the streaming writer and the lazy reader (single file, HF shards).

Every writer's output is read back by the real library (safetensors' own readers); the reader
is fed the real library's output. Corrupt and truncated inputs fail with a CheckpointError
naming the file and the tensor.
"""

import json

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import random_params, tiny
from tests.formats.orbax_testing import assert_bitwise, specs
from vitctl.convert.mapping import jax_to_torch
from vitctl.errors import CheckpointError
from vitctl.formats.safetensors import INDEX, RowStack, SafetensorsReader, SafetensorsWriter, plan_shards, shard_names

BF16 = np.dtype(ml_dtypes.bfloat16)


def torch_state(cfg=None, dtype=np.float32):
    cfg = cfg or tiny()
    return {n: np.ascontiguousarray(a).astype(dtype) for n, a in jax_to_torch(random_params(cfg), cfg).items()}


def write_safetensors(d, state, max_bytes=None, order=None, metadata=None):
    w = SafetensorsWriter(d, specs(state), max_bytes, metadata or {"format": "pt"})
    for n in order or state:
        w.write(n, state[n])
    w.close()
    return w.files


# Shard plans.
def test_plan_shards_hf_semantics():
    sizes = [("a", 4), ("b", 4), ("big", 20), ("c", 3), ("d", 5), ("e", 1)]
    assert plan_shards(sizes, 10) == [["a", "b"], ["big"], ["c", "d", "e"]]  # a tensor past the limit gets a shard alone
    assert plan_shards(sizes, None) == [["a", "b", "big", "c", "d", "e"]]
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


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
    assert n > 3 and files[-1] == INDEX and files[:-1] == shard_names(n)
    index = json.loads((tmp_path / INDEX).read_text())
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
    w = SafetensorsWriter(tmp_path, [("fused", (72, 32), BF16), ("other", (3,), np.float32)], None, {"format": "pt"})
    w.write("fused", RowStack(parts))
    w.write("other", np.arange(3, dtype=np.float32))
    w.close()
    got = load_file(tmp_path / "model.safetensors")
    assert got["fused"].tobytes() == np.concatenate(parts).astype(BF16).tobytes() and list(got["other"]) == [0, 1, 2]


def test_writer_failure_names_file(tmp_path):
    (tmp_path / "model.safetensors").mkdir()  # cannot be opened as a file
    with pytest.raises(CheckpointError, match="cannot write the header to .*model.safetensors"):
        SafetensorsWriter(tmp_path, specs(torch_state()), None, {"format": "pt"})


# safetensors reader.
def test_reader_reads_the_librarys_files_lazily(tmp_path):
    from safetensors.numpy import save_file

    state = torch_state(dtype=BF16)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    r = SafetensorsReader(tmp_path)
    infos = r.infos()
    assert {n: (i.shape, i.dtype) for n, i in infos.items()} == {n: (a.shape, a.dtype) for n, a in state.items()}
    assert r.metadata == {"format": "pt"}
    assert_bitwise(dict(r.iter_tensors(list(state))), state)
    r.close()


def test_reader_reads_shards(tmp_path):
    state = torch_state()
    write_safetensors(tmp_path, state, 30_000)
    with_index = SafetensorsReader(tmp_path)
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
        SafetensorsReader(tmp_path)
    assert e.value.hint


def test_reader_rejects_overlapping_tensors(tmp_path):
    write_safetensors(tmp_path, torch_state())
    path = tmp_path / "model.safetensors"
    rewrite_header(path, lambda h: h["head.bias"].update(data_offsets=[0, 40]))  # same bytes as the first tensor's start
    with pytest.raises(CheckpointError, match="overlap"):
        SafetensorsReader(tmp_path)


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
    index_path = tmp_path / INDEX
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
        SafetensorsReader(tmp_path)


def test_reader_detects_truncation_after_the_header_was_read(tmp_path):
    state = torch_state()
    write_safetensors(tmp_path, state)
    path = tmp_path / "model.safetensors"
    r = SafetensorsReader(tmp_path)
    last = last_tensor(path)
    corrupt(path, truncate=path.stat().st_size - 8)  # shrinks while open (a concurrent writer, a failing disk)
    with pytest.raises(CheckpointError, match=f"tensor '{last}' is cut short"):
        r.read(last)
    r.close()
