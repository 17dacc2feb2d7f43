"""`vitctl train` against hostile data, settings and faults.

Hostile data sets (corrupt or lying .npz and IDX files, decompression bombs, garbage images),
garbage --config files and --mesh specs, a damaged training state on --resume, full disks
(RLIMIT_FSIZE) and SIGTERM/SIGINT at points found by waiting on what the run writes (never on
a clock). A refused run exits 1 or 2 with one Error: line, changes nothing and leaves no
temporary; a stopped run leaves either nothing or a complete state that resumes.
"""

import json
import os
import shutil
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.adversarial.conftest import assert_refused, leftovers, run_vitctl, start_vitctl, wait_for

pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")
from PIL import Image

MODEL = {"width": 16, "depth": 1, "mlp_dim": 32, "num_heads": 2, "patch_size": 4}
FAST = ["--steps", "2", "--warmup", "0", "--batch-size", "8", "--stats-every", "0"]
GIB = 2**30


def temporaries(root: Path) -> list[str]:
    """vitctl's temporaries (leftovers()) plus the training state's `.tmp-<step>` and Orbax's own."""
    found = set(leftovers(root))
    for p in root.rglob("*"):
        if p.name.startswith(".tmp-") or "orbax-checkpoint-tmp" in p.name or ".params.tmp-" in p.name:
            found.add(str(p.relative_to(root)))
    return sorted(found)


def model_json(root: Path) -> Path:
    (root / "m.json").write_text(json.dumps(MODEL))
    return root / "m.json"


def train(sandbox, *args, **kw):
    return run_vitctl("train", "--model", "m.json", *FAST, *args, cwd=sandbox.root, **kw)


def refused(sandbox, r, code, says, allowed=()):
    assert_refused(r, sandbox, code=code, says=says, allowed=allowed)
    assert temporaries(sandbox.root) == []


def write_idx(path: Path, header_shape, payload: bytes, code=0x08):
    path.write_bytes(struct.pack(">BBBB", 0, 0, code, len(header_shape)) + struct.pack(f">{len(header_shape)}I", *header_shape) + payload)


@pytest.fixture
def sb(sandbox):
    model_json(sandbox.root)
    return sandbox


# --------------------------------------------------------------------------- hostile data


def test_corrupt_npz(sb):
    (sb.root / "d.npz").write_bytes(b"PK\x03\x04" + os.urandom(300))
    sb.before()
    refused(sb, train(sb, "--data", "d.npz", "--out", "run"), 1, "cannot read")


@pytest.mark.parametrize(
    "arrays, says",
    [
        ({"images": np.zeros((20, 8), np.uint8), "labels": np.zeros(20, np.int64)}, "images must be"),  # 2-D images
        ({"images": np.zeros((20, 8, 8, 2), np.uint8), "labels": np.zeros(20, np.int64)}, "images must be"),  # 2 channels
        ({"images": np.zeros((20, 8, 8), np.uint8), "labels": np.zeros((20, 2), np.int64)}, "labels of shape"),
        ({"images": np.zeros((20, 8, 8), np.uint8), "labels": np.zeros(20, np.float32)}, "not integers"),
        ({"images": np.full((20, 8, 8), np.nan, np.float32), "labels": np.zeros(20, np.int64)}, "range over"),
        ({"images": np.zeros((20, 8, 8), np.uint8), "labels": np.r_[np.arange(19), 10**9]}, "class indices"),
        ({"x_train": np.zeros((20, 8, 8), np.uint8), "y_train": np.r_[np.arange(19), -3]}, "outside [0,"),
    ],
    ids=["2d-images", "2-channels", "2d-labels", "float-labels", "nan-pixels", "huge-label", "negative-label"],
)
def test_npz_wrong_shapes_dtypes_labels(sb, arrays, says):
    np.savez(sb.root / "d.npz", **arrays)
    sb.before()
    refused(sb, train(sb, "--data", "d.npz", "--out", "run"), 1, says)


def test_npz_of_python_objects_is_not_unpickled(sb):
    np.savez(sb.root / "d.npz", images=np.array([object()] * 4, dtype=object), labels=np.zeros(4, np.int64))
    sb.before()
    refused(sb, train(sb, "--data", "d.npz", "--out", "run"), 1, "python objects")


def test_npz_member_declaring_terabytes(sb):
    """A few hundred bytes whose .npy header declares 100 TB: refused from the header, under RLIMIT_AS."""
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (100000, 1000, 1000), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64
    with zipfile.ZipFile(sb.root / "d.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", npy)
        buf = __import__("io").BytesIO()
        np.save(buf, np.zeros(100000, np.int64))
        z.writestr("labels.npy", buf.getvalue())
    sb.before()
    refused(sb, train(sb, "--data", "d.npz", "--out", "run", memory=3 * GIB), 1, "of memory")


def test_idx_header_lies_about_its_size(sb):
    """The header declares a million 1000x1000 images; the file holds 100 bytes. Refused before reading, under RLIMIT_AS."""
    write_idx(sb.root / "x-images-idx3-ubyte", (10**6, 1000, 1000), b"\0" * 100)
    write_idx(sb.root / "x-labels-idx1-ubyte", (10**6,), b"\0" * 100)
    sb.before()
    refused(sb, train(sb, "--data", "x-images-idx3-ubyte", "--out", "run", memory=3 * GIB), 1, "IDX header")


def test_idx_gzip_bomb(sb):
    """A gzip that declares 20 8x8 images but inflates to 200 MB: read up to the declared size, then refused."""
    import gzip
    import zlib

    head = struct.pack(">BBBB3I", 0, 0, 8, 3, 20, 8, 8)
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    body = comp.compress(head) + b"".join(comp.compress(b"\0" * 2**20) for _ in range(200)) + comp.flush()
    (sb.root / "x-images-idx3-ubyte.gz").write_bytes(body)
    (sb.root / "x-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 20) + bytes(range(2)) * 10))
    assert (sb.root / "x-images-idx3-ubyte.gz").stat().st_size < 2**20
    sb.before()
    refused(sb, train(sb, "--data", "x-images-idx3-ubyte.gz", "--out", "run", memory=3 * GIB), 1, "more than")


def png_declaring(path: Path, width: int, height: int):
    """A PNG whose header declares width x height 8-bit grey pixels, with a few bytes of image data."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def image_folder(root: Path, n=6):
    for c in ("a", "b"):
        for i in range(n):
            (root / "imgs" / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "imgs" / c / f"{i}.png")
    return root / "imgs"


def test_image_folder_decompression_bomb(sb):
    """A 200-byte PNG declaring 60000 x 60000 pixels (3.6 GB decoded): refused from its header, under RLIMIT_AS."""
    folder = image_folder(sb.root)
    (folder / "c").mkdir()
    png_declaring(folder / "c" / "bomb.png", 60000, 60000)  # a class of one: always in the train split
    sb.before()
    refused(sb, train(sb, "--data", "imgs", "--out", "run", memory=3 * GIB), 1, "bomb.png")


def test_image_folder_garbage_image(sb):
    folder = image_folder(sb.root)
    (folder / "c").mkdir()
    (folder / "c" / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    sb.before()
    refused(sb, train(sb, "--data", "imgs", "--out", "run"), 1, "x.jpg")


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "text, says",
    [
        ("[" * 5000 + "]" * 5000, "t.yaml"),  # nests past the parser's recursion
        ("a: &a [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1 if i else ''}, *a{i - 1 if i else ''}]\n" for i in range(40)), "unknown key"),
        ("steps: [1, {x: [2]}]\n", "steps must be int"),
        ('{"steps": 2, "mesh": {"data": 2}}', "mesh must be str"),
        ("\x00\x01\x02 binary \xff", "t.yaml"),
        ("- 1\n- 2\n", "mapping"),
    ],
    ids=["deep", "billion-laughs", "nested-value", "json-object", "binary", "list"],
)
def test_garbage_config(sb, text, says):
    (sb.root / "t.yaml").write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
    sb.before()
    refused(sb, train(sb, "--data", "digits", "--config", "t.yaml", "--out", "run"), 2, says)


@pytest.mark.parametrize(
    "mesh, says",
    [("data=2,data=2", "'data' is given twice"), ("fsdp=1,tensor=1,fsdp=1", "'fsdp' is given twice"),
     ("data=0", "positive integer"), ("data=-2", "positive integer"), ("pipeline=2", "unknown mesh axis"), ("data", "positive integer")],
)  # fmt: skip
def test_bad_mesh(sb, mesh, says):
    sb.before()
    refused(sb, train(sb, "--data", "digits", "--mesh", mesh, "--out", "run"), 2, says)


def test_test_fraction_out_of_range(sb):
    sb.before()
    refused(sb, train(sb, "--data", "digits", "--test-fraction", "1.5", "--out", "run"), 2, "test_fraction")


# --------------------------------------------------------------------------- saved state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with states at steps 2 and 4 (copied by each test)."""
    root = tmp_path_factory.mktemp("trained")
    model_json(root)
    r = run_vitctl("train", "--model", "m.json", "--data", "digits", "--out", "run", "--steps", "4", "--save-every", "2", "--warmup", "0",
                   "--batch-size", "8", "--stats-every", "0", cwd=root)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


@pytest.mark.parametrize("damage", ["truncate", "garble", "meta-json", "missing-tree"])
def test_damaged_state_on_resume(sb, trained, damage):
    """The latest state is damaged: named, the previous complete step offered, the run left exactly as it was."""
    shutil.copytree(trained, sb.root / "run")
    state = sb.root / "run" / "state" / "00000004"
    data = max((p for p in (state / "tree").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        for p in (state / "tree").rglob("*"):
            if p.is_file() and p.parent.name == "d":
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    elif damage == "garble":
        for p in (state / "tree").rglob("*"):
            if p.is_file() and p.parent.name == "d":
                b = bytearray(p.read_bytes())
                b[len(b) // 4 : len(b) // 4 + 64] = os.urandom(64)
                p.write_bytes(bytes(b))
    elif damage == "meta-json":
        (state / "meta.json").write_text('{"step": 4, "data": ')
    else:
        shutil.rmtree(state / "tree")
    assert data.exists() or damage == "missing-tree"
    sb.before()
    r = run_vitctl("train", "--out", "run", "--resume", "--steps", "6", cwd=sb.root)
    refused(sb, r, 1, "state of step 4")
    text = " ".join(r.stderr.split())
    assert "damaged" in text and "resume from step 2" in text and str(state) in text, text
    assert "tensorstore_spec" not in text and len(r.stderr) < 2000, r.stderr


def test_state_of_other_settings_is_not_called_damaged(sb, trained):
    shutil.copytree(trained, sb.root / "run")
    sb.before()
    r = run_vitctl("train", "--out", "run", "--resume", "--steps", "6", "--optimizer", "adafactor", cwd=sb.root)
    refused(sb, r, 1, "does not fit these settings")
    assert "damaged" not in r.stderr


def test_file_size_limit_during_the_first_save(sb):
    """RLIMIT_FSIZE below the state's size: refused before Orbax writes; a new run leaves no directory at all."""
    sb.before()
    r = train(sb, "--data", "digits", "--out", "run", file_size=64 * 1024)
    refused(sb, r, 1, "File too large")
    assert "ulimit -f" in r.stderr and not (sb.root / "run").exists()


def test_force_over_an_earlier_run_that_then_fails_gives_it_back(sb, trained):
    """--force sets the earlier run aside until the new one saves a state: a new run that fails at its
    first save (file-size limit) leaves the earlier run exactly as it was."""
    shutil.copytree(trained, sb.root / "run")
    sb.before()
    r = train(sb, "--data", "digits", "--out", "run", "--force", file_size=64 * 1024)
    refused(sb, r, 1, "File too large")
    assert complete_states(sb.root / "run") == [2, 4]


def test_file_size_limit_on_resume_keeps_the_run(sb, trained):
    shutil.copytree(trained, sb.root / "run")
    sb.before()
    r = run_vitctl("train", "--out", "run", "--resume", "--steps", "6", cwd=sb.root, file_size=64 * 1024)
    refused(sb, r, 1, "cannot save the training state of step 6", allowed=("run/metrics.jsonl", "run/train_config.json"))
    assert "step 4, is intact" in " ".join(r.stderr.split())


# --------------------------------------------------------------------------- signals


def complete_states(run: Path) -> list[int]:
    from vitctl.train.state import steps

    found = steps(run / "state")
    for s in found:
        d = run / "state" / f"{s:08d}"
        assert json.loads((d / "meta.json").read_text())["step"] == s
        assert (d / "tree" / "_CHECKPOINT_METADATA").is_file()
    return found


def test_sigterm_while_loading_data(sb):
    """SIGTERM while the data set is being read (blocked on a FIFO image): nothing written, exit 143."""
    folder = image_folder(sb.root)
    (folder / "c").mkdir()
    fifo = folder / "c" / "slow.png"
    os.mkfifo(fifo)
    sb.before()
    p = start_vitctl("train", "--model", "m.json", *FAST, "--data", "imgs", "--out", "run", cwd=sb.root)

    def reader_waiting():
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until vitctl opens the FIFO to read it
        except OSError:
            return False
        reader_waiting.fd = fd
        return True

    wait_for(reader_waiting, p, "vitctl to open the image")
    p.send_signal(signal.SIGTERM)
    img = __import__("io").BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(img, "PNG")
    os.set_blocking(reader_waiting.fd, True)
    os.write(reader_waiting.fd, img.getvalue())
    os.close(reader_waiting.fd)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Interrupted:" in err and "nothing was written" in err and "Traceback" not in err, err[-3000:]
    assert sb.changed(allowed=("imgs/c/slow.png",)) == [] and not (sb.root / "run").exists()


def test_sigint_around_the_first_step(sb):
    """SIGINT once the run directory exists (compiling or in the first step): either nothing left, or a complete state."""
    sb.before()
    p = start_vitctl("train", "--model", "m.json", "--data", "digits", "--out", "run", "--steps", "50", "--warmup", "0",
                     "--batch-size", "8", "--stats-every", "0", cwd=sb.root)  # fmt: skip
    wait_for(lambda: (sb.root / "run" / "config.json").is_file(), p, "the run directory")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130 and "Interrupted:" in err and "Traceback" not in err, err[-3000:]
    if "nothing was written" in err:
        assert not (sb.root / "run").exists()
    else:
        assert complete_states(sb.root / "run") and "--resume" in err
    assert temporaries(sb.root) == []


def test_sigterm_during_a_save_then_resume(sb):
    """SIGTERM while a state is being written: that save completes, exit 143, and the run resumes from it."""
    sb.before()
    p = start_vitctl("train", "--model", "m.json", "--data", "digits", "--out", "run", "--steps", "40", "--save-every", "1",
                     "--warmup", "0", "--batch-size", "8", "--stats-every", "0", cwd=sb.root)  # fmt: skip
    state = sb.root / "run" / "state"
    wait_for(lambda: state.is_dir() and any(q.name.startswith(".tmp-") for q in state.iterdir()), p, "a save to start")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    text = " ".join(err.split())
    assert p.returncode == 128 + signal.SIGTERM and "Interrupted: signal 15" in text and "Traceback" not in err, err[-3000:]
    found = complete_states(sb.root / "run")
    assert found and f"the training state of step {found[-1]} is saved" in text
    assert temporaries(sb.root) == []
    r = run_vitctl("train", "--out", "run", "--resume", "--steps", str(found[-1] + 1), cwd=sb.root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert complete_states(sb.root / "run")[-1] == found[-1] + 1 and temporaries(sb.root) == []
