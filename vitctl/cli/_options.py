"""Shared command-line parameters (Annotated aliases) and output helpers.

Results go to stdout (`out`, or `print_json` for --json); progress, hints and errors
go to stderr (`err`). Importing this module loads neither jax nor torch.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from vitctl.config import ViTConfig

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # soft_wrap: one message, one line


class Backend(str, enum.Enum):
    jax = "jax"
    torch = "torch"


class ParamDtype(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL_OR_CKPT",
        help="A preset name (see `vitctl models`), a checkpoint directory, or a config.json.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to create.", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing checkpoint (only once the new one is complete).")]
BackendOpt = Annotated[Backend, typer.Option("--backend", help="jax: params/ (Orbax); torch: model.safetensors.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed of the initialisation.")]


class Pool(str, enum.Enum):
    map = "map"
    gap = "gap"
    tok = "tok"


# The options of the commands that run a checkpoint on data (eval, predict, embed, probe).
CkptArg = Annotated[
    str,
    typer.Argument(help="Checkpoint: a vitctl directory (JAX or torch), a big_vision .npz, or hf://org/name[@rev].", show_default=False),
]
DataOpt = Annotated[
    str,
    typer.Option("--data", help="digits, fashion-mnist, or a path (ImageFolder, .npz, IDX, HF dataset, packed dir).", show_default=False),
]
RunBackendOpt = Annotated[
    Backend | None, typer.Option("--backend", help="Model to run (default: the checkpoint's own).", show_default=False)
]
LayerOpt = Annotated[str, typer.Option("--layer", help="pre_logits, or block:N (0-based; negative from the end).")]
PoolOpt = Annotated[
    Pool | None,
    typer.Option(
        "--pool",
        help="map, gap (mean of patch tokens) or tok (class token); default: the model's own, gap or tok for blocks.",
        show_default=False,
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="grain worker processes that read and resize the images (0: in this process).")]


def print_json(obj: Any) -> None:
    """The whole stdout of a --json command: one JSON object."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def resolve(spec: str) -> tuple[str, ViTConfig, Path | None]:
    """(name, config, checkpoint dir or .npz, else None) for a preset name, a checkpoint dir,
    a config.json or a big_vision .npz (its config inferred from the member headers, as convert does)."""
    import zipfile

    from vitctl.config import PRESETS, load_config
    from vitctl.errors import ConfigError

    if spec in PRESETS:
        return spec, PRESETS[spec], None
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and (path.suffix == ".npz" or zipfile.is_zipfile(path))):
        from vitctl.open import read_config

        return spec, read_config(path)[0], path
    if path.is_file():
        return spec, load_config(path), None
    if spec.endswith((".json", ".npz")) or spec.startswith((".", "/", "~")):
        raise ConfigError(
            f"no such file or directory: {spec}",
            hint="give a preset name (see `vitctl models`), a checkpoint directory, a config.json or a big_vision .npz",
        )
    return spec, ViTConfig.from_variant(spec), None  # raises, naming close presets
