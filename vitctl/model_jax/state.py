"""The JAX model's parameters in and out: a fresh or shape-only model, and its parameters as
one flat dict by "/"-joined path (`blocks/q/kernel`), the form the converters and
checkpoints use. NNX bookkeeping that torch's state_dict and load_state_dict already do, so
model.py holds the model alone and reads line by line as its torch twin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from vitctl.params import check_coverage

if TYPE_CHECKING:
    from vitctl.config import ViTConfig
    from vitctl.model_jax.model import ViT


def init_model(cfg: ViTConfig, seed: int = 0) -> ViT:
    """A freshly initialised model; sharding annotations are metadata only (no mesh needed)."""
    from vitctl.model_jax.model import ViT

    with nnx.use_eager_sharding(False):
        return ViT(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ViTConfig) -> ViT:
    """The model's shapes and dtypes, with no memory allocated (jax.eval_shape)."""
    from vitctl.model_jax.model import ViT

    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))


def flat_params(model: ViT) -> dict[str, jax.Array]:
    """{"blocks/q/kernel": array, ...}: the parameters by "/"-joined path."""
    return {"/".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_flat_params(model: ViT, flat: dict) -> None:
    """Sets every parameter from `flat` (as from flat_params); shapes and names must match exactly."""
    current = flat_params(model)
    check_coverage({n: tuple(w.shape) for n, w in flat.items()}, {n: tuple(w.shape) for n, w in current.items()}, "the JAX parameters")
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        name = "/".join(map(str, path))
        var.set_value(jnp.asarray(flat[name], dtype=current[name].dtype))
    nnx.update(model, state)
