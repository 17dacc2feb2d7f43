"""Mesh axes and the one table from logical axis names to mesh axes.

The only file that names mesh axes. Layers declare logical axes where each parameter
is created (`out_sharding=("embed", "heads", "head_dim")`); this table resolves them
with Flax `logical_to_mesh_axes` semantics: rules apply in order, and a mesh axis
already used by an earlier dimension of the same array is skipped.

- data: pure data parallelism (parameters replicated).
- fsdp: data parallelism with parameters sharded over the embedding dimension (ZeRO-3).
- tensor: Megatron-style tensor parallelism over heads and the MLP hidden dimension.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vitctl.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")),  # activations: the batch over every data-parallel axis
    ("embed", "fsdp"),  # D: FSDP shards parameters over the width
    ("heads", "tensor"),  # N
    ("mlp", "tensor"),  # F
    ("head_dim", None),  # K
    ("layers", None),  # L: the stacked-blocks axis
    ("norm", None),  # norm scales: small, replicated
    ("classes", None),
    ("patch", None),
    ("channels", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def parse_mesh(spec: str) -> dict[str, int]:
    """ "data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}; missing axes are 1.

    Each axis may be named once: "data=2,data=4" is refused rather than read as the last
    value (a typo there silently trains on another mesh)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    example = "e.g. --mesh data=2,fsdp=2,tensor=2"
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = (s.strip() for s in part.partition("="))
        if name not in MESH_AXES:
            raise ConfigError(f"unknown mesh axis '{name}' in --mesh '{spec}'", hint=f"mesh axes are {', '.join(MESH_AXES)}, {example}")
        if name in seen:
            raise ConfigError(f"mesh axis '{name}' is given twice in --mesh '{spec}'", hint=f"name each axis once, {example}")
        seen.add(name)
        if not eq or not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise ConfigError(f"mesh axis {name} needs a positive integer size, got '{value}'", hint=example)
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str | dict[str, int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axis types."""
    sizes = parse_mesh(spec) if isinstance(spec, str) else {**dict.fromkeys(MESH_AXES, 1), **spec}
    devices = jax.devices() if devices is None else devices
    n = math.prod(sizes.values())
    if n != len(devices):
        raise ConfigError(
            f"mesh {sizes} needs {n} devices, but {len(devices)} are available",
            hint="make the product of the mesh axis sizes equal the device count",
        )
    # Explicit axis types (jax.make_mesh's default) break reshapes inside the model.
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(axes: tuple[str | None, ...]) -> PartitionSpec:
    """Logical axis names -> PartitionSpec, skipping mesh axes already used in this array."""
    used, out = set(), []
    for name in axes:
        if name is not None and name not in _RULES:
            raise ConfigError(f"logical axis '{name}' has no sharding rule", hint="add it to LOGICAL_AXIS_RULES in model_jax/sharding.py")
        target = _RULES.get(name) if name is not None else None
        target = (target,) if isinstance(target, str) else (target or ())
        target = tuple(a for a in target if a not in used)
        used.update(target)
        out.append(None if not target else target[0] if len(target) == 1 else target)
    return PartitionSpec(*out)


def param_specs(model) -> dict[str, PartitionSpec]:
    """{"blocks/q/kernel": PartitionSpec(None, "fsdp", "tensor", None), ...} for every parameter."""
    specs = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        axes = var.get_metadata().get("out_sharding")
        if axes is None or len(axes) != var.ndim:
            raise ValueError(f"parameter {name} of shape {var.shape} has logical axes {axes}, not one per dimension")
        specs[name] = logical_to_spec(tuple(axes))
    return specs


def check_divisible(model, mesh: Mesh) -> None:
    """Every sharded dimension divides evenly over its mesh axes, or a ConfigError naming it."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = logical_to_spec(tuple(var.get_metadata()["out_sharding"]))
        for dim, (size, axes) in enumerate(zip(var.shape, spec)):
            n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
            if size % n:
                raise ConfigError(
                    f"parameter {'/'.join(map(str, path))} dimension {dim} of size {size} does not divide over mesh axes {axes} ({n} devices)",
                    hint="pick mesh sizes that divide width, heads and mlp_dim",
                )


def shard_model(model, mesh: Mesh):
    """Places every parameter on `mesh` as the rules say (in place; returns the model)."""
    check_divisible(model, mesh)
    state = nnx.state(model, nnx.Param)
    for _, var in nnx.to_flat_state(state):
        spec = logical_to_spec(tuple(var.get_metadata()["out_sharding"]))
        var.set_value(jax.device_put(var[...], NamedSharding(mesh, spec)))
    nnx.update(model, state)
    return model


def batch_sharding(mesh: Mesh, ndim: int = 4) -> NamedSharding:
    """Inputs: the batch dimension over the data-parallel axes, everything else replicated."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1)))
