"""vitctl embed: each file format round-trips (ids, labels, values), the features are bit for bit
those `vitctl probe` extracts and caches, both backends agree, the writers' peak memory does not
grow with N, and every refusal (bad layer or pool, existing output, unknown suffix, missing
directory, empty split, too little disk, a write cut short, an interrupt) exits non-zero and
leaves no file.

Data: an ImageFolder of 36 scikit-learn digits (8 x 8 PNGs, 3 classes, train/ and test/ folders),
and digits itself for the comparison with probe (1438 train, 359 test after vitctl's split).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli.conftest import cli  # noqa: F401 (the fixture)
from tests.conftest import tiny
from tests.test_probe import init_checkpoint
from vitctl.errors import DataError, ResourceError
from vitctl.infer import embed as E

pytest.importorskip("jax")
pytest.importorskip("torch")
pytest.importorskip("grain")
pytest.importorskip("pyarrow")

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = (".safetensors", ".npy", ".parquet")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(a tiny grayscale checkpoint, an ImageFolder with train/ and test/: 3 classes, 9 + 3 images each)."""
    from PIL import Image

    from vitctl.data.sources import load_dataset

    root = tmp_path_factory.mktemp("embed")
    digits = load_dataset("digits", "train", channels=1)
    for c in range(3):
        for j, i in enumerate(np.flatnonzero(digits.labels == c)[:12]):
            part = "train" if j < 9 else "test"
            (root / "photos" / part / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(digits.images[i, :, :, 0], "L").save(root / "photos" / part / f"class{c}" / f"{j:02d}.png")
    return init_checkpoint(root / "ckpt", tiny(channels=1)), root / "photos"


def folder_files(folder: Path, split: str) -> tuple[list[str], list[int]]:
    """(paths relative to the folder, labels) of a split, in the sorted order vitctl lists them."""
    files = sorted((folder / split).glob("*/*.png"))
    return [f.relative_to(folder).as_posix() for f in files], [int(f.parent.name[-1]) for f in files]


def test_each_format_round_trips_ids_labels_and_values(data, tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    ckpt, folder = data
    monkeypatch.setattr(E, "ROW_GROUP_BYTES", 8 * 48 * 4)  # parquet: 8-row groups, so several are written
    got = {}
    for suffix in SUFFIXES:
        r = E.embed(ckpt, str(folder), tmp_path / f"e{suffix}", split="all", batch_size=5, backend="jax")
        assert (r["num_images"], r["feature_dim"], r["format"], r["bytes"]) == (
            36,
            48,
            suffix[1:],
            (tmp_path / f"e{suffix}").stat().st_size,
        )
        got[suffix] = E.read_embeddings(tmp_path / f"e{suffix}")
    (train_ids, train_labels), (test_ids, test_labels) = folder_files(folder, "train"), folder_files(folder, "test")
    ids, labels = train_ids + test_ids, train_labels + test_labels
    for suffix, (i, y, x) in got.items():
        assert i == ids, suffix  # relative to the data root: no local directory in the file
        assert y.dtype == np.int32 and y.tolist() == labels, suffix
        assert x.dtype == np.float32 and x.shape == (36, 48) and np.array_equal(x, got[".npy"][2]), suffix
    assert len(set(map(bytes, got[".npy"][2]))) == 36  # distinct images, distinct rows
    # The reference readers see the same: the safetensors library and pyarrow, with the settings in the metadata.
    st = load_file(tmp_path / "e.safetensors")
    assert np.array_equal(st["embeddings"], got[".npy"][2]) and st["id_offsets"][-1] == len(st["ids"])
    with safe_open(tmp_path / "e.safetensors", "np") as f:
        settings = json.loads(f.metadata()["vitctl"])
    assert (
        settings["data"] == "photos" and settings["checkpoint"] == "ckpt" and (settings["layer"], settings["pool"]) == ("pre_logits", "map")
    )
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(tmp_path / "e.parquet")
    assert meta.metadata.num_row_groups >= 4 and json.loads(meta.schema_arrow.metadata[b"vitctl"]) == settings
    assert np.load(tmp_path / "e.npy", allow_pickle=False)["embedding"].shape == (36, 48)  # the matrix by its field name


def test_embed_writes_the_features_probe_extracts_and_caches(data, tmp_path, monkeypatch):
    """Same checkpoint, data, layer and pool on one backend: the embedding file and probe's cache entry are equal bit for bit."""
    from vitctl import probe as P

    monkeypatch.setenv("VITCTL_CACHE", str(tmp_path / "cache"))
    ckpt, _ = data
    r = P.probe(ckpt, "digits", backend="jax", layer="block:0", mode="fewshot", shots=(1,), seeds=1)
    with np.load(r["cache_file"], allow_pickle=False) as z:
        cached = {"train": z["train"], "test": z["test"]}
    for split in ("train", "test"):
        E.embed(ckpt, "digits", tmp_path / f"{split}.safetensors", split=split, backend="jax", layer="block:0")
        ids, labels, x = E.read_embeddings(tmp_path / f"{split}.safetensors")
        assert np.array_equal(x, cached[split]), split
        assert ids[:2] == [f"digits ({split}) example 0", f"digits ({split}) example 1"] and len(ids) == len(labels) == len(x)


def test_both_backends_agree(data, tmp_path):
    ckpt, folder = data
    out = {b: E.embed(ckpt, str(folder), tmp_path / f"{b}.npy", backend=b, layer="block:-1", pool="gap") for b in ("jax", "torch")}
    assert out["jax"]["backend"] == "jax" and out["torch"]["backend"] == "torch"
    (ij, yj, xj), (it, yt, xt) = (E.read_embeddings(tmp_path / f"{b}.npy") for b in ("jax", "torch"))
    assert ij == it == folder_files(folder, "test")[0] and np.array_equal(yj, yt)
    assert np.abs(xj - xt).max() < 1e-5 and np.abs(xj).max() > 0.1


# The writers' memory: a subprocess writes N, then 4N rows of one fake batch, and reports its peak RSS after each.
MEMORY_SCRIPT = """
import json, re, sys
import numpy as np
from vitctl.infer.embed import IdSizes, write_rows

d, batch, n = 256, 512, 32768  # n rows of float32: 32 MiB of embeddings; 4n: 128 MiB
x, y = np.random.default_rng(0).standard_normal((batch, d), np.float32), np.zeros(batch, np.int32)

def batches(rows):
    for start in range(0, rows, batch):
        yield [f"img{i:07d}" for i in range(start, start + batch)], y, x

def peak():  # VmHWM: this process's own peak RSS (ru_maxrss would carry pytest's across exec)
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read())[1]) * 1024

peaks = []
for k, rows in enumerate((n, 4 * n)):
    path = f"{sys.argv[1]}/{k}.{sys.argv[2]}"
    write_rows(sys.argv[2], path, rows, d, IdSizes(rows * 10, 10), {}, batches(rows))
    peaks.append(peak())
held = np.ones((4 * n, d), np.float32)  # the control: what holding every row would cost shows in the same measure
peaks.append(peak())
print(json.dumps(peaks))
"""


@pytest.mark.parametrize("fmt", ["safetensors", "npy", "parquet"])
def test_writer_peak_memory_does_not_grow_with_n(fmt, tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), fmt], check=False, capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    small, large, control = json.loads(r.stdout)
    mib = 2**20
    assert large - small < 24 * mib, (fmt, small / mib, large / mib)  # holding the extra 3n rows would add 96 MiB
    assert control - large > 64 * mib  # the measure sees rows held in memory
    if fmt == "parquet":  # it may encode repeated values small: count the rows
        import pyarrow.parquet as pq

        assert pq.ParquetFile(tmp_path / "1.parquet").metadata.num_rows == 4 * 32768
    else:
        assert (tmp_path / f"1.{fmt}").stat().st_size > 128 * mib


# Refusals: a clear message, a non-zero exit, nothing left behind.
def assert_empty(directory: Path, *keep: str) -> None:
    assert sorted(p.name for p in directory.iterdir()) == sorted(keep)


@pytest.mark.parametrize(
    "options, code, message",
    [
        (["--layer", "block:7"], 2, "the model has 2 block(s)"),
        (["--layer", "logits"], 2, "unknown --layer 'logits'"),
        (["--layer", "block:0", "--pool", "map"], 2, "--pool map with --layer block:0"),
        (["--pool", "tok"], 2, "--pool tok with --layer pre_logits"),
        (["--batch-size", "0"], 2, "--batch-size must be at least 1"),
    ],
)
def test_impossible_choices_are_refused(cli, data, tmp_path, options, code, message):  # noqa: F811
    ckpt, folder = data
    r = cli("embed", ckpt, "--data", folder, "--out", tmp_path / "e.npy", *options)
    assert r.returncode == code and message in r.stderr and r.stdout == ""
    assert_empty(tmp_path)


def test_bad_outputs_are_refused(cli, data, tmp_path):  # noqa: F811
    ckpt, folder = data
    (tmp_path / "e.npy").write_bytes(b"mine")
    r = cli("embed", ckpt, "--data", folder, "--out", tmp_path / "e.npy")
    assert r.returncode == 2 and "already exists" in r.stderr and (tmp_path / "e.npy").read_bytes() == b"mine"
    r = cli("embed", ckpt, "--data", folder, "--out", tmp_path / "e.csv")
    assert r.returncode == 2 and "unknown file type '.csv'" in r.stderr and "*.safetensors, *.npy, *.parquet" in r.stderr
    r = cli("embed", ckpt, "--data", folder, "--out", tmp_path / "missing" / "e.npy")
    assert r.returncode == 1 and "is not a directory" in r.stderr
    assert_empty(tmp_path, "e.npy")


def test_an_empty_split_is_refused(cli, data, tmp_path):  # noqa: F811
    ckpt, _ = data
    images = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "d.npz", x_train=images, y_train=np.arange(4), x_test=images[:0], y_test=np.arange(0))
    r = cli("embed", ckpt, "--data", tmp_path / "d.npz", "--out", tmp_path / "e.parquet")
    assert r.returncode == 1 and "the test split is empty" in r.stderr
    assert_empty(tmp_path, "d.npz")


def test_too_little_disk_is_refused_with_the_numbers(data, tmp_path, monkeypatch):
    import vitctl.untrusted

    ckpt, folder = data
    monkeypatch.setattr(vitctl.untrusted, "free_disk", lambda path: (1000, Path(path)))  # a real full disk cannot be made here
    with pytest.raises(ResourceError, match=r"9 embeddings of width 48 writes .*; .* has .* free"):
        E.embed(ckpt, str(folder), tmp_path / "e.safetensors")
    assert_empty(tmp_path)


def test_an_interrupt_leaves_nothing(data, tmp_path):
    ckpt, folder = data

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        E.embed(ckpt, str(folder), tmp_path / "e.npy", split="all", batch_size=4, on_batch=stop)
    assert_empty(tmp_path)


def test_a_write_cut_short_is_named_and_leaves_nothing(data, tmp_path):
    """RLIMIT_FSIZE below the file's size (SIGXFSZ ignored): the write fails with EFBIG, as on a full disk."""
    ckpt, folder = data
    script = (
        "import resource, signal, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from vitctl.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    args = ["embed", str(ckpt), "--data", str(folder), "--split", "all", "--out", str(out / "e.safetensors"), "--backend", "torch"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", script, *args], check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 1 and f"cannot write {out}" in r.stderr and "File too large" in r.stderr, r.stderr[-2000:]
    assert_empty(out)


def test_ids_name_no_local_directory(data):
    from vitctl.data.lazy import open_records

    _, folder = data
    records = open_records(str(folder), "test", channels=1)
    assert [E.record_id(records, i) for i in range(len(records))] == folder_files(folder, "test")[0]
    assert not any(os.path.isabs(E.record_id(records, i)) for i in range(len(records)))


def test_the_reader_refuses_files_it_did_not_write_whole(tmp_path):
    rows = [(["a", "bé"], np.array([0, 1], np.int32), np.arange(6, dtype=np.float32).reshape(2, 3))]
    E.write_rows("safetensors", tmp_path / "e.safetensors", 2, 3, E.IdSizes(4, 3), {}, iter(rows))
    ids, labels, x = E.read_embeddings(tmp_path / "e.safetensors")
    assert ids == ["a", "bé"] and labels.tolist() == [0, 1] and np.array_equal(x, rows[0][2])
    data = (tmp_path / "e.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(DataError, match="does not fit the file"):
        E.read_embeddings(tmp_path / "cut.safetensors")
    np.save(tmp_path / "plain.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match="not a vitctl embeddings .npy"):
        E.read_embeddings(tmp_path / "plain.npy")
