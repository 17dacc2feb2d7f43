"""The training loop behind `vitctl train` (JAX): one run, read top to bottom.

train -> _train (settings, data, model config, output directory) -> _run (restore or
init, then the steps) -> _Run (saves, held-out evaluations, one metrics.jsonl line per
logged step). The compiled step is vitctl.train.step; the barriers and each process's
share of the batch are vitctl.train.distributed; what a run saves is vitctl.train.state;
metrics.jsonl and metrics.png are vitctl.train.report; the data is vitctl.data.

- State: OUT/state/, every --save-every steps, at the end, and on SIGTERM/SIGINT. Each
  save also refreshes OUT/params/ + OUT/config.json (the standard checkpoint layout, so
  `vitctl convert` / `verify` read OUT as it is).
- Fine-tuning (--init-from, vitctl.train.init_from): the source is opened and checked before
  anything is written; its weights go straight onto the shards of the initial state (each
  process reads its own), with a fresh optimizer state. A resumed fine-tuning run continues
  from its own state and does not read the source again.
- Resume restores into an abstract target built for the current mesh, so a run can move
  to another mesh shape; the data iterator's state is restored too, so on one machine
  the resumed losses are bit-identical to an uninterrupted run.
- Data: every --data source is read on demand (vitctl.data.lazy) and batched by
  vitctl.data.pipeline on grain (--workers processes, --augment, --mixup/--cutmix); the
  held-out split streams through eval_batches. The data position saved with each state is
  global, so a run resumes exactly on any number of processes and workers.
- Several processes: each loads its slice of every global batch and
  jax.make_array_from_process_local_data assembles it; each writes the checkpoint
  shards it holds and process 0 commits after a barrier; a signal to any process stops
  all at the same step.
- OUT/metrics.jsonl: one object per logged step (step, loss, lr, grad_norm, images_per_s);
  every --stats-every steps also the per-layer maximum attention logit and attention
  entropy on the current batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitctl import checkpoint as ckpt
from vitctl.config import load_config
from vitctl.errors import ConfigError
from vitctl.train import init_from, report
from vitctl.train import state as tstate
from vitctl.train.distributed import any_process, mesh_for, process_rows, sync
from vitctl.train.optim import schedule_change
from vitctl.train.report import METRICS
from vitctl.train.settings import TrainConfig, base_model, model_config, public_source, write_train_config
from vitctl.train.signals import StopFlag
from vitctl.train.state import STATE
from vitctl.train.step import evaluate, get_setup

__all__ = ["train"]


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

    By default the data streams through vitctl.data.pipeline (StreamLoader, eval_batches)
    from vitctl.data.lazy.open_records. dataset/test_dataset: splits in memory instead
    (streamed the same way); with loader_cls (and prepare_fn for the held-out split) tests
    pass small stand-ins. max_steps_this_run stops early (as a
    signal would), for tests. notify gets one-line notices for the user (a resumed run whose
    schedule changes). SIGTERM/SIGINT from the start of the call on: the current
    step finishes, the state is saved, and the result says interrupted (saved_step: the
    step of the last state saved, None if none was).

    Several processes (after init_distributed) each call this with the same arguments:
    each feeds its slice of every global batch, writes the checkpoint shards it holds, and
    all stop at the same step when any of them is signalled. `out` must be one directory
    that all processes see (a shared file system).
    """
    from vitctl.model_jax.sharding import parse_mesh

    parse_mesh(tcfg.mesh)  # a bad --mesh is refused before the data is loaded
    with StopFlag() as stop, _init_source(tcfg, resume) as init:
        hooks = {"on_log": on_log, "notify": notify or (lambda msg: None), "max_steps_this_run": max_steps_this_run, "init": init}
        return _train(tcfg, Path(out), stop, resume, force, dataset, test_dataset, loader_cls, prepare_fn, hooks)


@contextlib.contextmanager
def _init_source(tcfg: TrainConfig, resume: bool):
    """The --init-from checkpoint, opened (headers only) before anything is written; None for a
    run from scratch, and for a resumed run (which continues from its own state)."""
    if not tcfg.init_from or resume:
        yield None
        return
    from vitctl.train.init_from import open_source

    with open_source(tcfg) as ckpt:
        yield ckpt


def _train(tcfg, out, stop, resume, force, dataset, test_dataset, loader_cls, prepare_fn, hooks):
    import jax

    primary = jax.process_index() == 0
    init = hooks["init"]
    data = _data(tcfg, out, resume, dataset, test_dataset, loader_cls, prepare_fn, init)
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
        side = data.image_side()
        if init is not None:
            cfg = init_from.run_config(tcfg, init.cfg, side, data.train.num_classes, init.what)
        else:
            cfg = model_config(tcfg, side, data.train.num_classes)
    if cfg.num_classes < data.train.num_classes:
        raise ConfigError(
            f"num_classes {cfg.num_classes} is smaller than the data's {data.train.num_classes} classes",
            hint=f"use --num-classes {data.train.num_classes} or more, or a model config with that many",
        )
    mesh = mesh_for(tcfg.mesh)
    setup = get_setup(cfg, tcfg, mesh)  # checks divisibility before compiling
    provenance = {"source_format": "train", "source": public_source(tcfg.model), "created_by": "vitctl train",
                  "data": public_source(tcfg.data), "seed": tcfg.seed}  # fmt: skip
    if getattr(data.train, "class_names", None):  # a data set without names (e.g. bare arrays) records none
        provenance["class_names"] = [str(c) for c in data.train.class_names]
    if init is not None and primary:  # hashing the source's files: process 0 alone, which writes config.json
        provenance.update(source=public_source(tcfg.init_from), init_from=init_from.provenance(init, tcfg.init_from))
    signum = any_process(stop.signum)
    if signum:  # signalled while loading and checking: nothing written yet
        raise KeyboardInterrupt(f"signal {signum}")
    sync("vitctl-train-checked")  # every process has checked `out` before process 0 changes it
    args = (tcfg, out, stop, resume, data, hooks, cfg, mesh, setup, provenance, start)
    if resume:
        hooks["schedule_change"] = change
        return _run(*args)
    return tstate.fresh_run(out, cfg, provenance, primary, lambda: _run(*args))


def _data(tcfg, out, resume, dataset, test_dataset, loader_cls, prepare_fn, init=None) -> _Data:
    """The run's splits and how to batch them: those given, else vitctl.data's (lazy records, streamed)."""
    if loader_cls is not None:
        return _Data(dataset, test_dataset, loader_cls, prepare_fn)
    from vitctl.data.augment import parse
    from vitctl.data.pipeline import InMemoryRecords

    parse(tcfg.augment), parse(tcfg.eval_augment)  # a bad spec is refused before anything is read or written

    if dataset is not None:
        return _Data(InMemoryRecords(dataset), test_dataset and InMemoryRecords(test_dataset))
    channels = (load_config(out) if resume else init.cfg if init is not None else base_model(tcfg)).channels
    split = {"channels": channels, "test_fraction": tcfg.test_fraction, "seed": tcfg.seed}
    from vitctl.data.lazy import open_records

    return _Data(open_records(tcfg.data, "train", **split), open_records(tcfg.data, "test", **split))


@dataclasses.dataclass
class _Data:
    """The training and held-out splits, and the loaders over them (StreamLoader and eval_batches unless given)."""

    train: Any  # a Records (or, with loader_cls, whatever loader_cls takes)
    test: Any
    loader_cls: Any = None
    prepare_fn: Any = None

    def image_side(self) -> int:
        from vitctl.data.pipeline import image_side

        return image_side(self.train)

    def loader(self, tcfg: TrainConfig, cfg, index: int, count: int):
        kw = {"seed": tcfg.seed, "shuffle": True, "drop_remainder": True, "process_index": index, "process_count": count}
        if self.loader_cls is not None:
            return self.loader_cls(self.train, cfg, tcfg.batch_size, **kw)
        from vitctl.data.pipeline import StreamLoader

        return StreamLoader(self.train, cfg, tcfg.batch_size, **kw, workers=tcfg.workers, augment=tcfg.augment,
                            mixup=tcfg.mixup, cutmix=tcfg.cutmix, skip_bad=tcfg.skip_bad)  # fmt: skip

    def held_out(self, tcfg: TrainConfig, cfg, index: int, count: int):
        """An iterator of (images, labels, valid) over this process's share of the held-out split."""
        from vitctl.data import pipeline

        if self.loader_cls is not None:
            return pipeline.array_batches(self.test, cfg, self.prepare_fn, tcfg.batch_size, process_index=index, process_count=count)
        return pipeline.eval_batches(self.test, cfg, tcfg.batch_size, process_index=index, process_count=count,
                                     workers=tcfg.workers, augment=tcfg.eval_augment, skip_bad=tcfg.skip_bad)  # fmt: skip


def _run(tcfg, out, stop, resume, data, hooks, cfg, mesh, setup, provenance, start):
    import jax

    primary = jax.process_index() == 0
    index, count = process_rows(setup.labels_sharding, tcfg.batch_size)
    loader = data.loader(tcfg, cfg, index, count)
    if resume:  # restored before anything in `out` changes: a state that cannot be used leaves the run as it was
        state, meta = tstate.restore(out / STATE, start, setup.abstract)
        own = tstate.read_process_meta(out / STATE, start, index, count)  # this slice's own record, when the layout is the same
        loader.restore(meta["data"], own) if own is not None else loader.restore(meta["data"])
    elif hooks["init"] is not None:
        params, loaded = init_from.load_into(hooks["init"], cfg, setup.abstract["params"], posemb_resize=tcfg.posemb_resize)
        for message in loaded.messages if primary else ():
            hooks["notify"](f"--init-from: {message}")
        state, start = setup.state_from_params(params, tcfg.seed), 0
    else:
        state = setup.init_state(tcfg.seed)
        start = 0
    if primary:
        write_train_config(out, tcfg, cfg.to_dict(), hooks.get("schedule_change"), init=provenance.get("init_from"))
        if resume:
            report.truncate_metrics(out / METRICS, start)
    sync("vitctl-train-ready")
    held_out = (lambda: data.held_out(tcfg, cfg, index, count)) if data.test is not None else None
    run = _Run(tcfg, out, stop, hooks, cfg, mesh, setup, provenance, loader, held_out, start, resume)
    stop_at = tcfg.steps if hooks["max_steps_this_run"] is None else min(tcfg.steps, start + hooks["max_steps_this_run"])
    try:
        state, step, interrupted = run.steps(state, stop_at)
        if run.saved_step != step:
            run.save(step, state)
    finally:
        if run.log is not None:
            run.log.close()
        if hasattr(loader, "close"):
            loader.close()
    return run.finish(state, step, interrupted)


class _Run:
    """One run from its first step to its result: steps, saves, held-out evaluations, metrics.jsonl, timing."""

    def __init__(self, tcfg, out, stop, hooks, cfg, mesh, setup, provenance, loader, held_out, start, resume):
        import jax

        self.tcfg, self.out, self.stop, self.hooks, self.cfg, self.mesh, self.setup = tcfg, out, stop, hooks, cfg, mesh, setup
        self.provenance, self.loader, self.test_batches = provenance, loader, held_out
        self.start, self.resume = start, resume
        self.primary = jax.process_index() == 0
        self.saved_step = start if resume else None
        self.evals: dict[str, Any] = {}  # the latest held-out evaluation: test_accuracy, test_accuracy_step
        self.loss, self.seen, self.eval_s = float("nan"), 0, 0.0
        self.t0 = self.t_log = time.perf_counter()
        self.n_log = 0
        self.log = open(out / METRICS, "a") if self.primary else None  # noqa: SIM115 (closed by _run)

    def save(self, step: int, state) -> None:
        import jax

        meta = {"data": self.loader.state(), "mesh": dict(self.mesh.shape), "processes": jax.process_count(), "time": time.time()}
        own = self.loader.process_state() if hasattr(self.loader, "process_state") else None
        tstate.save(self.out / STATE, step, state, meta, keep=self.tcfg.keep, process_meta=own)
        self.saved_step = step
        tstate.write_params(self.out, self.cfg, state["params"], {**self.provenance, "step": step, **self.evals}, tag=f"{step:08d}")

    def held_out(self, step: int, params) -> float:
        self.evals.update(test_accuracy=evaluate(self.setup, params, self.test_batches()), test_accuracy_step=step)
        return self.evals["test_accuracy"]

    def steps(self, state, stop_at: int):
        """Trains from self.start to `stop_at` or a signal; returns (state, step, interrupted)."""
        tcfg, setup, stop, step = self.tcfg, self.setup, self.stop, self.start
        it = iter(self.loader)
        while step < stop_at:
            stop.signum = any_process(stop.signum)  # one process signalled: all stop at this step
            if stop.signum:
                if step == self.start and not self.resume:  # not one step done: nothing worth keeping (the caller removes the run)
                    raise KeyboardInterrupt(f"signal {stop.signum}")
                return state, step, True
            images, labels = next(it)
            x, y = setup.put_batch(images, labels)  # labels: int [B], or float32 [B, K] targets (mixup / cutmix)
            if step == self.start:
                sync("vitctl-first-step")  # all processes compile the step together
            batch_stats = setup.stats(state["params"], x) if tcfg.stats_every and (step + 1) % tcfg.stats_every == 0 else None
            state, metrics = (setup.train_step if y.ndim == 1 else setup.soft_train_step())(state, x, y)
            step += 1
            self.n_log += tcfg.batch_size
            if step % tcfg.log_every == 0 or step == stop_at:
                self.record(step, state, metrics, batch_stats)
            if tcfg.save_every and step % tcfg.save_every == 0 and step < tcfg.steps:
                self.save(step, state)
        return state, step, False

    def record(self, step: int, state, metrics, batch_stats) -> None:
        """One metrics.jsonl line (and on_log call) for `step`, with a held-out evaluation when one is due."""
        import jax

        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        rec = {"step": step, **m, "images_per_s": self.n_log / max(now - self.t_log, 1e-9)}
        if step - self.start > 1:  # the first step includes compilation
            self.seen += self.n_log
        else:
            self.t0 = now
        self.t_log, self.n_log = now, 0
        if batch_stats is not None:
            rec.update({k: [float(v) for v in np.asarray(a)] for k, a in jax.device_get(batch_stats).items()})
        every = self.tcfg.eval_every
        if self.test_batches is not None and (step == self.tcfg.steps or (every and step % every == 0)):
            rec["test_accuracy"] = self.held_out(step, state["params"])
            self.eval_s += time.perf_counter() - now  # not training time: out of the rate and the seconds
            self.t_log = time.perf_counter()
        self.loss = m["loss"]
        if self.log is not None:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
        if self.hooks["on_log"]:
            self.hooks["on_log"](rec)

    def finish(self, state, step: int, interrupted: bool) -> dict[str, Any]:
        """The run's result; a finished run is evaluated (if it was not at its last step) and plotted."""
        tcfg, evals = self.tcfg, self.evals
        seconds = time.perf_counter() - self.t0 - self.eval_s
        if self.test_batches is not None and step == tcfg.steps and evals.get("test_accuracy_step") != step:
            self.held_out(step, state["params"])  # a finished run resumed as it is: evaluated again, recorded beside its weights
            if self.primary:
                ckpt.write_config(self.out, self.cfg, {**self.provenance, "step": step, **evals})
        if self.primary and step == tcfg.steps:
            report.plot(self.out)
        return {
            "steps": step,
            "skipped_examples": _sum_over_processes(getattr(self.loader, "skipped", 0)),
            "final_loss": self.loss,
            "test_accuracy": evals.get("test_accuracy") if step == tcfg.steps else None,
            "seconds": seconds,
            "images_per_s": self.seen / seconds if seconds > 0 and self.seen else None,
            "out": str(self.out),
            "interrupted": interrupted,
            "signal": self.stop.signum or None,
            "saved_step": self.saved_step,
        }


def _sum_over_processes(value: int) -> int:
    """The sum of `value` over all processes (each process counts the examples it replaced)."""
    import jax

    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int32(value))))
