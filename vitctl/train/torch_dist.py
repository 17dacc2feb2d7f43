"""Processes and sharding for `vitctl train --backend torch`: the process group, FSDP2, barriers.

- init: joins a torch.distributed process group. Under torchrun (RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT in the environment) or with vitctl's own --coordinator
  HOST:PORT --num-processes N --process-id I; alone, a world of one in memory (no port).
  Gloo on CPU, NCCL on GPU (one device per process: cuda:LOCAL_RANK).
- shard: FSDP2 (fully_shard) on every block, then on the root, so each block's parameters
  are gathered just before it runs and freed after (alone: the plain model); with remat, each block's forward runs
  under torch.utils.checkpoint (use_reentrant=False) inside its FSDP unit, so the recompute
  in the backward pass finds its parameters gathered.
- any_process / mean / total / sync: one value agreed by all processes (a signal to any
  process stops all at the same step), and a barrier.

Parameters are initialised whole on every process from the same seed, then sharded: each
process keeps its slice (sharded random init would repeat values across shards).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from vitctl.errors import ConfigError

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for each process
TIMEOUT_S = 600  # a barrier waits this long for a process still loading or compiling


def init(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the group): joins (or reuses) the process group.

    The environment of torchrun wins over the flags; with neither, a world of one over an
    in-memory store. A group started here is ended by `close`.
    """
    import datetime

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    if all(k in os.environ for k in ENV):
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        kw = {"init_method": "env://"}
    elif coordinator is not None or num_processes is not None or process_id is not None:
        if coordinator is None or num_processes is None or process_id is None:
            raise ConfigError(
                "several processes need all of --coordinator HOST:PORT, --num-processes N and --process-id I",
                hint="or launch with torchrun --nproc-per-node N -m vitctl train --backend torch ...",
            )
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"process id {process_id} is not in [0, {num_processes})", hint="process ids run from 0 to num_processes - 1")
        rank, world = process_id, num_processes
        kw = {"init_method": f"tcp://{coordinator}"}
    else:
        rank, world = 0, 1
        kw = {"store": dist.HashStore()}
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kw)
    except (RuntimeError, ValueError) as e:  # no coordinator, a port in use, a timeout
        raise ConfigError(
            f"cannot join the torch process group: {e}",
            hint="launch every process with torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or give each "
            "--coordinator HOST:PORT --num-processes N --process-id I",
        ) from None
    return rank, world, True


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shard(model: nn.Module, remat: bool = False) -> nn.Module:
    """FSDP2 over all processes: each block is one unit (gathered for its forward and backward), the root another.

    Alone (a world of one) the model stays as it is: sharding over one process only adds copies."""
    from torch.distributed.fsdp import fully_shard
    from torch.utils.checkpoint import checkpoint

    # The ViT returns its named intermediates beside the logits (views among them); the
    # training step never changes them in place, which is what FSDP's warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in model.blocks:
        if remat:
            inner = block.forward
            block.forward = lambda x, inner=inner: checkpoint(inner, x, use_reentrant=False)
        if world() > 1:
            fully_shard(block)
    if world() > 1:
        fully_shard(model)
    return model


def world() -> int:
    """The number of processes (1 without a process group: the step functions run on a plain model too)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def _reduce(value: float, op) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def any_process(value: int) -> int:
    """The largest of `value` over all processes (every process gets the same answer)."""
    return value if world() == 1 else int(_reduce(value, dist.ReduceOp.MAX))


def total(value: float) -> float:
    """The sum of `value` over all processes."""
    return value if world() == 1 else _reduce(value, dist.ReduceOp.SUM)


def mean(value: float) -> float:
    """The mean of `value` over all processes (each holds an equal share of the batch)."""
    return value if world() == 1 else total(value) / world()


def maximum(value: float) -> float:
    return value if world() == 1 else _reduce(value, dist.ReduceOp.MAX)


def sync() -> None:
    """A barrier across processes (nothing alone)."""
    if world() > 1:
        dist.barrier()
