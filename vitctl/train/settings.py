"""The settings of a training run (TrainConfig), read from defaults, YAML and a stored run.

Imports neither jax nor numpy: `vitctl train` resolves its settings (the mesh above all)
before JAX starts, because on a CPU the number of simulated devices must be set first
(vitctl.devices.prepare_cpu_devices).

- TrainConfig: field = CLI flag = YAML key = JSON key in OUT/train_config.json.
- Defaults that depend on other settings are resolved when the config is built and stored
  resolved: warmup (None) becomes steps // 10, so a resumed run keeps the warmup it had.
- base_model / model_config: the ViTConfig a run trains (a preset or JSON file, with the
  image size and classes taken from the data unless set).
- public_source: the name of a model or data source as a published checkpoint may show it
  (a named data set or preset as given; a local path by its final component only).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitctl.config import ViTConfig
from vitctl.errors import ConfigError

TRAIN_CONFIG = "train_config.json"
SCHEDULES = ("cosine", "rsqrt")
OPTIMIZERS = ("adamw", "adafactor", "sgd")
POSEMB_RESIZE = ("bilinear", "bicubic")  # vitctl.posemb.RESAMPLE_METHODS (not imported: numpy)
LOSSES = ("softmax", "sigmoid")
BACKENDS = ("jax", "torch")  # jax: vitctl.train.loop (a device mesh); torch: vitctl.train.torch_loop (FSDP2 over processes)
NAMED_DATA = ("digits", "fashion-mnist")
HUB_PREFIX = "hf://"
WARMUP_FRACTION = 10  # default warmup: steps // 10 (the demo recipe: 30 of 300 steps)


def default_warmup(steps: int, cooldown: int = 0) -> int:
    """steps // 10, and never more than the steps the cooldown leaves (so any --steps works)."""
    return max(0, min(steps // WARMUP_FRACTION, steps - cooldown))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; field = CLI flag = YAML key = JSON key."""

    model: str = "vit22b-demo/4"  # a preset name or a ViTConfig JSON file
    data: str = "digits"
    steps: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int | None = None  # None: default_warmup(steps, cooldown), stored resolved
    schedule: str = "cosine"
    cooldown: int = 0
    optimizer: str = "adamw"
    loss: str = "softmax"
    label_smoothing: float = 0.0
    weight_decay: float = 1e-4
    head_weight_decay: float | None = None  # None: same as weight_decay
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    mesh: str = ""  # "" : one device; else e.g. "data=2,fsdp=2,tensor=2"
    backend: str = "jax"  # jax or torch (FSDP2 over all processes; no --mesh)
    seed: int = 0
    save_every: int = 0  # 0: only at the end (and on SIGTERM/SIGINT)
    keep: int = 3
    stats_every: int = 10  # 0: never
    eval_every: int = 0  # 0: only at the end
    log_every: int = 1
    image_size: int | None = None  # None: from the data (its size, at least 16, a multiple of the patch)
    num_classes: int | None = None  # None: from the data
    dtype: str | None = None  # compute dtype override: float32 | bfloat16
    remat: bool | None = None
    test_fraction: float = 0.2
    # Fine-tuning (vitctl.train.init_from, vitctl.train.optim).
    init_from: str | None = None  # a checkpoint vitctl reads (directory, big_vision .npz, hf://org/name[@rev])
    prefix: str | None = None  # big_vision .npz only: the sub-tree of the ViT (e.g. params/img)
    posemb_resize: str = "bilinear"  # bilinear (big_vision) or bicubic (timm) for a new patch grid
    freeze: str = ""  # comma list: all-but-head, or globs on JAX param paths (blocks/*, patch_embed/*)
    layer_decay: float | None = None  # None: off; else lr scale decay^(L+1-layer id) (BEiT / big_vision)
    head_lr_mult: float = 1.0  # the head's learning rate, as a multiple of --lr
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    # The input pipeline (vitctl.data.pipeline): none of these changes the compiled step.
    workers: int = 0  # grain worker processes per training process (0: in the training process)
    augment: str = ""  # per-example augmentation spec (vitctl.data.augment), e.g. inception_crop|flip_lr; "": resize only
    eval_augment: str = ""  # the held-out split's, e.g. resize_small(1.143)|central_crop; "": resize only
    mixup: float = 0.0  # Beta(alpha, alpha) mixup of pairs of rows (0: off)
    cutmix: float = 0.0  # Beta(alpha, alpha) cutmix of pairs of rows (0: off)
    skip_bad: bool = False  # an unreadable example is replaced by the next readable one (counted) instead of stopping the run

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and "None" in f.type:
                continue
            kind = f.type.split(" ")[0]
            ok = {
                "str": isinstance(v, str),
                "int": isinstance(v, int) and not isinstance(v, bool),
                "float": isinstance(v, (int, float)) and not isinstance(v, bool),
                "bool": isinstance(v, bool),
            }[kind]
            if not ok:
                shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:60] + "..."
                raise ConfigError(f"training config: {f.name} must be {kind}, got {shown}", hint=f"set {f.name} to a single {kind} value")
        choices = {"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "loss": LOSSES, "dtype": ("float32", "bfloat16", None),
                   "posemb_resize": POSEMB_RESIZE, "backend": BACKENDS}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} '{getattr(self, name)}'", hint=f"{name} must be one of: {', '.join(map(str, allowed))}")
        for name in ("steps", "batch_size", "keep", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("save_every", "stats_every", "eval_every", "workers", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (off) or more, got {getattr(self, name)}")
        if self.warmup is None:
            object.__setattr__(self, "warmup", default_warmup(self.steps, max(self.cooldown, 0)))
        if self.warmup < 0 or self.cooldown < 0 or self.warmup + self.cooldown > self.steps:
            raise ConfigError(
                f"warmup {self.warmup} + cooldown {self.cooldown} must be non-negative and at most steps {self.steps}",
                hint=f"leave --warmup out (default: steps // {WARMUP_FRACTION}) or make it at most {max(self.steps - self.cooldown, 0)}",
            )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        self._check_fine_tuning()
        if self.backend == "torch" and self.mesh:
            raise ConfigError(
                f"--mesh {self.mesh} is JAX's device mesh; --backend torch shards parameters with FSDP2 over all its processes",
                hint="drop --mesh; to shard over N processes: torchrun --nproc-per-node N -m vitctl train --backend torch ...",
            )
        if not 0 < self.test_fraction < 1:
            raise ConfigError(
                f"test_fraction must be in (0, 1), got {self.test_fraction}", hint="e.g. --test-fraction 0.2 holds out 20% of each class"
            )

    def _check_fine_tuning(self) -> None:
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}", hint="e.g. --layer-decay 0.75 (BEiT, big_vision)")
        if self.head_lr_mult < 0:
            raise ConfigError(f"head_lr_mult must be 0 or more, got {self.head_lr_mult}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}", hint="e.g. --momentum 0.9")
        if self.prefix is not None and self.init_from is None:
            raise ConfigError("--prefix names the ViT inside a big_vision .npz given by --init-from", hint="pass --init-from FILE.npz")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "training config") -> TrainConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must be a mapping of field: value, got {type(d).__name__}",
                              hint="e.g. 'steps: 200' on a line of its own")  # fmt: skip
        if not all(isinstance(k, str) for k in d):
            raise ConfigError(f"{source}: keys must be setting names, got {sorted(map(repr, d))[:3]}", hint="e.g. 'steps: 200'")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown key(s) in {source}: {', '.join(unknown)}", hint=f"known keys: {', '.join(known)}")
        return cls(**{k: (float(v) if isinstance(v, int) and not isinstance(v, bool) and _kind(k) == "float" else v) for k, v in d.items()})


def _kind(name: str) -> str:
    return next(f.type.split(" ")[0] for f in dataclasses.fields(TrainConfig) if f.name == name)


def default(name: str) -> Any:
    """The default of a TrainConfig field (for help texts: one source of truth)."""
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


YAML_MAX_BYTES = 2**20  # a settings file is a few hundred bytes


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A --config file (YAML, so JSON too): a flat mapping of TrainConfig fields, size and nesting bounded."""
    import yaml

    hint = "a --config file is a flat YAML mapping of training settings, e.g. 'steps: 200' (see vitctl train --help)"
    try:
        if Path(path).stat().st_size > YAML_MAX_BYTES:
            raise ConfigError(f"{path} is larger than any settings file ({Path(path).stat().st_size} bytes)", hint=hint)
        d = yaml.safe_load(Path(path).read_text())
    except RecursionError:
        raise ConfigError(f"{path} nests too deeply to be a settings file", hint=hint) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot read {path}: {first}", hint=hint) from None
    TrainConfig.from_dict(d or {}, source=str(path))  # refuses unknown keys and wrong types early
    return d or {}


def read_stored(out: str | Path) -> dict[str, Any]:
    """The settings a run in `out` was last started with (its train_config.json), TrainConfig keys only."""
    from vitctl.untrusted import read_json

    stored = Path(out) / TRAIN_CONFIG
    if not stored.is_file():
        raise ConfigError(f"--resume: {stored} not found", hint="start the run without --resume")
    d = read_json(stored, ConfigError)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in d.items() if k in known}


def public_source(spec: str) -> str:
    """How a published checkpoint names a model or data source: a named data set, a preset name or an
    hf:// id as given; a local path (or an IDX pair "IMAGES,LABELS") by its final component(s) only,
    so that no user's directory layout (home, temporary directories) leaks into an artifact."""
    from vitctl.config import PRESETS

    if spec in NAMED_DATA or spec in PRESETS or spec.startswith(HUB_PREFIX):
        return spec
    return ",".join(Path(part).name for part in spec.split(","))


CHANGES = "schedule_changes"  # train_config.json: every schedule change of a resumed run, in order
SCHEDULE_FIELDS = ("lr", "steps", "warmup", "schedule", "cooldown")  # the settings of a run's learning-rate schedule


def describe_schedule(t: TrainConfig) -> str:
    text = f"{t.schedule} over {t.steps} steps, peak lr {t.lr:g}, warmup {t.warmup}"
    return text + (f", cooldown {t.cooldown}" if t.cooldown else "")


def schedule_change(out: str | Path, new: TrainConfig, step: int, schedule: Callable[..., Any]) -> dict[str, Any] | None:
    """What resuming the run in `out` at `step` with `new` does to its learning-rate schedule (None: nothing).

    `schedule`: the backend's schedule(lr, steps, warmup, kind, cooldown) -> (step -> lr) (vitctl.train.optim's
    or vitctl.train.torch_optim's; the same float32 values). A resumed run follows the schedule of its current
    settings, laid over all its steps (as if the run had used it from step 0): `--resume --steps N` with a larger
    N extends the cosine over N steps, so the learning rate at `step` jumps (from near 0 when the run had
    finished) to the new curve's value there. The change is returned, so it can be printed and recorded
    (train_config.json, "schedule_changes"); metrics.jsonl logs the lr of every step.
    """
    old = TrainConfig.from_dict(read_stored(out))
    if new.steps < step:
        raise ConfigError(
            f"--steps {new.steps} is fewer than the {step} steps the run in {out} has trained",
            hint=f"pass --steps {step} or more to continue it (the checkpoint in {out} holds step {step} as it is)",
        )
    if all(getattr(old, f) == getattr(new, f) for f in SCHEDULE_FIELDS):
        return None

    def lr_at(t: TrainConfig) -> float:
        return float(schedule(t.lr, t.steps, t.warmup, t.schedule, t.cooldown)(step))

    before, after = lr_at(old), lr_at(new)
    message = (
        f"resuming at step {step} with a new schedule: {describe_schedule(new)} (was: {describe_schedule(old)}); "
        f"it is laid over all {new.steps} steps, so the learning rate at step {step} goes from {before:.2e} to {after:.2e}"
        + (" (unchanged)" if before == after else "")
        + f"; recorded in {TRAIN_CONFIG} under {CHANGES}"
    )
    return {"step": step, "before": describe_schedule(old), "after": describe_schedule(new), "lr_before": before, "lr_after": after,
            "message": message}  # fmt: skip


INIT_SOURCE = "init_source"  # train_config.json: the resolved --init-from source (public name, revision, sha256, format)


def write_train_config(
    out: Path, tcfg: TrainConfig, model_config: dict[str, Any], change: dict[str, Any] | None = None, init: dict[str, Any] | None = None
) -> None:
    """OUT/train_config.json: the run's settings, its model config, the source it was initialised
    from (kept across resumptions) and the schedule changes of its resumptions."""
    from vitctl import checkpoint as ckpt
    from vitctl.untrusted import read_json

    path = Path(out) / TRAIN_CONFIG
    stored = read_json(path, ConfigError) if path.is_file() else {}
    changes = stored.get(CHANGES, [])
    if change is not None:
        changes = [*changes, {k: v for k, v in change.items() if k != "message"}]
    record = {**dataclasses.asdict(tcfg), "model_config": model_config}
    init = init if init is not None else stored.get(INIT_SOURCE)
    if init is not None:
        record[INIT_SOURCE] = ckpt.public_provenance(init)
    ckpt.write_json(path, {**record, CHANGES: changes} if changes else record)


def base_model(tcfg: TrainConfig) -> ViTConfig:
    """The preset or JSON config named by tcfg.model, before the data's overrides.

    A checkpoint directory is refused: taking only its config would silently train its
    architecture from scratch (its step-1 loss is ln(classes), as for any new model).
    """
    from vitctl.config import PRESETS, load_config
    from vitctl.formats import layout

    if tcfg.model in PRESETS:
        return PRESETS[tcfg.model]
    path = Path(tcfg.model)
    if path.is_dir() and (path / layout.CONFIG).is_file():
        raise ConfigError(
            f"--model {tcfg.model} is a checkpoint directory; taking only its config would train from scratch",
            hint=f"to fine-tune its weights: --init-from {tcfg.model}; to train its architecture from scratch: --model {path / layout.CONFIG}",
        )
    if path.exists():
        return load_config(tcfg.model)
    return ViTConfig.from_variant(tcfg.model)  # raises, naming close presets


def model_config(
    tcfg: TrainConfig, image_hw: int, num_classes: int, channels: int | None = None, base: ViTConfig | None = None
) -> ViTConfig:
    """The ViTConfig of a run: `base` (a fine-tuning run: its source's), else the preset or JSON, with
    image size and classes from the data unless set."""
    cfg = base or base_model(tcfg)
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
