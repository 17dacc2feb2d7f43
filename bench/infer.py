"""Inference on image files: `vitctl predict` and `vitctl eval` beside timm's own inference.py and
validate.py loops, on the same JPEGs, the same weights and the same batch size, decoding included;
and the two models' forward passes alone, to tell model speed from input speed.

    python bench/infer.py [--images 256] [--model Ti/16] [--size 224] [--batch-size 64] [--workers 2]
                          [--repeat 3] [--only predict,eval,forward] [--max-wait 60] [--json] [--tiny]

Data: bench/data.py's ImageFolder generator (make_folder): --images photo-like JPEGs (quality 90,
256-384 x 208-320 px, ~32 KB) in 10 class folders under ROOT/train, read once so both sides
decode from the page cache.

Weights: random vitctl weights of `--model` (default Ti/16: the classic ViT-Ti/16 with a class
token, 5.7M parameters) with 10 classes at --size px, written as a vitctl-jax checkpoint and
converted with `vitctl convert jax-to-torch --format timm`: one directory (timm's config.json and
model.safetensors) that both sides load, vitctl through its timm reader into its torch twin,
timm with `timm.create_model("local-dir:DIR", pretrained=True)`. Its data config is the
export's (squash to S x S, bilinear, crop_pct 1): the same geometry as vitctl's resize, though
timm resizes with PIL (antialiased) and vitctl with its port of jax.image.resize.

Rows (images/s of the --images files; each side's whole call: the model loaded from the
directory, the files listed, decoded, resized, normalised and run, the results in hand):
- predict: vitctl.infer.predict.predict(DIR, [ROOT/train], top_k=5, backend="torch") against
  timm's inference.py loop: create_dataset (an ImageDataset), create_loader with the model's
  resolved data config and --workers worker processes (inference.py's default: 2), the model in
  eval mode under torch.inference_mode, softmax, top-5 indices and probabilities kept per batch.
  The vitctl row's note splits each timed call's loop: seconds in the model's forward passes of
  seconds predicting (the rest: waiting for decoded images).
- eval: vitctl.infer.evaluate.evaluate(ROOT, split "train", backend torch) against timm's
  validate.py loop: the ImageFolder with its labels, the same loader, top-1 / top-5 by
  timm.utils.accuracy accumulated in AverageMeters.
- forward: vitctl-torch's forward (vitctl.infer.runner.torch_model, the model predict runs)
  against timm's, on one fixed random batch of --batch-size, under torch.inference_mode: what
  is left once the input path is taken away. --forward-iters timed calls after a warm-up.
Ratio: vitctl / timm (> 1: vitctl is faster). Calls are interleaved: rounds of every call in
turn behind a quiet gate (vitctl.bench.QuietGate), each round starting with the next one, after
one untimed round; a result is the best round.

The machine is shared (2 cores here): read the load line at the end; nothing asserts on time.
--tiny: 40 small images, a 2-layer width-32 model at 32 px, batch 8, one round, no waiting (the
tests; its figures mean nothing). --json prints one JSON object {"rows": [...], ...}
(bench/forward.py's schema) on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from data import log, make_folder, read_once, rotated  # bench/ (this script's directory) is first on sys.path

from vitctl import bench as B

CLASSES = 10
TOP_K = 5
PARTS = ("predict", "eval", "forward")
SPLIT: dict[str, list[tuple[float, float]]] = {"predict": []}  # (seconds in the model, seconds predicting) of each vitctl call


# ----------------------------------------------------------------------------- setup
def make_checkpoint(work: Path, model: str, size: int, tiny: bool) -> Path:
    """work/timm: random weights of `model` as `vitctl convert jax-to-torch --format timm` writes them."""
    from vitctl import checkpoint as ckpt
    from vitctl.config import ViTConfig
    from vitctl.convert.convert import convert
    from vitctl.formats import layout
    from vitctl.params import random_weights

    small = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2} if tiny else {}
    cfg = ViTConfig.from_variant(model, num_classes=CLASSES, image_size=size, **small)
    src, dst = work / "jax", work / "timm"
    src.mkdir()
    ckpt.write_config(src, cfg, {"source_format": "bench", "source": "random_weights", "seed": 0})
    layout.save_jax(src, random_weights(cfg, 0))
    convert(src, dst, "jax-to-torch", target_format="timm")
    return dst


def timm_model(ckpt: Path):
    import timm

    return timm.create_model(f"local-dir:{ckpt.absolute()}", pretrained=True).eval()


def timm_loader(model, folder: Path, batch: int, workers: int):
    """timm's loader as inference.py and validate.py build it: the model's resolved data config, no prefetcher (CPU)."""
    import timm.data
    import torch

    config = timm.data.resolve_data_config({}, model=model)
    dataset = timm.data.create_dataset(name="", root=str(folder))
    return timm.data.create_loader(dataset, batch_size=batch, use_prefetcher=False, num_workers=workers, device=torch.device("cpu"),
                                   **config)  # fmt: skip


# ----------------------------------------------------------------------------- the timed calls
def timm_predict(ckpt: Path, folder: Path, batch: int, workers: int) -> int:
    """timm's inference.py: top-5 indices and probabilities of every file; returns the image count."""
    import numpy as np
    import torch

    model = timm_model(ckpt)
    loader = timm_loader(model, folder, batch, workers)
    indices, probs = [], []
    with torch.inference_mode():
        for x, _ in loader:
            top = model(x).softmax(-1).topk(TOP_K)
            indices.append(top.indices.numpy())
            probs.append(top.values.numpy())
    names = loader.dataset.filenames(basename=True)
    assert len(names) == sum(len(i) for i in indices)
    return len(np.concatenate(indices))


def timm_validate(ckpt: Path, folder: Path, batch: int, workers: int) -> int:
    """timm's validate.py: top-1 / top-5 accuracy accumulated over the labelled folder; returns the image count."""
    import torch
    from timm.utils import AverageMeter, accuracy

    model = timm_model(ckpt)
    loader = timm_loader(model, folder, batch, workers)
    top1, top5 = AverageMeter(), AverageMeter()
    with torch.inference_mode():
        for x, y in loader:
            acc1, acc5 = accuracy(model(x), y, topk=(1, TOP_K))
            top1.update(acc1.item(), x.size(0))
            top5.update(acc5.item(), x.size(0))
    return top1.count


def vitctl_predict(ckpt: Path, folder: Path, batch: int) -> int:
    from vitctl.infer.predict import predict

    r = predict(ckpt, [folder], top_k=TOP_K, backend="torch", batch_size=batch)
    assert not r["skipped"]
    SPLIT["predict"].append((r["timings"]["model"], r["timings"]["predict"]))
    return r["images"]


def vitctl_eval(ckpt: Path, root: Path, batch: int) -> int:
    from vitctl.infer.evaluate import evaluate

    r = evaluate(ckpt, str(root), split="train", backend="torch", batch_size=batch)
    return int(r["num_examples"])


def per_second(call, images: int):
    """A call timed as images/s of `images` files (its own count checked)."""

    def timed() -> float:
        t0 = time.perf_counter()
        n = call()
        seconds = time.perf_counter() - t0
        assert n == images, f"{n} images done, {images} expected"
        return images / seconds

    return timed


# ----------------------------------------------------------------------------- parts
def io_rows(args, ckpt: Path, root: Path, gate) -> list[B.Row]:
    """predict and eval, vitctl against timm, interleaved."""
    n, b, w, folder = args.images, args.batch_size, args.workers, root / "train"
    calls, baselines = {}, {}
    if "predict" in args.only:
        calls[f"predict b{b} vitctl"] = per_second(lambda: vitctl_predict(ckpt, folder, b), n)
        calls[f"predict b{b} timm w{w}"] = per_second(lambda: timm_predict(ckpt, folder, b, w), n)
        baselines[f"predict b{b} vitctl"] = f"predict b{b} timm w{w}"
    if "eval" in args.only:
        if eval_missing() is None:
            calls[f"eval b{b} vitctl"] = per_second(lambda: vitctl_eval(ckpt, root, b), n)
            baselines[f"eval b{b} vitctl"] = f"eval b{b} timm w{w}"
        calls[f"eval b{b} timm w{w}"] = per_second(lambda: timm_validate(ckpt, folder, b, w), n)
    if not calls:
        return []
    log(f"warm-up round: {', '.join(calls)} ...")
    for call in calls.values():
        call()
    rows = []
    for name, rates in rotated(calls, args.repeat, gate).items():
        note = f"best of {len(rates)}: " + ", ".join(f"{r:.1f}" for r in rates) + f"; {n} files, model load included"
        if name.startswith("predict") and "vitctl" in name and SPLIT["predict"]:
            note += "; in the model: " + ", ".join(f"{m:.1f} of {p:.1f} s" for m, p in SPLIT["predict"][-len(rates) :])
        rows.append(B.Row(name, max(rates), "images/s", baselines.get(name), note=note))
    if "eval" in args.only and eval_missing():
        rows.append(B.Row(f"eval b{b} vitctl", None, "images/s", f"eval b{b} timm w{w}", note=eval_missing()))
    return rows


def eval_missing() -> str | None:
    try:
        from vitctl.infer import evaluate  # noqa: F401
    except ImportError as e:
        return f"vitctl.infer.evaluate is not importable here ({e})"
    return None


def forward_rows(args, ckpt: Path, gate) -> list[B.Row]:
    """vitctl-torch's forward against timm's on one fixed batch, interleaved."""
    import torch

    from vitctl.infer.runner import torch_model
    from vitctl.open import open_checkpoint

    with open_checkpoint(ckpt) as ck:
        ours, cfg = torch_model(ck), ck.cfg
    theirs = timm_model(ckpt)
    x = torch.randn(args.batch_size, cfg.channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        diff = float((ours(x)[0] - theirs(x)).abs().max())

    def run(model, pick):
        def call():
            with torch.inference_mode():
                pick(model(x))

        return call

    b = args.batch_size
    calls = {f"forward b{b} vitctl-torch": run(ours, lambda y: y[0]), f"forward b{b} timm": run(theirs, lambda y: y)}
    times = B.interleaved_times(calls, 1, args.forward_iters, gate)
    rows = []
    for name, ts in times.items():
        note = f"best of {len(ts)} calls" + (f"; logits max-abs diff to timm {diff:.1e}" if "vitctl" in name else "")
        rows.append(B.Row(name, b / min(ts), "images/s", f"forward b{b} timm" if "vitctl" in name else None, note=note))
    log("forward: " + ", ".join(f"{r.name} {r.value:.1f}" for r in rows))
    return rows


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=None, help="JPEG files (default 256, --tiny 40)")
    p.add_argument("--model", default="Ti/16", help="vitctl preset (default Ti/16)")
    p.add_argument("--size", type=int, default=224, help="the model's image size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="timm's DataLoader workers (inference.py's default: 2)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds (default 3); the best counts")
    p.add_argument("--forward-iters", type=int, default=5, help="timed forward calls per model")
    p.add_argument("--only", default=",".join(PARTS), help=f"parts to run: {', '.join(PARTS)} (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the data and checkpoints go (default: a temporary directory, removed)")
    p.add_argument("--max-wait", type=float, default=60, help="seconds to wait, over the run, for other processes to go quiet")
    p.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...]} on stdout, nothing else there')
    p.add_argument("--tiny", action="store_true", help="40 small images, a tiny model at 32 px, batch 8, one round, no waiting")
    args = p.parse_args(argv)
    if args.tiny:
        args.repeat, args.max_wait, args.forward_iters, args.batch_size, args.size = 1, 0, 2, 8, 32
        args.images = args.images or 40
    args.images = args.images or 256
    args.only = [s for s in args.only.split(",") if s]
    if unknown := set(args.only) - set(PARTS):
        p.error(f"unknown part(s): {', '.join(sorted(unknown))} (known: {', '.join(PARTS)})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # timm's DataLoader forks its workers after vitctl has imported JAX (vitctl.verify.set_precision);
    # the children decode with PIL and torch only and never touch JAX's threads.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    monitor, gate = B.LoadMonitor(), B.QuietGate(args.max_wait)
    work = Path(tempfile.mkdtemp(prefix="vitctl-bench-infer-", dir=args.workdir))
    try:
        log(f"make {args.images} images and a {args.model} checkpoint in {work} ...")
        make_folder(work / "images", args.images, args.seed, tiny=args.tiny)
        ckpt = make_checkpoint(work, args.model, args.size, args.tiny)
        log(f"read once (page cache): {read_once(work / 'images', ckpt) / 1e6:.1f} MB")
        rows = io_rows(args, ckpt, work / "images", gate)
        if "forward" in args.only:
            rows += forward_rows(args, ckpt, gate)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"rows": [r.as_dict() for r in B.link(rows)], "machine": B.machine(), "load": {**monitor.summary(), "quiet_gate": gate.summary()}}
    if args.json:
        print(json.dumps(out))
        return 0
    from rich.console import Console

    console = Console(width=200, highlight=False)
    console.print(B.rows_table(f"bench/infer.py: {out['machine']['cpu']}", rows))
    console.print(f"load: {monitor.describe()}; {gate.describe()}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
