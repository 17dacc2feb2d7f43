"""`vitctl probe` through main(): the table and the --json object, a cache hit on the second run,
and bad input (one class, fewer examples than shots, a layer that does not exist, images the
model cannot take) as a clear error with the documented exit code.

The checkpoint is a random tiny vitctl-torch directory (no XLA compile needed to write it).
"""

import json

import numpy as np
import pytest

from tests.conftest import random_params, tiny

pytest.importorskip("sklearn")
pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCTL_CACHE", str(tmp_path / "cache"))


def torch_checkpoint(path, cfg):
    from vitctl import checkpoint as ckpt
    from vitctl.convert.mapping import jax_to_torch
    from vitctl.formats import layout

    path.mkdir()
    layout.save_torch(path, jax_to_torch(random_params(cfg), cfg))
    ckpt.write_config(path, cfg, {"source_format": "test"})
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return torch_checkpoint(tmp_path_factory.mktemp("probe-cli") / "torch", tiny())


def npz(path, images, labels):
    np.savez(path, images=np.asarray(images, np.uint8), labels=np.asarray(labels))
    return path


def test_probe_prints_a_table_then_reads_the_cache(cli, model):
    r = cli("probe", model, "--data", "digits", "--mode", "fewshot", "--shots", "1,5")
    assert r.returncode == 0, r.stderr
    assert "5-shot" in r.stdout and "pre_logits, pool map, dim 48 (extracted" in r.stdout and "vitctl-torch" in r.stdout
    r = cli("probe", model, "--data", "digits", "--mode", "both", "--json")  # the other mode: the same features
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cached"] and "features" not in out["timings"]
    assert (out["backend"], out["layer"], out["pool"], out["feature_dim"]) == ("torch", "pre_logits", "map", 48)
    assert (out["train_size"], out["test_size"]) == (1438, 359)
    assert set(out["fewshot"]) == {"1", "5", "10", "25"} and 0 <= out["fewshot"]["5"]["accuracy"] <= 1
    lin = out["linear"]
    assert 0.5 < lin["accuracy"] <= 1 and lin["converged"] and len(lin["sweep"]) >= 13 and lin["C"] in [s["C"] for s in lin["sweep"]]


def test_bad_input_is_a_clear_error(cli, model, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8), np.uint8)
    cases = [
        (("--data", npz(tmp_path / "one.npz", images, np.zeros(12, int))), 1, "the train split has 1 class(es); a probe needs at least 2"),
        (("--data", npz(tmp_path / "few.npz", images, np.arange(12) % 3), "--mode", "fewshot", "--shots", "1,5"), 1, "fewer than 5 shots"),
        (("--data", "digits", "--layer", "block:7"), 2, "the model has 2 block(s)"),
        (("--data", "digits", "--layer", "block:1", "--pool", "map"), 2, "MAP head was trained"),
        (("--data", "digits", "--shots", "1,x"), 2, "--shots must be comma-separated integers"),
        (
            ("--data", npz(tmp_path / "two.npz", rng.integers(0, 256, (12, 8, 8, 2)), np.arange(12) % 2)),
            1,
            "with C in (1, 3), got shape (12, 8, 8, 2)",
        ),
        (("--data", tmp_path / "missing"), 1, "no such data source"),
    ]
    for args, code, message in cases:
        r = cli("probe", model, *args)
        assert r.returncode == code and message in r.stderr, (args, r.returncode, r.stderr)
        assert "Hint:" in r.stderr or "two.npz" in r.stderr  # vitctl.train.data's own error has none
        assert r.stdout == ""
    four = torch_checkpoint(tmp_path / "four", tiny(channels=4))
    r = cli("probe", four, "--data", "digits")
    assert r.returncode == 1 and "the model takes 4-channel images" in r.stderr
    r = cli("probe", tmp_path / "nothing", "--data", "digits")
    assert r.returncode == 2 and "no such file or directory" in r.stderr


def test_probe_reads_a_timm_export_of_its_model(cli, model, tmp_path):
    """A timm export (vitctl convert --format timm) is probed for real: the same features as the
    vitctl-torch checkpoint it was written from, so the same few-shot accuracy; its format named."""
    from vitctl import checkpoint as ckpt
    from vitctl.convert import timm as vt
    from vitctl.formats import layout

    cfg = layout.read_checkpoint_config(model)
    (tmp_path / "timm").mkdir()
    layout.save_torch(tmp_path / "timm", vt.to_timm_state_dict(layout.load_torch(model, cfg), cfg))
    ckpt.write_config(tmp_path / "timm", cfg, {"target_format": "timm"}, head=vt.timm_hub_config(cfg))
    args = ("--data", "digits", "--mode", "fewshot", "--shots", "5", "--seeds", "1", "--json")
    ours, theirs = (cli("probe", c, *args) for c in (model, tmp_path / "timm"))
    assert ours.returncode == 0 and theirs.returncode == 0, theirs.stderr
    a, b = json.loads(ours.stdout), json.loads(theirs.stdout)
    assert b["checkpoint"]["format"] == "timm" and b["feature_dim"] == a["feature_dim"]
    assert b["fewshot"]["5"]["accuracy"] == pytest.approx(a["fewshot"]["5"]["accuracy"], abs=0.01)
