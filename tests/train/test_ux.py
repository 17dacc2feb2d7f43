"""The first hour with `vitctl train`: refusals before any work, defaults that fit any step count,
watching a run from a log file, held-out evaluation during the run, a resumed run whose schedule
changes, what a published checkpoint records, and the device count on a CPU.

The runs share one compiled configuration (the vit22b-demo/4 preset on 16-px digits, batch 16,
4 steps): later runs in this process reuse its compiled step (vitctl.train.step.get_setup).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")

from vitctl.cli import main
from vitctl.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
FAST = ["--batch-size", "16", "--lr", "0.003", "--steps", "4", "--stats-every", "2"]


def run_cli(capsys, *args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code or 0, out, " ".join(err.split())


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_one_patch_per_image_is_refused(tmp_path, capsys):
    """A patch-16 preset on 16-px digits would see one token (attention entropy exactly 0): refused before any work."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--model", "vit22b-mu/16", "--data", "digits", "--out", out)
    assert code == 2 and stdout == "" and not out.exists()
    assert "Error: --model vit22b-mu/16 cuts 16-px images into 1x1 patch of 16 px: one token" in err
    assert "Hint: " in err and "--model vit22b-demo/4" in err and "--image-size 32" in err


def test_warmup_default_fits_any_step_count():
    from vitctl.train.settings import TrainConfig

    for steps in (1, 2, 5, 9, 10, 100, 300):
        assert TrainConfig(steps=steps).warmup == steps // 10
    assert TrainConfig(steps=5, cooldown=5).warmup == 0 and TrainConfig(steps=100, cooldown=95).warmup == 5
    assert TrainConfig(steps=5, warmup=3).warmup == 3  # an explicit warmup is kept
    with pytest.raises(ConfigError, match="warmup 10 \\+ cooldown 0 must be .* at most steps 5") as e:
        TrainConfig(steps=5, warmup=10)
    assert "leave --warmup out" in e.value.hint and "at most 5" in e.value.hint


def test_help_shows_every_default():
    """Every option of `vitctl train` that is not a plain on/off flag or required says what its default is."""
    import typer

    from vitctl.cli import build_app

    cmd = typer.main.get_command(build_app()).commands["train"]
    quiet = [
        p.opts[0]
        for p in cmd.params
        if not p.required and not (p.is_flag and p.default is False) and p.default is None and not p.show_default
        and p.opts[0] not in ("--config", "--coordinator", "--num-processes", "--process-id")  # none by default: said in their help
    ]  # fmt: skip
    assert quiet == []
    shown = {p.opts[0]: p.show_default for p in cmd.params}
    assert shown["--warmup"] == "steps // 10" and shown["--devices"] == "what --mesh needs"
    assert (shown["--steps"], shown["--batch-size"], shown["--lr"], shown["--model"]) == ("100", "64", "0.003", "vit22b-demo/4")


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A 4-step run of the defaults' model with an evaluation every 2 steps and a progress line for every step."""
    root = tmp_path_factory.mktemp("ux")
    out = root / "run"
    args = ["train", "--model", "vit22b-demo/4", "--data", "digits", "--out", out, *FAST, "--eval-every", "2", "--log-every-s", "0"]
    return root, out, args


def test_log_file_progress_eval_every_and_provenance(first, capsys):
    _root, out, args = first
    code, stdout, err = run_cli(capsys, *args, "--save-every", "2")
    assert code == 0, err
    # stderr is not a terminal here (captured): a plain line per step with --log-every-s 0
    for step in range(1, 5):
        assert f"step {step}/4 loss " in err
    assert "test acc" in err and "done" in err
    logged = rows(out)
    evals = {r["step"]: r["test_accuracy"] for r in logged if "test_accuracy" in r}
    assert sorted(evals) == [2, 4] and all(0 <= a <= 1 for a in evals.values())
    assert f"test accuracy {evals[4]:.4f}" in stdout
    provenance = json.loads((out / "config.json").read_text())["provenance"]
    assert provenance["class_names"] == [str(i) for i in range(10)]
    assert (provenance["test_accuracy"], provenance["test_accuracy_step"], provenance["step"]) == (evals[4], 4, 4)
    assert (provenance["source"], provenance["data"]) == ("vit22b-demo/4", "digits")


def test_checkpoint_dir_as_model_is_refused_and_its_hint_works(first, tmp_path, capsys):
    """--model CKPT_DIR would keep only its config: refused, naming --init-from (which fine-tunes its weights)
    and the config.json that trains the architecture from scratch. Following either hint (with local data)
    publishes no path."""
    root, ckpt_dir, _ = first
    out = tmp_path / "again"
    code, _stdout, err = run_cli(capsys, "train", "--model", ckpt_dir, "--data", "digits", "--out", out, *FAST)
    assert code == 2 and not out.exists()
    assert f"Error: --model {ckpt_dir} is a checkpoint directory; taking only its config would train from scratch" in err
    assert (
        f"Hint: to fine-tune its weights: --init-from {ckpt_dir}; to train its architecture from scratch: --model {ckpt_dir / 'config.json'}"
        in err
    )

    tuned = tmp_path / "tuned"
    code, _, err = run_cli(capsys, "train", "--init-from", ckpt_dir, "--data", "digits", "--out", tuned, *FAST)
    assert code == 0, err
    # From scratch (zero-init head) the first loss is ln(10) exactly; from the trained weights it is not.
    assert abs(rows(tuned)[0]["loss"] - math.log(10)) > 1e-3
    assert str(root) not in (tuned / "config.json").read_text()

    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(tmp_path / "my-digits.npz", images=np.round(d.images * 255 / 16).astype(np.uint8), labels=d.target)
    code, _, err = run_cli(capsys, "train", "--model", ckpt_dir / "config.json", "--data", tmp_path / "my-digits.npz", "--out", out, *FAST)
    assert code == 0, err
    text = (out / "config.json").read_text()
    provenance = json.loads(text)["provenance"]
    assert (provenance["source"], provenance["data"]) == ("config.json", "my-digits.npz")
    assert str(tmp_path) not in text and str(root) not in text
    assert rows(out)[0]["loss"] == pytest.approx(math.log(10), abs=1e-6)  # from scratch, as the hint says (zero-init head)


def test_resume_with_more_steps_relays_the_schedule(first, capsys):
    """--resume --steps 8 on a finished 4-step run: the cosine is laid over 8 steps, the jump is printed,
    logged (lr of step 5) and recorded; fewer steps than trained is refused."""
    from vitctl.train import optim

    _root, out, _ = first
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--steps", "2")
    assert code == 2 and "Error: --steps 2 is fewer than the 4 steps the run" in err and "Hint: pass --steps 4 or more" in err
    old, new = optim.schedule(3e-3, 4, 0), optim.schedule(3e-3, 8, 0)
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--steps", "8", "--log-every-s", "0")
    assert code == 0, err
    assert "Note: resuming at step 4 with a new schedule: cosine over 8 steps, peak lr 0.003, warmup 0" in err
    assert f"from {float(old(4)):.2e} to {float(new(4)):.2e}" in err
    logged = rows(out)
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert logged[4]["lr"] == pytest.approx(float(new(4)), rel=1e-6) and logged[3]["lr"] == pytest.approx(float(old(3)), rel=1e-6)
    (change,) = json.loads((out / "train_config.json").read_text())["schedule_changes"]
    assert change["step"] == 4 and change["lr_after"] == pytest.approx(float(new(4))) and change["lr_before"] == pytest.approx(0, abs=1e-9)
    assert json.loads((out / "config.json").read_text())["provenance"]["test_accuracy_step"] == 8


def test_mesh_shortfall_names_the_setting():
    from vitctl.train.distributed import mesh_for

    with pytest.raises(ConfigError, match="needs 16 devices, but 8 are available") as e:
        mesh_for("data=16")
    assert "--xla_force_host_platform_device_count=8: raise it to 16" in e.value.hint  # tests/conftest.py set 8


def _vitctl(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's shell: no simulated devices
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "vitctl", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def test_devices_flag_sets_the_cpu_device_count(tmp_path):
    """A fresh process (no XLA_FLAGS): --devices 2 simulates 2 devices, so a 4-device mesh is refused with the setting named."""
    r = _vitctl("train", "--mesh", "data=4", "--devices", "2", "--out", tmp_path / "run", "--steps", "2")
    text = " ".join(r.stderr.split())
    assert r.returncode == 2 and "needs 4 devices, but 2 are available" in text, text[-2000:]  # 2: --devices took effect
    assert "Hint: --devices 2 is fewer than the mesh needs: give --devices 4 or more" in text  # the setting that fell short
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mesh_on_a_cpu_needs_no_xla_flags(tmp_path):
    """`--mesh data=2,fsdp=2,tensor=2` in a fresh process without XLA_FLAGS trains on 8 simulated devices."""
    r = _vitctl("train", "--mesh", "data=2,fsdp=2,tensor=2", "--out", tmp_path / "run", "--steps", "2", "--batch-size", "8", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["steps"] == 2
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["mesh"] == "data=2,fsdp=2,tensor=2"
