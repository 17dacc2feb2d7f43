"""vitctl's modules import one another without circles (module-level and function-level imports alike).

An import inside a function still ties the two modules together: a circle through one only
waits for the first call to fail, or to read a half-initialised module.
"""

import ast
from pathlib import Path

import vitctl

ROOT = Path(vitctl.__file__).parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The vitctl modules that `name` imports anywhere in its file (`from pkg import mod` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {m for m in found if m in modules and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    modules = module_names()
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    assert graph["vitctl.train.loop"] >= {"vitctl.train.state", "vitctl.train.step"}  # the walk sees imports
    assert cycles(graph) == []


def test_commands_import_no_other_command():
    """A command module under vitctl/cli/ imports no other command module (shared pieces live in
    vitctl/cli/_*.py or the library); `vitctl.cli` itself is the app that runs them."""
    modules = module_names()
    commands = {n for n in modules if n.startswith("vitctl.cli.") and not n.rpartition(".")[2].startswith("_")}
    assert {"vitctl.cli.train", "vitctl.cli.demo", "vitctl.cli.verify"} <= commands
    crossing = {c: sorted(imported(c, modules[c], modules) & commands) for c in commands}
    assert not {c: m for c, m in crossing.items() if m}, crossing
