"""vitctl.probe: both backends give the same accuracies, a trained checkpoint beats its random
init, the few-shot solver is the ridge problem it claims, features come from the cache the
second time (and a corrupt entry is recomputed), and impossible layer/pool choices are refused.

Data: scikit-learn's digits (1438 train, 359 test after vitctl's seeded split).
"""

import json

import numpy as np
import pytest

from tests.conftest import tiny
from vitctl import probe as P
from vitctl.config import ViTConfig
from vitctl.errors import ConfigError
from vitctl.infer import runner as R

pytest.importorskip("sklearn")
pytest.importorskip("jax")
pytest.importorskip("torch")

# A short C grid keeps the tests quick; the default (13 decades) runs in the CLI test.
CS = (0.1, 1.0, 10.0)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCTL_CACHE", str(tmp_path / "cache"))


def init_checkpoint(path, cfg: ViTConfig, seed: int = 0):
    """What `vitctl init --backend jax` writes: config.json + Orbax params/."""
    from vitctl import checkpoint as ckpt
    from vitctl.formats import layout
    from vitctl.model_jax.model import init_model
    from vitctl.model_jax.state import flat_params

    path.mkdir(parents=True)
    layout.save_jax(path, flat_params(init_model(cfg, seed=seed)))
    ckpt.write_config(path, cfg, {"source_format": "init", "seed": seed})
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random tiny JAX checkpoint and its `convert jax-to-torch` copy."""
    from vitctl.convert.convert import convert

    root = tmp_path_factory.mktemp("probe")
    jax_dir = init_checkpoint(root / "jax", tiny())
    convert(jax_dir, root / "torch", "jax-to-torch")
    return jax_dir, root / "torch"


@pytest.fixture(scope="module")
def random_jax(converted, tmp_path_factory):
    """The JAX probe of the random checkpoint (shared: the random-init baseline of the trained test)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("VITCTL_CACHE", str(tmp_path_factory.mktemp("cache")))
        return P.probe(converted[0], "digits", backend="jax", cs=CS)


def accuracies(r):
    return {"linear": r["linear"]["accuracy"], **{f"{k}-shot": v["accuracy"] for k, v in r["fewshot"].items()}}


def test_jax_and_torch_backends_agree_on_a_converted_checkpoint(converted, random_jax):
    """Measured: identical accuracies (linear 81.1%, 1/5/10/25-shot 21.4/36.6/45.8/51.9%); features
    differ by ~1.4e-6 max-abs. The bar is the issue's 0.1 point."""
    torch_dir = converted[1]
    rj = random_jax
    rt = P.probe(torch_dir, "digits", backend="torch", cs=CS)
    assert (rj["backend"], rt["backend"]) == ("jax", "torch") and not rj["cached"] and not rt["cached"]
    assert rj["checkpoint"]["sha256"] != rt["checkpoint"]["sha256"]  # different files, same function
    assert (rj["train_size"], rj["test_size"], rj["feature_dim"]) == (1438, 359, 48)
    assert rj["linear"]["C"] == rt["linear"]["C"]
    a, b = accuracies(rj), accuracies(rt)
    assert a.keys() == b.keys() == {"linear", "1-shot", "5-shot", "10-shot", "25-shot"}
    for k in a:
        assert abs(a[k] - b[k]) <= 0.001, (k, a[k], b[k])
    assert a["linear"] > 0.5  # far above chance (10%): the features carry the digits


def test_second_probe_reads_the_cache_and_a_corrupt_entry_is_recomputed(converted, monkeypatch, tmp_path):
    jax_dir, _ = converted
    first = P.probe(jax_dir, "digits", backend="jax", mode="fewshot", shots=(1, 5))
    assert not first["cached"] and "features" in first["timings"]

    def no_forward(*a, **k):
        raise AssertionError("a cached probe ran the model")

    with monkeypatch.context() as m:
        m.setattr(P, "make_runner", no_forward)
        second = P.probe(jax_dir, "digits", backend="jax", mode="fewshot", shots=(1, 5))
        assert second["cached"] and "features" not in second["timings"] and second["cache_file"] == first["cache_file"]
        assert second["fewshot"] == first["fewshot"]
        # Another layer or backend is another entry: it needs the model.
        with pytest.raises(AssertionError, match="ran the model"):
            P.probe(jax_dir, "digits", backend="jax", layer="block:0", mode="fewshot", shots=(1,))
        with pytest.raises(AssertionError, match="ran the model"):
            P.probe(jax_dir, "digits", backend="torch", mode="fewshot", shots=(1,))

    entry = P.Path(first["cache_file"])
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated: unreadable
    third = P.probe(jax_dir, "digits", backend="jax", mode="fewshot", shots=(1, 5))
    assert not third["cached"] and "not used: unreadable" in third["notes"][0]
    assert third["fewshot"] == first["fewshot"]
    assert P.probe(jax_dir, "digits", backend="jax", mode="fewshot", shots=(1, 5))["cached"]  # rewritten, whole
    assert P.Path(first["cache_file"]).is_relative_to(tmp_path)


def test_cache_entries_are_checked_before_use(tmp_path):
    key, other = json.dumps({"a": 1}), json.dumps({"a": 2})
    train, test = np.ones((4, 3), np.float32), np.zeros((2, 3), np.float32)
    path = tmp_path / "e.npz"
    P.save_cached(path, key, train, test)
    assert [p.name for p in tmp_path.iterdir()] == ["e.npz"]  # no temporary left behind
    got = P.load_cached(path, key, (4, 2))
    assert not isinstance(got, str) and np.array_equal(got[0], train)
    assert "key differs" in P.load_cached(path, other, (4, 2))
    assert "train features have shape" in P.load_cached(path, key, (5, 2))
    P.save_cached(path, key, train, np.full((2, 3), np.nan, np.float32))
    assert "non-finite" in P.load_cached(path, key, (4, 2))
    np.savez(path, key=np.array([{"x": 1}], dtype=object), train=train, test=test)  # a pickled member
    assert P.load_cached(path, key, (4, 2)).startswith("unreadable (ValueError")


@pytest.mark.parametrize("n", [60, 7])  # primal (N >= D + 1) and dual (N < D + 1) forms
def test_fewshot_solver_is_big_visions_ridge_problem(n):
    """lsr_fit against an independent solution of the same problem: whitening with the few-shot
    set's own mean and std (+1e-5), a bias column of 100, {-1, +1} targets, and ridge with L2 on
    every column, solved as least squares on the augmented system [X; sqrt(l2) I] W = [Y; 0]."""
    rng = np.random.default_rng(n)
    d, classes, l2 = 12, 4, 2.0**10
    x = rng.normal(3.0, 2.0, (n, d)) * rng.uniform(0.1, 10, d)
    labels = np.arange(n) % classes
    fit = P.lsr_fit(x, labels, classes, l2)
    xs = (x - x.mean(0)) / (x.std(0) + 1e-5)
    xb = np.concatenate([xs, np.full((n, 1), 100.0)], 1)
    y = np.where(labels[:, None] == np.arange(classes), 1.0, -1.0)
    aug_x = np.concatenate([xb, np.sqrt(l2) * np.eye(d + 1)])
    aug_y = np.concatenate([y, np.zeros((d + 1, classes))])
    w, *_ = np.linalg.lstsq(aug_x, aug_y, rcond=None)
    np.testing.assert_allclose(fit["w"], w, rtol=1e-8, atol=1e-10)
    x_test = rng.normal(3.0, 2.0, (50, d))
    xt = np.concatenate([(x_test - x.mean(0)) / (x.std(0) + 1e-5), np.full((50, 1), 100.0)], 1)
    np.testing.assert_array_equal(P.lsr_predict(fit, x_test), np.argmax(xt @ w, 1))


def test_fewshot_draws_nested_shots_per_seed_and_averages():
    """big_vision's draw: per seed, default_rng(seed) permutes each class; k shots take the first k."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, (3, 5))
    y_train, y_test = np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 10)
    x_train = centers[y_train] + rng.normal(0, 1, (90, 5))
    x_test = centers[y_test] + rng.normal(0, 1, (30, 5))
    r = P.fewshot(x_train, y_train, x_test, y_test, 3, shots=(1, 10), seeds=2, l2=1.0)
    perm = [np.random.default_rng(1).permutation(np.flatnonzero(y_train == c)) for c in range(3)]  # seed 1
    for shots in (1, 10):
        idx = np.concatenate([p[:shots] for p in perm])
        fit = P.lsr_fit(x_train[idx], y_train[idx], 3, 1.0)
        assert r[str(shots)]["per_seed"][1] == np.mean(P.lsr_predict(fit, x_test) == y_test)
    assert r["10"]["accuracy"] == pytest.approx(np.mean(r["10"]["per_seed"])) and r["10"]["train_size"] == 30
    assert r["10"]["accuracy"] > 0.9  # well-separated clusters


def test_layer_and_pool_choices():
    tok, gap, mapped, none = (tiny(pool=p) for p in ("tok", "gap", "map", "none"))
    assert R.resolve_features(mapped, "pre_logits") == R.Features("pre_logits", "pre_logits", "map", True)
    assert R.resolve_features(tok, "block:-1") == R.Features("block:1", "block01", "tok", False)
    assert R.resolve_features(gap, "block:0").pool == "gap" and R.resolve_features(none, "pre_logits", "gap").pool == "gap"
    refused = [
        (mapped, "pre_logits", "gap", "already pooled by its map head"),
        (mapped, "block:1", "map", "MAP head was trained on the final-norm output"),
        (gap, "block:0", "tok", "has no class token"),
        (none, "pre_logits", "tok", "no pooling"),
        (gap, "block:2", None, "has 2 block"),
        (gap, "block:-3", None, "has 2 block"),
        (gap, "encoder", None, "unknown --layer"),
        (gap, "pre_logits", "mean", "unknown --pool"),
    ]
    for cfg, layer, pool, match in refused:
        with pytest.raises(ConfigError, match=match):
            R.resolve_features(cfg, layer, pool)
    x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # (B, T, D)
    np.testing.assert_array_equal(
        R.pool_tokens(x, R.resolve_features(tok, "block:0", "gap"), tok), x[:, 1:].mean(1)
    )  # class token left out
    np.testing.assert_array_equal(R.pool_tokens(x, R.resolve_features(tok, "block:0"), tok), x[:, 0])
    np.testing.assert_array_equal(R.pool_tokens(x, R.resolve_features(gap, "block:0"), gap), x.mean(1))


@pytest.mark.slow
def test_trained_checkpoint_probes_better_than_its_random_init(tmp_path, random_jax):
    """A checkpoint from vitctl.train.loop.train (digits, 100 steps at batch 32) against a random init
    of the same config (vitctl init, seed 0). Measured (pre_logits, MAP head, C grid 0.1/1/10 refined):
    linear 90.8% vs 81.1%; 1/5/10/25-shot 67.1/75.7/77.2/80.7% vs 21.4/36.6/45.8/51.9%."""
    from vitctl.data.sources import load_dataset
    from vitctl.formats.layout import read_checkpoint_config
    from vitctl.train.loop import train
    from vitctl.train.settings import TrainConfig

    (tmp_path / "model.json").write_text(tiny().to_json())
    tcfg = TrainConfig(model=str(tmp_path / "model.json"), data="digits", steps=100, batch_size=32, lr=3e-3, warmup=5, stats_every=0)
    train(tcfg, tmp_path / "trained", dataset=load_dataset("digits", "train"))  # no test set: no eval compile
    trained = P.probe(tmp_path / "trained", "digits", cs=CS)
    assert read_checkpoint_config(tmp_path / "trained") == read_checkpoint_config(random_jax["checkpoint"]["path"])  # same config
    a, b = accuracies(trained), accuracies(random_jax)
    assert a["linear"] >= b["linear"] + 0.03, (a, b)
    for k in ("5-shot", "25-shot"):
        assert a[k] >= b[k] + 0.05, (k, a, b)
