"""`vitctl train`: train a model on a data set, sharded over a device mesh (JAX).

Settings come from, in rising priority: the defaults of vitctl.train.loop.TrainConfig,
the stored OUT/train_config.json (with --resume), a --config YAML file (unknown keys
refused), and the flags. OUT ends up a checkpoint directory (config.json + params/)
with state/, metrics.jsonl, train_config.json and metrics.png beside.

Several processes (a pod's hosts, or processes on one machine): run the same command in
each with --coordinator HOST:PORT --num-processes N --process-id I (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed
where JAX detects the cluster (Cloud TPU, SLURM, Open MPI); --out must be one directory
that all of them see. Process 0 prints the results.

--json output: {"steps", "final_loss", "test_accuracy", "seconds", "images_per_s", "out"}.
Exit codes: 0 done; 1 failed (e.g. no space for a checkpoint: the latest complete one is
kept); 2 usage or config error; 128+signal when stopped by SIGTERM/SIGINT (the state is
saved first: continue with --resume).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from vitctl.cli._options import ForceOpt, JsonOpt, err, out, print_json
from vitctl.errors import ConfigError

commands = typer.Typer()

EXAMPLES = """Examples:

  vitctl train --model vit22b-mu/16 --data digits --out runs/digits --steps 200

  vitctl train --model vit22b-mu/16 --data digits --out runs/digits --mesh data=2,fsdp=2,tensor=2 --batch-size 64

  vitctl train --config train.yaml --out runs/r1 --resume

  vitctl train --data digits --out /shared/runs/r2 --mesh data=2,fsdp=4 --coordinator 10.0.0.1:5476 --num-processes 2 --process-id 0
"""


def _opt(help: str, *names: str, **kw):
    return typer.Option(*names, help=help, show_default=False, **kw)


@commands.command("train", epilog=EXAMPLES)
def train(
    out_dir: Annotated[Path, _opt("Run directory (a checkpoint directory when done).", "--out", "-o")],
    model: Annotated[str | None, _opt("A preset name (see `vitctl models`) or a ViTConfig JSON file.", "--model")] = None,
    data: Annotated[str | None, _opt("digits, fashion-mnist, or a path (ImageFolder, .npz, IDX, HF dataset).", "--data")] = None,
    steps: Annotated[int | None, _opt("Training steps.", "--steps")] = None,
    batch_size: Annotated[int | None, _opt("Global batch size (a multiple of data x fsdp).", "--batch-size")] = None,
    lr: Annotated[float | None, _opt("Peak learning rate.", "--lr")] = None,
    warmup: Annotated[int | None, _opt("Linear warmup steps.", "--warmup")] = None,
    schedule: Annotated[str | None, _opt("cosine or rsqrt.", "--schedule")] = None,
    cooldown: Annotated[int | None, _opt("Linear cooldown to 0 over the last N steps.", "--cooldown")] = None,
    optimizer: Annotated[str | None, _opt("adamw or adafactor.", "--optimizer")] = None,
    loss: Annotated[str | None, _opt("softmax or sigmoid (multi-label) cross-entropy.", "--loss")] = None,
    label_smoothing: Annotated[float | None, _opt("Label smoothing.", "--label-smoothing")] = None,
    weight_decay: Annotated[float | None, _opt("Weight decay of the body's kernels.", "--weight-decay")] = None,
    head_weight_decay: Annotated[float | None, _opt("Weight decay of the head (default: --weight-decay).", "--head-weight-decay")] = None,
    clip_norm: Annotated[float | None, _opt("Global gradient-norm clip (0: off).", "--clip-norm")] = None,
    mesh: Annotated[str | None, _opt("Device mesh, e.g. data=2,fsdp=2,tensor=2 (default: one device).", "--mesh")] = None,
    seed: Annotated[int | None, _opt("Seed of the init and the data order.", "--seed")] = None,
    save_every: Annotated[int | None, _opt("Save the training state every N steps (0: at the end only).", "--save-every")] = None,
    keep: Annotated[int | None, _opt("Keep the last N training states.", "--keep")] = None,
    stats_every: Annotated[
        int | None, _opt("Log per-layer attention max-logit and entropy every N steps (0: never).", "--stats-every")
    ] = None,
    image_size: Annotated[int | None, _opt("Model input size (default: from the data).", "--image-size")] = None,
    num_classes: Annotated[int | None, _opt("Classes (default: from the data).", "--num-classes")] = None,
    test_fraction: Annotated[
        float | None, _opt("Share of each class held out for testing, for data without a test split (default 0.2).", "--test-fraction")
    ] = None,
    dtype: Annotated[str | None, _opt("Compute dtype: float32 or bfloat16 (parameters stay float32).", "--dtype")] = None,
    remat: Annotated[bool | None, _opt("Recompute block activations in the backward pass.", "--remat/--no-remat")] = None,
    config: Annotated[Path | None, _opt("A YAML file of training settings (keys as the flags, with _).", "--config")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest saved state.")] = False,
    coordinator: Annotated[
        str | None,
        _opt("Several processes: process 0's HOST:PORT (it runs the coordinator).", "--coordinator", envvar="JAX_COORDINATOR_ADDRESS"),
    ] = None,
    num_processes: Annotated[int | None, _opt("Several processes: how many.", "--num-processes", envvar="JAX_NUM_PROCESSES")] = None,
    process_id: Annotated[int | None, _opt("Several processes: this one's index, 0..N-1.", "--process-id", envvar="JAX_PROCESS_ID")] = None,
    distributed: Annotated[
        bool, typer.Option("--distributed", help="Join JAX's distributed runtime, settings detected (Cloud TPU, SLURM, Open MPI).")
    ] = False,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Train a ViT on a data set (JAX, sharded), with exact resume and attention statistics."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vitctl.train import loop

    several = loop.init_distributed(coordinator, num_processes, process_id, auto=distributed)
    if several:
        import jax

        primary = jax.process_index() == 0
    else:
        primary = True
    settings: dict = {}
    if resume:
        stored = out_dir / loop.TRAIN_CONFIG
        if not stored.is_file():
            raise ConfigError(f"--resume: {stored} not found", hint="start the run without --resume")
        from vitctl.untrusted import read_json

        settings.update({k: v for k, v in read_json(stored, ConfigError).items() if k != "model_config"})
    if config is not None:
        settings.update(loop.load_yaml(config))
    flags = {
        "model": model,
        "data": data,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "schedule": schedule,
        "cooldown": cooldown,
        "optimizer": optimizer,
        "loss": loss,
        "label_smoothing": label_smoothing,
        "weight_decay": weight_decay,
        "head_weight_decay": head_weight_decay,
        "clip_norm": clip_norm,
        "mesh": mesh,
        "seed": seed,
        "save_every": save_every,
        "keep": keep,
        "stats_every": stats_every,
        "image_size": image_size,
        "num_classes": num_classes,
        "test_fraction": test_fraction,
        "dtype": dtype,
        "remat": remat,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    tcfg = loop.TrainConfig.from_dict(settings)

    progress = Progress(
        TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
        console=err, transient=json, disable=not primary,
    )  # fmt: skip

    with progress, _stdout_to_stderr(enabled=several):
        task = progress.add_task("train", total=tcfg.steps, info="compiling")

        def on_log(rec):
            progress.update(task, completed=rec["step"], info=f"loss {rec['loss']:.4f}  {rec['images_per_s']:.0f} img/s")

        try:
            result = loop.train(tcfg, out_dir, resume=resume, force=force, on_log=on_log)
        except KeyboardInterrupt as e:  # stopped before the first step: the loop wrote nothing (a new run is removed)
            from vitctl.cli import Interrupted

            signum = _signal_of(e)
            raise Interrupted(
                f"signal {signum} before the first step; nothing was written"
                + ("" if not resume else f" (the run in {out_dir} is as it was)"),
                code=128 + signum,
            ) from None
    summary = {k: result[k] for k in ("steps", "final_loss", "test_accuracy", "seconds", "images_per_s", "out")}
    if result["interrupted"]:
        from vitctl.cli import Interrupted

        saved = result["saved_step"]
        raise Interrupted(
            f"signal {result['signal']} at step {result['steps']}; "
            + (f"the training state of step {saved} is saved in {out_dir / loop.STATE}. " if saved is not None else "no state saved. ")
            + f"Continue with: vitctl train --out {out_dir} --resume",
            code=128 + int(result["signal"]),
        )
    if not primary:
        return
    if json:
        print_json(summary)
        return
    acc = summary["test_accuracy"]
    ips = summary["images_per_s"]
    out.print(f"trained {summary['steps']} steps in {summary['seconds']:.1f}s" + (f" ({ips:.0f} images/s)" if ips else ""), markup=False)
    out.print(
        f"final loss {summary['final_loss']:.4f}; test accuracy {acc:.4f}"
        if acc is not None
        else f"final loss {summary['final_loss']:.4f}",
        markup=False,
    )
    out.print(f"checkpoint: {out_dir}", markup=False)
    err.print(f"next: vitctl convert jax-to-torch {out_dir} {out_dir}-torch", markup=False)


def _signal_of(e: KeyboardInterrupt) -> int:
    """The signal number the loop put in its KeyboardInterrupt ("signal 15"); SIGINT for a plain Ctrl-C."""
    import signal

    text = str(e)
    return int(text.split()[1]) if text.startswith("signal ") and text.split()[1].isdigit() else int(signal.SIGINT)


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """Points file descriptor 1 at stderr while training with several processes.

    Gloo, JAX's CPU collectives, logs its connections from C++ straight to fd 1, which would
    break the contract that stdout holds only results (one JSON object with --json).
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
