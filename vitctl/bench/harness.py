"""`vitctl bench`'s driver: the report, and run(), which runs
the chosen sections in order and keeps the rows measured before a Ctrl-C or SIGTERM."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

from vitctl.bench.measure import LoadMonitor, machine, num_cores
from vitctl.bench.modes import MODES, Mode
from vitctl.bench.rows import Row, link
from vitctl.bench.sections import SECTIONS, Bench


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
