"""vitctl.data.pack and `vitctl data pack|info`: every source read back exactly through
PackedSource, the same shards for any worker count, bad images and folders named, and an
output that exists only when complete (errors, Ctrl-C, SIGTERM, SIGKILL and --force)."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vitctl.data import records
from vitctl.data.pack import pack
from vitctl.data.records import PackedSource, read_manifest
from vitctl.data.sources import load_dataset
from vitctl.data.sources.images import decode
from vitctl.errors import ConfigError, DataError, OutputExistsError, ResourceError

pytest.importorskip("array_record")
from PIL import Image

REPO = Path(__file__).parents[2]


def vitctl(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "vitctl", *map(str, args)], capture_output=True, text=True, env=env, check=False, **kwargs)


def read_back(root, split, channels=3):
    source = PackedSource(root, split)
    items = [source[i] for i in range(len(source))]
    return np.stack([decode(io.BytesIO(b), channels) for b, _ in items]).reshape(len(items), *decode(io.BytesIO(items[0][0]), channels).shape[:2], -1), np.array([label for _, label in items])  # fmt: skip


def assert_same_as_load_dataset(root, spec, channels=3, **options):
    for split in ("train", "test"):
        ref = load_dataset(str(spec), split, channels=channels, **options)
        images, labels = read_back(root, split, channels)
        np.testing.assert_array_equal(labels, ref.labels)
        np.testing.assert_array_equal(images, ref.images)


def image_folder(root, n=6, classes=("cat", "dog", "emu"), size=(10, 12)):
    """ROOT/<class>/ with PNG and JPEG files (alternating), of one size."""
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            im = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            im.save(root / c / f"{i}.png") if i % 2 else im.save(root / c / f"{i}.jpg", quality=90)
    return root


def no_leftovers(dst):
    return not dst.exists() and not [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


# --------------------------------------------------------------------------- sources read back exactly


def test_digits(tmp_path):
    summary = pack("digits", tmp_path / "d", workers=1)
    assert summary["examples"] == 1797 and summary["splits"]["test"]["num_examples"] == 359 and summary["skipped"] == 0
    m = read_manifest(tmp_path / "d")
    assert (m["source"], m["num_classes"], m["class_names"][:2], m["image_format"]) == ("digits", 10, ["0", "1"], "png")
    assert m["split"] == {"test_fraction": 0.2, "seed": 0}
    assert_same_as_load_dataset(tmp_path / "d", "digits")


def test_image_folder_keeps_file_bytes_and_any_worker_count_writes_the_same_shards(tmp_path):
    src = image_folder(tmp_path / "photos", n=40)
    s1 = pack(str(src), tmp_path / "w1", workers=1, shard_bytes=10_000)
    s2 = pack(str(src), tmp_path / "w2", workers=2, shard_bytes=10_000)
    assert s2["workers"] == 2 and s1["examples"] == s2["examples"] == 120
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir()) and len(files) > 3
    for name in files:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    m = read_manifest(tmp_path / "w1")
    assert m["class_names"] == ["cat", "dog", "emu"] and m["image_format"] == "png+jpeg" and m["source"] == "photos"
    # keep: each record holds its file's own bytes, in the order load_dataset reads them
    source = PackedSource(tmp_path / "w1", "train")
    paths = sorted(src.rglob("*.*"))
    originals = {p.read_bytes() for p in paths}
    assert all(source[i][0] in originals for i in range(len(source)))
    assert_same_as_load_dataset(tmp_path / "w1", src)


def test_npz_with_its_own_test_split_and_one_channel(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (30, 7, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", x_train=x[:20], y_train=np.arange(20) % 3, x_test=x[20:], y_test=np.arange(10) % 3)
    pack(str(tmp_path / "s.npz"), tmp_path / "p", workers=1, channels=1)
    m = read_manifest(tmp_path / "p")
    assert m["split"] == {"from": "source"} and m["channels"] == 1 and m["splits"]["test"]["num_examples"] == 10
    assert_same_as_load_dataset(tmp_path / "p", tmp_path / "s.npz", channels=1)


def test_hugging_face_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})

    def split(n):
        images = [Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)

    datasets.DatasetDict({"train": split(12), "test": split(6)}).save_to_disk(str(tmp_path / "hf"))
    pack(str(tmp_path / "hf"), tmp_path / "p", workers=1)
    m = read_manifest(tmp_path / "p")
    assert m["class_names"] == ["a", "b"] and m["splits"]["train"]["class_counts"] == [6, 6] and m["source"] == "hf"
    assert_same_as_load_dataset(tmp_path / "p", tmp_path / "hf")


def test_jpeg_output(tmp_path):
    src = image_folder(tmp_path / "photos", n=4)
    summary = pack(str(src), tmp_path / "j", workers=1, image_format="jpeg", jpeg_quality=80)
    m = read_manifest(tmp_path / "j")
    assert m["image_format"] == "jpeg" and m["jpeg_quality"] == 80 and summary["image_format"] == "jpeg"
    images, labels = read_back(tmp_path / "j", "train")
    ref = load_dataset(str(src), "train")
    np.testing.assert_array_equal(labels, ref.labels)
    assert np.abs(images.astype(int) - ref.images).mean() < 40  # lossy, but the same pictures


# --------------------------------------------------------------------------- bad input: named, nothing left


def test_a_truncated_jpeg_is_named_and_nothing_is_written(tmp_path):
    src = image_folder(tmp_path / "photos")
    bad = src / "dog" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:-200])
    with pytest.raises(DataError, match=rf"cannot decode image {bad}: .*truncated"):
        pack(str(src), tmp_path / "p", workers=2)
    assert no_leftovers(tmp_path / "p")


def test_skip_bad_counts_and_names(tmp_path):
    src = image_folder(tmp_path / "photos")
    (src / "cat" / "fake.png").write_text("not an image")
    trunc = src / "emu" / "0.jpg"
    trunc.write_bytes(trunc.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"cannot decode image {src / 'cat' / 'fake.png'}"):
        pack(str(src), tmp_path / "p", workers=1, test_fraction=0.5)
    assert no_leftovers(tmp_path / "p")
    summary = pack(str(src), tmp_path / "p", workers=1, skip_bad=True, test_fraction=0.5)
    assert summary["skipped"] == 2 and set(summary["skipped_files"]) == {str(src / "cat" / "fake.png"), str(trunc)}
    assert summary["examples"] == 18 - 2 + 1  # 19 files, 2 unreadable
    assert (
        read_manifest(tmp_path / "p")["splits"]["train"]["num_examples"] + read_manifest(tmp_path / "p")["splits"]["test"]["num_examples"]
        == 17
    )


def test_an_empty_class_folder_is_named(tmp_path):
    src = image_folder(tmp_path / "photos")
    (src / "fox").mkdir()
    with pytest.raises(DataError, match=rf"class folder {src / 'fox'} holds no images"):
        pack(str(src), tmp_path / "p", workers=1)
    assert no_leftovers(tmp_path / "p")


def test_a_label_out_of_range_is_named(tmp_path):
    np.savez(tmp_path / "s.npz", images=np.zeros((6, 4, 4), np.uint8), labels=np.array([0, 1, -3, 1, 0, 1]))
    with pytest.raises(DataError, match=r"s\.npz \(all\) row 2 has label -3, outside \[0, 2\)"):
        pack(str(tmp_path / "s.npz"), tmp_path / "p", workers=1)
    assert no_leftovers(tmp_path / "p")


def test_bad_options(tmp_path):
    for options, match in [({"image_format": "gif"}, "unknown image format"), ({"jpeg_quality": 0}, "jpeg_quality"),
                           ({"shard_bytes": "lots"}, "invalid size"), ({"channels": 2}, "channels"), ({"test_fraction": 1.0}, "test_fraction"),
                           ({"workers": 0}, "workers")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            pack("digits", tmp_path / "p", **options)
    assert no_leftovers(tmp_path / "p")


def test_too_little_disk_is_refused_up_front(tmp_path, monkeypatch):
    import vitctl.untrusted

    monkeypatch.setattr(vitctl.untrusted, "free_disk", lambda path: (1000, Path(path)))
    src = image_folder(tmp_path / "photos")
    with pytest.raises(ResourceError, match=r"packing .*photos \(at least, as keep\) writes [\d.]+ MiB; .* has 0\.0 MiB free"):
        pack(str(src), tmp_path / "p", workers=1)
    assert no_leftovers(tmp_path / "p")


# --------------------------------------------------------------------------- the output: --force, temporaries


def test_force_replaces_only_a_packed_directory(tmp_path):
    np.savez(tmp_path / "s.npz", images=np.zeros((10, 4, 4), np.uint8), labels=np.arange(10) % 2)
    pack(str(tmp_path / "s.npz"), tmp_path / "p", workers=1)
    with pytest.raises(OutputExistsError, match="already exists"):
        pack(str(tmp_path / "s.npz"), tmp_path / "p", workers=1)
    before = read_manifest(tmp_path / "p")
    pack(str(tmp_path / "s.npz"), tmp_path / "p", workers=1, force=True, seed=1)
    assert read_manifest(tmp_path / "p")["split"]["seed"] == 1 != before["split"]["seed"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a packed data directory .*notes.txt"):
        pack(str(tmp_path / "s.npz"), mine, workers=1, force=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    # --force keeps the old one when the new pack fails
    np.savez(tmp_path / "s.npz", images=np.zeros((10, 4, 4), np.uint8), labels=-np.arange(10))
    with pytest.raises(DataError):
        pack(str(tmp_path / "s.npz"), tmp_path / "p", workers=1, force=True)
    assert read_manifest(tmp_path / "p")["split"]["seed"] == 1


def a_slow_folder(root):
    """100 images of class a (80 in train: more than one worker task), then a FIFO named like an
    image in class b: a pack blocks on it, having written records, until it is killed."""
    image_folder(root, n=100, classes=("a",), size=(4, 4))
    (root / "b").mkdir()
    fifo = root / "b" / "blocks.png"
    os.mkfifo(fifo)
    return fifo


def wait_for_a_shard(proc, dst):
    """Waits, on the process, until its temporary holds a shard (records were written)."""
    deadline = time.monotonic() + 120  # only so that a broken pack fails the test instead of hanging it
    while proc.poll() is None and time.monotonic() < deadline:
        tmp = [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp-")]
        if tmp and any(p.suffix == ".array_record" for p in tmp[0].iterdir()):
            return tmp[0]
        time.sleep(0.01)
    pytest.fail(f"vitctl data pack ended before it was killed: {proc.returncode} {proc.stderr.read()}")


def popen(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "vitctl", *map(str, args)], env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_pack_leaves_nothing(tmp_path, sig):
    fifo = a_slow_folder(tmp_path / "src")
    dst = tmp_path / "out"
    proc = popen("data", "pack", tmp_path / "src", dst, "--workers", "2")
    try:
        wait_for_a_shard(proc, dst)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 130, proc.stderr.read()
        assert "Interrupted: nothing was written." in proc.stderr.read()
        assert no_leftovers(dst)
    finally:
        proc.kill()
        fifo.unlink()


def test_a_killed_pack_leaves_a_temporary_that_the_next_pack_removes(tmp_path):
    fifo = a_slow_folder(tmp_path / "src")
    dst = tmp_path / "out"
    proc = popen("data", "pack", tmp_path / "src", dst, "--workers", "1")
    try:
        tmp = wait_for_a_shard(proc, dst)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        fifo.unlink()
    assert tmp.is_dir() and not dst.exists()
    (tmp_path / "src" / "b" / "0.png").write_bytes((tmp_path / "src" / "a" / "1.png").read_bytes())
    r = vitctl("data", "pack", tmp_path / "src", dst, "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert f"removed {tmp}, a temporary left by an interrupted vitctl data pack" in r.stderr
    assert (
        not tmp.exists()
        and read_manifest(dst)["splits"]["train"]["num_examples"] + read_manifest(dst)["splits"]["test"]["num_examples"] == 101
    )


def test_a_temporary_of_a_live_or_foreign_run_is_left_alone(tmp_path):
    np.savez(tmp_path / "s.npz", images=np.zeros((10, 4, 4), np.uint8), labels=np.arange(10) % 2)
    live = tmp_path / ".p.tmp-0000abcd"
    live.mkdir()
    (live / ".vitctl-owner.json").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "start": None}))
    theirs = tmp_path / ".p.tmp-0000beef"
    theirs.mkdir()
    (theirs / "photo.jpg").write_text("a user's file")
    pack(str(tmp_path / "s.npz"), tmp_path / "p", workers=1)
    assert live.is_dir() and (theirs / "photo.jpg").is_file()


# --------------------------------------------------------------------------- the command


def test_cli_pack_and_info(tmp_path):
    src = image_folder(tmp_path / "photos")
    r = vitctl("data", "pack", src, tmp_path / "p", "--workers", "2", "--shard-size", "1MB", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["examples"] == 18 and summary["splits"]["train"]["shards"] == 1 and summary["images_per_s"] > 0
    r = vitctl("data", "pack", src, tmp_path / "p")
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr
    r = vitctl("data", "info", tmp_path / "p", "--verify")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and "cat" in r.stdout and "photos" in r.stdout
    info = json.loads(vitctl("data", "info", tmp_path / "p", "--json").stdout)
    assert info["num_classes"] == 3 and info["splits"]["train"]["num_examples"] == summary["splits"]["train"]["num_examples"]
    r = vitctl("data", "pack", src, tmp_path / "q", "--workers", "1")
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "q")
    assert "18 examples (train 15, test 3)" in r.stderr and "images/s" in r.stderr


def test_a_failed_write_is_named_and_leaves_nothing(tmp_path):
    """A file-size limit (as a full disk would) stops the pack at the first shard it cannot write."""
    import resource

    src = image_folder(tmp_path / "photos", n=30)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    r = vitctl("data", "pack", src, tmp_path / "p", "--workers", "1", preexec_fn=limit)
    assert r.returncode == 1 and f"Error: cannot write {tmp_path}/.p.tmp-" in r.stderr and "File too large" in r.stderr, r.stderr
    assert no_leftovers(tmp_path / "p")


def test_cli_errors(tmp_path):
    src = image_folder(tmp_path / "photos")
    (src / "cat" / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing else")
    r = vitctl("data", "pack", src, tmp_path / "p", "--workers", "1")
    assert r.returncode == 1 and f"Error: cannot decode image {src / 'cat' / 'fake.png'}" in r.stderr and "--skip-bad" in r.stderr
    assert no_leftovers(tmp_path / "p")
    r = vitctl("data", "pack", src, tmp_path / "p", "--workers", "1", "--skip-bad")
    assert r.returncode == 0 and "skipped 1 unreadable images: " + str(src / "cat" / "fake.png") in r.stderr
    shard = next((tmp_path / "p").glob("train-*.array_record"))
    shard.write_bytes(shard.read_bytes()[:1000])
    r = vitctl("data", "info", tmp_path / "p")
    assert r.returncode == 1 and f"Error: shard {shard} is 1,000 bytes; the manifest says" in r.stderr
    r = vitctl("data", "pack", "nowhere", tmp_path / "x")
    assert r.returncode == 1 and "no such data source: nowhere" in r.stderr
    r = vitctl("data", "pack", "digits", tmp_path / "x", "--image-format", "gif")
    assert r.returncode == 2
    assert records.is_packed(tmp_path / "p") and not (tmp_path / "x").exists()
