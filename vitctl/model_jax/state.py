"""The JAX model's parameters as one flat dict by "/"-joined path (`blocks/q/kernel`), out of
a model and back in: the form the converters and checkpoints use. NNX bookkeeping that
torch's state_dict and load_state_dict already do, kept out of model.py so that it holds
the model alone and reads line by line as its torch twin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vitctl.params import check_coverage


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """{"blocks/q/kernel": array, ...}: the parameters by "/"-joined path."""
    return {"/".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_flat_params(model: nnx.Module, flat: dict) -> None:
    """Sets every parameter from `flat` (as from flat_params); shapes and names must match exactly."""
    current = flat_params(model)
    check_coverage({n: tuple(w.shape) for n, w in flat.items()}, {n: tuple(w.shape) for n, w in current.items()}, "the JAX parameters")
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        name = "/".join(map(str, path))
        var.set_value(jnp.asarray(flat[name], dtype=current[name].dtype))
    nnx.update(model, state)
