"""Objective, learning-rate schedule and optimizer of `vitctl train --backend torch`: the torch
side of vitctl.train.optim, the same math in the same order.

One step from the same parameters, gradients and state gives the update optax gives, to fp32
round-off (tests/train/test_torch_optim.py measures it; tests/train/test_drift.py runs whole
trainings in both frameworks). Every constant is optax's:

- Clipping (optax.clip_by_global_norm): g_norm = sqrt(sum of every trained gradient's squares);
  when g_norm >= clip_norm each gradient becomes (g / g_norm) * clip_norm.
- AdamW moments (optax.scale_by_adam): mu, nu EMAs, bias correction 1 - b^t, eps 1e-8 outside
  the square root, eps_root 0.
- Adafactor (optax.scale_by_factored_rms(decay_rate=0.8) + optax.trace(b1)): decay
  1 - (t+1)^-0.8 (t: updates done so far), epsilon 1e-30 added to the squared gradient, second
  moments factored over the two largest axes of a parameter *in its JAX layout* when the
  smaller of the two is at least 128 (min_dim_size_to_factor), else a full second moment. The
  JAX model stacks its blocks (`blocks/q/kernel` is [L, D, N, K]), so the axes are chosen on the
  stacked JAX shape and the statistics are taken per layer on a JAX-layout view of each torch
  tensor; a depth of 128 or more would make the layer axis a factored one (statistics across
  layers) and is refused.
- SGD (optax.trace): t = g + momentum * t; the update is t, or g + momentum * t with Nesterov.
- Then decoupled weight decay u + wd * p (kernels only; `head/...` at head_weight_decay), the
  per-parameter lr scale (layer decay, head lr multiplier), and -lr(step): p += -lr * s * (u + wd p).
- --freeze: frozen parameters are left out: no state, no update, not in the clipping norm.

Parameters are matched to the JAX paths the masks and the schedule use through vitctl.params.
Only elementwise ops, reductions and views are used, so parameters may be FSDP2 DTensors
(torch.distributed.fsdp.fully_shard); the state is tensors like the parameters. No jax import:
this module runs with the [torch] extra alone; the name rules it shares with vitctl.train.optim
(the head, layer ids, --freeze globs) live in vitctl.train.param_rules, which imports neither.

Keyword-only switches of make_optimizer reproduce the common porting mistakes (eps inside the
square root, no bias correction, weight decay on every parameter): `vitctl verify --grads
--diagnose` flips them to name a cause, and the tests build perturbed pairs with them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from vitctl.config import ViTConfig
from vitctl.errors import ConfigError
from vitctl.params import Layout, jax_param_shapes, rename, split_layer
from vitctl.train.param_rules import HEAD, frozen_names, layer_id
from vitctl.train.settings import LOSSES, OPTIMIZERS, SCHEDULES, TrainConfig

REDUCTIONS = ("mean", "sum")


def objective(logits, labels, num_classes: int, loss: str = "softmax", label_smoothing: float = 0.0, *, reduction: str = "mean"):
    """Loss over the batch (mean; reduction="sum" is the porting mistake --diagnose names).
    logits: [B, classes] (computed in float32); labels: int [B]. optax's formulas."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction '{reduction}'", hint=f"reduction must be one of: {', '.join(REDUCTIONS)}")
    logits = logits.float()
    targets = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    if loss == "softmax":  # optax.softmax_cross_entropy
        per_example = -(targets * torch.log_softmax(logits, -1)).sum(-1)
    elif loss == "sigmoid":  # optax.sigmoid_binary_cross_entropy, summed over classes
        sig = torch.nn.functional.logsigmoid
        per_example = (-targets * sig(logits) - (1.0 - targets) * sig(-logits)).sum(-1)
    else:
        raise ConfigError(f"unknown loss '{loss}'", hint=f"loss must be one of: {', '.join(LOSSES)}")
    return per_example.mean() if reduction == "mean" else per_example.sum()


def schedule(lr: float, steps: int, warmup: int = 0, kind: str = "cosine", cooldown: int = 0) -> Callable[[int], float]:
    """step -> learning rate: optim.schedule's values, computed in float32 as it does."""
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule '{kind}'", hint=f"schedule must be one of: {', '.join(SCHEDULES)}")
    if warmup < 0 or cooldown < 0 or warmup + cooldown > steps:
        raise ConfigError(f"warmup {warmup} + cooldown {cooldown} must be non-negative and at most steps {steps}")
    f32 = np.float32

    def fn(step: int) -> float:
        s = f32(step)
        mult = min(f32(1.0), s / f32(warmup)) if warmup else f32(1.0)
        if kind == "cosine":
            frac = np.clip((s - f32(warmup)) / f32(max(steps - warmup, 1)), f32(0.0), f32(1.0))
            mult = mult * f32(0.5) * (f32(1.0) + np.cos(f32(math.pi) * frac))
        else:  # reciprocal square root after warmup
            mult = mult * (f32(1.0) / np.sqrt(max(s, f32(max(warmup, 1))) / f32(max(warmup, 1))))
        if cooldown:
            mult = mult * np.clip((f32(steps) - s) / f32(cooldown), f32(0.0), f32(1.0))
        return float(f32(lr) * f32(mult))

    return fn


def lr_scale(name: str, layer: int | None, depth: int, layer_decay: float | None, head_lr_mult: float) -> float:
    """optim.lr_scale of one layer's parameter (float32, as optax multiplies it): decay^(L+1-id)
    (id 0 the embeddings, 1..L the blocks, L+1 the rest), times head_lr_mult for the head."""
    scale = 1.0
    top = name.split("/")[0]
    if layer_decay is not None and layer_decay != 1.0:
        lid = layer_id(name, depth)
        if lid is None:  # a block parameter: its block's id
            lid = layer + 1 if layer is not None else depth + 1
        scale = layer_decay ** (depth + 1 - lid)
    if top in HEAD and head_lr_mult != 1.0:
        scale = scale * head_lr_mult
    return float(np.float32(scale))


# JAX-layout views of torch tensors (vitctl.params layouts, in torch ops: Adafactor's axes are the JAX ones).
def to_jax_view(t: torch.Tensor, layout: Layout, shape: tuple[int, ...]) -> torch.Tensor:
    """The torch tensor `t` seen in JAX layout (per-layer JAX `shape`); a view where torch allows."""
    if layout.name == "conv":  # OIHW -> HWIO
        return t.permute(2, 3, 1, 0)
    if layout.name in ("dense", "heads_in", "heads_out"):  # (out, in) -> (in, out), then split the heads
        return t.transpose(0, 1).reshape(shape)
    return t.reshape(shape)  # same, heads_bias


def from_jax_view(u: torch.Tensor, layout: Layout, torch_shape: torch.Size) -> torch.Tensor:
    """The inverse of to_jax_view."""
    if layout.name == "conv":  # HWIO -> OIHW
        return u.permute(3, 2, 0, 1)
    if layout.name in ("dense", "heads_in", "heads_out"):
        return u.reshape(torch_shape[1], torch_shape[0]).transpose(0, 1)
    return u.reshape(torch_shape)


MIN_DIM_SIZE_TO_FACTOR = 128  # optax.scale_by_factored_rms's default
ADAFACTOR_DECAY = 0.8
ADAFACTOR_EPS = 1e-30
ADAM_EPS = 1e-8


def factored_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """optax's _factored_dims: (d1, d0) the two largest axes, or None when the smaller is under 128."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < MIN_DIM_SIZE_TO_FACTOR:
        return None
    return int(order[-2]), int(order[-1])


@dataclasses.dataclass(frozen=True)
class Slot:
    """What the optimizer knows of one torch parameter."""

    name: str  # JAX path (stacked: blocks/q/kernel)
    layer: int | None  # the block, for block parameters
    layout: Layout
    jax_shape: tuple[int, ...]  # per layer
    weight_decay: float
    scale: float  # lr multiplier (layer decay, head lr)
    factored: tuple[int, int] | None  # Adafactor's (d1, d0) in the per-layer JAX shape


def jax_path(torch_name: str) -> tuple[str, int | None, Layout]:
    """`blocks.3.q.weight` (FSDP2 and torch.compile names too) -> ("blocks/q/kernel", 3, layout)."""
    name = torch_name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
    jax_name, layout = rename(name, "torch")
    stacked, layer = split_layer(jax_name)
    return stacked, layer, layout


def make_slots(named: Iterable[tuple[str, torch.Tensor]], cfg: ViTConfig, tcfg: TrainConfig, *, decay_all: bool = False):
    """(param, Slot) for every trained parameter, in model order; frozen parameters are left out."""
    named = list(named)
    paths = {n: jax_path(n) for n, _ in named}
    shapes = jax_param_shapes(cfg)
    stacked_names = list(dict.fromkeys(p for p, _, _ in paths.values()))
    frozen = frozen_names(stacked_names, tcfg.freeze) if tcfg.freeze else set()
    head_wd = tcfg.weight_decay if tcfg.head_weight_decay is None else tcfg.head_weight_decay
    out = []
    for torch_name, p in named:
        name, layer, layout = paths[torch_name]
        if name in frozen:
            continue
        shape = shapes[name]
        dims = factored_dims(shape) if tcfg.optimizer == "adafactor" else None
        if dims is not None and layer is not None:
            if 0 in dims:
                raise ConfigError(
                    f"Adafactor would factor {name} {shape} over its layer axis (depth {cfg.depth}): statistics across "
                    "layers, which the torch backend does not compute",
                    hint="train this model with --backend jax, or with --optimizer adamw",
                )
            dims = (dims[0] - 1, dims[1] - 1)
        kernel = name.split("/")[-1] == "kernel"
        wd = (head_wd if name.split("/")[0] in HEAD else tcfg.weight_decay) if (kernel or decay_all) else 0.0
        scale = lr_scale(name, layer, cfg.depth, tcfg.layer_decay, tcfg.head_lr_mult)
        out.append((p, Slot(name, layer, layout, shape[1:] if layer is not None else shape, wd, scale, dims)))
    return out


def _f32(x: float) -> float:
    """x rounded to float32 (a Python float torch multiplies a float32 tensor by unchanged)."""
    return float(np.float32(x))


def _global(x):
    """A DTensor scalar (a partial sum over shards) as a plain tensor; a tensor as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


class Optimizer(torch.optim.Optimizer):
    """vitctl's optax chain for torch parameters (see the module docstring). One param group;
    its "step" counts the updates done (optax's count: the lr of an update is lr_fn(step)), its
    "lr" multiplies lr_fn's value (1.0; torch.distributed.checkpoint sets it to 0 for the
    zero-gradient step with which it creates an empty optimizer's state, which then moves nothing)."""

    def __init__(self, slots: list[tuple[torch.Tensor, Slot]], tcfg: TrainConfig, lr_fn: Callable[[int], float], **switches: bool):
        if tcfg.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer '{tcfg.optimizer}'", hint=f"optimizer must be one of: {', '.join(OPTIMIZERS)}")
        super().__init__([p for p, _ in slots], {"step": 0, "lr": 1.0})
        self.slots = {p: s for p, s in slots}
        self.tcfg, self.lr_fn, self.switches = tcfg, lr_fn, switches

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, u in self.updates():
            p.add_(u)  # optax.apply_updates
        return loss

    @torch.no_grad()
    def updates(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, update) for every trained parameter with a gradient: optax's updates (p + u is
        the new parameter). Advances the state and the step count; step() applies them."""
        group = self.param_groups[0]
        count = group["step"]
        live = [p for p in group["params"] if p in self.slots and p.grad is not None]
        grads = self._clip([p.grad for p in live])
        neg_lr = _f32(-1.0 * _f32(self.lr_fn(count)) * float(group["lr"]))
        out = []
        for p, g in zip(live, grads):
            slot = self.slots[p]
            u = self._moments(p, g, slot, count)
            if slot.weight_decay:
                u = u + _f32(slot.weight_decay) * p
            if slot.scale != 1.0:
                u = u * slot.scale
            out.append((p, u * neg_lr))
        group["step"] = count + 1
        return out

    def _clip(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """optax.clip_by_global_norm over the trained gradients."""
        clip = self.tcfg.clip_norm
        if not clip or not grads:
            return grads
        total = None
        for g in grads:
            s = (g * g).sum()
            total = s if total is None else total + s
        g_norm = float(torch.sqrt(_global(total)))
        if g_norm < clip:
            return grads
        return [(g / g_norm) * _f32(clip) for g in grads]

    def _moments(self, p: torch.Tensor, g: torch.Tensor, slot: Slot, count: int) -> torch.Tensor:
        t = self.tcfg
        state = self.state[p]
        if t.optimizer == "adamw":
            return self._adam(state, g, count)
        if t.optimizer == "adafactor":
            u = self._factored_rms(state, g, slot, count)
            return self._trace(state, u, t.b1, False) if t.b1 else u
        return self._trace(state, g, t.momentum, t.nesterov) if t.momentum else g

    def _adam(self, state: dict, g: torch.Tensor, count: int) -> torch.Tensor:
        """optax.scale_by_adam (eps outside the square root, eps_root 0, bias correction)."""
        b1, b2 = self.tcfg.b1, self.tcfg.b2
        if not state:
            state["mu"], state["nu"] = torch.zeros_like(g), torch.zeros_like(g)
        mu = _f32(1 - b1) * g + _f32(b1) * state["mu"]
        nu = _f32(1 - b2) * (g * g) + _f32(b2) * state["nu"]
        state["mu"].copy_(mu)
        state["nu"].copy_(nu)
        if self.switches.get("bias_correction", True):
            t = np.float32(count + 1)
            mu = mu / float(np.float32(1) - np.float32(b1) ** t)
            nu = nu / float(np.float32(1) - np.float32(b2) ** t)
        if self.switches.get("eps_inside_sqrt"):
            return mu / torch.sqrt(nu + ADAM_EPS)
        return mu / (torch.sqrt(nu) + _f32(ADAM_EPS))

    def _factored_rms(self, state: dict, g: torch.Tensor, slot: Slot, count: int) -> torch.Tensor:
        """optax.scale_by_factored_rms(decay_rate=0.8), on the JAX-layout view of one layer's tensor."""
        decay = np.float32(1) - np.float32(count + 1) ** np.float32(-ADAFACTOR_DECAY)
        keep, new = float(decay), float(np.float32(1) - decay)
        if slot.factored is None:  # elementwise: the torch layout will do
            if not state:
                state["v"] = torch.zeros_like(g)
            v = keep * state["v"] + new * (g * g + ADAFACTOR_EPS)
            state["v"].copy_(v)
            return g * v**-0.5
        gj = to_jax_view(g, slot.layout, slot.jax_shape)
        sq = gj * gj + ADAFACTOR_EPS
        d1, d0 = slot.factored
        if not state:
            state["v_row"], state["v_col"] = torch.zeros_like(sq.mean(d0)), torch.zeros_like(sq.mean(d1))
        v_row = keep * state["v_row"] + new * sq.mean(d0)
        v_col = keep * state["v_col"] + new * sq.mean(d1)
        state["v_row"].copy_(v_row)
        state["v_col"].copy_(v_col)
        reduced_d1 = d1 - 1 if d1 > d0 else d1
        row_factor = (v_row / v_row.mean(reduced_d1, keepdim=True)) ** -0.5
        col_factor = v_col**-0.5
        u = gj * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1)
        return from_jax_view(u, slot.layout, g.shape)

    @staticmethod
    def _trace(state: dict, u: torch.Tensor, decay: float, nesterov: bool) -> torch.Tensor:
        """optax.trace: t = u + decay * t; the update is t (or u + decay * t with Nesterov)."""
        if "trace" not in state:
            state["trace"] = torch.zeros_like(u)
        trace = u + _f32(decay) * state["trace"]
        state["trace"].copy_(trace)
        return u + _f32(decay) * trace if nesterov else trace


def make_optimizer(
    model: torch.nn.Module, cfg: ViTConfig, tcfg: TrainConfig, lr_fn: Callable[[int], float], *,
    eps_inside_sqrt: bool = False, bias_correction: bool = True, decay_all: bool = False,
) -> Optimizer:  # fmt: skip
    """The optimizer of a run's settings for `model` (the torch twin of `cfg`, plain or FSDP2-sharded).

    The switches reproduce porting mistakes (for `vitctl verify --grads --diagnose` and the tests):
    eps_inside_sqrt (AdamW: mu / sqrt(nu + eps)), bias_correction=False, decay_all (weight decay on
    every parameter, not only kernels)."""
    slots = make_slots(model.named_parameters(), cfg, tcfg, decay_all=decay_all)
    return Optimizer(slots, tcfg, lr_fn, eps_inside_sqrt=eps_inside_sqrt, bias_correction=bias_correction)
