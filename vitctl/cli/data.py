"""`vitctl data pack SRC DST` and `vitctl data info DIR`: the packed data format.

Thin: parses, calls vitctl.data.pack / vitctl.data.records, prints.

pack stdout: DST; with --json one object: {"src", "dst", "examples", "bytes", "image_format",
  "workers", "num_classes", "splits": {split: {"num_examples", "shards", "bytes"}}, "skipped",
  "skipped_files" (the first few), "seconds", "images_per_s"}.
info stdout: the splits, counts, classes and bytes (a table); with --json vitctl.data.records.describe's object.
stderr: a progress bar in images (on a terminal), the summary line, skipped images, hints.
Exit codes: 0 done; 1 bad or unreadable input (a corrupt image without --skip-bad, a damaged
packed directory: nothing written); 2 usage (DST exists without --force, bad option value);
130 interrupted by Ctrl-C or SIGTERM (nothing written).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from vitctl.cli._options import JsonOpt, err, out, print_json
from vitctl.units import human_bytes

commands = typer.Typer(no_args_is_help=True, help="Pack a data source into ArrayRecord shards for streaming training, and inspect one.")


class ImageFormat(str, enum.Enum):
    keep = "keep"
    png = "png"
    jpeg = "jpeg"


PACK_EXAMPLES = """Examples:

  vitctl data pack digits data/digits-packed

  vitctl data pack photos data/photos-packed --workers 2

  vitctl data pack photos data/photos-jpeg --image-format jpeg --jpeg-quality 90 --skip-bad --json
"""
INFO_EXAMPLES = """Examples:

  vitctl data info data/digits-packed

  vitctl data info data/digits-packed --verify --json
"""


def _progress() -> Progress:
    columns = (TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TextColumn("images"), TimeRemainingColumn())
    return Progress(*columns, console=err, transient=True, disable=not err.is_terminal)


@commands.command("pack", epilog=PACK_EXAMPLES)
def pack(
    src: Annotated[
        str,
        typer.Argument(
            help="Data source: digits, fashion-mnist, an ImageFolder directory, a .npz, IDX files, a Hugging Face save_to_disk "
            "directory or parquet files.",
            show_default=False,
        ),
    ],
    dst: Annotated[Path, typer.Argument(help="Packed directory to create (manifest.json + shards).", show_default=False)],
    workers: Annotated[
        int | None, typer.Option("--workers", help="Processes that decode and encode images (default: the CPU count).", show_default=False)
    ] = None,
    image_format: Annotated[
        ImageFormat,
        typer.Option("--image-format", help="keep: PNG and JPEG files as they are, others and in-memory pixels as PNG; png; jpeg."),
    ] = ImageFormat.keep,
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", help="JPEG quality with --image-format jpeg (1-100).")] = 95,
    shard_size: Annotated[str, typer.Option("--shard-size", help='About how large each shard grows: "256MB", "1GiB".')] = "256MB",
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Leave out images that do not decode (counted and named at the end) instead of failing.")
    ] = False,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of each class held out as test, for a source without a test split.")
    ] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of that split (the same split as vitctl train makes).")] = 0,
    channels: Annotated[int, typer.Option("--channels", help="1 (grayscale) or 3 (RGB): what images are decoded to.")] = 3,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing packed directory (only once the new one is complete).")
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Pack a data source into ArrayRecord shards (each image decoded once to check it), for streaming training."""
    from vitctl.data.pack import pack as run_pack

    with _progress() as bar:
        task = bar.add_task("pack", total=None)
        result = run_pack(src, dst, workers=workers, image_format=image_format.value, jpeg_quality=jpeg_quality, shard_bytes=shard_size,
                          skip_bad=skip_bad, test_fraction=test_fraction, seed=seed, channels=channels, force=force,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
    if json:
        print_json(result)
        return
    print(dst)
    splits = ", ".join(f"{s} {v['num_examples']:,}" for s, v in result["splits"].items())
    err.print(f"{result['examples']:,} examples ({splits}), {human_bytes(result['bytes'])} in {result['seconds']:.1f} s "
              f"({result['images_per_s']:,.0f} images/s, {result['workers']} worker{'s' if result['workers'] > 1 else ''})", markup=False)  # fmt: skip
    if result["skipped"]:
        more = ", ..." if result["skipped"] > len(result["skipped_files"]) else ""
        err.print(f"skipped {result['skipped']} unreadable images: {', '.join(result['skipped_files'])}{more}", markup=False)


@commands.command("info", epilog=INFO_EXAMPLES)
def info(
    path: Annotated[Path, typer.Argument(help="A packed directory (made by vitctl data pack).", show_default=False)],
    verify: Annotated[bool, typer.Option("--verify", help="Check every shard's sha256 and parse every record.")] = False,
    json: JsonOpt = False,
) -> None:
    """Show a packed directory's splits, counts, classes and bytes; --verify checks every byte."""
    from vitctl.data.records import describe

    d = describe(path, verify=verify)
    if json:
        print_json(d)
        return
    names = d["class_names"] or [str(i) for i in range(d["num_classes"])]
    how = d["split"] or {}
    if "test" not in d["splits"]:
        split = "no test split"
    elif how.get("from") == "source":
        split = "test split as in the source"
    else:
        split = f"test split held out {how.get('test_fraction')} per class, seed {how.get('seed')}"
    out.print(f"{escape(str(path))}: {escape(str(d['source']))}, {d['image_format']} images decoded to {d['channels']} channels, "
              f"{d['num_classes']} classes; {split}")  # fmt: skip
    table = Table("split", "examples", "shards", "bytes", *(escape(n) for n in names[:12]), box=None)
    for s, v in d["splits"].items():
        table.add_row(s, f"{v['num_examples']:,}", str(v["shards"]), human_bytes(v["bytes"]), *(f"{c:,}" for c in v["class_counts"][:12]))
    out.print(table)
    if d["num_classes"] > 12:
        out.print(f"(first 12 of {d['num_classes']} classes shown; --json lists every count)")
    if verify:
        out.print("[bold green]verified[/]: every shard's sha256 matches the manifest and every record parses")
