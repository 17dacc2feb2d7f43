"""`vitctl probe CKPT --data D`: linear probe and few-shot accuracy of frozen features. Thin: parse,
call vitctl.probe.probe, print.

stdout: the settings (checkpoint, backend, layer, pooling, sizes) and a table of accuracies; with
--json one object: {"linear": {"accuracy", "C", "val_accuracy", "sweep", ...}, "fewshot": {"5":
{"accuracy", "std", "per_seed"}, ...}, "train_size", "test_size", "feature_dim", "layer", "pool",
"backend", "timings", "cached", ...}, accuracies as fractions. stderr: the extraction progress bar
and notes. Exit codes: 0 done; 1 unusable data or checkpoint; 2 usage.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

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
)
from vitctl.cli._reports import print_result, probe_with_progress
from vitctl.errors import ConfigError

commands = typer.Typer()

EXAMPLES = """Examples:

  vitctl probe runs/digits --data digits

  vitctl probe ckpt/torch --data digits --backend torch --layer block:-2 --pool gap --json

  vitctl probe big_vision.npz --data photos/ --mode fewshot --shots 1,5,10 --seeds 5
"""


class Mode(str, enum.Enum):
    linear = "linear"
    fewshot = "fewshot"
    both = "both"


def parse_shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--shots must be comma-separated integers, got '{text}'", hint="e.g. --shots 1,5,10,25") from None
    return shots


@commands.command(epilog=EXAMPLES)
def probe(
    ckpt: CkptArg,
    data: DataOpt,
    backend: RunBackendOpt = None,
    layer: LayerOpt = "pre_logits",
    pool: PoolOpt = None,
    mode: Annotated[
        Mode, typer.Option("--mode", help="linear (logistic regression, C swept), fewshot (big_vision least squares), or both.")
    ] = Mode.both,
    shots: Annotated[str, typer.Option("--shots", help="Few-shot examples per class, comma-separated.")] = "1,5,10,25",
    seeds: Annotated[int, typer.Option("--seeds", help="Few-shot draws per shot count (accuracy averaged).")] = 3,
    l2: Annotated[float, typer.Option("--l2", help="Few-shot ridge L2 (big_vision: 2^10).")] = 2.0**10,
    batch_size: BatchSizeOpt = 256,
    workers: WorkersOpt = 0,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the feature cache ($VITCTL_CACHE or ~/.cache/vitctl).")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Linear-probe and few-shot accuracy of a checkpoint's frozen features, on either backend."""
    from vitctl.open import locate

    ckpt = locate(ckpt, fetch=backend.value if backend else "all", must_exist=True)
    result = probe_with_progress(
        ckpt, data, quiet=json_, backend=backend.value if backend else None, layer=layer, pool=pool.value if pool else None,
        mode=mode.value, shots=parse_shots(shots), seeds=seeds, l2=l2, batch_size=batch_size, use_cache=not no_cache,
        workers=workers,
    )  # fmt: skip
    print_result(result, json_, show)


def show(r: dict[str, Any]) -> None:
    c = r["checkpoint"]
    out.print(f"checkpoint: {escape(c['path'])} ({c['format']}, sha256 {c['sha256'][:12]}), backend {r['backend']}, {r['precision']}")
    p = r["preprocess"]
    how = f"value range {p['value_range']}" if p["value_range"] else f"mean {p['mean']} std {p['std']}"
    out.print(f"data: {escape(str(r['data']))}: {r['train_size']} train, {r['test_size']} test, {r['num_classes']} classes; "
              f"{p['image_size']} px ({p['resize']}{', antialias' if p['antialias'] else ''}), {how}")  # fmt: skip
    where = "from the cache" if r["cached"] else "extracted"
    out.print(f"features: {r['layer']}, pool {r['pool']}, dim {r['feature_dim']} ({where}, {r['timings'].get('features', 0):.1f} s)")
    t = Table("protocol", "accuracy", "detail", title="Frozen-feature probe")
    lin = r.get("linear")
    if lin:
        conv = "" if lin["converged"] else ", not converged"
        t.add_row(
            "linear", f"{lin['accuracy']:.2%}", f"C={lin['C']:.3g} (val {lin['val_accuracy']:.2%}, {len(lin['sweep'])} values swept{conv})"
        )
    for shots, f in r.get("fewshot", {}).items():
        t.add_row(f"{shots}-shot", f"{f['accuracy']:.2%}", f"± {f['std']:.2%} over {r['fewshot_seeds']} seeds, l2={r['fewshot_l2']:g}")
    out.print(t)
    out.print(f"{r['timings']['total']:.1f} s" + (" (features from the cache)" if r["cached"] else ""))
