"""The rules of ARCHITECTURE.md, checked on the source: who may import whom, and the size of a piece.

Each rule names the layer it guards. A failure lists the offending imports (or files and
functions), so the fix is to move the code to the layer it belongs to, not to widen a rule.
"""

import ast
from pathlib import Path

from tests.test_imports import ROOT, imported, module_names

REPO = ROOT.parent
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60

LEAVES = {"vitctl", "vitctl.errors", "vitctl.untrusted", "vitctl.units", "vitctl.background", "vitctl.devices"}
DEFINITION = {"vitctl.config", "vitctl.params", "vitctl.posemb"}
APPS = (
    "vitctl.open",
    "vitctl.verify",
    "vitctl.probe",
    "vitctl.infer",
    "vitctl.init",
    "vitctl.train",
    "vitctl.bench",
    "vitctl.cli",
    "vitctl.convert.convert",
)
# Reading a checkpoint: the names that open one. Apps reach them only through vitctl.open.
READERS = {
    "SafetensorsReader",
    "OrbaxReader",
    "NpzReader",
    "open_npz",
    "read_safetensors_header",
    "detect_format",
    "detect_formats",
    "load_jax",
    "load_torch",
    "read_checkpoint_config",
    "resolve_checkpoint",
}
DOOR_USERS = (
    "vitctl.verify",
    "vitctl.probe",
    "vitctl.infer",
    "vitctl.convert.convert",
    "vitctl.cli",
    "vitctl.train",
    "vitctl.bench",
    "vitctl.init",
)


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def breaking(layer: tuple[str, ...], allowed: set[str], own: bool = True) -> dict[str, list[str]]:
    """For each module of `layer`, the vitctl modules it imports outside `allowed` (and its own package)."""
    found = {}
    for name, deps in graph().items():
        if not under(name, *layer):
            continue
        package = next(p for p in layer if under(name, p))
        bad = sorted(d for d in deps if d not in allowed and not (own and under(d, package)))
        if bad:
            found[name] = bad
    return found


def test_the_definition_imports_only_leaves():
    assert breaking(("vitctl.config", "vitctl.params", "vitctl.posemb"), LEAVES | DEFINITION) == {}


def test_models_import_only_the_definition():
    """The twins see the config, the parameter table and the position embeddings, nothing that reads files."""
    assert breaking(("vitctl.model_jax", "vitctl.model_torch"), DEFINITION | {"vitctl.errors"}) == {}


def test_formats_import_no_app():
    """A format knows files, names and arrays: not conversion, the Hub, a command or an app."""
    assert breaking(("vitctl.formats",), LEAVES | DEFINITION) == {}


def test_lower_layers_import_no_app():
    lower = ("vitctl.config", "vitctl.params", "vitctl.posemb", "vitctl.formats", "vitctl.hub", "vitctl.data", "vitctl.checkpoint")
    lower += ("vitctl.convert.mapping", "vitctl.convert.big_vision", "vitctl.convert.timm", "vitctl.model_jax", "vitctl.model_torch")
    bad = {}
    for name, deps in graph().items():
        if under(name, *lower) and (apps := sorted(d for d in deps if under(d, *APPS))):
            bad[name] = apps
    assert bad == {}


def reader_uses(path: Path) -> list[str]:
    """The READERS names that a module imports or reaches as an attribute (`io.OrbaxReader`)."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            uses += [f"{node.lineno}: import {a.name}" for a in node.names if a.name in READERS]
        elif isinstance(node, ast.Attribute) and node.attr in READERS:
            uses.append(f"{node.lineno}: .{node.attr}")
    return uses


def test_apps_open_checkpoints_through_the_door():
    """verify, probe, convert, train, init, bench and the commands open a checkpoint with
    vitctl.open (open_checkpoint, locate, detect), never with a format's reader directly."""
    modules = module_names()
    bad = {name: uses for name, path in modules.items() if under(name, *DOOR_USERS) and (uses := reader_uses(path))}
    assert bad == {}
    assert reader_uses(modules["vitctl.open"]), "the door itself uses the readers (the check sees them)"


def python_files() -> list[Path]:
    return sorted([*ROOT.rglob("*.py"), *(REPO / "bench").rglob("*.py")])


def test_no_file_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in python_files() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def test_no_function_over_60_lines():
    """Functions, methods and nested functions, signature and decorators included, in vitctl/ and bench/."""
    long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (lines := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
