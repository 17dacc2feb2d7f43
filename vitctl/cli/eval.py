"""`vitctl eval CKPT --data D`: a classifier's top-1/top-5 and per-class accuracy on a labelled split.
Thin: parse, call vitctl.infer.evaluate.evaluate, print.

stdout: the settings (checkpoint, backend, data, split, precision), top-1/top-k, a per-class table
and, with --backend both, the disagreement line; with --json one object: {"top1", "top5",
"per_class"..., "results": {backend: {"top1", "top5", "per_class", "confusion_matrix"}},
"agreement": {"disagreements", "max_abs_logits_diff"}, "images_per_s", "timings", ...},
accuracies as fractions. stderr: the progress bar and notes. Exit codes: 0 done; 1 unusable
data or checkpoint; 2 usage (a bad option, an existing --confusion file).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vitctl.cli._options import BatchSizeOpt, DataOpt, JsonOpt, WorkersOpt, out
from vitctl.cli._reports import batch_progress, print_result

commands = typer.Typer()

EXAMPLES = """Examples:

  vitctl eval runs/digits --data digits

  vitctl eval ckpt/torch --data photos/ --backend both --confusion confusion.png

  vitctl eval big_vision.npz --data photos/ --split train --batch-size 64 --json
"""


PER_CLASS_ROWS = 40  # more classes: the table shows the lowest accuracies
NAMES = {  # class_names_check -> what it means
    "agree": "the data's, the same as the checkpoint's",
    "differ": "the data's; they DIFFER from the checkpoint's (labels are compared by index)",
    "data only": "the data's (the checkpoint lists none)",
    "checkpoint only": "the checkpoint's (the data has none)",
    "none": "none: classes by index",
}


class EvalBackend(str, enum.Enum):
    jax = "jax"
    torch = "torch"
    both = "both"


@commands.command("eval", epilog=EXAMPLES)
def eval_(
    ckpt: Annotated[
        str,
        typer.Argument(
            help="Checkpoint: a vitctl directory (JAX or torch), a timm or Hugging Face dir, a big_vision .npz, or hf://org/name (@rev optional).",
            show_default=False,
        ),
    ],
    data: DataOpt,
    split: Annotated[str, typer.Option("--split", help="train or test (sources without one: the held-out share, as train).")] = "test",
    backend: Annotated[
        EvalBackend | None,
        typer.Option(
            "--backend", help="Model to run: jax, torch, or both on the same batches (default: the checkpoint's own).", show_default=False
        ),
    ] = None,
    batch_size: BatchSizeOpt = 256,
    workers: WorkersOpt = 0,
    confusion: Annotated[
        Path | None, typer.Option("--confusion", help="Also draw the confusion matrix into this new .png file.", show_default=False)
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Top-1/top-5 and per-class accuracy of a classifier on a labelled split, on either backend or both."""
    from vitctl.infer.evaluate import evaluate

    with batch_progress("eval", quiet=json_) as on_batch:
        result = evaluate(
            ckpt, data, split=split, backend=backend.value if backend else None, batch_size=batch_size, workers=workers,
            confusion=confusion, on_batch=on_batch,
        )  # fmt: skip
    print_result(result, json_, show)


def show(r: dict[str, Any]) -> None:
    c, k = r["checkpoint"], r["top_k"]
    out.print(f"checkpoint: {escape(c['path'])} ({c['format']}), backend {r['backend']}, {r['precision']}", soft_wrap=True)
    out.print(f"data: {escape(r['data'])} ({r['split']}): {r['num_examples']} images, {r['num_classes']} classes "
              f"(the model has {r['model_classes']})", soft_wrap=True)  # fmt: skip
    out.print(f"class names: {NAMES[r['class_names_check']]}")
    backends = list(r["results"])
    t = Table("backend", "top-1", f"top-{k}", "correct", title="Accuracy")
    for b in backends:
        m = r["results"][b]
        t.add_row(b, f"{m['top1']:.2%}", f"{m[f'top{k}']:.2%}", f"{m['correct']} / {r['num_examples']}")
    out.print(t)
    rows = r["results"][backends[0]]["per_class"]
    title = "Per class"
    if len(rows) > PER_CLASS_ROWS:  # the lowest first: what an eval of many classes is read for
        rows = sorted(rows, key=lambda c: (c["accuracy"] is None, c["accuracy"]))[:PER_CLASS_ROWS]
        title = f"Per class: the {PER_CLASS_ROWS} lowest of {r['num_classes']} (--json has every class)"
    t = Table("class", "name", "images", *(f"top-1 {b}" for b in backends), title=title)
    for row in rows:
        i = row["class"]
        accs = [r["results"][b]["per_class"][i]["accuracy"] for b in backends]
        t.add_row(str(i), escape(row["name"]), str(row["count"]), *("-" if a is None else f"{a:.2%}" for a in accs))
    out.print(t)
    if "agreement" in r:
        a = r["agreement"]
        out.print(f"jax vs torch: {a['disagreements']} top-1 disagreement(s) in {r['num_examples']} images, "
                  f"logits max-abs difference {a['max_abs_logits_diff']:.2e}", soft_wrap=True)  # fmt: skip
    speed = ", ".join(f"{b} {v:,.0f}" for b, v in r["images_per_s"]["model"].items())
    compiled = "".join(f" (after {v:.1f} s of {b} compile)" for b, v in r["timings"]["compile"].items())
    out.print(f"{r['images_per_s']['end_to_end']:,.0f} images/s end to end; the model alone: {speed} images/s{compiled}; {r['seconds']:.1f} s in all",
              soft_wrap=True)  # fmt: skip
    if r["confusion_png"]:
        out.print(f"confusion matrix: {escape(r['confusion_png'])}")
