"""What more than one command shows: a verify report (verify, demo), the progress bar of a run
over data (eval, predict, embed, probe) and a probe run with its bar (probe, demo). Commands
import these from here, never from each other."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from vitctl.cli._options import err, out, print_json


@contextlib.contextmanager
def batch_progress(label: str, *, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar named `label` on stderr (removed when done if quiet, as under --json);
    yields the on_batch(done, total) callback that vitctl's data loops call after each batch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(label), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(), console=err, transient=quiet)
    with progress:
        task = None

        def on_batch(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = progress.add_task(label, total=total)
            progress.update(task, completed=done)

        yield on_batch


def print_result(result: dict[str, Any], json_: bool, show: Callable[[dict[str, Any]], None]) -> None:
    """A run's notes on stderr, then its result on stdout: one JSON object under --json, else `show`'s text."""
    for note in result["notes"]:
        err.print(f"note: {escape(note)}")
    if json_:
        print_json(result)
    else:
        show(result)


def probe_with_progress(ckpt: str | Path, data: str, *, quiet: bool = False, **options: Any) -> dict[str, Any]:
    """vitctl.probe.probe with a Rich progress bar of the feature extraction on stderr (for the CLI and the demo)."""
    from vitctl.probe import probe as run_probe

    with batch_progress("features", quiet=quiet) as on_batch:
        return run_probe(ckpt, data, on_batch=on_batch, **options)


def show_verify(r: dict[str, Any]) -> None:
    """A `vitctl verify` report (vitctl.verify.verify's dict) as tables on stdout, the hint on stderr."""
    out.print(f"A: {escape(r['a']['path'])} ({r['a']['format']}, {r['a']['backend']})")
    out.print(f"B: {escape(r['b']['path'])} ({r['b']['format']}, {r['b']['backend']})")
    s = r["settings"]
    out.print("settings: " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "jax_devices"))
    if r["config_diff"]:
        t = Table("config field", "A", "B", title="Config differences")
        for d in r["config_diff"]:
            t.add_row(d["field"], escape(str(d["a"])), escape(str(d["b"])))
        out.print(t)
    w = r.get("weights")
    if w:
        out.print(
            f"weights: {w['compared']} tensors compared, {w['exactly_equal']} exactly equal, "
            f"max-abs {w['max_abs']:.3g}" + (f" ({w['max_abs_tensor']})" if w["max_abs"] else "")
        )
        for side, names in (("A", w["only_in_a"]), ("B", w["only_in_b"])):
            if names:
                out.print(f"[red]only in {side} (or of another shape):[/] {escape(', '.join(names[:8]))}{' ...' if len(names) > 8 else ''}")
    if r["layers"]:
        criterion = r.get("criterion") or f"tolerance {r['tolerance']:g} on logits/pre-logits, rtol {r['rtol']:g} elsewhere"
        t = Table("layer", "max-abs", "max-rel", "rel-rms", "cosine", "status", title=f"Activations ({criterion})")
        for layer in r["layers"]:
            style = "bold red" if layer["name"] == r["first_divergent"] else ("red" if not layer["passed"] else None)
            rel = f"{layer['rel_rms']:.2e}" if "rel_rms" in layer else ""
            t.add_row(
                layer["name"], f"{layer['max_abs']:.2e}", f"{layer['max_rel']:.2e}", rel, f"{layer['cosine']:.8f}",
                "ok" if layer["passed"] else "FAIL", style=style,
            )  # fmt: skip
        out.print(t)
    if "top1" in r:
        out.print(f"logits: top-1 agreement {r['top1']:.1%}, top-5 overlap {r['top5']:.1%}")
    if r.get("roundoff", {}).get("consistent") and not r.get("diagnosis_note") and not r.get("hint"):  # else they say it
        out.print(f"bf16 round-off: the differences are consistent with it: {r['roundoff']['summary']}")
    for p in r.get("problems", []):
        out.print(f"[red]problem:[/] {escape(p)}")
    for d in r.get("diagnosis", []):
        mark = "[green]passes[/]" if d["passed"] else "still fails"
        figure = f" (relative RMS error {d['rel_rms']:.2e}, x{d['ratio']:.2g})" if d.get("rel_rms") is not None else ""
        out.print(f"diagnose: with {escape(d['flip'])} on B: {mark}{figure}")
    if r.get("diagnosis_note"):
        out.print(f"diagnose: {escape(r['diagnosis_note'])}")
    if r["passed"]:
        figures = ", ".join(
            ([f"logits max-abs {r['max_abs']:.2e} <= {r['tolerance']:g}"] if r.get("tolerance") is not None and r.get("max_abs") is not None else [])
            + ([f"worst relative RMS error {r['rel_rms']:.2e} ({r['rel_rms_layer']}) <= {r['rel_tol']:g}"] if r.get("rel_tol") is not None else [])
        ) or "no bar set"  # fmt: skip
        out.print(f"[bold green]PASSED[/]: {figures} ({r['seconds']:.1f} s)")
    else:
        where = f"; first divergent layer: {r['first_divergent']}" if r.get("first_divergent") else ""
        out.print(f"[bold red]FAILED[/]{where}")
        if r.get("hint"):
            err.print(f"Hint: {escape(r['hint'])}")
