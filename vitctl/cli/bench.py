"""`vitctl bench`: throughput of vitctl's models on this hardware, against timm and the GEMM peak.

One table, all measured in one run (vitctl/bench.py documents what each row measures
and what --quick changes). --json prints one object: {"rows": [{"name", "value", "unit",
"baseline", "ratio", "note"}, ...], "mode", "machine", "load", "notes"}; a row's ratio
is its value / the value of the row its baseline names. Progress goes to stderr.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from vitctl.bench import SECTIONS  # stdlib-only module: --help stays light
from vitctl.cli._options import JsonOpt, err, out, print_json
from vitctl.errors import ConfigError

commands = typer.Typer()

BENCH_EXAMPLES = """Examples:

  vitctl bench --quick

  vitctl bench --json > bench.json
"""


@commands.command("bench", epilog=BENCH_EXAMPLES)
def bench(
    quick: Annotated[
        bool,
        typer.Option("--quick", help="S/16 instead of B/16, batches 1 and 8, one timed round, shorter GEMM probes (under 2 minutes)."),
    ] = False,
    only: Annotated[
        str,
        typer.Option("--only", help=f"Comma-separated parts to run (default: all): {', '.join(SECTIONS)}.", show_default=False),
    ] = ",".join(SECTIONS),
    tiny: Annotated[
        bool, typer.Option("--tiny", hidden=True, help="Tiny models, one round: checks that it runs; figures mean nothing.")
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Measure vitctl's speed on this machine against timm and the GEMM peak, in one table."""
    from vitctl import bench as lib

    sections = [s.strip() for s in only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise ConfigError(f"unknown --only part(s): {', '.join(unknown) or '(none given)'}", hint=f"pick from: {', '.join(SECTIONS)}")
    mode = "tiny" if tiny else "quick" if quick else "full"
    report = lib.run(mode, sections, log=lambda msg: err.print(msg, markup=False, highlight=False))
    if json:
        print_json(report.as_dict())
        return
    title = f"vitctl bench ({mode}): {report.machine['cpu']}"
    wide = Console(file=sys.stdout, width=max(out.width, 180), highlight=False)  # a pipe's 80 columns would cut the ratios off
    wide.print(lib.rows_table(title, report.rows))
    for note in report.notes:
        wide.print(f"note: {note}", markup=False, soft_wrap=True)
    wide.print(f"load: {report.load['describe']}", markup=False, soft_wrap=True)
