"""`vitctl predict`: the top-k classes of image files, by any checkpoint vitctl opens, on either backend.

- Inputs: image files and directories (a directory: its image files, recursively, sorted, hidden
  ones left out). A file named on the command line is read whatever its suffix.
- Each image gets the checkpoint's own preprocessing, the same array `vitctl eval` and `vitctl
  probe` feed the model for that file: decoded by data.sources.images.decode_file, then
  data.augment.transform without ops (resize to cfg.image_size and the config's value mapping;
  the numbers of data.preprocess.prepare, bit for bit).
- Decoding runs in a thread pool (PIL and numpy's resize let go of the GIL), up to two batches
  ahead of the model, so decoding overlaps the forward pass.
- An image that does not decode (unreadable, truncated, not an image, a mode PIL cannot convert)
  is skipped and counted; with strict=True the first one stops the run (DataError naming it).
- Probabilities: the softmax of the logits; the sigmoid of each logit instead when the run that
  trained the checkpoint (its train_config.json) used the sigmoid loss, whose classes are
  independent. Either way the ranking is that of the logits.
- Labels: the class names recorded along the checkpoint's lineage (config.json's provenance:
  training data, a timm or Hugging Face import, kept by convert), else the class index.
- CSV (`csv=`): long form, one row per (file, rank): file,rank,index,label,prob; rank 1 is the
  most probable. Written to a temporary beside the target and renamed when the run completes.

Shape letters: B batch, S cfg.image_size, C channels, K classes.
"""

from __future__ import annotations

import collections
import contextlib
import csv as csvlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vitctl.checkpoint import atomic_file
from vitctl.config import ViTConfig
from vitctl.data.augment import transform
from vitctl.data.preprocess import IMAGE_SUFFIXES
from vitctl.data.sources.images import decode_file, image_files
from vitctl.errors import ConfigError, DataError, VitctlError
from vitctl.infer.runner import default_backend, make_runner, one_blas_thread, recorded_class_names
from vitctl.open import Checkpoint, open_checkpoint

CSV_HEADER = ("file", "rank", "index", "label", "prob")
AHEAD = 2  # batches decoded ahead of the model: one being decoded while another waits, so the model never does
STRICT_HINT = "remove or replace it, or run without --strict to skip unreadable images"


def list_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[dict[str, Any]]]:
    """(files in order, one {"path", "kind", "images"} per input): directories searched recursively and sorted.

    Raises:
        DataError: a path that does not exist, a directory without image files, or no inputs at all.
    """
    if not inputs:
        raise DataError("no images given", hint="name image files or directories: vitctl predict CKPT photo.jpg photos/")
    files, found, seen = [], [], set()
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            listed = image_files(path)
            if not listed:
                raise DataError(
                    f"no image files in {path}", hint=f"a directory is searched recursively for {', '.join(IMAGE_SUFFIXES)} files"
                )
            kind = "directory"
        elif path.exists():
            listed, kind = [path], "file"
        else:
            raise DataError(f"no such file or directory: {path}", hint="name image files or directories")
        found.append({"path": str(path), "kind": kind, "images": len(listed)})
        for f in listed:
            key = os.path.realpath(f)
            if key not in seen:  # a file named twice (or inside two given directories) is predicted once
                seen.add(key)
                files.append(f)
    return files, found


def prepare_file(path: Path, cfg: ViTConfig) -> np.ndarray:
    """One image file -> float32 [S, S, C], the array eval_batches gives for it (augment.transform without ops)."""
    return transform(decode_file(path, cfg.channels), cfg, None, None, channels=cfg.channels)


def trained_loss(ck: Checkpoint) -> str:
    """softmax, or sigmoid when the training run that wrote the checkpoint says so (its train_config.json)."""
    path = ck.path / "train_config.json" if ck.path.is_dir() else None
    if path is None or not path.is_file():
        return "softmax"
    from vitctl.untrusted import read_json

    try:
        loss = read_json(path).get("loss")
    except VitctlError:
        return "softmax"  # a damaged settings file says nothing about the head
    return "sigmoid" if loss == "sigmoid" else "softmax"


def probabilities(logits: np.ndarray, kind: str) -> np.ndarray:
    """float32 [B, K] logits -> probabilities: softmax over K, or an independent sigmoid per class."""
    z = logits.astype(np.float64)
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, k: int, kind: str, names: list[str] | None) -> list[list[dict[str, Any]]]:
    """Per row of [B, K] logits: the k highest, as {"index", "label", "prob"}; ties go to the lower index."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    probs = probabilities(logits, kind)
    names = names or []
    return [
        [{"index": int(i), "label": names[i] if i < len(names) else str(i), "prob": float(p[i])} for i in row]
        for row, p in zip(order, probs, strict=True)
    ]


def _batches(files: list[Path], cfg: ViTConfig, batch_size: int, threads: int) -> Iterator[list[tuple[Path, np.ndarray | DataError]]]:
    """Batches of (file, prepared image or the DataError it raised), in order; decoding runs AHEAD batches ahead."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="vitctl-predict")
    pending: collections.deque[list[tuple[Path, Future]]] = collections.deque()

    def result(f: Future) -> np.ndarray | DataError:
        try:
            return f.result()
        except DataError as e:
            return e

    try:
        for start in range(0, len(files), batch_size):
            pending.append([(p, pool.submit(prepare_file, p, cfg)) for p in files[start : start + batch_size]])
            if len(pending) > AHEAD:
                yield [(p, result(f)) for p, f in pending.popleft()]
        while pending:
            yield [(p, result(f)) for p, f in pending.popleft()]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_options(top_k: int, batch_size: int, threads: int | None) -> None:
    if top_k < 1:
        raise ConfigError(f"--top-k must be 1 or more, got {top_k}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be 1 or more, got {batch_size}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be 1 or more, got {threads}")


def predict(
    ckpt: str | Path, inputs: Sequence[str | Path], *, top_k: int = 5, backend: str | None = None, batch_size: int = 64,
    strict: bool = False, on_batch: Callable[[int, int], None] | None = None, on_skip: Callable[[str, str], None] | None = None,
    csv: str | Path | None = None, threads: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The top-k classes of every image in `inputs` (files and directories) by the checkpoint `ckpt`.

    Args:
        backend: jax or torch (default: the checkpoint's own).
        strict: stop at the first image that does not decode (DataError) instead of skipping it.
        on_batch: called with (files done, files in all) after each batch.
        on_skip: called with (file, why) for each image skipped.
        csv: also write the predictions there (long form, see the module docstring); an existing file is refused.
        threads: decoding threads (default: the CPUs this process may use).

    Returns:
        {"predictions": [{"file", "topk": [{"index", "label", "prob"}, ...]}, ...], "skipped": [{"file", "error"}],
        "inputs", "checkpoint", "settings", "images", "images_per_s", "timings", "notes"}.
    """
    check_options(top_k, batch_size, threads)
    t0 = time.perf_counter()
    files, found = list_images(inputs)
    output = contextlib.nullcontext(None) if csv is None else atomic_file(csv)
    with output as tmp, open_checkpoint(ckpt, label="CKPT") as ck, one_blas_thread():
        ck.check_memory("CKPT")
        result = _run(ck, files, top_k, backend, batch_size, strict, on_batch, on_skip, threads or _cpus())
        if tmp is not None:
            write_csv(tmp, result["predictions"])
    result["inputs"] = found
    result["timings"]["total"] = round(time.perf_counter() - t0, 4)
    if csv is not None:
        result["csv"] = str(csv)
    return result


def _cpus() -> int:
    """The CPUs this process may run on (a container's share, where the OS says so)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run(ck: Checkpoint, files: list[Path], k: int, backend: str | None, batch_size: int, strict: bool,
         on_batch, on_skip, threads: int) -> dict[str, Any]:  # fmt: skip
    from vitctl.verify import set_precision

    cfg = ck.cfg
    backend = default_backend(ck, backend)
    precision = set_precision("fp32" if cfg.dtype == "float32" else "bf16")["precision"]
    t = time.perf_counter()
    run = make_runner(ck, backend, None, logits=True)  # refuses a model without a head
    timings = {"load_model": time.perf_counter() - t}
    names, kind, asked, k = recorded_class_names(ck), trained_loss(ck), k, min(k, cfg.num_classes)
    batch_size = min(batch_size, len(files))  # JAX compiles one shape: no larger than the work
    predictions, skipped, done, model_s = [], [], 0, 0.0
    t = time.perf_counter()
    for batch in _batches(files, cfg, batch_size, threads):
        good = [(p, x) for p, x in batch if not isinstance(x, DataError)]
        for path, e in ((p, x) for p, x in batch if isinstance(x, DataError)):
            if strict:
                raise DataError(str(e) if str(path) in str(e) else f"{path}: {e}", hint=STRICT_HINT)
            skipped.append({"file": str(path), "error": str(e)})
            if on_skip:
                on_skip(str(path), str(e))
        if good:
            t1 = time.perf_counter()
            logits = _logits(run, np.stack([x for _, x in good]), batch_size if backend == "jax" else 0)
            model_s += time.perf_counter() - t1
            predictions += [{"file": str(p), "topk": row} for (p, _), row in zip(good, top_k(logits, k, kind, names), strict=True)]
        done += len(batch)
        if on_batch:
            on_batch(done, len(files))
    timings["predict"] = time.perf_counter() - t
    timings["model"] = model_s  # of predict: the forward passes; the rest is waiting for decoded images, and top-k
    settings = {"backend": backend, "precision": precision, "top_k": k, "batch_size": batch_size, "threads": threads,
                "probabilities": kind, "labels": "class_names" if names else "indices", "num_classes": cfg.num_classes,
                "image_size": cfg.image_size, "preprocess": dataclasses.asdict(cfg.preprocess)}  # fmt: skip
    return {
        "checkpoint": {"path": str(ck.path), "format": ck.format},
        "predictions": predictions,
        "skipped": skipped,
        "images": len(predictions),
        "images_per_s": round(len(files) / timings["predict"], 2) if timings["predict"] > 0 else None,
        "settings": settings,
        "timings": {n: round(v, 4) for n, v in timings.items()},
        "notes": _notes(names, kind, asked, cfg),
    }


def _logits(run, x: np.ndarray, pad_to: int) -> np.ndarray:
    """float32 [B, K] logits of [B, S, S, C] images; padded to `pad_to` rows first (JAX: one compiled shape)."""
    b = len(x)
    if b < pad_to:
        x = np.concatenate([x, np.repeat(x[:1], pad_to - b, axis=0)])
    return run(x).logits[:b]


def _notes(names: list[str] | None, kind: str, k: int, cfg: ViTConfig) -> list[str]:
    notes = []
    if k > cfg.num_classes:
        notes.append(f"top-k {k}: the model has {cfg.num_classes} classes, so every class is listed")
    if names is None:
        notes.append("the checkpoint records no class names: labels are class indices")
    elif len(names) < cfg.num_classes:
        notes.append(f"the checkpoint names {len(names)} of its {cfg.num_classes} classes: the others are labelled by index")
    if kind == "sigmoid":
        notes.append("probabilities are per-class sigmoids (the checkpoint was trained with the sigmoid loss): they need not sum to 1")
    return notes


def write_csv(path: str | Path, predictions: list[dict[str, Any]]) -> None:
    """The predictions in long form: header file,rank,index,label,prob; one row per (file, rank), rank from 1."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csvlib.writer(f)
        w.writerow(CSV_HEADER)
        for p in predictions:
            for rank, c in enumerate(p["topk"], 1):
                w.writerow((p["file"], rank, c["index"], c["label"], repr(c["prob"])))


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """write_csv's file back as predictions ({"file", "topk": [...]}, in order)."""
    out: list[dict[str, Any]] = []
    with open(path, newline="", encoding="utf-8") as f:
        rows = csvlib.reader(f)
        if tuple(next(rows, ())) != CSV_HEADER:
            raise DataError(f"{path} is not a vitctl predict CSV (header {','.join(CSV_HEADER)})")
        for file, rank, index, label, prob in rows:
            if rank == "1":
                out.append({"file": file, "topk": []})
            out[-1]["topk"].append({"index": int(index), "label": label, "prob": float(prob)})
    return out
