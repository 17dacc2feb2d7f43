"""Fine-tuning at benchmark scale: the fine-tuning step's throughput beside the pretraining
step of the same model and batch (and its MFU against the GEMM peak measured in the same
run), and the time to load a checkpoint into the sharded model beside `cp` of the same bytes.

    python bench/transfer.py [--size S] [--batch-size 8] [--iters 3] [--load-size B] [--mesh data=2,fsdp=2,tensor=2]
                             [--repeat 3] [--only steps,load] [--max-wait 60] [--json] [--tiny]

Steps (one device, fp32, vitctl `vit22b-{size}/16` with 10 classes at 224 px, batch --batch-size):
- scratch: the step `vitctl train --model` runs (vitctl.train.step.Setup: AdamW, global-norm
  clipping, softmax cross-entropy, donated state), from a fresh initialisation;
- fine-tune: the step `vitctl train --init-from CKPT --num-classes 10` runs, from a
  checkpoint of the same model with 1000 classes (so a new zero-initialised head); and the
  fine-tuning variants --freeze all-but-head, --layer-decay 0.75, --head-lr-mult 10,
  --optimizer sgd --momentum 0.9, each its own compiled step.
Each is images/s against the scratch step (ratio < 1: fine-tuning is slower), and GFLOP/s
(3 x forward FLOPs per image, vitctl.bench.flops) against the best fp32 GEMM rate (torch MKL
or XLA, on the model's own shapes) measured in the same run: the MFU. Were a frozen variant
to skip the weight gradients of what it freezes, its MFU by the full count would overstate
the work done (its row says so). Timing: a warm-up call each, then --iters rounds calling the
variants in turn behind a quiet gate (vitctl.bench.QuietGate), each round starting with the
next variant; a result is the best round. The GEMM peak is probed before and after the
steps, and the better of the two counts.

Load (a child process with XLA_FLAGS=--xla_force_host_platform_device_count=8, set before
jax is imported; the mesh --mesh over those 8 devices): a random-weight `vitctl init
{load-size}/16` checkpoint (classic ViT, fp32) as vitctl-jax (Orbax), as vitctl-torch
(model.safetensors) and as timm (model.safetensors, timm's names), each loaded --repeat
times into the sharded model by vitctl.train's checkpoint loader (the one `--init-from`
uses), timed in the child around the call until every shard is on its device; `cp -r
--reflink=never` of the same directory, timed as a process, --repeat times interleaved
with the loads. Both sides read from the page cache (the checkpoint was just written and
read once before the first timed call); the best of each is compared, in GB/s (10^9) of the
checkpoint's bytes on disk (ratio < 1: slower than cp).

The machine is shared (2 cores here): read the load line at the end; nothing asserts on
time. --tiny: 2-layer width-32 models, scratch and plain fine-tuning steps only, one round,
no waiting (the tests; its figures mean nothing). --json prints one JSON object
{"rows": [...], ...} (bench/forward.py's schema) on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vitctl import bench as B
from vitctl.config import ViTConfig

DEVICES = 8
FINETUNE_CLASSES = 10
# Fine-tuning variants: TrainConfig fields on top of --init-from (each compiles its own step).
VARIANTS = {
    "fine-tune": {},
    "fine-tune --freeze all-but-head": {"freeze": "all-but-head"},
    "fine-tune --layer-decay 0.75": {"layer_decay": 0.75},
    "fine-tune --head-lr-mult 10": {"head_lr_mult": 10.0},
    "fine-tune sgd momentum 0.9": {"optimizer": "sgd", "momentum": 0.9},
}
FORMATS = ("vitctl-jax", "vitctl-torch", "timm")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


def configs(size: str, tiny: bool) -> tuple[ViTConfig, ViTConfig]:
    """(the step's model, 10 classes; the loaded checkpoint's model, classic ViT with 1000 classes)."""
    if tiny:
        small = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 8, "image_size": 32}
        return ViTConfig.from_variant("vit22b-mu/16", num_classes=FINETUNE_CLASSES, **small), ViTConfig.from_variant("mu/16", **small)
    return ViTConfig.from_variant(f"vit22b-{size}/16", num_classes=FINETUNE_CLASSES), None


def write_checkpoint(path: Path, cfg: ViTConfig) -> Path:
    """A checkpoint directory of random weights (vitctl-jax: config.json + params/)."""
    from vitctl import checkpoint as ckpt
    from vitctl.formats import layout
    from vitctl.params import random_weights

    path.mkdir(parents=True)
    ckpt.write_config(path, cfg, {"created_by": "bench/transfer.py"})
    layout.save_jax(path, random_weights(cfg))
    return path


# ----------------------------------------------------------------------------- steps
def gemm_peaks(cfg: ViTConfig, batch: int, tiny: bool, gate) -> dict[str, tuple[float, str]]:
    """The best fp32 GEMM of torch (MKL) and XLA on the model's shapes: {row name: (GFLOP/s, shape)}."""
    shapes = B.gemm_shapes(cfg, batch)[: 1 if tiny else None]
    kw = {"min_time": 0.0 if tiny else 0.3, "max_reps": 2 if tiny else 10}
    out = {}
    for name, probe in (("GEMM torch fp32 (MKL)", B.torch_gemm_gflops), ("GEMM XLA fp32", B.xla_gemm_gflops)):
        log(f"{name} ...")
        gate.wait()
        per_shape = probe("float32", shapes, **kw)
        best = max(per_shape, key=per_shape.get)
        out[name] = (per_shape[best], B.fmt_shape(best))
    return out


def rotated_times(calls: dict, warmup: int, iters: int, gate) -> dict[str, list[float]]:
    """Seconds per call of each fn: `warmup` untimed rounds, then `iters` timed rounds calling each
    in turn behind the gate, each round starting with the next one (none always runs first)."""
    names = list(calls)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(iters):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gate.wait()
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def step_call(cfg: ViTConfig, batch: int, fields: dict, init_from: Path | None):
    """The compiled train step of `vitctl train` with TrainConfig `fields`, from a fresh
    initialisation or (init_from) the checkpoint loaded as --init-from loads it; returns
    (synchronised call, seconds to build, load and run the first step)."""
    import jax
    import numpy as np

    from vitctl.train.distributed import mesh_for
    from vitctl.train.settings import TrainConfig
    from vitctl.train.step import Setup

    t0 = time.perf_counter()
    tcfg = TrainConfig(batch_size=batch, steps=1000, warmup=10, **fields, **({"init_from": str(init_from)} if init_from else {}))
    setup = Setup(cfg, tcfg, mesh_for(""))
    box = {"state": setup.init_state(0) if init_from is None else load_state(setup, init_from)}
    rng = np.random.default_rng(0)
    images, labels = setup.put_batch(
        rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.channels), np.float32), rng.integers(0, cfg.num_classes, batch)
    )

    def call():  # the state is donated: keep the new one
        box["state"], metrics = setup.train_step(box["state"], images, labels)
        jax.block_until_ready(metrics)

    call()
    return call, time.perf_counter() - t0


def steps_rows(args, cfg: ViTConfig, gate, workdir: Path) -> list[B.Row]:
    """The scratch step and every fine-tuning variant, timed in rotated rounds between two GEMM
    probes (a burst of other load during one probe would understate the peak: the best of both counts)."""
    import dataclasses
    import statistics

    b = args.batch_size
    before = gemm_peaks(cfg, b, args.tiny, gate)
    label = "tiny" if args.tiny else f"{args.size}/16"
    log(f"write a {label} checkpoint with 1000 classes to fine-tune from ...")
    src = write_checkpoint(workdir / "pretrained", dataclasses.replace(cfg, num_classes=1000))
    calls, notes = {}, {}
    variants = {"fine-tune": {}} if args.tiny else VARIANTS  # tiny: each variant is the same code with other fields
    for name, fields in {"scratch": None, **variants}.items():
        log(f"compile {name} ...")
        calls[name], first_s = step_call(cfg, b, fields or {}, None if fields is None else src)
        notes[name] = f"build, load and 1st step {first_s:.1f} s"
    log(f"{args.iters} timed rounds of {len(calls)} steps ...")
    times = rotated_times(calls, 0 if args.tiny else 1, args.iters, gate)
    shutil.rmtree(src)
    after = gemm_peaks(cfg, b, args.tiny, gate)
    rows = [B.Row(n, max(before[n][0], after[n][0]), "GFLOP/s", note=f"best of before/after the steps: {before[n][0]:.0f}, "
                  f"{after[n][0]:.0f} ({before[n][1]}, {after[n][1]})") for n in before]  # fmt: skip
    peak = max(rows, key=lambda r: r.value)
    per_image = B.flops(cfg, 1, train=True) / 1e9
    prefix = f"train {label} fp32 b{b}"
    for name, ts in times.items():
        base = None if name == "scratch" else f"{prefix} scratch"
        note = f"best of {len(ts)} rounds (median {b / statistics.median(ts):.3g} images/s); {notes[name]}"
        rows.append(B.Row(f"{prefix} {name}", b / min(ts), "images/s", base, note=note))
        mfu_note = "MFU by the full count (frozen: perhaps fewer weight gradients)" if "freeze" in name else "MFU against the GEMM peak"
        rows.append(B.Row(f"{prefix} {name} GFLOP/s", b / min(ts) * per_image, "GFLOP/s", peak.name, note=mfu_note))
    return rows


# ----------------------------------------------------------------------------- load
def write_sources(cfg: ViTConfig, workdir: Path) -> dict[str, Path]:
    """The checkpoint in each format: vitctl-jax written here, the others by `vitctl convert`."""
    srcs = {"vitctl-jax": write_checkpoint(workdir / "vitctl-jax", cfg)}
    for fmt, extra in (("vitctl-torch", []), ("timm", ["--format", "timm"])):
        log(f"vitctl convert jax-to-torch {' '.join(extra)} ...")
        r = B.run_command([*B.vitctl_command(), "convert", "jax-to-torch", str(srcs["vitctl-jax"]), str(workdir / fmt), *extra])
        if r.exit_code:
            raise SystemExit(f"vitctl convert failed: {r.stderr.strip()[-500:]}")
        srcs[fmt] = workdir / fmt
    return srcs


class LoadChild:
    """A child process with 8 host devices that loads the checkpoint named on each stdin line
    and answers one JSON line (seconds, and how the result is laid out over the devices)."""

    def __init__(self, mesh: str, batch: int):
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip()}
        cmd = [sys.executable, __file__, "--load-child", "--mesh", mesh, "--batch-size", str(batch)]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def load(self, path: Path) -> dict:
        self.p.stdin.write(f"{path}\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"the load child exited ({self.p.wait()}); see its error above")
        return json.loads(line)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def load_rows(args, cfg: ViTConfig, gate, workdir: Path) -> list[B.Row]:
    """Per format: loads into the sharded model (in the child) and cp -r of the same bytes, interleaved."""
    log(f"write a {cfg.num_classes}-class {'tiny' if args.tiny else args.load_size + '/16'} checkpoint in {len(FORMATS)} formats ...")
    srcs = write_sources(cfg, workdir)
    child = LoadChild(args.mesh, args.batch_size)
    rows = []
    try:
        for fmt, src in srcs.items():
            nbytes = B.disk_bytes(src)
            log(f"load {fmt} ({nbytes / 2**20:.0f} MiB) into {args.mesh} on {DEVICES} devices, and cp -r ...")
            first = child.load(src)  # also brings every file into the page cache, as cp finds it
            loads, cps = [], []
            for _ in range(args.repeat):
                gate.wait()
                cps.append(B.run_command(["cp", "-r", "--reflink=never", str(src), str(workdir / "copy")]).seconds)
                shutil.rmtree(workdir / "copy")
                gate.wait()
                loads.append(child.load(src))
            best = min(r["seconds"] for r in loads)
            label = f"{fmt} {'tiny' if args.tiny else args.load_size + '/16'}"
            size = f"{nbytes / 2**20:.0f} MiB"
            rows += [
                B.Row(f"load {label} -> {args.mesh}", nbytes / best / 1e9, "GB/s", f"cp -r {label}",
                      note=f"{size}, best of {args.repeat}: {best:.3f} s, first {first['seconds']:.3f} s; {first['layout']}"),
                B.Row(f"cp -r {label}", nbytes / min(cps) / 1e9, "GB/s", note=f"{size}, best of {args.repeat}: {min(cps):.3f} s"),
            ]  # fmt: skip
            for r in rows[-2:]:
                log(f"row: {r.name} = {B.fmt_value(r.value)} {r.unit}")
    finally:
        child.close()
    return rows


def load_state(setup, path: Path):
    """The step-0 train state `vitctl train --init-from PATH` starts from: its loader, onto setup's mesh."""
    from vitctl.train.init_from import load_into, open_source

    with open_source(setup.tcfg) as ckpt:
        params, _ = load_into(ckpt, setup.cfg, setup.abstract["params"], posemb_resize=setup.tcfg.posemb_resize)
    return setup.state_from_params(params, setup.tcfg.seed)


def load_params(path: Path, mesh) -> tuple[object, float]:
    """The checkpoint's parameters placed on `mesh` as `vitctl train --init-from PATH` places them
    (opened through the door, then vitctl.train.init_from.load_into); returns (params, seconds),
    the seconds from opening to every shard on its device (the model's abstract state, built
    once per configuration, is not counted)."""
    import jax

    from vitctl.open import read_config
    from vitctl.train.init_from import load_into, open_source
    from vitctl.train.settings import TrainConfig
    from vitctl.train.step import get_setup

    tcfg = TrainConfig(init_from=str(path), mesh="", batch_size=DEVICES, steps=10)  # the batch only has to divide over the mesh
    setup = get_setup(read_config(path)[0], tcfg, mesh)
    t0 = time.perf_counter()
    with open_source(tcfg) as ckpt:
        params, _ = load_into(ckpt, setup.cfg, setup.abstract["params"])
    jax.block_until_ready(params)
    return params, time.perf_counter() - t0


def child_main(args) -> int:
    """--load-child: loads each checkpoint named on stdin onto --mesh; one JSON line per load."""
    import jax

    from vitctl.train.distributed import mesh_for

    mesh = mesh_for(args.mesh)
    for line in sys.stdin:
        params, seconds = load_params(Path(line.strip()), mesh)
        leaves = jax.tree.leaves(params)
        big = max(leaves, key=lambda a: a.size)
        devices = {d for a in leaves for d in a.sharding.device_set}
        layout = (f"{len(leaves)} arrays on {len(devices)} devices, the largest {big.shape} in {len(big.addressable_shards)} "
                  f"shards of {big.addressable_shards[0].data.shape}")  # fmt: skip
        print(json.dumps({"seconds": seconds, "layout": layout}), flush=True)
        del params, leaves, big
    return 0


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="S", help="ViT size of the steps' vit22b-SIZE/16 (default S)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=3, help="timed rounds of the steps (default 3)")
    p.add_argument("--load-size", default="B", help="ViT size of the loaded SIZE/16 checkpoint (default B: 330 MiB)")
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2", help=f"the mesh the checkpoint is loaded onto ({DEVICES} host devices)")
    p.add_argument("--repeat", type=int, default=3, help="timed loads and cp runs per format (default 3)")
    p.add_argument("--only", default="steps,load", help="parts to run: steps, load (comma-separated)")
    p.add_argument("--max-wait", type=float, default=60, help="seconds to wait, over the run, for other processes to go quiet")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...]} on stdout, nothing else there')
    p.add_argument(
        "--tiny", action="store_true", help="2-layer width-32 models, scratch and plain fine-tuning only, one round, no waiting (tests)"
    )
    p.add_argument("--load-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.iters, args.repeat, args.max_wait, args.batch_size = 1, 1, 0, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.load_child:
        return child_main(args)
    parts = [s for s in args.only.split(",") if s]
    if unknown := set(parts) - {"steps", "load"}:
        raise SystemExit(f"unknown part(s): {', '.join(sorted(unknown))} (known: steps, load)")
    monitor, gate = B.LoadMonitor(), B.QuietGate(args.max_wait)
    step_cfg, load_cfg = configs(args.size, args.tiny)
    load_cfg = load_cfg or ViTConfig.from_variant(f"{args.load_size}/16")
    rows: list[B.Row] = []
    with tempfile.TemporaryDirectory(prefix="vitctl-bench-", dir=args.workdir) as tmp:
        if "steps" in parts:
            (Path(tmp) / "steps").mkdir()
            rows += steps_rows(args, step_cfg, gate, Path(tmp) / "steps")
        if "load" in parts:
            (Path(tmp) / "load").mkdir()
            rows += load_rows(args, load_cfg, gate, Path(tmp) / "load")
    rows = B.link(rows)
    report = {"rows": [r.as_dict() for r in rows], "machine": B.machine(), "load": {**monitor.summary(), "quiet_gate": gate.summary()}}
    if args.json:
        print(json.dumps(report))
        return 0
    from rich.console import Console

    console = Console(width=200, highlight=False)
    console.print(B.rows_table(f"bench/transfer.py: {report['machine']['cpu']}", rows))
    console.print(f"load: {monitor.describe()}; {gate.describe()}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
