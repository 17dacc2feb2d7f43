"""The parameter table: names, shapes and switches per row; the {slot} compiler; stacked names."""

import dataclasses
import itertools

import numpy as np
import pytest

from tests.conftest import tiny
from vitctl import params
from vitctl.errors import CheckpointError, UnmappedParamError


def test_rows_are_well_formed():
    assert len({p.jax for p in params.PARAMS}) == len(params.PARAMS)
    assert len({p.torch for p in params.PARAMS}) == len(params.PARAMS)
    for p in params.PARAMS:
        assert ("{i}" in p.torch) == p.stacked, p  # per-layer torch keys exactly for stacked rows
        assert set(p.when) <= set(params.WHEN) and set(p.shape) <= set(params.dims(tiny())), p
        assert p.jax_layer == (p.jax.replace("blocks/", "blocks/{i}/") if p.stacked else p.jax)


def test_tiny_shapes_by_hand():
    cfg = tiny(pool="map", block="sequential", qkv_bias=True, norm_bias=False, num_classes=10)
    D, N, K, F = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    shapes = params.jax_param_shapes(cfg)
    assert shapes["blocks/q/kernel"] == (cfg.depth, D, N, K) and shapes["blocks/q/bias"] == (cfg.depth, N, K)
    assert shapes["blocks/mlp_out/kernel"] == (cfg.depth, F, D) and shapes["map_head/attn_out/kernel"] == (N, K, D)
    assert "blocks/mlp_norm/scale" in shapes and "map_head/mlp_norm/scale" not in shapes and "norm/bias" not in shapes
    torch = params.torch_param_shapes(cfg)
    assert torch["blocks.1.q.weight"] == (N * K, D) and torch["blocks.1.q.bias"] == (N * K,)
    assert torch["patch_embed.proj.weight"] == (D, cfg.channels, cfg.patch_size, cfg.patch_size)


@pytest.mark.parametrize("block, pool, bias", list(itertools.product(["parallel", "sequential"], ["map", "tok", "gap"], [False, True])))
def test_counts_and_listings_agree(block, pool, bias):
    family = {
        "class_posemb": pool == "tok",
        "norm_pre": bias,
        "fc_norm": not bias,
        "layer_scale": 1e-5 * bias,
    }  # the public families' options
    cfg = tiny(block=block, pool=pool, qkv_bias=bias, norm_bias=bias, mlp_bias=not bias, **family)
    per_layer = params.jax_param_shapes(cfg, stacked=False)
    assert params.param_count(cfg) == len(per_layer) == len(params.torch_param_shapes(cfg))
    assert [params.rename(n, "jax")[0] for n in per_layer] == list(params.torch_param_shapes(cfg))
    assert (
        params.stack(dict(params.unstack(params.random_weights(cfg), cfg.depth)), cfg.depth).keys() == params.jax_param_shapes(cfg).keys()
    )


def test_stacked_names():
    assert params.is_stacked("blocks/q/kernel") and not params.is_stacked("blocks/3/q/kernel")
    assert not params.is_stacked("map_head/q/kernel")
    assert params.layer_name("blocks/q/kernel", 3) == "blocks/3/q/kernel"
    assert params.split_layer("blocks/3/q/kernel") == ("blocks/q/kernel", 3)
    assert params.split_layer("head/kernel") == ("head/kernel", None)


def test_stack_names_missing_layers_and_unstack_checks_depth():
    w = {"blocks/0/q/kernel": np.zeros(2), "head/bias": np.zeros(1)}
    with pytest.raises(UnmappedParamError, match=r"blocks/\*/q/kernel: missing layers \[1\] of 2"):
        params.stack(w, 2)
    with pytest.raises(CheckpointError, match="expected a leading depth of 3"):
        list(params.unstack({"blocks/q/kernel": np.zeros((2, 4))}, 3))


@dataclasses.dataclass(frozen=True)
class _Row:
    a: str
    b: str


def test_name_table_renames_both_ways_with_its_own_slots():
    rows = [_Row("x_{i}/{leaf}", "blocks.{i}.{leaf}"), _Row("head/{leaf}", "head.{leaf}")]
    table = params.NameTable(rows, {"one": "a", "two": "b"}, {"leaf": "w|b"})
    ((row, slots),) = table.matches("x_7/w", "one")
    assert slots == {"i": "7", "leaf": "w"} and table.fill(row, "two", slots) == "blocks.7.w"
    ((row, slots),) = table.matches("head.b", "two")
    assert table.fill(row, "one", slots) == "head/b"
    assert table.matches("x_7/kernel", "one") == [] and table.matches("x_a/w", "one") == []
    assert params.compile_template("a.{i}.b").fullmatch("a.12.b") and not params.compile_template("a.{i}.b").fullmatch("aX12.b")


def test_random_weights_are_deterministic_float32():
    cfg = tiny()
    a, b = params.random_weights(cfg, 1), params.random_weights(cfg, 1)
    assert list(a) == list(params.jax_param_shapes(cfg))
    assert all(v.dtype == np.float32 and v.shape == params.jax_param_shapes(cfg)[k] and np.array_equal(v, b[k]) for k, v in a.items())


SHAPES = {"same": (5, 7), "dense": (5, 7), "conv": (2, 3, 4, 5), "heads_in": (6, 3, 4), "heads_out": (3, 4, 6), "heads_bias": (3, 4)}


@pytest.mark.parametrize("layout", params.LAYOUTS, ids=lambda lay: lay.name)
def test_layouts_are_inverse_pairs(layout):
    w = np.random.default_rng(0).normal(size=SHAPES[layout.name]).astype(np.float32)
    assert np.array_equal(layout.to_jax(layout.to_torch(w), w.shape), w)


def test_layouts_match_framework_conventions():
    rng = np.random.default_rng(0)
    D, N, K = 6, 3, 4
    x = rng.normal(size=(2, D))
    q = rng.normal(size=(D, N, K))  # JAX (D, N, K); torch Linear weight (N*K, D), y = x W^T
    np.testing.assert_allclose(x @ params.HEADS_IN.to_torch(q).T, np.einsum("bd,dnk->bnk", x, q).reshape(2, -1))
    o = rng.normal(size=(N, K, D))
    a = rng.normal(size=(2, N, K))
    np.testing.assert_allclose(a.reshape(2, -1) @ params.HEADS_OUT.to_torch(o).T, np.einsum("bnk,nkd->bd", a, o))
    hwio = rng.normal(size=(2, 2, 3, 5))
    assert params.CONV.to_torch(hwio).shape == (5, 3, 2, 2)  # OIHW
    assert params.CONV.to_torch(hwio)[4, 1, 0, 1] == hwio[0, 1, 1, 4]


@pytest.mark.parametrize(
    "name", ["blocks/3/q/kernel", "blocks/0/mlp_norm/scale", "map_head/k/bias", "head/kernel", "patch_embed/proj/kernel"]
)
def test_rename_round_trip(name):
    tname, _layout = params.rename(name, "jax")
    assert params.rename(tname, "torch")[0] == name
    assert "/" not in tname


def test_every_name_matches_exactly_one_row():
    cfg = tiny(pool="map", qkv_bias=True, norm_bias=True, block="sequential", qk_norm=True)
    for name in params.jax_param_shapes(cfg, stacked=False):
        params.match(name, "jax")
    for name in params.torch_param_shapes(cfg):
        params.match(name, "torch")
    with pytest.raises(UnmappedParamError, match="no mapping rule matches jax parameter 'blocks/0/qkv/kernel'"):
        params.match("blocks/0/qkv/kernel", "jax")


def test_shape_table_counts():
    counts = params.param_counts(tiny())
    assert counts["params_total"] == sum(int(np.prod(s)) for s in params.jax_param_shapes(tiny()).values())
    assert counts["params_total"] == counts["params_encoder"] + counts["params_head"]
    # Same total from the torch side.
    assert counts["params_total"] == sum(int(np.prod(s)) for s in params.torch_param_shapes(tiny()).values())


def test_torch_param_shapes_need_no_memory():
    from vitctl.config import ViTConfig

    shapes = params.torch_param_shapes(ViTConfig.from_variant("vit-22b"))
    assert shapes["blocks.47.mlp_in.weight"] == (24576, 6144)
