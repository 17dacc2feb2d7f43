"""vitctl verify --grads: do two checkpoints *learn* the same way? Gradients and one optimizer step.

`vitctl verify` proves the forward functions equal; training also needs the backward pass, the
objective and the optimizer to agree. On one seeded batch (random images of the model's size,
random labels) each side computes the training objective (vitctl.train.optim.objective on JAX,
vitctl.train.torch_optim.objective on torch; fp32, highest matmul precision) and its gradient,
then the update of one optimizer step from a fresh state (the optax chain of `vitctl train`, or
its torch twin, with the same hyper-parameters and a constant learning rate). Compared:

- the loss (relative difference),
- every parameter's gradient, in parameter order (embeddings, blocks layer by layer, head):
  max-abs and max-rel (max-abs difference over max-abs of A's gradient),
- every parameter's update the same way, both sides stepping from A's gradients: the gradients
  are judged above, and AdamW's first step (g / (|g| + eps), a sign where |g| is small) would
  otherwise turn their round-off into lr-sized differences; from the same gradients the two
  optimizers agree to float32 round-off.

Sides: anything vitctl.open opens, computed in float32 (bfloat16 weights upcast); side A computes on JAX and side B on torch unless
--backend-a / --backend-b say otherwise (each side reads its weights under JAX names and runs
the chosen twin). Both sides may be the same backend (JAX against JAX checks a conversion's
weights; the backward pass is then trivially equal).

The fp32 bars (GRAD_TOL, UPDATE_TOL, LOSS_TOL) are measured on clean pairs across every
architecture option (tests/test_verify_grads.py), with headroom, and sit far below what a
convention flip produces. `diagnose` flips one convention at a time on B: the forward ones
of vitctl.verify (GELU form, norm epsilon, norm kind, QKV head layout), the loss reduction
(sum vs mean over the batch) and, on a torch side B, the optimizer's (weight decay on every
parameter vs kernels only, AdamW epsilon inside vs outside the square root, bias correction
off vs on); it names the flips that make the pair pass. The softmax dtype is no flip here:
the check runs in fp32, where the attention softmax is fp32 either way.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

import vitctl
from vitctl.config import ViTConfig
from vitctl.data import preprocess
from vitctl.errors import CheckpointError, ConfigError, VitctlError
from vitctl.params import jax_param_shapes, rename, stack, unstack
from vitctl.train.settings import LOSSES, OPTIMIZERS, TrainConfig
from vitctl.verify import Side, config_diff, flips, open_side, set_precision

# fp32 bars, measured on clean pairs across every architecture option at tiny size
# (tests/test_verify_grads.py) and two larger ones (vit22b-demo/4; D=192, L=3, F=768, 100 classes:
# factored Adafactor): gradient max-rel at most 1.8e-6, update max-rel (from the same gradients)
# 3.9e-7, loss relative difference 2e-7; the bars leave 5-25x headroom.
GRAD_TOL = 1e-5
UPDATE_TOL = 1e-5
LOSS_TOL = 1e-6
NOISE = 1e-4  # a gradient this much smaller than the largest is round-off noise (see judge)
BACKENDS = ("jax", "torch")


@dataclasses.dataclass(frozen=True)
class Run:
    """How one side computes: its backend, config and the conventions a diagnosis flips."""

    backend: str
    cfg: ViTConfig
    reduction: str = "mean"  # of the loss over the batch
    switches: tuple[tuple[str, bool], ...] = ()  # torch_optim.make_optimizer's keyword switches


def fp32(cfg: ViTConfig) -> ViTConfig:
    """The config computing and holding its parameters in float32 (a bf16 checkpoint's weights are upcast)."""
    return dataclasses.replace(cfg, dtype="float32", param_dtype="float32")


def as_float32(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in params.items()}


def batch_for(cfg: ViTConfig, batch: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The seeded batch: uint8 images of the model's size and int labels below num_classes."""
    if not cfg.num_classes:
        raise ConfigError("--grads needs a classifier head: the model has num_classes 0", hint="verify the forward pass without --grads")
    if cfg.pool == "none":
        raise ConfigError("--grads needs one logit vector per image: pool 'none' gives one per token", hint="verify without --grads")
    images = preprocess.random_images(batch, cfg.image_size, cfg.channels, seed)
    labels = np.random.default_rng(seed + 1).integers(0, cfg.num_classes, batch).astype(np.int32)
    return images, labels


def run_jax(run: Run, params: dict[str, np.ndarray], images, labels, tcfg: TrainConfig, step_grads: dict | None = None) -> dict[str, Any]:
    """Loss, gradients and one optax update (per-layer JAX names, float32 numpy) on the JAX twin; the
    update from `step_grads` (per-layer JAX names) where given, else from its own gradients."""
    import jax
    from flax import nnx

    from vitctl.formats import layout
    from vitctl.model_jax.model import abstract_model
    from vitctl.model_jax.state import load_flat_params
    from vitctl.train import optim

    cfg = run.cfg
    model = abstract_model(cfg)
    load_flat_params(model, stack(params, cfg.depth))
    graphdef, state = nnx.split(model)
    tree = nnx.to_pure_dict(state)
    x = preprocess.to_jax_input(images, cfg.preprocess, cfg.image_size)
    scale = len(labels) if run.reduction == "sum" else 1

    def loss_fn(p):
        logits, _ = nnx.merge(graphdef, p)(x)
        return optim.objective(logits, labels, cfg.num_classes, tcfg.loss, tcfg.label_smoothing) * scale

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(tree)
    lr_fn = optim.schedule(tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.schedule, tcfg.cooldown)
    tx = optim.optimizer_for(tcfg, lr_fn, list(layout.flatten(tree)), cfg.depth)
    given = None if step_grads is None else layout.nest({k: np.asarray(v) for k, v in stack(step_grads, cfg.depth).items()})
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads if given is None else given, tree)

    def flat(t):
        return dict(unstack({k: np.asarray(v, np.float32) for k, v in layout.flatten(t).items()}, cfg.depth))

    return {"loss": float(loss), "grads": flat(grads), "updates": flat(updates)}


def run_torch(run: Run, params: dict[str, np.ndarray], images, labels, tcfg: TrainConfig, step_grads: dict | None = None) -> dict[str, Any]:
    """The same on the torch twin, with vitctl.train.torch_optim."""
    import torch

    from vitctl.model_torch.model import abstract_model
    from vitctl.train import torch_optim
    from vitctl.verify import _tensor

    cfg = run.cfg
    model = abstract_model(cfg)
    state = {}
    for name, w in params.items():
        tname, lay = rename(name, "jax")
        state[tname] = _tensor(lay.to_torch(w))
    model.load_state_dict(state, strict=True, assign=True)
    x = preprocess.to_torch_input(images, cfg.preprocess, cfg.image_size)
    logits, _ = model.train()(x)
    loss = torch_optim.objective(
        logits, torch.from_numpy(labels), cfg.num_classes, tcfg.loss, tcfg.label_smoothing, reduction=run.reduction
    )
    loss.backward()
    shapes = jax_param_shapes(cfg, stacked=False)
    grads = {}
    for tname, p in model.named_parameters():
        name, lay = rename(tname, "torch")
        grads[name] = lay.to_jax(p.grad.detach().numpy(), shapes[name])
        if step_grads is not None:
            p.grad = _tensor(lay.to_torch(step_grads[name]))
    lr_fn = torch_optim.schedule(tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.schedule, tcfg.cooldown)
    opt = torch_optim.make_optimizer(model, cfg, tcfg, lr_fn, **dict(run.switches))
    updates = {id(p): u for p, u in opt.updates()}
    ups = {}
    for tname, p in model.named_parameters():
        name, lay = rename(tname, "torch")
        if id(p) in updates:
            ups[name] = lay.to_jax(updates[id(p)].detach().numpy(), shapes[name])
    return {"loss": loss.item(), "grads": grads, "updates": ups}


def compute(run: Run, params, images, labels, tcfg, step_grads: dict | None = None) -> dict[str, Any]:
    return (run_jax if run.backend == "jax" else run_torch)(run, params, images, labels, tcfg, step_grads)


def compare(a: dict, b: dict, order: list[str], tol: float, by: str, scales: dict | None = None) -> dict[str, Any]:
    """Per tensor (in `order`): max-abs, max-rel (over max-abs of A, or `scales[name]`), rel_rms
    (||B-A|| / ||A||) and whether `by` (max_rel or rel_rms) is within `tol`; the first past it; the
    worst."""
    rows, first, missing = [], None, sorted(set(a) ^ set(b))
    for name in (n for n in order if n in a and n in b):
        a64, b64 = a[name].astype(np.float64).ravel(), b[name].astype(np.float64).ravel()
        diff = np.abs(a64 - b64)
        scale = (scales or {}).get(name, float(np.abs(a64).max()) if a64.size else 0.0)
        row = {"name": name, "max_abs": float(diff.max()) if diff.size else 0.0}
        row.update(max_rel=row["max_abs"] / (scale or 1.0), rel_rms=float(np.linalg.norm(diff)) / (float(np.linalg.norm(a64)) or 1.0))
        row["passed"] = row[by] <= tol
        rows.append(row)
        if not row["passed"] and first is None:
            first = name
    worst = max(rows, key=lambda r: r[by], default=None)
    return {
        "by": by, "params": rows, "first_divergent": first, "missing": missing, "worst": worst and worst[by],
        "worst_param": worst and worst["name"], "passed": first is None and not missing,
    }  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Bars:
    loss: float = LOSS_TOL  # |loss B - loss A| / |loss A|
    grad: float = GRAD_TOL  # max-rel of every gradient
    update: float = UPDATE_TOL  # max-rel of every update (both sides step from A's gradients)


def judge(out_a: dict, out_b: dict, order: list[str], bars: Bars) -> dict[str, Any]:
    """The loss, gradient and update comparisons and the verdict."""
    rel = abs(out_b["loss"] - out_a["loss"]) / (abs(out_a["loss"]) or 1.0)
    loss = {"a": out_a["loss"], "b": out_b["loss"], "rel": rel, "passed": rel <= bars.loss}
    # A gradient under NOISE of the largest is round-off of an exact zero (the key bias: softmax ignores a shift
    # shared by every key): judged relative to the largest gradient.
    top = max((float(np.abs(g).max()) for g in out_a["grads"].values() if g.size), default=0.0)
    noise = frozenset(n for n, g in out_a["grads"].items() if not g.size or float(np.abs(g).max()) <= NOISE * top)
    grads = compare(out_a["grads"], out_b["grads"], order, bars.grad, "max_rel", dict.fromkeys(noise, top))
    updates = compare(out_a["updates"], out_b["updates"], order, bars.update, "max_rel")
    return {"loss": loss, "grads": grads, "update": updates, "passed": loss["passed"] and grads["passed"] and updates["passed"]}


def grad_flips(run: Run, optimizer: str) -> list[tuple[str, Run, Any]]:
    """(what, B's flipped run, parameter transform) for every convention a diagnosis tries on B."""
    out = [(what, dataclasses.replace(run, cfg=cfg), transform) for what, cfg, transform in flips(run.cfg, "fp32")]
    other = "sum" if run.reduction == "mean" else "mean"
    what = {"sum": "loss summed over the batch instead of averaged", "mean": "loss averaged over the batch instead of summed"}[other]
    out.append((what, dataclasses.replace(run, reduction=other), None))
    if run.backend != "torch":  # the optimizer switches are torch_optim's
        return out
    switches = dict(run.switches)
    options = [("decay_all", False, "weight decay on every parameter", "weight decay on kernels only")]
    if optimizer == "adamw":
        options += [
            ("eps_inside_sqrt", False, "AdamW epsilon inside the square root", "AdamW epsilon outside the square root"),
            ("bias_correction", True, "AdamW without bias correction", "AdamW with bias correction"),
        ]
    for key, default, flipped_on, flipped_off in options:
        value = switches.get(key, default)
        what = flipped_on if value == default else flipped_off
        out.append((what, dataclasses.replace(run, switches=tuple({**switches, key: not value}.items())), None))
    return out


def diagnose(
    run_b: Run, b_params: dict, images, labels, tcfg: TrainConfig, out_a: dict, order: list[str], bars: Bars
) -> list[dict[str, Any]]:
    """Each flip on B, judged by the same bars; `named`: the flip makes the pair pass."""
    results = []
    for what, run, transform in grad_flips(run_b, tcfg.optimizer):
        try:
            out_b = compute(run, transform(b_params) if transform else b_params, images, labels, tcfg, out_a["grads"])
        except VitctlError as e:
            results.append({"flip": what, "passed": False, "named": False, "error": e.message})
            continue
        r = judge(out_a, out_b, order, bars)
        results.append(
            {"flip": what, "passed": r["passed"], "named": r["passed"], "loss_rel": r["loss"]["rel"], "grad_max_rel": r["grads"]["worst"],
             "update_rel_rms": r["update"]["worst"]}
        )  # fmt: skip
    return results


def train_settings(optimizer: str = "adamw", loss: str = "softmax", label_smoothing: float = 0.0, **hyper: Any) -> TrainConfig:
    """The TrainConfig of the one step: train's hyper-parameters, a constant learning rate (one step, no warmup)."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown --optimizer '{optimizer}'", hint=f"choose one of: {', '.join(OPTIMIZERS)}")
    if loss not in LOSSES:
        raise ConfigError(f"unknown --loss '{loss}'", hint=f"choose one of: {', '.join(LOSSES)}")
    hyper = {k: v for k, v in hyper.items() if v is not None}
    return TrainConfig(steps=1, warmup=0, optimizer=optimizer, loss=loss, label_smoothing=label_smoothing, **hyper)


def verify_grads(
    a: str | Path, b: str | Path, *, batch: int = 4, seed: int = 0, backend_a: str = "jax", backend_b: str = "torch",
    run_diagnose: bool = False, bars: Bars = Bars(), b_reduction: str = "mean", b_switches: dict[str, bool] | None = None,
    **train: Any,
) -> dict[str, Any]:  # fmt: skip
    """The whole check of A against B; returns the report (module docstring). `train`: train_settings'
    arguments (optimizer, loss, label_smoothing, lr, weight_decay, ...). b_reduction and b_switches
    run B with a porting mistake (the tests' perturbed pairs)."""
    for flag, value in (("--backend-a", backend_a), ("--backend-b", backend_b)):
        if value not in BACKENDS:
            raise ConfigError(f"unknown {flag} '{value}'", hint=f"choose one of: {', '.join(BACKENDS)}")
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    t0 = time.perf_counter()
    tcfg = train_settings(**train)
    settings = set_precision("fp32")
    side_a, side_b = open_side(a, "A"), open_side(b, "B")
    run_a = Run(backend_a, fp32(side_a.cfg))
    run_b = Run(backend_b, fp32(side_b.cfg), b_reduction, tuple((b_switches or {}).items()))
    images, labels = batch_for(side_a.cfg, batch, seed)
    report = _header(side_a, side_b, run_a, run_b, tcfg, bars, settings)
    report["inputs"] = {"seeded": batch, "seed": seed, "labels": labels.tolist()}
    try:
        b_params = as_float32(side_b.params())
        out_a = compute(run_a, as_float32(side_a.params()), images, labels, tcfg)
        out_b = compute(run_b, b_params, images, labels, tcfg, out_a["grads"])
    except CheckpointError as e:  # missing or unexpected tensors: a failed check
        report.update(passed=False, problems=[e.message + (f" ({e.hint})" if e.hint else "")])
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return report
    order = list(jax_param_shapes(side_a.cfg, stacked=False))
    report.update(judge(out_a, out_b, order, bars), problems=[])
    if not report["passed"]:
        report["hint"] = (
            "--diagnose flips the usual conventions on B (GELU, norm epsilon, loss reduction, weight-decay mask, AdamW epsilon, bias correction)"
        )
        if run_diagnose:
            report["diagnosis"] = diagnose(run_b, b_params, images, labels, tcfg, out_a, order, bars)
            named = [d["flip"] for d in report["diagnosis"] if d["named"]]
            report["diagnosis_note"] = (
                f"with {' / '.join(named)} on B the pair passes" if named else "no single known convention makes the pair pass"
            )
            report["hint"] = None
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _header(side_a: Side, side_b: Side, run_a: Run, run_b: Run, tcfg: TrainConfig, bars: Bars, settings: dict) -> dict[str, Any]:
    step = {k: getattr(tcfg, k) for k in ("optimizer", "loss", "label_smoothing", "lr", "weight_decay", "head_weight_decay", "clip_norm",
                                          "b1", "b2", "momentum", "nesterov", "layer_decay", "head_lr_mult")}  # fmt: skip
    return {
        "a": {"path": str(side_a.path), "format": side_a.format, "backend": run_a.backend},
        "b": {"path": str(side_b.path), "format": side_b.format, "backend": run_b.backend},
        "tolerance": dataclasses.asdict(bars),
        "criterion": f"loss relative difference <= {bars.loss:g}; every gradient's max-abs difference / max-abs of A's <= {bars.grad:g}; "
        f"every update's (both from A's gradients) <= {bars.update:g}",
        "step": step,
        "settings": {**settings, "vitctl": vitctl.__version__},
        "config_diff": config_diff(side_a.cfg, side_b.cfg),
    }
