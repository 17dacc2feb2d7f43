"""`vitctl embed CKPT --data D --out FILE`: a checkpoint's features of every image of a split, to one
file. Thin: parse, call vitctl.infer.embed.embed, print.

The file's format follows its suffix: .safetensors, .npy or .parquet (vitctl.infer.embed's
docstring gives each layout). stdout: what was written (file, N x D, size, images/s); with --json
one object: {"file", "format", "num_images", "feature_dim", "bytes", "seconds", "images_per_s",
"layer", "pool", "backend", "split", ...}. stderr: the progress bar. Exit codes: 0 written; 1
unusable data, checkpoint or output (nothing is left behind); 2 usage (an existing --out included).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from vitctl.cli._options import (
    BatchSizeOpt,
    CkptArg,
    DataOpt,
    JsonOpt,
    LayerOpt,
    PoolOpt,
    RunBackendOpt,
    WorkersOpt,
    out,
    print_json,
)
from vitctl.cli._reports import batch_progress

commands = typer.Typer()

EXAMPLES = """Examples:

  vitctl embed runs/digits --data digits --out digits.safetensors

  vitctl embed ckpt/torch --data photos/ --split all --layer block:-2 --pool gap --out photos.parquet --json

  vitctl embed big_vision.npz --data photos/ --backend torch --out photos.npy
"""


class Split(str, enum.Enum):
    train = "train"
    test = "test"
    all = "all"


@commands.command(epilog=EXAMPLES)
def embed(
    ckpt: CkptArg,
    data: DataOpt,
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="File to create: .safetensors, .npy or .parquet (never overwritten).", show_default=False)
    ],
    split: Annotated[Split, typer.Option("--split", help="Which examples: train, test, or all (train then test).")] = Split.test,
    layer: LayerOpt = "pre_logits",
    pool: PoolOpt = None,
    backend: RunBackendOpt = None,
    batch_size: BatchSizeOpt = 256,
    workers: WorkersOpt = 0,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Held-out share of a source without a test split.")] = 0.2,
    split_seed: Annotated[int, typer.Option("--split-seed", help="Seed of that train/test split (as vitctl train's).")] = 0,
    json_: JsonOpt = False,
) -> None:
    """Write a checkpoint's features (embeddings), ids and labels of a data split to one file."""
    result = embed_with_progress(
        ckpt, data, out_file, quiet=json_, split=split.value, layer=layer, pool=pool.value if pool else None,
        backend=backend.value if backend else None, batch_size=batch_size, workers=workers, test_fraction=test_fraction,
        split_seed=split_seed,
    )  # fmt: skip
    if json_:
        print_json(result)
    else:
        show(result)


def embed_with_progress(ckpt: str | Path, data: str, out_file: Path, *, quiet: bool, **options: Any) -> dict[str, Any]:
    """vitctl.infer.embed.embed with a Rich progress bar on stderr (removed when done under --json)."""
    from vitctl.infer.embed import embed as run_embed

    with batch_progress("embed", quiet=quiet) as on_batch:
        return run_embed(ckpt, data, out_file, on_batch=on_batch, **options)


def show(r: dict[str, Any]) -> None:
    from vitctl.units import human_bytes

    out.print(
        f"wrote {escape(r['file'])}: {r['num_images']} x {r['feature_dim']} float32 embeddings with ids and labels "
        f"({r['format']}, {human_bytes(r['bytes'])})"
    )
    out.print(
        f"features: {r['layer']}, pool {r['pool']}, backend {r['backend']}, {r['precision']}; data {escape(r['data'])} ({r['split']} split)"
    )
    rate = f", {r['images_per_s']:.0f} images/s" if r["images_per_s"] else ""
    out.print(f"{r['seconds']:.1f} s{rate}")
