"""The vitctl command line: a Typer app of thin commands, and `main()` with the error mapping.

Results go to stdout, progress and hints to stderr; `--json` prints one JSON object
on stdout and nothing else. Exit codes: 0 success, 1 failed operation, 2 usage or
config error, 130 interrupted. Errors print `Error: <what>` plus a hint line; the
traceback only with VITCTL_DEBUG=1. Importing this package (and so `vitctl --help`)
loads neither jax nor torch: commands import them in their bodies.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.text import Text

from vitctl.cli import bench, convert, demo, hub, models, plan, probe, train, verify
from vitctl.cli._options import err
from vitctl.errors import VitctlError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Toolkit and checkpoint converter for ViT-22B-style Vision Transformers (JAX and PyTorch).",
)
app.add_typer(models.commands)  # no name: models, info, init are top-level commands
app.add_typer(verify.commands)  # `vitctl verify`
app.add_typer(demo.commands)  # `vitctl demo`
app.add_typer(plan.commands)  # `vitctl plan`
app.add_typer(train.commands)  # `vitctl train`
app.add_typer(probe.commands)  # `vitctl probe`
app.add_typer(bench.commands)  # `vitctl bench`
app.add_typer(convert.commands, name="convert")
app.add_typer(hub.commands, name="hub")

# Exception type -> (exit code, hint), most specific first. VitctlError carries its own.
ERROR_MAPPINGS: tuple[tuple[type[BaseException], int, str], ...] = (
    (MemoryError, 1, "the model does not fit in this machine's memory; try a smaller preset"),
    (OSError, 1, "check the path, its permissions and the free disk space"),
    (Exception, 1, "this is a bug in vitctl; rerun with VITCTL_DEBUG=1 for the traceback and report it"),
)


class Interrupted(Exception):
    """Raised by a command that a signal stopped after it saved something: main() prints
    `Interrupted: <message>` (what was saved) instead of "nothing was written", and exits `code`."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


def _report(message: str, hint: str | None) -> None:
    err.print(Text.assemble(("Error: ", "bold red"), message), soft_wrap=True)
    if hint:
        err.print(Text(f"Hint: {hint}", style="dim"), soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Runs the app; maps exceptions to `Error: ...` + hint on stderr and an exit code."""
    debug = os.environ.get("VITCTL_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, prog_name="vitctl")
    except SystemExit as e:
        if e.code == 130:  # Typer turns a KeyboardInterrupt inside a command into exit 130
            err.print("Interrupted: nothing was written.", soft_wrap=True)
        raise
    except KeyboardInterrupt:
        err.print("Interrupted: nothing was written.", soft_wrap=True)
        sys.exit(130)
    except Interrupted as e:
        err.print(f"Interrupted: {e}", soft_wrap=True, markup=False)
        sys.exit(e.code)
    except VitctlError as e:
        if debug:
            traceback.print_exc()
        _report(e.message, e.hint)
        sys.exit(e.exit_code)
    except Exception as e:
        if debug:
            traceback.print_exc()
        code, hint = next((c, h) for t, c, h in ERROR_MAPPINGS if isinstance(e, t))
        what = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        _report(what, hint)
        sys.exit(code)
