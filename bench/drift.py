"""Drift: the same training run in JAX and in PyTorch, step by step.

    python bench/drift.py [--steps 100] [--batch-size 32] [--optimizer adamw adafactor] [--baseline] [--json]

One model (the vit22b-demo/4 preset: D=64, L=4, F=256, N=4, patch 4, 16 px, 1 channel, 10
classes, head not zero-initialised) starts from the same random weights (vitctl.params.
random_weights) in both frameworks and trains on the same batches in the same order (digits,
sklearn's 8x8 scans upsampled to 16 px, scaled to [-1, 1]; batches drawn with a fixed seed)
with the same hyper-parameters (cosine schedule, warmup steps // 10, lr 1e-3, clip 1.0, weight
decay 1e-4):

- JAX: what vitctl.train.step's train step computes (nnx.merge, optim.objective,
  jax.value_and_grad, optim.optimizer_for's optax chain, optax.apply_updates), jitted, one device;
- torch: the torch twin, torch_optim.objective, backward, torch_optim.make_optimizer.

Both in fp32 with full-precision matmuls (no TF32, highest XLA precision). Printed for each
optimizer: the per-step loss relative difference (max over the run, and at steps 1, 10, 50,
100) and the final weights' max-abs difference and max-rel (max-abs difference over the
weights' max-abs, worst tensor). Float32 round-off is the only difference, and training
amplifies it each step: the figures say how much over N steps. --baseline adds JAX against
JAX started one ulp away, the drift round-off alone causes, to read the figures against.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

from vitctl.config import ViTConfig
from vitctl.params import random_weights
from vitctl.train.settings import TrainConfig

Batches = list[tuple[np.ndarray, np.ndarray]]  # (images [B, S, S, C] float32 in [-1, 1], labels int32 [B])


def digits_batches(steps: int, batch_size: int, size: int = 16, seed: int = 0) -> Batches:
    """sklearn's digits (8x8, 0..16) upsampled to `size` px by pixel repetition, in [-1, 1]; seeded batches."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rep = size // 8
    images = np.kron(d.images, np.ones((rep, rep)))[..., None].astype(np.float32) / 8.0 - 1.0
    rng = np.random.default_rng(seed)
    picks = [rng.choice(len(images), batch_size, replace=False) for _ in range(steps)]
    return [(images[i], d.target[i].astype(np.int32)) for i in picks]


def random_batches(cfg: ViTConfig, steps: int, batch_size: int, seed: int = 0) -> Batches:
    """Gaussian images and random labels (a few distinct batches, cycled: there is something to learn)."""
    rng = np.random.default_rng(seed)
    pool = [
        (rng.normal(0, 1, (batch_size, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32),
         rng.integers(0, cfg.num_classes, batch_size).astype(np.int32))
        for _ in range(4)
    ]  # fmt: skip
    return [pool[s % len(pool)] for s in range(steps)]


def train_jax(cfg: ViTConfig, tcfg: TrainConfig, params: dict[str, np.ndarray], batches: Batches):
    """Per-step losses and the final (stacked, JAX-named) weights of vitctl.train.step's computation."""
    import jax
    import optax
    from flax import nnx

    from vitctl.formats import layout
    from vitctl.model_jax.model import abstract_model
    from vitctl.model_jax.state import load_flat_params
    from vitctl.train import optim

    jax.config.update("jax_default_matmul_precision", "highest")
    model = abstract_model(cfg)
    load_flat_params(model, params)
    graphdef, state = nnx.split(model)
    tree = nnx.to_pure_dict(state)
    lr_fn = optim.schedule(tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.schedule, tcfg.cooldown)
    tx = optim.optimizer_for(tcfg, lr_fn, list(params), cfg.depth)

    def loss_fn(p, x, y):
        logits, _ = nnx.merge(graphdef, p)(x)
        return optim.objective(logits, y, cfg.num_classes, tcfg.loss, tcfg.label_smoothing)

    @jax.jit
    def step(p, opt, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt, losses = tx.init(tree), []
    for x, y in batches:
        tree, opt, loss = step(tree, opt, x, y)
        losses.append(float(loss))
    return losses, {k: np.asarray(v) for k, v in layout.flatten(tree).items()}


def train_torch(cfg: ViTConfig, tcfg: TrainConfig, params: dict[str, np.ndarray], batches: Batches):
    """The same run on the torch twin with vitctl.train.torch_optim."""
    import torch

    from vitctl.convert.mapping import jax_to_torch, torch_to_jax
    from vitctl.model_torch.model import abstract_model
    from vitctl.train import torch_optim

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = abstract_model(cfg)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in jax_to_torch(params, cfg).items()}, assign=True)
    model.train()
    lr_fn = torch_optim.schedule(tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.schedule, tcfg.cooldown)
    opt = torch_optim.make_optimizer(model, cfg, tcfg, lr_fn)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        logits, _ = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        loss = torch_optim.objective(logits, torch.from_numpy(y), cfg.num_classes, tcfg.loss, tcfg.label_smoothing)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, torch_to_jax({k: v.detach().numpy() for k, v in model.state_dict().items()}, cfg)


def one_ulp(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every weight moved by one float32 ulp (towards +inf): a difference of round-off size."""
    return {k: np.nextafter(v, np.float32(np.inf)).astype(np.float32) for k, v in params.items()}


def drift(cfg: ViTConfig, tcfg: TrainConfig, batches: Batches, seed: int = 0, baseline: bool = False) -> dict:
    """Both runs from random_weights(cfg, seed); the per-step loss difference and the final weights'.
    baseline: B is JAX again, from weights one ulp away (what training does to round-off alone)."""
    params = random_weights(cfg, seed)
    loss_a, w_a = train_jax(cfg, tcfg, params, batches)
    loss_b, w_b = train_jax(cfg, tcfg, one_ulp(params), batches) if baseline else train_torch(cfg, tcfg, params, batches)
    rel = [abs(b - a) / abs(a) for a, b in zip(loss_a, loss_b)]
    diff = {k: float(np.abs(w_a[k].astype(np.float64) - w_b[k]).max()) for k in w_a}
    max_rel = {k: diff[k] / (float(np.abs(w_a[k]).max()) or 1.0) for k in w_a}
    worst = max(max_rel, key=max_rel.get)
    at = {s: rel[s - 1] for s in (1, 10, 50, 100) if s <= len(rel)}
    return {
        "optimizer": tcfg.optimizer, "b": "jax, weights +1 ulp" if baseline else "torch", "steps": len(batches), "loss_first": loss_a[0], "loss_last": loss_a[-1],
        "loss_rel_max": max(rel), "loss_rel_at": at, "loss_rel": rel, "weights_max_abs": max(diff.values()),
        "weights_max_rel": max_rel[worst], "weights_worst": worst,
    }  # fmt: skip


def settings(optimizer: str, steps: int, batch_size: int, **overrides) -> TrainConfig:
    return TrainConfig(optimizer=optimizer, steps=steps, batch_size=batch_size, lr=1e-3, **overrides)


DEMO = dataclasses.replace(ViTConfig.from_variant("vit22b-demo/4"), head_zero_init=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", nargs="+", default=["adamw", "adafactor"])
    p.add_argument("--baseline", action="store_true", help="also JAX against JAX from weights one ulp away: round-off's own drift")
    p.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...]} on stdout')
    args = p.parse_args(argv)
    batches = digits_batches(args.steps, args.batch_size, DEMO.image_size)
    runs = [(o, b) for o in args.optimizer for b in ((False, True) if args.baseline else (False,))]
    rows = [drift(DEMO, settings(o, args.steps, args.batch_size), batches, baseline=b) for o, b in runs]
    if args.json:
        print(json.dumps({"model": "vit22b-demo/4", "data": "digits", "rows": rows}))
        return 0
    for r in rows:
        at = ", ".join(f"step {s}: {v:.1e}" for s, v in r["loss_rel_at"].items())
        print(f"{r['optimizer']}, JAX against {r['b']}: {r['steps']} steps, loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}")
        print(f"  loss relative difference: max {r['loss_rel_max']:.1e}; {at}")
        print(f"  final weights: max-abs {r['weights_max_abs']:.1e}, max-rel {r['weights_max_rel']:.1e} ({r['weights_worst']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
