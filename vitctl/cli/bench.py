"""`vitctl bench`: throughput of vitctl's models on this hardware, against timm and the GEMM peak.

One table, all measured in one run (vitctl/bench/__init__.py documents what each row measures
and what --quick changes). --json prints one object: {"rows": [{"name", "value", "unit",
"baseline", "ratio", "note"}, ...], "mode", "machine", "load", "notes", "interrupted"}; a row's ratio
is its value / the value of the row its baseline names; "interrupted" names the section
a Ctrl-C or SIGTERM stopped (null when it ran to the end). Progress goes to stderr. An
interrupted run prints the rows measured so far (table or --json) and exits 130.
"""

from __future__ import annotations

from typing import Annotated

import typer

from vitctl.bench import SECTIONS  # imports neither jax nor torch: --help stays light
from vitctl.cli._options import JsonOpt, err, out, print_json
from vitctl.errors import ConfigError
from vitctl.untrusted import sigterm_as_interrupt

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
    from vitctl.cli import Interrupted

    sections = [s.strip() for s in only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise ConfigError(f"unknown --only part(s): {', '.join(unknown) or '(none given)'}", hint=f"pick from: {', '.join(SECTIONS)}")
    mode = "tiny" if tiny else "quick" if quick else "full"
    with sigterm_as_interrupt():  # SIGTERM, like Ctrl-C, ends the run with the rows measured so far
        report = lib.run(mode, sections, log=lambda msg: err.print(msg, markup=False, highlight=False))
        if json:
            print_json(report.as_dict())
        else:
            # At the terminal's width (80 columns in a pipe): short columns; each row's note only in --json.
            out.print(lib.rows_table(f"vitctl bench ({mode}): {report.machine['cpu']}", report.rows, notes=False))
            for note in report.notes:
                out.print(f"note: {note}", markup=False, highlight=False)
            out.print(f"load: {report.load['describe']}", markup=False, highlight=False)
            out.print("each row's details (shapes, compile times, timm model): --json", markup=False, highlight=False)
        if report.interrupted:
            raise Interrupted(f"stopped during {report.interrupted}; the {len(report.rows)} rows measured before it are above")
