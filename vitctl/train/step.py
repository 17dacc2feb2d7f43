"""The compiled train step of `vitctl train`: model graph, shardings, optimizer, jitted functions.

- Parameters (fp32, or cfg.param_dtype) and optimizer state live on a (data, fsdp, tensor)
  mesh, sharded by the logical-axis rules of model_jax/sharding.py; optimizer-state
  leaves get their parameter's sharding (factored Adafactor moments drop the factored
  axis). The batch is split over data x fsdp. One jax.jit step with explicit
  in/out shardings and the train state donated.
- Compute dtype and remat come from the model config (cfg.dtype, cfg.remat); logits and
  the loss are float32.
- attention_stats: the per-layer maximum attention logit and attention entropy
  (arXiv:2302.05442 sec. 3.1: attention-logit growth is the divergence signal that
  QK-norm fixes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vitctl.config import ViTConfig
from vitctl.formats import layout
from vitctl.train import optim
from vitctl.train.distributed import check_batch
from vitctl.train.settings import TrainConfig


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def _opt_sharding(path, x, specs, shapes, mesh):
    """An optimizer-state leaf's sharding: its parameter's; a factored moment drops the reduced axis; else replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    repl = NamedSharding(mesh, PartitionSpec())
    keys = [n for n, k in zip(_names(path), path) if isinstance(k, jax.tree_util.DictKey)]
    # The parameter path is the end of the leaf's dict keys (a frozen run's state sits under the
    # multi_transform label, "train/blocks/q/kernel").
    name = next(("/".join(keys[i:]) for i in range(len(keys)) if "/".join(keys[i:]) in specs), None)
    if name is None:
        return repl
    spec, shape = tuple(specs[name]), shapes[name]
    if x.shape == shape:
        return NamedSharding(mesh, PartitionSpec(*spec))
    field = next((n for n in reversed(_names(path)) if n in ("v_row", "v_col")), None)
    if field is not None and len(shape) >= 2:
        # optax scale_by_factored_rms: d1, d0 = the two largest axes (np.argsort(shape)[-2:]);
        # v_row drops d0, v_col drops d1. Unfactored leaves hold a (1,) placeholder.
        d1, d0 = (int(a) for a in np.argsort(shape)[-2:])
        drop = d0 if field == "v_row" else d1
        if x.shape == shape[:drop] + shape[drop + 1 :]:
            return NamedSharding(mesh, PartitionSpec(*spec[:drop], *spec[drop + 1 :]))
    return repl


class Setup:
    """Model graph, shardings, optimizer and jitted functions for one (config, mesh)."""

    def __init__(self, cfg: ViTConfig, tcfg: TrainConfig, mesh):
        import jax
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec

        from vitctl.model_jax.model import abstract_model
        from vitctl.model_jax.sharding import batch_sharding, check_divisible, param_specs

        self.cfg, self.tcfg, self.mesh = cfg, tcfg, mesh
        abstract = abstract_model(cfg)
        check_divisible(abstract, mesh)  # before compiling anything
        check_batch(tcfg.batch_size, mesh)
        self.graphdef, abs_state = nnx.split(abstract)
        specs = param_specs(abstract)
        self.param_shardings = layout.nest({n: NamedSharding(mesh, s) for n, s in specs.items()})
        abs_params = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(abs_state), self.param_shardings
        )
        self.lr_fn = optim.schedule(tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.schedule, tcfg.cooldown)
        self.tx = optim.optimizer_for(tcfg, self.lr_fn, list(specs), cfg.depth)
        repl = NamedSharding(mesh, PartitionSpec())
        shapes = {n: x.shape for n, x in layout.flatten(abs_params).items()}
        abs_opt = jax.eval_shape(self.tx.init, abs_params)
        opt_shardings = jax.tree_util.tree_map_with_path(lambda path, x: _opt_sharding(path, x, specs, shapes, mesh), abs_opt)
        self.shardings = {"params": self.param_shardings, "opt": opt_shardings, "step": repl, "rng": repl}
        abs_opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_opt, opt_shardings)
        self.abstract = {
            "params": abs_params,
            "opt": abs_opt,
            "step": jax.ShapeDtypeStruct((), np.int32, sharding=repl),
            "rng": jax.ShapeDtypeStruct((2,), np.uint32, sharding=repl),
        }
        self.images_sharding = batch_sharding(mesh, 4)
        self.labels_sharding = batch_sharding(mesh, 1)
        self.targets_sharding = batch_sharding(mesh, 2)
        self._compile(repl)

    def _compile(self, repl) -> None:
        """The jitted train step, attention statistics and prediction, with explicit shardings."""
        import jax
        from flax import nnx

        tcfg = self.tcfg
        graphdef, tx, lr_fn, num_classes = self.graphdef, self.tx, self.lr_fn, self.cfg.num_classes

        def loss_fn(params, images, labels):
            logits, _ = nnx.merge(graphdef, params)(images)
            return optim.objective(logits, labels, num_classes, tcfg.loss, tcfg.label_smoothing)

        def train_step(state, images, labels):
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], images, labels)
            updates, opt = tx.update(grads, state["opt"], state["params"])
            params = optax_apply(state["params"], updates)
            metrics = {"loss": loss, "grad_norm": optim.optax.tree.norm(grads), "lr": lr_fn(state["step"])}
            return {"params": params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}, metrics

        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.shardings, self.images_sharding, self.labels_sharding),
            out_shardings=(self.shardings, repl),
            donate_argnums=0,
        )
        self.stats = jax.jit(
            lambda params, images: attention_stats(graphdef, params, images),
            in_shardings=(self.param_shardings, self.images_sharding),
            out_shardings=repl,
        )

        def correct(params, images, labels, valid):
            hit = nnx.merge(graphdef, params)(images)[0].argmax(-1) == labels
            return (hit & (valid > 0)).sum(), (valid > 0).sum()

        self.correct = jax.jit(correct, in_shardings=(self.param_shardings, self.images_sharding, self.labels_sharding,
                               self.labels_sharding), out_shardings=repl)  # fmt: skip
        self._soft_step = None

    def soft_train_step(self):
        """The train step for float32 [B, K] target distributions (mixup / cutmix), compiled on first use.

        A separate function, so runs with int labels compile and compute exactly what they did."""
        import jax
        from flax import nnx

        if self._soft_step is None:
            tcfg, graphdef, tx, lr_fn = self.tcfg, self.graphdef, self.tx, self.lr_fn

            def loss_fn(params, images, targets):
                logits, _ = nnx.merge(graphdef, params)(images)
                return soft_objective(logits, targets, tcfg.loss, tcfg.label_smoothing)

            def train_step(state, images, targets):
                loss, grads = jax.value_and_grad(loss_fn)(state["params"], images, targets)
                updates, opt = tx.update(grads, state["opt"], state["params"])
                params = optax_apply(state["params"], updates)
                metrics = {"loss": loss, "grad_norm": optim.optax.tree.norm(grads), "lr": lr_fn(state["step"])}
                return {"params": params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}, metrics

            self._soft_step = jax.jit(train_step, in_shardings=(self.shardings, self.images_sharding, self.targets_sharding),
                                      out_shardings=(self.shardings, self.shardings["step"]), donate_argnums=0)  # fmt: skip
        return self._soft_step

    def init_state(self, seed: int):
        import jax
        from flax import nnx

        from vitctl.model_jax.model import ViT

        def init():  # one compiled program, each parameter created in its shard (no full copy on one device)
            with nnx.use_eager_sharding(False):
                # rbg: XLA's RngBitGenerator compiles in a fraction of threefry's time (the
                # unrolled threefry init of even a tiny model takes ~15 s to compile on CPU).
                # The numbers therefore differ from `vitctl init --seed` (threefry).
                return nnx.to_pure_dict(nnx.state(ViT(self.cfg, rngs=nnx.Rngs(params=jax.random.key(seed, impl="rbg"))), nnx.Param))

        if getattr(self, "_init", (None,))[0] != seed:  # compiled once per seed (the RNG unrolls into a large program)
            self._init = (
                seed,
                jax.jit(init, out_shardings=self.param_shardings),
            )
        return self.state_from_params(self._init[1](), seed)

    def state_from_params(self, params, seed: int):
        """A step-0 training state around `params` (sharded as self.param_shardings): fresh optimizer state."""
        import jax

        if getattr(self, "_opt_init", None) is None:
            self._opt_init = jax.jit(self.tx.init, out_shardings=self.shardings["opt"])
        opt = self._opt_init(params)
        rng = jax.random.key_data(jax.random.key(seed))
        return {
            "params": params,
            "opt": opt,
            "step": jax.device_put(np.int32(0), self.shardings["step"]),
            "rng": jax.device_put(rng, self.shardings["rng"]),
        }

    def put_batch(self, images, labels):
        """This process's rows as global arrays: images [B, S, S, C]; labels int32 [B], or float32 [B, K] targets."""
        import jax

        labels = np.asarray(labels)
        y = (
            jax.make_array_from_process_local_data(self.targets_sharding, np.asarray(labels, np.float32))
            if labels.ndim == 2
            else jax.make_array_from_process_local_data(self.labels_sharding, np.asarray(labels, np.int32))
        )
        return jax.make_array_from_process_local_data(self.images_sharding, np.asarray(images)), y


_SETUPS: dict[Any, Setup] = {}
# Fields that do not change the compiled functions: runs differing only in these share a Setup.
_NOT_COMPILED = {"model": "", "data": "", "seed": 0, "save_every": 0, "keep": 1, "stats_every": 0, "eval_every": 0, "log_every": 1,
                 "test_fraction": 0.2, "init_from": None, "prefix": None, "posemb_resize": "bilinear", "workers": 0, "augment": "",
                 "eval_augment": "", "mixup": 0.0, "cutmix": 0.0, "skip_bad": False}  # fmt: skip


def get_setup(cfg: ViTConfig, tcfg: TrainConfig, mesh) -> Setup:
    """A Setup for (cfg, tcfg, mesh), reused within a process (saves recompiling in tests and sweeps)."""
    key = (cfg, dataclasses.replace(tcfg, **_NOT_COMPILED), tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
    if key not in _SETUPS:
        while len(_SETUPS) >= 4:  # hold a few, oldest out
            _SETUPS.pop(next(iter(_SETUPS)))
        _SETUPS[key] = Setup(cfg, tcfg, mesh)
    return _SETUPS[key]


def optax_apply(params, updates):
    import optax

    return optax.apply_updates(params, updates)


def attention_stats(graphdef, params, images) -> dict[str, Any]:
    """Per layer: the maximum attention logit and the mean attention entropy (nats) on `images`.

    Recomputes each block's queries and keys from its input with the block's own norm,
    q/k projections and QK-norm, so the model needs no extra outputs. Returns
    {"attn_logit_max": [L], "attn_entropy": [L]}.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, params)
    _, out = model(images)
    depth = model.cfg.depth
    inputs = [out["embed"]] + [out[f"block{i:02d}"] for i in range(depth - 1)]
    gdef, stacked = nnx.split(model.blocks)
    maxes, ents = [], []
    for i, x in enumerate(inputs):
        block = nnx.merge(gdef, jax.tree.map(lambda a, i=i: a[i], stacked))
        h = block.norm(x)
        q, k = block.q(h), block.k(h)  # [B, T, N, K]
        if block.q_norm is not None:
            q, k = block.q_norm(q), block.k_norm(k)
        logits = jnp.einsum("BSNK,BTNK->BNST", q.astype(jnp.float32), k.astype(jnp.float32)) * q.shape[-1] ** -0.5
        logp = jax.nn.log_softmax(logits, -1)
        maxes.append(logits.max())
        ents.append(-(jnp.exp(logp) * logp).sum(-1).mean())
    return {"attn_logit_max": jnp.stack(maxes), "attn_entropy": jnp.stack(ents)}


def soft_objective(logits, targets, loss: str = "softmax", label_smoothing: float = 0.0):
    """Mean loss over the batch against target distributions: logits [B, K], targets float32 [B, K] (rows sum to 1).

    vitctl.train.optim.objective with the one-hot targets replaced: the same smoothing, the same
    softmax and sigmoid (summed over classes) cross-entropies."""
    import jax.numpy as jnp
    import optax

    logits, targets = logits.astype(jnp.float32), targets.astype(jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]
    if loss == "softmax":
        return optax.softmax_cross_entropy(logits, targets).mean()
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1).mean()


def evaluate(setup: Setup, params, batches) -> float:
    """Top-1 accuracy over `batches`: this process's (images, labels, valid) of every global batch
    (vitctl.data.pipeline.eval_batches); pad rows (valid 0) are not counted."""
    import jax

    correct = total = 0
    for images, labels, valid in batches:
        x, y = setup.put_batch(images, labels)
        v = jax.make_array_from_process_local_data(setup.labels_sharding, np.asarray(valid, np.int32))
        c, n = jax.device_get(setup.correct(params, x, y, v))
        correct, total = correct + int(c), total + int(n)
    return correct / max(total, 1)
