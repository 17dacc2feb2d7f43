"""vitctl.data.records: the packed format read back (PackedSource, pickling, shards), and every
way a packed directory can lie: manifest counts, sizes, hashes and names, truncated shards,
malformed records and labels out of range."""

import io
import json
import pickle

import numpy as np
import pytest

from vitctl.data import records
from vitctl.data.pack import pack
from vitctl.data.records import PackedSource, decode_record, describe, encode_record, is_packed, read_manifest
from vitctl.data.sources import load_dataset
from vitctl.data.sources.images import decode
from vitctl.errors import DataError

pytest.importorskip("array_record")


def write_npz(path, n=40, size=6, classes=4, seed=0, **extra):
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), labels=np.arange(n) % classes, **extra)
    return path


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A small .npz packed into 3+ train shards (so reads cross shard boundaries)."""
    root = tmp_path_factory.mktemp("packed")
    src = write_npz(root / "small.npz")
    pack(str(src), root / "p", workers=1, shard_bytes=2000)
    return root / "p", src


def copy_packed(packed, tmp_path):
    import shutil

    dst = tmp_path / "p"
    shutil.copytree(packed[0], dst)
    return dst


def edit_manifest(root, edit):
    m = json.loads((root / records.MANIFEST).read_text())
    edit(m)
    (root / records.MANIFEST).write_text(json.dumps(m))


def pixels(image_bytes, channels=3):
    return decode(io.BytesIO(image_bytes), channels)


def test_round_trip_exact_across_shards(packed):
    root, src = packed
    m = read_manifest(root)
    assert m["format"] == "vitctl-packed" and m["source"] == "small.npz" and m["split"] == {"test_fraction": 0.2, "seed": 0}
    assert len(m["splits"]["train"]["shards"]) >= 3
    names = [s["file"] for s in m["splits"]["train"]["shards"]]
    assert names == [f"train-{k:05d}-of-{len(names):05d}.array_record" for k in range(len(names))]
    for split in ("train", "test"):
        ref = load_dataset(str(src), split)
        source = PackedSource(root, split)
        assert (len(source), source.num_classes, source.channels, source.class_names) == (len(ref), 4, 3, None)
        got = [source[i] for i in range(len(source))]
        np.testing.assert_array_equal([label for _, label in got], ref.labels)
        np.testing.assert_array_equal(np.stack([pixels(b) for b, _ in got]), ref.images)
        assert source[-1] == got[-1]
        k = len(source.shards) - 1
        assert source.describe(len(source) - 1) == f"{root / source.shards[k]['file']} record {source.shards[k]['num_records'] - 1}"
        with pytest.raises(IndexError):
            source[len(source)]


def test_pickles_before_and_after_reading(packed):
    source = PackedSource(packed[0], "train")
    fresh = pickle.loads(pickle.dumps(source))
    first = source[0]  # opens a reader
    assert source._readers
    state = source.__getstate__()
    assert "_readers" not in state and "_lock" not in state
    again = pickle.loads(pickle.dumps(source))
    assert not again._readers
    assert fresh[0] == again[0] == first and again[len(again) - 1] == source[len(source) - 1]


def test_is_packed(packed, tmp_path):
    assert is_packed(packed[0]) and not is_packed(tmp_path) and not is_packed(tmp_path / "missing") and not is_packed(packed[1])
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    assert not is_packed(tmp_path)
    (tmp_path / "manifest.json").write_text("not json")
    assert not is_packed(tmp_path)


def test_record_layout():
    rec = encode_record(b"\x89PNG\r\n\x1a\nrest", 7, records.PNG)
    assert rec[:2] == b"VR" and rec[2] == 1 and rec[3] == records.PNG and len(rec) == 12 + 12
    assert int.from_bytes(rec[4:8], "little") == 7 and int.from_bytes(rec[8:12], "little") == 12
    assert decode_record(rec, 8, "x") == (b"\x89PNG\r\n\x1a\nrest", 7, records.PNG)
    for bad, why in [(rec[:5], "shorter than the 12-byte header"), (b"XX" + rec[2:], "not a vitctl record"),
                     (rec[:3] + b"\x09" + rec[4:], "image format code is 9"), (rec + b"x", "declares 12 image bytes but it holds 13")]:  # fmt: skip
        with pytest.raises(DataError, match=why):
            decode_record(bad, 8, "shard.array_record record 3")
    with pytest.raises(DataError, match=r"shard.array_record record 3: its label 7 is outside \[0, 5\)"):
        decode_record(rec, 5, "shard.array_record record 3")


def first_shard(root, split="train"):
    return read_manifest(root)["splits"][split]["shards"][0]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["splits"]["train"].update(num_examples=m["splits"]["train"]["num_examples"] + 1), "num_examples is"),
        (
            lambda m: m["splits"]["train"]["shards"][0].update(num_records=m["splits"]["train"]["shards"][0]["num_records"] + 1),
            "num_examples is",
        ),
        (lambda m: m["splits"]["train"]["shards"][0].update(bytes=m["splits"]["train"]["shards"][0]["bytes"] - 1), "the manifest says"),
        (lambda m: m["splits"]["train"]["shards"][0].update(file="../x"), r"'\.\.' segment"),
        (lambda m: m["splits"]["train"]["shards"][0].update(file="/etc/passwd"), "absolute"),
        (lambda m: m["splits"]["train"]["shards"][0].update(file="sub/x.array_record"), "not a file of the packed directory itself"),
        (lambda m: m["splits"]["train"]["shards"][0].update(bytes=-5), "bytes is -5"),
        (lambda m: m["splits"]["train"]["shards"][0].update(sha256="abc"), "not 64 hex digits"),
        (lambda m: m.update(num_classes=True), "num_classes is True"),
        (lambda m: m.update(version=2), "version 2"),
        (lambda m: m["splits"]["train"].update(class_counts=[1, 2]), "class_counts must list 4"),
        (lambda m: m["splits"].update(val=m["splits"]["test"]), "splits must hold"),
        (lambda m: m.update(class_names=["a"]), "class_names must be null or 4 strings"),
    ],
    ids=["examples", "records", "size", "dotdot", "absolute", "subdir", "negative", "sha", "bool", "version", "counts", "split", "names"],
)
def test_a_lying_manifest_is_refused(packed, tmp_path, edit, match):
    root = copy_packed(packed, tmp_path)
    edit_manifest(root, edit)
    with pytest.raises(DataError, match=match):
        PackedSource(root, "train")


def test_a_record_count_that_disagrees_with_its_shard(packed, tmp_path):
    """Counts that add up in the manifest, but not what the shard holds."""
    root = copy_packed(packed, tmp_path)

    def move_one(m):
        shards = m["splits"]["train"]["shards"]
        shards[0]["num_records"] += 1
        shards[1]["num_records"] -= 1

    edit_manifest(root, move_one)
    with pytest.raises(DataError, match=r"train-00000-of-\d{5}\.array_record: it holds \d+ records, the manifest says"):
        PackedSource(root, "train")


def test_shards_checked_by_size_and_sha256(packed, tmp_path):
    root = copy_packed(packed, tmp_path)
    shard = root / first_shard(root)["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    PackedSource(root, "train")  # verify="size" does not hash
    with pytest.raises(DataError, match=r"sha256 [0-9a-f]{64} differs from the manifest's"):
        PackedSource(root, "train", verify="sha256")
    with pytest.raises(DataError, match="sha256"):
        describe(root, verify=True)
    shard.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(DataError, match=r"is \d[\d,]* bytes; the manifest says"):
        PackedSource(root, "train")
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        PackedSource(root, "train")


def rewrite_shard(root, split, recs):
    """Replaces a split's shards by one holding `recs`, with a manifest that agrees (sizes, sha, counts)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    for s in read_manifest(root)["splits"][split]["shards"]:
        (root / s["file"]).unlink()
    path = root / records.shard_name(split, 0, 1)
    w = ArrayRecordWriter(str(path), "group_size:1,uncompressed")
    for r in recs:
        w.write(r)
    w.close()

    def edit(m):
        counts = [0] * m["num_classes"]
        counts[0] = len(recs)
        shard = {"file": path.name, "num_records": len(recs), "bytes": path.stat().st_size, "sha256": records.sha256_file(path)}
        m["splits"][split] = {"num_examples": len(recs), "class_counts": counts, "shards": [shard]}

    edit_manifest(root, edit)
    return path


def test_a_hostile_record_is_named(packed, tmp_path):
    root = copy_packed(packed, tmp_path)
    image = PackedSource(packed[0], "train")[0][0]
    path = rewrite_shard(root, "train", [encode_record(image, 0, records.PNG), encode_record(image, 99, records.PNG), b"junk"])
    source = PackedSource(root, "train", verify="sha256")  # the manifest agrees: only reading the record tells
    assert source[0][1] == 0
    with pytest.raises(DataError, match=rf"{path.name} record 1: its label 99 is outside \[0, 4\)"):
        source[1]
    with pytest.raises(DataError, match=rf"{path.name} record 2: it is 4 bytes, shorter than the 12-byte header"):
        source[2]
    with pytest.raises(DataError, match="record 1: its label 99"):
        describe(root, verify=True)


def test_describe_verify_checks_image_signatures(packed, tmp_path):
    root = copy_packed(packed, tmp_path)
    rewrite_shard(root, "train", [encode_record(b"GIF89a...", 0, records.PNG)])
    assert describe(root)["splits"]["train"]["num_examples"] == 1  # without --verify records are not read
    with pytest.raises(DataError, match="record 0: the image is not a PNG file"):
        describe(root, verify=True)


def test_describe(packed):
    d = describe(packed[0], verify=True)
    m = read_manifest(packed[0])
    assert d["verified"] and d["num_classes"] == 4 and d["source"] == "small.npz" and d["image_format"] == "png"
    assert d["splits"]["train"]["num_examples"] + d["splits"]["test"]["num_examples"] == 40
    assert d["splits"]["train"]["bytes"] == sum(s["bytes"] for s in m["splits"]["train"]["shards"])
    assert sum(d["splits"]["test"]["class_counts"]) == d["splits"]["test"]["num_examples"]


def test_not_a_packed_directory(tmp_path):
    with pytest.raises(DataError, match="not a packed data directory"):
        PackedSource(tmp_path, "train")
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="must hold a JSON object"):
        PackedSource(tmp_path, "train")
