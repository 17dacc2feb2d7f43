"""`vitctl models`, `vitctl info`, `vitctl init`: presets, sizes, fresh checkpoints.

`models` and `info` need neither jax nor torch: sizes come from the mapping table's
shapes (vitctl.convert.mapping), so `info vit-22b` allocates no weights.

--json output (always one object):
- models: {"models": [{"name", "params_total", "config"}, ...]} in preset order.
- info: {"name", "config", "params_total", "params_block_matmul", "params_head",
  "params_encoder", "bytes_float32", "bytes_bfloat16"}; for a checkpoint directory
  also "path", "formats" (see vitctl.open.formats_in) and "provenance"; for a big_vision
  .npz "path", "formats": ["big_vision"] and "notes" (what the weights cannot confirm).
- init: {"path", "format", "name", "params_total", "seed", "init"}; "init" is "jax"
  (both backends: the JAX init, converted for torch) or "torch" (jax not installed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vitctl.cli._options import Backend, BackendOpt, ForceOpt, JsonOpt, ModelArg, OutOpt, ParamDtype, SeedOpt, err, out, print_json, resolve
from vitctl.config import PRESETS, ViTConfig
from vitctl.errors import ConfigError
from vitctl.formats import layout
from vitctl.params import param_counts
from vitctl.units import human_bytes, human_count

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
        table.add_row(name, c.block, *map(str, dims), c.pool, f"{p:,} ({human_count(p)})")
    out.print(table)


@commands.command("info", epilog=INFO_EXAMPLES)
def info(model: ModelArg, json: JsonOpt = False) -> None:
    """Show a model's config, exact parameter counts and bytes per dtype (no weights allocated)."""
    from vitctl.hub import is_hub_uri

    local = model
    if is_hub_uri(model):  # hf://: config.json only
        from vitctl.open import locate

        local = str(locate(model, fetch="config"))
    name, (_, cfg, path) = model, resolve(local)
    result: dict[str, Any] = {"name": name, "config": cfg.to_dict(), **sizes(cfg)}
    if warning := _grid_warning(cfg, name):
        result["warnings"] = [warning]
    if path is not None:  # a checkpoint (the readers load only for one)
        from vitctl.open import formats_in, read_config

        if path.is_file():  # a big_vision .npz (resolve returns no other file)
            result.update(path=str(path), formats=["big_vision"], notes=read_config(path)[1])
        else:
            result.update(path=str(path), formats=formats_in(path), provenance=layout.read_provenance(path))
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
            counts.add_row(k, f"{v:,} ({human_count(v)})")
        elif k.startswith("bytes_"):
            counts.add_row(k, f"{v:,} ({human_bytes(v)})")
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
    from vitctl.init import init_checkpoint

    if (model is None) == (config is None):
        raise ConfigError("give exactly one of MODEL or --config FILE", hint="e.g. `vitctl init vit22b-Ti/16 --out DIR`")
    name, cfg, _ = resolve(model) if model is not None else resolve(str(config))
    overrides = {"num_classes": num_classes, "image_size": image_size, "param_dtype": param_dtype and param_dtype.value}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})  # validates
    if warning := _grid_warning(cfg, name):
        err.print(f"Warning: {warning}", markup=False)
    result = init_checkpoint(
        cfg, name, out_dir, backend=backend.value, seed=seed, force=force,
        notify=lambda message: err.print(message, markup=False), status=lambda what: err.status(escape(what)),
    )  # fmt: skip
    if json:
        print_json(result)
    else:
        print(out_dir)
        err.print(f"next: vitctl info {out_dir}", markup=False)
