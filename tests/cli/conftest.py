"""Shared by the CLI tests: run the real `main()` in-process."""

from typing import NamedTuple

import pytest

from vitctl.cli import main


class Result(NamedTuple):  # unpacks as (returncode, stdout, stderr)
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Runs `main()` in-process (same error mapping and streams as the console script, no interpreter start-up)."""

    def call(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(e.value.code, out, err)

    return call
