"""Sharding on 8 simulated CPU devices (conftest sets the XLA flag before jax loads)."""

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.conftest import tiny
from vitctl.errors import ConfigError
from vitctl.model_jax import sharding
from vitctl.model_jax.model import init_model
from vitctl.model_jax.state import flat_params

# Divisible by 2 wherever the rules shard (D, N, F), still all different.
CFG = tiny(width=48, num_heads=4, mlp_dim=96)
MESH = "data=2,fsdp=2,tensor=2"


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices; run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return sharding.make_mesh(MESH)


def test_rules_table_lists_each_key_once():
    keys = [k for k, _ in sharding.LOGICAL_AXIS_RULES]
    assert len(keys) == len(set(keys))


def test_logical_to_spec_skips_used_mesh_axes():
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    assert sharding.logical_to_spec(("act_batch", None)) == P(("data", "fsdp"), None)
    # "embed" wants fsdp, already taken by act_batch: skipped, so replicated.
    assert sharding.logical_to_spec(("act_batch", "embed")) == P(("data", "fsdp"), None)
    with pytest.raises(ConfigError, match="no sharding rule"):
        sharding.logical_to_spec(("nonsense",))


@pytest.mark.parametrize("pool", ["map", "tok"])
def test_every_parameter_has_one_axis_per_dim(pool):
    model = init_model(tiny(pool=pool, qkv_bias=True, norm_bias=True, block="sequential"))
    specs = sharding.param_specs(model)
    assert len(specs) == len(flat_params(model))


def test_parse_mesh_errors():
    assert sharding.parse_mesh("fsdp=4") == {"data": 1, "fsdp": 4, "tensor": 1}
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        sharding.parse_mesh("model=2")
    with pytest.raises(ConfigError, match="positive integer"):
        sharding.parse_mesh("data=x")
    with pytest.raises(ConfigError, match="needs 3 devices"):
        sharding.make_mesh("data=3")


def test_shard_shapes_follow_the_rules(mesh):
    model = sharding.shard_model(init_model(CFG), mesh)
    params = flat_params(model)
    L, D, N, K, F = CFG.depth, CFG.width, CFG.num_heads, CFG.head_dim, CFG.mlp_dim
    expected = {
        "blocks/q/kernel": (L, D // 2, N // 2, K),  # embed->fsdp, heads->tensor
        "blocks/attn_out/kernel": (L, N // 2, K, D // 2),
        "blocks/mlp_in/kernel": (L, D // 2, F // 2),
        "blocks/mlp_out/kernel": (L, F // 2, D // 2),
        "blocks/q_norm/scale": (L, K),
        "blocks/norm/scale": (L, D),  # norms replicated
        "patch_embed/proj/kernel": (4, 4, 3, D // 2),
        "head/kernel": (D // 2, 10),  # classes replicated
    }
    for name, shape in expected.items():
        shards = params[name].addressable_shards
        assert {s.data.shape for s in shards} == {shape}, name
        assert len(shards) == 8
    # Each fully sharded kernel is split 4 ways (fsdp x tensor) and replicated over data.
    q = params["blocks/q/kernel"]
    assert len({str(s.index) for s in q.addressable_shards}) == 4


def test_sharded_forward_equals_unsharded(mesh):
    ref_model = init_model(CFG, seed=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    ref_logits, ref_out = nnx.jit(lambda m, x: m(x))(ref_model, x)

    model = sharding.shard_model(init_model(CFG, seed=3), mesh)
    xs = jax.device_put(x, sharding.batch_sharding(mesh))
    logits, out = nnx.jit(lambda m, x: m(x))(model, xs)
    assert math.prod(logits.sharding.mesh.shape.values()) == 8
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=0)
    for k in ref_out:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref_out[k]), atol=1e-5, rtol=0, err_msg=k)


def test_indivisible_mesh_is_a_clear_error(mesh):
    with pytest.raises(ConfigError, match="does not divide"):
        sharding.shard_model(init_model(tiny()), mesh)  # 3 heads over tensor=2
