"""`vitctl predict CKPT IMAGE|DIR...`: the top-k classes of image files. Thin: parse, call
vitctl.infer.predict.predict, print.

stdout: a table (file, then the k most probable classes with their probabilities); with --csv FILE
a one-line summary instead (the predictions go to FILE: file,rank,index,label,prob, one row per
file and rank); with --json one object: {"predictions": [{"file", "topk": [{"index", "label",
"prob"}, ...]}, ...], "skipped": [{"file", "error"}], "settings", "images", "images_per_s",
"inputs", "checkpoint", "timings", "notes"}. stderr: what was found, the progress bar, each
skipped image and the notes. Exit codes: 0 done (skipped images included); 1 no images, an
unreadable image with --strict, or an unusable checkpoint; 2 usage.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vitctl.cli._options import BatchSizeOpt, JsonOpt, RunBackendOpt, err, out
from vitctl.cli._reports import batch_progress, print_result

commands = typer.Typer()

EXAMPLES = """Examples:

  vitctl predict ckpt/torch photos/cat/0.png photos/dog/1.png

  vitctl predict runs/digits photos/ --top-k 3 --backend jax --json

  vitctl predict big_vision.npz photos/ --csv predictions.csv --strict
"""


@commands.command(epilog=EXAMPLES)
def predict(
    ckpt: Annotated[
        str,
        typer.Argument(
            help="Checkpoint: a vitctl directory (JAX or torch), a timm or Hugging Face directory, a big_vision .npz, or hf://org/name[@rev].",
            show_default=False,
        ),
    ],
    images: Annotated[
        list[str],
        typer.Argument(help="Image files and directories (searched recursively for image files).", show_default=False),
    ],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to show per image, most probable first.")] = 5,
    backend: RunBackendOpt = None,
    batch_size: BatchSizeOpt = 64,
    csv: Annotated[
        Path | None,
        typer.Option(
            "--csv", help="Write the predictions to this new file (file,rank,index,label,prob) instead of a table.", show_default=False
        ),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first image that does not decode (default: skip it).")] = False,
    json_: JsonOpt = False,
) -> None:
    """Top-k classes of image files by a checkpoint, on either backend."""
    from vitctl.infer.predict import list_images
    from vitctl.open import locate

    files, found = list_images(images)  # a missing path or an empty directory fails before the checkpoint loads
    if not json_:
        what = ", ".join(
            f"{escape(f['path'])} ({f['images']} image{'s' if f['images'] != 1 else ''})" for f in found if f["kind"] == "directory"
        )
        err.print(f"found {len(files)} image file{'s' if len(files) != 1 else ''}" + (f": {what}" if what else ""))
    ckpt = locate(ckpt, fetch=backend.value if backend else "all", must_exist=True)
    result = _with_progress(ckpt, images, quiet=json_, top_k=top_k, backend=backend.value if backend else None,
                            batch_size=batch_size, strict=strict, csv=csv)  # fmt: skip
    print_result(result, json_, show if csv is None else functools.partial(_written, csv))


def _with_progress(ckpt: Path, images: list[str], *, quiet: bool, **options: Any) -> dict[str, Any]:
    """vitctl.infer.predict.predict with a Rich progress bar on stderr; each skipped image named there as it happens."""
    from vitctl.infer.predict import predict as run_predict

    def on_skip(file: str, why: str) -> None:
        err.print(f"[yellow]skipped:[/] {escape(why)}" if file in why else f"[yellow]skipped[/] {escape(file)}: {escape(why)}")

    with batch_progress("predict", quiet=quiet) as on_batch:
        return run_predict(ckpt, images, on_batch=on_batch, on_skip=on_skip, **options)


def _written(csv: Path, r: dict[str, Any]) -> None:
    out.print(f"{r['images']} predictions (top {r['settings']['top_k']}) written to {escape(str(csv))}" + _summary(r))


def _summary(r: dict[str, Any]) -> str:
    s = r["settings"]
    skipped = f", {len(r['skipped'])} skipped (unreadable)" if r["skipped"] else ""
    t = r["timings"]
    return f"; backend {s['backend']}, {r['images_per_s']} images/s ({t['model']:.1f} of {t['predict']:.1f} s in the model){skipped}"


def show(r: dict[str, Any]) -> None:
    c, s = r["checkpoint"], r["settings"]
    out.print(f"checkpoint: {escape(c['path'])} ({c['format']}), backend {s['backend']}, {s['precision']}, {s['image_size']} px, "
              f"{s['num_classes']} classes ({'named' if s['labels'] == 'class_names' else 'by index'}), {s['probabilities']}")  # fmt: skip
    t = Table("file", *(f"{i}" for i in range(1, s["top_k"] + 1)), title=f"Top-{s['top_k']} predictions")
    for p in r["predictions"]:
        t.add_row(escape(p["file"]), *(f"{escape(c['label'])} {c['prob']:.1%}" for c in p["topk"]))
    out.print(t)
    out.print(f"{r['images']} images" + _summary(r))
