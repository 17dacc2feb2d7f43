"""`vitctl train` on its streaming input pipeline (vitctl.data.pipeline): an ImageFolder the test
writes (JPEG and PNG files of several sizes, read on demand), grain workers, augmentation.

- A run killed with SIGKILL after a checkpoint (its grain workers too), resumed, logs exactly the
  losses of an uninterrupted run, with 2 workers per process.
- A 2-process run (1 worker each) stopped at step 3 resumes in 1 process: the global data position
  carries over, and each process's own record (grain's state) is in state/<step>/data/.
- mixup and cutmix (soft targets, their own compiled step) train and resume exactly.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("grain")

from tests.train.mp_child import STREAM_MESH, stream_config
from vitctl.config import ViTConfig

MODEL = ViTConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4, image_size=16, num_classes=3, head_zero_init=False)
STEPS, SAVE_EVERY = 8, 2
AUG = "inception_crop|flip_lr"
REPO = Path(__file__).resolve().parents[2]
MP_RTOL = 1e-5  # 2 processes vs 1: the reductions run in another order (tests/train/test_multiprocess.py)


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def write_folder(root: Path) -> Path:
    """ROOT/<class>/<i>.{jpg,png}: 3 classes x 12 images, 20..39 px, each class a bright square in its own corner."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "fox")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            h, w = 20 + (i * 7) % 20, 20 + (i * 3) % 20
            im = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            im[(h // 2) * (c % 2) : (h // 2) * (c % 2 + 1), (w // 2) * (c // 2) : (w // 2) * (c // 2 + 1)] += 150
            Image.fromarray(im).save(root / name / (f"{i:02d}.jpg" if i % 2 else f"{i:02d}.png"), quality=90)
    return root


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """The ImageFolder, the model, and the uninterrupted run (2 grain workers) the others compare against."""
    from vitctl.train.loop import train

    root = tmp_path_factory.mktemp("stream")
    (root / "model.json").write_text(MODEL.to_json())
    data = write_folder(root / "photos")
    tcfg = stream_config(str(root / "model.json"), STEPS, SAVE_EVERY, str(data), 2, AUG)
    result = train(tcfg, root / "whole")
    return {"root": root, "data": data, "model": str(root / "model.json"), "tcfg": tcfg, "result": result}


def test_streamed_run_trains_and_records_each_process(stream):
    r, out = stream["result"], stream["root"] / "whole"
    assert r["steps"] == STEPS and 0 <= r["test_accuracy"] <= 1 and r["skipped_examples"] == 0
    assert len(losses(out)) == STEPS and all(np.isfinite(losses(out)))
    meta = json.loads((out / "state" / f"{STEPS:08d}" / "meta.json").read_text())
    assert meta["data"]["epoch"] * 3 + meta["data"]["step_in_epoch"] == STEPS  # 28 training images: 3 steps of 8 per epoch
    own = json.loads((out / "state" / f"{STEPS:08d}" / "data" / "process_0-of-1.json").read_text())
    assert own["position"] == meta["data"] and own["workers"] == 2 and own["grain"]
    stored = json.loads((out / "train_config.json").read_text())
    assert (stored["workers"], stored["augment"], stored["mixup"]) == (2, AUG, 0.0)


@pytest.mark.slow
def test_sigkill_with_workers_resumes_bit_identically(stream, tmp_path):
    """SIGKILL to the run and its grain workers after a checkpoint; the resumed run logs exactly the uninterrupted losses."""
    out = tmp_path / "killed"
    env = {**os.environ, "VITCTL_TEST_JAX_CACHE": str(tmp_path / "jax-cache"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.train.resume_child", str(out), stream["model"], str(STEPS), str(SAVE_EVERY),
           "--stream", str(stream["data"]), "--workers", "2", "--augment", AUG]  # fmt: skip
    child = subprocess.Popen([*cmd, "--slow-after", "3"], cwd=REPO, env=env, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "state" / "00000002" / "meta.json").is_file() or len(losses(out)) < 3:
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the run and its grain workers (its session)
        child.wait()
        child.stderr.close()
    from vitctl.train.state import latest

    assert 2 <= latest(out / "state") < STEPS
    subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, check=True, capture_output=True)
    assert losses(out) == losses(stream["root"] / "whole")  # bit for bit, every step


@pytest.mark.slow
def test_mixup_and_cutmix_train_and_resume(stream, tmp_path):
    from vitctl.train.loop import train

    tcfg = stream_config(stream["model"], 6, SAVE_EVERY, str(stream["data"]), 0, AUG, mixup=0.4, cutmix=1.0)
    whole = train(tcfg, tmp_path / "whole")
    assert whole["steps"] == 6 and 0 <= whole["test_accuracy"] <= 1
    first = train(tcfg, tmp_path / "split", max_steps_this_run=3)
    assert first["steps"] == 3
    train(tcfg, tmp_path / "split", resume=True)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    plain = losses(stream["root"] / "whole")[:6]
    assert all(np.isfinite(losses(tmp_path / "whole"))) and losses(tmp_path / "whole") != plain


def test_a_corrupt_file_is_named_or_skipped(stream, tmp_path):
    """A corrupt JPEG stops the run with an error naming the file; with skip_bad it is replaced and the count reported."""
    import shutil

    from vitctl.errors import DataError
    from vitctl.train.loop import train

    data = tmp_path / "photos"
    shutil.copytree(stream["data"], data)
    for f in (data / "cat").glob("*.jpg"):  # 6 of the ~29 training images: an epoch (3 steps of 8) reads some of them
        f.write_bytes(b"\xff\xd8 not a jpeg")
    tcfg = stream_config(stream["model"], 3, 0, str(data), 0, AUG)
    with pytest.raises(DataError, match=r"photos/cat/\d\d\.jpg") as e:
        train(tcfg, tmp_path / "fails")
    assert "--skip-bad" in e.value.hint and not (tmp_path / "fails").exists()
    r = train(dataclasses.replace(tcfg, skip_bad=True), tmp_path / "skips")
    assert r["steps"] == 3 and r["skipped_examples"] >= 1 and 0 <= r["test_accuracy"] <= 1


@pytest.mark.slow
def test_two_processes_resume_in_one(stream, tmp_path):
    """2 processes x 4 devices (1 grain worker each) stop at step 3; 1 process x 8 devices resumes: the same losses as 1 process throughout."""
    from tests.train.test_multiprocess import env, free_port, run_pair
    from vitctl.train.loop import train

    tcfg = stream_config(stream["model"], 6, SAVE_EVERY, str(stream["data"]), 1, AUG, mesh=STREAM_MESH)
    train(tcfg, tmp_path / "one")
    out, port = tmp_path / "two", free_port()
    cmds = [[sys.executable, "-m", "tests.train.mp_child", str(out), stream["model"], str(i), str(port), "--stream", str(stream["data"]),
             *(["--sigterm-at", "3"] if i else [])] for i in (0, 1)]  # fmt: skip
    p0, p1 = run_pair(cmds, [env(tmp_path, 0), env(tmp_path, 1)])
    assert p0.returncode == 0 and p1.returncode == 0, (p0.stderr[-3000:], p1.stderr[-3000:])
    r = json.loads(p0.stdout.strip().splitlines()[-1])
    assert r["interrupted"] and r["steps"] == 3
    state = out / "state" / "00000003"
    records = [json.loads((state / "data" / f"process_{i}-of-2.json").read_text()) for i in (0, 1)]
    assert [(d["process_index"], d["process_count"]) for d in records] == [(0, 2), (1, 2)] and all(d["grain"] for d in records)
    assert records[0]["position"] == records[1]["position"] == json.loads((state / "meta.json").read_text())["data"]
    np.testing.assert_allclose(losses(out), losses(tmp_path / "one")[:3], rtol=MP_RTOL, atol=0)
    r = train(tcfg, out, resume=True)
    assert r["steps"] == 6
    np.testing.assert_allclose(losses(out), losses(tmp_path / "one"), rtol=MP_RTOL, atol=0)
