"""vitctl probe: how good are a checkpoint's frozen features? Linear probe and few-shot.

Every choice that moves such numbers by points is explicit and
reported: which layer, which pooling, which preprocessing, which classifier protocol.

- Checkpoint: anything vitctl.open opens (vitctl-jax, vitctl-torch, timm export, big_vision
  .npz, hf://), run on either backend: the parameters are read under
  JAX per-layer names and loaded into the JAX or the PyTorch model, whatever the format.
- Data: every source of `vitctl train` (vitctl.data.lazy.open_records: digits, Fashion-MNIST,
  ImageFolder, .npz, IDX, HF datasets, packed dirs), split as it splits them, streamed as it
  streams its held-out split (data.pipeline.eval_batches, --workers grain processes) with the
  config's resize and value mapping (bit for bit `prepare`): only features [N, D] and labels
  are held, never a split's images. Labels: the Records' own, else the batches' (packed).
  Both backends get the very same input arrays, so a JAX-vs-PyTorch gap is the models' alone.
- Features (`--layer`, `--pool`):
  pre_logits: the model's own pooled representation (its MAP head, GAP or class token after
    the final norm), big_vision's default few-shot representation. --pool must be omitted
    or name the model's own pooling; a model without pooling (pool "none") takes gap.
  block:N (0-based, negative counts from the end): the output of block N, before the final
    norm, pooled by gap (mean over the patch tokens; the class token, if any, is left out)
    or tok (the class token, only for a model that has one). map is refused: the MAP head
    was trained on the final-norm output of the last block, so on any other input it is an
    arbitrary function, and on its own input it *is* pre_logits.
  Extracted in batches by vitctl.infer.embed.stream_features, the code `vitctl embed` writes
  from (the last batch padded for JAX, so it compiles once; torch runs only the real rows),
  fp32 matmuls at the highest precision (vitctl.verify.set_precision).
- Cache: features are stored under $VITCTL_CACHE (default ~/.cache/vitctl)/probe/ as an .npz
  (no pickle) named by the SHA-256 of a key: the checkpoint's content hash (config.json and
  every weight file, streamed), the backend, the data's identity (`data_hash`: a packed
  split's manifest entry, its shards' sha256s; any other source's every record, bytes or
  pixels and label, streamed), the split settings, layer, pooling, preprocessing and compute
  dtype. An entry holds the features and labels of both splits; it is written atomically
  (temporary file + os.replace) and checked on read (stored key, shapes, dtype, finite
  values, labels in range); an unreadable or mismatched entry is recomputed and replaced.
- Linear probe (CLIP's protocol, arXiv:2103.00020 sec. 3.2 / appendix A.3): L2-regularised
  multinomial logistic regression, scikit-learn's L-BFGS solver. C (inverse regularisation)
  (tol 1e-6, max_iter 1000) is swept over 10^-6 .. 10^6 (one value per decade) on a held-out, stratified 20% of the
  train split, then refined by half-decade steps around the best (CLIP refines its sweep
  the same way); ties go to the smaller C. Then refit on the whole train split with that C;
  accuracy on the test split. Features are standardised with the fitting set's mean and std
  (reported as "standardize"), so one C grid suits every layer's scale.
- Few-shot: big_vision's least-squares protocol (big_vision/evaluators/fewshot_lsr.py,
  `_precompute_cache` / `_eig_fewshot_acc_fn` / `compute_fewshot_metrics`), matched in:
  per seed s, `np.random.default_rng(s)` permutes each class's train indices and the first
  `shots` of each class form the few-shot train set (nested across shot counts); features
  are whitened per dimension with that set's mean and std (population std, + 1e-5); a
  constant feature of 100 is appended (the bias, "large so it's almost unregularized");
  targets are one-hot rescaled to {-1, +1}; the ridge solution (X^T X + l2 I)^-1 X^T Y
  (or X^T (X X^T + l2 I)^-1 Y when there are fewer points than dimensions), with l2 on every
  column including the bias one, l2 = 2^10 by default; test accuracy of the argmax. We solve
  with np.linalg.solve in float64 where big_vision uses an eigendecomposition in float32
  (same solution). Accuracy is the mean over seeds, std the population std over seeds.
  Unlike big_vision, which silently takes fewer, a class with fewer train examples than
  `shots` is an error.

jax and torch are imported only for the backend that runs; scikit-learn for the linear probe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitctl.config import ViTConfig
from vitctl.errors import ConfigError, DataError, MissingDependencyError
from vitctl.infer.embed import stream_features
from vitctl.infer.runner import Features, Outputs, default_backend, make_runner, one_blas_thread, resolve_features
from vitctl.open import Checkpoint, open_checkpoint

FEATURES_VERSION = 2  # bump when extraction changes, so old cache entries are not used
MODES = ("linear", "fewshot", "both")
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2 = 2.0**10  # big_vision configs: fewshot l2_reg = 2.0 ** 10
BIAS_CONSTANT = 100.0  # big_vision fewshot_lsr.BIAS_CONSTANT
C_GRID = tuple(10.0**k for k in range(-6, 7))  # CLIP: 1e-6 .. 1e6, log-spaced
VAL_FRACTION = 0.2
# scikit-learn's default tol (1e-4) stops L-BFGS where the iterate still depends on the path: JAX and
# PyTorch features of one checkpoint (max-abs diff 1.4e-6) then gave 1 of 360 digits test predictions
# apart (0.28 points); at 1e-6 they agree, for ~2x the iterations.
LBFGS_TOL = 1e-6


def cache_dir() -> Path:
    """$VITCTL_CACHE, else ~/.cache/vitctl."""
    return Path(os.environ.get("VITCTL_CACHE") or Path.home() / ".cache" / "vitctl")


def extract(
    runner: Callable[[np.ndarray], Outputs], records, cfg: ViTConfig, batch_size: int, pad: bool,
    on_batch: Callable[[int], None] | None = None, *, workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Features float32 [N, D] and labels int32 [N] of a Records: infer.embed.stream_features' batches (the code
    `vitctl embed` writes from), concatenated. `pad`: the padded last batch runs whole (JAX: one shape), else its real rows."""
    batches = list(stream_features(runner, records, cfg, batch_size, pad=pad, workers=workers, on_batch=on_batch))
    return np.concatenate([b.features for b in batches]), np.concatenate([b.labels for b in batches])


# Content hashes and the feature cache.
def content_hash(files: Sequence[Path], root: Path) -> str:
    """SHA-256 over (name relative to root, SHA-256 of the bytes) of every file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        name = f.name if f == root else str(f.relative_to(root))
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def data_hash(*splits, settings: dict[str, Any]) -> str:
    """SHA-256 of `settings` (the split's) and each split's data: a packed split's manifest entry (its shards'
    names, sizes, record counts and sha256s), else every example's bytes or pixels (shape, dtype) and label, streamed."""
    from vitctl.data.records import PackedSource

    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in splits:
        h.update(f"{type(r).__name__}:{getattr(r, 'split', '')}:{len(r)}:{r.num_classes}:{r.channels}\n".encode())
        if isinstance(r, PackedSource):
            h.update(json.dumps([[s["file"], s["num_records"], s["bytes"], s["sha256"]] for s in r.shards]).encode())
            continue
        for i in range(len(r)):
            image, label = r[i]
            if isinstance(image, np.ndarray):
                h.update(f"{i}:{int(label)}:{image.dtype.str}{image.shape}\n".encode())
                h.update(np.ascontiguousarray(image).data)
            else:
                h.update(f"{i}:{int(label)}:bytes{len(image)}\n".encode())
                h.update(image)
    return h.hexdigest()


def class_counts(records) -> np.ndarray:
    """Examples per class, [num_classes], of a split: from its labels, a packed split's manifest, or a pass over it."""
    from vitctl.data.records import PackedSource, read_manifest

    labels = getattr(records, "labels", None)
    if labels is None and isinstance(records, PackedSource):
        return np.asarray(read_manifest(records.root)["splits"][records.split]["class_counts"])
    labels = [records[i][1] for i in range(len(records))] if labels is None else labels
    return np.bincount(np.asarray(labels, np.int64), minlength=records.num_classes)


def load_cached(path: Path, key: str, sizes: tuple[int, int], num_classes: int = 0) -> tuple | str:
    """(train, test, labels) from a cache entry, or the reason it cannot be used (a str): float32 [N, D]
    features, and (train, test) int32 [N] labels in [0, num_classes) (0: any), None if the entry holds none."""
    try:
        with np.load(path, allow_pickle=False) as z:
            stored, train, test = str(z["key"][()]), z["train"], z["test"]
            labels = (z["train_labels"], z["test_labels"]) if "train_labels" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if stored != key:
        return "its stored key differs from this probe's"
    for name, a, n in (("train", train, sizes[0]), ("test", test, sizes[1])):
        if a.dtype != np.float32 or a.ndim != 2 or len(a) != n or a.shape[1] != train.shape[1] or not np.isfinite(a).all():
            return f"its {name} features have shape {a.shape} and dtype {a.dtype}, or non-finite values"
    for name, y, n in zip(("train", "test"), labels or (), sizes, strict=False):
        if y.dtype != np.int32 or y.shape != (n,) or (n and (y.min() < 0 or (num_classes and y.max() >= num_classes))):
            return f"its {name} labels have shape {y.shape} and dtype {y.dtype}, or values outside the classes"
    return train, test, labels


def save_cached(path: Path, key: str, train: np.ndarray, test: np.ndarray, labels: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Writes the entry (features, and labels when given) atomically: a temporary file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    extra = {"train_labels": labels[0], "test_labels": labels[1]} if labels is not None else {}
    try:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), train=train, test=test, **extra)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# The classifiers.
def _standardize(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = fit.mean(0), fit.std(0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (fit, *others)]


def _few_threads(x: np.ndarray, num_classes: int):
    """One BLAS/OpenMP thread for small problems: on a loaded 2-core machine, L-BFGS on digits-sized
    features (1151 x 48, 10 classes) took 6.3 s of CPU with the default 2 threads (spin-waiting)
    and 0.28 s with one. Large problems keep every thread."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1) if x.size * num_classes < 2**26 else contextlib.nullcontext()


def _logistic(x, y, C: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=LBFGS_TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as "converged" instead
        clf.fit(x, y)
    return clf


def linear_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *, cs: Sequence[float] = C_GRID,
    refine: bool = True, val_fraction: float = VAL_FRACTION, seed: int = 0, max_iter: int = 1000,
) -> dict[str, Any]:  # fmt: skip
    """CLIP's linear probe (see the module docstring). Returns {"accuracy", "C", "val_accuracy", "sweep", ...}."""
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"the linear probe needs scikit-learn ({e})", hint="pip install 'vitctl[data]', or use --mode fewshot"
        ) from None
    from vitctl.data.dataset import split_indices

    fit_idx, val_idx = split_indices(y_train, val_fraction, seed)
    x_fit, x_val = _standardize(x_train[fit_idx].astype(np.float64), x_train[val_idx].astype(np.float64))
    x_tr, x_te = _standardize(x_train.astype(np.float64), x_test.astype(np.float64))
    sweep: dict[float, float] = {}

    def score(C: float) -> float:
        if C not in sweep:
            sweep[C] = float(_logistic(x_fit, y_train[fit_idx], C, max_iter).score(x_val, y_train[val_idx]))
        return sweep[C]

    with _few_threads(x_train, len(np.unique(y_train))):
        best = max(cs, key=lambda C: (score(C), -C))
        if refine:
            best = max([best, *(best * 10.0**e for e in (-0.5, -0.25, 0.25, 0.5))], key=lambda C: (score(C), -C))
        clf = _logistic(x_tr, y_train, best, max_iter)
        accuracy, train_accuracy = float(clf.score(x_te, y_test)), float(clf.score(x_tr, y_train))
    return {
        "accuracy": accuracy, "C": best, "val_accuracy": sweep[best], "train_accuracy": train_accuracy,
        "converged": bool(np.all(clf.n_iter_ < max_iter)), "fit_size": len(fit_idx), "val_size": len(val_idx), "standardize": True,
        "sweep": [{"C": C, "val_accuracy": a} for C, a in sorted(sweep.items())],
    }  # fmt: skip


def lsr_fit(x: np.ndarray, labels: np.ndarray, num_classes: int, l2: float = DEFAULT_L2) -> dict[str, np.ndarray]:
    """big_vision's few-shot least squares on [N, D] features: whiten, bias column, {-1, 1} targets, ridge.

    Returns {"mean", "std", "w"}: w of shape [D + 1, num_classes] (last row: the bias feature).
    """
    x = np.asarray(x, np.float64)
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    x = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    y = 2.0 * np.eye(num_classes)[labels] - 1.0
    n, d = x.shape
    if n >= d:  # primal: (X^T X + l2 I)^-1 X^T Y
        w = np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ y)
    else:  # dual: X^T (X X^T + l2 I)^-1 Y
        w = x.T @ np.linalg.solve(x @ x.T + l2 * np.eye(n), y)
    return {"mean": mean, "std": std, "w": w}


def lsr_predict(fit: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    x = np.pad((np.asarray(x, np.float64) - fit["mean"]) / fit["std"], ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    return np.argmax(x @ fit["w"], axis=1)


def fewshot(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, num_classes: int, *,
    shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 3, l2: float = DEFAULT_L2,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """{"5": {"accuracy": mean over seeds, "std", "per_seed": [...], "train_size"}, ...} (see the module docstring)."""
    per: dict[int, list[float]] = {s: [] for s in shots}
    with _few_threads(x_train, num_classes):
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            class_indices = [rng.permutation(np.flatnonzero(y_train == c)) for c in range(num_classes)]
            for s, accuracies in per.items():
                idx = np.concatenate([ci[:s] for ci in class_indices])
                fit = lsr_fit(x_train[idx], y_train[idx], num_classes, l2)
                accuracies.append(float(np.mean(lsr_predict(fit, x_test) == y_test)))
    present = len(np.unique(y_train))
    return {
        str(s): {"accuracy": float(np.mean(a)), "std": float(np.std(a)), "per_seed": a, "train_size": s * present} for s, a in per.items()
    }


# Checks before any work.
def check_options(mode: str, shots: Sequence[int], seeds: int, batch_size: int, l2: float, workers: int = 0) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown --mode '{mode}'", hint=f"choose one of: {', '.join(MODES)}")
    if mode != "linear":
        if not shots or any(s < 1 for s in shots):
            raise ConfigError(
                f"--shots must be positive integers, got {','.join(map(str, shots)) or 'none'}", hint="e.g. --shots 1,5,10,25"
            )
        if seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {seeds}")
        if not l2 > 0:
            raise ConfigError(f"the few-shot L2 must be positive, got {l2}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"--workers must be 0 (read in this process) or more, got {workers}")


def check_data(train, test, mode: str, shots: Sequence[int]) -> None:
    """Refuses data a probe cannot use, naming the fix. `train`: a Records (or anything with labels and num_classes)."""
    counts = class_counts(train)
    classes = np.flatnonzero(counts)
    counts = counts[classes]
    if len(classes) < 2:
        raise DataError(
            f"{train.name}: the train split has {len(classes)} class(es); a probe needs at least 2",
            hint="use a data set with several classes (ImageFolder: one subdirectory per class)",
        )
    if mode != "fewshot" and counts.min() < 2:
        raise DataError(f"{train.name}: class {classes[counts.argmin()]} has 1 train example; the linear probe holds out a part of each class",
                        hint="add examples, or use --mode fewshot --shots 1")  # fmt: skip
    if mode != "linear" and counts.min() < max(shots):
        raise DataError(
            f"{train.name}: class {classes[counts.argmin()]} has {counts.min()} train example(s), fewer than {max(shots)} shots",
            hint=f"use --shots up to {counts.min()}, or a larger data set",
        )


# The whole probe.
def probe(
    ckpt_path: str | Path, data: str, *, backend: str | None = None, layer: str = "pre_logits", pool: str | None = None,
    mode: str = "both", shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 3, batch_size: int = 256, l2: float = DEFAULT_L2,
    split_seed: int = 0, test_fraction: float = 0.2, cs: Sequence[float] = C_GRID, use_cache: bool = True, prefix: str | None = None,
    on_batch: Callable[[int, int], None] | None = None, workers: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Linear probe and/or few-shot of `ckpt_path`'s frozen features on `data`; returns what --json prints.

    Args:
        ckpt_path: a checkpoint directory, a big_vision .npz or hf://org/name[@rev] (vitctl.open).
        backend: "jax" or "torch"; None: the checkpoint's own (vitctl-torch and timm: torch, else jax).
        cs: the linear probe's grid of C (inverse L2 strength) before refinement; default CLIP's range.
        split_seed, test_fraction: the train/test split of sources without one (as `vitctl train`).
        on_batch: called with (images done, images in all) after each batch of extraction.
        workers: grain worker processes that read and preprocess the images (0: this process).
    """
    from vitctl.verify import set_precision

    t0 = time.perf_counter()
    check_options(mode, shots, seeds, batch_size, l2, workers)
    with open_checkpoint(ckpt_path, prefix=prefix, label="CKPT") as ck, one_blas_thread():
        ck.check_memory("CKPT")  # the parameters are held whole: refused before the data is loaded
        cfg = ck.cfg
        backend, feats = _check_model(ck, backend, layer, pool)
        precision = set_precision("fp32" if cfg.dtype == "float32" else "bf16")
        timings = {"open": time.perf_counter() - t0}
        t = time.perf_counter()
        split = {"channels": cfg.channels, "test_fraction": test_fraction, "seed": split_seed}
        train, test = _open_data(data, split, mode, shots)
        timings["load_data"] = time.perf_counter() - t
        t = time.perf_counter()
        ckpt_hash = content_hash(ck.files(), ck.path)
        key = _cache_key(ckpt_hash, backend, data_hash(train, test, settings=split), feats, cfg)
        entry = cache_dir() / "probe" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
        timings["hash"] = time.perf_counter() - t
        notes = _patch_grid_notes(cfg, ckpt_path)
        cache = (entry, key) if use_cache else None
        x_train, x_test, y_train, y_test, cached = _features(
            ck, backend, feats, (train, test), (batch_size, workers), cache, notes, timings, on_batch
        )
    result: dict[str, Any] = {
        "checkpoint": {"path": str(ck.path), "format": ck.format, "sha256": ckpt_hash},
        "data": str(data), "backend": backend, "layer": feats.layer, "pool": feats.pool, "mode": mode,
        "train_size": len(train), "test_size": len(test), "num_classes": train.num_classes, "feature_dim": int(x_train.shape[1]),
        "preprocess": {"image_size": cfg.image_size, **dataclasses.asdict(cfg.preprocess)}, "precision": precision.get("precision"),
        "cached": cached, "cache_file": str(entry) if use_cache else None,
    }  # fmt: skip
    if mode != "fewshot":
        t = time.perf_counter()
        result["linear"] = linear_probe(x_train, y_train, x_test, y_test, cs=cs)
        timings["linear"] = time.perf_counter() - t
    if mode != "linear":
        t = time.perf_counter()
        result["fewshot"] = fewshot(x_train, y_train, x_test, y_test, train.num_classes, shots=shots, seeds=seeds, l2=l2)
        result.update(fewshot_l2=l2, fewshot_seeds=seeds)
        timings["fewshot"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return {**result, "timings": {k: round(v, 4) for k, v in timings.items()}, "notes": notes}


def _check_model(ck: Checkpoint, backend: str | None, layer: str, pool: str | None) -> tuple[str, Features]:
    """The backend to run (default: the checkpoint's own) and the features to extract, checked against the model."""
    backend = default_backend(ck, backend)
    feats = resolve_features(ck.cfg, layer, pool)
    if ck.cfg.channels not in (1, 3):
        raise DataError(f"the model takes {ck.cfg.channels}-channel images; data sources give 1 (grayscale) or 3 (RGB)",
                        hint="probe a model with channels 1 or 3")  # fmt: skip
    return backend, feats


def _open_data(data: str, split: dict[str, Any], mode: str, shots: Sequence[int]):
    """The (train, test) Records of `data`, as `vitctl train` opens and splits them, checked for this probe."""
    from vitctl.data.lazy import open_records

    train, test = (open_records(str(data), s, **split) for s in ("train", "test"))
    check_data(train, test, mode, shots)
    return train, test


def _cache_key(ckpt_hash: str, backend: str, data: str, feats: Features, cfg: ViTConfig) -> str:
    """Everything the features depend on, as sorted JSON."""
    return json.dumps({
        "version": FEATURES_VERSION, "checkpoint": ckpt_hash, "backend": backend, "data": data,
        "layer": feats.layer, "pool": feats.pool, "image_size": cfg.image_size, "channels": cfg.channels,
        "preprocess": dataclasses.asdict(cfg.preprocess), "dtype": cfg.dtype,
    }, sort_keys=True)  # fmt: skip


def _patch_grid_notes(cfg: ViTConfig, ckpt_path: str | Path) -> list[str]:
    """A checkpoint may hold a one-token model (train refuses to make one): its features are one patch's."""
    try:
        cfg.check_patch_grid(str(ckpt_path))
    except ConfigError as e:
        return [e.message]
    return []


def _features(
    ck: Checkpoint, backend: str, feats: Features, splits: tuple, batching: tuple[int, int], cache: tuple[Path, str] | None,
    notes: list[str], timings: dict[str, float], on_batch: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:  # fmt: skip
    """(train features, test features, train labels, test labels, whether from `cache` (entry, key)); else
    extracted with `batching` (batch size, workers) and stored there. A split's own labels win over the entry's or the batches'."""
    got = _cached(cache, splits, notes)
    cached = got is not None
    if got is None:
        got = _extract_splits(ck, backend, feats, splits, batching, timings, on_batch)
        if cache is not None:
            save_cached(*cache, *got)
    x_train, x_test, labels = got
    own = [getattr(r, "labels", None) for r in splits]
    y_train, y_test = (np.asarray(o, np.int32) if o is not None else y for o, y in zip(own, labels, strict=True))
    return x_train, x_test, y_train, y_test, cached


def _cached(cache: tuple[Path, str] | None, splits: tuple, notes: list[str]) -> tuple | None:
    """(train, test, labels) from the cache entry; None where there is none, or it cannot be used (noted)."""
    if cache is None or not cache[0].exists():
        return None
    got = load_cached(cache[0], cache[1], (len(splits[0]), len(splits[1])), splits[0].num_classes)
    if not isinstance(got, str) and got[2] is None:
        got = "it holds no labels"
    if isinstance(got, str):
        notes.append(f"cache entry {cache[0]} not used: {got}; recomputed")
        return None
    return got


def _extract_splits(
    ck: Checkpoint, backend: str, feats: Features, splits: tuple, batching: tuple[int, int], timings: dict[str, float],
    on_batch: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Runs the model over both splits: (train features, test features, (train labels, test labels))."""
    t = time.perf_counter()
    runner = make_runner(ck, backend, feats, logits=False)
    timings["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    total, done = sum(map(len, splits)), 0
    bs, workers = min(batching[0], max(map(len, splits))), batching[1]

    def step(k: int) -> None:
        nonlocal done
        done += k
        if on_batch:
            on_batch(done, total)

    (x_train, y_train), (x_test, y_test) = (extract(runner, r, ck.cfg, bs, backend == "jax", step, workers=workers) for r in splits)
    timings["features"] = time.perf_counter() - t
    if not (np.isfinite(x_train).all() and np.isfinite(x_test).all()):
        raise DataError("the model's features hold NaN or infinite values", hint="check the checkpoint with `vitctl verify`")
    return x_train, x_test, (y_train, y_test)
