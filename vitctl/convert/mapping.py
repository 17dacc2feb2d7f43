"""vitctl's JAX parameters <-> its torch state_dict, in memory, by the one table in vitctl.params.

numpy only. Each tensor is renamed by its row of `vitctl.params.PARAMS` and transformed by the
row's layout. A conversion must use every source tensor once and produce every expected
target tensor once, with the expected shape, or it raises an error naming the tensors.
The JAX blocks are stacked (leading L axis): unstacked before renaming, restacked after.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vitctl.config import ViTConfig
from vitctl.params import check_coverage, jax_param_shapes, rename, stack, torch_param_shapes, unstack


def jax_to_torch(flat: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """JAX parameters (stacked, "/"-joined paths) -> torch state_dict arrays, checked both ways."""
    check_coverage({n: w.shape for n, w in flat.items()}, jax_param_shapes(cfg), "the JAX parameters")
    out = {}
    for name, w in unstack(flat, cfg.depth):
        tname, layout = rename(name, "jax")
        out[tname] = layout.to_torch(w)
    check_coverage({n: w.shape for n, w in out.items()}, torch_param_shapes(cfg), "the converted torch state_dict")
    return out


def torch_to_jax(state: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """torch state_dict arrays -> JAX parameters (stacked), checked both ways."""
    check_coverage({n: w.shape for n, w in state.items()}, torch_param_shapes(cfg), "the torch state_dict")
    expected = jax_param_shapes(cfg, stacked=False)
    out = {}
    for name, w in state.items():
        jname, layout = rename(name, "torch")
        out[jname] = layout.to_jax(w, expected[jname])
    return stack(out, cfg.depth)
