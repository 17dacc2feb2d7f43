"""How many devices JAX sees on a CPU: set from the mesh before JAX starts.

XLA gives a CPU one device unless `--xla_force_host_platform_device_count=N` is in
XLA_FLAGS when JAX initializes its backend. A user who asks for `--mesh data=2,fsdp=2`
on a laptop means "simulate 4 devices", so `vitctl train` calls `prepare_cpu_devices`
first, before anything imports jax. The flag only shapes the CPU backend: on a GPU or TPU
host it changes nothing about the accelerators. A count the user set in XLA_FLAGS is
never overridden. Stdlib only: this runs before jax is imported.
"""

from __future__ import annotations

import math
import os
import re
import sys

FLAG = "--xla_force_host_platform_device_count"
_SET = re.compile(re.escape(FLAG) + r"=(\d+)")
_chosen: dict[str, int] = {}  # what prepare_cpu_devices set, and from which option


def mesh_device_count(mesh: str | None) -> int | None:
    """The product of a mesh spec's sizes ("data=2,fsdp=4" -> 8), or None when the spec
    does not parse (sharding.parse_mesh reports that later, with its own message)."""
    sizes = []
    for part in filter(None, (p.strip() for p in (mesh or "").split(","))):
        _, eq, value = part.partition("=")
        if not eq or not value.strip().isdigit() or int(value) < 1:
            return None
        sizes.append(int(value))
    return math.prod(sizes)


def user_device_count() -> int | None:
    """The host device count XLA_FLAGS sets, if any."""
    found = _SET.findall(os.environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else None


def prepare_cpu_devices(mesh: str | None, devices: int | None = None, num_processes: int = 1) -> int | None:
    """Before JAX is imported: asks XLA for as many host (CPU) devices as this process's
    share of the mesh needs, or `devices`. Returns the count it set, or None when it set
    nothing: one device is enough, XLA_FLAGS already names a count, or jax is already
    imported (its backend may be initialized; shortfall_hint then names the setting)."""
    if devices is not None and devices < 1:
        from vitctl.errors import ConfigError

        raise ConfigError(
            f"--devices must be at least 1, got {devices}", hint="e.g. --devices 8, or leave it out to take the count from --mesh"
        )
    option = "--devices"
    if devices is None:
        option, total = "--mesh", mesh_device_count(mesh)
        devices = -(-total // max(num_processes, 1)) if total else None
    if not devices or devices <= 1 or user_device_count() is not None or "jax" in sys.modules:
        return None
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}={devices}".strip()
    _chosen.clear()
    _chosen[option] = devices
    return devices


def shortfall_hint(needed: int, available: int) -> str:
    """What to do when a mesh needs `needed` devices and JAX sees `available`."""
    import jax

    if jax.default_backend() != "cpu":
        return (
            f"this host has {available} {jax.default_backend()} devices: make the mesh smaller (its sizes multiply to at most {available})"
        )
    user = user_device_count()
    if "--devices" in _chosen and user == _chosen["--devices"] and user < needed:
        return f"--devices {user} is fewer than the mesh needs: give --devices {needed} or more, or make the mesh smaller"
    if user is not None and user < needed:
        return f"XLA_FLAGS sets {FLAG}={user}: raise it to {needed}, or make the mesh smaller"
    return (
        f"on CPU, vitctl train sets {FLAG} from --mesh (or --devices) before JAX starts; from Python, "
        f"set XLA_FLAGS={FLAG}={needed} before importing jax, or make the mesh smaller"
    )
