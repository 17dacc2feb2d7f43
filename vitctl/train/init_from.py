"""Fine-tuning from pretrained weights: `vitctl train --init-from CKPT`.

- The source is any checkpoint the door opens (vitctl.open.open_checkpoint: vitctl-jax,
  vitctl-torch, timm, big_vision .npz with --prefix, hf://org/name[@rev], and whatever else
  it learns to read). The run's model is the source's config with the run's image size,
  classes, dtype and remat; a --model that differs in anything else is refused.
- `load_into` puts the weights straight into the sharded model: for each parameter,
  jax.make_array_from_callback asks for the slices this process's devices hold, and each
  slice is read alone (Checkpoint.read_slice: safetensors pages, Orbax chunks), so no host
  holds a full copy. Stacked block parameters (leading L axis) are assembled from the
  per-layer tensors of the layers the slice covers.
- Other classes than the source's: a new head (head/kernel, head/bias) starting at zero
  (big_vision's transfer configs); the source head is not loaded. Another patch grid: the
  learned position embedding is resampled (vitctl.posemb.resample_posemb, the class-token
  slot kept apart). Every other parameter must come from the source and every source
  tensor must be used, or one error lists the rest: never a silent partial load.
- `provenance`: the resolved source (public name, revision of an hf:// source, sha256 of
  each weight file, format) for config.json and train_config.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vitctl.config import ViTConfig
from vitctl.errors import ConfigError, UnmappedParamError
from vitctl.params import is_stacked, jax_param_shapes, layer_name
from vitctl.train.settings import HUB_PREFIX, TrainConfig, base_model, default, public_source

__all__ = ["load_into", "open_source", "provenance", "run_config"]

HEAD = ("head/kernel", "head/bias")
RUN_FIELDS = ("image_size", "num_classes", "dtype", "remat")  # what a fine-tuning run may set; the rest is the source's
SIZE_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "channels")  # named first when --model differs


def open_source(tcfg: TrainConfig):
    """The checkpoint --init-from names, opened through the door (headers only)."""
    from vitctl.open import open_checkpoint

    ckpt = open_checkpoint(tcfg.init_from, prefix=tcfg.prefix, label="--init-from")
    try:
        ckpt.check_coverage()  # every tensor its config implies, by name and shape (headers only), before any output exists
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def check_model(tcfg: TrainConfig, source: ViTConfig, what: str) -> None:
    """--model with --init-from: refused unless it describes the source's architecture."""
    if tcfg.model == default("model"):  # not given: the source's config is the run's
        return
    given = base_model(tcfg)
    fields = [f.name for f in dataclasses.fields(ViTConfig) if f.name not in RUN_FIELDS]
    differ = [f for f in SIZE_FIELDS if getattr(given, f) != getattr(source, f)]
    differ += [f for f in fields if f not in SIZE_FIELDS and getattr(given, f) != getattr(source, f)]
    if differ:
        shown = "; ".join(f"{f}: --model {getattr(given, f)!r}, checkpoint {getattr(source, f)!r}" for f in differ[:4])
        raise ConfigError(
            f"--model {tcfg.model} does not match the --init-from checkpoint {what}: {shown}",
            hint="leave --model out: a fine-tuning run takes the checkpoint's architecture (--image-size and --num-classes may differ)",
        )


def run_config(tcfg: TrainConfig, source: ViTConfig, image_hw: int, num_classes: int, what: str) -> ViTConfig:
    """The fine-tuning run's model: the source's config with the run's image size, classes, dtype and remat."""
    from vitctl.train.settings import model_config

    check_model(tcfg, source, what)
    return model_config(tcfg, image_hw, num_classes, base=source)


@dataclasses.dataclass
class Plan:
    """What `load_into` does with each parameter of the run's model."""

    new: list[str]  # created here (a head for other classes), zero
    resampled: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # pos_embed: (source shape, run shape)
    dropped: list[str]  # source tensors deliberately not loaded (the old head)
    messages: list[str]


def plan(source: ViTConfig, cfg: ViTConfig, source_shapes: Mapping[str, tuple[int, ...]]) -> Plan:
    """Checks the run's parameters against the source's per-layer tensors; one error lists every mismatch."""
    target = jax_param_shapes(cfg, stacked=False)
    new_head = cfg.num_classes != source.num_classes
    new = [n for n in HEAD if n in target] if new_head else []
    dropped = [n for n in HEAD if n in source_shapes] if new_head else []
    resampled = {}
    if "pos_embed" in target and "pos_embed" in source_shapes and target["pos_embed"] != tuple(source_shapes["pos_embed"]):
        resampled["pos_embed"] = (tuple(source_shapes["pos_embed"]), target["pos_embed"])
    missing = sorted(n for n in target if n not in source_shapes and n not in new)
    unused = sorted(n for n in source_shapes if n not in target and n not in dropped)
    wrong = sorted(n for n in target if n in source_shapes and n not in new and n not in resampled and tuple(source_shapes[n]) != target[n])
    problems = [f"not in the checkpoint ({len(missing)}): {', '.join(missing[:8])}"] if missing else []
    problems += [f"checkpoint tensors the model does not use ({len(unused)}): {', '.join(unused[:8])}"] if unused else []
    problems += [f"'{n}' is {tuple(source_shapes[n])} in the checkpoint, {target[n]} in the model" for n in wrong[:8]]
    if problems:
        raise UnmappedParamError(
            "--init-from: the checkpoint does not fill the model: " + "; ".join(problems),
            hint="every parameter must be loaded (only a head for new classes starts fresh); check the checkpoint's config",
        )
    messages = []
    if new:
        messages.append(
            f"new head for {cfg.num_classes} classes (the checkpoint has {source.num_classes}): "
            f"{', '.join(new)} start at zero; the checkpoint's head is not loaded"
        )
    for n, (a, b) in resampled.items():
        messages.append(f"{n} resampled from {a} to {b} for {cfg.image_size} px")
    return Plan(new, resampled, dropped, messages)


def _key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


def _reader(ckpt, name: str, shape: tuple[int, ...], dtype, cfg: ViTConfig, p: Plan, posemb_resize: str) -> Callable:
    """index (over the stacked JAX shape) -> that slice of parameter `name`, read alone."""
    if name in p.new:
        return lambda index: np.zeros([len(range(n)[s]) for n, s in zip(shape, index)] + list(shape[len(index) :]), dtype)
    if name in p.resampled:
        from vitctl.posemb import resample_posemb

        prefix = 1 if cfg.class_posemb else 0  # the class token's row stays as it is
        whole = resample_posemb(ckpt.read_slice(name), (cfg.grid, cfg.grid), prefix=prefix, method=posemb_resize).astype(dtype)
        return lambda index: whole[index]
    if not is_stacked(name):
        return lambda index: ckpt.read_slice(name, index).astype(dtype, copy=False)

    def layers(index):
        first, rest = (index[0], tuple(index[1:])) if index else (slice(None), ())
        return np.stack([ckpt.read_slice(layer_name(name, i), rest).astype(dtype, copy=False) for i in range(shape[0])[first]])

    return layers


def load_into(ckpt, cfg: ViTConfig, abstract_params: Mapping[str, Any], *, posemb_resize: str = "bilinear") -> tuple[dict[str, Any], Plan]:
    """The run's parameters from `ckpt` (a vitctl.open.Checkpoint), placed straight onto their shards.

    Args:
        ckpt: the open source checkpoint (its config: ckpt.cfg).
        cfg: the run's model config (run_config: the source's with the run's size and classes).
        abstract_params: the model's parameters as nested jax.ShapeDtypeStruct with shardings
            (Setup.abstract["params"]).
        posemb_resize: bilinear (big_vision) or bicubic (timm) for a new patch grid.
    Returns:
        (params as nested jax.Arrays, like abstract_params; the Plan: new, resampled and dropped tensors).

    Each process reads only the slices its devices hold (jax.make_array_from_callback calls
    back for addressable shards only); a slice that several local devices share is read once.
    """
    import jax

    from vitctl.formats import layout

    p = plan(ckpt.cfg, cfg, ckpt.hub_shapes)
    flat = layout.flatten(abstract_params)
    want = jax_param_shapes(cfg)
    if set(flat) != set(want):
        raise UnmappedParamError(
            f"--init-from: the model's parameters {sorted(set(flat) ^ set(want))[:8]} are not in vitctl's parameter table"
        )
    out = {}
    for name, a in flat.items():
        read = _reader(ckpt, name, tuple(a.shape), np.dtype(a.dtype), cfg, p, posemb_resize)
        seen: dict[tuple, np.ndarray] = {}

        def callback(index, read=read, seen=seen):
            k = _key(index)
            if k not in seen:
                seen[k] = read(index)
            return seen[k]

        out[name] = jax.make_array_from_callback(tuple(a.shape), a.sharding, callback)
        seen.clear()
    return layout.nest(out), p


def provenance(ckpt, spec: str) -> dict[str, Any]:
    """The resolved source as a published checkpoint may name it: public name, hf:// revision,
    format, and the sha256 of each file that defines its weights (Checkpoint.files())."""
    from vitctl import checkpoint as ckpt_mod
    from vitctl.formats.base import hf_snapshot

    record: dict[str, Any] = {"source": public_source(spec), "format": ckpt.format}
    if spec.startswith(HUB_PREFIX):
        snapshot = hf_snapshot(ckpt.path)
        record["revision"] = snapshot.rsplit("@", 1)[1] if snapshot else spec.partition("@")[2] or "main"
    root = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    record["sha256"] = {str(f.relative_to(root)) if f.is_relative_to(root) else f.name: _sha256(f) for f in ckpt.files()}
    return ckpt_mod.public_provenance(record)


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            h.update(chunk)
    return h.hexdigest()
