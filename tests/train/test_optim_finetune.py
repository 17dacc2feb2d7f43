"""The fine-tuning optimizer options: SGD (momentum, Nesterov) against optax.sgd, layer-wise lr
decay and the head's lr multiplier checked analytically on one plain SGD step, and --freeze:
no update and no optimizer state for frozen parameters, on the sharded train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitctl.errors import ConfigError
from vitctl.train import optim, param_rules

DEPTH = 3


def tree():
    """A small parameter tree with the model's names: embeddings, stacked blocks (L=3), final norm, head."""
    rng = np.random.default_rng(0)
    shapes = {"patch_embed": {"proj": {"kernel": (2, 2, 3, 4)}}, "pos_embed": (1, 4, 4), "blocks": {"q": {"kernel": (DEPTH, 4, 2, 2)}},
              "norm": {"scale": (4,)}, "head": {"kernel": (4, 5), "bias": (5,)}}  # fmt: skip
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))


def names(t):
    from vitctl.formats import layout

    return list(layout.flatten(t))


def test_sgd_matches_optax_sgd():
    params = tree()
    rng = np.random.default_rng(1)
    lr = optim.schedule(0.1, 10, 2)
    for nesterov in (False, True):
        ours = optim.make_optimizer(lr, "sgd", weight_decay=0.0, clip_norm=0.0, momentum=0.9, nesterov=nesterov)
        ref = optax.sgd(lr, momentum=0.9, nesterov=nesterov)
        s1, s2 = ours.init(params), ref.init(params)
        for _ in range(3):
            grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
            u1, s1 = ours.update(grads, s1, params)
            u2, s2 = ref.update(grads, s2, params)
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), u1, u2)


def test_layer_decay_and_head_lr_scale_one_sgd_step():
    """update = -lr * decay^(L+1-id) * grad: id 0 embeddings, 1..L the blocks along axis 0, L+1 the rest; head x2."""
    params, lr, decay = tree(), 0.1, 0.5
    tx = optim.make_optimizer(lambda s: lr, "sgd", weight_decay=0.0, clip_norm=0.0, momentum=0.0, depth=DEPTH, layer_decay=decay,
                              head_lr_mult=2.0)  # fmt: skip
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    top = decay ** (DEPTH + 1)
    np.testing.assert_allclose(updates["patch_embed"]["proj"]["kernel"], -lr * top, rtol=1e-6)
    np.testing.assert_allclose(updates["pos_embed"], -lr * top, rtol=1e-6)
    for i in range(DEPTH):  # block i is layer id i+1
        np.testing.assert_allclose(updates["blocks"]["q"]["kernel"][i], -lr * decay ** (DEPTH - i), rtol=1e-6)
    np.testing.assert_allclose(updates["norm"]["scale"], -lr, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -lr * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["bias"], -lr * 2.0, rtol=1e-6)
    assert param_rules.layer_id("norm_pre/scale", DEPTH) == 0 and param_rules.layer_id("blocks/ls_attn/scale", DEPTH) is None
    assert param_rules.layer_id("map_head/probe", DEPTH) == DEPTH + 1


def test_frozen_params_get_no_update_no_state_no_decay():
    params = tree()
    tx = optim.make_optimizer(lambda s: 0.1, "adamw", weight_decay=0.5, freeze="blocks/*,patch_embed", names=names(params))
    state = tx.init(params)
    held = {"/".join(str(k.key) for k in p if isinstance(k, jax.tree_util.DictKey)) for p, _ in jax.tree_util.tree_leaves_with_path(state)}
    # Adam's moments exist for the trained parameters only (under the multi_transform label).
    assert any(h.endswith("head/kernel") for h in held)
    assert not any("blocks" in h or "patch_embed" in h for h in held)
    rng = np.random.default_rng(2)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, state = tx.update(grads, state, params)
        assert not np.asarray(updates["blocks"]["q"]["kernel"]).any() and not np.asarray(updates["patch_embed"]["proj"]["kernel"]).any()
        assert np.asarray(updates["head"]["kernel"]).any()
        params = optax.apply_updates(params, updates)


def test_freeze_patterns():
    n = names(tree())
    assert param_rules.frozen_names(n, "all-but-head") == set(n) - {"head/kernel", "head/bias"}
    assert param_rules.frozen_names(n, "blocks/*, pos_embed") == {"blocks/q/kernel", "pos_embed"}
    with pytest.raises(ConfigError, match="'blokcs/\\*' matches no parameter"):
        param_rules.frozen_names(n, "blokcs/*")
    with pytest.raises(ConfigError, match="freezes every parameter"):
        param_rules.frozen_names(n, "all-but-head,head/*")


def test_freeze_on_the_sharded_step_keeps_frozen_params_bit_identical():
    """All-but-head on the real model, 8 devices: 3 steps leave the body as it was; the optimizer
    state holds the head alone, sharded like it."""
    from tests.train import standin
    from tests.train.test_init_from import MODEL, setup_for
    from vitctl.formats import layout

    setup = setup_for(MODEL, freeze="all-but-head", optimizer="adamw", lr=0.01, warmup=0)
    state = setup.init_state(0)
    before = {n: np.asarray(jax.device_get(a)) for n, a in layout.flatten(state["params"]).items()}
    opt_leaves = jax.tree_util.tree_leaves_with_path(state["opt"])
    big = [p for p, leaf in opt_leaves if leaf.size > 1]
    assert big and all("head" in jax.tree_util.keystr(p) for p in big), [jax.tree_util.keystr(p) for p in big]
    for p, leaf in opt_leaves:
        if jax.tree_util.keystr(p).endswith("['head']['kernel']"):
            assert leaf.sharding == layout.flatten(setup.param_shardings)["head/kernel"]
    data = standin.make_dataset(size=16)
    loader = iter(standin.Loader(data, MODEL, 8))
    for _ in range(3):
        state, _ = setup.train_step(state, *setup.put_batch(*next(loader)))
    after = {n: np.asarray(jax.device_get(a)) for n, a in layout.flatten(state["params"]).items()}
    for n, w in before.items():
        assert np.array_equal(w, after[n]) == (not n.startswith("head/")), n
