"""Distributed set-up for `vitctl train`: joining JAX's runtime, the mesh, barriers, each process's rows.

- init_distributed: jax.distributed with Gloo collectives on CPU, so processes on one
  machine train exactly as the hosts of a pod would.
- mesh_for / check_batch: the (data, fsdp, tensor) mesh of a --mesh spec over every
  process's devices, and a batch size that splits over data x fsdp.
- sync / any_process: a barrier, and one value agreed by all processes (a signal to any
  process stops all at the same step; a refusal by any is a refusal by all).
- process_rows: the slice of every global batch that this process loads, read from the
  batch sharding.
"""

from __future__ import annotations

import math

import numpy as np

from vitctl.errors import ConfigError


def mesh_for(spec: str):
    import jax

    from vitctl.devices import shortfall_hint
    from vitctl.model_jax.sharding import make_mesh, parse_mesh

    sizes = parse_mesh(spec or "")
    n = math.prod(sizes.values())
    if n > jax.device_count():
        raise ConfigError(
            f"mesh {spec!r} needs {n} devices, but {jax.device_count()} are available", hint=shortfall_hint(n, jax.device_count())
        )
    if jax.process_count() > 1 and n != jax.device_count():
        raise ConfigError(
            f"mesh {spec!r} has {n} devices, but the {jax.process_count()} processes have {jax.device_count()} together",
            hint=f"with several processes the mesh spans all devices, e.g. --mesh data={jax.device_count()}",
        )
    return make_mesh(sizes, devices=jax.devices()[:n])


def check_batch(batch_size: int, mesh) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ConfigError(
            f"batch size {batch_size} does not divide over data x fsdp = {n} devices",
            hint=f"use a batch size that is a multiple of {n}",
        )


def init_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    timeout_s: int = 300,
) -> bool:
    """Joins JAX's distributed runtime (before any JAX computation); returns whether it did.

    Nothing set and not `auto`: a single-process run. Otherwise jax.distributed.initialize
    with what is given; JAX detects the rest (JAX_COORDINATOR_ADDRESS, Cloud TPU, SLURM, Open
    MPI, Kubernetes). On CPU the processes' collectives run over Gloo (TCP), so two processes
    on one machine (coordinator 127.0.0.1:PORT) train exactly as two hosts of a pod would.
    """
    import jax

    if not auto and coordinator is None and num_processes is None and process_id is None:
        return False
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is not in [0, {num_processes})", hint="process ids run from 0 to num_processes - 1")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s)
    except (RuntimeError, ValueError, TypeError) as e:  # JAX's words for: incomplete settings, already started, no coordinator
        raise ConfigError(
            f"cannot join the JAX distributed runtime: {e}",
            hint="give --coordinator HOST:PORT --num-processes N --process-id I to every process (process 0 runs the "
            "coordinator), before anything else uses JAX; or run on a cluster JAX detects (Cloud TPU, SLURM, Open MPI)",
        ) from None
    return True


_SYNCS = [0]


def sync(name: str) -> None:
    """A barrier across processes (nothing in a single-process run).

    Through the distributed runtime's coordination service (gRPC, minutes of timeout), not
    a device collective: Gloo gives up connecting after a fixed, short wait, so processes
    meet here before they run collectives from far-apart points (one still compiling).
    """
    import jax

    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        _SYNCS[0] += 1  # every process makes the same calls in the same order: unique, matching names
        multihost.get_barrier_sync_fn()(key=f"{name}-{_SYNCS[0]}", timeout_ms=600_000)


def any_process(value: int) -> int:
    """The largest of `value` over all processes (every process gets the same answer)."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def process_rows(sharding, batch_size: int) -> tuple[int, int]:
    """(index, count): this process feeds slice `index` of `count` equal, contiguous slices of each global batch.

    Read from the batch sharding: the rows its addressable devices hold. One process: (0, 1);
    data x fsdp spanning the processes in order: (process_index, process_count); a batch
    replicated over processes: (0, 1) on each.
    """
    rows = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                   for s in sharding.addressable_devices_indices_map((batch_size,)).values()})  # fmt: skip
    lo, hi = rows[0][0], max(r[1] for r in rows)
    covered = lo
    for a, b in rows:
        if a > covered:
            break
        covered = max(covered, b)
    n = hi - lo
    if covered != hi or batch_size % n or lo % n:
        raise ConfigError(
            f"this process's devices hold rows {rows} of the batch: not one contiguous equal slice",
            hint="order the mesh so that each process's devices are consecutive along data x fsdp",
        )
    return lo // n, batch_size // n
