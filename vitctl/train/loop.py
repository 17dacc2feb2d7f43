"""The JAX training loop behind `vitctl train`: sharded, checkpointed, exactly resumable.

- Parameters (fp32, or cfg.param_dtype) and optimizer state live on a (data, fsdp, tensor)
  mesh, sharded by the logical-axis rules of model_jax/sharding.py; optimizer-state
  leaves get their parameter's sharding (factored Adafactor moments drop the factored
  axis). The batch is split over data x fsdp. One jax.jit step with explicit
  in/out shardings and the train state donated.
- Compute dtype and remat come from the model config (cfg.dtype, cfg.remat); logits and
  the loss are float32.
- State: OUT/state/ (vitctl.train.state), every --save-every steps, at the end, and on
  SIGTERM/SIGINT. Each save also refreshes OUT/params/ + OUT/config.json (the standard
  checkpoint layout, so `vitctl convert` / `verify` read OUT as it is).
- Resume restores into an abstract target built for the current mesh, so a run can move
  to another mesh shape; the data iterator's state is restored too, so on one machine
  the resumed losses are bit-identical to an uninterrupted run.
- Several processes (init_distributed: jax.distributed with Gloo collectives on CPU): the
  mesh spans every process's devices; each process loads its slice of every global batch
  (process_rows, from the batch sharding) and jax.make_array_from_process_local_data
  assembles it; each writes the checkpoint shards it holds and process 0 commits after a
  barrier; a signal to any process stops all at the same step.
- OUT/metrics.jsonl: one object per logged step (step, loss, lr, grad_norm, images_per_s);
  every --stats-every steps also the per-layer maximum attention logit and attention
  entropy on the current batch (arXiv:2302.05442 sec. 3.1: attention-logit growth is
  the divergence signal that QK-norm fixes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitctl import checkpoint as ckpt
from vitctl.config import PRESETS, ViTConfig, load_config
from vitctl.errors import CheckpointError, ConfigError
from vitctl.train import optim, report
from vitctl.train.report import METRICS
from vitctl.train.settings import TRAIN_CONFIG, TrainConfig, load_yaml, public_source, schedule_change, write_train_config  # noqa: F401

STATE = "state"


def base_model(tcfg: TrainConfig) -> ViTConfig:
    """The preset or JSON config named by tcfg.model, before the data's overrides.

    A checkpoint directory is refused: taking only its config would silently train its
    architecture from scratch (its step-1 loss is ln(classes), as for any new model).
    """
    if tcfg.model in PRESETS:
        return PRESETS[tcfg.model]
    path = Path(tcfg.model)
    if path.is_dir() and (path / ckpt.CONFIG).is_file():
        raise ConfigError(
            f"--model {tcfg.model} is a checkpoint directory; vitctl train cannot start from its weights yet "
            "(fine-tuning comes with --init-from), and taking only its config would train from scratch",
            hint=f"to train its architecture from scratch, pass its config: --model {path / ckpt.CONFIG}",
        )
    if path.exists():
        return load_config(tcfg.model)
    return ViTConfig.from_variant(tcfg.model)  # raises, naming close presets


def model_config(tcfg: TrainConfig, image_hw: int, num_classes: int, channels: int | None = None) -> ViTConfig:
    """The ViTConfig of a run: preset or JSON, with image size and classes from the data unless set."""
    cfg = base_model(tcfg)
    p = cfg.patch_size
    size = tcfg.image_size or p * math.ceil(max(image_hw, 16) / p)
    over = {"image_size": size, "num_classes": tcfg.num_classes or num_classes}
    if channels is not None:
        over["channels"] = channels
    if tcfg.dtype is not None:
        over["dtype"] = tcfg.dtype
    if tcfg.remat is not None:
        over["remat"] = tcfg.remat
    cfg = dataclasses.replace(cfg, **over)
    cfg.check_patch_grid(f"--model {tcfg.model}")
    return cfg


# Mesh, shardings, step functions.
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


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


class Setup:
    """Model graph, shardings, optimizer and jitted functions for one (config, mesh)."""

    def __init__(self, cfg: ViTConfig, tcfg: TrainConfig, mesh):
        import jax
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec

        from vitctl.model_jax.model import abstract_model
        from vitctl.model_jax.sharding import batch_sharding, check_divisible, param_specs

        self.cfg, self.tcfg, self.mesh = cfg, tcfg, mesh
        abstract = abstract_model(cfg)
        check_divisible(abstract, mesh)  # before compiling anything
        check_batch(tcfg.batch_size, mesh)
        self.graphdef, abs_state = nnx.split(abstract)
        specs = param_specs(abstract)
        self.param_shardings = ckpt._nest({n: NamedSharding(mesh, s) for n, s in specs.items()})
        abs_params = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(abs_state), self.param_shardings
        )
        self.lr_fn = optim.schedule(tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.schedule, tcfg.cooldown)
        self.tx = optim.make_optimizer(
            self.lr_fn, tcfg.optimizer, tcfg.weight_decay, tcfg.head_weight_decay, tcfg.clip_norm, tcfg.b1, tcfg.b2
        )
        repl = NamedSharding(mesh, PartitionSpec())
        shapes = {n: x.shape for n, x in ckpt._flatten(abs_params).items()}

        def opt_sharding(path, x):  # a moment gets its parameter's sharding; factored moments drop the reduced axis
            name = "/".join(n for n, k in zip(_names(path), path) if isinstance(k, jax.tree_util.DictKey))
            if name not in specs:
                return repl
            spec, shape = tuple(specs[name]), shapes[name]
            if x.shape == shape:
                return NamedSharding(mesh, PartitionSpec(*spec))
            field = next((n for n in reversed(_names(path)) if n in ("v_row", "v_col")), None)
            if field is not None and len(shape) >= 2:
                # optax scale_by_factored_rms: d1, d0 = the two largest axes (np.argsort(shape)[-2:]);
                # v_row drops d0, v_col drops d1. Unfactored leaves hold a (1,) placeholder.
                d1, d0 = (int(a) for a in np.argsort(shape)[-2:])
                drop = d0 if field == "v_row" else d1
                if x.shape == shape[:drop] + shape[drop + 1 :]:
                    return NamedSharding(mesh, PartitionSpec(*spec[:drop], *spec[drop + 1 :]))
            return repl

        abs_opt = jax.eval_shape(self.tx.init, abs_params)
        opt_shardings = jax.tree_util.tree_map_with_path(opt_sharding, abs_opt)
        self.shardings = {"params": self.param_shardings, "opt": opt_shardings, "step": repl, "rng": repl}
        abs_opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_opt, opt_shardings)
        self.abstract = {
            "params": abs_params,
            "opt": abs_opt,
            "step": jax.ShapeDtypeStruct((), np.int32, sharding=repl),
            "rng": jax.ShapeDtypeStruct((2,), np.uint32, sharding=repl),
        }
        self.images_sharding = batch_sharding(mesh, 4)
        self.labels_sharding = batch_sharding(mesh, 1)
        graphdef, tx, lr_fn, num_classes = self.graphdef, self.tx, self.lr_fn, cfg.num_classes

        def loss_fn(params, images, labels):
            logits, _ = nnx.merge(graphdef, params)(images)
            return optim.objective(logits, labels, num_classes, tcfg.loss, tcfg.label_smoothing)

        def train_step(state, images, labels):
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], images, labels)
            updates, opt = tx.update(grads, state["opt"], state["params"])
            params = optax_apply(state["params"], updates)
            metrics = {"loss": loss, "grad_norm": optim.optax.tree.norm(grads), "lr": lr_fn(state["step"])}
            return {"params": params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}, metrics

        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.shardings, self.images_sharding, self.labels_sharding),
            out_shardings=(self.shardings, repl),
            donate_argnums=0,
        )
        self.stats = jax.jit(
            lambda params, images: attention_stats(graphdef, params, images),
            in_shardings=(self.param_shardings, self.images_sharding),
            out_shardings=repl,
        )
        self.predict = jax.jit(
            lambda params, images: nnx.merge(graphdef, params)(images)[0].argmax(-1),
            in_shardings=(self.param_shardings, self.images_sharding),
            out_shardings=repl,
        )

    def init_state(self, seed: int):
        import jax
        from flax import nnx

        from vitctl.model_jax.model import ViT

        def init():  # one compiled program, each parameter created in its shard (no full copy on one device)
            with nnx.use_eager_sharding(False):
                # rbg: XLA's RngBitGenerator compiles in a fraction of threefry's time (the
                # unrolled threefry init of even a tiny model takes ~15 s to compile on CPU).
                # The numbers therefore differ from `vitctl init --seed` (threefry).
                return nnx.to_pure_dict(nnx.state(ViT(self.cfg, rngs=nnx.Rngs(params=jax.random.key(seed, impl="rbg"))), nnx.Param))

        if getattr(self, "_init", (None,))[0] != seed:  # compiled once per seed (the RNG unrolls into a large program)
            self._init = (
                seed,
                jax.jit(init, out_shardings=self.param_shardings),
                jax.jit(self.tx.init, out_shardings=self.shardings["opt"]),
            )
        params = self._init[1]()
        opt = self._init[2](params)
        rng = jax.random.key_data(jax.random.key(seed))
        return {
            "params": params,
            "opt": opt,
            "step": jax.device_put(np.int32(0), self.shardings["step"]),
            "rng": jax.device_put(rng, self.shardings["rng"]),
        }

    def put_batch(self, images, labels):
        import jax

        return (
            jax.make_array_from_process_local_data(self.images_sharding, np.asarray(images)),
            jax.make_array_from_process_local_data(self.labels_sharding, np.asarray(labels, np.int32)),
        )


_SETUPS: dict[Any, Setup] = {}
# Fields that do not change the compiled functions: runs differing only in these share a Setup.
_NOT_COMPILED = {"model": "", "data": "", "seed": 0, "save_every": 0, "keep": 1, "stats_every": 0, "eval_every": 0, "log_every": 1,
                 "test_fraction": 0.2}  # fmt: skip


def get_setup(cfg: ViTConfig, tcfg: TrainConfig, mesh) -> Setup:
    """A Setup for (cfg, tcfg, mesh), reused within a process (saves recompiling in tests and sweeps)."""
    key = (cfg, dataclasses.replace(tcfg, **_NOT_COMPILED), tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
    if key not in _SETUPS:
        while len(_SETUPS) >= 4:  # hold a few, oldest out
            _SETUPS.pop(next(iter(_SETUPS)))
        _SETUPS[key] = Setup(cfg, tcfg, mesh)
    return _SETUPS[key]


def optax_apply(params, updates):
    import optax

    return optax.apply_updates(params, updates)


def attention_stats(graphdef, params, images) -> dict[str, Any]:
    """Per layer: the maximum attention logit and the mean attention entropy (nats) on `images`.

    Recomputes each block's queries and keys from its input with the block's own norm,
    q/k projections and QK-norm, so the model needs no extra outputs. Returns
    {"attn_logit_max": [L], "attn_entropy": [L]}.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, params)
    _, out = model(images)
    depth = model.cfg.depth
    inputs = [out["embed"]] + [out[f"block{i:02d}"] for i in range(depth - 1)]
    gdef, stacked = nnx.split(model.blocks)
    maxes, ents = [], []
    for i, x in enumerate(inputs):
        block = nnx.merge(gdef, jax.tree.map(lambda a, i=i: a[i], stacked))
        h = block.norm(x)
        q, k = block.q(h), block.k(h)  # [B, T, N, K]
        if block.q_norm is not None:
            q, k = block.q_norm(q), block.k_norm(k)
        logits = jnp.einsum("BSNK,BTNK->BNST", q.astype(jnp.float32), k.astype(jnp.float32)) * q.shape[-1] ** -0.5
        logp = jax.nn.log_softmax(logits, -1)
        maxes.append(logits.max())
        ents.append(-(jnp.exp(logp) * logp).sum(-1).mean())
    return {"attn_logit_max": jnp.stack(maxes), "attn_entropy": jnp.stack(ents)}


# Output directory.
def write_params(out: Path, cfg: ViTConfig, params, provenance: dict[str, Any], tag: str = "") -> None:
    """OUT/params/ (+ config.json), replaced as a whole: written beside, then swapped in.

    With several processes every process calls this with the same `tag` (the step): each
    writes the shards it holds into one temporary directory (Orbax), and process 0 swaps it
    in once all have finished.
    """
    import jax

    from vitctl.train import state as tstate

    primary = jax.process_index() == 0
    tmp = out / f".params.tmp-{tag or secrets.token_hex(4)}"

    def failed(reason: str) -> CheckpointError:
        return CheckpointError(
            f"cannot write {out / ckpt.PARAMS}: {reason}",
            hint="check the free disk space and the file size limit (ulimit -f); the training state under "
            f"{out / STATE} is complete: continue with --resume once there is room",
        )

    # Checked before Orbax starts: a write it fails half-way leaves TensorStore writes running (see vitctl.train.state).
    reason = tstate.room_for(out, tstate.tree_bytes(params))
    if any_process(int(reason is not None)):
        raise failed(reason or "another process has no room for its part")
    if primary:
        for stale in out.glob(".params.*-*"):  # left by a killed run: .params.tmp-<tag> / .params.old-<hex>
            if re.fullmatch(r"\.params\.(tmp|old)-[0-9a-f]{8}", stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    sync(f"vitctl-params-begin-{tag}")
    try:
        try:
            ckpt.save_jax(tmp, ckpt._flatten(params))
        except Exception as e:  # Orbax and tensorstore raise many types for a failed write
            raise failed(tstate._brief(e)) from e
        sync(f"vitctl-params-written-{tag}")
        if primary:
            old = out / f".params.old-{secrets.token_hex(4)}"
            if (out / ckpt.PARAMS).exists():
                (out / ckpt.PARAMS).rename(old)
            (tmp / ckpt.PARAMS).rename(out / ckpt.PARAMS)
            shutil.rmtree(old, ignore_errors=True)
            ckpt.write_config(out, cfg, provenance)
    finally:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
    sync(f"vitctl-params-done-{tag}")


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves and stops after the current step."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(
    tcfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    dataset=None,
    test_dataset=None,
    loader_cls=None,
    prepare_fn=None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    notify: Callable[[str], None] | None = None,
    max_steps_this_run: int | None = None,
) -> dict[str, Any]:
    """Trains per `tcfg` into `out`; returns {"steps", "final_loss", "test_accuracy", "seconds", "images_per_s",
    "out", "interrupted", "signal", "saved_step"}.

    dataset/test_dataset/loader_cls/prepare_fn default to vitctl.train.data (load_dataset,
    Loader, prepare); tests pass small stand-ins. max_steps_this_run stops early (as a
    signal would), for tests. notify gets one-line notices for the user (a resumed run whose
    schedule changes). SIGTERM/SIGINT from the start of the call on: the current
    step finishes, the state is saved, and the result says interrupted (saved_step: the
    step of the last state saved, None if none was).

    Several processes (after init_distributed) each call this with the same arguments:
    each feeds its slice of every global batch, writes the checkpoint shards it holds, and
    all stop at the same step when any of them is signalled. `out` must be one directory
    that all processes see (a shared file system).
    """
    with _StopFlag() as stop:
        hooks = {"on_log": on_log, "notify": notify or (lambda msg: None), "max_steps_this_run": max_steps_this_run}
        return _train(tcfg, Path(out), stop, resume, force, dataset, test_dataset, loader_cls, prepare_fn, hooks)


def _train(tcfg, out, stop, resume, force, dataset, test_dataset, loader_cls, prepare_fn, hooks):
    import jax

    from vitctl.model_jax.sharding import parse_mesh
    from vitctl.train import state as tstate

    primary = jax.process_index() == 0
    parse_mesh(tcfg.mesh)  # a bad --mesh is refused before the data is loaded
    if dataset is None or loader_cls is None or prepare_fn is None:
        from vitctl.train import data as tdata

        loader_cls = loader_cls or tdata.Loader
        prepare_fn = prepare_fn or tdata.prepare
        if dataset is None:
            channels = (load_config(out) if resume else base_model(tcfg)).channels
            split = {"channels": channels, "test_fraction": tcfg.test_fraction, "seed": tcfg.seed}
            dataset = tdata.load_dataset(tcfg.data, split="train", **split)
            test_dataset = tdata.load_dataset(tcfg.data, split="test", **split)
    start = tstate.latest(out / STATE) if resume else None
    if resume and start is None:
        raise ConfigError(f"--resume: no training state in {out / STATE}", hint="start the run without --resume")
    if resume:
        cfg = load_config(out)
        change = schedule_change(out, tcfg, start)
        if change is not None and primary:
            hooks["notify"](change["message"])
    else:
        ckpt.check_output(out, force)
        _, h, w, _ = dataset.images.shape
        cfg = model_config(tcfg, max(h, w), dataset.num_classes)
    if cfg.num_classes < dataset.num_classes:
        raise ConfigError(
            f"num_classes {cfg.num_classes} is smaller than the data's {dataset.num_classes} classes",
            hint=f"use --num-classes {dataset.num_classes} or more, or a model config with that many",
        )
    mesh = mesh_for(tcfg.mesh)
    setup = get_setup(cfg, tcfg, mesh)  # checks divisibility before compiling
    provenance = {"source_format": "train", "source": public_source(tcfg.model), "created_by": "vitctl train",
                  "data": public_source(tcfg.data), "seed": tcfg.seed}  # fmt: skip
    if getattr(dataset, "class_names", None):  # a data set without names (e.g. bare arrays) records none
        provenance["class_names"] = [str(c) for c in dataset.class_names]
    signum = any_process(stop.signum)
    if signum:  # signalled while loading and checking: nothing written yet
        raise KeyboardInterrupt(f"signal {signum}")
    sync("vitctl-train-checked")  # every process has checked `out` before process 0 changes it
    if resume:
        hooks["schedule_change"] = change
        return _run(tcfg, out, stop, True, dataset, test_dataset, loader_cls, prepare_fn, hooks, cfg, mesh, setup, provenance, start)
    # --force over an earlier run: it is set aside, not deleted, until this run has saved a state, so a
    # new run that fails or is stopped before its first save gives the earlier run back untouched.
    previous = None
    try:
        if primary:
            if out.exists():
                previous = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
                out.rename(previous)
            out.mkdir(parents=True)
            ckpt.write_config(out, cfg, {k: v for k, v in provenance.items() if k != "seed"})
        return _run(tcfg, out, stop, False, dataset, test_dataset, loader_cls, prepare_fn, hooks, cfg, mesh, setup, provenance, start)
    except BaseException:
        # A new run that failed or was stopped before its first saved state leaves no partial run directory.
        if primary and tstate.latest(out / STATE) is None:
            shutil.rmtree(out, ignore_errors=True)
            if previous is not None and not out.exists():
                previous.rename(out)
                previous = None
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def _run(tcfg, out, stop, resume, dataset, test_dataset, loader_cls, prepare_fn, hooks, cfg, mesh, setup, provenance, start):
    import jax

    from vitctl.train import state as tstate

    primary = jax.process_index() == 0
    index, count = process_rows(setup.labels_sharding, tcfg.batch_size)
    loader = loader_cls(dataset, cfg, tcfg.batch_size, seed=tcfg.seed, shuffle=True, drop_remainder=True,
                        process_index=index, process_count=count)  # fmt: skip
    if resume:  # restored before anything in `out` changes: a state that cannot be used leaves the run as it was
        state, meta = tstate.restore(out / STATE, start, setup.abstract)
        loader.restore(meta["data"])
    else:
        state = setup.init_state(tcfg.seed)
        start = 0
    if primary:
        write_train_config(out, tcfg, cfg.to_dict(), hooks.get("schedule_change"))
        if resume:
            report.truncate_metrics(out / METRICS, start)
    sync("vitctl-train-ready")
    saved = {"step": start if resume else None}
    evals: dict[str, Any] = {}  # the latest held-out evaluation: test_accuracy, test_accuracy_step

    def save(step: int, state) -> None:
        meta = {"data": loader.state(), "mesh": dict(mesh.shape), "processes": jax.process_count(), "time": time.time()}
        tstate.save(out / STATE, step, state, meta, keep=tcfg.keep)
        saved["step"] = step
        write_params(out, cfg, state["params"], {**provenance, "step": step, **evals}, tag=f"{step:08d}")

    def held_out(step: int, params) -> float:
        evals.update(test_accuracy=evaluate(setup, params, test_dataset, prepare_fn), test_accuracy_step=step)
        return evals["test_accuracy"]

    step, loss, t0, seen, interrupted, eval_s = start, float("nan"), time.perf_counter(), 0, False, 0.0
    t_log, n_log = time.perf_counter(), 0
    stop_at = tcfg.steps if hooks["max_steps_this_run"] is None else min(tcfg.steps, start + hooks["max_steps_this_run"])
    log = open(out / METRICS, "a") if primary else None  # noqa: SIM115 (closed below)
    try:
        it = iter(loader)
        while step < stop_at:
            stop.signum = any_process(stop.signum)  # one process signalled: all stop at this step
            if stop.signum:
                if step == start and not resume:  # not one step done: nothing worth keeping (the caller removes the run)
                    raise KeyboardInterrupt(f"signal {stop.signum}")
                interrupted = True
                break
            images, labels = next(it)
            x, y = setup.put_batch(images, labels)
            if step == start:
                sync("vitctl-first-step")  # all processes compile the step together
            batch_stats = setup.stats(state["params"], x) if tcfg.stats_every and (step + 1) % tcfg.stats_every == 0 else None
            state, metrics = setup.train_step(state, x, y)
            step += 1
            n_log += tcfg.batch_size
            if step % tcfg.log_every == 0 or step == stop_at:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                rec = {"step": step, **m, "images_per_s": n_log / max(now - t_log, 1e-9)}
                if step - start > 1:  # the first step includes compilation
                    seen += n_log
                else:
                    t0 = now
                t_log, n_log = now, 0
                if batch_stats is not None:
                    rec.update({k: [float(v) for v in np.asarray(a)] for k, a in jax.device_get(batch_stats).items()})
                if test_dataset is not None and (step == tcfg.steps or (tcfg.eval_every and step % tcfg.eval_every == 0)):
                    rec["test_accuracy"] = held_out(step, state["params"])
                    eval_s += time.perf_counter() - now  # not training time: out of the rate and the seconds
                    t_log = time.perf_counter()
                loss = m["loss"]
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if hooks["on_log"]:
                    hooks["on_log"](rec)
            if tcfg.save_every and step % tcfg.save_every == 0 and step < tcfg.steps:
                save(step, state)
        if saved["step"] != step:
            save(step, state)
    finally:
        if log is not None:
            log.close()
        if hasattr(loader, "close"):
            loader.close()
    seconds = time.perf_counter() - t0 - eval_s
    if test_dataset is not None and step == tcfg.steps and evals.get("test_accuracy_step") != step:
        held_out(step, state["params"])  # a finished run resumed as it is: evaluated again, recorded beside its weights
        if primary:
            ckpt.write_config(out, cfg, {**provenance, "step": step, **evals})
    if primary and step == tcfg.steps:
        report.plot(out)
    return {
        "steps": step,
        "final_loss": loss,
        "test_accuracy": evals.get("test_accuracy") if step == tcfg.steps else None,
        "seconds": seconds,
        "images_per_s": seen / seconds if seconds > 0 and seen else None,
        "out": str(out),
        "interrupted": interrupted,
        "signal": stop.signum or None,
        "saved_step": saved["step"],
    }


def evaluate(setup: Setup, params, data, prepare_fn) -> float:
    """Top-1 accuracy on `data` (batches of the training batch size; the last one padded)."""
    import jax

    bs, correct = setup.tcfg.batch_size, 0
    n = len(data.labels)
    for i in range(0, n, bs):
        images = np.asarray(prepare_fn(data.images[i : i + bs], setup.cfg))
        k = len(images)
        if k < bs:
            images = np.concatenate([images, np.zeros((bs - k, *images.shape[1:]), images.dtype)])
        x = jax.device_put(images, setup.images_sharding)
        pred = np.asarray(jax.device_get(setup.predict(params, x)))[:k]
        correct += int((pred == np.asarray(data.labels[i : i + k])).sum())
    return correct / max(n, 1)
