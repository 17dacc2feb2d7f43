"""Fixtures of the inference commands' tests: the in-process CLI runner of tests/cli."""

from tests.cli.conftest import cli  # noqa: F401
