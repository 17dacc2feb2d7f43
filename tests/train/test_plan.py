"""The memory plan: exact shard arithmetic for ViT-22B on 1024 chips, cross-checked against
real shards on 8 simulated devices and against optax's own optimizer state shapes."""

import json
import math
import subprocess
import sys
import time

import pytest

from tests.conftest import jax_model, random_params, tiny
from vitctl.cli import main
from vitctl.config import ViTConfig
from vitctl.errors import ConfigError
from vitctl.params import param_counts

jax = pytest.importorskip("jax")
from vitctl.train import plan as planner

POD = {"data": 1, "fsdp": 256, "tensor": 4}  # 1024 chips
V22B = ViTConfig.from_variant("vit-22b")


@pytest.fixture(scope="module")
def pod_plan():
    return planner.plan(V22B, POD, 1024, hbm=95 * 10**9, name="vit-22b")


def test_vit22b_params_shard_exactly(pod_plan):
    specs = planner.param_specs(V22B)
    shape, spec = specs["blocks/mlp_in/kernel"]
    assert shape == (48, 6144, 24576) and spec == ((), ("fsdp",), ("tensor",))
    assert planner.shard_shape(shape, spec, POD) == (48, 24, 6144)
    # Every block matmul is split over all 256 * 4 chips: its bytes / 1024, exactly.
    for name in ("q", "k", "v", "attn_out", "mlp_in", "mlp_out"):
        shape, spec = specs[f"blocks/{name}/kernel"]
        assert math.prod(planner.shard_shape(shape, spec, POD)) * 1024 == math.prod(shape)
    # By hand: what the rules shard over fsdp only (D), over tensor only (F), or not at all.
    L, D, F, K, P, T = 48, 6144, 24576, 128, 14, 256
    fsdp_only = P * P * 3 * D + D + T * D + 2 * L * D + 3 * D + D * 1000  # patch, pos_embed, out biases, probe, head
    tensor_only = L * F + F  # mlp_in biases
    replicated = L * D + 2 * L * K + 2 * D + 1000  # norm scales, QK-norm scales, head bias
    both = param_counts(V22B)["params_total"] - fsdp_only - tensor_only - replicated
    assert both % 1024 == 0 and fsdp_only % 256 == 0
    expected = 4 * (both // 1024 + fsdp_only // 256 + tensor_only // 4 + replicated)
    assert pod_plan["per_device"]["params"] == expected
    assert pod_plan["indivisible"] == [] and pod_plan["devices"] == 1024 and pod_plan["per_device_batch"] == 4


def test_vit22b_grads_optimizer_activations(pod_plan):
    p = pod_plan["per_device"]
    assert p["grads"] == p["params"]
    assert p["optimizer"] == 2 * p["params"] + 4  # AdamW mu, nu in fp32 (+ the int32 step count)
    b, T, D, n, f = 4, 256, 6144, 48 // 4, 24576 // 4
    terms = pod_plan["activations_per_layer"]
    assert terms["norm: float32 input, normalised, output 3x(b,T,D)"] == 3 * b * T * D * 4
    assert terms["softmax exp and probabilities 2x(b,n,T,T)"] == 2 * b * n * T * T * 4
    assert terms["MLP hidden and GELU intermediates 4x(b,T,f)"] == 4 * b * T * f * 4
    layer, outside = sum(terms.values()), p["activations"] - 48 * sum(terms.values())
    assert p["activations_remat"] == 48 * b * T * D * 4 + layer + outside  # the L scan carries + one layer
    assert p["activations_remat"] < p["activations"] / 4
    assert p["total"] == p["params"] + p["grads"] + p["optimizer"] + p["activations"] + p["workspace"]
    assert p["total_remat"] - p["total"] == p["activations_remat"] - p["activations"]
    assert pod_plan["fits"] and pod_plan["fits_remat"] and pod_plan["headroom"] == 95 * 10**9 - p["total"]
    small = planner.plan(V22B, POD, 1024, hbm=2 * 2**30)
    assert not small["fits"] and small["fits_remat"] is (p["total_remat"] <= 2 * 2**30)


def test_dtypes_and_adafactor():
    bf16 = planner.plan(V22B, POD, 1024, hbm=2**35, dtype="bfloat16", param_dtype="bfloat16")["per_device"]
    fp32 = planner.plan(V22B, POD, 1024, hbm=2**35)["per_device"]
    assert 2 * bf16["params"] == fp32["params"] and bf16["optimizer"] == fp32["optimizer"]  # moments stay fp32
    assert bf16["activations"] < fp32["activations"]
    ada = planner.plan(V22B, POD, 1024, hbm=2**35, optimizer="adafactor")["per_device"]
    assert ada["optimizer"] < fp32["params"] / 10
    flash = planner.plan(V22B, POD, 1024, hbm=2**35, flash=True)
    assert flash["per_device"]["activations"] < fp32["activations"]


def test_indivisible_dims_are_listed():
    r = planner.plan(V22B, {"fsdp": 5}, 1000, hbm=2**40)
    names = {(d["param"], d["dim"]) for d in r["indivisible"]}
    assert ("blocks/mlp_in/kernel", 1) in names and all(d["size"] == 6144 and d["devices"] == 5 for d in r["indivisible"])
    shape, spec = planner.param_specs(V22B)["blocks/mlp_in/kernel"]
    assert planner.shard_shape(shape, spec, {"data": 1, "fsdp": 5, "tensor": 1}) == (48, 1229, 24576)  # ceil(6144 / 5)


@pytest.mark.parametrize(
    "mesh, batch, cfg, what",
    [
        ("data=1,fsdp=256,tensr=4", 1024, V22B, "unknown mesh axis"),
        ("data=2,fsdp=256,tensor=4", 1024 + 256, V22B, r"does not divide over data\*fsdp"),
        ("fsdp=256,tensor=5", 1024, V22B, "num_heads 48 does not divide"),
        ("tensor=4", 8, tiny(num_heads=4, mlp_dim=90), "mlp_dim 90 does not divide"),
    ],
)
def test_validation(mesh, batch, cfg, what):
    with pytest.raises(ConfigError, match=what) as e:
        planner.plan(cfg, mesh, batch, hbm=2**30)
    assert e.value.hint and e.value.exit_code == 2


@pytest.mark.parametrize("mesh", ["data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2", "data=8"])
def test_matches_real_shards_on_8_devices(mesh):
    from vitctl.model_jax.sharding import make_mesh, shard_model
    from vitctl.model_jax.state import flat_params

    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices (tests/conftest.py sets XLA_FLAGS)")
    cfg = tiny(num_heads=4)  # D=48, N=4, K=12, F=80: every sharded dim divides on these meshes
    r = planner.plan(cfg, mesh, 16, hbm=2**30)
    model = shard_model(jax_model(cfg, random_params(cfg)), make_mesh(mesh))  # numpy values: no init compile
    for device in jax.devices():
        held = {name: sum(s.data.nbytes for s in w.addressable_shards if s.device == device) for name, w in flat_params(model).items()}
        assert sum(held.values()) == r["per_device"]["params"], device
    specs, sizes = planner.param_specs(cfg), r["mesh"]
    assert held == {n: 4 * math.prod(planner.shard_shape(*specs[n], sizes)) for n in held}


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optimizer_state_matches_optax(optimizer):
    """On a 1-device mesh the plan's optimizer bytes equal the bytes of optax's own state."""
    optax = pytest.importorskip("optax")
    from vitctl.model_jax.model import abstract_model
    from vitctl.model_jax.state import flat_params

    cfg = tiny(width=256, mlp_dim=384, num_heads=4)  # dims >= 128, so adafactor factors the matrices
    tx = optax.adamw(1e-3) if optimizer == "adamw" else optax.adafactor(1e-3)
    state = jax.eval_shape(tx.init, flat_params(abstract_model(cfg)))
    optax_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert planner.plan(cfg, "data=1", 1, hbm=2**30, optimizer=optimizer)["per_device"]["optimizer"] == optax_bytes


def _xla_temp_bytes(cfg, batch):
    """XLA's temp memory for one compiled training gradient of `cfg` (no execution)."""
    import jax.numpy as jnp
    from flax import nnx

    from vitctl.model_jax.model import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg))

    def loss(state, images):
        return nnx.merge(graphdef, state)(images)[0].sum()

    images = jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return jax.jit(jax.grad(loss)).lower(state, images).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_activations_per_layer_match_xla(remat):
    """One more layer costs what the plan says: XLA's compiled temp memory grows by the plan's
    per-layer activations (fp32; XLA on CPU upcasts bf16 elementwise work, so bf16 is not checked here)."""
    cfgs = [tiny(num_heads=3, depth=d, image_size=32, remat=remat) for d in (2, 3)]
    xla = _xla_temp_bytes(cfgs[1], 8) - _xla_temp_bytes(cfgs[0], 8)
    key = "activations_remat" if remat else "activations"
    planned = [planner.plan(c, "data=1", 8, hbm=2**40)["per_device"][key] for c in cfgs]
    assert xla == pytest.approx(planned[1] - planned[0], rel=0.03)


def test_cli_json_fast_and_errors(capsys):
    args = ["plan", "vit-22b", "--mesh", "data=1,fsdp=256,tensor=4", "--batch-size", "1024", "--hbm", "95GB", "--json"]
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "vitctl", *args], check=False, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert p.returncode == 0, p.stderr
    assert elapsed < 10, elapsed
    r = json.loads(p.stdout)
    assert r["model"] == "vit-22b" and r["mesh"] == POD and r["batch_size"] == 1024 and r["hbm"] == 95 * 10**9
    assert set(r["per_device"]) >= {"params", "grads", "optimizer", "activations", "activations_remat", "total", "total_remat"}
    assert r["fits"] is True and r["fits_remat"] is True and r["indivisible"] == []
    for bad in (
        ["--mesh", "data=1,fsdp=256,tensr=4"],
        ["--batch-size", "1000"],
        ["--mesh", "tensor=5"],
        ["--hbm", "lots"],
        ["--optimizer", "sgd"],
    ):
        argv = args[:2] + ["--mesh", "fsdp=256,tensor=4", "--batch-size", "1024", *bad]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, bad
        assert "Error" in capsys.readouterr().err or bad[0] == "--optimizer"


def test_cli_table(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "vit-22b", "--mesh", "fsdp=256,tensor=4", "--batch-size", "1024", "--hbm", "4GiB", "--remat"])
    out = capsys.readouterr().out
    assert e.value.code in (0, None)
    assert "activations_remat" in out and "does not fit" in out and "remat: " in out and "<- selected" in out
