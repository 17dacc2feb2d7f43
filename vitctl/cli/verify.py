"""`vitctl verify A B`: do two checkpoints compute the same function? Thin: parse, call
vitctl.verify.verify, print.

stdout: the config differences, the weights summary and a table of layers (the first
one past its bar highlighted), then the verdict; with --json one object: at least
{"passed", "tolerance", "rtol", "rel_tol", "criterion", "max_abs", "rel_rms",
"rel_rms_layer", "min_cosine", "first_divergent", "layers": [{name, max_abs, max_rel,
rel_rms, mean_abs, cosine, passed}], "config_diff", "weights", "settings", "top1",
"top5"}; a bar not applied is null (fp32: rel_tol; bf16: tolerance and rtol); "roundoff"
where bf16 is involved; "hint" on failure; "diagnosis" and "diagnosis_note" with --diagnose.
--report FILE writes the same JSON to FILE (atomically). Exit codes: 0 within
tolerance, 1 beyond it (or unreadable weights), 2 usage.

Either side may be an exported graph (`vitctl export`: an ONNX model or a torch.export .pt2,
detected by content): then its outputs (logits, pre_logits) are compared on the same inputs,
by the same bars (vitctl.infer.exported.verify_graph); --diagnose needs two checkpoints.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from vitctl.cli._options import JsonOpt, print_json
from vitctl.cli._reports import show_verify
from vitctl.errors import ConfigError

commands = typer.Typer()

EXAMPLES = """Examples:

  vitctl verify ckpt/jax ckpt/torch

  vitctl verify ckpt/jax ckpt/torch-bf16 --precision bf16 --json

  vitctl verify big_vision.npz ckpt/torch --images photos/ --diagnose --report verify.json

  vitctl verify ckpt/jax vit.onnx --json
"""


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"


CkptA = Annotated[
    str,
    typer.Argument(
        help="Reference checkpoint: a directory, a big_vision .npz, hf://org/name (@rev optional), or an exported .onnx / .pt2 graph.",
        show_default=False,
    ),
]
CkptB = Annotated[str, typer.Argument(help="Checkpoint to check against A (same forms).", show_default=False)]
# Help texts stay clear of square brackets: Rich reads them as markup and drops them.
DEFAULTS = "fp32 default 1e-5; in bf16 applied only when given"


@commands.command(epilog=EXAMPLES)
def verify(
    a: CkptA,
    b: CkptB,
    tolerance: Annotated[float | None, typer.Option(help=f"Max-abs bar on logits and pre-logits ({DEFAULTS}).", show_default=False)] = None,
    rtol: Annotated[
        float | None,
        typer.Option(help=f"Bar on every other activation: max-abs diff / max-abs of A ({DEFAULTS}).", show_default=False),
    ] = None,
    rel_tol: Annotated[
        float | None,
        typer.Option(
            help="Bar on every activation's relative RMS error ||B-A|| / ||A|| (bf16 default 5e-2, above bf16 round-off and below "
            "real bugs; in fp32 applied only when given).",
            show_default=False,
        ),
    ] = None,
    batch: Annotated[int, typer.Option(help="Seeded random images in the batch.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the random images.")] = 0,
    images: Annotated[
        Path | None, typer.Option(exists=True, file_okay=False, help="Also run these image files, through each side's preprocessing.")
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            help="fp32: highest matmul precision, TF32 off, judged by max-abs; bf16: bf16 compute on both sides, judged by "
            "relative RMS error (bf16 round-off grows with the values, so max-abs does not fit it)."
        ),
    ] = Precision.fp32,
    diagnose: Annotated[
        bool,
        typer.Option(
            "--diagnose",
            help="On failure, flip each known convention on B and name those that pass and at least halve the error; "
            "differences at bf16 round-off are called that instead.",
        ),
    ] = False,
    report: Annotated[Path | None, typer.Option(help="Also write the JSON report to this file.", show_default=False)] = None,
    json_: JsonOpt = False,
) -> None:
    """Prove that two checkpoints compute the same function, or point at the first layer that does not."""
    _check_options(tolerance, rtol, rel_tol, batch)
    from vitctl import checkpoint
    from vitctl.open import locate

    result = _run(locate(a), locate(b), diagnose, tolerance=tolerance, rtol=rtol, rel_tol=rel_tol, batch=batch, seed=seed,
                  images=images, precision=precision.value)  # fmt: skip
    if report is not None:
        checkpoint.write_json(report, result)
    if json_:
        print_json(result)
    else:
        show_verify(result)
    raise typer.Exit(0 if result["passed"] else 1)


def _run(a: Path, b: Path, diagnose: bool, **options: Any) -> dict[str, Any]:
    """vitctl.verify.verify, or vitctl.infer.exported.verify_graph when a side is an exported graph (by content)."""
    from vitctl.infer.exported import graph_format, verify_graph
    from vitctl.verify import verify as run

    if not (graph_format(a, "A") or graph_format(b, "B")):
        return run(a, b, run_diagnose=diagnose, **options)
    if diagnose:
        raise ConfigError("--diagnose flips conventions in a checkpoint's model; an exported graph has none to flip",
                          hint="verify without --diagnose, or diagnose the checkpoint it was exported from")  # fmt: skip
    return verify_graph(a, b, **options)


def _check_options(tolerance: float | None, rtol: float | None, rel_tol: float | None, batch: int) -> None:
    for flag, value in (("--tolerance", tolerance), ("--rtol", rtol), ("--rel-tol", rel_tol)):
        if value is not None and not (math.isfinite(value) and value >= 0):  # nan compares false: it would pass nothing, or everything
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}", hint=f"e.g. {flag} 1e-5 (fp32) or 1e-1 (bf16)")
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}", hint="e.g. --batch 4")
