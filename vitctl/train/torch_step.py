"""The train step of `vitctl train --backend torch`: model, batches, step, held-out accuracy, attention statistics.

The torch side of vitctl.train.step, the same quantities in the same order:
- build_model: the torch twin from `seed` (torch's initialisation, on every process alike,
  before sharding), or with --init-from the source's weights through vitctl.open (the same
  plan as the JAX trainer: a new head for other classes starts at zero, a learned position
  embedding is resampled for another patch grid, every other tensor must come from the source).
- train_step: forward, objective (vitctl.train.torch_optim, optax's formulas; mixup / cutmix
  targets through soft_objective), backward (FSDP2 reduce-scatters the mean gradient), the
  gradient norm of all gradients, one optimizer step. Compute dtype and remat come from the
  model config (cfg.dtype: the model's own bf16 compute over float32 master weights, as the
  JAX twin does; cfg.remat: torch_dist.shard); the logits and the loss are float32.
- attention_stats: per layer the maximum attention logit and the attention entropy
  (arXiv:2302.05442 sec. 3.1), from each block's own norm, q/k projections and QK-norm, read
  in a forward pre-hook (where FSDP has gathered the block's parameters).
- evaluate: top-1 accuracy over this process's share of every held-out batch, summed over processes.

Images arrive as the data pipeline gives them to both trainers (float32 NHWC); the torch
model takes NCHW.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from vitctl.config import ViTConfig
from vitctl.train import torch_dist
from vitctl.train.settings import TrainConfig
from vitctl.train.torch_optim import objective


def build_model(cfg: ViTConfig, seed: int, source=None, posemb_resize: str = "bilinear") -> tuple[nn.Module, list[str]]:
    """(the unsharded torch model on the CPU, --init-from notes): from `seed`, or holding `source`'s weights."""
    from vitctl.model_torch.model import ViT, init_model

    if source is None:
        return init_model(cfg, seed), []
    state, messages = source_state(source, cfg, posemb_resize)
    model = ViT(cfg)
    model.load_state_dict(state, strict=True)
    return model, messages


def source_state(source, cfg: ViTConfig, posemb_resize: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The run's torch state_dict from an open vitctl.open.Checkpoint: init_from.plan's new, resampled and loaded tensors."""
    from vitctl.params import jax_param_shapes, rename
    from vitctl.posemb import resample_posemb
    from vitctl.train.init_from import plan

    p = plan(source.cfg, cfg, source.hub_shapes)
    state = {}
    for name, shape in jax_param_shapes(cfg, stacked=False).items():
        if name in p.new:
            w = np.zeros(shape, np.float32)
        elif name in p.resampled:
            w = resample_posemb(source.read_slice(name), (cfg.grid, cfg.grid), prefix=1 if cfg.class_posemb else 0, method=posemb_resize)
        else:
            w = source.read_slice(name)
        torch_name, form = rename(name, "jax")
        state[torch_name] = torch.from_numpy(np.ascontiguousarray(form.to_torch(np.asarray(w, np.float32))))
    return state, p.messages


def to_device(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch from the data pipeline: images float32 [B, S, S, C] -> [B, C, S, S]; labels int [B] or float32 [B, K]."""
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2))).to(device)
    labels = np.asarray(labels)
    y = torch.from_numpy(labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64)).to(device)
    return x, y


def soft_objective(logits: torch.Tensor, targets: torch.Tensor, loss: str = "softmax", label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean loss against target distributions [B, K] (mixup / cutmix): step.soft_objective's formulas."""
    logits, targets = logits.float(), targets.float()
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]
    if loss == "softmax":
        return -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()
    sig = torch.nn.functional.logsigmoid
    return (-targets * sig(logits) - (1.0 - targets) * sig(-logits)).sum(-1).mean()


def grad_norm(params: Iterable[torch.Tensor]) -> float:
    """The global L2 norm of every gradient (shards of all processes together)."""
    total = None
    for p in params:
        if p.grad is not None:
            s = (p.grad.float() * p.grad.float()).sum()
            total = s if total is None else total + s
    if total is None:
        return 0.0
    total = total.full_tensor() if hasattr(total, "full_tensor") else total
    return float(torch.sqrt(total))


def train_step(model: nn.Module, opt, images: torch.Tensor, labels: torch.Tensor, cfg: ViTConfig, tcfg: TrainConfig,
               lr_fn: Callable[[int], float]) -> dict[str, float]:  # fmt: skip
    """One optimizer step on this process's rows; returns {"loss" (mean over all processes), "grad_norm", "lr"}."""
    count = opt.param_groups[0]["step"]
    logits, _ = model(images)
    if labels.ndim == 2:
        loss = soft_objective(logits, labels, tcfg.loss, tcfg.label_smoothing)
    else:
        loss = objective(logits, labels, cfg.num_classes, tcfg.loss, tcfg.label_smoothing)
    loss.backward()
    norm = grad_norm(model.parameters())
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": torch_dist.mean(float(loss.detach())), "grad_norm": norm, "lr": float(lr_fn(count))}


@torch.no_grad()
def attention_stats(model: nn.Module, images: torch.Tensor) -> dict[str, list[float]]:
    """{"attn_logit_max": [L], "attn_entropy": [L]} of `images` (max and mean over all processes' rows)."""
    maxes: list[float] = []
    ents: list[float] = []

    def hook(block, args):
        x = args[0]
        h = block.norm(x)
        q, k = block.q(h), block.k(h)  # [B, T, N, K]
        if block.q_norm is not None:
            q, k = block.q_norm(q), block.k_norm(k)
        logits = torch.einsum("BSNK,BTNK->BNST", q.float(), k.float()) * q.shape[-1] ** -0.5
        logp = torch.log_softmax(logits, -1)
        maxes.append(float(logits.max()))
        ents.append(float(-(logp.exp() * logp).sum(-1).mean()))

    handles = [b.register_forward_pre_hook(hook) for b in model.blocks]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return {"attn_logit_max": [torch_dist.maximum(m) for m in maxes], "attn_entropy": [torch_dist.mean(e) for e in ents]}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], device: torch.device) -> float:
    """Top-1 accuracy over `batches` (this process's (images, labels, valid) of every global batch); pad rows are not counted."""
    correct = total = 0
    for images, labels, valid in batches:
        x, y = to_device(images, labels, device)
        ok = torch.from_numpy(np.asarray(valid) > 0).to(device)
        hit = (model(x)[0].argmax(-1) == y) & ok
        correct, total = correct + int(hit.sum()), total + int(ok.sum())
    return torch_dist.total(correct) / max(torch_dist.total(total), 1)
