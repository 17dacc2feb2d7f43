"""vitctl/train/ reads in short pieces: no function (method, nested function) is over 60 lines."""

import ast
from pathlib import Path

import vitctl.train

MAX_LINES = 60


def test_no_function_over_60_lines():
    long = []
    for path in sorted(Path(vitctl.train.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
