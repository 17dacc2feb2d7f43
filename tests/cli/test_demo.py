"""`vitctl demo`, the README's main job: train on digits -> convert -> verify -> probe, atomically,
with an honest exit code; and the training plot that `vitctl train` leaves beside its run.

A short run (--steps) of the demo's own model: the full 300-step recipe is `make demo`.
The `vitctl train` call below uses the demo's model (the vit22b-demo/4 preset) and compiled
settings, so it reuses the compiled step functions of the demo run in the same process.
"""

import json

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")
pytest.importorskip("sklearn")

from vitctl.cli import demo as demo_cli

STEPS = 6


def png(path):
    """The decoded image (PIL verifies the PNG signature, chunks and CRCs)."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return np.asarray(im)


def tamper(run):
    """A CHECK step that changes one torch weight before verify runs: a real mismatch."""
    from safetensors.numpy import load_file, save_file

    f = run.root / "torch" / "model.safetensors"
    tensors = load_file(f)
    tensors["head.weight"] = tensors["head.weight"] + 1e-2
    save_file(tensors, f, metadata={"format": "pt"})


def test_demo_trains_converts_verifies_and_exit_codes(tmp_path, cli, monkeypatch):
    out = tmp_path / "demo"
    r = cli("demo", "--out", out, "--steps", STEPS)
    assert r.returncode == 0, r.stderr
    assert "PASSED" in r.stdout and "test accuracy" in r.stdout and "[3/4] verify" in r.stderr and "[4/4] probe" in r.stderr
    assert "probe:   linear" in r.stdout and "5-shot" in r.stdout
    summary = json.loads((out / "demo.json").read_text())
    assert summary["passed"] and summary["failed"] == []
    train = summary["steps"]["train"]
    assert train["steps"] == STEPS and 0 <= train["test_accuracy"] <= 1 and np.isfinite(train["final_loss"])
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["max_abs"] < 1e-5 and report["weights"]["exactly_equal"] == report["weights"]["compared"]
    rows = [json.loads(line) for line in (out / "jax" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert len(rows[-1]["attn_entropy"]) == demo_cli.model_config().depth
    provenance = json.loads((out / "jax" / "config.json").read_text())["provenance"]
    assert provenance["source"] == "vit22b-demo/4" and provenance["test_accuracy"] == train["test_accuracy"]
    probe = json.loads((out / "probe.json").read_text())
    assert probe["backend"] == "torch" and probe["train_size"] + probe["test_size"] == 1797 and 0 <= probe["linear"]["accuracy"] <= 1
    assert summary["steps"]["probe"]["linear_accuracy"] == probe["linear"]["accuracy"] and set(probe["fewshot"]) == {"1", "5", "10", "25"}
    assert (out / "jax" / "params").is_dir() and (out / "torch" / "model.safetensors").is_file()
    assert png(out / "jax" / "metrics.png").ndim == 3
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary left behind

    assert cli("demo", "--out", out, "--steps", STEPS).returncode == 2  # exists: nothing overwritten without --force
    assert json.loads((out / "demo.json").read_text()) == summary

    # --force rebuilds it; a verify that finds a real mismatch fails the demo (exit 1) and says so.
    monkeypatch.setattr(demo_cli, "CHECK", [("tamper", "change a torch weight", tamper), *demo_cli.CHECK])
    r = cli("demo", "--out", out, "--steps", STEPS, "--force", "--json")
    assert r.returncode == 1
    result = json.loads(r.stdout)
    assert result["passed"] is False and result["failed"] == ["verify"] and result["steps"]["train"]["steps"] == STEPS
    assert json.loads((out / "demo.json").read_text()) == result and not json.loads((out / "verify.json").read_text())["passed"]


def test_train_writes_a_plot_of_loss_and_attention_entropy(tmp_path, cli):
    """`vitctl train` ends with OUT/metrics.png: a valid PNG of its panels (loss, lr, accuracy, attention per layer)."""
    t = demo_cli.TRAIN
    args = ["--model", demo_cli.MODEL, "--data", "digits", "--steps", STEPS, "--warmup", 0, "--batch-size", t["batch_size"]]
    r = cli("train", *args, "--lr", t["lr"], "--stats-every", 2, "--out", tmp_path / "run")  # the demo's compiled step
    assert r.returncode == 0, r.stderr
    image = png(tmp_path / "run" / "metrics.png")
    height, width = image.shape[:2]
    assert width > 1.5 * height  # three panels side by side, two rows
    assert image.std() > 0  # something drawn


def test_the_demo_model_is_a_listed_preset(cli):
    """`vitctl models` lists vit22b-demo/4 with its exact parameter count (that of the JAX model's arrays)."""
    from vitctl.model_jax.model import abstract_model
    from vitctl.model_jax.state import flat_params

    r = cli("models", "--json")
    (row,) = [m for m in json.loads(r.stdout)["models"] if m["name"] == demo_cli.MODEL]
    arrays = flat_params(abstract_model(demo_cli.model_config())).values()
    assert row["params_total"] == sum(int(np.prod(a.shape)) for a in arrays) == 251_018


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--endpoint", "http://127.0.0.1:9", "--repo-id", "vitctl-demo"], "'vitctl-demo' is not a Hub repo id"),
        (["--endpoint", "http://127.0.0.1:9"], "--endpoint needs --repo-id"),
        (["--endpoint", "ftp://127.0.0.1:9", "--repo-id", "me/demo"], "--endpoint must be an http(s) URL"),
        (["--endpoint", "http://127.0.0.1:9", "--repo-id", "me/demo@v1"], "--repo-id takes ORG/NAME without @revision"),
        (["--repo-id", "me/demo"], "--repo-id is used only with --endpoint"),
    ],
)
def test_push_arguments_are_checked_before_any_work(tmp_path, cli, args, want):
    out = tmp_path / "demo"
    r = cli("demo", "--out", out, "--steps", STEPS, *args)
    text = " ".join(r.stderr.split())
    assert r.returncode == 2 and want in text and "Hint: " in text and r.stdout == ""
    assert "[1/" not in r.stderr and not out.exists() and list(tmp_path.iterdir()) == []  # no step started, nothing written
