"""The mapping table: invertible layouts, one row per name, coverage errors."""

import numpy as np
import pytest

from tests.conftest import random_params, tiny
from vitctl.convert import mapping
from vitctl.errors import UnmappedParamError

SHAPES = {"same": (5, 7), "dense": (5, 7), "conv": (2, 3, 4, 5), "heads_in": (6, 3, 4), "heads_out": (3, 4, 6), "heads_bias": (3, 4)}


@pytest.mark.parametrize("layout", mapping.LAYOUTS, ids=lambda lay: lay.name)
def test_layouts_are_inverse_pairs(layout):
    w = np.random.default_rng(0).normal(size=SHAPES[layout.name]).astype(np.float32)
    assert np.array_equal(layout.to_jax(layout.to_torch(w), w.shape), w)


def test_layouts_match_framework_conventions():
    rng = np.random.default_rng(0)
    D, N, K = 6, 3, 4
    x = rng.normal(size=(2, D))
    q = rng.normal(size=(D, N, K))  # JAX (D, N, K); torch Linear weight (N*K, D), y = x W^T
    np.testing.assert_allclose(x @ mapping.HEADS_IN.to_torch(q).T, np.einsum("bd,dnk->bnk", x, q).reshape(2, -1))
    o = rng.normal(size=(N, K, D))
    a = rng.normal(size=(2, N, K))
    np.testing.assert_allclose(a.reshape(2, -1) @ mapping.HEADS_OUT.to_torch(o).T, np.einsum("bnk,nkd->bd", a, o))
    hwio = rng.normal(size=(2, 2, 3, 5))
    assert mapping.CONV.to_torch(hwio).shape == (5, 3, 2, 2)  # OIHW
    assert mapping.CONV.to_torch(hwio)[4, 1, 0, 1] == hwio[0, 1, 1, 4]


@pytest.mark.parametrize(
    "name", ["blocks/3/q/kernel", "blocks/0/mlp_norm/scale", "map_head/k/bias", "head/kernel", "patch_embed/proj/kernel"]
)
def test_rename_round_trip(name):
    tname, _layout = mapping.rename(name, "jax")
    assert mapping.rename(tname, "torch")[0] == name
    assert "/" not in tname


def test_every_name_matches_exactly_one_row():
    cfg = tiny(pool="map", qkv_bias=True, norm_bias=True, block="sequential", qk_norm=True)
    for name in mapping.jax_param_shapes(cfg, stacked=False):
        mapping.match(name, "jax")
    for name in mapping.torch_param_shapes(cfg):
        mapping.match(name, "torch")
    with pytest.raises(UnmappedParamError, match="no mapping rule matches jax parameter 'blocks/0/qkv/kernel'"):
        mapping.match("blocks/0/qkv/kernel", "jax")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"block": "sequential", "pool": "tok", "qkv_bias": True, "norm_bias": True},
        {"pool": "gap", "posemb": "sincos2d", "num_classes": 0},
    ],
)
def test_round_trip_is_bit_identical(kw):
    cfg = tiny(**kw)
    params = random_params(cfg)
    back = mapping.torch_to_jax(mapping.jax_to_torch(params, cfg), cfg)
    assert back.keys() == params.keys()
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k


def test_bf16_round_trip_keeps_dtype():
    import ml_dtypes

    cfg = tiny()
    params = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_params(cfg).items()}
    state = mapping.jax_to_torch(params, cfg)
    assert {v.dtype for v in state.values()} == {np.dtype(ml_dtypes.bfloat16)}
    back = mapping.torch_to_jax(state, cfg)
    assert all(np.array_equal(back[k].view(np.uint16), params[k].view(np.uint16)) for k in params)


def test_missing_unexpected_and_misshaped_tensors_are_named():
    cfg = tiny()
    params = random_params(cfg)
    state = mapping.jax_to_torch(params, cfg)

    missing = {k: v for k, v in state.items() if k != "blocks.1.k.weight"}
    with pytest.raises(UnmappedParamError, match=r"missing 1: blocks\.1\.k\.weight"):
        mapping.torch_to_jax(missing, cfg)

    extra = {**state, "blocks.0.q.bias": np.zeros(48, np.float32)}
    with pytest.raises(UnmappedParamError, match=r"unexpected 1: blocks\.0\.q\.bias"):
        mapping.torch_to_jax(extra, cfg)

    wrong = {**state, "head.weight": state["head.weight"].T}
    with pytest.raises(UnmappedParamError, match=r"'head\.weight' has shape \(48, 10\), expected \(10, 48\)"):
        mapping.torch_to_jax(wrong, cfg)

    with pytest.raises(UnmappedParamError, match="missing 1: blocks/mlp_in/bias"):
        mapping.jax_to_torch({k: v for k, v in params.items() if k != "blocks/mlp_in/bias"}, cfg)


def test_shape_table_counts():
    counts = mapping.param_counts(tiny())
    assert counts["params_total"] == sum(int(np.prod(s)) for s in mapping.jax_param_shapes(tiny()).values())
    assert counts["params_total"] == counts["params_encoder"] + counts["params_head"]
    # Same total from the torch side.
    assert counts["params_total"] == sum(int(np.prod(s)) for s in mapping.torch_param_shapes(tiny()).values())


def test_torch_param_shapes_need_no_memory():
    from vitctl.config import ViTConfig

    shapes = mapping.torch_param_shapes(ViTConfig.from_variant("vit-22b"))
    assert shapes["blocks.47.mlp_in.weight"] == (24576, 6144)
