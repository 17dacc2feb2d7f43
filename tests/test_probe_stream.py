"""vitctl.probe streams its data as `vitctl train` streams its held-out split: lazy.open_records +
pipeline.eval_batches, on any source train reads. A packed directory probes exactly as the
ImageFolder it was packed from, grain workers change nothing, the features are bit for bit those
of the in-memory path (load_dataset + prepare), no split is loaded whole, and the cache key comes
from the data's identity (a packed split's manifest: a cache hit reads no record).

Data: an ImageFolder of 240 scikit-learn digits (8 x 8, PNG and JPEG alternating, 10 classes).
"""

import numpy as np
import pytest

from tests.conftest import tiny
from tests.test_probe import CS, init_checkpoint
from vitctl import probe as P
from vitctl.errors import DataError

pytest.importorskip("sklearn")
pytest.importorskip("jax")
pytest.importorskip("grain")
pytest.importorskip("array_record")

PER_CLASS = 24


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCTL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(checkpoint, ImageFolder, its packed copy)."""
    from PIL import Image

    from vitctl.data.pack import pack
    from vitctl.data.sources import load_dataset

    root = tmp_path_factory.mktemp("probe-stream")
    digits = load_dataset("digits", "train", channels=1)
    for c in range(10):
        (root / "digits" / f"class{c}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(digits.labels == c)[:PER_CLASS]):
            suffix = ".png" if j % 2 else ".jpg"
            Image.fromarray(digits.images[i, :, :, 0], "L").save(root / "digits" / f"class{c}" / f"{j:03d}{suffix}")
    pack(str(root / "digits"), root / "packed", workers=1)
    return init_checkpoint(root / "ckpt", tiny()), root / "digits", root / "packed"


def features(result) -> tuple[np.ndarray, np.ndarray]:
    with np.load(result["cache_file"]) as z:
        return z["train"], z["test"]


def in_memory_features(ckpt, spec) -> tuple[np.ndarray, np.ndarray]:
    """What probe extracted before it streamed: load_dataset's splits, `prepare` per batch, the last batch zero-padded."""
    from vitctl.data.preprocess import prepare
    from vitctl.data.sources import load_dataset
    from vitctl.infer.runner import make_runner, resolve_features
    from vitctl.open import open_checkpoint

    with open_checkpoint(ckpt) as ck:
        runner = make_runner(ck, "jax", resolve_features(ck.cfg), logits=False)
        splits = [load_dataset(str(spec), s, channels=ck.cfg.channels) for s in ("train", "test")]
        bs, out = min(256, max(map(len, splits))), []
        for d in splits:
            x = [prepare(d.images[i : i + bs], ck.cfg) for i in range(0, len(d), bs)]
            x[-1] = np.concatenate([x[-1], np.zeros((bs - len(x[-1]), *x[-1].shape[1:]), np.float32)])
            out.append(np.concatenate([runner(b).features for b in x])[: len(d)])
    return out[0], out[1]


def test_a_packed_directory_probes_as_its_image_folder_and_as_the_in_memory_path(data):
    ckpt, folder, packed = data
    a = P.probe(ckpt, str(folder), backend="jax", cs=CS, shots=(1, 5))
    b = P.probe(ckpt, str(packed), backend="jax", cs=CS, shots=(1, 5))
    assert not a["cached"] and not b["cached"] and a["cache_file"] != b["cache_file"]  # two sources, two identities
    assert (a["train_size"], a["test_size"], a["num_classes"]) == (b["train_size"], b["test_size"], b["num_classes"]) == (190, 50, 10)
    assert a["linear"] == b["linear"] and a["fewshot"] == b["fewshot"]
    ref = in_memory_features(ckpt, folder)
    for x, y, r in zip(features(a), features(b), ref, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, r)


def test_workers_change_nothing(data, tmp_path, monkeypatch):
    ckpt, _, packed = data
    results = []
    for workers in (0, 2):
        monkeypatch.setenv("VITCTL_CACHE", str(tmp_path / f"cache{workers}"))
        results.append(P.probe(ckpt, str(packed), backend="jax", mode="fewshot", shots=(1, 5), workers=workers))
    assert results[0]["fewshot"] == results[1]["fewshot"]
    for x, y in zip(features(results[0]), features(results[1]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_the_split_streams_through_eval_batches_and_is_never_loaded_whole(data, monkeypatch):
    from vitctl.data import lazy, pipeline, sources

    ckpt, folder, _ = data

    def no_load(*a, **k):
        raise AssertionError("load_dataset read a whole split")

    monkeypatch.setattr(sources, "load_dataset", no_load)
    monkeypatch.setattr(lazy, "load_dataset", no_load)
    calls, eval_batches = [], pipeline.eval_batches

    def spy(records, *a, **k):
        calls.append(type(records).__name__)
        return eval_batches(records, *a, **k)

    monkeypatch.setattr(pipeline, "eval_batches", spy)
    r = P.probe(ckpt, str(folder), backend="jax", mode="fewshot", shots=(1,), use_cache=False)
    assert calls == ["ImageFolderRecords", "ImageFolderRecords"] and r["train_size"] + r["test_size"] == 10 * PER_CLASS


def test_second_probe_of_a_packed_set_reads_neither_the_model_nor_a_record(data, monkeypatch):
    from vitctl.data import pipeline
    from vitctl.data.records import PackedSource

    ckpt, _, packed = data
    first = P.probe(ckpt, str(packed), backend="jax", mode="fewshot", shots=(1, 5))
    assert not first["cached"]

    def refused(*a, **k):
        raise AssertionError("a cached probe read the data or ran the model")

    with monkeypatch.context() as m:
        for owner, name in ((P, "make_runner"), (pipeline, "eval_batches"), (PackedSource, "record"), (PackedSource, "__getitem__")):
            m.setattr(owner, name, refused)
        second = P.probe(ckpt, str(packed), backend="jax", mode="fewshot", shots=(1, 5))
    assert second["cached"] and second["fewshot"] == first["fewshot"]  # the labels came from the entry

    x_train, x_test = features(first)
    P.save_cached(P.Path(first["cache_file"]), "stale", x_train, x_test)  # a key of another data set: recomputed
    third = P.probe(ckpt, str(packed), backend="jax", mode="fewshot", shots=(1, 5))
    assert not third["cached"] and "stored key differs" in third["notes"][0] and third["fewshot"] == first["fewshot"]


def test_the_data_hash_follows_the_content(data, tmp_path):
    """Another pixel, another label or another split gives another identity; a packed split's comes from its manifest."""
    import shutil
    from types import SimpleNamespace

    from vitctl.data.lazy import open_records
    from vitctl.data.pipeline import InMemoryRecords
    from vitctl.data.records import PackedSource

    _, folder, packed = data
    copy = shutil.copytree(folder, tmp_path / "copy")

    def identity(spec, **split):
        split = {"channels": 3, "test_fraction": 0.2, "seed": 0, **split}
        return P.data_hash(*(open_records(str(spec), s, **split) for s in ("train", "test")), settings=split)

    base = identity(folder)
    assert identity(copy) == base  # where the files lie is not what they are
    assert identity(folder, seed=1) != base
    img = next((copy / "class3").glob("*.png"))
    img.write_bytes(next((copy / "class4").glob("*.png")).read_bytes())
    assert identity(copy) != base
    images = np.zeros((4, 2, 2, 1), np.uint8)
    a, b = (InMemoryRecords(SimpleNamespace(images=images, labels=y, num_classes=2)) for y in ([0, 1, 0, 1], [0, 1, 1, 0]))
    assert P.data_hash(a, settings={}) != P.data_hash(b, settings={})
    records = PackedSource(packed, "train")
    assert P.data_hash(records, settings={}) != P.data_hash(PackedSource(packed, "test"), settings={})
    records.shards = [{**s, "sha256": "0" * 64} for s in records.shards]
    assert P.data_hash(records, settings={}) != P.data_hash(PackedSource(packed, "train"), settings={})


def test_few_shot_counts_of_a_packed_set_come_from_its_manifest(data, monkeypatch):
    from vitctl.data.records import PackedSource

    ckpt, _, packed = data
    monkeypatch.setattr(P, "make_runner", lambda *a, **k: pytest.fail("the model ran before the data was checked"))
    monkeypatch.setattr(PackedSource, "__getitem__", lambda *a, **k: pytest.fail("a record was read to count the classes"))
    counts = P.class_counts(PackedSource(packed, "train"))
    assert counts.sum() == 190 and len(counts) == 10
    with pytest.raises(DataError, match=f"has {counts.min()} train example.*fewer than 100 shots"):
        P.probe(ckpt, str(packed), backend="jax", mode="fewshot", shots=(1, 100))
