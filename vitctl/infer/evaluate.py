"""vitctl eval: a classifier's accuracy on a labelled split, with either backend or both side by side.

- Checkpoint: anything vitctl.open opens (vitctl-jax, vitctl-torch, timm export and timm's own
  dirs, Hugging Face ViT dirs, big_vision .npz, hf://), run by infer.runner on the JAX or the
  PyTorch twin. fp32 matmuls at the highest precision (vitctl.verify.set_precision).
- Data: every source of `vitctl train` (data.lazy.open_records), split as it splits them, streamed
  through data.pipeline.eval_batches with the checkpoint's own resize and value mapping: only the
  counts are kept, never a split's images. Labels are class indices of the data; they are compared
  with the model's output indices, so the data may have fewer classes than the head, not more.
- Metrics: top-1 and top-k (k = min(5, the model's classes)); ties go to the lower class index
  (a stable sort of the logits), as argmax breaks them. Per-class accuracy and the confusion
  matrix, rows the true class (the data's K_d), columns the predicted class (the model's K_m).
- Class names: the data's, checked against the checkpoint's provenance (training data, timm or
  Hugging Face labels) when both have them; a difference is reported, never silently mapped.
- `backend="both"`: the JAX and the PyTorch twin run the very same input arrays; the report gives
  each one's metrics, the top-1 disagreements and the max-abs logits difference (fp32: 0 expected).
- Speed: images/s end to end (reading, decoding, preprocessing, the model and the counting, from
  the first batch to the last) and of the model alone (the time inside the forward calls). JAX
  compiles before the first batch, on one batch of zeros, timed as "compile" and in neither
  rate. JAX runs the padded last batch whole (one compiled shape), PyTorch its real rows.
- --confusion FILE.png: the matrix drawn by matplotlib's Agg canvas (no pyplot, no global state),
  colour the share of the true class, counts written in the cells up to 30 classes; written
  atomically (checkpoint.atomic_file). Over 100 classes a plot is refused: the JSON holds the matrix.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitctl.errors import ConfigError, DataError, MissingDependencyError, OutputError, OutputExistsError
from vitctl.infer.runner import default_backend, make_runner, one_blas_thread, recorded_class_names
from vitctl.open import Checkpoint, open_checkpoint

BACKEND_CHOICES = ("jax", "torch", "both")
TOP_K = 5
MAX_PLOT_CLASSES = 100  # beyond this a cell is under ~20 px at a readable figure size
ANNOTATE_CLASSES = 30  # counts written in the cells up to this many classes


class Tally:
    """Counts of one backend's predictions: the confusion matrix [K_d, K_m] and top-k hits."""

    def __init__(self, data_classes: int, model_classes: int):
        self.k = min(TOP_K, model_classes)
        self.confusion = np.zeros((data_classes, model_classes), np.int64)
        self.topk_hits = np.zeros(data_classes, np.int64)

    def add(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Counts one batch (logits float [B, K_m], labels int [B]); returns its top-1 predictions [B]."""
        top = np.argsort(-logits, axis=1, kind="stable")[:, : self.k]
        np.add.at(self.confusion, (labels, top[:, 0]), 1)
        np.add.at(self.topk_hits, labels[(top == labels[:, None]).any(1)], 1)
        return top[:, 0]

    def report(self, names: Sequence[str]) -> dict[str, Any]:
        counts = self.confusion.sum(1)
        hits = self.confusion.diagonal()  # K_m >= K_d: one entry per true class
        n = int(counts.sum())
        per_class = [
            {"class": i, "name": names[i], "count": int(c), "correct": int(h), "accuracy": float(h / c) if c else None}
            for i, (c, h) in enumerate(zip(counts, hits, strict=True))
        ]
        return {
            "top1": float(hits.sum() / n), f"top{self.k}": float(self.topk_hits.sum() / n), "correct": int(hits.sum()),
            f"correct_top{self.k}": int(self.topk_hits.sum()), "per_class": per_class, "confusion_matrix": self.confusion.tolist(),
        }  # fmt: skip


def check_options(split: str, backend: str | None, batch_size: int, workers: int, confusion: str | Path | None) -> None:
    """Bad arguments refused before anything is opened; --confusion's path checked as atomic_file will check it."""
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split '{split}'", hint="split must be 'train' or 'test'")
    if backend is not None and backend not in BACKEND_CHOICES:
        raise ConfigError(f"unknown --backend '{backend}'", hint="choose jax, torch or both")
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}", hint="e.g. --batch-size 256")
    if workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {workers}", hint="0 reads the images in this process")
    if confusion is None:
        return
    path = Path(confusion)
    if path.exists() or path.is_symlink():
        raise OutputExistsError(f"--confusion {path} already exists", hint="remove it yourself, or choose another path")
    if not path.parent.is_dir():
        raise OutputError(f"cannot create --confusion {path}: {path.parent} is not a directory", hint="create the directory first")
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"--confusion needs matplotlib ({e})", hint="pip install 'vitctl[data]', or leave out --confusion"
        ) from None


def check_model(ck: Checkpoint) -> None:
    """A classifier taking images the data sources give: a head, 1 or 3 channels."""
    if not ck.cfg.num_classes:
        raise ConfigError(
            f"{ck.path} has no classification head (num_classes 0): it gives features, not classes",
            hint="use `vitctl embed` for its features, or `vitctl probe` to measure them with a linear probe",
        )
    if ck.cfg.channels not in (1, 3):
        raise DataError(f"the model takes {ck.cfg.channels}-channel images; data sources give 1 (grayscale) or 3 (RGB)",
                        hint="evaluate a model with channels 1 or 3")  # fmt: skip


def open_split(data: str, split: str, ck: Checkpoint, test_fraction: float, seed: int):
    """The split's Records, as `vitctl train` opens and splits them, checked against the model's head."""
    from vitctl.data.lazy import open_records

    records = open_records(str(data), split, channels=ck.cfg.channels, test_fraction=test_fraction, seed=seed)
    if not len(records):
        raise DataError(f"{data}: the {split} split is empty", hint="evaluate another split (--split), or add data")
    if records.num_classes > ck.cfg.num_classes:
        raise DataError(
            f"{data} has {records.num_classes} classes but the model's head has {ck.cfg.num_classes} (num_classes)",
            hint="evaluate on data labelled with the model's classes, or fine-tune a head for these (vitctl train --init-from)",
        )
    return records


def class_names(records, ck: Checkpoint, notes: list[str]) -> tuple[list[str], list[str], str]:
    """(names of the data's classes, of the model's outputs, how the two sources compare).

    The data's names win for the rows; the checkpoint's (recorded_class_names) for the columns, indices
    where neither has one. A difference goes into `notes`: labels are compared by index, whatever the names say."""
    data = list(records.class_names) if records.class_names else None
    model = recorded_class_names(ck, notes)
    kd, km = records.num_classes, ck.cfg.num_classes
    if data and model:
        differ = [i for i in range(min(kd, len(model))) if data[i] != model[i]]
        check = "differ" if differ else "agree"
        if differ:
            shown = ", ".join(f"{i}: data '{data[i]}' vs checkpoint '{model[i]}'" for i in differ[:5])
            notes.append(f"the data's class names differ from the checkpoint's at {len(differ)} of {kd} indices ({shown}"
                         f"{', ...' if len(differ) > 5 else ''}); labels are compared by index")  # fmt: skip
    else:
        check = "data only" if data else ("checkpoint only" if model else "none")
    known = model or []
    rows = data or [known[i] if i < len(known) else str(i) for i in range(kd)]
    cols = [known[i] if i < len(known) else (rows[i] if i < kd else str(i)) for i in range(km)]
    return rows, cols, check


def stream(
    records, ck: Checkpoint, runners: dict[str, Callable], batch_size: int, workers: int, on_batch: Callable[[int, int], None] | None
) -> dict[str, Any]:
    """Every example of `records` through every runner on the same arrays: tallies, model times, disagreements."""
    from vitctl.data.pipeline import eval_batches

    tallies = {b: Tally(records.num_classes, ck.cfg.num_classes) for b in runners}
    model_s = dict.fromkeys(runners, 0.0)
    compile_s = {}
    if "jax" in runners:  # compiled here, on the one batch shape eval_batches gives, so the model's time is the model's
        t = time.perf_counter()
        runners["jax"](np.zeros((batch_size, ck.cfg.image_size, ck.cfg.image_size, ck.cfg.channels), np.float32))
        compile_s["jax"] = time.perf_counter() - t
    disagree, max_abs, done = 0, 0.0, 0
    with contextlib.closing(eval_batches(records, ck.cfg, batch_size, workers=workers)) as batches:
        for x, y, valid in batches:
            k = int(valid.sum())
            assert valid[:k].all(), "eval_batches pads only the end of the last batch"
            labels, logits, top1 = np.asarray(y[:k], np.int64), {}, {}
            for b, run in runners.items():
                t = time.perf_counter()
                logits[b] = run(x if b == "jax" else x[:k]).logits[:k]  # JAX: one compiled shape
                model_s[b] += time.perf_counter() - t
                top1[b] = tallies[b].add(logits[b], labels)
            if len(runners) == 2:
                disagree += int((top1["jax"] != top1["torch"]).sum())
                max_abs = max(max_abs, float(np.abs(logits["jax"] - logits["torch"]).max()))
            done += k
            if on_batch:
                on_batch(done, len(records))
    return {"tallies": tallies, "model_s": model_s, "compile_s": compile_s, "disagreements": disagree, "max_abs": max_abs}


def evaluate(
    ckpt: str | Path, data: str, *, split: str = "test", backend: str | None = None, batch_size: int = 256, workers: int = 0,
    confusion: str | Path | None = None, test_fraction: float = 0.2, split_seed: int = 0, prefix: str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Top-1/top-k, per-class accuracy and the confusion matrix of `ckpt` on `data`'s `split`; returns what --json prints.

    Args:
        ckpt: a checkpoint directory, a big_vision .npz or hf://org/name[@rev] (vitctl.open).
        data: digits, fashion-mnist, or a path (ImageFolder, .npz, IDX, HF save_to_disk dir, packed dir).
        backend: "jax", "torch" or "both"; None: the checkpoint's own (vitctl-torch, timm, HF: torch, else jax).
        confusion: a .png to draw the confusion matrix into (must not exist; its directory must).
        test_fraction, split_seed: the train/test split of sources without one (as `vitctl train`).
        prefix: the parameter prefix inside a big_vision .npz.
        on_batch: called with (images done, images in all) after each batch.
    """
    from vitctl.verify import set_precision

    t0 = time.perf_counter()
    check_options(split, backend, batch_size, workers, confusion)
    with open_checkpoint(ckpt, prefix=prefix, label="CKPT") as ck, one_blas_thread():
        check_model(ck)
        ck.check_memory("CKPT")  # the parameters are held whole: refused before the data is read
        cfg, notes = ck.cfg, []
        records = open_split(data, split, ck, test_fraction, split_seed)
        rows, cols, check = class_names(records, ck, notes)
        if confusion is not None and max(len(rows), len(cols)) > MAX_PLOT_CLASSES:
            raise ConfigError(f"--confusion: {len(cols)} classes are too many to plot legibly (at most {MAX_PLOT_CLASSES})",
                              hint="leave out --confusion: the --json report holds the whole matrix")  # fmt: skip
        backends = ["jax", "torch"] if backend == "both" else [default_backend(ck, backend)]
        precision = set_precision("fp32" if cfg.dtype == "float32" else "bf16")
        runners = {b: make_runner(ck, b, cfg=cfg) for b in backends}
        t_open = time.perf_counter() - t0
        t = time.perf_counter()
        s = stream(records, ck, runners, batch_size, workers, on_batch)
        t_stream = time.perf_counter() - t - sum(s["compile_s"].values())
        report = _report(ck, records, data, split, backend, backends, precision, s, (rows, check, notes))
    if confusion is not None:
        first = report["results"][backends[0]]
        title = f"{Path(str(ckpt)).name} on {Path(str(data)).name or data} ({split}, {backends[0]}): top-1 {first['top1']:.2%}"
        plot_confusion(np.asarray(first["confusion_matrix"]), rows, cols, confusion, title)
        report["confusion_png"] = str(confusion)
    n, total = len(records), time.perf_counter() - t0
    report["images_per_s"] = {"end_to_end": n / t_stream, "model": {b: n / max(s["model_s"][b], 1e-9) for b in backends}}
    report["timings"] = {"open": round(t_open, 4), "stream": round(t_stream, 4), "total": round(total, 4),
                         "model": {b: round(v, 4) for b, v in s["model_s"].items()},
                         "compile": {b: round(v, 4) for b, v in s["compile_s"].items()}}  # fmt: skip
    report["seconds"] = round(total, 4)
    return report


def _report(ck: Checkpoint, records, data, split, backend, backends, precision, s, names) -> dict[str, Any]:
    """The JSON-able report of one run, less its timings. `names`: (the data's class names, their check, notes)."""
    rows, check, notes = names
    results = {b: s["tallies"][b].report(rows) for b in backends}
    k = s["tallies"][backends[0]].k
    first = results[backends[0]]
    report: dict[str, Any] = {
        "checkpoint": {"path": str(ck.path), "format": ck.format}, "data": str(data), "split": split,
        "backend": "both" if backend == "both" else backends[0], "precision": precision.get("precision"),
        "num_examples": len(records), "num_classes": records.num_classes, "model_classes": ck.cfg.num_classes, "top_k": k,
        "top1": first["top1"], f"top{k}": first[f"top{k}"], "class_counts": [c["count"] for c in first["per_class"]],
        "class_names": rows, "class_names_check": check, "results": results, "confusion_png": None, "notes": notes,
    }  # fmt: skip
    if len(backends) == 2:
        report["agreement"] = {"disagreements": s["disagreements"], "max_abs_logits_diff": s["max_abs"]}
    return report


def plot_confusion(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: str | Path, title: str) -> None:
    """Draws `matrix` [K_d, K_m] (true class x predicted) into the PNG `path`, atomically; colour is the row's share."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vitctl.checkpoint import atomic_file

    kd, km = matrix.shape
    big = max(kd, km) > ANNOTATE_CLASSES
    cell, font = (0.2, 5) if big else (0.45, 8)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(max(4.0, km * cell + 2.5), max(3.5, kd * cell + 2.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="equal", interpolation="nearest")
    ax.set_xticks(range(km), [_short(c) for c in cols], rotation=90, fontsize=font)
    ax.set_yticks(range(kd), [_short(r) for r in rows], fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    if not big:
        for i, j in zip(*np.nonzero(matrix), strict=True):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=font, color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, shrink=max(0.4, min(1.0, kd / km)), label="share of the true class")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150 if big else 100, bbox_inches="tight")  # the canvas grows to hold long rotated names


def _short(name: str, most: int = 18) -> str:
    """A tick label of at most `most` characters: long class names would squeeze the matrix."""
    return name if len(name) <= most else name[: most - 1] + "…"
