"""`vitctl models`, `vitctl info`, `vitctl init`: presets, sizes, fresh checkpoints.

`models` and `info` need neither jax nor torch: sizes come from the mapping table's
shapes (vitctl.convert.mapping), so `info vit-22b` allocates no weights.

--json output (always one object):
- models: {"models": [{"name", "params_total", "config"}, ...]} in preset order.
- info: {"name", "config", "params_total", "params_block_matmul", "params_head",
  "params_encoder", "bytes_float32", "bytes_bfloat16"}; for a checkpoint directory
  also "path", "formats" (see checkpoint.detect_formats) and "provenance"; for a big_vision
  .npz "path", "formats": ["big_vision"] and "notes" (what the weights cannot confirm).
- init: {"path", "format", "name", "params_total", "seed", "init"}; "init" is "jax"
  (both backends: the JAX init, converted for torch) or "torch" (jax not installed).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from vitctl import checkpoint as ckpt
from vitctl.cli._options import Backend, BackendOpt, ForceOpt, JsonOpt, ModelArg, OutOpt, ParamDtype, SeedOpt, err, out, print_json, resolve
from vitctl.config import PRESETS, ViTConfig
from vitctl.convert.mapping import jax_to_torch, param_counts
from vitctl.errors import ConfigError, MissingDependencyError, ResourceError, VitctlError
from vitctl.untrusted import require_disk, require_memory, sigterm_as_interrupt

commands = typer.Typer()

MODELS_EXAMPLES = """Examples:

  vitctl models

  vitctl models --json
"""
INFO_EXAMPLES = """Examples:

  vitctl info vit-22b

  vitctl info B/16 --json

  vitctl info ./ckpt/tiny
"""
INIT_EXAMPLES = """Examples:

  vitctl init vit22b-Ti/16 --out ckpt/ti --num-classes 10

  vitctl init --config tiny.json --out ckpt/tiny-pt --backend torch --seed 1

  vitctl init B/16 --out ckpt/b16 --param-dtype bfloat16 --force
"""


def sizes(cfg: ViTConfig) -> dict[str, int]:
    """Exact parameter counts and bytes per dtype, from shapes alone."""
    c = param_counts(cfg)
    keys = ("params_total", "params_block_matmul", "params_head", "params_encoder")
    return {**{k: c[k] for k in keys}, "bytes_float32": 4 * c["params_total"], "bytes_bfloat16": 2 * c["params_total"]}


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


@commands.command("models", epilog=MODELS_EXAMPLES)
def models(json: JsonOpt = False) -> None:
    """List the model presets with their sizes."""
    rows = [(name, cfg, param_counts(cfg)["params_total"]) for name, cfg in PRESETS.items()]
    if json:  # one object: {"models": [{"name", "params_total", "config"}, ...]}
        print_json({"models": [{"name": n, "params_total": p, "config": c.to_dict()} for n, c, p in rows]})
        return
    table = Table("name", "block", "D", "L", "F", "N", "patch", "pool", "params_total", box=None)
    for name, c, p in rows:
        dims = (c.width, c.depth, c.mlp_dim, c.num_heads, c.patch_size)
        table.add_row(name, c.block, *map(str, dims), c.pool, f"{p:,} ({_human(p)})")
    out.print(table)


@commands.command("info", epilog=INFO_EXAMPLES)
def info(model: ModelArg, json: JsonOpt = False) -> None:
    """Show a model's config, exact parameter counts and bytes per dtype (no weights allocated)."""
    from vitctl.hub import is_hub_uri, resolve_checkpoint

    local = str(resolve_checkpoint(model, backend="config")) if is_hub_uri(model) else model  # hf://: config.json only
    name, (_, cfg, path) = model, resolve(local)
    result: dict[str, Any] = {"name": name, "config": cfg.to_dict(), **sizes(cfg)}
    if warning := _grid_warning(cfg, name):
        result["warnings"] = [warning]
    if path is not None and path.is_file():  # a big_vision .npz (resolve returns no other file)
        from vitctl.convert import big_vision

        result.update(path=str(path), formats=["big_vision"], notes=list(big_vision.plan(path).notes))
    elif path is not None:
        result.update(path=str(path), formats=ckpt.detect_formats(path), provenance=ckpt.read_provenance(path))
    if json:
        print_json(result)
        return
    table = Table("field", "value", title=escape(name), title_justify="left", box=None)
    for k, v in result["config"].items():
        table.add_row(k, escape(str(v)))
    out.print(table)
    counts = Table("size", "value", box=None)
    for k, v in result.items():
        if k.startswith("params_"):
            counts.add_row(k, f"{v:,} ({_human(v)})")
        elif k.startswith("bytes_"):
            counts.add_row(k, f"{v:,} ({_human(v, 'B')})")
    out.print(counts)
    if path is not None:
        out.print(f"checkpoint: {path}\nformats: {', '.join(result['formats']) or 'none (config only)'}", markup=False)
        for k, v in result.get("provenance", {}).items():
            out.print(f"provenance.{k}: {v}", markup=False)
        for note in result.get("notes", []):
            err.print(f"note: {note}", markup=False)
    for warning in result.get("warnings", []):
        err.print(f"Warning: {warning}", markup=False)


def _grid_warning(cfg: ViTConfig, name: str) -> str | None:
    """The patch-grid refusal of `vitctl train`, as a warning: a config with one token is
    valid (a checkpoint may hold one), but nothing in it can attend."""
    try:
        cfg.check_patch_grid(name)
    except ConfigError as e:
        return f"{e.message}; {e.hint}"
    return None


def _jax_init(cfg: ViTConfig, seed: int) -> dict[str, Any]:
    from vitctl.model_jax.model import flat_params, init_model

    return flat_params(init_model(cfg, seed))


def _torch_init(cfg: ViTConfig, seed: int) -> dict[str, Any]:
    """Torch-native init, used only when jax is missing (different numbers from the JAX init)."""
    import ml_dtypes

    try:
        import torch

        from vitctl.model_torch.model import ViT
    except ImportError as e:
        raise MissingDependencyError(f"vitctl init needs jax or torch ({e})", hint="pip install 'vitctl[jax]' or 'vitctl[torch]'") from None

    torch.manual_seed(seed)
    state = ViT(cfg).state_dict()
    as_np = {torch.bfloat16: lambda t: t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)}
    return {k: np.asarray(as_np.get(t.dtype, torch.Tensor.numpy)(t.detach().cpu())) for k, t in state.items()}


RUNTIME_BYTES = 2**30  # what jax, XLA and the interpreter take beside the parameters


@commands.command("init", epilog=INIT_EXAMPLES)
def init(
    model: Annotated[str | None, typer.Argument(metavar="MODEL", help="A preset name, or a config.json.", show_default=False)] = None,
    out_dir: OutOpt = ...,
    backend: BackendOpt = Backend.jax,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    config: Annotated[Path | None, typer.Option("--config", help="A ViTConfig JSON file, instead of MODEL.", show_default=False)] = None,
    num_classes: Annotated[int | None, typer.Option("--num-classes", help="Override num_classes.", show_default=False)] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Override image_size.", show_default=False)] = None,
    param_dtype: Annotated[ParamDtype | None, typer.Option("--param-dtype", help="Override param_dtype.", show_default=False)] = None,
    json: JsonOpt = False,
) -> None:
    """Write a freshly initialised checkpoint (config.json + weights) to a new directory.

    Both backends start from the JAX initialisation (converted through the mapping table for torch), so one seed gives the same weights.
    """
    if (model is None) == (config is None):
        raise ConfigError("give exactly one of MODEL or --config FILE", hint="e.g. `vitctl init vit22b-Ti/16 --out DIR`")
    name, cfg, _ = resolve(model) if model is not None else resolve(str(config))
    overrides = {"num_classes": num_classes, "image_size": image_size, "param_dtype": param_dtype and param_dtype.value}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})  # validates
    if warning := _grid_warning(cfg, name):
        err.print(f"Warning: {warning}", markup=False)
    total = sizes(cfg)["params_total"]
    nbytes = total * (2 if cfg.param_dtype == "bfloat16" else 4)
    # The parameters, plus what init holds besides them at its peak (the random draws of the
    # largest stacked array, the writer's copy of the tensor in flight), plus the frameworks.
    require_memory(
        2 * nbytes + RUNTIME_BYTES, f"vitctl init {name} ({_human(nbytes, 'B')} of {cfg.param_dtype} parameters)",
        hint="see `vitctl plan` for what a model needs (sharded over devices), or init a smaller preset (`vitctl models`)",
    )  # fmt: skip
    require_disk(out_dir.parent, nbytes, f"vitctl init {name}", hint="free disk space, or choose an --out on another disk")
    how = "jax"
    # The frameworks are imported before the temporary exists: a SIGTERM turned into
    # KeyboardInterrupt half-way through importing a C extension (jaxlib, tensorstore) can
    # crash the interpreter on its way out, so until then SIGTERM keeps its default action,
    # while nothing is written yet.
    with contextlib.suppress(ImportError):
        import orbax.checkpoint  # noqa: F401

        import vitctl.model_jax.model  # noqa: F401  (jax, flax)
    with sigterm_as_interrupt(), ckpt.atomic_output(out_dir, force) as tmp:
        with err.status(escape(f"Initialising {name} ({total:,} parameters, seed {seed})")):
            try:
                flat = _jax_init(cfg, seed)
            except ImportError as e:
                if backend == Backend.jax:
                    raise MissingDependencyError(f"--backend jax needs jax and flax ({e})", hint="pip install 'vitctl[jax]'") from None
                err.print("jax is not installed: using torch's own initialisation (weights differ from the JAX init)")
                flat, how = _torch_init(cfg, seed), "torch"
        try:
            with err.status(escape(f"Writing {out_dir}")):
                if backend == Backend.jax:
                    ckpt.save_jax(tmp, flat)
                elif how == "jax":
                    ckpt.save_torch(tmp, jax_to_torch({k: np.asarray(v) for k, v in flat.items()}, cfg))
                else:
                    ckpt.save_torch(tmp, flat)
            provenance = {"source_format": "init", "source": name, "created_by": "vitctl init", "seed": seed, "init": how}
            ckpt.write_config(tmp, cfg, provenance)
        except (VitctlError, OSError) as e:
            if (why := ckpt.no_space(e)) is None:
                raise
            raise ResourceError(
                f"no space to write {out_dir}: {why} (it needs {_human(nbytes, 'B')})",
                hint="free disk space, raise the file-size limit (ulimit -f), or choose an --out on another disk; nothing was written",
            ) from None
    fmt = ckpt.JAX if backend == Backend.jax else ckpt.TORCH
    if json:
        print_json({"path": str(out_dir), "format": fmt, "name": name, "params_total": total, "seed": seed, "init": how})
    else:
        print(out_dir)
        err.print(f"next: vitctl info {out_dir}", markup=False)
