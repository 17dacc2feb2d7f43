"""`vitctl bench`'s driver: the modes (full, quick, tiny), the report, and run(), which runs
the chosen sections in order and keeps the rows measured before a Ctrl-C or SIGTERM."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

from vitctl.bench.measure import LoadMonitor, machine, num_cores
from vitctl.bench.rows import Row, link
from vitctl.bench.sections import SECTIONS, Bench


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    batches: tuple[int, ...]  # forward batches
    train_batch: int
    warmup: int
    iters: int
    gate_budget_s: float
    gemm_min_time: float
    gemm_max_reps: int
    onednn: bool  # also probe oneDNN's fp32 GEMM
    size: str = "B"  # a ViTConfig variant size; "tiny" for the test models

    def configs(self) -> dict:
        """{"classic": ViTConfig, "parallel": ViTConfig} at this mode's size."""
        from vitctl.config import ViTConfig

        if self.size == "tiny":
            small = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 8, "image_size": 32, "num_classes": 10}
            return {
                "classic": ViTConfig.from_variant("mu/16", **small),
                "parallel": ViTConfig.from_variant("vit22b-mu/16", pool="tok", **small),
            }
        return {
            "classic": ViTConfig.from_variant(f"{self.size}/16"),
            "parallel": ViTConfig.from_variant(f"vit22b-{self.size}/16", pool="tok"),
        }

    def label(self, config: str) -> str:
        return f"{config} {'tiny' if self.size == 'tiny' else self.size + '/16'}"


MODES = {
    "full": Mode("full", (1, 8, 32), 8, warmup=1, iters=3, gate_budget_s=120, gemm_min_time=0.3, gemm_max_reps=10, onednn=True),
    "quick": Mode("quick", (1, 8), 8, warmup=1, iters=1, gate_budget_s=15, gemm_min_time=0.1, gemm_max_reps=4, onednn=False, size="S"),
    "tiny": Mode("tiny", (1, 2), 2, warmup=0, iters=1, gate_budget_s=0, gemm_min_time=0.0, gemm_max_reps=1, onednn=False, size="tiny"),
}


@dataclasses.dataclass
class Report:
    mode: str
    rows: list[Row]
    machine: dict
    load: dict
    notes: list[str]
    interrupted: str | None = None  # the section a Ctrl-C or SIGTERM stopped; rows before it are kept

    def as_dict(self) -> dict:
        return {
            "rows": [r.as_dict() for r in self.rows],
            "mode": self.mode,
            "machine": self.machine,
            "load": self.load,
            "notes": self.notes,
            "interrupted": self.interrupted,
        }


def run(mode: str | Mode = "full", sections: Iterable[str] = SECTIONS, log: Callable[[str], None] | None = None) -> Report:
    """Runs the benchmark; returns its rows (ratios filled), machine, load and notes.

    Args:
      mode: "full", "quick", "tiny" (see vitctl/bench/__init__.py) or a Mode of one's own.
      sections: a subset of SECTIONS, run in SECTIONS' order.
      log: progress callback (one line per step), e.g. printing to stderr.
    """
    if isinstance(mode, str):
        if mode not in MODES:
            raise ValueError(f"unknown bench mode {mode!r}: one of {', '.join(MODES)}")
        mode = MODES[mode]
    chosen = set(sections)
    if chosen - set(SECTIONS):
        raise ValueError(f"unknown bench sections {sorted(chosen - set(SECTIONS))}: pick from {', '.join(SECTIONS)}")
    t0 = time.perf_counter()
    bench = Bench(mode, lambda msg: log(f"[{time.perf_counter() - t0:5.0f} s] {msg}") if log else None)
    monitor = LoadMonitor()
    steps = {"gemm": bench.gemm, "torch-forward": bench.torch_forward, "jax-forward": bench.jax_forward,
             "torch-train": bench.torch_train, "jax-train": bench.jax_train, "convert": bench.convert, "cli": bench.cli}  # fmt: skip
    interrupted = None
    try:  # Ctrl-C (or SIGTERM, which the CLI turns into one) keeps the rows measured so far
        interrupted = "set-up"
        if chosen & {"gemm", "torch-forward", "torch-train"}:
            import torch

            torch.set_num_threads(num_cores())
        for name in SECTIONS:
            if name in chosen:
                interrupted = name
                steps[name]()
        interrupted = None
    except KeyboardInterrupt:
        bench.notes.append(f"interrupted during {interrupted}: {len(bench.rows)} rows measured before it are kept")
    if not bench.has_timm:
        bench.notes.append("timm is not installed (pip install timm): the timm rows are empty and so are the ratios against them")
    load = {**monitor.summary(), "quiet_gate": bench.gate.summary(), "describe": f"{monitor.describe()}; {bench.gate.describe()}"}
    return Report(mode.name, link(bench.rows), machine(), load, bench.notes, interrupted)
