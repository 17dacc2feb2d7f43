"""`init_checkpoint`: a freshly initialised checkpoint (config.json + weights) in a new directory.

Both backends start from the JAX initialisation (converted through the mapping table for
torch), so one seed gives the same weights; with jax missing, --backend torch falls back to
torch's own initialisation (different numbers), and says so. Memory and disk are checked
before anything is written; the directory appears whole or not at all (checkpoint.atomic_output),
and config.json records how the weights came about (provenance: source, seed, init).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitctl import checkpoint as ckpt
from vitctl.config import ViTConfig
from vitctl.convert.mapping import jax_to_torch
from vitctl.errors import MissingDependencyError, ResourceError, VitctlError
from vitctl.formats import layout
from vitctl.params import param_counts
from vitctl.units import human_bytes
from vitctl.untrusted import require_disk, require_memory, sigterm_as_interrupt

RUNTIME_BYTES = 2**30  # what jax, XLA and the interpreter take beside the parameters


def _jax_init(cfg: ViTConfig, seed: int) -> dict[str, Any]:
    from vitctl.model_jax.model import init_model
    from vitctl.model_jax.state import flat_params

    return flat_params(init_model(cfg, seed))


def _torch_init(cfg: ViTConfig, seed: int) -> dict[str, Any]:
    """Torch-native init, used only when jax is missing (different numbers from the JAX init)."""
    import ml_dtypes

    try:
        import torch

        from vitctl.model_torch.model import init_model
    except ImportError as e:
        raise MissingDependencyError(f"vitctl init needs jax or torch ({e})", hint="pip install 'vitctl[jax]' or 'vitctl[torch]'") from None

    state = init_model(cfg, seed).state_dict()
    as_np = {torch.bfloat16: lambda t: t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)}
    return {k: np.asarray(as_np.get(t.dtype, torch.Tensor.numpy)(t.detach().cpu())) for k, t in state.items()}


def _check_resources(cfg: ViTConfig, name: str, out_dir: Path) -> int:
    """The parameters' bytes, once memory and disk are known to hold them; else a ResourceError."""
    nbytes = param_counts(cfg)["params_total"] * (2 if cfg.param_dtype == "bfloat16" else 4)
    # The parameters, plus what init holds besides them at its peak (the random draws of the
    # largest stacked array, the writer's copy of the tensor in flight), plus the frameworks.
    require_memory(
        2 * nbytes + RUNTIME_BYTES, f"vitctl init {name} ({human_bytes(nbytes)} of {cfg.param_dtype} parameters)",
        hint="see `vitctl plan` for what a model needs (sharded over devices), or init a smaller preset (`vitctl models`)",
    )  # fmt: skip
    require_disk(out_dir.parent, nbytes, f"vitctl init {name}", hint="free disk space, or choose an --out on another disk")
    return nbytes


def _initial_weights(cfg: ViTConfig, seed: int, backend: str, notify: Callable[[str], None]) -> tuple[dict[str, Any], str]:
    """(flat weights, "jax" or "torch": the initialisation that made them)."""
    try:
        return _jax_init(cfg, seed), "jax"
    except ImportError as e:
        if backend == "jax":
            raise MissingDependencyError(f"--backend jax needs jax and flax ({e})", hint="pip install 'vitctl[jax]'") from None
        notify("jax is not installed: using torch's own initialisation (weights differ from the JAX init)")
        return _torch_init(cfg, seed), "torch"


def init_checkpoint(
    cfg: ViTConfig, name: str, out_dir: Path, *, backend: str = "jax", seed: int = 0, force: bool = False,
    notify: Callable[[str], None] = lambda message: None, status: Callable[[str], Any] = lambda what: contextlib.nullcontext(),
) -> dict[str, Any]:  # fmt: skip
    """Writes `cfg` with fresh weights to `out_dir` (params/ for backend "jax", model.safetensors
    for "torch"); `name` is what provenance records as the source. `notify` gets notes,
    `status(what)` is entered around each long step (a spinner). Returns {"path", "format",
    "name", "params_total", "seed", "init"}."""
    total = param_counts(cfg)["params_total"]
    nbytes = _check_resources(cfg, name, out_dir)
    # The frameworks are imported before the temporary exists: a SIGTERM turned into
    # KeyboardInterrupt half-way through importing a C extension (jaxlib, tensorstore) can
    # crash the interpreter on its way out, so until then SIGTERM keeps its default action,
    # while nothing is written yet.
    with contextlib.suppress(ImportError):
        import orbax.checkpoint  # noqa: F401

        import vitctl.model_jax.model  # noqa: F401  (jax, flax)
    with sigterm_as_interrupt(), ckpt.atomic_output(out_dir, force) as tmp:
        with status(f"Initialising {name} ({total:,} parameters, seed {seed})"):
            flat, how = _initial_weights(cfg, seed, backend, notify)
        try:
            with status(f"Writing {out_dir}"):
                if backend == "jax":
                    layout.save_jax(tmp, flat)
                elif how == "jax":
                    layout.save_torch(tmp, jax_to_torch({k: np.asarray(v) for k, v in flat.items()}, cfg))
                else:
                    layout.save_torch(tmp, flat)
            provenance = {"source_format": "init", "source": name, "created_by": "vitctl init", "seed": seed, "init": how}
            ckpt.write_config(tmp, cfg, provenance)
        except (VitctlError, OSError) as e:
            if (why := ckpt.no_space(e)) is None:
                raise
            raise ResourceError(
                f"no space to write {out_dir}: {why} (it needs {human_bytes(nbytes)})",
                hint="free disk space, raise the file-size limit (ulimit -f), or choose an --out on another disk; nothing was written",
            ) from None
    fmt = layout.JAX if backend == "jax" else layout.TORCH
    return {"path": str(out_dir), "format": fmt, "name": name, "params_total": total, "seed": seed, "init": how}
