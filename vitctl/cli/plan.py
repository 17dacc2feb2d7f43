"""`vitctl plan`: per-device memory for training a model on a (data, fsdp, tensor) mesh.

From abstract shapes only (no weights, no devices): see vitctl/train/plan.py for the
formulas and assumptions. --json prints one object: {"model", "mesh", "devices",
"batch_size", "per_device_batch", "optimizer", "dtype", "param_dtype",
"flash_attention", "remat", "per_device": {"params", "grads", "optimizer",
"activations", "activations_remat", "workspace", "total", "total_remat"},
"activations_per_layer", "hbm", "headroom", "headroom_remat", "fits", "fits_remat",
"indivisible": [{"param", "dim", "size", "mesh_axes", "devices"}, ...]}; bytes throughout.
"""

from __future__ import annotations

import enum
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vitctl.cli._options import JsonOpt, ModelArg, ParamDtype, err, out, print_json, resolve
from vitctl.units import human_bytes

commands = typer.Typer()

PLAN_EXAMPLES = """Examples:

  vitctl plan vit-22b --mesh data=1,fsdp=256,tensor=4 --batch-size 1024 --hbm 95GB

  vitctl plan vit-22b --mesh fsdp=256,tensor=4 --batch-size 1024 --remat --dtype bfloat16 --optimizer adafactor

  vitctl plan B/16 --mesh data=8 --batch-size 4096 --hbm 16GiB --json
"""


class Optimizer(str, enum.Enum):
    adamw = "adamw"
    adafactor = "adafactor"


@commands.command("plan", epilog=PLAN_EXAMPLES)
def plan(
    model: ModelArg,
    mesh: Annotated[
        str, typer.Option("--mesh", help="Mesh axis sizes, e.g. data=1,fsdp=256,tensor=4 (missing axes are 1).", show_default=False)
    ],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch, split over data*fsdp.", show_default=False)],
    hbm: Annotated[str, typer.Option("--hbm", help='Memory per device: "32GiB" (2^30 bytes), "95GB" (10^9 bytes).')] = "32GiB",
    remat: Annotated[
        bool | None,
        typer.Option("--remat/--no-remat", help="The mode the verdict is for (default: the config's remat).", show_default=False),
    ] = None,
    optimizer: Annotated[
        Optimizer, typer.Option("--optimizer", help="adamw: 2 float32 moments; adafactor: factored second moment.")
    ] = Optimizer.adamw,
    dtype: Annotated[
        ParamDtype | None, typer.Option("--dtype", help="Compute (activation) dtype; default the config's.", show_default=False)
    ] = None,
    param_dtype: Annotated[
        ParamDtype | None, typer.Option("--param-dtype", help="Parameter and gradient dtype; default the config's.", show_default=False)
    ] = None,
    flash: Annotated[
        bool, typer.Option("--flash-attention", help="Assume flash-style attention (no (B,N,T,T) probabilities saved).")
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Per-device bytes for params, grads, optimizer state and activations (with and without remat), and whether they fit."""
    from vitctl.formats.base import parse_size
    from vitctl.model_jax.sharding import parse_mesh
    from vitctl.train import plan as planner

    name, cfg, _ = resolve(model)
    sizes, hbm_bytes = parse_mesh(mesh), parse_size(hbm)  # fail fast, before the abstract model is built
    planner.validate(cfg, sizes, batch_size)
    r = planner.plan(
        cfg, sizes, batch_size, hbm=hbm_bytes, optimizer=optimizer.value, dtype=dtype and dtype.value,
        param_dtype=param_dtype and param_dtype.value, remat=remat, flash=flash, name=name,
    )  # fmt: skip
    if json:
        print_json(r)
    else:
        _print_plan(r, name, batch_size)


def _print_plan(r: dict, name: str, batch_size: int) -> None:
    """The plan as a table of bytes per device, a verdict per remat mode, and a warning for padded shards."""
    p, mesh_text = r["per_device"], ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    title = f"{name} on {mesh_text} ({r['devices']} devices), batch {batch_size} ({r['per_device_batch']} per device)"
    table = Table("component", "bytes per device", "", "assuming", title=escape(title), title_justify="left", box=None)
    rows = (
        ("params", "params", f"{r['param_dtype']}"),
        ("grads", "grads", f"{r['param_dtype']}"),
        ("optimizer", "optimizer", f"{r['optimizer']}, float32"),
        ("activations", "activations", f"{r['dtype']}, no remat"),
        ("activations_remat", "activations_remat", f"{r['dtype']}, full remat"),
        ("workspace", "workspace", "1 layer gathered + grads"),
        ("total", "total", "no remat"),
        ("total_remat", "total_remat", "full remat"),
    )
    for label, key, note in rows:
        table.add_row(label, f"{p[key]:,}", human_bytes(p[key]), note)
    out.print(table)
    for mode, key in (("no remat", ""), ("remat", "_remat")):
        ok, room = r["fits" + key], r["headroom" + key]
        chosen = " <- selected" if (key == "_remat") == r["remat"] else ""
        verdict = f"fits, {human_bytes(room)} headroom" if ok else f"does not fit, {human_bytes(-room)} over"
        out.print(f"{mode}: {human_bytes(p['total' + key])} of {human_bytes(r['hbm'])} per device: {verdict}{chosen}", markup=False)
    if r["indivisible"]:
        bad = r["indivisible"][0]
        err.print(
            f"warning: {len(r['indivisible'])} parameter dimension(s) do not divide over their mesh axes, e.g. {bad['param']} dim {bad['dim']} "
            f"({bad['size']}) over {'*'.join(bad['mesh_axes'])} = {bad['devices']}; shards are padded (--json lists them all)",
            markup=False,
        )
