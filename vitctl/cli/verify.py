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

--grads compares training instead (vitctl.verify_grads): on one seeded batch, the loss, every
parameter's gradient and the update of one optimizer step (--optimizer and train's
hyper-parameter flags), A on JAX and B on torch unless --backend-a/--backend-b say otherwise.
--json: {"passed", "loss": {a, b, rel, passed}, "grads" and "update": {by, params: [{name,
max_abs, max_rel, rel_rms, passed}], first_divergent, worst, worst_param, missing, passed},
"tolerance", "criterion", "step", "settings", "config_diff", "inputs"}; "hint" on failure;
"diagnosis" and "diagnosis_note" with --diagnose. Exit 1 when any bar fails.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from vitctl.cli._options import JsonOpt, err, out, print_json
from vitctl.cli._reports import show_verify
from vitctl.errors import ConfigError

commands = typer.Typer()

EXAMPLES = """Examples:

  vitctl verify ckpt/jax ckpt/torch

  vitctl verify ckpt/jax ckpt/torch-bf16 --precision bf16 --json

  vitctl verify big_vision.npz ckpt/torch --images photos/ --diagnose --report verify.json

  vitctl verify ckpt/jax vit.onnx --json

  vitctl verify ckpt/jax ckpt/torch --grads --optimizer adafactor --json
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


TolOpt = Annotated[float | None, typer.Option(help=f"Max-abs bar on logits and pre-logits ({DEFAULTS}).", show_default=False)]
RtolOpt = Annotated[
    float | None, typer.Option(help=f"Bar on every other activation: max-abs diff / max-abs of A ({DEFAULTS}).", show_default=False)
]
RelTolOpt = Annotated[
    float | None,
    typer.Option(
        help="Bar on every activation's relative RMS error ||B-A|| / ||A|| (bf16 default 5e-2, above bf16 round-off and below "
        "real bugs; in fp32 applied only when given).",
        show_default=False,
    ),
]
ImagesOpt = Annotated[
    Path | None, typer.Option(exists=True, file_okay=False, help="Also run these image files, through each side's preprocessing.")
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        help="fp32: highest matmul precision, TF32 off, judged by max-abs; bf16: bf16 compute on both sides, judged by "
        "relative RMS error (bf16 round-off grows with the values, so max-abs does not fit it)."
    ),
]
DiagnoseOpt = Annotated[
    bool,
    typer.Option(
        "--diagnose",
        help="On failure, flip each known convention on B and name those that pass and at least halve the error; "
        "differences at bf16 round-off are called that instead. With --grads: the flips that make the pair pass "
        "(also loss reduction, weight-decay mask, AdamW epsilon placement, bias correction).",
    ),
]
ReportOpt = Annotated[Path | None, typer.Option(help="Also write the JSON report to this file.", show_default=False)]


class GradBackend(str, enum.Enum):
    jax = "jax"
    torch = "torch"


class Optimizer(str, enum.Enum):
    adamw = "adamw"
    adafactor = "adafactor"
    sgd = "sgd"


class Loss(str, enum.Enum):
    softmax = "softmax"
    sigmoid = "sigmoid"


# --grads: the training step compared (flags as `vitctl train`'s; unset: train's defaults, a constant lr).
GRADS = "--grads: "
GradsOpt = Annotated[bool, typer.Option("--grads", help="Compare gradients and one optimizer step instead of the forward pass.")]
BackendAOpt = Annotated[GradBackend, typer.Option(help=GRADS + "the framework side A computes on.")]
BackendBOpt = Annotated[GradBackend, typer.Option(help=GRADS + "the framework side B computes on.")]
LossOpt = Annotated[Loss, typer.Option(help=GRADS + "softmax or sigmoid (multi-label) cross-entropy.")]
SmoothOpt = Annotated[float, typer.Option(help=GRADS + "label smoothing.")]
OptimizerOpt = Annotated[Optimizer, typer.Option(help=GRADS + "the optimizer of the step.")]
Hyper = Annotated[float | None, typer.Option(help=GRADS + "as vitctl train's (default: train's).", show_default=False)]
NesterovOpt = Annotated[bool | None, typer.Option("--nesterov", help=GRADS + "sgd: Nesterov momentum.", show_default=False)]
GradTolOpt = Annotated[float | None, typer.Option(help=GRADS + "bar on every gradient's max-abs diff / max-abs of A (default 1e-5).")]
UpdateTolOpt = Annotated[
    float | None,
    typer.Option(help=GRADS + "bar on every update's max-abs diff / max-abs of A, both stepping from A's gradients (default 1e-5)."),
]


@commands.command(epilog=EXAMPLES)
def verify(
    a: CkptA,
    b: CkptB,
    tolerance: TolOpt = None,
    rtol: RtolOpt = None,
    rel_tol: RelTolOpt = None,
    batch: Annotated[int, typer.Option(help="Seeded random images in the batch.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the random images.")] = 0,
    images: ImagesOpt = None,
    precision: PrecisionOpt = Precision.fp32,
    diagnose: DiagnoseOpt = False,
    report: ReportOpt = None,
    json_: JsonOpt = False,
    grads: GradsOpt = False,
    backend_a: BackendAOpt = GradBackend.jax,
    backend_b: BackendBOpt = GradBackend.torch,
    loss: LossOpt = Loss.softmax,
    label_smoothing: SmoothOpt = 0.0,
    optimizer: OptimizerOpt = Optimizer.adamw,
    lr: Hyper = None,
    weight_decay: Hyper = None,
    head_weight_decay: Hyper = None,
    clip_norm: Hyper = None,
    momentum: Hyper = None,
    nesterov: NesterovOpt = None,
    layer_decay: Hyper = None,
    head_lr_mult: Hyper = None,
    grad_tol: GradTolOpt = None,
    update_tol: UpdateTolOpt = None,
) -> None:
    """Prove that two checkpoints compute the same function (with --grads: learn the same way), or point at the first layer that does not."""
    _check_options(tolerance, rtol, rel_tol, batch)
    from vitctl import checkpoint
    from vitctl.open import locate

    if grads:
        hyper = {"lr": lr, "weight_decay": weight_decay, "head_weight_decay": head_weight_decay, "clip_norm": clip_norm,
                 "momentum": momentum, "nesterov": nesterov, "layer_decay": layer_decay, "head_lr_mult": head_lr_mult}  # fmt: skip
        result = _run_grads(locate(a), locate(b), diagnose, batch=batch, seed=seed, backend_a=backend_a.value, backend_b=backend_b.value,
                            loss=loss.value, label_smoothing=label_smoothing, optimizer=optimizer.value, grad_tol=grad_tol,
                            update_tol=update_tol, **hyper)  # fmt: skip
    else:
        result = _run(locate(a), locate(b), diagnose, tolerance=tolerance, rtol=rtol, rel_tol=rel_tol, batch=batch, seed=seed,
                      images=images, precision=precision.value)  # fmt: skip
    if report is not None:
        checkpoint.write_json(report, result)
    if json_:
        print_json(result)
    else:
        (_show_grads if grads else show_verify)(result)
    raise typer.Exit(0 if result["passed"] else 1)


def _run_grads(a: Path, b: Path, diagnose: bool, grad_tol: float | None, update_tol: float | None, **options: Any) -> dict[str, Any]:
    """vitctl.verify_grads.verify_grads, with the bars given (or its defaults)."""
    from vitctl.verify_grads import Bars, verify_grads

    for flag, value in (("--grad-tol", grad_tol), ("--update-tol", update_tol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}", hint=f"e.g. {flag} 1e-4")
    bars = Bars(grad=Bars.grad if grad_tol is None else grad_tol, update=Bars.update if update_tol is None else update_tol)
    return verify_grads(a, b, run_diagnose=diagnose, bars=bars, **options)


def _show_grads(r: dict[str, Any]) -> None:
    """A `vitctl verify --grads` report: sides, loss, one table of gradients and updates per parameter, the verdict."""
    from rich.markup import escape
    from rich.table import Table

    for side in ("a", "b"):
        out.print(f"{side.upper()}: {escape(r[side]['path'])} ({r[side]['format']}, on {r[side]['backend']})")
    if r.get("problems"):
        out.print("[red]" + escape("; ".join(r["problems"])) + "[/red]")
        return
    loss = r["loss"]
    out.print(f"loss: A {loss['a']:.7g}, B {loss['b']:.7g}, relative difference {loss['rel']:.2e}")
    table = Table("parameter", "grad max-abs", "grad max-rel", f"{r['step']['optimizer']} update max-rel", "")
    updates = {row["name"]: row for row in r["update"]["params"]}
    for g in r["grads"]["params"]:
        u = updates.get(g["name"], {"max_rel": float("nan"), "passed": True})
        ok = g["passed"] and u["passed"]
        table.add_row(g["name"], f"{g['max_abs']:.2e}", f"{g['max_rel']:.2e}", f"{u['max_rel']:.2e}", "ok" if ok else "[red]FAIL[/red]")
    out.print(table)
    for d in r.get("diagnosis", []):
        out.print(f"  flip {escape(d['flip'])}: {'passes' if d['passed'] else 'still fails'}")
    if r.get("diagnosis_note"):
        out.print(escape(r["diagnosis_note"]))
    first = r["grads"]["first_divergent"] or r["update"]["first_divergent"]
    verdict = "[green]PASS[/green]" if r["passed"] else "[red]FAIL[/red]" + (f": first past its bar: {first}" if first else "")
    out.print(f"{verdict} ({escape(r['criterion'])})")
    if r.get("hint"):
        err.print(f"hint: {escape(r['hint'])}")


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
