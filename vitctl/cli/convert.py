"""`vitctl convert jax-to-torch|torch-to-jax SRC DST`: streaming checkpoint conversion.

Thin: parses, calls vitctl.convert.convert (plan, then run), prints. Memory is bounded
by a few times the largest tensor plus a fixed overhead, never by the checkpoint.

stdout: DST (or, with --dry-run, the plan); with --json one object:
  {"src", "dst", "direction", "source_format", "format", "dtype", "output_dtypes",
   "tensors", "bytes", "source_bytes", "shards", "files", "estimated_peak_bytes", "notes",
   "dry_run", and after a real run "seconds", "peak_rss_bytes"}; --format timm adds "timm":
  {"model_name", "kwargs", "create_model" (the local-dir: call), "create_model_explicit"}.
  torch-to-jax reads vitctl's, timm's and Hugging Face transformers' ViT safetensors; --format hf
  writes what transformers.AutoModelForImageClassification.from_pretrained(DST) loads.
stderr: a progress bar in bytes (on a terminal), notes and hints; after --format timm, the
timm.create_model calls that load DST.
Exit codes: 0 done; 1 bad or unreadable input (nothing written); 2 usage (DST exists
without --force, unknown option value, bad --max-shard-size); 130 interrupted by Ctrl-C
or SIGTERM (nothing written).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from vitctl.cli._options import ForceOpt, JsonOpt, err, out, print_json
from vitctl.units import human_bytes

commands = typer.Typer(
    no_args_is_help=True, help="Convert checkpoints between JAX (Orbax) and PyTorch (safetensors), one tensor at a time."
)


class TargetFormat(str, enum.Enum):
    vitctl = "vitctl"
    timm = "timm"
    hf = "hf"


class Dtype(str, enum.Enum):
    keep = "keep"
    float32 = "float32"
    bfloat16 = "bfloat16"


class SourceFormat(str, enum.Enum):
    jax = "vitctl-jax"
    torch = "vitctl-torch"
    big_vision = "big_vision"
    timm = "timm"
    hf = "hf"


SrcArg = Annotated[
    str, typer.Argument(help="Checkpoint directory (config.json + weights), a big_vision .npz, or hf://org/name[@rev].", show_default=False)
]
DstArg = Annotated[Path, typer.Argument(help="Checkpoint directory to create.", show_default=False)]
DtypeOpt = Annotated[
    Dtype, typer.Option("--dtype", help="keep: each tensor's source dtype; float32/bfloat16: cast (round to nearest even).")
]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help='Largest safetensors shard: "5GB" (10^9 bytes), "500MB", "2GiB".')]
FromOpt = Annotated[
    SourceFormat | None, typer.Option("--from", help="Source format, if detecting it from SRC's content is not wanted.", show_default=False)
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "--config",
        help="Model config of SRC: a preset, a config.json or a checkpoint dir (default: SRC's config.json; inferred for .npz).",
        show_default=False,
    ),
]
PrefixOpt = Annotated[
    str | None, typer.Option("--prefix", help="big_vision .npz: the sub-tree holding the ViT (e.g. params/img).", show_default=False)
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the plan (tensors, shards, bytes, estimated peak memory); write nothing.")
]

JAX_TO_TORCH_EXAMPLES = """Examples:

  vitctl convert jax-to-torch ckpt/ti ckpt/ti-pt

  vitctl convert jax-to-torch ckpt/22b ckpt/22b-pt --dtype bfloat16 --max-shard-size 5GB --json

  vitctl convert jax-to-torch ViT-B_16.npz ckpt/b16-timm --format timm --dry-run

  vitctl convert jax-to-torch ckpt/b16-jax ckpt/b16-hf --format hf
"""
TORCH_TO_JAX_EXAMPLES = """Examples:

  vitctl convert torch-to-jax ckpt/ti-pt ckpt/ti-jax

  vitctl convert torch-to-jax ckpt/22b-pt ckpt/22b-jax --dtype float32 --force

  vitctl convert torch-to-jax hf://google/vit-base-patch16-224 ckpt/b16-jax
"""


def _print_plan(summary: dict[str, Any]) -> None:
    table = Table("plan", "value", box=None, title=escape(f"{summary['src']} -> {summary['dst']}"), title_justify="left")
    rows = (
        ("from", f"{summary['source_format']} ({human_bytes(summary['source_bytes'])})"),
        ("to", f"{summary['format']} ({', '.join(summary['output_dtypes'])}, --dtype {summary['dtype']})"),
        ("tensors", f"{summary['tensors']:,}"),
        ("bytes", f"{summary['bytes']:,} ({human_bytes(summary['bytes'])})"),
        ("shards", str(summary["shards"])),
        ("files", ", ".join(summary["files"])),
        ("estimated peak memory", human_bytes(summary["estimated_peak_bytes"])),
        *((("load with timm", summary["timm"]["create_model"]),) if "timm" in summary else ()),
    )
    for k, v in rows:
        table.add_row(k, escape(v))
    out.print(table)


def _progress(total: int) -> Progress:
    columns = (TextColumn("converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=err, transient=True, disable=not err.is_terminal)
    bar.add_task("convert", total=total)
    return bar


def _convert(direction: str, src: str | Path, dst: Path, *, fmt: str, dtype: Dtype, max_shard_size: str | None, source_format: SourceFormat | None,
             model: str | None, prefix: str | None, force: bool, dry_run: bool, json: bool) -> None:  # fmt: skip
    from vitctl.cli._options import resolve
    from vitctl.convert import convert as cv
    from vitctl.open import locate

    src = locate(src, fetch=cv.DIRECTIONS[direction].fetch, must_exist=True)
    cfg = resolve(model)[1] if model is not None else None
    source = source_format.value if source_format else None
    with cv.tuned_process():  # process-wide, for this command: malloc tuned for large buffers, no cyclic gc
        plan = cv.plan(src, dst, direction, fmt, dtype.value, max_shard_size, source, cfg, prefix, force)
        try:
            for note in plan.source.notes:
                err.print(f"note: {note}", markup=False)
            if dry_run:
                summary = {**plan.summary(), "dry_run": True}
                if json:
                    print_json(summary)
                else:
                    _print_plan(summary)
                return
            with _progress(plan.bytes) as bar:
                result = cv.run(plan, force, progress=lambda n: bar.advance(bar.task_ids[0], n))
        finally:
            plan.source.close()
    result["dry_run"] = False
    if json:
        print_json(result)
        return
    print(dst)
    err.print(
        f"{result['tensors']} tensors, {human_bytes(result['bytes'])} in {result['seconds']:.1f} s; peak memory {human_bytes(result['peak_rss_bytes'])}",
        markup=False,
    )
    if "timm" in result:
        err.print(f"load it with timm: {result['timm']['create_model']}", markup=False, soft_wrap=True)
        err.print(f"or, without config.json: {result['timm']['create_model_explicit']}", markup=False, soft_wrap=True)


@commands.command("jax-to-torch", epilog=JAX_TO_TORCH_EXAMPLES)
def jax_to_torch(
    src: SrcArg,
    dst: DstArg,
    fmt: Annotated[
        TargetFormat,
        typer.Option(
            "--format",
            help="vitctl: model.safetensors (or shards) + config.json; timm: loads into timm's ViT (the create_model call is printed); "
            "hf: Hugging Face transformers' ViTForImageClassification (sequential, LayerNorm, class token configs).",
        ),
    ] = TargetFormat.vitctl,
    dtype: DtypeOpt = Dtype.keep,
    max_shard_size: ShardOpt = "5GB",
    source_format: FromOpt = None,
    model: ModelOpt = None,
    prefix: PrefixOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Convert a JAX checkpoint (Orbax params/, or a big_vision .npz) to PyTorch safetensors."""
    _convert("jax-to-torch", src, dst, fmt=fmt.value, dtype=dtype, max_shard_size=max_shard_size, source_format=source_format,
             model=model, prefix=prefix, force=force, dry_run=dry_run, json=json)  # fmt: skip


@commands.command("torch-to-jax", epilog=TORCH_TO_JAX_EXAMPLES)
def torch_to_jax(
    src: SrcArg,
    dst: DstArg,
    fmt: Annotated[TargetFormat, typer.Option("--format", help="vitctl: params/ (Orbax) + config.json.")] = TargetFormat.vitctl,
    dtype: DtypeOpt = Dtype.keep,
    source_format: FromOpt = None,
    model: ModelOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Convert a PyTorch checkpoint (vitctl's, timm's or Hugging Face transformers' ViT safetensors) to a JAX checkpoint (Orbax params/)."""
    _convert("torch-to-jax", src, dst, fmt=fmt.value, dtype=dtype, max_shard_size=None, source_format=source_format,
             model=model, prefix=None, force=force, dry_run=dry_run, json=json)  # fmt: skip
