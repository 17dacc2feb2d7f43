"""ruff's lint and format checks over the whole repository, with the one config in pyproject.toml."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(args):
    p = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"ruff {' '.join(args)} failed (run it to fix):\n{p.stdout}{p.stderr}"
