"""`vitctl export CKPT DST --format onnx|torch-export`: a graph that runs with no vitctl and no
model code. Thin: parse, call vitctl.infer.export.export, print.

stdout: the file written, its input (float32 NCHW images, dynamic batch), outputs and the
preprocessing the caller must apply; with --json one object: {"path", "format", "dtype",
"opset", "bytes", "input", "outputs", "preprocess", "class_names", "source_format",
"seconds"}. stderr: the exporter's progress. DST is written atomically; an existing DST is
refused. Exit codes: 0 written; 1 unreadable checkpoint or output error; 2 usage.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from vitctl.cli._options import JsonOpt, out, print_json
from vitctl.errors import ConfigError

commands = typer.Typer()

EXAMPLES = """Examples:

  vitctl export ckpt/jax vit.onnx

  vitctl export ckpt/torch vit.pt2 --format torch-export --dtype bfloat16 --json

  vitctl export big_vision.npz vit.onnx --opset 18
"""


class Format(str, enum.Enum):
    onnx = "onnx"
    torch_export = "torch-export"


class DType(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


@commands.command(epilog=EXAMPLES)
def export(
    ckpt: Annotated[
        str,
        typer.Argument(
            help="Checkpoint: a vitctl directory (JAX or torch), timm or HF dir, big_vision .npz, or hf://org/name.", show_default=False
        ),
    ],
    dst: Annotated[Path, typer.Argument(help="Output file (must not exist).", show_default=False)],
    format_: Annotated[
        Format, typer.Option("--format", help="onnx (onnxruntime) or torch-export (torch.export.save, .pt2).")
    ] = Format.onnx,
    dtype: Annotated[
        DType,
        typer.Option(help="Weights and compute: float32, or bfloat16 (torch-export only: onnxruntime's CPU provider has no bf16 kernels)."),
    ] = DType.float32,
    opset: Annotated[int | None, typer.Option(help="ONNX opset version (default: the exporter's own).", show_default=False)] = None,
    json_: JsonOpt = False,
) -> None:
    """Export a checkpoint as an ONNX or torch.export graph: float32 NCHW images in, logits out."""
    from vitctl.infer.export import export as run
    from vitctl.infer.exported import graph_format
    from vitctl.open import locate

    src = locate(ckpt, must_exist=True)
    if graph_format(src, "CKPT"):
        raise ConfigError(f"{src} is an exported graph, not a checkpoint: it cannot be exported again",
                          hint="export from the checkpoint it came from")  # fmt: skip
    result = run(src, dst, fmt=format_.value, dtype=dtype.value, opset=opset)
    if json_:
        print_json(result)
    else:
        show(result)


def show(r: dict[str, Any]) -> None:
    out.print(f"wrote {escape(r['path'])} ({r['format']}, {r['dtype']}, {r['bytes'] / 2**20:.1f} MiB"
              + (f", opset {r['opset']}" if r["opset"] else "") + f") in {r['seconds']:.1f} s")  # fmt: skip
    i = r["input"]
    out.print(f"input: {i['name']} {i['dtype']} {escape(str(i['shape']))} ({i['layout']}, dynamic batch)")
    out.print(f"outputs: {', '.join(r['outputs'])}")
    out.print(f"preprocessing (apply before the graph): {escape(r['preprocess'])}")
    out.print(f"check it: vitctl verify CKPT {escape(r['path'])}")
