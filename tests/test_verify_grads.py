"""vitctl verify --grads: a clean pair learns the same way (loss, every gradient, one step of each
optimizer); every architecture option's backward pass agrees within the bars; a perturbed pair
fails and --diagnose names the cause (norm epsilon, GELU form, AdamW epsilon placement, bias
correction, weight-decay mask).

Measured on the clean pairs of the option sweep below (random tiny weights, batch 2, AdamW and
Adafactor): gradient max-rel (max-abs difference over max-abs of A's gradient) at most 1.7e-6,
update max-rel (both sides stepping from A's gradients) at most 3.7e-7, loss relative difference
at most 2e-7. The bars (GRAD_TOL 1e-5, UPDATE_TOL 1e-5, LOSS_TOL 1e-6) sit above with 5-25x
headroom and far below the flips: eps inside the square root moves the AdamW update by ~0.4
(max-rel), no bias correction by ~2, a wrong norm epsilon or GELU form the gradients by 1e-4 and
more.
"""

import json

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")

from tests.conftest import random_params, tiny
from tests.test_parity import CASES, FAMILY_CASES
from tests.test_verify import cli, make_pair
from vitctl.cli.verify import _show_grads
from vitctl.errors import ConfigError
from vitctl.params import jax_param_shapes, unstack
from vitctl.verify_grads import GRAD_TOL, UPDATE_TOL, Bars, Run, batch_for, compute, judge, train_settings, verify_grads


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("grads"))


def test_clean_pair_passes(pair, capsys):
    r = verify_grads(*pair, batch=2)
    assert r["passed"], (r["grads"]["worst"], r["update"]["worst"])
    assert r["grads"]["worst"] < GRAD_TOL and r["update"]["worst"] < UPDATE_TOL and r["loss"]["rel"] < 1e-6
    assert r["a"]["backend"] == "jax" and r["b"]["backend"] == "torch" and r["step"]["optimizer"] == "adamw"
    names = [p["name"] for p in r["grads"]["params"]]
    assert names == list(jax_param_shapes(tiny(), stacked=False))  # every parameter, in parameter order
    assert [p["name"] for p in r["update"]["params"]] == names
    code, out, _ = cli("verify", *pair, "--grads", "--optimizer", "adafactor", "--batch", "2", "--json", capsys=capsys)
    r = json.loads(out)
    assert code == 0 and r["passed"] and r["step"]["optimizer"] == "adafactor" and r["update"]["worst"] < UPDATE_TOL
    _show_grads(r)  # the table without --json
    out = capsys.readouterr().out
    assert "PASS" in out and "head/bias" in out and "adafactor update" in out


# Each value of each ViTConfig option at least once: test_parity's forward cases, and a covering
# subset of its public-family combinations (block x pool x norm_pre x fc_norm x layer_scale).
FAMILY = ["parallel-tok_class_posemb-norm_pre-fc_norm-layer_scale", "sequential-gap-fc_norm", "sequential-map-norm_pre-layer_scale",
          "parallel-gap"]  # fmt: skip
OPTION_CASES = {**{k: v for k, v in CASES.items() if k != "none_nohead"}, **{k: FAMILY_CASES[k] for k in FAMILY}}


@pytest.mark.slow  # 14 cases, each compiling a JAX gradient and optimizer step (~5-20 s)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_gradients_agree_for_every_architecture_option(case):
    cfg = tiny(**OPTION_CASES[case])
    params = dict(unstack(random_params(cfg, seed=3), cfg.depth))
    images, labels = batch_for(cfg, 2, seed=1)
    tcfg = train_settings("adamw", weight_decay=0.1)
    out_a = compute(Run("jax", cfg), params, images, labels, tcfg)
    out_b = compute(Run("torch", cfg), params, images, labels, tcfg, out_a["grads"])
    r = judge(out_a, out_b, list(jax_param_shapes(cfg, stacked=False)), Bars())
    assert r["passed"], (case, r["loss"], r["grads"]["first_divergent"], r["grads"]["worst"], r["update"]["worst"])
    assert all(np.abs(g).max() > 0 for g in out_a["grads"].values() if g.size), "every parameter must get a gradient"


def test_headless_or_per_token_models_are_refused():
    with pytest.raises(ConfigError, match="classifier head"):
        batch_for(tiny(num_classes=0, pool="none"), 2, 0)
    with pytest.raises(ConfigError, match="per token"):
        batch_for(tiny(pool="none"), 2, 0)


def rewrite_config(path, **fields):
    """B's config.json saying something else (the weights unchanged)."""
    body = json.loads((path / "config.json").read_text())
    body["model"].update(fields)
    (path / "config.json").write_text(json.dumps(body))
    return path


def named(r) -> list[str]:
    return [d["flip"] for d in r["diagnosis"] if d["named"]]


@pytest.mark.parametrize(
    "field, value, cause", [("norm_eps", 1e-5, "norm epsilon 1e-06"), ("gelu_approximate", True, "GELU exact (erf)")], ids=["eps", "gelu"]
)
def test_a_config_convention_on_b_fails_and_is_named(tmp_path, field, value, cause):
    a, b = make_pair(tmp_path)
    rewrite_config(b, **{field: value})
    r = verify_grads(a, b, batch=2, optimizer="sgd", run_diagnose=True)
    assert not r["passed"] and r["grads"]["first_divergent"] is not None
    assert cause in named(r) and cause in r["diagnosis_note"]
    # Epsilons 1e-6 and 1e-12 differ by less than the fp32 bar on unit-scale activations: both may be named.
    assert all(n.startswith(cause.split(" 1e")[0]) for n in named(r)), named(r)


@pytest.mark.parametrize(
    "switch, cause",
    [
        ({"eps_inside_sqrt": True}, "AdamW epsilon outside the square root"),
        ({"bias_correction": False}, "AdamW with bias correction"),
        ({"decay_all": True}, "weight decay on kernels only"),
    ],
    ids=["eps_inside_sqrt", "no_bias_correction", "decay_all"],
)
def test_an_optimizer_mistake_on_b_fails_and_is_named(pair, switch, cause):
    r = verify_grads(*pair, batch=2, weight_decay=0.1, run_diagnose=True, b_switches=switch)
    assert not r["passed"] and r["grads"]["passed"] and r["loss"]["passed"]  # the gradients agree; the step does not
    assert r["update"]["first_divergent"] is not None
    assert named(r) == [cause]


def test_loss_summed_over_the_batch_is_named(pair):
    r = verify_grads(*pair, batch=2, optimizer="sgd", run_diagnose=True, b_reduction="sum")
    assert not r["passed"] and not r["loss"]["passed"]
    assert named(r) == ["loss averaged over the batch instead of summed"]


def test_bad_options_are_usage_errors(pair, capsys):
    with pytest.raises(ConfigError, match="--backend-b"):
        verify_grads(*pair, backend_b="tf")
    code, _, err = cli("verify", *pair, "--grads", "--grad-tol", "nan", capsys=capsys)
    assert code == 2 and "--grad-tol" in err


def test_both_sides_on_torch_agree_exactly(pair):
    """--backend-a torch: the same framework on both sides computes bit for bit the same."""
    r = verify_grads(*pair, batch=2, backend_a="torch", optimizer="sgd")
    assert r["passed"] and r["a"]["backend"] == r["b"]["backend"] == "torch"
    assert r["loss"]["rel"] == 0.0 and r["grads"]["worst"] == 0.0 and r["update"]["worst"] == 0.0
