"""Run any checkpoint vitctl opens on either backend: prepared images in, logits and/or features out.

The parameters are read under JAX per-layer names (vitctl.open) and loaded into the JAX or the
PyTorch twin, whatever the format, so both backends run the same numbers on the same input arrays.
fp32 matmuls run at the highest precision (vitctl.verify.set_precision, set by the caller).

Features (`--layer`, `--pool`):
  pre_logits: the model's own pooled representation (its MAP head, GAP or class token after the
    final norm). --pool must be omitted or name the model's own pooling; a model without pooling
    (pool "none") takes gap.
  block:N (0-based, negative counts from the end): the output of block N, before the final norm,
    pooled by gap (mean over the patch tokens; the class token, if any, is left out) or tok (the
    class token, only for a model that has one). map is refused: the MAP head was trained on the
    final-norm output of the last block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from vitctl.config import ViTConfig
from vitctl.errors import ConfigError, MissingDependencyError
from vitctl.open import Checkpoint

POOLS = ("map", "gap", "tok")
BACKENDS = ("jax", "torch")
LAYER_HINT = "use --layer pre_logits, or --layer block:N with N a block index (negative counts from the end)"


@dataclasses.dataclass(frozen=True)
class Features:
    """Which representation: `out` is the model's intermediate (pre_logits, block03); `pool` how it becomes one vector."""

    layer: str  # as the user writes it: "pre_logits" or "block:N" (N >= 0)
    out: str
    pool: str  # map, gap or tok
    pooled_by_model: bool  # pre_logits of a pooling model: already one vector per image


class Outputs(NamedTuple):
    """float32 numpy outputs of one batch: logits [B, num_classes] and features [B, D], each None when not asked for."""

    logits: np.ndarray | None
    features: np.ndarray | None


def resolve_features(cfg: ViTConfig, layer: str = "pre_logits", pool: str | None = None) -> Features:
    """Checks --layer and --pool against the model; refuses combinations that do not exist."""
    if pool is not None and pool not in POOLS:
        raise ConfigError(f"unknown --pool '{pool}'", hint=f"choose one of: {', '.join(POOLS)}")
    if layer == "pre_logits":
        if cfg.pool == "none":
            if pool not in (None, "gap"):
                raise ConfigError(f"--pool {pool}: this model has no pooling (pool 'none'), so its pre_logits are tokens",
                                  hint="use --pool gap (mean over the tokens)")  # fmt: skip
            return Features("pre_logits", "pre_logits", "gap", False)
        if pool not in (None, cfg.pool):
            raise ConfigError(
                f"--pool {pool} with --layer pre_logits: the model's pre-logits are already pooled by its {cfg.pool} head",
                hint=f"omit --pool, or pool a block's tokens yourself: --layer block:{cfg.depth - 1} --pool gap",
            )
        return Features("pre_logits", "pre_logits", cfg.pool, True)
    m = re.fullmatch(r"block:(-?\d+)", layer)
    if m is None:
        raise ConfigError(f"unknown --layer '{layer}'", hint=LAYER_HINT)
    n = int(m.group(1))
    n = n + cfg.depth if n < 0 else n
    if not 0 <= n < cfg.depth:
        raise ConfigError(f"--layer {layer}: the model has {cfg.depth} block(s), block:0 .. block:{cfg.depth - 1}", hint=LAYER_HINT)
    pool = pool or ("tok" if cfg.pool == "tok" else "gap")
    if pool == "map":
        raise ConfigError(
            f"--pool map with --layer {layer}: the MAP head was trained on the final-norm output of the last block, not on a block's tokens",
            hint="use --layer pre_logits for the MAP head's features, or --pool gap" + (" or tok" if cfg.pool == "tok" else ""),
        )
    if pool == "tok" and cfg.pool != "tok":
        raise ConfigError(f"--pool tok: this model has no class token (its pool is '{cfg.pool}')", hint="use --pool gap")
    return Features(f"block:{n}", f"block{n:02d}", pool, False)


def pool_tokens(x, feats: Features, cfg: ViTConfig):
    """[B, T, D] tokens (jax or torch array) -> [B, D]; pooled pre-logits pass through."""
    if feats.pooled_by_model:
        return x
    if feats.pool == "tok":
        return x[:, 0]
    return x[:, 1:].mean(1) if cfg.pool == "tok" else x.mean(1)  # gap over the patch tokens


def default_backend(ck: Checkpoint, backend: str | None = None) -> str:
    """`backend` checked, else the checkpoint's own: torch for vitctl-torch, timm and Hugging Face dirs, jax otherwise."""
    if backend is None:
        return "torch" if ck.backend in ("torch", "timm") else "jax"
    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend '{backend}'", hint="choose jax or torch")
    return backend


def stacked_params(ck: Checkpoint) -> dict[str, np.ndarray]:
    """The checkpoint's parameters under JAX names, the blocks stacked (the twins' layout)."""
    from vitctl.params import stack

    return stack(ck.params(), ck.cfg.depth)


def jax_model(ck: Checkpoint, cfg: ViTConfig | None = None):
    """The Flax NNX twin of `cfg` (default the checkpoint's) holding the checkpoint's weights."""
    try:
        from vitctl.model_jax.model import abstract_model
        from vitctl.model_jax.state import load_flat_params
    except ImportError as e:
        raise MissingDependencyError(
            f"--backend jax needs jax and flax ({e})", hint="pip install 'vitctl[jax]', or use --backend torch"
        ) from None
    model = abstract_model(cfg or ck.cfg)
    load_flat_params(model, stacked_params(ck))
    return model


def torch_model(ck: Checkpoint, cfg: ViTConfig | None = None):
    """The PyTorch twin of `cfg` (default the checkpoint's) holding the checkpoint's weights, in eval mode."""
    try:
        from vitctl.convert import mapping
        from vitctl.model_torch.model import abstract_model
        from vitctl.verify import _tensor
    except ImportError as e:
        raise MissingDependencyError(
            f"--backend torch needs torch ({e})", hint="pip install 'vitctl[torch]', or use --backend jax"
        ) from None
    cfg = cfg or ck.cfg
    state = {k: _tensor(v) for k, v in mapping.jax_to_torch(stacked_params(ck), cfg).items()}
    model = abstract_model(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def make_runner(
    ck: Checkpoint, backend: str, feats: Features | None = None, *, logits: bool = True, cfg: ViTConfig | None = None
) -> Callable[[np.ndarray], Outputs]:
    """A function: float32 [B, S, S, C] prepared images (NHWC, as data.pipeline gives them) -> Outputs.

    `feats`: which features to return (None: none); `logits`: whether to return the head's logits
    (refused for a model without a head). JAX compiles once per batch shape: pad the last batch."""
    cfg = cfg or ck.cfg
    if logits and not cfg.num_classes:
        raise ConfigError("this model has no classification head (num_classes 0): it gives features, not classes",
                          hint="use `vitctl embed` or `vitctl probe` for its features")  # fmt: skip
    if backend == "jax":
        import jax.numpy as jnp
        from flax import nnx

        def outputs(m, x):
            y, out = m(x)
            f = pool_tokens(out[feats.out], feats, cfg).astype(jnp.float32) if feats else None
            return (y.astype(jnp.float32) if logits else None), f

        forward = nnx.jit(outputs)
        model = jax_model(ck, cfg)

        def run_jax(x: np.ndarray) -> Outputs:
            y, f = forward(model, jnp.asarray(x))
            return Outputs(None if y is None else np.asarray(y), None if f is None else np.asarray(f))

        return run_jax
    import torch

    model = torch_model(ck, cfg)

    def run_torch(x: np.ndarray) -> Outputs:
        with torch.inference_mode():
            y, out = model(torch.from_numpy(x).permute(0, 3, 1, 2))
            f = pool_tokens(out[feats.out], feats, cfg).float().numpy() if feats else None
            return Outputs(y.float().numpy() if logits else None, f)

    return run_torch


def recorded_class_names(ck: Checkpoint, notes: list[str] | None = None) -> list[str] | None:
    """The first class names recorded along the checkpoint's lineage (its provenance, then its source's:
    converted or pulled), if they fit the head; None where none is recorded. A run trained on fewer classes
    than its head records fewer names (the rest are labelled by index). Unusable names are noted and ignored."""
    from vitctl.hub.card import lineage

    for p in lineage(ck.provenance):
        names = p.get("class_names")
        if names is None:
            continue
        if isinstance(names, list) and 0 < len(names) <= ck.cfg.num_classes and all(isinstance(n, str) for n in names):
            return list(names)
        if notes is not None:
            notes.append(f"the checkpoint's class names are not a list of at most {ck.cfg.num_classes} strings; they are not used")
        return None
    return None


def one_blas_thread():
    """numpy's OpenBLAS at one thread while images are prepared for a model in this process: the resize's
    GEMMs are small, and OpenBLAS's own threads spin-wait for one another, which on a busy machine costs
    several times the work (predict: 15-19 vs 50-72 images/s under load). The same numbers either way:
    OpenBLAS splits a GEMM by output blocks, never along the sum. torch's threads (OpenMP) and XLA's keep
    their count. Without threadpoolctl (the [data] extra), OpenBLAS keeps its threads."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return contextlib.nullcontext()
    return ThreadpoolController().select(internal_api="openblas").limit(limits=1)
