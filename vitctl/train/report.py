"""Watching a run: OUT/metrics.jsonl, the plain progress lines for logs, and OUT/metrics.png.

- metrics.jsonl: one object per logged step (step, loss, lr, grad_norm, images_per_s), with
  attn_logit_max / attn_entropy (per layer) every --stats-every steps and test_accuracy
  every --eval-every steps and at the end.
- PlainProgress: when stderr is a log file (nohup, SLURM, CI) a live bar shows nothing until
  the end; this prints one plain line at the first step, every `every_s` seconds, and at the
  last step. Its clock is a parameter, so tests drive it without waiting.
- plot: loss, learning rate, held-out accuracy, gradient norm, and per layer the maximum
  attention logit and the attention entropy (arXiv:2302.05442 sec. 3.1: attention-logit
  growth is the divergence signal that QK-norm fixes).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS, PLOT = "metrics.jsonl", "metrics.png"


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def truncate_metrics(path: Path, step: int) -> None:
    """Drops logged steps after `step` (a resumed run logs them again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """Calls `write` with one progress line per logged record, at most one every `every_s` seconds of
    `clock` (0: every record), and always for the first and the last step.

    A line: "step 120/200  loss 0.3412  lr 1.20e-03  1534 img/s  eta 0:14" (and "test acc 0.9610"
    when the record has one). The ETA is the remaining steps at the rate since the first record
    (which includes compiling, so it is not in the rate).
    """

    def __init__(self, total: int, every_s: float, write: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.total, self.every_s, self.write, self.clock = total, every_s, write, clock
        self.first: tuple[int, float] | None = None  # (step, time) of the first record
        self.last_time: float | None = None

    def __call__(self, rec: dict[str, Any]) -> None:
        now, step = self.clock(), rec["step"]
        if self.first is None:
            self.first = (step, now)
        due = self.last_time is None or step >= self.total or now - self.last_time >= self.every_s
        if not due:
            return
        self.last_time = now
        parts = [f"step {step}/{self.total}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}", f"{rec['images_per_s']:.0f} img/s"]
        if "test_accuracy" in rec:
            parts.append(f"test acc {rec['test_accuracy']:.4f}")
        done, elapsed = step - self.first[0], now - self.first[1]
        if step >= self.total:
            parts.append("done")
        elif done > 0 and elapsed > 0:
            parts.append(f"eta {_duration((self.total - step) * elapsed / done)}")
        self.write("  ".join(parts))


def plot(out: Path) -> Path | None:
    """OUT/metrics.png (None without matplotlib): six panels, each saying so when its series was not logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(out)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    _line(axes[0, 0], rows, "loss", "training loss", "loss")
    _line(axes[0, 1], rows, "lr", "learning rate", "lr")
    _line(axes[0, 2], rows, "test_accuracy", "held-out accuracy", "top-1", off="not evaluated before the end (--eval-every)", marker="o")
    _per_layer(axes[1, 0], rows, "attn_logit_max", "max attention logit", "logit")
    _per_layer(axes[1, 1], rows, "attn_entropy", "attention entropy", "nats")
    _line(axes[1, 2], rows, "grad_norm", "gradient norm (before clipping)", "global L2 norm")
    fig.tight_layout()
    fig.savefig(Path(out) / PLOT, dpi=80)
    plt.close(fig)
    return Path(out) / PLOT


def _line(ax, rows, key: str, title: str, ylabel: str, off: str = "not logged", marker: str | None = None) -> None:
    points = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if not points:
        ax.text(0.5, 0.5, off, ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    ax.plot(*zip(*points), marker=marker)
    if key == "test_accuracy":
        ax.set_ylim(0, 1.02)


def _per_layer(ax, rows, key: str, title: str, ylabel: str) -> None:
    stats = [r for r in rows if key in r]
    ax.set(xlabel="step", ylabel=ylabel, title=title + " per layer")
    if not stats:
        ax.text(0.5, 0.5, "none logged (see --stats-every)", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    for layer in range(len(stats[0][key])):
        ax.plot([r["step"] for r in stats], [r[key][layer] for r in stats], label=f"block {layer}")
    ax.legend(fontsize="small")
