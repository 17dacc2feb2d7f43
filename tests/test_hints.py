"""Every flag that a hint tells the user to pass exists on some vitctl command.

Hints are the next thing a user types: a hint naming `--test-fraction` when the option is
spelled otherwise sends them to a usage error. The test reads the source (ast), so it sees
every hint, including those of errors no other test provokes: the string literals given as
`hint=` (f-string parts included), those of module constants named `*HINT*` that hints
use, and any literal that contains "Hint:". Each `--flag` in them must be an option of a
command of the real app (vitctl.cli.build_app()).
"""

import ast
import re
from pathlib import Path

import click
import typer

from vitctl.cli import build_app

VITCTL = Path(__file__).parents[1] / "vitctl"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def strings(node: ast.AST) -> list[str]:
    """Every string constant inside `node` (the literal parts of f-strings included)."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def hint_texts() -> list[tuple[str, int, str]]:
    """(file, line, text) of every hint literal under vitctl/."""
    out = []
    for path in sorted(VITCTL.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(VITCTL.parent).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "hint":
                out += [(rel, node.value.lineno, s) for s in strings(node.value)]
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and "HINT" in t.id for t in node.targets):
                out += [(rel, node.lineno, s) for s in strings(node.value)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "Hint:" in node.value:
                out.append((rel, node.lineno, node.value))
    return out


def app_flags() -> set[str]:
    """Every option of every command and group of the app (--help included)."""
    flags = set()

    def walk(cmd: click.Command) -> None:
        for p in cmd.params:
            flags.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(build_app()))
    return flags | {"--help"}


def test_the_scan_sees_the_hints():
    texts = hint_texts()
    assert len(texts) > 50  # every module's hints, not a broken walk
    assert any("--force" in t for _, _, t in texts)  # checkpoint.check_output's
    flags = app_flags()
    assert {"--force", "--out", "--tolerance", "--resume", "--json"} <= flags


# `torchrun --nproc-per-node N -m vitctl ...`: the options before `-m vitctl` are torchrun's, not vitctl's.
TORCHRUN = re.compile(r"torchrun(?:\s+--[a-z][a-z0-9-]*(?:[= ]\w+)?)*\s+-m\s+vitctl")


def test_every_flag_in_a_hint_exists():
    flags = app_flags()
    texts = [(file, line, TORCHRUN.sub("vitctl", text)) for file, line, text in hint_texts()]
    missing = sorted({f"{file}:{line}: {flag}" for file, line, text in texts for flag in FLAG.findall(text) if flag not in flags})
    assert not missing, "hints name flags that no vitctl command has:\n" + "\n".join(missing)


def test_every_command_in_a_hint_exists():
    # `vitctl NAME` in backquotes is a command line to type (not prose like "vitctl reads ...").
    app = typer.main.get_command(build_app())
    missing = sorted(
        f"{file}:{line}: vitctl {name}" for file, line, text in hint_texts() for name in re.findall(r"`vitctl ([a-z][a-z-]*)", text)
        if name not in app.commands
    )  # fmt: skip
    assert not missing, "hints name commands that vitctl does not have:\n" + "\n".join(missing)
