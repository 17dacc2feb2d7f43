"""Objective, learning-rate schedule and optimizer for `vitctl train` (optax).

- Objectives: softmax cross-entropy, or sigmoid cross-entropy summed over classes
  (the multi-label JFT objective of arXiv:2302.05442 / big_vision), both with optional
  label smoothing.
- Schedule (big_vision `create_learning_rate_schedule` shape): linear warmup from 0,
  then cosine decay to 0, or reciprocal square root `lr * sqrt(warmup / step)`; an
  optional linear cooldown to 0 over the last `cooldown` steps.
- Optimizers: AdamW, big_vision-style Adafactor (optax.scale_by_factored_rms:
  factored second moments for matrices, decay rate 0.8, plus momentum 0.9), and SGD with
  momentum (big_vision's fine-tuning default), optionally Nesterov.
- Fine-tuning: --freeze (frozen parameters: zero update, no optimizer state, no weight
  decay), layer-wise lr decay (BEiT / big_vision: decay^(L+1-id), id 0 the embeddings,
  1..L the blocks along their stacked axis, L+1 the rest) and a head lr multiplier.
- Global-norm clipping first; decoupled weight decay on kernels only, with a separate
  rate for the classifier head (`head/...`) and for the body; decay is scaled by the
  learning rate (optax.adamw convention).
- schedule_change: what resuming a run with other schedule settings does to its learning
  rate at the resumed step (printed, and recorded in train_config.json).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitctl.errors import ConfigError
from vitctl.train import settings
from vitctl.train.param_rules import HEAD, frozen_names, layer_id
from vitctl.train.settings import LOSSES, OPTIMIZERS, SCHEDULES, TrainConfig


def objective(logits, labels, num_classes: int, loss: str = "softmax", label_smoothing: float = 0.0):
    """Mean loss over the batch. logits: [B, classes] (any dtype, computed in float32); labels: int [B]."""
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    if loss == "softmax":
        return optax.softmax_cross_entropy(logits, targets).mean()
    if loss == "sigmoid":  # big_vision sigmoid_xent: summed over classes, mean over the batch
        return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1).mean()
    raise ConfigError(f"unknown loss '{loss}'", hint=f"loss must be one of: {', '.join(LOSSES)}")


def schedule(lr: float, steps: int, warmup: int = 0, kind: str = "cosine", cooldown: int = 0):
    """step -> learning rate (a jnp function of the 0-based step count)."""
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule '{kind}'", hint=f"schedule must be one of: {', '.join(SCHEDULES)}")
    if warmup < 0 or cooldown < 0 or warmup + cooldown > steps:
        raise ConfigError(f"warmup {warmup} + cooldown {cooldown} must be non-negative and at most steps {steps}")

    def fn(step):
        s = jnp.asarray(step, jnp.float32)
        mult = jnp.minimum(1.0, s / warmup) if warmup else jnp.float32(1.0)
        if kind == "cosine":
            frac = jnp.clip((s - warmup) / max(steps - warmup, 1), 0.0, 1.0)
            mult = mult * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        else:  # reciprocal square root after warmup (Transformer / big_vision "rsqrt")
            mult = mult * jax.lax.rsqrt(jnp.maximum(s, max(warmup, 1)) / max(warmup, 1))
        if cooldown:
            mult = mult * jnp.clip((steps - s) / cooldown, 0.0, 1.0)
        return lr * mult

    return fn


def _names(path) -> list[str]:
    """The parameter path of a tree leaf ("blocks", "q", "kernel"): its dict keys."""
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _decay_mask(head: bool):
    """Kernels only (not biases, norm scales, position embedding); head/ or everything else."""

    def mask(params):
        def leaf(path, _):
            names = _names(path)
            return names[-1] == "kernel" and (names[0] == "head") == head

        return jax.tree_util.tree_map_with_path(leaf, params)

    return mask


def lr_scale(name: str, shape: tuple[int, ...], depth: int, layer_decay: float | None, head_lr_mult: float):
    """The learning-rate multiplier of one parameter: decay^(L+1-id) (a per-layer column (L, 1, ...)
    for stacked block parameters), times head_lr_mult for the head; 1.0 when neither applies."""
    scale: Any = 1.0
    if layer_decay is not None and layer_decay != 1.0:
        lid = layer_id(name, depth)
        if lid is None:
            ids = np.arange(1, depth + 1, dtype=np.float64)
            scale = (layer_decay ** (depth + 1 - ids)).astype(np.float32).reshape((depth,) + (1,) * (len(shape) - 1))
        else:
            scale = float(layer_decay ** (depth + 1 - lid))
    if name.split("/")[0] in HEAD and head_lr_mult != 1.0:
        scale = scale * head_lr_mult
    return scale


def scale_per_param(depth: int, layer_decay: float | None, head_lr_mult: float) -> optax.GradientTransformation:
    """Multiplies each update by its parameter's lr_scale (no state)."""

    def update(updates, state, params=None):
        def leaf(path, u):
            s = lr_scale("/".join(_names(path)), u.shape, depth, layer_decay, head_lr_mult)
            return u if isinstance(s, float) and s == 1.0 else u * jnp.asarray(s, u.dtype)

        return jax.tree_util.tree_map_with_path(leaf, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _moments(optimizer: str, b1: float, b2: float, momentum: float, nesterov: bool) -> optax.GradientTransformation:
    if optimizer == "adamw":
        return optax.scale_by_adam(b1=b1, b2=b2)
    if optimizer == "adafactor":  # big_vision: factored rms with decay 0.8, momentum b1
        return optax.chain(optax.scale_by_factored_rms(decay_rate=0.8), optax.trace(decay=b1) if b1 else optax.identity())
    if optimizer == "sgd":  # big_vision's fine-tuning default: momentum 0.9 (optax.sgd's trace)
        return optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity()
    raise ConfigError(f"unknown optimizer '{optimizer}'", hint=f"optimizer must be one of: {', '.join(OPTIMIZERS)}")


FINE_TUNING_DEFAULTS = {"momentum": 0.9, "nesterov": False, "depth": 0, "layer_decay": None, "head_lr_mult": 1.0, "freeze": "", "names": ()}


def make_optimizer(
    lr_fn,
    optimizer: str = "adamw",
    weight_decay: float = 1e-4,
    head_weight_decay: float | None = None,
    clip_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    **fine_tuning: Any,
) -> optax.GradientTransformation:
    """The optax chain: clip -> adam/adafactor/sgd moments -> decoupled weight decay -> per-parameter
    lr scale (layer decay, head lr) -> -lr.

    fine_tuning: momentum, nesterov (sgd); depth with layer_decay and head_lr_mult; freeze (a
    --freeze string) with names (every parameter path). Frozen parameters get a zero update and
    no optimizer state (optax.multi_transform with set_to_zero), so no weight decay either; the
    clip's global norm is over the trained parameters."""
    ft = dict(FINE_TUNING_DEFAULTS)
    if unknown := set(fine_tuning) - set(ft):
        raise TypeError(f"make_optimizer: unknown fine-tuning option(s) {sorted(unknown)}")
    ft.update(fine_tuning)
    head_wd = weight_decay if head_weight_decay is None else head_weight_decay
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(_moments(optimizer, b1, b2, ft["momentum"], ft["nesterov"]))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask(head=False)))
    if head_wd:
        parts.append(optax.add_decayed_weights(head_wd, mask=_decay_mask(head=True)))
    if (ft["layer_decay"] is not None and ft["layer_decay"] != 1.0) or ft["head_lr_mult"] != 1.0:
        parts.append(scale_per_param(ft["depth"], ft["layer_decay"], ft["head_lr_mult"]))
    parts.append(optax.scale_by_learning_rate(lr_fn))
    tx = optax.chain(*parts)
    frozen = frozen_names(list(ft["names"]), ft["freeze"]) if ft["freeze"] else set()
    if not frozen:
        return tx

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if "/".join(_names(path)) in frozen else "train", params)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def optimizer_for(tcfg: TrainConfig, lr_fn, names: list[str], depth: int) -> optax.GradientTransformation:
    """The optimizer of a run's settings; `names`: every parameter path, depth: the model's L."""
    return make_optimizer(
        lr_fn, tcfg.optimizer, tcfg.weight_decay, tcfg.head_weight_decay, tcfg.clip_norm, tcfg.b1, tcfg.b2,
        momentum=tcfg.momentum, nesterov=tcfg.nesterov, depth=depth, layer_decay=tcfg.layer_decay,
        head_lr_mult=tcfg.head_lr_mult, freeze=tcfg.freeze, names=names,
    )  # fmt: skip


def schedule_change(out: str | Path, new: TrainConfig, step: int) -> dict[str, Any] | None:
    """settings.schedule_change on this module's schedule: what resuming the run in `out` at `step`
    with `new` does to its learning-rate schedule (None: nothing)."""
    return settings.schedule_change(out, new, step, schedule)
