"""The rows of a benchmark report (name, value, unit, baseline, ratio, note) and their tables."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable


@dataclasses.dataclass
class Row:
    name: str
    value: float | None  # None: not measured (see note)
    unit: str
    baseline: str | None = None  # the name of another row
    ratio: float | None = None  # value / the baseline row's value
    note: str = ""

    def as_dict(self) -> dict:
        r = lambda x: None if x is None else float(f"{x:.6g}")
        return {
            "name": self.name,
            "value": r(self.value),
            "unit": self.unit,
            "baseline": self.baseline,
            "ratio": r(self.ratio),
            "note": self.note,
        }


def link(rows: list[Row]) -> list[Row]:
    """Fills each row's ratio = value / its baseline row's value (None where either is missing)."""
    by_name = {r.name: r for r in rows}
    for r in rows:
        base = by_name.get(r.baseline) if r.baseline else None
        ok = base is not None and r.value is not None and base.value
        r.ratio = r.value / base.value if ok else None
    return rows


def fmt_value(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def table(title: str, columns: list[str], rows: Iterable[Iterable[str]], left: tuple[int, ...] = (0,)):
    """A Rich table, rows as strings; the columns numbered in `left` left-aligned, the others right."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i in left else "right", no_wrap=i == 0)
    for r in rows:
        t.add_row(*map(str, r))
    return t


def print_table(title: str, columns: list[str], rows: Iterable[Iterable[str]], file=None) -> None:
    """table() printed wide enough not to wrap (to stdout by default)."""
    from rich.console import Console

    Console(file=file or sys.stdout, width=250, highlight=False).print(table(title, columns, rows))


def short_baseline(row: Row) -> str:
    """The baseline's name without the words it shares with the row's at the start
    ("forward classic B/16 fp32 b8 timm" next to "forward classic B/16 fp32 b8 vitctl-torch": "timm")."""
    if not row.baseline:
        return ""
    ours, theirs = row.name.split(" "), row.baseline.split(" ")
    n = 0
    while n < min(len(ours), len(theirs)) - 1 and ours[n] == theirs[n]:
        n += 1
    return " ".join(theirs[n:])


def rows_table(title: str, rows: list[Row], notes: bool = True):
    """The bench table: name, value, unit, baseline (shortened), ratio and, with `notes`, each
    row's note. Without notes the name and baseline columns may wrap, so it fits 80 columns."""
    columns = ["name", "value", "unit", "vs", "ratio"] + (["note"] if notes else [])
    t = table(
        title,
        columns,
        (
            [r.name, fmt_value(r.value), r.unit, short_baseline(r), "-" if r.ratio is None else f"{r.ratio:.2f}", r.note][: len(columns)]
            for r in rows
        ),
        left=(0, 2, 3, 5),
    )
    if not notes:
        t.columns[0].no_wrap = False
        for c in t.columns[1:]:
            c.no_wrap = c.header in ("value", "unit", "ratio")  # numbers and units never break
    return t
