"""vitctl.devices: the CPU host device count, set from the mesh before JAX starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitctl import devices
from vitctl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("mesh", "count"), [("data=2,fsdp=2,tensor=2", 8), ("fsdp=4", 4), ("", 1), (None, 1), ("data=x", None), ("data", None)]
)
def test_mesh_device_count(mesh, count):
    assert devices.mesh_device_count(mesh) == count


def test_user_setting_is_read(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=3")
    assert devices.user_device_count() == 3
    monkeypatch.setenv("XLA_FLAGS", "")
    assert devices.user_device_count() is None


def test_nothing_is_set_once_jax_is_imported(monkeypatch):
    import jax  # noqa: F401  (the test process has imported it: the backend may be up)

    monkeypatch.setenv("XLA_FLAGS", "")
    assert devices.prepare_cpu_devices("data=2,fsdp=2") is None and os.environ["XLA_FLAGS"] == ""


def test_bad_device_count_is_a_usage_error():
    with pytest.raises(ConfigError, match="at least 1"):
        devices.prepare_cpu_devices(None, devices=0)


def _devices_seen(*call: str, xla_flags: str = "") -> str:
    """A fresh interpreter: prepare_cpu_devices(*call), then import jax and count devices."""
    code = f"from vitctl import devices; set = devices.prepare_cpu_devices({', '.join(call)}); import jax; print(set, jax.device_count())"
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()


def test_jax_sees_the_mesh_devices():
    assert _devices_seen("'data=2,fsdp=2,tensor=2'") == ["8", "8"]
    assert _devices_seen("'data=4'", "num_processes=2") == ["2", "2"]  # each process holds its share
    assert _devices_seen("None", "devices=3") == ["3", "3"]
    assert _devices_seen("'data=4'", xla_flags="--xla_force_host_platform_device_count=2") == ["None", "2"]  # the user's count wins


def test_shortfall_hint_names_the_setting(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert "raise it to 8" in devices.shortfall_hint(8, 2)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=16 before importing jax" in devices.shortfall_hint(16, 8)


def test_shortfall_hint_after_a_small_devices_option(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(devices, "_chosen", {})
    jax = sys.modules.pop("jax")  # as before JAX starts
    try:
        assert devices.prepare_cpu_devices("data=4", devices=2) == 2
    finally:
        sys.modules["jax"] = jax
    assert devices.shortfall_hint(4, 2).startswith("--devices 2 is fewer than the mesh needs")
