"""Full runs through vitctl.train.loop.train and `vitctl train`: Adafactor with sharded factored
moments, sigmoid cross-entropy and the cooldown schedule on the 8-device mesh; SIGINT during
`vitctl train` reports the state it saved; bad input (missing, empty or corrupt data, labels
out of range, too few classes, a batch the mesh cannot divide, no space for a checkpoint)
gives a clear error and never a damaged latest checkpoint.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")

from vitctl.cli import main

REPO = Path(__file__).resolve().parents[2]


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run_cli(capsys, *args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def yaml_of(tcfg, path: Path) -> Path:
    import dataclasses

    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in dataclasses.asdict(tcfg).items()))
    return path


def test_adafactor_sigmoid_cooldown_sharded(reference):
    """The reference run: finite, decreasing loss; the logged learning rate follows warmup, cosine and cooldown;
    Adafactor's factored moments are sharded like their parameter minus the reduced axis."""
    import jax
    from jax.sharding import PartitionSpec as P

    from vitctl.train.distributed import mesh_for
    from vitctl.train.state import restore
    from vitctl.train.step import get_setup

    tcfg, out = reference["tcfg"], reference["out"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = np.array([r["loss"] for r in rows])
    assert np.isfinite(loss).all() and loss[-1] < loss[0] and loss[0] < 10 * math.log(2) + 1  # sigmoid: ~10 log 2 at init
    # step s (0-based) trains with lr * warmup(s) * cosine(s) * cooldown(s), computed here by hand
    s = np.arange(tcfg.steps, dtype=np.float64)
    want = (
        tcfg.lr * np.minimum(1, s / tcfg.warmup) * 0.5 * (1 + np.cos(np.pi * np.clip((s - tcfg.warmup) / (tcfg.steps - tcfg.warmup), 0, 1)))
    )
    want *= np.clip((tcfg.steps - s) / tcfg.cooldown, 0, 1)
    np.testing.assert_allclose([r["lr"] for r in rows], want, rtol=1e-6, atol=1e-12)
    assert want[-1] < 0.5 * want[-2]  # the cooldown bites on the last step

    from tests.train.conftest import MP_MODEL

    setup = get_setup(MP_MODEL, tcfg, mesh_for(tcfg.mesh))
    state, _ = restore(out / "state", tcfg.steps, setup.abstract)
    moments = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt"]):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "blocks" in names and ("v_row" in names or "v_col" in names):
            moments[
                (names[names.index("blocks") + 1], names[-1] if names[-1] != "kernel" else "v_row" if "v_row" in names else "v_col")
            ] = leaf
    # mlp_in (L, D=128, F=256) is sharded (None, fsdp, tensor): v_row drops F, v_col drops D
    assert moments[("mlp_in", "v_row")].shape == (1, 128) and moments[("mlp_in", "v_row")].sharding.spec == P(None, "fsdp")
    assert moments[("mlp_in", "v_col")].shape == (1, 256) and moments[("mlp_in", "v_col")].sharding.spec == P(None, "tensor")
    # mlp_out (L, F=256, D=128) is sharded (None, tensor, fsdp): v_row drops F, v_col drops D
    assert moments[("mlp_out", "v_row")].shape == (1, 128) and moments[("mlp_out", "v_row")].sharding.spec == P(None, "fsdp")
    assert moments[("mlp_out", "v_col")].shape == (1, 256) and moments[("mlp_out", "v_col")].sharding.spec == P(None, "tensor")
    for leaf in (moments[("mlp_in", "v_row")], moments[("mlp_in", "v_col")]):  # each device holds half
        assert {s.data.shape for s in leaf.addressable_shards} == {(1, leaf.shape[1] // 2)}
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["opt"]))


def test_sigint_reports_the_saved_state(reference, tmp_path, capsys):
    """Ctrl-C during `vitctl train`: the step finishes, the state is saved, and the message says so."""
    out = tmp_path / "run"
    cfg = yaml_of(reference["tcfg"], tmp_path / "t.yaml")

    def interrupt():  # once the run has logged a step (so the SIGINT handler is in place)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    code, stdout, stderr = run_cli(capsys, "train", "--config", cfg, "--out", out)
    t.join()
    from vitctl.train.state import latest

    step = latest(out / "state")
    assert code == 130 and stdout == "" and step is not None and 1 <= step < 6, stderr
    assert "nothing was written" not in stderr
    assert f"Interrupted: signal 2 at step {step}; the training state of step {step} is saved in {out / 'state'}" in " ".join(
        stderr.split()
    )
    assert "--resume" in stderr
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # it continues exactly
    code, stdout, stderr = run_cli(capsys, "train", "--out", out, "--resume", "--json")
    assert code is None or code == 0, stderr
    np.testing.assert_array_equal(losses(out), losses(reference["out"]))


def test_bad_input_through_the_cli(tmp_path, capsys):
    """Missing, empty and corrupt data, too few classes, an indivisible batch: exit code, Error + Hint, nothing written."""
    from tests.train.conftest import MP_MODEL

    model = tmp_path / "model.json"
    model.write_text(MP_MODEL.to_json())
    base = ["train", "--model", model, "--steps", "2", "--warmup", "0", "--batch-size", "8"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    np.savez(tmp_path / "neg.npz", images=np.zeros((20, 8, 8), np.uint8), labels=np.r_[np.arange(19), -1])
    cases = [
        (["--data", tmp_path / "missing"], 1, "no such data source"),
        (["--data", tmp_path / "empty"], 1, "no images in class subdirectories"),
        (["--data", tmp_path / "bad.npz"], 1, "cannot read"),
        (["--data", tmp_path / "neg.npz"], 1, "outside [0, 19)"),
        (["--data", "digits", "--num-classes", "5"], 2, "num_classes 5 is smaller than the data's 10 classes"),
        (
            ["--data", "digits", "--mesh", "data=2,fsdp=2,tensor=2", "--batch-size", "6"],
            2,
            "batch size 6 does not divide over data x fsdp = 4",
        ),
    ]
    for i, (args, want_code, want) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, stdout, stderr = run_cli(capsys, *base, *args, "--out", out)
        text = " ".join(stderr.split())
        assert code == want_code and want in text and "Hint: " in text and stdout == "", (args, stderr)
        assert not out.exists(), args


# Sets the file size limit, ignores SIGXFSZ (a write past the limit then fails with EFBIG), execs the CLI
# (as tests/cli/test_convert_cli.py does).
LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable, "-m", "vitctl", *sys.argv[2:]])
"""


@pytest.mark.slow
def test_no_space_for_a_checkpoint(reference, tmp_path):
    """A resumed run whose next checkpoint cannot be written (EFBIG): exit 1 with Error + Hint naming the intact
    latest state, no temporary left, and resuming from that state later gives the uninterrupted losses."""
    from vitctl.train.loop import train
    from vitctl.train.state import latest, steps

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    for s in steps(out / "state")[1:]:  # back to the state of step 2 (as if stopped there)
        shutil.rmtree(out / "state" / f"{s:08d}")
    assert latest(out / "state") == 2
    before = sorted(p.relative_to(out) for p in (out / "state").rglob("*"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}  # fmt: skip
    # 64 KiB: config and metrics files fit, the Orbax data files of the training state (~1.5 MB) do not
    p = subprocess.run([sys.executable, "-c", LIMITED, str(64 * 1024), "train", "--out", str(out), "--resume"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    text = " ".join(p.stderr.split())
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Error: cannot save the training state of step 4" in text and "File too large" in text, text[-2000:]
    assert "the latest complete state, step 2, is intact" in text and "ulimit -f" in text
    assert latest(out / "state") == 2 and sorted(p.relative_to(out) for p in (out / "state").rglob("*")) == before
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp") or ".params.tmp" in p.name]
    r = train(reference["tcfg"], out, resume=True)
    assert r["steps"] == 6
    np.testing.assert_array_equal(losses(out), losses(reference["out"]))
