"""The training loop behind `vitctl train --backend torch`: one run, read top to bottom.

train -> _train (settings, data, model config, output directory) -> _run (model, FSDP2,
optimizer, restore) -> _Run (steps, saves, held-out evaluations, one metrics.jsonl line per
logged step). The step is vitctl.train.torch_step; the process group and FSDP2 are
vitctl.train.torch_dist; the optimizer, objective and schedule vitctl.train.torch_optim; what
a run saves vitctl.train.torch_state; metrics.jsonl and metrics.png vitctl.train.report.

The JAX trainer's run, on the torch twin (vitctl.train.loop):
- The same settings (TrainConfig, train_config.json), the same data and batches (the
  StreamLoader of vitctl.data.pipeline, each process its slice of every global batch), the
  same objective, schedule, optimizers, clipping and weight-decay masks (optax's math), the
  same metrics.jsonl keys, held-out evaluation at the end and every --eval-every steps.
- OUT/state/<step>/ every --save-every steps, at the end, and on SIGTERM/SIGINT: the whole
  (gathered) parameters and optimizer state and the global data position, so a run resumes
  exactly on any number of processes. Each save also refreshes OUT/model.safetensors +
  config.json: OUT is a vitctl-torch checkpoint that `vitctl convert`, `verify`, `eval` read.
- Sharding: FSDP2 over all processes (torchrun, or --coordinator/--num-processes/--process-id),
  every block a unit; alone, a world of one. A signal to any process stops all at one step
  (the flag is all-reduced before every step).
- A resumed run whose schedule settings change follows the new schedule laid over all its
  steps; the learning-rate jump is told and recorded in train_config.json, as the JAX trainer does.
- --init-from: any checkpoint vitctl reads, through vitctl.open, into the torch twin before it
  is sharded; a resumed fine-tuning run continues from its own state.

Imports no jax (grain, under the data pipeline, loads it where it is installed): the torch backend needs no [jax] extra.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitctl import checkpoint as ckpt
from vitctl.config import load_config
from vitctl.errors import ConfigError
from vitctl.train import init_from, report, torch_dist, torch_state
from vitctl.train import state as tstate
from vitctl.train.report import METRICS
from vitctl.train.settings import TrainConfig, model_config, public_source, schedule_change, write_train_config
from vitctl.train.signals import StopFlag
from vitctl.train.state import STATE
from vitctl.train.torch_optim import make_optimizer, schedule
from vitctl.train.torch_step import attention_stats, build_model, evaluate, to_device, train_step

__all__ = ["STATE", "train"]


def train(
    tcfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    dataset=None,
    test_dataset=None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    notify: Callable[[str], None] | None = None,
    max_steps_this_run: int | None = None,
) -> dict[str, Any]:
    """Trains per `tcfg` on the torch twin into `out`; returns what vitctl.train.loop.train returns:
    {"steps", "final_loss", "test_accuracy", "seconds", "images_per_s", "out", "interrupted", "signal", "saved_step", ...}.

    dataset / test_dataset: splits in memory (streamed as vitctl.data would) instead of tcfg.data.
    Several processes (a process group joined first, torch_dist.init; or torchrun's environment)
    each call this with the same arguments; `out` must be one directory all of them see.
    Alone, a world of one is started here and ended on return.
    """
    with StopFlag() as stop:
        _, _, started = torch_dist.init()
        try:
            with _init_source(tcfg, resume) as init:
                hooks = {"on_log": on_log, "notify": notify or (lambda msg: None), "max_steps_this_run": max_steps_this_run, "init": init}
                return _train(tcfg, Path(out), stop, resume, force, (dataset, test_dataset), hooks)
        finally:
            if started:
                torch_dist.close()


@contextlib.contextmanager
def _init_source(tcfg: TrainConfig, resume: bool):
    """The --init-from checkpoint, opened (headers only) before anything is written; None from scratch or resumed."""
    if not tcfg.init_from or resume:
        yield None
        return
    with init_from.open_source(tcfg) as source:
        yield source


def _records(tcfg: TrainConfig, out: Path, resume: bool, given: tuple, init) -> tuple[Any, Any]:
    """(train, held-out) Records: the splits given in memory, else tcfg.data's (read on demand)."""
    from vitctl.data.augment import parse
    from vitctl.data.pipeline import InMemoryRecords
    from vitctl.train.settings import base_model

    parse(tcfg.augment), parse(tcfg.eval_augment)  # a bad spec is refused before anything is read or written
    dataset, test_dataset = given
    if dataset is not None:
        return InMemoryRecords(dataset), test_dataset and InMemoryRecords(test_dataset)
    from vitctl.data.lazy import open_records

    channels = (load_config(out) if resume else init.cfg if init is not None else base_model(tcfg)).channels
    split = {"channels": channels, "test_fraction": tcfg.test_fraction, "seed": tcfg.seed}
    return open_records(tcfg.data, "train", **split), open_records(tcfg.data, "test", **split)


def _train(tcfg, out, stop, resume, force, given, hooks):
    from vitctl.data.pipeline import image_side

    world, primary = torch.distributed.get_world_size(), torch.distributed.get_rank() == 0
    init = hooks["init"]
    records = _records(tcfg, out, resume, given, init)
    start = tstate.latest(out / STATE) if resume else None
    if resume and start is None:
        raise ConfigError(f"--resume: no training state in {out / STATE}", hint="start the run without --resume")
    if resume:
        cfg = load_config(out)
        hooks["schedule_change"] = schedule_change(out, tcfg, start, schedule)
        if hooks["schedule_change"] is not None and primary:
            hooks["notify"](hooks["schedule_change"]["message"])
    else:
        ckpt.check_output(out, force)
        side = image_side(records[0])
        cfg = (init_from.run_config(tcfg, init.cfg, side, records[0].num_classes, init.what) if init is not None
               else model_config(tcfg, side, records[0].num_classes))  # fmt: skip
    if cfg.num_classes < records[0].num_classes:
        raise ConfigError(
            f"num_classes {cfg.num_classes} is smaller than the data's {records[0].num_classes} classes",
            hint=f"use --num-classes {records[0].num_classes} or more, or a model config with that many",
        )
    if tcfg.batch_size % world:
        raise ConfigError(f"batch size {tcfg.batch_size} does not divide over {world} processes",
                          hint=f"use a batch size that is a multiple of {world}")  # fmt: skip
    provenance = {"source_format": "train", "source": public_source(tcfg.model), "created_by": "vitctl train --backend torch",
                  "data": public_source(tcfg.data), "seed": tcfg.seed}  # fmt: skip
    if getattr(records[0], "class_names", None):
        provenance["class_names"] = [str(c) for c in records[0].class_names]
    if init is not None and primary:
        provenance.update(source=public_source(tcfg.init_from), init_from=init_from.provenance(init, tcfg.init_from))
    signum = torch_dist.any_process(stop.signum)
    if signum:  # signalled while loading and checking: nothing written yet
        raise KeyboardInterrupt(f"signal {signum}")
    torch_dist.sync()  # every process has checked `out` before process 0 changes it
    args = (tcfg, out, stop, resume, records, hooks, cfg, provenance, start)
    return _run(*args) if resume else tstate.fresh_run(out, cfg, provenance, primary, lambda: _run(*args))


def _loader(tcfg: TrainConfig, cfg, records, rank: int, world: int):
    from vitctl.data.pipeline import StreamLoader

    return StreamLoader(records, cfg, tcfg.batch_size, seed=tcfg.seed, shuffle=True, drop_remainder=True, process_index=rank,
                        process_count=world, workers=tcfg.workers, augment=tcfg.augment, mixup=tcfg.mixup, cutmix=tcfg.cutmix,
                        skip_bad=tcfg.skip_bad)  # fmt: skip


def _run(tcfg, out, stop, resume, records, hooks, cfg, provenance, start):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    lr_fn = schedule(tcfg.lr, tcfg.steps, tcfg.warmup, tcfg.schedule, tcfg.cooldown)
    model, messages = build_model(cfg, tcfg.seed, hooks["init"], tcfg.posemb_resize)
    for message in messages if rank == 0 else ():
        hooks["notify"](f"--init-from: {message}")
    model = torch_dist.shard(model.to(torch_dist.device()), remat=cfg.remat)
    opt = make_optimizer(model, cfg, tcfg, lr_fn)
    loader = _loader(tcfg, cfg, records[0], rank, world)
    if resume:  # restored before anything in `out` changes: a state that cannot be used leaves the run as it was
        meta = torch_state.restore(out / STATE, start, model, opt, cfg)
        loader.restore(meta["data"])
    else:
        start = 0
    if rank == 0:
        write_train_config(out, tcfg, cfg.to_dict(), hooks.get("schedule_change"), init=provenance.get("init_from"))
        if resume:
            report.truncate_metrics(out / METRICS, start)
    torch_dist.sync()
    run = _Run(tcfg, out, stop, hooks, cfg, provenance, (model, opt, lr_fn), loader, records[1], start, resume)
    stop_at = tcfg.steps if hooks["max_steps_this_run"] is None else min(tcfg.steps, start + hooks["max_steps_this_run"])
    try:
        step, interrupted = run.steps(stop_at)
        if run.saved_step != step:
            run.save(step)
    finally:
        if run.log is not None:
            run.log.close()
        loader.close()
    return run.finish(step, interrupted)


class _Run:
    """One run from its first step to its result: steps, saves, held-out evaluations, metrics.jsonl, timing."""

    def __init__(self, tcfg, out, stop, hooks, cfg, provenance, trained, loader, test_records, start, resume):
        self.tcfg, self.out, self.stop, self.hooks, self.cfg, self.provenance = tcfg, out, stop, hooks, cfg, provenance
        self.model, self.opt, self.lr_fn = trained
        self.loader, self.test_records, self.start, self.resume = loader, test_records, start, resume
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.device = torch_dist.device()
        self.saved_step = start if resume else None
        self.evals: dict[str, Any] = {}  # the latest held-out evaluation: test_accuracy, test_accuracy_step
        self.loss, self.seen, self.eval_s = float("nan"), 0, 0.0
        self.t0 = self.t_log = time.perf_counter()
        self.n_log = 0
        self.log = open(out / METRICS, "a") if self.rank == 0 else None  # noqa: SIM115 (closed by _run)

    def save(self, step: int) -> None:
        meta = {"data": self.loader.state(), "processes": self.world}
        step_dir = torch_state.save(self.out / STATE, step, self.model, self.opt, self.cfg, meta, keep=self.tcfg.keep)
        self.saved_step = step
        if self.rank == 0:
            torch_state.publish(self.out, step_dir, self.cfg, {**self.provenance, "step": step, **self.evals})

    def held_out(self, step: int) -> float:
        from vitctl.data.pipeline import eval_batches

        t = self.tcfg
        batches = eval_batches(self.test_records, self.cfg, t.batch_size, process_index=self.rank, process_count=self.world,
                               workers=t.workers, augment=t.eval_augment, skip_bad=t.skip_bad)  # fmt: skip
        self.evals.update(test_accuracy=evaluate(self.model, batches, self.device), test_accuracy_step=step)
        return self.evals["test_accuracy"]

    def steps(self, stop_at: int) -> tuple[int, bool]:
        """Trains from self.start to `stop_at` or a signal; returns (step, interrupted)."""
        tcfg, stop, step = self.tcfg, self.stop, self.start
        it = iter(self.loader)
        while step < stop_at:
            stop.signum = torch_dist.any_process(stop.signum)  # one process signalled: all stop at this step
            if stop.signum:
                if step == self.start and not self.resume:  # not one step done: nothing worth keeping (the caller removes the run)
                    raise KeyboardInterrupt(f"signal {stop.signum}")
                return step, True
            x, y = to_device(*next(it), self.device)
            due = tcfg.stats_every and (step + 1) % tcfg.stats_every == 0
            batch_stats = attention_stats(self.model, x) if due else None
            metrics = train_step(self.model, self.opt, x, y, self.cfg, tcfg, self.lr_fn)
            step += 1
            self.n_log += tcfg.batch_size
            if step % tcfg.log_every == 0 or step == stop_at:
                self.record(step, metrics, batch_stats)
            if tcfg.save_every and step % tcfg.save_every == 0 and step < tcfg.steps:
                self.save(step)
        return step, False

    def record(self, step: int, metrics: dict[str, float], batch_stats: dict[str, list[float]] | None) -> None:
        """One metrics.jsonl line (and on_log call) for `step`, with a held-out evaluation when one is due."""
        now = time.perf_counter()
        rec = {"step": step, **metrics, "images_per_s": self.n_log / max(now - self.t_log, 1e-9)}
        if step - self.start > 1:  # the first step includes warming up
            self.seen += self.n_log
        else:
            self.t0 = now
        self.t_log, self.n_log = now, 0
        if batch_stats is not None:
            rec.update(batch_stats)
        every = self.tcfg.eval_every
        if self.test_records is not None and (step == self.tcfg.steps or (every and step % every == 0)):
            rec["test_accuracy"] = self.held_out(step)
            self.eval_s += time.perf_counter() - now  # not training time: out of the rate and the seconds
            self.t_log = time.perf_counter()
        self.loss = metrics["loss"]
        if self.log is not None:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
        if self.hooks["on_log"]:
            self.hooks["on_log"](rec)

    def finish(self, step: int, interrupted: bool) -> dict[str, Any]:
        """The run's result; a finished run is evaluated (if it was not at its last step) and plotted."""
        tcfg, evals = self.tcfg, self.evals
        seconds = time.perf_counter() - self.t0 - self.eval_s
        if self.test_records is not None and step == tcfg.steps and evals.get("test_accuracy_step") != step:
            self.held_out(step)  # a finished run resumed as it is: evaluated again, recorded beside its weights
            if self.rank == 0:
                ckpt.write_config(self.out, self.cfg, {**self.provenance, "step": step, **evals})
        if self.rank == 0 and step == tcfg.steps:
            report.plot(self.out)
        return {
            "steps": step,
            "skipped_examples": int(torch_dist.total(getattr(self.loader, "skipped", 0))),
            "final_loss": self.loss,
            "test_accuracy": evals.get("test_accuracy") if step == tcfg.steps else None,
            "seconds": seconds,
            "images_per_s": self.seen / seconds if seconds > 0 and self.seen else None,
            "out": str(self.out),
            "interrupted": interrupted,
            "signal": self.stop.signum or None,
            "saved_step": self.saved_step,
            "processes": self.world,
        }
