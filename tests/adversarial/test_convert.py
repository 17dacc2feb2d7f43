"""Hostile checkpoints and faults against `vitctl convert`: every case built here, run in a subprocess.

Sources are tiny checkpoints written once per module (tests/conftest.py tiny()), copied into
each case's sandbox and damaged there. What each case must show (assert_refused): the exit
code, one `Error:` line and no traceback, nothing changed outside the output, no output, and
no temporary left. Signals (no `Error:` line by design: the CLI says "Interrupted") check the
same by hand.
"""

import json
import os
import random
import shutil
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.adversarial.conftest import assert_refused, leftovers, run_vitctl, start_vitctl, wait_for
from tests.conftest import random_params, tiny
from vitctl import checkpoint as ckpt
from vitctl.convert import convert as cv
from vitctl.convert.mapping import jax_to_torch
from vitctl.formats import layout

CFG = tiny()
MiB = 2**20


def write_torch(path: Path, cfg=CFG, max_shard_bytes=None) -> Path:
    path.mkdir(parents=True)
    ckpt.write_config(path, cfg, {"source_format": "init", "created_by": "test"})
    layout.save_torch(path, {n: np.ascontiguousarray(a) for n, a in jax_to_torch(random_params(cfg), cfg).items()}, max_shard_bytes)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{"torch": one model.safetensors, "sharded": shards + index, "jax": params/ in the per-array layout, "npz": big_vision}."""
    root = tmp_path_factory.mktemp("sources")
    out = {"torch": write_torch(root / "torch"), "sharded": write_torch(root / "sharded", max_shard_bytes=20_000)}
    cv.convert(out["torch"], root / "jax", "torch-to-jax")
    out["jax"] = root / "jax"
    return out


@pytest.fixture
def src(sources, sandbox):
    """copy(kind) -> a fresh copy of a source checkpoint inside the sandbox."""

    def copy(kind: str) -> Path:
        dst = sandbox.root / "src"
        shutil.copytree(sources[kind], dst, symlinks=True)
        return dst

    return copy


def convert(sandbox, direction, source, *extra, **limits):
    sandbox.before()
    return run_vitctl("convert", direction, source, sandbox.root / "out", *extra, cwd=sandbox.root, **limits)


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_header(path: Path, header: bytes | str, body: bytes) -> None:
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(len(header).to_bytes(8, "little") + header + body)


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# --- Names from an index, a manifest, a zip: no path out of the checkpoint ----------------------


def edit_json(path: Path, change) -> None:
    """Rewrites the JSON file at `path` after `change(obj)` edits it in place."""
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "a\x1b[31m.safetensors"])
def test_index_shard_names_outside_the_checkpoint(src, sandbox, shard):
    ckpt_dir = src("sharded")
    (sandbox.root / "outside.safetensors").write_bytes(next(ckpt_dir.glob("model-00001-of-*.safetensors")).read_bytes())
    edit_json(ckpt_dir / "model.safetensors.index.json", lambda index: index["weight_map"].update({"head.bias": shard}))
    r = convert(sandbox, "torch-to-jax", ckpt_dir)
    assert_refused(r, sandbox, 1, says="names shard")


def test_orbax_tree_key_leading_out_of_params(src, sandbox):
    ckpt_dir = src("jax")

    def lead_out(meta):
        entry = meta["tree_metadata"].pop("('head', 'bias')")
        entry["key_metadata"] = [{"key": "..", "key_type": 2}, {"key": "..", "key_type": 2}, {"key": "outside", "key_type": 2}]
        meta["tree_metadata"]["('..', '..', 'outside')"] = entry

    edit_json(ckpt_dir / "params" / "_METADATA", lead_out)
    r = convert(sandbox, "jax-to-torch", ckpt_dir)
    assert_refused(r, sandbox, 1, says="vitctl refuses")


def test_orbax_tree_key_with_a_slash(src, sandbox):
    ckpt_dir = src("jax")
    edit_json(
        ckpt_dir / "params" / "_METADATA",
        lambda meta: meta["tree_metadata"]["('head', 'bias')"]["key_metadata"][0].update(key="../../../etc"),
    )
    r = convert(sandbox, "jax-to-torch", ckpt_dir)
    assert_refused(r, sandbox, 1, says="one plain name")


def npz(path: Path, members: dict[str, bytes], compress=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return path


def npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../../evil.npy", "/abs/embedding/kernel.npy", "params//embedding/kernel.npy"])
def test_npz_member_names_outside_the_archive(sandbox, name):
    source = npz(sandbox.root / "vit.npz", {"params/cls.npy": npy(np.zeros((1, 1, 48), np.float32)), name: npy(np.zeros(3, np.float32))})
    r = convert(sandbox, "jax-to-torch", source)
    assert_refused(r, sandbox, 1, says="vitctl refuses")


# --- Symlinks out of the checkpoint ---------------------------------------------------------------


def test_safetensors_file_is_a_symlink_out(src, sandbox):
    ckpt_dir = src("torch")
    secret = sandbox.root / "secret.safetensors"
    (ckpt_dir / "model.safetensors").rename(secret)
    (ckpt_dir / "model.safetensors").symlink_to(secret)
    r = convert(sandbox, "torch-to-jax", ckpt_dir)
    assert_refused(r, sandbox, 1, says="leads outside the checkpoint")


def test_shard_is_a_symlink_out(src, sandbox):
    ckpt_dir = src("sharded")
    shard = next(ckpt_dir.glob("model-00002-of-*.safetensors"))
    shard.rename(sandbox.root / "elsewhere.safetensors")
    shard.symlink_to(sandbox.root / "elsewhere.safetensors")
    r = convert(sandbox, "torch-to-jax", ckpt_dir)
    assert_refused(r, sandbox, 1, says="leads outside the checkpoint")


def test_params_chunk_file_is_a_symlink_out(src, sandbox):
    ckpt_dir = src("jax")
    chunk = next(
        p for p in sorted((ckpt_dir / "params").rglob("*")) if p.is_file() and p.parent.name == "head.kernel" and not p.name.startswith(".")
    )
    (sandbox.root / "private").write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(sandbox.root / "private")
    r = convert(sandbox, "jax-to-torch", ckpt_dir)
    assert_refused(r, sandbox, 1, says="leads outside the checkpoint")


@pytest.mark.parametrize(("kind", "direction", "entry"), [("jax", "jax-to-torch", "params"), ("torch", "torch-to-jax", "config.json")])
def test_checkpoint_entry_is_a_symlink_out(src, sandbox, kind, direction, entry):
    """params/ or config.json moved out of the checkpoint and linked back in."""
    ckpt_dir = src(kind)
    (ckpt_dir / entry).rename(sandbox.root / f"outside-{entry}")
    (ckpt_dir / entry).symlink_to(sandbox.root / f"outside-{entry}")
    r = convert(sandbox, direction, ckpt_dir)
    assert_refused(r, sandbox, 1, says="leads outside the checkpoint")


def test_hugging_face_cache_snapshot_may_link_to_its_blobs(sources, sandbox):
    """The one allowed kind of link: a cache snapshot's files point into that repo's blobs/."""
    repo = sandbox.root / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sources["torch"].iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    sandbox.before()
    r = run_vitctl("convert", "torch-to-jax", snap, sandbox.root / "out", cwd=sandbox.root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sandbox.changed(allowed=("out",)) == [] and (sandbox.root / "out" / "params").is_dir()


# --- Resource exhaustion from small files -------------------------------------------------------


def with_depth(ckpt_dir: Path, depth: int) -> None:
    config = json.loads((ckpt_dir / "config.json").read_text())
    config["model"]["depth"] = depth
    (ckpt_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind,direction", [("torch", "torch-to-jax"), ("jax", "jax-to-torch")])
def test_huge_depth_config_fails_fast(src, sandbox, kind, direction):
    ckpt_dir = src(kind)
    with_depth(ckpt_dir, 4096)  # the largest depth a config may hold; the weights hold 2 layers
    r = convert(sandbox, direction, ckpt_dir, timeout=60)
    assert_refused(r, sandbox, 1, says="needs 49,169 tensors, the weights hold 41")


@pytest.mark.parametrize("depth", [200_000, 10**6])
def test_depth_beyond_any_model(src, sandbox, depth):
    ckpt_dir = src("torch")
    with_depth(ckpt_dir, depth)
    r = convert(sandbox, "torch-to-jax", ckpt_dir, timeout=60)
    assert_refused(r, sandbox, r.returncode if r.returncode in (1, 2) else 1, says="depth")


def edit_zarray(ckpt_dir: Path, array: str, **fields) -> None:
    path = ckpt_dir / "params" / array / ".zarray"
    z = json.loads(path.read_text())
    z.update(fields)
    path.write_text(json.dumps(z))


@pytest.mark.parametrize(
    "array,fields,says",
    [
        ("head.bias", {"chunks": [1 << 40]}, "larger than the array"),
        ("head.kernel", {"shape": [-48, 10]}, "must be positive"),
        ("head.kernel", {"chunks": [0, 10]}, "must be positive"),
        ("head.kernel", {"dtype": "<c16"}, "dtype"),
        ("blocks.q.kernel", {"shape": [10**9, 48, 3, 16], "chunks": [1, 48, 3, 16]}, "chunks"),
        ("head.kernel", {"shape": [48, 10**12], "chunks": [48, 10**12]}, "has shape (48, 1000000000000)"),
        ("head.bias", {"shape": "ten"}, "no valid shape"),
    ],
)
def test_hostile_zarray_metadata(src, sandbox, array, fields, says):
    ckpt_dir = src("jax")
    edit_zarray(ckpt_dir, array, **fields)
    r = convert(sandbox, "jax-to-torch", ckpt_dir, memory=4 << 30, timeout=60)
    assert_refused(r, sandbox, 1, says=says)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A big_vision .npz of a few hundred KB whose deflated head inflates to 384 MiB (and that the
    config it implies, 2^21 classes, accounts for): planning it estimates GBs."""
    from tests.convert.test_convert import BV_CFG, write_npz

    big_vision = pytest.importorskip("vitctl.convert.big_vision")
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    classes = 2**21
    small = write_npz(tmp_path_factory.mktemp("small") / "vit.npz", random_params(BV_CFG), BV_CFG)
    with zipfile.ZipFile(small) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if "/head/" not in info.filename:
                zout.writestr(info.filename, zin.read(info))
        for key, shape in (("params/head/kernel.npy", (BV_CFG.width, classes)), ("params/head/bias.npy", (classes,))):
            with zout.open(key, "w", force_zip64=True) as f:
                f.write(_npy_header(shape))
                zeros = bytes(16 * MiB)
                total = int(np.prod(shape)) * 4
                while total:
                    f.write(zeros[: min(total, len(zeros))])
                    total -= min(total, len(zeros))
    assert big_vision.NpzReader(path).header("params/head/kernel")[0] == (BV_CFG.width, classes)
    return path


def _npy_header(shape) -> bytes:
    header = {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)}
    text = repr(header).encode()
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def test_zip_bomb_refused_with_the_numbers(bomb, sandbox):
    source = sandbox.root / "bomb.npz"
    shutil.copyfile(bomb, source)
    assert source.stat().st_size < 8 * MiB
    r = convert(sandbox, "jax-to-torch", source, memory=2 << 30, timeout=120)
    assert_refused(r, sandbox, 1, says="of memory; this machine has")


def test_npz_member_lying_about_its_size(sandbox):
    source = npz(sandbox.root / "vit.npz", {"params/embedding/kernel.npy": npy(np.zeros((4, 4, 3, 48), np.float32))}, zipfile.ZIP_DEFLATED)
    data = bytearray(source.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    data[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFF0)  # uncompressed size: ~4 GiB
    source.write_bytes(bytes(data))
    r = convert(sandbox, "jax-to-torch", source, memory=2 << 30)
    assert_refused(r, sandbox, 1, says="more than deflate can expand to")


@pytest.mark.parametrize("where", ["header", "index", "metadata", "zarray"])
def test_deeply_nested_json(src, sandbox, where):
    if where == "header":
        ckpt_dir = src("torch")
        header, body = header_of(ckpt_dir / "model.safetensors")
        text = json.dumps(header)[:-1] + ', "__metadata__": ' + deep(100_000) + "}"
        write_header(ckpt_dir / "model.safetensors", text, body)
        direction = "torch-to-jax"
    elif where == "index":
        ckpt_dir = src("sharded")
        (ckpt_dir / "model.safetensors.index.json").write_text('{"metadata": ' + deep(100_000) + "}")
        direction = "torch-to-jax"
    else:
        ckpt_dir = src("jax")
        file = ckpt_dir / "params" / ("_METADATA" if where == "metadata" else "head.bias/.zarray")
        file.write_text('{"tree_metadata": ' + deep(100_000) + "}")
        direction = "jax-to-torch"
    r = convert(sandbox, direction, ckpt_dir)
    assert_refused(r, sandbox, 1, says="nests JSON")


# --- Truncated and empty sources ------------------------------------------------------------------


def test_truncated_safetensors(src, sandbox):
    ckpt_dir = src("torch")
    f = ckpt_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = convert(sandbox, "torch-to-jax", ckpt_dir)
    assert_refused(r, sandbox, 1, says="truncated")


def test_truncated_chunk_file_midway(src, sandbox):
    ckpt_dir = src("jax")
    chunk = next(p for p in sorted((ckpt_dir / "params" / "head.kernel").iterdir()) if not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes()[:-100])
    r = convert(sandbox, "jax-to-torch", ckpt_dir)
    assert_refused(r, sandbox, 1, says="head/kernel")


def test_truncated_npz(sandbox):
    source = npz(sandbox.root / "vit.npz", {"params/embedding/kernel.npy": npy(np.ones((4, 4, 3, 48), np.float32))})
    source.write_bytes(source.read_bytes()[:-200])
    r = convert(sandbox, "jax-to-torch", source)
    assert_refused(r, sandbox, 1)


@pytest.mark.parametrize("content", ["nothing", "config_only"])
def test_source_without_weights(sandbox, content):
    ckpt_dir = sandbox.root / "empty"
    ckpt_dir.mkdir()
    if content == "config_only":
        ckpt.write_config(ckpt_dir, CFG, {"created_by": "test"})
    r = convert(sandbox, "jax-to-torch", ckpt_dir)
    assert_refused(r, sandbox, 1, says="holds no weights")
    assert "other way" not in r.stderr


# --- Faults while writing ------------------------------------------------------------------------


@pytest.mark.parametrize("direction,kind", [("torch-to-jax", "torch"), ("jax-to-torch", "jax")])
def test_full_disk_during_convert(src, sandbox, direction, kind):
    ckpt_dir = src(kind)
    r = convert(sandbox, direction, ckpt_dir, file_size=4096)  # the output's files reach 15-215 KB
    assert_refused(r, sandbox, 1, says="cannot write")


def test_read_only_output_parent(src, sandbox):
    ckpt_dir = src("torch")
    sandbox.before()
    if os.geteuid() == 0:  # root writes through permission bits: use a directory no one may create entries in
        dst = Path("/sys/vitctl-adversarial/out")
    else:
        (sandbox.root / "ro").mkdir()
        (sandbox.root / "ro").chmod(0o555)
        sandbox.before()
        dst = sandbox.root / "ro" / "out"
    try:
        r = run_vitctl("convert", "torch-to-jax", ckpt_dir, dst, cwd=sandbox.root)
    finally:
        if (sandbox.root / "ro").exists():
            (sandbox.root / "ro").chmod(0o755)
    assert_refused(r, sandbox, 1)
    assert not dst.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("seed", [0, 1])
def test_signal_at_a_random_point_during_convert(src, sandbox, signum, seed):
    """The signal arrives after a random number of tensors is written (the test waits for that many
    chunk files in the temporary, no clock): exit 130, and nothing is left."""
    ckpt_dir = src("torch")
    sandbox.before()
    after = random.Random(seed).randrange(1, 20)
    proc = start_vitctl(
        "convert", "torch-to-jax", ckpt_dir, sandbox.root / "out", cwd=sandbox.root, env={"VITCTL_TEST_SLEEP_PER_TENSOR": "0.2"}
    )

    def written() -> int:
        tmp = leftovers(sandbox.root)
        if not tmp:
            return 0
        return sum(1 for p in (sandbox.root / tmp[0] / "params").rglob("*") if p.is_file() and not p.name.startswith("."))

    wait_for(lambda: written() >= after, proc, f"{after} chunk files in the temporary")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Interrupted" in err and "Traceback" not in err and "Error:" not in err, err[-2000:]
    assert sandbox.changed() == [] and leftovers(sandbox.root) == []
