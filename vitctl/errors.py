"""Errors that reach the user. Each carries a hint: the next thing to try.

The CLI maps these to `Error: <message>` plus the hint on stderr and the exit code
on the class (2 for usage and config errors, 1 for failed operations).
"""

from __future__ import annotations


class VitctlError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(VitctlError):
    """An invalid model config, preset name or config file (a usage error)."""

    exit_code = 2


class CheckpointError(VitctlError):
    """A checkpoint that cannot be read: missing files, corrupt data, wrong shapes."""


class UnmappedParamError(CheckpointError):
    """A tensor that no mapping rule accounts for, or a rule whose tensor is missing."""


class OutputExistsError(VitctlError):
    """A destination that already exists; nothing is overwritten without --force."""

    exit_code = 2


class OutputError(VitctlError):
    """An output that cannot be created: a parent that is read-only, missing permissions."""


class MissingDependencyError(VitctlError):
    """An optional framework (jax, torch, timm) that this command needs is not installed."""


class DataError(VitctlError):
    """A data source that cannot be used: missing, empty or corrupt, or inconsistent with the model."""


class ResourceError(VitctlError):
    """Work that would exhaust this machine's memory or disk, refused before it starts (with the numbers)."""
