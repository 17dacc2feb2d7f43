"""`vitctl train`: train a model on a data set, sharded over a device mesh (JAX) or over processes (--backend torch: FSDP2).

Settings come from, in rising priority: the defaults of vitctl.train.settings.TrainConfig,
the stored OUT/train_config.json (with --resume), a --config YAML file (unknown keys
refused), and the flags. They are resolved before JAX is imported: on a CPU, the mesh (or
--devices) sets how many host devices XLA simulates (vitctl.devices). A resumed run whose
--steps (or schedule settings) change follows the new schedule laid over all its steps;
the learning-rate jump at the resumed step is printed and recorded in train_config.json.

Fine-tuning: --init-from CKPT starts from any checkpoint vitctl reads (the model is its
config with the run's image size and classes; a new head for other classes, a resampled
position embedding for another patch grid), with --freeze, --layer-decay, --head-lr-mult
and --optimizer sgd --momentum. A resumed fine-tuning run continues from its own state.

Progress: a live bar on a terminal; when stderr is a file (nohup, SLURM, CI), a plain line
every --log-every-s seconds. OUT ends up a checkpoint directory (config.json + params/)
with state/, metrics.jsonl, train_config.json and metrics.png beside.

Several processes (a pod's hosts, or processes on one machine): run the same command in
each with --coordinator HOST:PORT --num-processes N --process-id I (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed
where JAX detects the cluster (Cloud TPU, SLURM, Open MPI); --out must be one directory
that all of them see. Process 0 prints the results.

--backend torch trains the PyTorch twin (vitctl.train.torch_loop): the same settings, data,
batches, objective, optimizers and out directory, ending a vitctl-torch checkpoint
(config.json + model.safetensors). Parameters are sharded with FSDP2 over the processes:
`torchrun --nproc-per-node N -m vitctl train --backend torch ...`, or the same command in each
process with --coordinator HOST:PORT --num-processes N --process-id I (Gloo on CPU, NCCL on
GPU). --dtype bfloat16 computes in bf16 over float32 weights; --remat recomputes each block in
the backward pass (torch.utils.checkpoint). A run resumes with the backend it started with.

--json output: {"steps", "final_loss", "test_accuracy", "seconds", "images_per_s", "out"}.
Exit codes: 0 done; 1 failed (e.g. no space for a checkpoint: the latest complete one is
kept); 2 usage or config error; 128+signal when stopped by SIGTERM/SIGINT (the state is
saved first: continue with --resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from vitctl.cli._options import ForceOpt, JsonOpt, err, out, print_json

commands = typer.Typer()

EXAMPLES = """Examples:

  vitctl train --model vit22b-demo/4 --data digits --out runs/digits --steps 200

  vitctl train --model vit22b-demo/4 --data digits --out runs/digits-mesh --mesh data=2,fsdp=2,tensor=2

  vitctl train --out runs/digits --resume --steps 400

  vitctl train --config train.yaml --out runs/r1 --eval-every 50 --log-every-s 10

  vitctl train --init-from runs/digits --data digits --image-size 24 --out runs/ft --steps 20 --optimizer sgd --lr 0.01 --layer-decay 0.75

  vitctl train --data data/photos-packed --out runs/photos --workers 2 --augment "inception_crop(0.5,1.0)|flip_lr" --mixup 0.2 --steps 10 --batch-size 8

  vitctl train --data digits --out /shared/runs/r2 --mesh data=2,fsdp=4 --coordinator 10.0.0.1:5476 --num-processes 2 --process-id 0

  torchrun --nproc-per-node 2 -m vitctl train --backend torch --model vit22b-demo/4 --data digits --out runs/torch --steps 200
"""


# The flags that set TrainConfig fields (every field but b1, b2 and log_every, which a --config file
# sets): field -> (help, the default as help shows it where it is not the field's own default).
FIELD_FLAGS: dict[str, tuple[str, str | None]] = {
    "model": ("A preset name (see `vitctl models`) or a ViTConfig JSON file.", None),
    "data": ("digits, fashion-mnist, or a path (ImageFolder, .npz, IDX, HF dataset).", None),
    "steps": ("Training steps.", None),
    "batch_size": ("Global batch size (a multiple of data x fsdp).", None),
    "lr": ("Peak learning rate.", None),
    "warmup": ("Linear warmup steps.", "steps // 10"),
    "schedule": ("cosine or rsqrt.", None),
    "cooldown": ("Linear cooldown to 0 over the last N steps.", None),
    "optimizer": ("adamw, adafactor or sgd.", None),
    "loss": ("softmax or sigmoid (multi-label) cross-entropy.", None),
    "label_smoothing": ("Label smoothing.", None),
    "weight_decay": ("Weight decay of the body's kernels.", None),
    "head_weight_decay": ("Weight decay of the head.", "--weight-decay"),
    "clip_norm": ("Global gradient-norm clip (0: off).", None),
    "mesh": ("Device mesh, e.g. data=2,fsdp=2,tensor=2.", "one device"),
    "backend": ("jax (sharded over --mesh) or torch (the PyTorch twin, FSDP2 over the processes).", None),
    "seed": ("Seed of the init and the data order.", None),
    "save_every": ("Save the training state every N steps (0: at the end only).", None),
    "keep": ("Keep the last N training states.", None),
    "stats_every": ("Log per-layer attention max-logit and entropy every N steps (0: never).", None),
    "eval_every": ("Evaluate on the held-out split every N steps (0: at the end only); metrics.jsonl: test_accuracy.", None),
    "image_size": ("Model input size.", "the data's, at least 16, a multiple of the patch"),
    "num_classes": ("Classes.", "the data's"),
    "dtype": ("Compute dtype: float32 or bfloat16 (parameters stay float32).", "the model config's"),
    "remat": ("Recompute block activations in the backward pass.", "the model config's"),
    "test_fraction": ("Share of each class held out for testing, for data without a test split.", None),
    "init_from": ("Fine-tune: start from this checkpoint's weights (a directory, big_vision .npz, hf://org/name[@rev]).", "from scratch"),
    "prefix": ("With a big_vision .npz --init-from: the sub-tree holding the ViT, e.g. params/img.", "the whole file"),
    "posemb_resize": ("Resampling of a learned position embedding for a new patch grid: bilinear (big_vision) or bicubic (timm).", None),
    "freeze": ("Frozen parameters (no update, no optimizer state): all-but-head, or globs like blocks/*; repeatable.", "none"),
    "layer_decay": ("Layer-wise lr decay: block i of L trains at lr * decay^(L+1-i), embeddings at decay^(L+1).", "off"),
    "head_lr_mult": ("The head's learning rate as a multiple of --lr.", None),
    "momentum": ("sgd: momentum (0: plain SGD).", None),
    "nesterov": ("sgd: Nesterov momentum.", None),
    "workers": ("Input pipeline: grain worker processes per training process (0: in the training process).", None),
    "augment": ("Per-example augmentation, ops joined by |, e.g. 'inception_crop|flip_lr' (big_vision style).", "resize only"),
    "eval_augment": ("The held-out split's preprocessing, e.g. 'resize_small(1.143)|central_crop'.", "resize only"),
    "mixup": ("mixup of pairs of rows, Beta(alpha, alpha) (0: off); labels become soft targets.", None),
    "cutmix": ("cutmix of pairs of rows, Beta(alpha, alpha) (0: off); with --mixup too, one of them per batch.", None),
    "skip_bad": ("Replace an unreadable example by the next readable one (counted, reported) instead of stopping.", None),
}
REPEATABLE = {"freeze"}  # given several times: joined into the field's comma list
_KINDS = {"str": str, "int": int, "float": float, "bool": bool}


def _opt(help: str, *names: str, default: str | None = None, **kw):
    """An option whose help shows `default` (the effective value; the parameter itself is None
    so that --config and a resumed run's stored settings can supply it)."""
    return typer.Option(*names, help=help, show_default=default if default is not None else False, **kw)


def _shown(value) -> str:
    """A TrainConfig default as help shows it."""
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _field_params() -> list[inspect.Parameter]:
    """One keyword parameter per FIELD_FLAGS entry, in TrainConfig's field order: `--name-with-dashes`
    (`--name/--no-name` for a bool), None unless given, help showing the default."""
    from vitctl.train.settings import TrainConfig

    params = []
    for f in dataclasses.fields(TrainConfig):
        if f.name not in FIELD_FLAGS:
            continue
        help, shown = FIELD_FLAGS[f.name]
        kind, flag = _KINDS[f.type.split(" ")[0]], "--" + f.name.replace("_", "-")
        names = (f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)
        option = _opt(help, *names, default=shown if shown is not None else _shown(f.default))
        kind = list[kind] if f.name in REPEATABLE else kind
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]))
    return params


def _with_field_flags(command):
    """`command`'s signature with its **settings replaced by the TrainConfig field flags (Typer reads the signature)."""
    sig = inspect.signature(command, eval_str=True)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    fields = _field_params()
    command.__signature__ = sig.replace(parameters=[own[0], *fields, *own[1:]])
    command.__annotations__ = {p.name: p.annotation for p in (own[0], *fields, *own[1:])}
    return command


OutDirOpt = Annotated[Path, _opt("Run directory (a checkpoint directory when done).", "--out", "-o")]
DevicesOpt = Annotated[int | None, _opt("CPU only: simulated host devices.", "--devices", default="what --mesh needs", min=1)]
LogEveryOpt = Annotated[
    float,
    typer.Option(
        "--log-every-s", min=0, help="When stderr is not a terminal (a log file): a progress line every N seconds (0: every step)."
    ),
]
ConfigOpt = Annotated[Path | None, _opt("A YAML file of training settings (keys as the flags, with _).", "--config")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its latest saved state; its stored settings are the defaults.")
]
CoordinatorOpt = Annotated[
    str | None,
    _opt("Several processes: process 0's HOST:PORT (it runs the coordinator).", "--coordinator", envvar="JAX_COORDINATOR_ADDRESS"),
]
NumProcessesOpt = Annotated[int | None, _opt("Several processes: how many.", "--num-processes", envvar="JAX_NUM_PROCESSES")]
ProcessIdOpt = Annotated[int | None, _opt("Several processes: this one's index, 0..N-1.", "--process-id", envvar="JAX_PROCESS_ID")]
DistributedOpt = Annotated[
    bool, typer.Option("--distributed", help="Join JAX's distributed runtime, settings detected (Cloud TPU, SLURM, Open MPI).")
]


@commands.command("train", epilog=EXAMPLES)
@_with_field_flags
def train(
    out_dir: OutDirOpt,
    devices: DevicesOpt = None,
    log_every_s: LogEveryOpt = 30.0,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    coordinator: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
    distributed: DistributedOpt = False,
    force: ForceOpt = False,
    json: JsonOpt = False,
    **settings,
) -> None:
    """Train a ViT on a data set (JAX over a device mesh, or PyTorch with FSDP2), with exact resume and attention statistics."""
    from vitctl.devices import prepare_cpu_devices
    from vitctl.train import settings as tsettings

    # Settings first, without JAX: on a CPU the mesh decides how many devices XLA simulates,
    # and that must be set before anything imports jax.
    stored = tsettings.read_stored(out_dir) if resume else {}
    given = {k: ",".join(v) if k in REPEATABLE else v for k, v in settings.items() if v is not None}
    if resume and given.get("init_from") not in (None, stored.get("init_from")):
        from vitctl.errors import ConfigError

        raise ConfigError(
            f"--init-from {given['init_from']} with --resume: the run in {out_dir} continues from its own saved state"
            + (f" (it started from {stored['init_from']})" if stored.get("init_from") else " (it started from scratch)"),
            hint=f"drop --init-from to resume it, or start a new run: vitctl train --init-from {given['init_from']} --out NEW_DIR",
        )
    tcfg = tsettings.TrainConfig.from_dict({**stored, **(tsettings.load_yaml(config) if config is not None else {}), **given})
    if resume and tcfg.backend != stored.get("backend", "jax"):
        _refuse_other_backend(out_dir, stored.get("backend", "jax"), tcfg.backend)
    if tcfg.backend == "torch":
        _train_torch(tcfg, out_dir, resume, force, json, log_every_s, (coordinator, num_processes, process_id), devices or distributed)
        return
    if devices is not None or not (distributed and num_processes is None):  # an auto-detected cluster: its size is unknown here
        prepare_cpu_devices(tcfg.mesh, devices, num_processes or 1)

    from vitctl.train import loop
    from vitctl.train.distributed import init_distributed

    several = init_distributed(coordinator, num_processes, process_id, auto=distributed)
    primary = _is_primary() if several else True
    on_log, progress = _progress(tcfg.steps, log_every_s, primary, json)
    with progress, _stdout_to_stderr(enabled=several):
        try:
            result = loop.train(tcfg, out_dir, resume=resume, force=force, on_log=on_log, notify=_note)
        except KeyboardInterrupt as e:  # stopped before the first step: the loop wrote nothing (a new run is removed)
            raise _stopped_before_start(e, out_dir, resume) from None
    _finish(result, out_dir, primary, json, "jax")


def _finish(result: dict, out_dir: Path, primary: bool, json: bool, backend: str) -> None:
    """A run's end: the Interrupted for a signalled run; else (process 0) the summary."""
    from vitctl.train.state import STATE

    if result["interrupted"]:
        raise _stopped(result, out_dir / STATE, out_dir)
    if primary and result.get("skipped_examples"):
        _note(f"{result['skipped_examples']} unreadable example(s) were replaced by the next readable one (--skip-bad)")
    if primary:
        summary = {k: result[k] for k in ("steps", "final_loss", "test_accuracy", "seconds", "images_per_s", "out")}
        _print_summary(summary, out_dir, json, backend)


def _refuse_other_backend(out_dir: Path, stored: str, given: str) -> None:
    from vitctl.errors import ConfigError

    raise ConfigError(
        f"the run in {out_dir} was trained with --backend {stored}; --backend {given} cannot resume its training state",
        hint=f"resume it with --backend {stored} (or leave --backend out), or start a new run in another --out",
    )


def _train_torch(tcfg, out_dir: Path, resume: bool, force: bool, json: bool, log_every_s: float, process: tuple, jax_only: bool) -> None:
    """`vitctl train --backend torch`: the process group (torchrun's environment or the flags), the run, its summary."""
    from vitctl.errors import ConfigError

    if jax_only:
        raise ConfigError(
            "--devices and --distributed set up JAX's devices and runtime; --backend torch runs one device per process",
            hint="launch N processes with torchrun --nproc-per-node N -m vitctl train --backend torch ..., "
            "or give each --coordinator HOST:PORT --num-processes N --process-id I",
        )
    from vitctl.train import torch_dist, torch_loop

    rank, world, started = torch_dist.init(*process)
    try:
        on_log, progress = _progress(tcfg.steps, log_every_s, rank == 0, json)
        with progress, _stdout_to_stderr(enabled=world > 1):
            try:
                result = torch_loop.train(tcfg, out_dir, resume=resume, force=force, on_log=on_log, notify=_note)
            except KeyboardInterrupt as e:  # stopped before the first step: the loop wrote nothing (a new run is removed)
                raise _stopped_before_start(e, out_dir, resume) from None
        _finish(result, out_dir, rank == 0, json, "torch")
    finally:
        if started:
            torch_dist.close()


def _is_primary() -> bool:
    """Whether this is process 0 of a distributed run, the one that prints the results."""
    import jax

    return jax.process_index() == 0


def _note(message: str) -> None:
    err.print(f"Note: {message}", markup=False)


def _stopped_before_start(e: KeyboardInterrupt, out_dir: Path, resume: bool) -> Exception:
    """The Interrupted for a signal before the first step: nothing was written."""
    from vitctl.cli import Interrupted

    signum = _signal_of(e)
    return Interrupted(
        f"signal {signum} before the first step; nothing was written" + ("" if not resume else f" (the run in {out_dir} is as it was)"),
        code=128 + signum,
    )


def _stopped(result: dict, state_dir: Path, out_dir: Path) -> Exception:
    """The Interrupted for a run a signal stopped: what was saved, and how to continue."""
    from vitctl.cli import Interrupted

    saved = result["saved_step"]
    return Interrupted(
        f"signal {result['signal']} at step {result['steps']}; "
        + (f"the training state of step {saved} is saved in {state_dir}. " if saved is not None else "no state saved. ")
        + f"Continue with: vitctl train --out {out_dir} --resume",
        code=128 + int(result["signal"]),
    )


def _print_summary(summary: dict, out_dir: Path, json: bool, backend: str = "jax") -> None:
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
    other = "torch-to-jax" if backend == "torch" else "jax-to-torch"
    err.print(f"next: vitctl convert {other} {out_dir} {out_dir}-{'jax' if backend == 'torch' else 'torch'}", markup=False)


def _progress(total: int, every_s: float, primary: bool, json: bool):
    """(on_log, context): a live bar on a terminal; plain lines every `every_s` seconds in a log file."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vitctl.train.report import PlainProgress

    if not primary:
        return None, contextlib.nullcontext()
    if not err.is_terminal:
        return PlainProgress(total, every_s, lambda line: err.print(line, markup=False)), contextlib.nullcontext()
    progress = Progress(
        TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
        console=err, transient=json,
    )  # fmt: skip
    task = progress.add_task("train", total=total, info="compiling")

    def on_log(rec):
        progress.update(task, completed=rec["step"], info=f"loss {rec['loss']:.4f}  {rec['images_per_s']:.0f} img/s")

    return on_log, progress


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
