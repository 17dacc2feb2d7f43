"""`vitctl train --backend torch`: the PyTorch twin trained by the JAX trainer's rules (vitctl.train.torch_loop).

- One process: a digits run through the CLI whose loss falls, with metrics.jsonl's keys, held-out
  accuracy and a vitctl-torch checkpoint that `vitctl convert torch-to-jax` and `vitctl verify` read.
- Exact resume: a run killed (SIGKILL) after a saved state, resumed, logs bit for bit the losses
  of an uninterrupted run (deterministic algorithms, one thread, one process).
- Two processes (FSDP2 over Gloo, the environment torchrun sets): per-step losses equal to one
  process's within MP_RTOL; SIGTERM to one process stops both at one step with a saved state;
  that state resumes on one process. The same through `torchrun -m vitctl train`.
- --remat gives the step it replaces; --dtype bfloat16 trains with finite losses over float32 weights.
- Bad input: --mesh/--devices with torch, an existing --out, resuming with another backend.
"""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from tests.conftest import tiny
from vitctl.cli import main

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300
# Measured (2 processes vs 1, tiny model, digits, batch 32, AdamW, steps 1-3; then the 2-process
# state resumed on 1 process, steps 4-6): max relative loss difference 8.4e-8 (steps 5-6 bit-identical).
# The losses differ by fp32 round-off only: FSDP2 averages two half-batch gradients where one
# process takes the mean over the whole batch. 1e-5 (the JAX trainer's 2-process tolerance) leaves headroom.
MP_RTOL = 1e-5


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_cli(capsys, *args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code or 0, out, " ".join(err.split())


@pytest.fixture(scope="module")
def model_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("torch-model") / "model.json"
    path.write_text(tiny().to_json())
    return path


FAST = ["--backend", "torch", "--data", "digits", "--batch-size", "32", "--lr", "0.003"]


@pytest.fixture(scope="module")
def torch_run(model_json, tmp_path_factory):
    """A 30-step digits run through `vitctl train --backend torch --json`: (out, stdout)."""
    out = tmp_path_factory.mktemp("torch-run") / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", *FAST, "--model", str(model_json), "--out", str(out), "--steps", "30", "--stats-every", "10", "--json"])
    assert (e.value.code or 0) == 0
    return out


def test_trains_digits_into_a_checkpoint_that_convert_and_verify_read(torch_run, capsys, tmp_path):
    out = torch_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert set(rows[0]) == {"step", "loss", "grad_norm", "lr", "images_per_s"}  # the JAX trainer's keys
    assert len(rows[9]["attn_logit_max"]) == len(rows[9]["attn_entropy"]) == 2
    assert 0 < rows[-1]["test_accuracy"] <= 1
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < 0.85 * first, (first, last)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    stored = json.loads((out / "train_config.json").read_text())
    assert stored["backend"] == "torch" and stored["steps"] == 30
    state = out / "state" / "00000030"
    assert sorted(p.name for p in state.iterdir()) == ["config.json", "meta.json", "model.safetensors", "optimizer.npz"]
    assert json.loads((state / "meta.json").read_text())["backend"] == "torch"
    assert os.path.samefile(out / "model.safetensors", state / "model.safetensors")  # one copy on disk

    from vitctl.open import open_checkpoint

    with open_checkpoint(out) as ckpt:
        assert ckpt.format == "vitctl-torch" and ckpt.provenance["step"] == 30
        assert ckpt.provenance["test_accuracy"] == rows[-1]["test_accuracy"]
    pytest.importorskip("jax")
    code, stdout, err = run_cli(capsys, "convert", "torch-to-jax", out, tmp_path / "jax")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "verify", out, tmp_path / "jax", "--json")
    assert code == 0, err
    assert json.loads(stdout)["passed"] is True


def test_init_from_fine_tunes_any_checkpoint_with_a_new_head_and_grid(torch_run, tmp_path, capsys):
    """--init-from through vitctl.open: the source's weights exactly (here from a vitctl-jax copy of the run),
    a new zero head for other classes and a resampled position embedding for another image size."""
    from vitctl.open import open_checkpoint
    from vitctl.train.torch_step import source_state

    with open_checkpoint(torch_run) as ckpt:
        want = {n: torch.from_numpy(np.array(ckpt.reader.read(n))) for n in ckpt.infos}
        cfg = ckpt.cfg
    pytest.importorskip("jax")
    assert run_cli(capsys, "convert", "torch-to-jax", torch_run, tmp_path / "jax")[0] == 0
    with open_checkpoint(tmp_path / "jax") as jax_ckpt:
        got, messages = source_state(jax_ckpt, cfg, "bilinear")
    assert messages == [] and set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name

    out = tmp_path / "ft"
    code, _, err = run_cli(capsys, "train", *FAST, "--init-from", tmp_path / "jax", "--out", out, "--steps", "2", "--num-classes", "12",
                           "--image-size", "24", "--stats-every", "0")  # fmt: skip
    assert code == 0, err
    assert "--init-from: new head for 12 classes" in err and "pos_embed resampled from (1, 16, 48) to (1, 36, 48)" in err
    with open_checkpoint(out) as ft:
        assert (ft.format, ft.cfg.num_classes, ft.cfg.image_size) == ("vitctl-torch", 12, 24)
        assert ft.provenance["init_from"]["format"] == "vitctl-jax"
    assert losses(out)[0] == pytest.approx(math.log(12), rel=1e-6)  # the zero head: uniform over 12 classes


@pytest.fixture
def process_group():
    from vitctl.train import torch_dist

    _, _, started = torch_dist.init()
    yield
    if started:
        torch_dist.close()


def test_remat_gives_the_step_it_replaces(process_group):
    """One AdamW step on a digits-sized batch: the same loss, gradients and update with and without --remat."""
    from vitctl.train import torch_dist
    from vitctl.train.settings import TrainConfig
    from vitctl.train.torch_optim import make_optimizer, schedule
    from vitctl.train.torch_step import build_model, train_step

    cfg, tcfg = tiny(), TrainConfig(backend="torch", warmup=0)
    x, y = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10
    results = []
    for remat in (False, True):
        model = torch_dist.shard(build_model(cfg, 0)[0], remat=remat)
        lr_fn = schedule(tcfg.lr, tcfg.steps, 0)
        opt = make_optimizer(model, cfg, tcfg, lr_fn)
        metrics = train_step(model, opt, x, y, cfg, tcfg, lr_fn)
        results.append((metrics, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (m0, p0), (m1, p1) = results
    assert m0["loss"] == m1["loss"]
    assert m0["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-6)
    for name in p0:
        torch.testing.assert_close(p1[name], p0[name], rtol=0, atol=1e-6)


def test_bf16_with_remat_trains_with_finite_losses(model_json, tmp_path, capsys):
    out = tmp_path / "bf16"
    code, _, err = run_cli(capsys, "train", *FAST, "--model", model_json, "--out", out, "--steps", "3", "--stats-every", "0",
                                "--dtype", "bfloat16", "--remat", "--json")  # fmt: skip
    assert code == 0, err
    assert all(math.isfinite(v) for v in losses(out)) and len(losses(out)) == 3
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["dtype"] == "bfloat16" and model["remat"] is True
    from vitctl.open import open_checkpoint

    with open_checkpoint(out) as ckpt:
        assert {str(i.dtype) for i in ckpt.infos.values()} == {"float32"}  # float32 master weights


def test_bad_input_is_refused_before_any_work(model_json, torch_run, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *FAST, "--model", model_json, "--out", out, "--mesh", "data=2")
    assert code == 2 and "--mesh data=2 is JAX's device mesh" in err and "torchrun --nproc-per-node" in err and not out.exists()
    code, _, err = run_cli(capsys, "train", *FAST, "--model", model_json, "--out", out, "--devices", "2")
    assert code == 2 and "--backend torch runs one device per process" in err and not out.exists()
    code, _, err = run_cli(capsys, "train", *FAST, "--model", model_json, "--out", out, "--backend", "tensorflow")
    assert code == 2 and "unknown backend 'tensorflow'" in err
    code, _, err = run_cli(capsys, "train", *FAST, "--model", model_json, "--out", out, "--resume")
    assert code == 2 and "train_config.json not found" in err
    code, _, err = run_cli(capsys, "train", *FAST, "--model", model_json, "--out", torch_run, "--steps", "2")
    assert code == 2 and "--force" in err  # an existing run is not overwritten
    code, _, err = run_cli(capsys, "train", "--out", torch_run, "--resume", "--backend", "jax")
    assert code == 2 and "was trained with --backend torch" in err and "--backend jax cannot resume" in err


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_stopped_run_resumes_bit_identically_in_process(model_json, tmp_path, optimizer):
    """No warmup (the first update moves every weight) and, for sgd, no momentum (a stateless optimizer):
    saving and restoring leave the weights and the step count exactly as they were."""
    from vitctl.train.settings import TrainConfig
    from vitctl.train.torch_loop import train

    tcfg = TrainConfig(model=str(model_json), data="digits", steps=4, batch_size=32, lr=3e-3, warmup=0, stats_every=0, backend="torch",
                       optimizer=optimizer, momentum=0.0, weight_decay=1e-2)  # fmt: skip
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        train(tcfg, tmp_path / "whole")
        assert train(tcfg, tmp_path / "parts", max_steps_this_run=2)["saved_step"] == 2
        train(tcfg, tmp_path / "parts", resume=True)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    assert (tmp_path / "parts" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_resume_with_more_steps_tells_and_records_the_schedule_change(torch_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(torch_run, out)
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--steps", "10")
    assert code == 2 and "--steps 10 is fewer than the 30 steps" in err
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--steps", "32", "--stats-every", "0")
    assert code == 0, err
    assert "Note: resuming at step 30 with a new schedule: cosine over 32 steps" in err
    stored = json.loads((out / "train_config.json").read_text())
    assert stored["steps"] == 32 and [c["step"] for c in stored["schedule_changes"]] == [30]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 33)) and rows[30]["lr"] == stored["schedule_changes"][0]["lr_after"]


def test_a_state_of_the_other_backend_is_refused(torch_run, tmp_path):
    """The library refuses a state the JAX trainer wrote (here: its meta.json says so) with the backend to use."""
    from vitctl.errors import ConfigError
    from vitctl.train.settings import TrainConfig, read_stored
    from vitctl.train.torch_loop import train

    out = tmp_path / "run"
    shutil.copytree(torch_run, out)
    meta = out / "state" / "00000030" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "backend": "jax"}))
    with pytest.raises(ConfigError, match="written by the jax trainer") as e:
        train(TrainConfig.from_dict(read_stored(out)), out, resume=True)
    assert "--backend jax" in e.value.hint


# Several processes: each a `python -m tests.train.torch_child`, with the environment torchrun sets.
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", **extra}


def run_children(argvs: list[list[str]], envs: list[dict], module: str = "tests.train.torch_child") -> list[subprocess.CompletedProcess]:
    """Runs `python -m module *argv` for each argv at once (test_multiprocess.run_pair); waits for all of them."""
    from tests.train.test_multiprocess import run_pair  # in the function: pytest must not collect its tests here too

    return run_pair([[sys.executable, "-m", module, *map(str, a)] for a in argvs], envs)


@pytest.fixture(scope="module")
def one_process(model_json, tmp_path_factory) -> Path:
    """The uninterrupted 1-process run of torch_child's config (6 steps)."""
    out = tmp_path_factory.mktemp("torch-one") / "run"
    (p,) = run_children([[str(out), str(model_json)]], [child_env()])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_losses(one_process, model_json, tmp_path):
    out = tmp_path / "killed"
    (p,) = run_children([[str(out), str(model_json), "--kill-at", "5"]], [child_env()])
    assert p.returncode == -signal.SIGKILL
    from vitctl.train.state import steps

    assert steps(out / "state") == [2, 4] and len(losses(out)) == 5
    (p,) = run_children([[str(out), str(model_json), "--resume"]], [child_env()])
    assert p.returncode == 0, p.stderr[-3000:]
    assert losses(out) == losses(one_process)  # bit for bit, all 6 steps


@pytest.mark.slow
def test_two_processes_match_one_stop_together_and_resume_on_one(one_process, model_json, tmp_path):
    out, port = tmp_path / "mp", str(free_port())
    want = np.array(losses(one_process))
    envs = [child_env(RANK=str(i), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for i in (0, 1)]
    p0, p1 = run_children([[str(out), str(model_json)], [str(out), str(model_json), "--sigterm-at", "3"]], envs)
    assert p0.returncode == 0 and p1.returncode == 0, (p0.stderr[-3000:], p1.stderr[-3000:])
    r = json.loads(p0.stdout.strip().splitlines()[-1])
    assert r["interrupted"] and r["signal"] == signal.SIGTERM and r["steps"] == 3 and r["saved_step"] == 3 and r["processes"] == 2
    from vitctl.train.state import steps

    assert steps(out / "state") == [2, 3] and not list((out / "state").glob(".tmp-*"))
    assert json.loads((out / "state" / "00000003" / "meta.json").read_text())["processes"] == 2
    got = np.array(losses(out))
    print(f"2 processes vs 1, steps 1-3: max relative loss difference {np.max(np.abs(got - want[:3]) / want[:3]):.3g}")
    np.testing.assert_allclose(got, want[:3], rtol=MP_RTOL, atol=0)
    rows, ref = (
        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()],
        [json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines()],
    )
    np.testing.assert_allclose([r["grad_norm"] for r in rows], [r["grad_norm"] for r in ref[:3]], rtol=MP_RTOL)
    for key in ("attn_logit_max", "attn_entropy"):  # step 3 (stats every 3): each process's rows, max / mean over both
        np.testing.assert_allclose(rows[2][key], ref[2][key], rtol=MP_RTOL)

    (p,) = run_children([[str(out), str(model_json), "--resume"]], [child_env()])  # the 2-process state on 1 process
    assert p.returncode == 0, p.stderr[-3000:]
    got = np.array(losses(out))
    print(f"2-process state resumed on 1, steps 4-6: max relative loss difference {np.max(np.abs(got[3:] - want[3:]) / want[3:]):.3g}")
    np.testing.assert_allclose(got, want, rtol=MP_RTOL, atol=0)


@pytest.mark.slow
def test_torchrun_launches_the_cli(model_json, tmp_path):
    """`torchrun --nproc-per-node 2 -m vitctl train --backend torch --json`: one JSON object on stdout, from process 0."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    out = tmp_path / "run"
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "vitctl", "train", *FAST,
           "--model", str(model_json), "--out", str(out), "--steps", "2", "--json"]  # fmt: skip
    p = subprocess.run(cmd, check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout)
    assert summary["steps"] == 2 and summary["out"] == str(out) and math.isfinite(summary["final_loss"])
    assert json.loads((out / "state" / "00000002" / "meta.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_vitctl_process_flags_join_two_processes(model_json, tmp_path):
    """--coordinator HOST:PORT --num-processes 2 --process-id I (vitctl's own flags) in place of torchrun's environment."""
    out, coordinator = tmp_path / "run", f"127.0.0.1:{free_port()}"
    argvs = [["train", *FAST, "--model", model_json, "--out", out, "--steps", "2", "--stats-every", "0", "--json",
              "--coordinator", coordinator, "--num-processes", "2", "--process-id", i] for i in (0, 1)]  # fmt: skip
    p0, p1 = run_children(argvs, [child_env(), child_env()], module="vitctl")
    assert p0.returncode == 0 and p1.returncode == 0, (p0.stderr[-3000:], p1.stderr[-3000:])
    assert json.loads(p0.stdout)["steps"] == 2 and p1.stdout == ""  # results from process 0 only
    assert json.loads((out / "state" / "00000002" / "meta.json").read_text())["processes"] == 2


def test_soft_targets_give_the_objective_of_their_labels():
    """mixup / cutmix targets: soft_objective on one-hot rows is torch_optim.objective on the labels."""
    from vitctl.train.torch_optim import objective
    from vitctl.train.torch_step import soft_objective

    logits, labels = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3, 9, 1, 1, 7])
    for loss in ("softmax", "sigmoid"):
        for smoothing in (0.0, 0.1):
            want = objective(logits, labels, 10, loss, smoothing)
            got = soft_objective(logits, torch.nn.functional.one_hot(labels, 10).float(), loss, smoothing)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
