"""The Flax NNX model: shapes, abstract 22B, golden logits, training-mode options."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
from flax import nnx

from tests.conftest import jax_model, random_params, tiny
from tests.golden import CASES, golden_case
from vitctl.config import ViTConfig
from vitctl.model_jax.model import abstract_model, init_model
from vitctl.model_jax.state import flat_params
from vitctl.params import jax_param_shapes, param_counts


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"block": "sequential", "pool": "tok", "qkv_bias": True, "norm_bias": True},
        {"pool": "gap", "posemb": "sincos2d", "num_classes": 0},
        {
            "block": "sequential",
            "pool": "tok",
            "class_posemb": True,
            "norm_pre": True,
            "fc_norm": True,
            "layer_scale": 1e-5,
            "norm_bias": True,
        },
    ],
)
def test_shapes_match_the_table(kw):
    cfg = tiny(**kw)
    got = {k: tuple(v.shape) for k, v in flat_params(abstract_model(cfg)).items()}
    assert got == jax_param_shapes(cfg)


def test_vit22b_abstract_param_count():
    """The full 22B model built abstractly (jax.eval_shape): no memory allocated."""
    cfg = ViTConfig.from_variant("vit-22b")
    shapes = flat_params(abstract_model(cfg))
    total = sum(int(np.prod(v.shape)) for v in shapes.values())
    assert total == param_counts(cfg)["params_total"]
    block_matmul = sum(int(np.prod(v.shape)) for k, v in shapes.items() if k.startswith("blocks/") and k.endswith("/kernel"))
    assert block_matmul == 48 * (4 * 6144**2 + 2 * 6144 * 24576) == 21_743_271_936


def test_init_is_seeded_and_sane():
    a, b = init_model(tiny(), seed=0), init_model(tiny(), seed=0)
    c = init_model(tiny(), seed=1)
    pa, pb, pc = flat_params(a), flat_params(b), flat_params(c)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert not np.array_equal(pa["blocks/q/kernel"], pc["blocks/q/kernel"])
    # Layers are initialised independently (split rngs), not copies of one another.
    q = np.asarray(pa["blocks/q/kernel"])
    assert not np.array_equal(q[0], q[1])
    logits, _ = a(np.zeros((1, 16, 16, 3), np.float32))
    assert logits.shape == (1, 10) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("name", list(CASES))
def test_golden_logits(name):
    cfg, params, x, expected = golden_case(name)
    logits, _ = jax_model(cfg, params)(x)
    np.testing.assert_allclose(np.asarray(logits)[:, :5], expected, atol=1e-5, rtol=0)


def test_jit_and_grad_through_scan_and_remat():
    cfg = tiny(remat=True)
    model = jax_model(cfg, random_params(cfg))
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)

    @nnx.jit
    def loss_and_grad(model, x):
        return nnx.value_and_grad(lambda m: jax.numpy.square(m(x)[0]).mean())(model)

    loss, grads = loss_and_grad(model, x)
    g = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(grads)}
    assert np.isfinite(float(loss))
    assert np.abs(np.asarray(g["blocks/q/kernel"])).sum() > 0


def test_bf16_params_and_compute():
    cfg = tiny(dtype="bfloat16", param_dtype="bfloat16")
    model = jax_model(cfg, random_params(cfg))
    assert {np.dtype(v.dtype) for v in flat_params(model).values()} == {np.dtype(jax.numpy.bfloat16)}
    logits, out = model(np.zeros((1, 16, 16, 3), np.float32))
    assert logits.dtype == jax.numpy.bfloat16 and out["block00"].dtype == jax.numpy.bfloat16


# Checkpoints on disk, the mapping table and the sharding rules depend on these: every
# parameter path in order, with shape, dtype and logical axes, plus every variable's type
# in the whole NNX state (sha256 of the listing).
PINNED = {
    "vit22b": ({}, "507a1172ed287c1c"),
    "classic": (
        {"block": "sequential", "qk_norm": False, "qkv_bias": True, "norm": "layernorm", "norm_bias": True, "pool": "tok"},
        "d0ca30a6bbf2df4b",
    ),
    "gap_sincos_nohead": (
        {"pool": "gap", "posemb": "sincos2d", "num_classes": 0, "attn_out_bias": False, "mlp_bias": False},
        "00f367a00e8fd75d",
    ),
    "bf16": ({"param_dtype": "bfloat16", "dtype": "bfloat16", "qkv_bias": True, "norm_bias": True}, "07b2348302830c6e"),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_param_tree_is_pinned(name):
    import hashlib

    kw, digest = PINNED[name]
    model = abstract_model(tiny(**kw))
    path = lambda p: "/".join(map(str, p))
    listing = [
        f"{path(p)} {tuple(v.shape)} {v.dtype} {v.get_metadata().get('out_sharding')}"
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    ]
    listing += [f"{path(p)} {type(v).__name__}" for p, v in nnx.to_flat_state(nnx.state(model))]
    assert hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16] == digest, "\n".join(listing)
