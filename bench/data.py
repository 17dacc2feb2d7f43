"""The training input path at scale: vitctl's streaming pipeline beside timm's input pipeline
on the same JPEG files, what it feeds the train step, and the trainer's memory as the data
set grows tenfold.

    python bench/data.py [--images 4000 | --gigabytes G] [--workdir DIR] [--only pipeline,train]
                         [--repeat 3] [--batches 16] [--workers 0,1,2] [--model vit22b-mu/16]
                         [--max-wait 60] [--json] [--tiny]
    python bench/data.py --make DIR [--images N | --gigabytes G]
    python bench/data.py --memory [--sizes 0.3,3] [--memory-steps 400]

Data (--make, and every part that needs images): an ImageFolder ROOT/train/<class>/*.jpg
(and ROOT/test, 50 images) of 10 classes, each image a JPEG (quality 90) of 256-384 x
208-320 pixels: a smooth two-colour gradient with a low-frequency wave, 3-8 filled shapes in
the class's hue, a slight blur and mild noise, so the files are 20-45 KB (mean ~32 KB) as
photographs of that size are. Image i depends only on (--seed, i); a process pool writes
them. `vitctl data pack ROOT ROOT.packed` (ArrayRecord shards, the JPEG bytes kept) gives
the packed form of the same images.

pipeline: images/s of the input pipeline alone, batch 64 at 224 px, training augmentation,
for each --workers count:
- vitctl: vitctl.data.pipeline.StreamLoader over vitctl.data.lazy.open_records(ROOT) (the
  ImageFolder read lazily) and over ROOT.packed, augment "inception_crop(0.08,1.0)|flip_lr"
  (random-resized crop, scale 0.08-1, then a random horizontal flip), float32 [B,S,S,C]; at
  0 workers grain reads in this process on two threads (PIL lets go of the GIL), timm on one;
- timm: timm.data.create_loader over timm.data.ImageDataset(ROOT/train), is_training, no
  colour jitter, no auto-augment, no prefetcher (a CPU run): RandomResizedCrop(224,
  scale 0.08-1, bilinear) + flip + ToTensor + Normalize, a torch DataLoader with the same
  num_workers and batch size; float32 [B,C,S,S]. At 0 workers torch runs one intra-op
  thread, as DataLoader's workers do: with its default two, Normalize's thread pool on a
  loaded 2-core machine ran 7x slower, which would flatter vitctl.
Every file is read once first, so both decode from the page cache. A measurement builds
the loader, pulls 3 warm-up batches (worker start-up, and each side's prefetch buffer
filled: both alike), then times --batches batches; rounds interleave vitctl and timm,
each round starting with the next one, behind a quiet gate; a result is the best round.
Ratio: vitctl / timm at the same worker count (> 1: vitctl is faster).

train: images/s of vitctl.train's compiled step (vitctl.train.step.Setup, AdamW, the loop
of `vitctl train`: next batch, put on the device, step, read the metrics) on --model with
10 classes at 224 px, batch 64, fed by StreamLoader over ROOT.packed with each --workers
count (a fresh loader, one warm-up step, --train-steps timed steps), against the same step
fed one fixed synthetic batch. Ratio: real / synthetic; the input stops being the
bottleneck at the fewest workers with a ratio >= 0.95. The default model, vit22b-mu/16
(196 tokens, D=32, one block), steps at about the pipeline's rate on 2 cores, where the
question is open; vit22b-Ti/16 steps at a few images/s there, far below any input rate.
The workers share the CPUs with the step: on a 2-core machine they take compute from it.

memory (--memory): two ImageFolders of --sizes GB of JPEG (the smaller a subset, hard
links, of the larger; past --distinct images, 10,000, the larger repeats those as hard
links: a record's bytes matter nothing to memory, and 94k distinct images take minutes)
packed, then `vitctl train --data PACKED --workers 2 --batch-size 32` (vit22b-mu/16 at 64
px, --memory-steps steps: at 400 steps the larger run reads ~13k images, more bytes than
the whole smaller set) on each, each in its own child process
watched from a small launcher: the trainer's peak RSS (VmHWM, and ru_maxrss from wait4),
the largest peak RSS of its worker processes (VmHWM, polled every 0.25 s), and the peak of
the PSS summed over the trainer and its workers (shared pages counted once). The
difference, larger set minus smaller, is the figure (target < 100 MiB); both test splits
are the same 50 images, so it is the training stream that grew.

The machine is shared (2 cores here): read the load line at the end; nothing asserts on
time. --tiny: 60 small images, workers 0 and 1, one round, a 2-layer width-32 model at
32 px, no waiting (the tests; its figures mean nothing). --json prints one JSON object
{"rows": [...], ...} (bench/forward.py's schema) on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vitctl import bench as B

CLASSES = 10
TEST_IMAGES = 50  # per data set, whatever its size: the memory comparison is about the training stream
AUGMENT = "inception_crop(0.08,1.0)|flip_lr"
MEAN_JPEG_BYTES = 32_000  # of make_jpeg's images (measured over the first thousand): --gigabytes -> count
WARMUP_BATCHES = 3
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
_NOISE: dict[int, object] = {}


def _noise(seed: int):
    """A 512 x 512 x 3 noise field (luma + chroma), made once per process: each image takes a crop."""
    import numpy as np

    if seed not in _NOISE:
        r = np.random.default_rng((seed, 1 << 40))  # no image index comes near
        _NOISE[seed] = (r.normal(0, 1, (512, 512, 1)) + 0.5 * r.normal(0, 1, (512, 512, 3))).astype(np.float32)
    return _NOISE[seed]


def make_jpeg(i: int, seed: int = 0, tiny: bool = False) -> tuple[int, bytes]:
    """(label, JPEG bytes) of image i: gradient + wave background, shapes in the class's hue, blur, noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng, label = np.random.default_rng((seed, i)), i % CLASSES
    w, h = (int(rng.integers(40, 61)), int(rng.integers(32, 49))) if tiny else (int(rng.integers(256, 385)), int(rng.integers(208, 321)))
    yy, xx = np.ogrid[0:h, 0:w]
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    angle, (fx, fy) = rng.uniform(0, 2 * np.pi), rng.uniform(0.01, 0.06, 2)
    t = ((xx * np.cos(angle) + yy * np.sin(angle)) / np.hypot(w, h) + 0.5).clip(0, 1).astype(np.float32)[..., None]
    wave = (25 * np.sin(xx * fx + rng.uniform(0, 6)) * np.cos(yy * fy)).astype(np.float32)[..., None]
    im = Image.fromarray((c0 + (c1 - c0) * t + wave).clip(0, 255).astype(np.uint8))
    draw, hue = ImageDraw.Draw(im), 140 + 100 * np.cos(label * 0.63 + np.array([0.0, 2.1, 4.2]))
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        box = [x0, y0, x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.6) * h]
        colour = tuple(int(v) for v in (hue + rng.normal(0, 40, 3)).clip(0, 255))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([tuple(p) for p in rng.uniform(0, 1, (int(rng.integers(3, 7)), 2)) * (w, h)], fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    oy, ox = int(rng.integers(0, 512 - h + 1)), int(rng.integers(0, 512 - w + 1))
    pixels = np.asarray(im, np.float32) + 8.0 * _noise(seed)[oy : oy + h, ox : ox + w]
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return label, buf.getvalue()


def _write_chunk(job: tuple[str, list[int], int, bool]) -> int:
    """Pool worker: writes images `ids` under ROOT/<split>/class_<k>/<i>.jpg; returns the bytes written."""
    root, ids, seed, tiny = job
    total = 0
    for i in ids:
        data = make_jpeg(i, seed, tiny)[1]
        image_path(Path(root), i).write_bytes(data)
        total += len(data)
    return total


def image_path(root: Path, i: int) -> Path:
    return root / ("test" if i < TEST_IMAGES else "train") / f"class_{i % CLASSES:02d}" / f"{i:07d}.jpg"


def make_folder(root: Path, images: int, seed: int = 0, workers: int | None = None, tiny: bool = False, distinct: int | None = None) -> int:
    """The ImageFolder of `images` training images (+ TEST_IMAGES held out) under root, written by a
    process pool; returns the JPEG bytes of its training images. Image i is the same whoever writes it.
    With `distinct`, the training images past the first `distinct` are hard links to those (same class)."""
    import multiprocessing

    for split in ("train", "test"):
        for k in range(CLASSES):
            (root / split / f"class_{k:02d}").mkdir(parents=True, exist_ok=True)
    made = images if distinct is None or distinct >= images else max(CLASSES, distinct - distinct % CLASSES)
    ids = list(range(made + TEST_IMAGES))
    chunks = [(str(root), ids[i : i + 200], seed, tiny) for i in range(0, len(ids), 200)]
    with multiprocessing.get_context("fork").Pool(workers or B.num_cores()) as pool:
        total = sum(pool.imap_unordered(_write_chunk, chunks)) - B.disk_bytes(root / "test")
    for i in range(TEST_IMAGES + made, TEST_IMAGES + images):
        src = image_path(root, TEST_IMAGES + (i - TEST_IMAGES) % made)
        os.link(src, image_path(root, i))
        total += src.stat().st_size
    return total


def subset_folder(src: Path, dst: Path, images: int) -> None:
    """dst: the test split and the first `images` training images of src, as hard links (no new bytes)."""
    for path in sorted(src.rglob("*.jpg")):
        i = int(path.stem)
        if i < TEST_IMAGES + images:
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


def pack(src: Path, dst: Path, workers: int, shard_size: str | None = None) -> float:
    """`vitctl data pack SRC DST` (the JPEG bytes kept; shards of its default size unless given); returns its seconds."""
    cmd = [*B.vitctl_command(), "data", "pack", str(src), str(dst), "--workers", str(workers), "--image-format", "keep"]
    cmd += ["--shard-size", shard_size] if shard_size else []
    r = B.run_command(cmd)
    if r.exit_code:
        raise SystemExit(f"vitctl data pack failed ({r.exit_code}): {r.stderr.strip()[-800:]}")
    return r.seconds


def read_once(*roots: Path) -> int:
    """Reads every file under the roots (so later reads come from the page cache); returns their bytes."""
    total = 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        total += len(chunk)
    return total


def prepare_data(args, workdir: Path) -> tuple[Path, Path | None]:
    """(the ImageFolder, its packed form or None where `vitctl data pack` is missing), made under workdir."""
    root, packed = workdir / "images", workdir / "packed"
    if not (root / "train").is_dir():  # else kept from an earlier run (--keep)
        log(f"make {args.images} images ({args.images * MEAN_JPEG_BYTES / 1e9:.2f} GB expected) in {root} ...")
        log(f"{make_folder(root, args.images, args.seed, tiny=args.tiny) / 1e6:.1f} MB of JPEG")
    try:
        if not (packed / "manifest.json").is_file():
            log(f"vitctl data pack: {pack(root, packed, B.num_cores()):.1f} s")
    except SystemExit as e:
        log(f"no packed set: {e}")
        packed = None
    log(f"read once (page cache): {read_once(root, *([packed] if packed else [])) / 1e6:.1f} MB")
    return root, packed


# ----------------------------------------------------------------------------- the two pipelines
def vitctl_stream(spec: Path, cfg, batch: int, workers: int, seed: int = 0):
    """Batches (images float32 [B,S,S,C], labels) of `vitctl train`'s pipeline, for ever; closing
    the generator closes the loader (its workers stop)."""
    from vitctl.data import lazy, pipeline

    records = lazy.open_records(str(spec), "train", channels=cfg.channels, test_fraction=0.2, seed=seed)
    with pipeline.StreamLoader(records, cfg, batch, seed=seed, shuffle=True, drop_remainder=True, process_index=0,
                               process_count=1, workers=workers, augment=AUGMENT, epochs=None) as loader:  # fmt: skip
        yield from loader


def timm_stream(root: Path, size: int, batch: int, workers: int, seed: int = 0):
    """Batches (images float32 [B,C,S,S], labels) of timm's training loader over root/train, epoch after
    epoch; closing the generator drops the loader and its workers."""
    import timm.data
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    if workers == 0:  # as in DataLoader's workers (see the module docstring)
        torch.set_num_threads(1)
    dataset = timm.data.ImageDataset(str(root / "train"))
    loader = timm.data.create_loader(dataset, (3, size, size), batch, is_training=True, color_jitter=0.0, num_workers=workers,
                                     use_prefetcher=False, device=torch.device("cpu"), persistent_workers=workers > 0)  # fmt: skip
    try:
        while True:
            yield from loader
    finally:
        torch.set_num_threads(threads)
        del loader


def rate(make_stream, batches: int, warmup: int = WARMUP_BATCHES) -> float:
    """Images/s of `batches` batches after `warmup` untimed ones, from a fresh stream (closed after)."""
    stream = make_stream()
    try:
        for _ in range(warmup):
            next(stream)
        t0, n = time.perf_counter(), 0
        for _ in range(batches):
            n += len(next(stream)[1])
        return n / (time.perf_counter() - t0)
    finally:
        stream.close()


def rotated(calls: dict, repeat: int, gate) -> dict[str, list[float]]:
    """Each call's results over `repeat` rounds, the calls in turn behind the gate, each round starting with the next."""
    names, out = list(calls), {n: [] for n in calls}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gate.wait()
            out[name].append(calls[name]())
            log(f"  {name}: {out[name][-1]:.1f} images/s")
    return out


def pipeline_rows(args, root: Path, packed: Path | None, gate) -> list[B.Row]:
    """Per worker count: vitctl over the ImageFolder and the packed set, and timm, interleaved."""
    from vitctl.config import ViTConfig

    cfg = ViTConfig.from_variant("vit22b-mu/16", num_classes=CLASSES, image_size=args.size)
    have_vitctl = vitctl_missing() is None
    rows = []
    for w in args.workers:
        calls = {}
        if have_vitctl:
            calls[f"input imagefolder b{args.batch_size} w{w} vitctl"] = lambda w=w: rate(
                lambda: vitctl_stream(root, cfg, args.batch_size, w, args.seed), args.batches
            )
            if packed:
                calls[f"input packed b{args.batch_size} w{w} vitctl"] = lambda w=w: rate(
                    lambda: vitctl_stream(packed, cfg, args.batch_size, w, args.seed), args.batches
                )
        timm_name = f"input imagefolder b{args.batch_size} w{w} timm"
        calls[timm_name] = lambda w=w: rate(lambda: timm_stream(root, args.size, args.batch_size, w, args.seed), args.batches)
        log(f"pipeline, {w} workers: {', '.join(calls)} ...")
        for name, rates in rotated(calls, args.repeat, gate).items():
            note = f"best of {len(rates)}: " + ", ".join(f"{r:.0f}" for r in rates) + f"; {args.batches} batches after {WARMUP_BATCHES}"
            rows.append(B.Row(name, max(rates), "images/s", None if name == timm_name else timm_name, note=note))
        if not have_vitctl:
            rows.append(B.Row(f"input imagefolder b{args.batch_size} w{w} vitctl", None, "images/s", timm_name, note=vitctl_missing()))
    return rows


def vitctl_missing() -> str | None:
    """None when vitctl's streaming pipeline is importable, else why not."""
    try:
        from vitctl.data import lazy, pipeline  # noqa: F401
    except ImportError as e:
        return f"vitctl's streaming pipeline is missing here ({e})"
    return None


# ----------------------------------------------------------------------------- train step, real vs synthetic input
def step_loop(setup, box: dict, batches, steps: int) -> float:
    """Images/s of `steps` steps of `vitctl train`'s loop (next batch, put, step, read the metrics)."""
    import jax

    t0 = time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        x, y = setup.put_batch(images, labels)
        box["state"], metrics = setup.train_step(box["state"], x, y)
        jax.device_get(metrics)
    return steps * setup.tcfg.batch_size / (time.perf_counter() - t0)


def train_rows(args, packed: Path | None, gate) -> list[B.Row]:
    """The step fed by StreamLoader (each worker count) against the same step on one synthetic batch."""
    import itertools

    import numpy as np

    from vitctl.config import ViTConfig
    from vitctl.train.distributed import mesh_for
    from vitctl.train.settings import TrainConfig
    from vitctl.train.step import Setup

    small = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 8} if args.tiny else {}
    cfg = ViTConfig.from_variant(args.model, num_classes=CLASSES, image_size=args.size, **small)
    b = args.batch_size
    log(f"compile the train step of {'a tiny model' if args.tiny else args.model} at {args.size} px, batch {b} ...")
    setup = Setup(cfg, TrainConfig(batch_size=b, steps=1000, warmup=10), mesh_for(""))
    box = {"state": setup.init_state(0)}
    rng = np.random.default_rng(0)
    fixed = (rng.standard_normal((b, args.size, args.size, cfg.channels), np.float32), rng.integers(0, CLASSES, b))
    label = "tiny" if args.tiny else args.model.removeprefix("vit22b-")
    synthetic = f"train {label} b{b} synthetic"
    calls = {synthetic: lambda: step_loop(setup, box, itertools.repeat(fixed), args.train_steps)}
    step_loop(setup, box, itertools.repeat(fixed), 1)  # compiles
    why = "no packed set" if packed is None else vitctl_missing()
    if why is None:
        for w in args.workers:
            calls[f"train {label} b{b} w{w} packed"] = lambda w=w: train_fed(setup, box, packed, cfg, w, args)
    log(f"train: {', '.join(calls)} ...")
    rows = []
    for name, rates in rotated(calls, args.repeat, gate).items():
        note = f"best of {len(rates)}: " + ", ".join(f"{r:.1f}" for r in rates) + f"; {args.train_steps} steps"
        rows.append(B.Row(name, max(rates), "images/s", None if name == synthetic else synthetic, note=note))
    if why is not None:
        rows += [B.Row(f"train {label} b{b} w{w} packed", None, "images/s", synthetic, note=why) for w in args.workers]
    B.link(rows)
    enough = next((w for w in args.workers if (r := _row(rows, f"train {label} b{b} w{w} packed")) and (r.ratio or 0) >= 0.95), None)
    rows.append(B.Row(f"train {label} b{b} workers for input >= 0.95 of synthetic", enough, "workers",
                      note="none of " + ",".join(map(str, args.workers)) if enough is None else "the fewest tried"))  # fmt: skip
    return rows


def _row(rows: list[B.Row], name: str) -> B.Row | None:
    return next((r for r in rows if r.name == name), None)


def train_fed(setup, box: dict, packed: Path, cfg, workers: int, args) -> float:
    """Images/s of the step fed by a fresh StreamLoader (one warm-up step: worker start-up)."""
    stream = vitctl_stream(packed, cfg, args.batch_size, workers, args.seed)
    try:
        step_loop(setup, box, stream, 1)
        return step_loop(setup, box, stream, args.train_steps)
    finally:
        stream.close()


# ----------------------------------------------------------------------------- memory
# Runs the command and watches it and its descendants through /proc until it exits: each
# process's VmHWM (its peak RSS, kept by the kernel) and the sum of their PSS (shared pages
# counted once), then the trainer's ru_maxrss from wait4. A fresh small interpreter, so
# ru_maxrss does not count the spawning benchmark's own memory.
_WATCH = """\
import json, os, subprocess, sys, time
cmd, out, err, every = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
def tree(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    pids, todo = [], [root]
    while todo:
        pids.append(todo.pop())
        todo += kids.get(pids[-1], [])
    return pids
def kib(path, key):
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key)), 0)
    except OSError:
        return 0
hwm, pss_peak, polls = {}, 0, 0
with open(out, "wb") as o, open(err, "wb") as e:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL)
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        pss = 0
        for q in tree(p.pid):
            hwm[q] = max(hwm.get(q, 0), kib(f"/proc/{q}/status", "VmHWM:"))
            pss += kib(f"/proc/{q}/smaps_rollup", "Pss:")
        pss_peak, polls = max(pss_peak, pss), polls + 1
        time.sleep(every)
trainer = hwm.pop(p.pid, 0)
print(json.dumps({"seconds": time.perf_counter() - t0, "exit_code": os.waitstatus_to_exitcode(status), "polls": polls,
                  "trainer_hwm_kib": trainer, "trainer_maxrss_kib": ru.ru_maxrss, "workers": len(hwm),
                  "worker_hwm_kib": max(hwm.values(), default=0), "pss_peak_kib": pss_peak}))
"""


def watch(cmd: list[str], every: float = 0.25, timeout: float | None = None) -> dict:
    """Runs cmd under the watcher: its peaks (KiB), seconds, exit code, stdout and stderr."""
    with tempfile.TemporaryDirectory(prefix="vitctl-bench-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        p = subprocess.run([sys.executable, "-c", _WATCH, json.dumps(cmd), str(out), str(err), str(every)],
                           capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
        if p.returncode:
            raise SystemExit(f"the memory watcher failed: {p.stderr[-800:]}")
        return {**json.loads(p.stdout), "stdout": out.read_text(errors="replace"), "stderr": err.read_text(errors="replace")}


def train_command(data: Path, out: Path, steps: int, workers: int = 2, batch: int = 32, size: int = 64) -> list[str]:
    """`vitctl train` of a tiny model on a data set, with the streaming pipeline's flags."""
    return [*B.vitctl_command(), "train", "--data", str(data), "--out", str(out), "--model", "vit22b-mu/16", "--image-size", str(size),
            "--steps", str(steps), "--batch-size", str(batch), "--workers", str(workers), "--augment", AUGMENT,
            "--stats-every", "0", "--json"]  # fmt: skip


def make_sets(workdir: Path, gigabytes: list[float], seed: int = 0, shard_size: str | None = None, distinct: int | None = None):
    """Packed data sets of about each size in GB of JPEG, the smaller ones hard-linked subsets of the
    largest (written once; `distinct`: see make_folder): [(packed dir, training images, JPEG bytes of its training split)]."""
    counts = [max(CLASSES, round(g * 1e9 / MEAN_JPEG_BYTES)) for g in gigabytes]
    largest = workdir / "images-largest"
    if not (largest / "train").is_dir():
        log(f"make {max(counts)} images (~{max(gigabytes)} GB) ...")
        make_folder(largest, max(counts), seed, distinct=distinct)
    sets = []
    for g, n in zip(gigabytes, counts):
        src = largest if n == max(counts) else workdir / f"images-{g:g}GB"
        if src != largest and not src.is_dir():
            subset_folder(largest, src, n)
        packed = workdir / f"packed-{g:g}GB"
        if not (packed / "manifest.json").is_file():
            log(f"vitctl data pack {src.name} ({n} images) ...")
            pack(src, packed, B.num_cores(), shard_size)
        sets.append((packed, n, B.disk_bytes(src / "train")))
    return sets


def memory_rows(args, workdir: Path) -> list[B.Row]:
    """`vitctl train` on each set under the watcher: peaks per set, and the larger minus the smaller."""
    sets, rows, peaks = make_sets(workdir, args.sizes, args.seed, distinct=args.distinct), [], []
    for (packed, n, nbytes), g in zip(sets, args.sizes):
        log(f"vitctl train on {packed.name} ({n} images, {nbytes / 1e9:.2f} GB), {args.memory_steps} steps, 2 workers ...")
        read_once(packed)
        r = watch(train_command(packed, workdir / f"run-{g:g}GB", args.memory_steps))
        shutil.rmtree(workdir / f"run-{g:g}GB", ignore_errors=True)
        if r["exit_code"]:
            raise SystemExit(f"vitctl train on {packed} failed ({r['exit_code']}): {r['stderr'][-1500:]}")
        peaks.append(r)
        label, first = f"memory {g:g}GB", f"memory {args.sizes[0]:g}GB"
        note = f"{n} images, {nbytes / 1e9:.2f} GB JPEG; {r['seconds']:.0f} s, {r['workers']} worker processes, {r['polls']} polls"
        rows += [
            B.Row(f"{label} trainer peak RSS", r["trainer_hwm_kib"] / 1024, "MiB", None if g == args.sizes[0] else f"{first} trainer peak RSS",
                  note=f"VmHWM; ru_maxrss {r['trainer_maxrss_kib'] / 1024:.0f} MiB; " + note),
            B.Row(f"{label} worker peak RSS", r["worker_hwm_kib"] / 1024, "MiB", None if g == args.sizes[0] else f"{first} worker peak RSS",
                  note="the largest VmHWM of the trainer's descendants"),
            B.Row(f"{label} all PSS peak", r["pss_peak_kib"] / 1024, "MiB", None if g == args.sizes[0] else f"{first} all PSS peak",
                  note="trainer + workers, shared pages counted once (sampled)"),
        ]  # fmt: skip
    for key, what in (("trainer_hwm_kib", "trainer peak RSS"), ("worker_hwm_kib", "worker peak RSS"), ("pss_peak_kib", "all PSS peak")):
        grown = (peaks[-1][key] - peaks[0][key]) / 1024
        rows.append(B.Row(f"memory {what} growth {args.sizes[0]:g}->{args.sizes[-1]:g}GB", grown, "MiB",
                          note=f"target < 100 MiB; data set grew {(sets[-1][2] - sets[0][2]) / 2**20:.0f} MiB"))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make", metavar="DIR", help="only write the ImageFolder to DIR (--images or --gigabytes) and exit")
    p.add_argument("--images", type=int, default=None, help="training images (default 4000, --tiny 60)")
    p.add_argument("--gigabytes", type=float, default=None, help="instead of --images: about this many GB of JPEG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="pipeline,train", help="parts to run: pipeline, train (comma-separated)")
    p.add_argument("--workers", default="0,1,2", help="worker counts to measure (default 0,1,2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="image size of the pipeline's output")
    p.add_argument("--batches", type=int, default=16, help="timed batches per pipeline measurement")
    p.add_argument("--model", default="vit22b-mu/16", help="the train part's model (default vit22b-mu/16)")
    p.add_argument("--train-steps", type=int, default=8, help="timed steps per train measurement")
    p.add_argument("--repeat", type=int, default=3, help="rounds (default 3); the best counts")
    p.add_argument("--memory", action="store_true", help="run the memory comparison (instead of --only's parts)")
    p.add_argument("--sizes", default="0.3,3", help="--memory: the data sets, in GB of JPEG (default 0.3,3)")
    p.add_argument("--memory-steps", type=int, default=400, help="--memory: steps of each vitctl train run")
    p.add_argument("--distinct", type=int, default=10_000, help="--memory: distinct images; the rest are hard links of them")
    p.add_argument("--workdir", default=None, help="where the data goes (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the data in --workdir, and use what an earlier run kept there")
    p.add_argument("--max-wait", type=float, default=60, help="seconds to wait, over the run, for other processes to go quiet")
    p.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...]} on stdout, nothing else there')
    p.add_argument("--tiny", action="store_true", help="60 small images, workers 0,1, one round, a tiny model at 32 px, no waiting")
    args = p.parse_args(argv)
    if args.tiny:
        args.workers, args.repeat, args.max_wait, args.batches, args.train_steps = "0,1", 1, 0, 2, 1
        args.batch_size, args.size, args.images = 8, 32, args.images or 60
    if args.gigabytes is not None:
        args.images = max(CLASSES, round(args.gigabytes * 1e9 / MEAN_JPEG_BYTES))
    args.images = args.images or 4000
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.sizes = sorted(float(s) for s in args.sizes.split(",") if s)
    if len(args.sizes) < 2 and args.memory:
        p.error("--sizes needs two sizes at least")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make:
        nbytes = make_folder(Path(args.make), args.images, args.seed, tiny=args.tiny)
        print(f"{args.images} training + {TEST_IMAGES} test images, {nbytes / 1e9:.3f} GB of JPEG in {args.make}")
        return 0
    parts = [s for s in args.only.split(",") if s]
    if unknown := set(parts) - {"pipeline", "train"}:
        raise SystemExit(f"unknown part(s): {', '.join(sorted(unknown))} (known: pipeline, train)")
    monitor, gate = B.LoadMonitor(), B.QuietGate(args.max_wait)
    rows: list[B.Row] = []
    keep = args.workdir is not None and (args.keep or args.memory)  # --memory with --workdir: the sets are reused next time
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="vitctl-bench-data-", dir=args.workdir))
    try:
        if args.memory:
            rows += memory_rows(args, work)
        else:
            root, packed = prepare_data(args, work)
            if "pipeline" in parts:
                rows += pipeline_rows(args, root, packed, gate)
            if "train" in parts:
                rows += train_rows(args, packed, gate)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return report(args, B.link(rows), monitor, gate)


def report(args, rows: list[B.Row], monitor, gate) -> int:
    out = {"rows": [r.as_dict() for r in rows], "machine": B.machine(), "load": {**monitor.summary(), "quiet_gate": gate.summary()}}
    if args.json:
        print(json.dumps(out))
        return 0
    from rich.console import Console

    console = Console(width=200, highlight=False)
    console.print(B.rows_table(f"bench/data.py: {out['machine']['cpu']}", rows))
    console.print(f"load: {monitor.describe()}; {gate.describe()}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
