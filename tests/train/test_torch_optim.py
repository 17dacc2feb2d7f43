"""The torch optimizer (vitctl.train.torch_optim) against optax (vitctl.train.optim).

The same parameters and the same gradients, fed for several steps to optim.make_optimizer
(on the JAX model's stacked parameters) and to torch_optim.make_optimizer (on the torch twin),
leave the same parameters: max-abs difference under OPT_ATOL. Measured across the cases
below: 2.4e-7 at most (AdamW, Adafactor; SGD 3e-8 to 6e-8) on parameters of scale ~1 after 5
steps of lr 0.05: one or two float32 ulps (2^-23 = 1.2e-7 relative). The bar leaves ~8x
headroom and sits far below the porting mistakes (eps inside the square root 2.4e-2, no bias
correction 8.1e-2, decay on every parameter 3.8e-3 after 2 steps).
"""

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from tests.conftest import random_params, tiny, torch_model
from vitctl.convert.mapping import jax_to_torch, torch_to_jax
from vitctl.errors import ConfigError
from vitctl.formats import layout
from vitctl.train import optim, torch_optim
from vitctl.train.settings import TrainConfig

OPT_ATOL = 2e-6
STEPS = 5
TINY = tiny()
# Adafactor factors a matrix only when two axes are >= 128: mlp_in/out [L, 128, 256], head [128, 10] (not: 10 < 128).
WIDE = tiny(width=128, mlp_dim=256, num_heads=2, depth=2)

CASES = {
    "adamw": {},
    "adamw_clip_ld_head": {"clip_norm": 0.5, "layer_decay": 0.7, "head_lr_mult": 3.0, "head_weight_decay": 0.3, "weight_decay": 0.1},
    "adamw_freeze": {"freeze": "patch_embed,blocks/q/*", "weight_decay": 0.2},
    "adamw_noclip_b": {"clip_norm": 0.0, "b1": 0.8, "b2": 0.95},
    "adafactor": {"optimizer": "adafactor", "weight_decay": 0.1},
    "adafactor_nob1_ld": {"optimizer": "adafactor", "b1": 0.0, "layer_decay": 0.8, "clip_norm": 0.3},
    "sgd": {"optimizer": "sgd", "weight_decay": 0.05},
    "sgd_nesterov_head": {"optimizer": "sgd", "nesterov": True, "head_lr_mult": 10.0, "freeze": "all-but-head"},
    "sgd_nomomentum": {"optimizer": "sgd", "momentum": 0.0, "schedule": "rsqrt", "cooldown": 2},
}


def settings(**overrides) -> TrainConfig:
    base = {"steps": 8, "warmup": 2, "lr": 0.05, "weight_decay": 0.01, "clip_norm": 1.0}
    return TrainConfig(**{**base, **overrides})


def grads_for(cfg, step: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random JAX-named gradients, larger than the clip norm every other step."""
    rng = np.random.default_rng(100 + step)
    g = {n: rng.normal(0, 0.05 * scale * (1 + 3 * (step % 2)), w.shape).astype(np.float32) for n, w in random_params(cfg).items()}
    return g


def run_optax(cfg, tcfg, grads):
    """optax on the nested parameter tree, as vitctl.train.step runs it (the masks read the nesting)."""
    params = layout.nest({k: jax.numpy.asarray(v) for k, v in random_params(cfg).items()})
    lr_fn = optim.schedule(tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.schedule, tcfg.cooldown)
    tx = optim.optimizer_for(tcfg, lr_fn, list(random_params(cfg)), cfg.depth)
    state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optim.optax.apply_updates(params, updates), state

    for g in grads:
        params, state = step(params, state, layout.nest({k: jax.numpy.asarray(v) for k, v in g.items()}))
    return {k: np.asarray(v) for k, v in layout.flatten(params).items()}


def run_torch(cfg, tcfg, grads, **switches):
    model = torch_model(cfg, random_params(cfg))
    lr_fn = torch_optim.schedule(tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.schedule, tcfg.cooldown)
    opt = torch_optim.make_optimizer(model, cfg, tcfg, lr_fn, **switches)
    named = dict(model.named_parameters())
    for g in grads:
        for k, v in jax_to_torch(g, cfg).items():
            named[k].grad = torch.from_numpy(np.ascontiguousarray(v))
        opt.step()
        opt.zero_grad()
    return torch_to_jax({k: v.detach().numpy() for k, v in model.state_dict().items()}, cfg)


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_optimizer_steps_like_optax(case):
    overrides = CASES[case]
    cfg = WIDE if overrides.get("optimizer") == "adafactor" else TINY
    tcfg = settings(**overrides)
    grads = [grads_for(cfg, s) for s in range(STEPS)]
    want, got = run_optax(cfg, tcfg, grads), run_torch(cfg, tcfg, grads)
    start = random_params(cfg)
    moved = max(float(np.abs(want[k] - start[k]).max()) for k in want)
    assert moved > 1e-3, "the steps must move the parameters for the comparison to mean anything"
    assert max_diff(want, got) < OPT_ATOL
    if tcfg.freeze:  # frozen parameters come back bit for bit
        frozen = torch_optim.frozen_names(list(start), tcfg.freeze)
        assert all(np.array_equal(got[k], start[k]) for k in frozen)


def test_adafactor_factors_matrices_in_their_jax_layout():
    """WIDE's MLP kernels are factored (as optax does on [L, 128, 256]); vectors and small matrices are not."""
    model = torch_model(WIDE, random_params(WIDE))
    slots = {s.name: s for _, s in torch_optim.make_slots(model.named_parameters(), WIDE, settings(optimizer="adafactor"))}
    assert slots["blocks/mlp_in/kernel"].factored == (0, 1)  # (D=128, F=256): d1 = D, d0 = F
    assert slots["blocks/mlp_out/kernel"].factored == (1, 0)
    assert slots["blocks/norm/scale"].factored is None and slots["head/kernel"].factored is None


@pytest.mark.parametrize("switch", [{"eps_inside_sqrt": True}, {"bias_correction": False}, {"decay_all": True}])
def test_porting_mistakes_move_the_parameters_past_the_bar(switch):
    tcfg = settings(weight_decay=0.1)
    grads = [grads_for(TINY, s, scale=1e-3) for s in range(2)]  # small gradients: eps matters
    assert max_diff(run_optax(TINY, tcfg, grads), run_torch(TINY, tcfg, grads, **switch)) > 100 * OPT_ATOL


def test_schedule_and_objective_equal_optax():
    for kind, warmup, cooldown in (("cosine", 3, 0), ("cosine", 0, 4), ("rsqrt", 5, 2)):
        want = optim.schedule(0.01, 20, warmup, kind, cooldown)
        got = torch_optim.schedule(0.01, 20, warmup, kind, cooldown)
        for s in range(22):
            assert abs(float(want(s)) - got(s)) <= 1e-9
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(0, 3, (4, 7)).astype(np.float32), np.array([0, 6, 3, 3])
    for loss in ("softmax", "sigmoid"):
        for smoothing in (0.0, 0.1):
            want = float(optim.objective(jax.numpy.asarray(logits), labels, 7, loss, smoothing))
            got = float(torch_optim.objective(torch.from_numpy(logits), torch.from_numpy(labels), 7, loss, smoothing))
            assert abs(want - got) <= 1e-6 * abs(want)


def test_lr_scale_per_layer_equals_optim():
    names = list(random_params(tiny(pool="tok", norm_pre=True)))
    for name in names:
        shape = (TINY.depth, 1) if name.startswith("blocks/") else (1,)
        want = np.asarray(optim.lr_scale(name, shape, TINY.depth, 0.6, 2.0), np.float32).reshape(-1)
        got = [torch_optim.lr_scale(name, i if name.startswith("blocks/") else None, TINY.depth, 0.6, 2.0) for i in range(len(want))]
        assert np.array_equal(want, np.asarray(got, np.float32)), name


def test_state_dict_round_trip_resumes_the_same():
    tcfg = settings(optimizer="adafactor")
    grads = [grads_for(WIDE, s) for s in range(3)]
    straight = run_torch(WIDE, tcfg, grads)
    model = torch_model(WIDE, random_params(WIDE))
    lr_fn = torch_optim.schedule(tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.schedule, tcfg.cooldown)
    opt = torch_optim.make_optimizer(model, WIDE, tcfg, lr_fn)
    named = dict(model.named_parameters())
    for i, g in enumerate(grads):
        if i == 2:  # a new optimizer from the saved state
            saved = opt.state_dict()
            opt = torch_optim.make_optimizer(model, WIDE, tcfg, lr_fn)
            opt.load_state_dict(saved)
        for k, v in jax_to_torch(g, WIDE).items():
            named[k].grad = torch.from_numpy(np.ascontiguousarray(v))
        opt.step()
    resumed = torch_to_jax({k: v.detach().numpy() for k, v in model.state_dict().items()}, WIDE)
    assert max_diff(straight, resumed) == 0.0


def test_adafactor_refuses_factoring_over_layers():
    cfg = dataclasses.replace(WIDE, depth=128, mlp_dim=128)
    from vitctl.model_torch.model import abstract_model

    with pytest.raises(ConfigError, match="layer axis"):
        torch_optim.make_slots(abstract_model(cfg).named_parameters(), cfg, settings(optimizer="adafactor"))


def _fsdp_worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank: the WIDE model sharded by FSDP2 (each block, then the whole), 3 Adafactor steps."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        tcfg = settings(optimizer="adafactor", weight_decay=0.1)
        model = torch_model(WIDE, random_params(WIDE))
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        opt = torch_optim.make_optimizer(model, WIDE, tcfg, torch_optim.schedule(tcfg.lr, tcfg.steps, tcfg.warmup))
        named = dict(model.named_parameters())
        for s in range(3):
            for k, v in jax_to_torch(grads_for(WIDE, s), WIDE).items():
                p = named[k]
                p.grad = distribute_tensor(torch.from_numpy(np.ascontiguousarray(v)), p.device_mesh, p.placements)
            opt.step()
        state = {k: v.full_tensor().detach().numpy() for k, v in model.state_dict().items()}
        if rank == 0:
            np.savez(out, **torch_to_jax(state, WIDE))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~30 s: two spawned ranks import torch and jax
def test_fsdp2_sharded_parameters_step_like_plain_ones(tmp_path):
    """Parameters as FSDP2 DTensors (2 CPU ranks, gloo): the factored Adafactor statistics and the
    clipping norm reduce across shards, and the result is the plain run's to one ulp."""
    import torch.multiprocessing as mp

    out = tmp_path / "sharded.npz"
    mp.spawn(_fsdp_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2)
    tcfg = settings(optimizer="adafactor", weight_decay=0.1)
    plain = run_torch(WIDE, tcfg, [grads_for(WIDE, s) for s in range(3)])
    assert max_diff(plain, dict(np.load(out))) < OPT_ATOL


def test_a_zero_lr_step_moves_nothing():
    """torch.distributed.checkpoint creates an empty optimizer's state by a step with zero
    gradients and every group's "lr" set to 0: that step leaves every parameter as it was."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    for optimizer in ("adamw", "adafactor", "sgd"):
        model = torch_model(WIDE, random_params(WIDE))
        tcfg = settings(optimizer=optimizer, weight_decay=0.5, warmup=0)
        opt = torch_optim.make_optimizer(model, WIDE, tcfg, torch_optim.schedule(tcfg.lr, tcfg.steps))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _init_optim_state(opt)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), optimizer
        assert opt.param_groups[0]["lr"] == 1.0
