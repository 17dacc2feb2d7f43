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
from typing import Annotated

import typer
from rich.text import Text

from vitctl.cli._options import err
from vitctl.errors import VitctlError

HELP = "Toolkit and checkpoint converter for ViT-22B-style Vision Transformers (JAX and PyTorch)."
# Command -> (module under vitctl.cli, group name or None for top-level commands), in --help order.
COMMANDS: dict[str, tuple[str, str | None]] = {
    "models": ("models", None), "info": ("models", None), "init": ("models", None), "verify": ("verify", None),
    "demo": ("demo", None), "plan": ("plan", None), "train": ("train", None), "probe": ("probe", None),
    "eval": ("eval", None), "predict": ("predict", None), "embed": ("embed", None), "export": ("export", None),
    "bench": ("bench", None), "convert": ("convert", "convert"), "hub": ("hub", "hub"),
    "data": ("data", "data"),
}  # fmt: skip


def build_app(modules: list[str] | None = None) -> typer.Typer:
    """The Typer app with the commands of `modules` (default: all). main() builds only the
    invoked command's module: building every command costs ~0.1 s at each start."""
    import importlib

    app = typer.Typer(
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        help=HELP,
    )
    app.callback()(_group)  # a group even with one command: `vitctl verify A B` keeps its command name
    for module in dict.fromkeys(m for m, _ in COMMANDS.values()):
        if modules is None or module in modules:
            group = next(g for m, g in COMMANDS.values() if m == module)
            app.add_typer(importlib.import_module(f"vitctl.cli.{module}").commands, name=group)
    return app


def _version(value: bool) -> None:
    if value:
        from vitctl import __version__  # vitctl/__init__.py holds only the version: imports nothing

        typer.echo(f"vitctl {__version__}")
        raise typer.Exit()


def _group(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version of vitctl and exit.")
    ] = False,
) -> None:
    pass


def __getattr__(name: str):
    if name == "app":  # the full app, built on first use (tests, completion)
        globals()["app"] = build_app()
        return globals()["app"]
    raise AttributeError(name)


# Exception type -> (exit code, message or None for the exception's own, hint), most specific
# first. VitctlError carries its own. Readers of untrusted files refuse too-deep or too-large
# input themselves, naming the file; these are the backstop for any that is missed.
ERROR_MAPPINGS: tuple[tuple[type[BaseException], int, str | None, str], ...] = (
    (MemoryError, 1, "out of memory", "the model or input does not fit in this machine's memory; try a smaller preset, see `vitctl plan`"),
    (RecursionError, 1, "an input nests too deeply to read (RecursionError)",
     "a file given to vitctl (a config, an index, a header) is damaged or hostile; rerun with VITCTL_DEBUG=1 to see which"),
    (OSError, 1, None, "check the path, its permissions and the free disk space"),
    (Exception, 1, None, "this is a bug in vitctl; rerun with VITCTL_DEBUG=1 for the traceback and report it"),
)  # fmt: skip


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
    args = sys.argv[1:] if argv is None else argv
    only = [COMMANDS[args[0]][0]] if args and args[0] in COMMANDS else None  # else: --help, a typo: every command
    try:
        build_app(only)(args=args, prog_name="vitctl")
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
    except Exception as e:  # noqa: BLE001  (mapped to an exit code and a hint)
        if debug:
            traceback.print_exc()
        code, what, hint = next((c, m, h) for t, c, m, h in ERROR_MAPPINGS if isinstance(e, t))
        _report(what or (str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"), hint)
        sys.exit(code)
