"""The JAX trainer: objective and schedule, sharded vs single-device losses, exact resume
after SIGKILL (a real subprocess), resume onto another mesh shape, config checks, CLI.

Runs on the 8 simulated CPU devices of tests/conftest.py. Model: D=48, N=4, F=96, L=2,
so every sharded dimension divides over data=2,fsdp=2,tensor=2.
"""

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

from tests.train import standin
from tests.train.resume_child import child_config
from vitctl.config import ViTConfig
from vitctl.errors import ConfigError

MODEL = ViTConfig(width=48, depth=2, mlp_dim=96, num_heads=4, patch_size=4, image_size=16, num_classes=4, head_zero_init=False)
STEPS, SAVE_EVERY = 6, 2
MESH = "data=2,fsdp=2,tensor=2"
# Measured: sharded and single-device losses differ by at most ~5e-7 (relative ~3e-7) over
# these steps (reduction order of the sharded matmuls); 1e-5 leaves headroom.
SHARDED_RTOL = 1e-5
REPO = Path(__file__).resolve().parents[2]


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run(out, mesh="", **kw):
    from vitctl.train.loop import train

    tcfg = child_config(str(out.parent / "model.json"), STEPS, SAVE_EVERY, mesh)
    return train(tcfg, out, dataset=standin.make_dataset(), loader_cls=standin.Loader, prepare_fn=standin.prepare, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted runs, single-device and sharded, that the other tests compare against."""
    root = tmp_path_factory.mktemp("train")
    (root / "model.json").write_text(MODEL.to_json())
    t = time.perf_counter()
    single = run(root / "single", test_dataset=standin.make_dataset(n=40, seed=1))
    sharded = run(root / "sharded", mesh=MESH)
    return {"root": root, "single": single, "sharded": sharded, "seconds": time.perf_counter() - t}


def test_objective_schedule_and_decay_mask():
    import jax.numpy as jnp

    from vitctl.train import optim

    lr = optim.schedule(1.0, steps=10, warmup=2, kind="cosine")
    assert [float(lr(s)) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert float(lr(10)) == pytest.approx(0.0, abs=1e-7) and float(lr(6)) == pytest.approx(0.5, abs=1e-6)
    rs = optim.schedule(1.0, steps=100, warmup=4, kind="rsqrt", cooldown=10)
    assert float(rs(16)) == pytest.approx(0.5) and float(rs(95)) == pytest.approx(0.5 * 4 / np.sqrt(95 * 4), rel=1e-5)
    assert float(rs(100)) == 0.0
    logits, labels = jnp.array([[2.0, -1.0, 0.5]]), jnp.array([0])
    p = np.exp([2.0, -1.0, 0.5]) / np.exp([2.0, -1.0, 0.5]).sum()
    assert float(optim.objective(logits, labels, 3)) == pytest.approx(-np.log(p[0]), rel=1e-6)
    smooth = -(np.array([0.9, 0.05, 0.05]) * np.log(p)).sum()  # 0.1 smoothing over 3 classes -> 1-0.1+0.1/3 on the label
    t = np.array([1 - 0.1 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    assert float(optim.objective(logits, labels, 3, label_smoothing=0.1)) == pytest.approx(-(t * np.log(p)).sum(), rel=1e-6)
    assert smooth > 0
    sig = sum(np.log1p(np.exp(-z)) if y else np.log1p(np.exp(z)) for z, y in zip([2.0, -1.0, 0.5], [1, 0, 0]))
    assert float(optim.objective(logits, labels, 3, loss="sigmoid")) == pytest.approx(sig, rel=1e-6)
    params = {"head": {"kernel": 0, "bias": 0}, "blocks": {"q": {"kernel": 0}, "norm": {"scale": 0}}}
    assert optim._decay_mask(head=True)(params) == {
        "head": {"kernel": True, "bias": False},
        "blocks": {"q": {"kernel": False}, "norm": {"scale": False}},
    }
    assert optim._decay_mask(head=False)(params)["blocks"] == {"q": {"kernel": True}, "norm": {"scale": False}}
    with pytest.raises(ConfigError, match="unknown optimizer"):
        optim.make_optimizer(lr, "lamb")


def test_divisibility_checked_before_compiling():
    from vitctl.train.distributed import mesh_for
    from vitctl.train.settings import TrainConfig
    from vitctl.train.step import Setup

    with pytest.raises(ConfigError, match="batch size 6 does not divide over data x fsdp = 4"):
        Setup(MODEL, TrainConfig(batch_size=6), mesh_for(MESH))
    with pytest.raises(ConfigError, match="does not divide over mesh axes tensor"):
        Setup(MODEL, TrainConfig(batch_size=8), mesh_for("tensor=8"))
    with pytest.raises(ConfigError, match="needs 16 devices"):
        mesh_for("data=16")


def test_train_config_refuses_unknown_keys(tmp_path):
    from vitctl.train.settings import TrainConfig, load_yaml

    f = tmp_path / "t.yaml"
    f.write_text("steps: 3\nlearning_rate: 0.1\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) in .*: batchsize, learning_rate"):
        load_yaml(f)
    f.write_text("steps: 3\nwarmup: 1\nlr: 1\n")
    assert TrainConfig.from_dict(load_yaml(f)).lr == 1.0
    with pytest.raises(ConfigError, match="unknown optimizer .lamb."):
        TrainConfig(optimizer="lamb")


def test_run_outputs_a_checkpoint_directory(runs):
    from vitctl.formats import layout
    from vitctl.model_jax.model import abstract_model
    from vitctl.model_jax.state import flat_params, load_flat_params

    out, r = runs["root"] / "single", runs["single"]
    assert r["steps"] == STEPS and not r["interrupted"] and 0 <= r["test_accuracy"] <= 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= set(rows[0])
    stats = [row for row in rows if "attn_entropy" in row]
    assert [row["step"] for row in stats] == [2, 4, 6]
    for row in stats:  # per layer; entropy at most log(T) for T=16 tokens
        assert len(row["attn_logit_max"]) == MODEL.depth and all(0 < e <= np.log(16) + 1e-5 for e in row["attn_entropy"])
    assert rows[-1]["loss"] == r["final_loss"] and rows[-1]["loss"] < rows[0]["loss"]
    from vitctl.train.state import steps

    assert steps(out / "state") == [2, 4, 6][-3:]  # keep=3 default
    assert layout.detect_format(out) == layout.JAX and (out / "train_config.json").is_file()
    cfg = layout.read_checkpoint_config(out)
    assert cfg == MODEL  # image size and classes from the data agree with the given model
    model = abstract_model(cfg)
    load_flat_params(model, layout.load_jax(out, cfg))  # the standard layout reads back
    assert set(flat_params(model)) == set(layout.load_jax(out, cfg))


def test_sharded_losses_match_single_device(runs):
    a, b = np.array(losses(runs["root"] / "single")), np.array(losses(runs["root"] / "sharded"))
    print(f"max |sharded - single| loss difference: {np.abs(a - b).max():.3g}; both runs {runs['seconds']:.1f}s")
    np.testing.assert_allclose(b, a, rtol=SHARDED_RTOL, atol=0)


def test_resume_onto_another_mesh(runs):
    """Save on one device, resume on data=2,fsdp=2,tensor=2: the later losses match the uninterrupted run."""
    out = runs["root"] / "moved"
    first = run(out, max_steps_this_run=3)
    assert first["steps"] == 3 and (out / "state" / "00000003").is_dir()
    second = run(out, mesh=MESH, resume=True)
    assert second["steps"] == STEPS
    np.testing.assert_allclose(losses(out), losses(runs["root"] / "single"), rtol=SHARDED_RTOL, atol=0)


def test_sigterm_saves_and_stops(runs):
    """SIGTERM mid-run: the step finishes, the state is saved, the run returns interrupted."""
    out = runs["root"] / "terminated"

    def on_log(rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    r = run(out, on_log=on_log)
    assert r["interrupted"] and r["signal"] == signal.SIGTERM and r["steps"] == 3
    from vitctl.train.state import latest

    assert latest(out / "state") == 3 and (out / "params").is_dir()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(runs, tmp_path):
    """A run killed with SIGKILL after a checkpoint, resumed, logs exactly the uninterrupted losses."""
    root, out = runs["root"], runs["root"] / "killed"
    env = {**os.environ, "VITCTL_TEST_JAX_CACHE": str(tmp_path / "jax-cache"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.train.resume_child", str(out), str(root / "model.json"), str(STEPS), str(SAVE_EVERY)]
    child = subprocess.Popen([*cmd, "--slow-after", "3"], cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (out / "state" / "00000002" / "meta.json").is_file():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.1)
    while len(losses(out)) < 3:  # let it run past the checkpoint, so resuming redoes logged steps
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    from vitctl.train.state import latest

    assert 2 <= latest(out / "state") < STEPS
    subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, check=True, capture_output=True)
    assert losses(out) == losses(root / "single")  # bit-for-bit, every step


@pytest.mark.slow
def test_cli_train_on_digits(tmp_path):
    """`vitctl train` end to end on the real digits data: YAML + flags, --json summary, config errors exit 2."""
    pytest.importorskip("sklearn")
    from typer.testing import CliRunner

    from vitctl.cli import app

    model = tmp_path / "m.json"
    model.write_text(ViTConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4, num_classes=10).to_json())
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text(f"model: {model}\ndata: digits\nsteps: 50\nbatch_size: 16\nstats_every: 0\n")
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    r = runner.invoke(app, ["train", "--config", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "stepz" in str(r.exception)
    r = runner.invoke(app, ["train", "--config", str(yaml_file), "--out", str(tmp_path / "x"), "--batch-size", "6", "--mesh", "data=4"])
    assert "does not divide" in str(r.exception) and not (tmp_path / "x").exists()
    run_dir = tmp_path / "run"
    args = ["--steps", "3", "--warmup", "1", "--lr", "0.003", "--dtype", "bfloat16", "--remat", "--json"]
    r = runner.invoke(app, ["train", "--config", str(yaml_file), "--out", str(run_dir), *args])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert np.isfinite(summary["final_loss"]) and 0 <= summary["test_accuracy"] <= 1
    assert set(summary) == {"steps", "final_loss", "test_accuracy", "seconds", "images_per_s", "out"} and summary["steps"] == 3
    stored = json.loads((run_dir / "train_config.json").read_text())
    assert stored["steps"] == 3 and stored["batch_size"] == 16 and stored["model_config"]["image_size"] == 16
    assert stored["model_config"]["dtype"] == "bfloat16" and stored["model_config"]["remat"] is True
    r = runner.invoke(app, ["train", "--config", str(yaml_file), "--out", str(run_dir)])
    assert "already exists" in str(r.exception)
