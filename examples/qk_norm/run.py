"""QK-norm at CPU scale: attention-logit growth without it, none with it (arXiv:2302.05442 sec. 3.1).

ViT-22B normalizes queries and keys (LayerNorm in the paper, RMSNorm here) before their
dot product: without it, at the learning rates a large model trains at, attention logits
grow without bound, attention collapses onto single tokens (entropy near 0) and the
loss diverges. This example trains the same small model of the paper's block on
scikit-learn's digits twice per learning rate, with and without QK-norm, through
`vitctl train`'s own code path (vitctl.train.loop.train, the same TrainConfig as the CLI),
and reads the per-layer maximum attention logit and attention entropy that the trainer
logs in metrics.jsonl every `stats_every` steps.

    python examples/qk_norm/run.py                      # the README's sweep and plot (a few minutes)
    python examples/qk_norm/run.py --lrs 0.03 --steps 100 --out /tmp/qk
    python examples/qk_norm/run.py --out runs/qk_norm --plot-only  # plot again

Writes OUT/results.json (one row per run) and OUT/qk_norm.png (max attention logit,
attention entropy and loss vs step, both settings, every learning rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

# The model: the paper's block (parallel attention + MLP, no QKV/norm biases), 4 layers,
# head dimension 32, at 16 px with patch 4 (16 tokens) on 1-channel digits.
MODEL = {"width": 64, "depth": 4, "mlp_dim": 256, "num_heads": 2, "patch_size": 4, "image_size": 16, "channels": 1, "num_classes": 10}
TRAIN = {"data": "digits", "batch_size": 64, "warmup": 10, "schedule": "cosine", "weight_decay": 1e-4, "stats_every": 5, "log_every": 1}


def model_config(qk_norm: bool, **overrides):
    from vitctl.config import ViTConfig

    return dataclasses.replace(ViTConfig.from_variant("vit22b-mu/16"), qk_norm=qk_norm, head_zero_init=True, **{**MODEL, **overrides})


def train_one(out: Path, qk_norm: bool, lr: float, steps: int, seed: int = 0, model: dict | None = None) -> dict[str, Any]:
    """One `vitctl train` run into OUT; returns its summary and its metrics.jsonl rows."""
    from vitctl.train.loop import METRICS, TrainConfig, train

    out.mkdir(parents=True, exist_ok=True)
    model_file = out / f"model-qk{int(qk_norm)}.json"
    model_file.write_text(model_config(qk_norm, **(model or {})).to_json())
    short = {"warmup": min(TRAIN["warmup"], steps // 2), "stats_every": min(TRAIN["stats_every"], max(1, steps // 2))}
    tcfg = TrainConfig(model=str(model_file), lr=lr, steps=steps, seed=seed, **{**TRAIN, **short})
    run_dir = out / run_name(lr, qk_norm)
    result = train(tcfg, run_dir, force=True)
    rows = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]
    return {"qk_norm": qk_norm, "lr": lr, "steps": steps, "result": result, "rows": rows}


def run_name(lr: float, qk_norm: bool) -> str:
    return f"lr{lr:g}-qk{'on' if qk_norm else 'off'}"


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """The table row of one run: peak max-logit, last entropy (min over layers), loss, accuracy."""
    rows = run["rows"]
    stats = [r for r in rows if "attn_logit_max" in r]
    finite = [r["loss"] for r in rows if math.isfinite(r["loss"])]
    last = stats[-1] if stats else {}
    return {
        "qk_norm": run["qk_norm"],
        "lr": run["lr"],
        "steps": run["steps"],
        "max_attn_logit": max((max(r["attn_logit_max"]) for r in stats), default=None),
        "final_max_attn_logit": max(last["attn_logit_max"]) if last else None,
        "final_min_entropy": min(last["attn_entropy"]) if last else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "min_loss": min(finite) if finite else None,
        "test_accuracy": run["result"]["test_accuracy"],
        "diverged": not all(math.isfinite(r["loss"]) for r in rows),
    }


def sweep(
    out: str | Path, lrs: list[float], steps: int, seed: int = 0, model: dict | None = None, qk_norms: tuple[bool, ...] = (False, True)
) -> list[dict[str, Any]]:
    """Trains with and without QK-norm at each learning rate; writes OUT/results.json and returns the runs.

    model: overrides of MODEL; qk_norms: the settings to train (tests use a smaller model and one setting)."""
    out = Path(out)
    runs = [train_one(out, qk, lr, steps, seed, model) for lr in lrs for qk in qk_norms]
    table = [summarize(r) for r in runs]
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, out / "results.json")
    return runs


def load_runs(out: str | Path) -> list[dict[str, Any]]:
    """The runs a sweep left in OUT (to plot again without training)."""
    runs = []
    for row in json.loads((Path(out) / "results.json").read_text()):
        metrics = Path(out) / run_name(row["lr"], row["qk_norm"]) / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        runs.append({"qk_norm": row["qk_norm"], "lr": row["lr"], "steps": row["steps"], "rows": rows})
    return runs


def plot(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Max attention logit (over layers), min attention entropy (over layers) and loss vs step;
    red without QK-norm, blue with it; one line style per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=80)
    styles = dict(zip(sorted({r["lr"] for r in runs}), (":", "--", "-", "-.")))
    for run in runs:
        stats = [r for r in run["rows"] if "attn_logit_max" in r]
        style = {"color": "tab:blue" if run["qk_norm"] else "tab:red", "linestyle": styles.get(run["lr"], "-"), "linewidth": 1.2}
        label = f"{'with' if run['qk_norm'] else 'without'} QK-norm, lr {run['lr']:g}"
        axes[0].plot([r["step"] for r in stats], [max(r["attn_logit_max"]) for r in stats], label=label, **style)
        axes[1].plot([r["step"] for r in stats], [min(r["attn_entropy"]) for r in stats], **style)
        axes[2].plot([r["step"] for r in run["rows"]], [r["loss"] for r in run["rows"]], **style)
    axes[0].set(xlabel="step", ylabel="max attention logit", yscale="log", title="attention logits (max over layers)")
    axes[1].set(xlabel="step", ylabel="nats", title="attention entropy (lowest layer)")
    axes[2].set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    axes[0].legend(fontsize="x-small")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", default="0.01,0.03,0.1", help="comma-separated peak learning rates")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/qk_norm")
    p.add_argument("--plot-only", action="store_true", help="plot the runs already in --out")
    args = p.parse_args(argv)
    runs = load_runs(args.out) if args.plot_only else sweep(args.out, [float(x) for x in args.lrs.split(",")], args.steps, args.seed)
    print(f"{'lr':>6} {'QK-norm':>7} {'peak max-logit':>14} {'final min-entropy':>17} {'final loss':>10} {'test acc':>8}")
    for r in json.loads((Path(args.out) / "results.json").read_text()):
        print(f"{r['lr']:>6g} {'on' if r['qk_norm'] else 'off':>7} {r['max_attn_logit']:>14.1f} {r['final_min_entropy']:>17.3f} "
              f"{r['final_loss']:>10.4f} {r['test_accuracy'] or 0:>8.3f}")  # fmt: skip
    png = plot(runs, Path(args.out) / "qk_norm.png")
    print(f"plot: {png}; table: {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
